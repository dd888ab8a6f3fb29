#!/usr/bin/env bash
# GPU checks for quantization.py, for someone with a CUDA GPU (none is needed for the normal test suite).
#   1. the CUDA tests of tests/test_quantization.py (kernels bit-exact vs the torch dequant path, fp16 + bf16,
#      int8 + int4, through both launchers: cpm_kernels and torch's NVRTC wrapper);
#   2. per-linear timings at ChatGLM3-6B widths: fp16/bf16 F.linear vs QuantizedLinear per backend, M = 1 and 256.
# Usage: bash benchmarks/gpu_quant.sh [python]   (optional: pip install cpm_kernels first, to test that launcher)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.__version__)"
"$PY" -c "import cpm_kernels" 2>/dev/null && echo "cpm_kernels: installed" || echo "cpm_kernels: not installed (only the cuda-nvrtc launcher is tested)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_quantization.py -k "cuda" -rs
"$PY" - <<'PYEOF'
import importlib.util, time, torch, torch.nn.functional as F
spec = importlib.util.spec_from_file_location("q", "quantization.py"); Q = importlib.util.module_from_spec(spec)
spec.loader.exec_module(Q)
shapes = {"query_key_value": (4608, 4096), "dense": (4096, 4096), "dense_h_to_4h": (27392, 4096),
          "dense_4h_to_h": (4096, 13696)}

def bench(fn, n=50):
    for _ in range(5): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3

for dtype in (torch.float16, torch.bfloat16):
    for m in (1, 256):
        print(f"\n{dtype}, M={m}: ms per call")
        print(f"{'linear':<16}{'float':>8}" + "".join(f"{b + ' int' + str(bits):>28}" for bits in (8, 4)
              for b in ("cuda-cpm_kernels", "cuda-nvrtc", "torch-dequant")))
        for name, (n, k) in shapes.items():
            lin = torch.nn.Linear(k, n, bias=False, dtype=dtype, device="cuda")
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            row = [bench(lambda: lin(x))]
            for bits in (8, 4):
                ql = Q.QuantizedLinear.from_linear(lin, bits)
                for backend in ("cuda-cpm_kernels", "cuda-nvrtc", "torch-dequant"):
                    Q.set_quantization_backend(backend)
                    with torch.no_grad():
                        t = bench(lambda: ql(x))
                    row.append(t if ql._last_backend == backend else float("nan"))
            Q.set_quantization_backend(None)
            print(f"{name:<16}" + "".join(f"{v:8.3f}" if i == 0 else f"{v:28.3f}" for i, v in enumerate(row)))
print("\n(nan: that backend is not available here)")
PYEOF
