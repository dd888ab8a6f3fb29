#!/usr/bin/env python
"""Where a CPU decode step goes: the time inside this package's C kernels (the GEMVs, and the decode attention where
it runs) against the rest (norms, rotary, SwiGLU, residuals, SDPA, Python), for one forward of one new token after a
128-token prompt; medians of 12 steps. ``--stub`` skips the C calls (their outputs stay uninitialised), which gives
the rest with hot caches: the difference to the real run's rest is what the weight stream's cache eviction costs
the small kernels that follow it.

    python -m benchmarks.bench_generate --make-checkpoint /tmp/glm-4l --layers 4
    python -m benchmarks.decode_split /tmp/glm-4l --bits 4 --threads 1 [--stub]
"""
import argparse
import importlib
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

KERNELS = ("chatglm_cpu_matmul", "chatglm_cpu_linear_bf16", "chatglm_cpu_decode_attention", "chatglm_cpu_dequantize")
STEPS = ("chatglm_cpu_rms_norm", "chatglm_cpu_rotary", "chatglm_cpu_silu_mul")  # the small steps: part of the rest


class TimedLibrary:
    """Stands in for the loaded kernel library: each C entry point timed (or skipped with ``stub``)."""

    def __init__(self, lib, stub):
        self.seconds, self.calls = 0.0, 0
        self.group_rows, self.attention = lib.group_rows, lib.attention
        for name in KERNELS:
            setattr(self, name, self._timed(getattr(lib, name), stub))
        for name in STEPS:
            if hasattr(lib, name):
                setattr(self, name, getattr(lib, name))

    def _timed(self, function, stub):
        def call(*args):
            self.calls += 1
            if not stub:
                start = time.perf_counter()
                function(*args)
                self.seconds += time.perf_counter() - start
        return call


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--bits", type=int, default=16, choices=(16, 8, 4), help="16 = bf16; 8 / 4 = model.quantize(bits)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stub", action="store_true", help="skip the C calls (the rest with hot caches)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=torch.bfloat16).eval()
    if args.bits != 16:
        model = model.quantize(args.bits)
    model.pack_weights()  # what generate() does first
    ck = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".cpu_kernels")
    if ck.load() is None:
        raise SystemExit("this package's CPU kernels do not build here")
    timed = ck._lib = TimedLibrary(ck._lib, args.stub)
    ids = torch.randint(3, model.config.padded_vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    steps, inside = [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(12):
            timed.seconds = timed.calls = 0
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - start)
            inside.append(timed.seconds)
            cache = out.past_key_values
    step, kernels = statistics.median(steps) * 1e3, statistics.median(inside) * 1e3
    print(f"bits={args.bits} threads={args.threads}{' (stub)' if args.stub else ''}: step {step:.1f} ms, in the C "
          f"kernels {kernels:.1f} ms ({timed.calls} calls), rest {step - kernels:.1f} ms")


if __name__ == "__main__":
    main()
