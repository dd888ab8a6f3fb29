#!/usr/bin/env python
"""Text completion with ChatGLM3-6B-Base through transformers, using this repository's model code.

    python generate.py "今天天气真不错"                      # published weights from the hub (or its cache)
    python generate.py --model /path/to/folder "Once upon"   # a local folder (THUDM snapshot or ours)
    python generate.py --quantize 4 --max-new-tokens 64 "..."
    python generate.py --tiny "hello"                        # random tiny model: smoke-tests the whole path

The published hub repo carries its own (old) code; this script always runs the code in this folder: it
builds a small overlay folder (links to the downloaded weights + this repo's code and configs) and loads that
with ``trust_remote_code=True``.
"""
import argparse
import ast
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def remote_code_files(code_dir=HERE):
    """The remote-code files of ``code_dir``: its loading.py's REMOTE_CODE_FILES (the one list), read without
    importing it (tests, benchmarks and scripts use this too); this repo's list for a code folder without one."""
    loading = Path(code_dir) / "loading.py"
    tree = ast.parse((loading if loading.is_file() else HERE / "loading.py").read_text(encoding="utf-8"))
    return list(next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     and [getattr(t, "id", "") for t in node.targets] == ["REMOTE_CODE_FILES"]))


CODE_FILES = remote_code_files()
DEFAULT_MODEL = "THUDM/chatglm3-6b-base"
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model"]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CPU, fp16 on CUDA")
    p.add_argument("--quantize", type=int, choices=[4, 8], help="weight-only int4/int8 quantization")
    p.add_argument("--quantize-output-layer", action="store_true",
                   help="with --quantize: quantize output_layer too (faster decoding; see README for the cost)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="use a random tiny model (no download): a smoke test")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def overlay_folder(weights_dir: Path) -> Path:
    """A folder with links to ``weights_dir``'s files, plus this repo's code, tokenizer config and config
    (the snapshot's config values win, our ``auto_map`` is added)."""
    out = Path(tempfile.mkdtemp(prefix="chatglm3-overlay-"))
    for f in weights_dir.iterdir():
        if f.is_file() and f.name not in CODE_FILES + ["tokenizer_config.json"]:
            os.symlink(f.resolve(), out / f.name)
    for name in CODE_FILES + ["tokenizer_config.json", "generation_config.json"]:
        if (HERE / name).exists():
            shutil.copyfile(HERE / name, out / name)
    config = json.loads((HERE / "config.json").read_text())
    if (weights_dir / "config.json").exists():
        theirs = json.loads((weights_dir / "config.json").read_text())
        theirs.pop("auto_map", None)
        config.update(theirs)
    (out / "config.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def resolve_model(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        if all((path / f).exists() for f in CODE_FILES[:3]):
            return path  # already carries our code
        return overlay_folder(path)
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(name, allow_patterns=WEIGHT_PATTERNS)
    except Exception as exc:  # offline, no network, unknown repo, gated, ...
        fail(f"could not get the weights of {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}).\n"
             f"  Download them once with network access (huggingface-cli download {name}), or pass a local "
             f"folder with --model, or try --tiny for a smoke test without weights.")
    return overlay_folder(Path(snapshot))


def tiny_folder() -> Path:
    """A random 2-layer model and a tokenizer.model: the published one (and the real vocabulary size) if it can
    be found locally, else a small one trained here (and a vocabulary of its size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(tempfile.mkdtemp(prefix="chatglm3-tiny-"))
    for name in CODE_FILES + ["tokenizer_config.json", "generation_config.json"]:
        shutil.copyfile(HERE / name, out / name)
    config = json.loads((HERE / "config.json").read_text())
    config.update(num_layers=2, hidden_size=64, ffn_hidden_size=128, kv_channels=16, num_attention_heads=4,
                  seq_length=512, torch_dtype="float32")
    candidates = [os.environ.get("CHATGLM_TOKENIZER_MODEL"), HERE.parent / "shared" / "reference" / "tokenizer.model"]
    found = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if found:
        shutil.copyfile(found, out / "tokenizer.model")
    else:  # a small vocabulary: the model's matches it, so that every token it picks decodes to text
        train_small_tokenizer(out / "tokenizer.model")
        config["padded_vocab_size"] = len(AutoTokenizer.from_pretrained(out, trust_remote_code=True))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out, trust_remote_code=True),
                                             trust_remote_code=True)
    model.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def train_small_tokenizer(path: Path):
    import io

    import sentencepiece as spm

    text = ("The quick brown fox jumps over the lazy dog. 今天天气真不错，我们去公园散步吧。"
            "def main():\n    print('hello world')\n0123456789 ") * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split(". ")), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, remove_extra_whitespaces=False,
        normalization_rule_name="identity")
    path.write_bytes(model.getvalue())


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda requested but CUDA is not available")
    if args.quantize_output_layer and not args.quantize:
        fail("--quantize-output-layer needs --quantize 4 or 8")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16

    folder = tiny_folder() if args.tiny else resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype=dtype)
    if args.quantize:  # on CPU first: the full-precision weights never reach the GPU
        model.quantize(args.quantize, quantize_output_layer=args.quantize_output_layer)
    model = model.to(device).eval()

    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, streamer=streamer,
               pad_token_id=tokenizer.pad_token_id)
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    print(args.prompt, end="", flush=True)
    with torch.inference_mode():
        model.generate(**inputs, **gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
