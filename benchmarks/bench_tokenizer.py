"""Slow vs fast ChatGLM tokenizer throughput on batches.

    python -m benchmarks.bench_tokenizer [--model PATH/tokenizer.model] [--repeats 7]

Loads both tokenizers through AutoTokenizer(trust_remote_code=True) from a temporary hub-style folder, encodes
batches of deterministic mixed text (Chinese, English, code, emoji, whitespace) with padding=True, and reports the
best of --repeats runs as texts/s and tokens/s (real tokens, pads excluded), plus the ratio of process CPU
time (all threads), which is less sensitive to other load on the host. Also checks that both give the same
ids. Prints a table and writes benchmarks/results/tokenizer.json.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tests.support import load_tokenizer, make_tokenizer_dir, mixed_corpus, real_model_path

ROOT = Path(__file__).resolve().parent.parent


def bench(tok, texts, repeats):
    """Best wall time and best process CPU time (all threads) of `repeats` calls."""
    tok(texts[:4], padding=True)  # warm-up
    best, best_cpu = float("inf"), float("inf")
    out = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = tok(texts, padding=True)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    n_tokens = sum(sum(m) for m in out["attention_mask"])
    return best, best_cpu, n_tokens, out["input_ids"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="tokenizer.model (default: $CHATGLM_TOKENIZER_MODEL or "
                                                  "../shared/reference/tokenizer.model)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tokenizer.json"))
    args = ap.parse_args()
    model = Path(args.model) if args.model else real_model_path()
    if model is None or not model.is_file():
        sys.exit("tokenizer.model not found: pass --model or set CHATGLM_TOKENIZER_MODEL")

    import tokenizers
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tokenizer_dir(Path(tmp), model, "bench")
        t0 = time.perf_counter()
        slow = load_tokenizer(folder, fast=False)
        load_slow = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = load_tokenizer(folder, fast=True)
        load_fast = time.perf_counter() - t0

        rows = []
        for batch, max_len in [(32, 100), (256, 100), (256, 1000), (1024, 300)]:
            texts = mixed_corpus(batch, seed=batch + max_len, max_len=max_len)[:batch]
            t_slow, c_slow, n_tok, ids_slow = bench(slow, texts, args.repeats)
            t_fast, c_fast, n_tok_f, ids_fast = bench(fast, texts, args.repeats)
            assert ids_slow == ids_fast and n_tok == n_tok_f, "slow and fast disagree"
            rows.append({
                "batch": batch, "max_chars": max_len, "tokens": n_tok,
                "slow_texts_per_s": batch / t_slow, "fast_texts_per_s": batch / t_fast,
                "slow_tokens_per_s": n_tok / t_slow, "fast_tokens_per_s": n_tok / t_fast,
                "speedup": t_slow / t_fast,
                "slow_cpu_s": c_slow, "fast_cpu_s": c_fast, "cpu_speedup": c_slow / c_fast,
            })

    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"load: slow {load_slow:.2f}s, fast {load_fast:.2f}s (includes building the BPE from tokenizer.model)")
    hdr = f"{'batch':>6} {'chars<=':>7} {'tokens':>8} | {'slow texts/s':>12} {'fast texts/s':>12} | " \
          f"{'slow tok/s':>11} {'fast tok/s':>11} | {'speedup':>7} {'CPU-time':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['batch']:>6} {r['max_chars']:>7} {r['tokens']:>8} | {r['slow_texts_per_s']:>12,.0f} "
              f"{r['fast_texts_per_s']:>12,.0f} | {r['slow_tokens_per_s']:>11,.0f} {r['fast_tokens_per_s']:>11,.0f} | "
              f"{r['speedup']:>6.1f}x {r['cpu_speedup']:>7.1f}x")
    print("speedup = slow/fast wall time; CPU-time = slow/fast process CPU time (all threads), robust on busy hosts")
    result = {
        "command": "python -m benchmarks.bench_tokenizer " + " ".join(sys.argv[1:]),
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(), "repeats": args.repeats,
        "load_seconds": {"slow": load_slow, "fast": load_fast}, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
