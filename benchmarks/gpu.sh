#!/usr/bin/env bash
# Generation benchmark on a CUDA GPU: this package in fp16, bf16, int8 and int4 (model.quantize) against
# transformers' GlmForCausalLM in fp16 and bf16, same random ChatGLM3-6B-width weights, checked for equal logits
# first. Results (JSON + PNG) go to benchmarks/results/cuda_<layers>l.*; the table is printed.
#
#   benchmarks/gpu.sh                      # full model (28 layers, ~12.5 GB per dtype; needs ~40 GB of GPU memory)
#   LAYERS=4 benchmarks/gpu.sh --quick     # smoke test; extra arguments go to bench_generate.py
#   PYTHON=/path/to/venv/bin/python CUDA_VISIBLE_DEVICES=1 benchmarks/gpu.sh
#
# The random checkpoint is written once to $WORK_DIR (default /tmp/chatglm_bench; 12.5 GB for 28 layers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LAYERS=${LAYERS:-28}
WORK_DIR=${WORK_DIR:-/tmp/chatglm_bench}

"$PY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch.cuda.is_available() is False (CPU-only torch or no GPU visible)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true

exec "$PY" benchmarks/bench_generate.py --device cuda --layers "$LAYERS" --dtypes fp16,bf16 --quant 8,4 \
    --prompts 128,2048 --new-tokens 32,256 --repeats 3 --work-dir "$WORK_DIR" --name "cuda_${LAYERS}l" "$@"
