#!/usr/bin/env python
"""Read bandwidth of the CPU decode kernels (one input row, weights from memory) next to ``torch.sum``'s, for tuning
the software prefetch distances per CPU family (``cpu_kernels.CPU_TUNING``; ``CHATGLM_CPU_PREFETCH``).

Prints one line of GB/s: ``sum`` (torch.sum of 256 MB fp32), ``int8`` / ``int4`` (QuantizedLinear packed for
``cpu-avx512``, 27392 x 4096) and ``bf16`` (``cpu_kernels.linear_bf16``, the same shape); medians of 9 calls that
rotate over weight copies. Compare settings by alternating runs, e.g.::

    for i in 1 2 3; do for pf in 8192,8192,4096 0,8192,8192; do
        CHATGLM_CPU_PREFETCH=$pf python -m benchmarks.bench_prefetch --threads 1; done; done
"""
import argparse
import sys
import time

import torch

from tests.support import load_module  # (the remote-code files imported as a package)


def median_s(fn, calls):
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Q, CK = load_module("quantization"), load_module("cpu_kernels")
    if CK.load() is None:
        sys.exit("this package's CPU kernels do not build here")
    n, k = 27392, 4096
    ones = torch.ones(64 * 2 ** 20)
    result = {"sum": ones.numel() * 4 / median_s(lambda i: ones.sum(), 5)}
    x = torch.randn(1, k).bfloat16()
    with torch.no_grad():
        for bits, copies in ((8, 3), (4, 5)):  # > 2x a 260 MB last-level cache at int4 too
            layers = [Q.QuantizedLinear.from_linear(torch.nn.Linear(k, n, bias=False).bfloat16(), bits).pack()
                      for _ in range(copies)]
            result[f"int{bits}"] = n * k * bits / 8 / median_s(lambda i: layers[i % copies](x), 9)
            del layers
        weights = [torch.randn(n, k).bfloat16() for _ in range(3)]
        result["bf16"] = n * k * 2 / median_s(lambda i: CK.linear_bf16(x, weights[i % 3], None), 9)
    print(f"tuning={CK.cpu_tuning(CK.cpu_signature())} threads={args.threads} "
          + " ".join(f"{name}={v / 1e9:.1f}" for name, v in result.items()))


if __name__ == "__main__":
    main()
