#!/usr/bin/env python
"""Assemble a push_to_hub-ready ChatGLM3 folder from a downloaded THUDM snapshot plus this repo's code.

    python -m scripts.assemble_hub_folder SNAPSHOT_DIR OUT_DIR [--check]

The snapshot is the published layout (``huggingface-cli download THUDM/chatglm3-6b-base --local-dir SNAPSHOT``):
``pytorch_model-0000N-of-00007.bin`` + ``pytorch_model.bin.index.json`` (or a single ``pytorch_model.bin``),
``config.json``, ``tokenizer.model``, the original remote code. The output folder holds:

* ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``: the same tensors (names, dtypes and
  values unchanged, ``transformer.rotary_pos_emb.inv_freq`` included), converted one shard at a time from
  ``torch.load(..., weights_only=True, mmap=True)`` so memory stays at about one shard;
* this repo's remote-code files (configuration/modeling/quantization/tokenization_chatglm.py);
* ``config.json``: this repo's (its ``auto_map`` and key order) with every value the snapshot sets taking precedence
  (e.g. the 32k variant's ``rope_ratio`` and ``seq_length``); differences are printed;
* ``tokenizer_config.json`` and ``generation_config.json`` from this repo (snapshot's as a fallback);
* ``README.md``, ``MODEL_LICENSE``, ``LICENSE``, ``.gitattributes`` from this repo, else from the snapshot;
* ``tokenizer.model`` copied from the snapshot (or ``--tokenizer-model``).

``--check`` re-reads every written tensor and compares it with the source, then loads the folder in a fresh
Python process with ``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME`` (tokenizer too, when present) and runs a
forward pass; the exit status says whether all of that worked.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from scripts.convert_to_glm import CODE_FILES, REPO, dtype_kwargs, load_torch_file, save_shard, write_index

DOC_FILES = ("README.md", "MODEL_LICENSE", "LICENSE", ".gitattributes")
GITATTRIBUTES = "*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n" \
                "*.model filter=lfs diff=lfs merge=lfs -text\n"
REPO_ONLY_CONFIG_KEYS = ("auto_map",)  # always this repo's: they name this repo's classes


def _read_json(path):
    return json.loads(Path(path).read_text(), object_pairs_hook=OrderedDict)


def _write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def log(message):
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------
def snapshot_weight_files(snapshot):
    """The snapshot's .bin shards in order, from the index (or the single-file checkpoint)."""
    snapshot = Path(snapshot)
    index = snapshot / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = _read_json(index)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (snapshot / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{snapshot} lacks shards listed in its index: {missing}")
        return files, weight_map
    if (snapshot / "pytorch_model.bin").is_file():
        return ["pytorch_model.bin"], None
    raise FileNotFoundError(f"{snapshot} has neither pytorch_model.bin.index.json nor pytorch_model.bin")


def safetensors_name(bin_name):
    stem = bin_name[: -len(".bin")] if bin_name.endswith(".bin") else bin_name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def has_bin_weights(snapshot):
    return any((Path(snapshot) / name).is_file() for name in ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def snapshot_safetensors_files(snapshot):
    """The snapshot's safetensors files (a repo that already merged SFconvertbot's conversion), or []."""
    snapshot = Path(snapshot)
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        return [index.name] + sorted(set(_read_json(index)["weight_map"].values()))
    return ["model.safetensors"] if (snapshot / "model.safetensors").is_file() else []


def convert_weights(snapshot, out):
    """Convert the .bin shards to safetensors one at a time; return {tensor: file} and the total byte size.
    A snapshot that already has safetensors (and no .bin index) has them copied as they are."""
    bins = has_bin_weights(snapshot)
    existing = snapshot_safetensors_files(snapshot)
    if existing and not bins:
        for name in existing:
            shutil.copyfile(Path(snapshot) / name, Path(out) / name)
            log(f"copied {name}")
        from scripts.convert_to_glm import CheckpointReader

        reader = CheckpointReader(out)
        return reader.weight_map, sum((Path(out) / f).stat().st_size for f in reader.files)
    files, index_map = snapshot_weight_files(snapshot)
    weight_map, total = OrderedDict(), 0
    for i, name in enumerate(files, 1):
        state = load_torch_file(Path(snapshot) / name)
        if index_map is not None:
            listed = {k for k, f in index_map.items() if f == name}
            if listed != set(state):
                raise ValueError(f"{name}: tensors differ from the index (missing {sorted(listed - set(state))[:5]}, "
                                 f"extra {sorted(set(state) - listed)[:5]})")
        target = safetensors_name(name)
        save_shard(OrderedDict(state), Path(out) / target)
        for key, t in state.items():
            weight_map[key] = target
            total += t.numel() * t.element_size()
        log(f"[{i}/{len(files)}] {name} -> {target} ({len(state)} tensors)")
        del state
    if len(files) > 1:
        write_index(out, weight_map, total)
    return weight_map, total


def verify_weights(snapshot, out):
    """Every tensor of the output equals its source tensor (value and dtype). Returns the number compared."""
    from safetensors import safe_open

    if not has_bin_weights(snapshot):
        return 0  # safetensors copied byte for byte
    files, _ = snapshot_weight_files(snapshot)
    count = 0
    for name in files:
        state = load_torch_file(Path(snapshot) / name)
        with safe_open(str(Path(out) / safetensors_name(name)), framework="pt", device="cpu") as f:
            if set(f.keys()) != set(state):
                raise AssertionError(f"{safetensors_name(name)}: tensor names differ from {name}")
            for key in f.keys():
                t = f.get_tensor(key)
                if t.dtype != state[key].dtype or not torch.equal(t, state[key]):
                    raise AssertionError(f"{key}: differs from the source in {name}")
                count += 1
        del state
    return count


# ---------------------------------------------------------------------------------------------------------------------
# Configs and files
# ---------------------------------------------------------------------------------------------------------------------
def merge_config(repo_cfg, snapshot_cfg):
    """This repo's config with the snapshot's values taking precedence (except ``auto_map``).
    Returns (merged, list of human-readable differences)."""
    merged, notes = OrderedDict(repo_cfg), []
    for key, value in snapshot_cfg.items():
        if key in REPO_ONLY_CONFIG_KEYS:
            if value != repo_cfg.get(key):
                notes.append(f"{key}: kept this repo's value")
            continue
        if key not in repo_cfg:
            notes.append(f"{key}: {value!r} (from the snapshot)")
        elif repo_cfg[key] != value:
            notes.append(f"{key}: {repo_cfg[key]!r} -> {value!r} (snapshot's value kept)")
        merged[key] = value
    return merged, notes


def assemble(snapshot, out, code_dir=REPO, tokenizer_model=None, overwrite=False):
    snapshot, out, code_dir = Path(snapshot), Path(out), Path(code_dir)
    if not (snapshot / "config.json").is_file():
        raise FileNotFoundError(f"{snapshot}/config.json not found: is this a model snapshot?")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. weights
    weight_map, total = convert_weights(snapshot, out)
    log(f"weights: {len(weight_map)} tensors, {total / 2**30:.2f} GiB")

    # 2. remote code from this repo (the snapshot's original code breaks on transformers >= 4.34)
    for name in CODE_FILES:
        if (code_dir / name).is_file():
            shutil.copyfile(code_dir / name, out / name)
        elif (snapshot / name).is_file():
            log(f"warning: {code_dir} has no {name}; copying the snapshot's original")
            shutil.copyfile(snapshot / name, out / name)
        else:
            log(f"warning: no {name} in {code_dir} or the snapshot")

    # 3. config.json: this repo's, with the snapshot's values
    repo_cfg = _read_json(code_dir / "config.json") if (code_dir / "config.json").is_file() else OrderedDict()
    config, notes = merge_config(repo_cfg, _read_json(snapshot / "config.json"))
    _write_json(out / "config.json", config)
    for note in notes:
        log(f"config.json: {note}")

    # 4. tokenizer_config.json / generation_config.json
    snap_tok = snapshot / "tokenizer_config.json"
    if (code_dir / "tokenizer_config.json").is_file():
        tok_cfg = _read_json(code_dir / "tokenizer_config.json")
        if snap_tok.is_file():
            for key, value in _read_json(snap_tok).items():  # keys this repo does not set: the snapshot's
                if key != "auto_map":
                    tok_cfg.setdefault(key, value)
        _write_json(out / "tokenizer_config.json", tok_cfg)
    elif snap_tok.is_file():
        log(f"warning: {code_dir} has no tokenizer_config.json; using the snapshot's")
        shutil.copyfile(snap_tok, out / "tokenizer_config.json")
    for src in (code_dir / "generation_config.json", snapshot / "generation_config.json"):
        if src.is_file():
            shutil.copyfile(src, out / "generation_config.json")
            break
    else:
        _write_json(out / "generation_config.json",
                    {k: config[k] for k in ("eos_token_id", "pad_token_id") if k in config})

    # 5. model card, licences, LFS attributes
    for name in DOC_FILES:
        for src in (code_dir / name, snapshot / name):
            if src.is_file():
                shutil.copyfile(src, out / name)
                break
        else:
            if name == ".gitattributes":
                (out / name).write_text(GITATTRIBUTES)
            elif name != "LICENSE":
                log(f"warning: no {name} in {code_dir} or the snapshot")

    # 6. the SentencePiece vocabulary
    vocab = Path(tokenizer_model) if tokenizer_model else snapshot / "tokenizer.model"
    if vocab.is_file():
        shutil.copyfile(vocab, out / "tokenizer.model")
    else:
        log(f"warning: {vocab} not found; the folder has no tokenizer.model")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Fresh-process load check
# ---------------------------------------------------------------------------------------------------------------------
CHECK_PROMPT = "The capital of France is"


def check_child(folder, dtype_name, logits_out=None, seq_len=8):
    """Runs in the fresh process: load tokenizer (if present) and model offline, forward a prompt, print JSON."""
    import transformers

    report = {"transformers": transformers.__version__, "offline": os.environ.get("HF_HUB_OFFLINE")}
    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    vocab = config.padded_vocab_size
    ids = None
    if (folder / "tokenizer.model").is_file() and (folder / "tokenization_chatglm.py").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        enc = tokenizer(CHECK_PROMPT, return_tensors="pt")
        report["tokenizer"] = type(tokenizer).__name__
        report["prompt_ids"] = enc["input_ids"][0].tolist()
        if int(enc["input_ids"].max()) < vocab:
            ids = enc["input_ids"]
    if ids is None:  # no tokenizer, or a tiny test model whose vocabulary is smaller than the tokenizer's
        ids = torch.randint(3, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    kwargs = dict(trust_remote_code=True, low_cpu_mem_usage=True)
    if dtype_name != "auto":
        kwargs.update(dtype_kwargs(getattr(torch, dtype_name)))
    else:
        kwargs.update(dtype_kwargs("auto"))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    problems = {k: [n for n in v if "inv_freq" not in n] for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    report["loading_problems"] = {k: v for k, v in problems.items() if v}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    report.update(model_class=type(model).__name__, dtype=str(logits.dtype), shape=list(logits.shape),
                  finite=bool(torch.isfinite(logits).all()), input_ids=ids[0].tolist())
    if logits_out:
        torch.save({"input_ids": ids, "logits": logits.float()}, logits_out)
    print("CHECK " + json.dumps(report))
    return 0 if report["finite"] and not report["loading_problems"] else 1


def run_check(folder, dtype_name="auto", logits_out=None, timeout=None):
    """Load ``folder`` in a fresh Python process, offline, with an empty HF cache. Returns (ok, report dict)."""
    with tempfile.TemporaryDirectory(prefix="chatglm-check-home-") as home:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=home,
                   HF_MODULES_CACHE=os.path.join(home, "modules"))
        cmd = [sys.executable, "-m", "scripts.assemble_hub_folder", "--check-only", str(Path(folder).resolve()),
               "--check-dtype", dtype_name]
        if logits_out:
            cmd += ["--check-logits-out", str(Path(logits_out).resolve())]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHECK ")]
    report = json.loads(lines[-1][len("CHECK "):]) if lines else {}
    if proc.returncode != 0 or not lines:
        report["stderr"] = proc.stderr[-4000:]
    return proc.returncode == 0 and bool(lines), report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", help="downloaded THUDM snapshot folder (or, with --check-only, a folder to check)")
    parser.add_argument("out", nargs="?", help="output folder")
    parser.add_argument("--code-dir", default=str(REPO), help="this repo's root (code, configs, README)")
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer.model to copy (default: the snapshot's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    parser.add_argument("--check", action="store_true",
                        help="verify the tensors and load the folder in a fresh offline process")
    parser.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-dtype", default="auto", help="dtype of the --check load (auto = config's)")
    parser.add_argument("--check-logits-out", default=None, help="save the --check prompt and logits here (torch)")
    args = parser.parse_args(argv)

    if args.check_only:
        return check_child(args.snapshot, args.check_dtype, args.check_logits_out)
    if not args.out:
        parser.error("OUT is required")
    out = assemble(args.snapshot, args.out, args.code_dir, args.tokenizer_model, args.overwrite)
    log(f"assembled {out}")
    if args.check:
        if has_bin_weights(args.snapshot):
            log(f"check: {verify_weights(args.snapshot, out)} tensors equal to the snapshot's")
        else:
            log("check: safetensors copied byte for byte from the snapshot")
        ok, report = run_check(out, args.check_dtype, args.check_logits_out)
        log("check: " + json.dumps(report))
        if not ok:
            log("check FAILED")
            return 1
        log("check passed: the folder loads offline in a fresh process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
