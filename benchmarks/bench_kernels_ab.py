"""A/B of the cpu-avx512 decode kernels (BITS 8 / 4) or the bf16 GEMV (BITS 16) of several code folders (e.g. a
git worktree of an older commit and .), per ChatGLM3-6B linear shape, in one process: alternating rounds, each
layer's weight rotated over copies larger than 4x the last-level cache (L3_MB, default 32; the Xeon with AMX
reports 480), medians; also torch.sum's read bandwidth (over twice that cache, at least 512 MiB) measured between
the rounds.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_kernels_ab BITS M ROUNDS REPS DIR [DIR...]
    e.g. git worktree add /tmp/before <rev>; OMP_NUM_THREADS=2 python -m benchmarks.bench_kernels_ab 4 1 9 2 /tmp/before .
"""
import importlib, os, sys, time, types, statistics
import torch

bits, M, rounds, reps = (int(a) for a in sys.argv[1:5])
dirs = [os.path.abspath(d) for d in sys.argv[5:]]
SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]
L3 = int(os.environ.get("L3_MB", "32")) << 20
mods = []
for i, d in enumerate(dirs):
    pkg = types.ModuleType(f"rc{i}"); pkg.__path__ = [d]; sys.modules[f"rc{i}"] = pkg
    q = importlib.import_module(f"rc{i}.quantization" if bits != 16 else f"rc{i}.cpu_kernels")
    if bits == 16:
        assert q.load() is not None, "the CPU kernels do not build here"
    else:
        q.set_quantization_backend("cpu-avx512")
    mods.append(q)


def bf16_layer(ck, weight):
    """The bf16 GEMV of cpu_kernels ``ck`` on ``weight`` (what a bf16 Linear runs at decode)."""
    return lambda x: ck.linear_bf16(x, weight, None)


torch.manual_seed(0)
layers = {}
for n, k in SHAPES:
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16); lin.weight.data = w
    nbytes = n * k * bits // 8
    copies = max(2, -(-4 * L3 // nbytes))
    for i, q in enumerate(mods):
        ls = []
        for c in range(copies):
            if bits == 16:
                ls.append(bf16_layer(q, w.clone()))
            else:
                ls.append(q.QuantizedLinear.from_linear(lin, bits).pack(torch.bfloat16))
        assert bits == 16 or ls[0].backend == "cpu-avx512", ls[0].backend
        layers[(n, k, i)] = ls
x = torch.randn(M, 4096, dtype=torch.bfloat16)
xs = {k: torch.randn(M, k, dtype=torch.bfloat16) for _, k in SHAPES}
# correctness: all dirs agree closely
for n, k in SHAPES:
    outs = [layers[(n, k, i)][0](xs[k]).float() for i in range(len(mods))]
    for o in outs[1:]:
        err = (o - outs[0]).abs().max().item() / outs[0].abs().max().item()
        assert err < 2e-2, err
times = {key: [] for key in layers}
big = torch.ones(max(1 << 27, L3 // 2))  # fp32: at least 512 MiB and twice the cache
bw = []
with torch.inference_mode():
    for r in range(rounds):
        order = list(range(len(mods))) if r % 2 == 0 else list(reversed(range(len(mods))))
        t = time.perf_counter(); big.sum(); bw.append(big.numel() * 4 / (time.perf_counter() - t) / 1e9)
        for n, k in SHAPES:
            for i in order:
                ls = layers[(n, k, i)]
                for l in ls: l(xs[k])
                t = time.perf_counter()
                for j in range(reps):
                    for l in ls: l(xs[k])
                times[(n, k, i)].append((time.perf_counter() - t) / (reps * len(ls)))
print(f"bits={bits} M={M} threads={os.environ.get('OMP_NUM_THREADS')} torch_threads={torch.get_num_threads()}")
tot = [0.0] * len(mods)
for n, k in SHAPES:
    nbytes = n * k * bits // 8 + n * 2
    row = f"{n}x{k}:"
    for i in range(len(mods)):
        med = statistics.median(times[(n, k, i)])
        tot[i] += med
        row += f"  [{i}] {med*1e3:7.3f} ms {nbytes/med/1e9:5.1f} GB/s"
    print(row)
print(f"torch.sum read bandwidth during the rounds: median {statistics.median(bw):.1f} GB/s")
print("block total ms:", "  ".join(f"[{i}] {t*1e3:.3f}" for i, t in enumerate(tot)))
