#!/usr/bin/env python
"""Python-level calls per decoded token (cProfile), a load-independent measure of per-token overhead.

A tiny random model with 28 layers (ChatGLM3-6B's depth; the call count does not depend on the widths) is written
with the package code from ``--code-dir`` and loaded through ``from_pretrained(..., trust_remote_code=True)``; greedy
``generate`` runs for 2 and for 34 new tokens under cProfile, and the difference / 32 is printed as JSON.

    python -m benchmarks.calls_per_token --code-dir . --bits 0      # bf16
    python -m benchmarks.calls_per_token --code-dir /tmp/old --bits 4
"""
import argparse
import cProfile
import json
import pstats
import tempfile
from pathlib import Path

import torch

from tests import support  # (the tiny-model writer the tests use)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--code-dir", default=str(support.REPO))
    p.add_argument("--bits", type=int, default=0, help="0 (bf16), 8 or 4 (model.quantize)")
    args = p.parse_args()
    support.REPO = Path(args.code_dir)
    support.CODE_FILES = [f.name for f in Path(args.code_dir).glob("*.py")]
    folder = support.make_model_dir(tempfile.mkdtemp(), num_layers=28, hidden_size=128, ffn_hidden_size=256,
                                    kv_channels=32)
    model = support.load_model(folder).to(torch.bfloat16)
    if args.bits:
        model.quantize(args.bits)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def calls(n):
        model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        prof.disable()
        return pstats.Stats(prof).total_calls

    print(json.dumps({"code_dir": args.code_dir, "bits": args.bits, "calls_per_token": (calls(34) - calls(2)) / 32}))


if __name__ == "__main__":
    main()
