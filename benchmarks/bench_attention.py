#!/usr/bin/env python
"""Decode attention on CPU: this package's kernel (``cpu_kernels.decode_attention``) against SDPA on the same
grouped-query problem (ChatGLM3-6B: 32 query heads, 2 key/value heads, head_dim 128, bf16), one new token against
caches of several lengths; alternating calls, medians.

    python -m benchmarks.bench_attention --threads 1 --lengths 128,2048,8192
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

from tests.support import load_module  # (the remote-code files imported as a package)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="128,512,2048,8192")
    p.add_argument("--calls", type=int, default=41)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ck = load_module("cpu_kernels")
    if ck.load() is None:
        sys.exit("this package's CPU kernels do not build here")
    print(f"threads={args.threads}  | cache length | SDPA us | ours us | SDPA / ours |")
    for length in (int(v) for v in args.lengths.split(",")):
        q = torch.randn(1, 32, 1, 128).bfloat16()
        k, v = torch.randn(2, 1, 2, length, 128).bfloat16()
        runs = {"sdpa": lambda: F.scaled_dot_product_attention(q.view(1, 2, 16, 128), k, v),
                "ours": lambda: ck.decode_attention(q, k, v)}
        times = {name: [] for name in runs}
        for i in range(args.calls):
            for name in (runs if i % 2 else reversed(list(runs))):
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        sdpa, ours = (sorted(times[n])[args.calls // 2] * 1e6 for n in ("sdpa", "ours"))
        print(f"| {length} | {sdpa:.1f} | {ours:.1f} | {sdpa / ours:.2f}x |")


if __name__ == "__main__":
    main()
