#!/usr/bin/env python
"""Where a CPU decode step goes: the time inside this package's C kernels (the GEMVs, and the decode attention where
it runs) against the rest (norms, rotary, SwiGLU, residuals, SDPA, Python), for one forward of one new token after a
128-token prompt; medians of 12 steps. ``--stub`` skips the C calls (their outputs stay uninitialised), which gives
the rest with hot caches: the difference to the real run's rest is what the weight stream's cache eviction costs
the small kernels that follow it. ``--gaps`` also shows where the rest goes: the time from the end of one C call to
the start of the next, per kind of transition (e.g. ``linear_bf16 -> rotary``: the Python and torch ops between the
QKV GEMV and the rotary kernel), medians over the layers and steps.

    python -m benchmarks.bench_generate --make-checkpoint /tmp/glm-4l --layers 4
    python -m benchmarks.decode_split /tmp/glm-4l --bits 4 --threads 1 [--stub] [--gaps]
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
        self.events = []  # (entry point, start, end) of every C call of the current step
        self.group_rows, self.attention = lib.group_rows, lib.attention
        for name in KERNELS:
            setattr(self, name, self._timed(name, getattr(lib, name), stub, True))
        for name in STEPS:
            if hasattr(lib, name):
                setattr(self, name, self._timed(name, getattr(lib, name), False, False))

    def _timed(self, name, function, stub, counted):
        short = name[len("chatglm_cpu_"):]

        def call(*args):
            start = time.perf_counter()
            if not stub:
                function(*args)
            end = time.perf_counter()
            self.events.append((short, start, end))
            if counted:  # a weight kernel (the small steps count as the rest)
                self.calls += 1
                self.seconds += end - start
        return call

    def gaps(self):
        """{"previous -> next": [seconds from the end of one call to the start of the next, ...]} of this step."""
        out = {}
        for (a, _, end), (b, start, _) in zip(self.events, self.events[1:]):
            out.setdefault(f"{a} -> {b}", []).append(start - end)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--bits", type=int, default=16, choices=(16, 8, 4), help="16 = bf16; 8 / 4 = model.quantize(bits)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stub", action="store_true", help="skip the C calls (the rest with hot caches)")
    p.add_argument("--gaps", action="store_true", help="also the time between consecutive C calls, by transition")
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
    steps, inside, gaps = [], [], {}
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(12):
            timed.seconds, timed.calls, timed.events = 0, 0, []
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - start)
            inside.append(timed.seconds)
            for key, values in timed.gaps().items():
                gaps.setdefault(key, []).extend(values)
            cache = out.past_key_values
    step, kernels = statistics.median(steps) * 1e3, statistics.median(inside) * 1e3
    print(f"bits={args.bits} threads={args.threads}{' (stub)' if args.stub else ''}: step {step:.1f} ms, in the C "
          f"kernels {kernels:.1f} ms ({timed.calls} calls), rest {step - kernels:.1f} ms")
    if args.gaps:  # in the order of the step: one line per transition, its count per step
        order = list(timed.gaps())
        for key in sorted(gaps, key=lambda k: order.index(k) if k in order else len(order)):
            print(f"  {key}: {statistics.median(gaps[key]) * 1e6:.0f} us (x{len(gaps[key]) // len(steps)} per step)")


if __name__ == "__main__":
    main()
