"""CPU benchmark of weight-only int8 / int4 against bf16 at ChatGLM3-6B widths.

1. Per-linear microbenchmark for the four block linears of ChatGLM3-6B and its output layer, at M = 1 (one decode
   token) and M = 128 (a prefill): bf16 ``F.linear``, bf16 with the weight prepacked for oneDNN, bf16 through this
   package's GEMV (``cpu_kernels.linear_bf16``, M <= 4: what linear.py's ``Linear`` binds where the C
   kernels build), and ``QuantizedLinear`` int8 / int4 with each CPU backend (``cpu-avx512``: this package's C
   kernels; ``cpu-int8pack`` / ``cpu-int4pack``: torch's). Each variant rotates over copies of its weight larger
   than twice the last-level cache, so every call reads the weight from memory as in a model.
2. Whole-model batch-1 greedy decode of a random ChatGLM3-6B-width model with ``--layers`` layers (default 4),
   bf16 vs ``quantize(8)`` vs ``quantize(4)``; the (unquantized) 65024 x 4096 output layer is included.

3. What quantizing ``output_layer`` (``quantize(bits, quantize_output_layer=True)``) does to the logits, on a
   Gaussian 65024 x 4096 weight (std 0.02) and unit-RMS hidden states: relative RMS logit error and top-1 / top-5
   agreement with the bf16 head. A proxy only: real checkpoints have outlier rows and columns, so measure the
   perplexity of your own task before relying on it.

Usage:  python -m benchmarks.bench_quant [--threads 2] [--layers 4] [--tokens 32] [--skip-model] [--skip-micro]
Writes a JSON summary to benchmarks/results/bench_quant.json (next to this file) as well as printing a table.
"""
import argparse
import copy
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (out_features, in_features) at ChatGLM3-6B widths
    "query_key_value": (4608, 4096),
    "dense": (4096, 4096),
    "dense_h_to_4h": (27392, 4096),
    "dense_4h_to_h": (4096, 13696),
    "output_layer": (65024, 4096),  # not part of "one block"; bf16 unless quantize_output_layer=True
}


def load_quantization():
    """quantization.py imported as a member of a package (for its relative imports of the kernel modules)."""
    package = types.ModuleType("chatglm_bench_code")
    package.__path__ = [str(REPO)]
    sys.modules[package.__name__] = package
    return importlib.import_module("chatglm_bench_code.quantization")


def timeit(fn, repeat, warmup=3):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(3):  # best of 3 rounds of `repeat` calls
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def last_level_cache_bytes(default=64 << 20):
    """Size of the largest CPU cache (sysfs), so that timed weights can be made to come from memory."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=default)


def rotating(make, nbytes):
    """Enough copies of a layer (``make()`` builds one) that calling them in turn reads at least twice the
    last-level cache, and a function calling the next one: per-call times then include the memory reads a model
    pays (one copy of a 19 MB weight stays in a 260 MB L3 and times the cache, not memory)."""
    copies = [make() for _ in range(max(1, -(-2 * last_level_cache_bytes() // nbytes)))]
    state = {"i": 0}

    def call(x):
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]](x)

    return call, len(copies)


def microbench(Q, CK, repeat, rows_list=(1, 128)):
    """[{linear, rows, variant: ms}] with variants bf16 (torch's F.linear), bf16-onednn (weight prepacked for
    oneDNN), bf16-gemv (this package's bf16 decode kernel, <= 4 rows), int8/<backend>, int4/<backend>. Every
    variant runs on its own copies of the weight, rotated so that each call reads it from memory."""
    results = []
    gen = torch.Generator().manual_seed(0)
    prepack = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    gemv = CK.load() is not None
    for name, (n, k) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        variants = {"bf16": (lambda: copy.deepcopy(lin), n * k * 2)}
        if prepack:
            def onednn():
                w = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach().clone(), 1)
                return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            variants["bf16-onednn"] = (onednn, n * k * 2)
        if gemv:
            def ours():
                w = lin.weight.detach().clone()
                return lambda x: CK.linear_bf16(x, w, None) if CK.linear_bf16_takes(x, w, None) else None
            variants["bf16-gemv"] = (ours, n * k * 2)
        for bits in (8, 4):
            for backend in ("cpu-avx512", "cpu-int8pack" if bits == 8 else "cpu-int4pack"):
                def quantized(bits=bits, backend=backend):
                    Q.set_quantization_backend(backend)
                    layer = Q.QuantizedLinear.from_linear(lin, bits).pack()
                    Q.set_quantization_backend(None)
                    return layer if layer.backend == backend else None
                variants[f"int{bits}/{backend}"] = (quantized, n * k * bits // 8)
        rows = {m: dict(linear=name, out=n, inp=k, rows=m) for m in rows_list}
        for variant, (make, nbytes) in variants.items():
            if variant.startswith("int") and make() is None:
                continue  # not available on this machine
            call, copies = rotating(make, nbytes)
            for m in rows_list:
                x = torch.randn(m, k, dtype=torch.bfloat16, generator=gen)
                with torch.no_grad():
                    if call(x) is None:
                        continue
                    rows[m][variant] = timeit(lambda: call(x), max(copies, repeat // m)) * 1e3
            call = None  # frees this variant's copies before the next one is built
        results.extend(rows.values())
    return results


def head_error(Q, rows=256, seed=0):
    """Logit error of an int8 / int4 output layer against the bf16 one (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(65024, 4096, generator=gen) * 0.02).bfloat16()
    hidden = torch.randn(rows, 4096, generator=gen).bfloat16()
    ref = hidden.float() @ weight.float().t()
    out = {}
    for bits in (8, 4):
        stored, scale = Q.quantize_weight(weight, bits)
        deq = Q.dequantize_weight(stored, scale, bits).float()
        got = hidden.float() @ deq.t()
        top5_ref, top5_got = ref.topk(5, dim=-1).indices, got.topk(5, dim=-1).indices
        out[f"int{bits}"] = dict(
            rel_rms_logit_error=float((got - ref).norm() / ref.norm()),
            top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            top5_overlap=float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top5_ref, top5_got))
                               / (5 * rows)),
            rel_rms_weight_error=float((deq - weight.float()).norm() / weight.float().norm()))
        del deq, got
    return out


def build_model(layers):
    """A random bf16 ChatGLM3-6B-width model with `layers` blocks, built from this repository's code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="chatglm_bench_"))
    load_quantization()  # (registers the package)
    for f in importlib.import_module("chatglm_bench_code.loading").REMOTE_CODE_FILES:  # the one list of code files
        shutil.copyfile(REPO / f, folder / f)
    cfg = json.loads((REPO / "config.json").read_text())
    cfg.update(num_layers=layers, torch_dtype="bfloat16", seq_length=4096)
    (folder / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point():
                p.copy_(torch.ones_like(p) if "layernorm" in name else torch.randn_like(p) * 0.02)
    shutil.rmtree(folder, ignore_errors=True)
    return model.eval()


def decode_ms_per_token(model, tokens, prompt_len=16):
    ids = torch.randint(3, 60000, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    run(2)  # warm-up
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        out = run(tokens + 1)
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / tokens)
    return best * 1e3, out


def linear_bytes(model, Q):
    total = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear,)) or type(m).__name__ == "QuantizedLinear":
            if getattr(m, "out_features", 0) == 65024:
                continue  # output layer: never quantized
            total += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_quant.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Q = load_quantization()
    CK = importlib.import_module("chatglm_bench_code.cpu_kernels")
    info = dict(torch=torch.__version__, threads=args.threads, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                command="python -m benchmarks.bench_quant " + " ".join(sys.argv[1:]))
    print(f"torch {info['torch']}, {args.threads} threads, CPU capability {info['cpu_capability']}")

    result = dict(info=info)
    head = head_error(Q)
    print("\nQuantized output_layer vs bf16 (Gaussian weight, 256 unit-RMS hidden states):")
    for name, r in head.items():
        print(f"  {name}: weight error {r['rel_rms_weight_error']:.4f}, logit error {r['rel_rms_logit_error']:.4f} "
              f"(relative RMS), top-1 agreement {r['top1_agreement']:.3f}, top-5 overlap {r['top5_overlap']:.3f}")
    result["output_layer_error"] = head
    rows = microbench(Q, CK, args.repeat) if not args.skip_micro else []
    variants = [v for v in ("bf16", "bf16-onednn", "bf16-gemv", "int8/cpu-avx512", "int8/cpu-int8pack", "int4/cpu-avx512",
                            "int4/cpu-int4pack") if any(v in r for r in rows)]
    if rows:
        print(f"\nPer linear, bf16 activations, weights read from memory (rotated copies > 2x the "
              f"{last_level_cache_bytes() >> 20} MiB last-level cache); best-of-3 mean ms (GB/s of weight bytes)")
        print(f"{'linear':<16}{'M':>4}" + "".join(f"{v:>20}" for v in variants))
    for m in sorted({r["rows"] for r in rows}):
        sub = [r for r in rows if r["rows"] == m and r["linear"] != "output_layer"]
        for r in [r for r in rows if r["rows"] == m] + [dict(linear="one block", rows=m, **{v: sum(x.get(v, float("nan")) for x in sub)
                                                             for v in variants})]:
            cells = []
            for v in variants:
                ms = r.get(v, float("nan"))
                nbytes = sum(x["out"] * x["inp"] for x in sub) if r["linear"] == "one block" else r["out"] * r["inp"]
                nbytes *= 2 if v.startswith("bf16") else (1 if v.startswith("int8") else 0.5)
                cells.append(f"{ms:9.3f} ({nbytes / ms / 1e6:5.1f} GB/s)")
            print(f"{r['linear']:<16}{m:>4}" + "".join(f"{c:>20}" for c in cells))
    result["microbench"] = rows

    if not args.skip_model:
        model = build_model(args.layers)
        qmod = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".quantization"]
        results = {}
        outputs = {}
        for bits in (0, 8, 4):
            m = model if bits == 0 else copy.deepcopy(model).quantize(bits).pack_weights()
            ms, out = decode_ms_per_token(m, args.tokens)
            results[bits] = dict(ms_per_token=ms, block_linear_bytes=linear_bytes(m, Q),
                                 backend=qmod.quantization_backend(m) if bits else "bf16 (pack_weights: GEMV binding or oneDNN)",
                                 footprint_bytes=m.get_memory_footprint())
            outputs[bits] = out
            if bits:
                del m
        print(f"\nWhole model, {args.layers} layers at ChatGLM3-6B widths, bf16, batch 1 greedy decode "
              f"({args.tokens} tokens after a 16-token prompt)")
        print(f"{'weights':<8}{'backend':<16}{'ms/token':>10}{'speedup':>9}{'block linears MiB':>19}"
              f"{'footprint MiB':>15}")
        for bits, r in results.items():
            r["speedup"] = results[0]["ms_per_token"] / r["ms_per_token"]
            r["tokens_equal_to_bf16"] = float((outputs[bits] == outputs[0]).float().mean())
            print(f"{'bf16' if bits == 0 else 'int%d' % bits:<8}{r['backend']:<16}{r['ms_per_token']:10.1f}"
                  f"{r['speedup']:9.2f}{r['block_linear_bytes'] / 2**20:19.1f}{r['footprint_bytes'] / 2**20:15.1f}")
        result["model"] = {str(k): v for k, v in results.items()}
        result["model_config"] = dict(layers=args.layers, tokens=args.tokens, prompt=16)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
