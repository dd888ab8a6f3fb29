#!/usr/bin/env bash
# Unattended checks on a CUDA GPU box (no network needed), in about 8 minutes on an H200. Every step is time-boxed,
# a failing step does not stop the others, and each appends one JSON line to $OUT/gpu_results.json as it ends:
#   facts      GPU, driver, CUDA, torch, nvcc
#   cpm        installs cpm_kernels + setuptools<81 from a wheel folder (no index) into $OUT/pylib, if given
#   backends   which launcher runs on each GPU (or why not) and which backend a quantized layer binds
#   tests      tests/test_cuda_kernels.py (the nvcc build, the emulation and the GPU tests)
#   linears    ms per call at ChatGLM3-6B widths: fp16/bf16 F.linear vs int8/int4 per backend, 1 and 8 input rows
#   bench_b1   benchmarks/bench_generate.py: decode ms/token, prefill tok/s and peak memory, fp16/bf16/int8/int4
#              vs transformers' GlmForCausalLM fp16/bf16, batch 1 (random weights, $LAYERS layers)
#   bench_b8   the same at batch 8, one prompt length
#
#   OUT=/tmp/out WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh   # WHEELS: pip download cpm_kernels "setuptools<81" -d DIR
#   bash benchmarks/gpu_check.sh --wheels DIR --layers 28                # the full model (~12.5 GB checkpoint per run dir)
#   bash benchmarks/gpu_check.sh --dry-run                               # on CPU, a tiny model: checks this script
# Environment: PYTHON (default python3), OUT (default ./gpu_check_out), LAYERS (default 8), WHEELS, WORK_DIR.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
LAYERS=${LAYERS:-8}
WHEELS=${WHEELS:-}
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) WHEELS=$2; shift ;;
        --layers) LAYERS=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT/logs"
RESULTS=$OUT/gpu_results.json
: > "$RESULTS"
export HF_MODULES_CACHE=${HF_MODULES_CACHE:-$(mktemp -d)} PYTHONPATH="$OUT/pylib${PYTHONPATH:+:$PYTHONPATH}"
WORK_DIR=${WORK_DIR:-$OUT/work}
if [ "$DRY" = 1 ]; then
    DEVICE=cpu; BENCH="--tiny --layers 2 --dtypes fp16 --prompts 16 --new-tokens 4 --repeats 1"; B8="--prompts 16 --new-tokens 4"
    TESTS=(-k "fallback or matmul_uses or launchers_are_none"); LIN_TINY=1; LIN_REPEATS=2
else
    DEVICE=cuda; BENCH="--layers $LAYERS --prompts 128,1024 --new-tokens 32,128 --repeats 2"; B8="--prompts 128 --new-tokens 32"
    TESTS=(); LIN_TINY=0; LIN_REPEATS=50
fi

# step NAME SECONDS COMMAND...: runs COMMAND under timeout, then appends {"step", "rc", "seconds", "log_tail",
# "result" (the JSON the step wrote to $OUT/NAME.json, if any)} to $RESULTS.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (at most ${limit}s)"
    start=$(date +%s)
    timeout -k 10 "$limit" bash -c '"$@"' step "$@" > "$OUT/logs/$name.log" 2>&1  # bash: runs the functions too
    rc=$?
    "$PY" - "$name" "$rc" "$(( $(date +%s) - start ))" "$OUT" "$RESULTS" <<'PYEOF'
import json, os, sys
name, rc, seconds, out, results = sys.argv[1:]
entry = {"step": name, "rc": int(rc), "timed_out": rc in ("124", "137"), "seconds": int(seconds)}
with open(os.path.join(out, "logs", name + ".log"), errors="replace") as f:
    entry["log_tail"] = f.read()[-3000:]
try:
    with open(os.path.join(out, name + ".json")) as f:
        entry["result"] = json.load(f)
except (OSError, ValueError):
    pass
with open(results, "a") as f:
    f.write(json.dumps(entry) + "\n")
print(f"   rc {rc}, {seconds} s")
PYEOF
}

facts() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_cap --format=csv || true
    command -v nvcc && nvcc --version | tail -2
    "$PY" - "$OUT/facts.json" <<'PYEOF'
import json, platform, sys
import torch
facts = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    facts["gpus"] = [{"name": torch.cuda.get_device_name(i), "capability": torch.cuda.get_device_capability(i),
                      "memory_GiB": torch.cuda.get_device_properties(i).total_memory / 2**30}
                     for i in range(torch.cuda.device_count())]
json.dump(facts, open(sys.argv[1], "w"))
print(facts)
PYEOF
}

install_cpm() {
    if [ -z "$WHEELS" ]; then echo "no wheel folder given (--wheels DIR / WHEELS): cpm_kernels not installed"; return 0; fi
    "$PY" -m pip install --no-index --find-links "$WHEELS" --target "$OUT/pylib" cpm_kernels "setuptools<81"
}

backends() {
    "$PY" - "$DEVICE" "$OUT/backends.json" <<'PYEOF'
import json, sys, types, importlib
import torch
device, path = sys.argv[1:]
pkg = types.ModuleType("rc"); pkg.__path__ = ["."]; sys.modules["rc"] = pkg
Q = importlib.import_module("rc.quantization")
GK = importlib.import_module("rc.cuda_kernels")
found = {"auto": Q.quantization_backend()}
gpus = range(torch.cuda.device_count()) if device == "cuda" else [0]
for name in Q.CUDA_BACKENDS:
    found[name] = {f"cuda:{i}": GK.why_not(name, f"cuda:{i}") if GK.launcher(name, f"cuda:{i}") is None else "runs"
                   for i in gpus}
for bits in (8, 4):
    for dtype in (torch.float16, torch.bfloat16):
        layer = Q.QuantizedLinear.from_linear(torch.nn.Linear(4096, 4608, dtype=dtype), bits).to(device)
        found[f"int{bits} {dtype}"] = layer.backend_for()
json.dump(found, open(path, "w"), indent=1)
print(json.dumps(found, indent=1))
PYEOF
}

linears() {
    "$PY" - "$DEVICE" "$LIN_TINY" "$LIN_REPEATS" "$OUT/linears.json" <<'PYEOF'
import json, sys, time, types, importlib
import torch
device, tiny, repeats, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pkg = types.ModuleType("rc"); pkg.__path__ = ["."]; sys.modules["rc"] = pkg
Q = importlib.import_module("rc.quantization")
shapes = {"query_key_value": (4608, 4096), "dense": (4096, 4096), "dense_h_to_4h": (27392, 4096),
          "dense_4h_to_h": (4096, 13696)}
if tiny:
    shapes = {name: (n // 64, k // 64) for name, (n, k) in shapes.items()}
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

def ms(fn):
    for _ in range(3):
        fn()
    sync(); t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(); return (time.perf_counter() - t) / repeats * 1e3

rows = []
for dtype in (torch.float16, torch.bfloat16):
    for m in (1, 8):
        for name, (n, k) in shapes.items():
            lin = torch.nn.Linear(k, n, bias=False, dtype=dtype, device=device)
            x = torch.randn(m, k, dtype=dtype, device=device)
            row = {"dtype": str(dtype), "rows": m, "linear": name, "float_ms": ms(lambda: lin(x))}
            for bits in (8, 4):
                layer = Q.QuantizedLinear.from_linear(lin, bits)
                for backend in Q.CUDA_BACKENDS + ("torch-dequant",):
                    Q.set_quantization_backend(backend)
                    with torch.no_grad():
                        t = ms(lambda: layer(x))
                    row[f"int{bits} {backend}_ms"] = t if layer.backend == backend else None
                Q.set_quantization_backend(None)
            rows.append(row)
            print(row, flush=True)
json.dump(rows, open(path, "w"), indent=1)
PYEOF
}

bench() {  # bench NAME extra-args...
    local name=$1 native=
    shift
    # transformers < 4.46 has no GlmForCausalLM: this package only
    "$PY" -c "import transformers, sys; sys.exit(not hasattr(transformers, 'GlmForCausalLM'))" || native=--no-native
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.bench_generate --device "$DEVICE" --dtypes fp16,bf16 --quant 8,4 --work-dir "$WORK_DIR" \
        --out-dir "$OUT" --name "$name" $native $BENCH "$@"
}

export -f facts install_cpm backends linears bench
export PY OUT DEVICE WHEELS BENCH WORK_DIR LIN_TINY LIN_REPEATS
step facts 20 facts
step cpm 30 install_cpm
step backends 45 backends
step tests 90 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py "${TESTS[@]}"
step linears 60 linears
step bench_b1 160 bench bench_b1
# shellcheck disable=SC2086
step bench_b8 75 bench bench_b8 --batch 8 $B8
echo "results: $RESULTS"
