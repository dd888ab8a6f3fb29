"""The scripts that hand the model to other tools: scripts/convert_to_glm.py (to transformers' GlmForCausalLM and
back), scripts/assemble_hub_folder.py (a hub folder from a published-layout snapshot) and ``generate.py --tiny``.
Tiny random models only; every test runs on CPU offline."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import (CODE_FILES, REPO, SHARED_REFERENCE, TINY_CONFIG, dtype_kwargs, greedy, has_transformers_glm,
                     load_model, logits_of, make_model_dir, published_config_dict, random_ids, read_safetensors_folder)

from scripts import assemble_hub_folder as assemble  # (the repository root is on pytest's pythonpath: pytest.ini)
from scripts import convert_to_glm as convert

needs_glm = pytest.mark.skipif(not has_transformers_glm(), reason="this transformers has no GlmForCausalLM (< 4.46)")


def reshard_safetensors(folder, n):
    """Split ``folder/model.safetensors`` into ``n`` shards + index, the way large checkpoints are stored."""
    from safetensors.torch import save_file

    folder = Path(folder)
    sd = read_safetensors_folder(folder)
    (folder / "model.safetensors").unlink()
    keys = list(sd)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: sd[k].contiguous() for k in keys[i::n]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sd


# =====================================================================================================================
# scripts/convert_to_glm.py and scripts/assemble_hub_folder.py
# =====================================================================================================================
def _glm_rope(cfg):
    rope = cfg.get("rope_parameters") or {}
    return rope.get("rope_theta", cfg.get("rope_theta")), rope.get("partial_rotary_factor",
                                                                     cfg.get("partial_rotary_factor"))


def test_convert_round_trip_gives_identical_state_dict(tmp_path):
    src = make_model_dir(tmp_path / "src", rope_ratio=50)
    original = reshard_safetensors(src, 3)
    assert convert.main([str(src), str(tmp_path / "glm")]) == 0
    glm_dir = tmp_path / "glm"
    cfg = json.loads((glm_dir / "config.json").read_text())
    theta, factor = _glm_rope(cfg)
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GlmForCausalLM"]
    assert (theta, factor) == (500000.0, 0.5)
    expect = dict(head_dim=16, num_key_value_heads=2, num_attention_heads=4, num_hidden_layers=2, hidden_size=64,
                  intermediate_size=96, attention_bias=True, max_position_embeddings=256, rms_norm_eps=1e-5,
                  vocab_size=128, pad_token_id=0, eos_token_id=2, tie_word_embeddings=False)
    assert {k: cfg[k] for k in expect} == expect
    glm_sd = read_safetensors_folder(glm_dir)
    assert len(list(glm_dir.glob("model-*-of-00003.safetensors"))) == 3  # one output shard per input shard
    assert "model.layers.1.self_attn.k_proj.bias" in glm_sd and not any("inv_freq" in k for k in glm_sd)
    torch.testing.assert_close(
        torch.cat([glm_sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]),
        original["transformer.encoder.layers.0.self_attention.query_key_value.weight"], rtol=0, atol=0)

    assert convert.main([str(glm_dir), str(tmp_path / "back"), "--reverse"]) == 0
    back = read_safetensors_folder(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for key in original:
        assert back[key].dtype == original[key].dtype and torch.equal(back[key], original[key]), key
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    assert back_cfg["_name_or_path"] == "THUDM/chatglm3-6b-base"  # what llama.cpp's converter recognises
    for key in ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                "num_attention_heads", "multi_query_group_num", "seq_length", "rope_ratio", "add_qkv_bias",
                "layernorm_epsilon", "auto_map", "eos_token_id", "pad_token_id"):
        assert back_cfg[key] == src_cfg[key], key
    for name in CODE_FILES:  # the reverse folder loads with trust_remote_code
        if (REPO / name).is_file():
            assert (tmp_path / "back" / name).read_bytes() == (REPO / name).read_bytes()


@needs_glm
def test_converted_glm_gives_equal_logits_and_tokens(tmp_path):
    """From a published-layout snapshot (float16 .bin shards, original code files that must not be used) to Glm,
    and back: equal logits and greedy tokens, and the float16 tensors (inv_freq included) come back unchanged."""
    from transformers import GlmForCausalLM

    snap, work, sd = write_fake_snapshot(tmp_path / "snapshot", rope_ratio=50)
    glm_dir, back_dir = tmp_path / "glm", tmp_path / "back"
    assert convert.main([str(snap), str(glm_dir), "--verify"]) == 0  # --verify loads the ChatGLM side with our code
    assert {t.dtype for t in read_safetensors_folder(glm_dir).values()} == {torch.float16}
    assert len(list(glm_dir.glob("model-*-of-00003.safetensors"))) == 3
    for name in ("tokenization_chatglm.py", "tokenizer_config.json"):  # tokenizer code from this repo
        assert (glm_dir / name).read_bytes() == (REPO / name).read_bytes(), name
    assert (glm_dir / "tokenizer.model").is_file() == (snap / "tokenizer.model").exists()

    ours = load_model(work)
    ours.load_state_dict({k: v.float() for k, v in sd.items()})
    glm = GlmForCausalLM.from_pretrained(glm_dir, **dtype_kwargs(torch.float32)).eval()
    ids = random_ids(2, 12)
    torch.testing.assert_close(logits_of(glm, ids), logits_of(ours, ids), atol=1e-4, rtol=0)
    assert torch.equal(greedy(glm, ids), greedy(ours, ids))

    # --verify can fail: the same weights with the rope base of rope_ratio=1 give different logits
    bad = tmp_path / "glm-bad-rope"
    shutil.copytree(glm_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    if cfg.get("rope_parameters"):
        cfg["rope_parameters"]["rope_theta"] = 10000.0
    else:
        cfg["rope_theta"] = 10000.0
    (bad / "config.json").write_text(json.dumps(cfg))
    diff, tol, _ = convert.compare_logits(snap, bad)
    assert diff > 10 * tol

    assert convert.main([str(glm_dir), str(back_dir), "--reverse", "--verify"]) == 0
    back = read_safetensors_folder(back_dir)
    assert sorted(back) == sorted(sd)
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], sd[k]) for k in sd)
    torch.testing.assert_close(logits_of(load_model(back_dir, **dtype_kwargs(torch.float32)), ids),
                               logits_of(ours, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [dict(pre_seq_len=4), dict(quantization_bit=8), dict(rmsnorm=False),
                                       dict(add_bias_linear=True)])
def test_convert_refuses_what_glm_cannot_express(overrides):
    cfg = {**published_config_dict(), **TINY_CONFIG, **overrides}
    with pytest.raises(ValueError, match=next(iter(overrides))):
        convert.check_convertible(cfg)


def write_fake_snapshot(folder, shards=3, **overrides):
    """A folder in the published THUDM layout: float16 ``pytorch_model-0000N-of-0000M.bin`` shards (with
    ``transformer.rotary_pos_emb.inv_freq``), ``pytorch_model.bin.index.json``, config.json, the original code
    (placeholders here: they must not be used), tokenizer files, README and licence."""
    folder = Path(folder)
    work = make_model_dir(folder.parent / (folder.name + "-src"), **overrides)
    sd = {k: v.half() for k, v in read_safetensors_folder(work).items()}
    folder.mkdir(parents=True)
    keys = list(sd)
    assert "transformer.rotary_pos_emb.inv_freq" in keys
    chunk = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k].clone() for k in keys[i * chunk:(i + 1) * chunk]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 2 for t in sd.values())}, "weight_map": weight_map}, indent=2))
    cfg = published_config_dict()
    cfg.update(TINY_CONFIG, torch_dtype="float16", **overrides)
    cfg["auto_map"] = {k: v for k, v in cfg["auto_map"].items() if "SequenceClassification" not in k}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py"):
        (folder / name).write_text("raise ImportError('the original remote code must not be used')\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "name_or_path": "THUDM/chatglm3-6b-base", "remove_space": False, "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    (folder / "README.md").write_text("original model card\n")
    (folder / "MODEL_LICENSE").write_text("original licence\n")
    if (SHARED_REFERENCE / "tokenizer.model").is_file():
        os.symlink(SHARED_REFERENCE / "tokenizer.model", folder / "tokenizer.model")  # as in an HF cache snapshot
    return folder, work, sd


def test_assemble_hub_folder_from_snapshot_loads_offline(tmp_path):
    overrides = dict(rope_ratio=50, seq_length=512)  # a "32k-variant" snapshot: its values must be kept
    snap, work, sd = write_fake_snapshot(tmp_path / "snapshot", **overrides)
    out = tmp_path / "hub"
    logits_file = tmp_path / "check.pt"
    repo_files = {name: (REPO / name).read_bytes() for name in CODE_FILES + ["generation_config.json", "MODEL_LICENSE"]
                  if (REPO / name).is_file()}
    rc = assemble.main([str(snap), str(out), "--check", "--check-dtype", "float32",
                        "--check-logits-out", str(logits_file)])
    assert rc == 0

    names = sorted(p.name for p in out.iterdir())
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [n for n in names if n.endswith(".safetensors")] == shards
    assert not [n for n in names if n.endswith(".bin")]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in sd.values())
    written = read_safetensors_folder(out)
    assert sorted(written) == sorted(index["weight_map"]) == sorted(sd)
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], sd[k]) for k in sd)
    for name, content in repo_files.items():
        assert (out / name).read_bytes() == content, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == published_config_dict()["auto_map"]  # this repo's classes
    assert (cfg["rope_ratio"], cfg["seq_length"], cfg["torch_dtype"]) == (50, 512, "float16")  # snapshot's values
    assert cfg["padded_vocab_size"] == TINY_CONFIG["padded_vocab_size"]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["auto_map"] == json.loads((REPO / "tokenizer_config.json").read_text())["auto_map"]
    if (snap / "tokenizer.model").exists():
        assert not (out / "tokenizer.model").is_symlink()
        assert (out / "tokenizer.model").read_bytes() == (SHARED_REFERENCE / "tokenizer.model").read_bytes()

    # The fresh offline process computed logits on the float16 weights loaded as float32: same as ours.
    check = torch.load(logits_file, weights_only=True)
    reference = load_model(work)
    reference.load_state_dict({k: v.float() for k, v in sd.items()})
    torch.testing.assert_close(check["logits"], logits_of(reference, check["input_ids"]), atol=1e-5, rtol=0)


def test_assemble_copies_a_snapshot_that_already_has_safetensors(tmp_path):
    snap = make_model_dir(tmp_path / "snapshot")
    reshard_safetensors(snap, 2)
    assert assemble.main([str(snap), str(tmp_path / "hub")]) == 0
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (tmp_path / "hub" / name).read_bytes() == (snap / name).read_bytes()
    ids = random_ids()
    torch.testing.assert_close(logits_of(load_model(tmp_path / "hub"), ids), logits_of(load_model(snap), ids),
                               atol=0, rtol=0)


def test_assemble_refuses_non_empty_output_and_missing_shards(tmp_path):
    snap, _, _ = write_fake_snapshot(tmp_path / "snapshot", shards=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        assemble.main([str(snap), str(tmp_path / "out")])
    (snap / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="00002"):
        assemble.main([str(snap), str(tmp_path / "out2")])


# =====================================================================================================================
# benchmarks/ and scripts/ as modules
def test_benchmarks_and_scripts_import_as_modules_from_the_repository_root():
    """They run as ``python -m benchmarks.<name>`` / ``python -m scripts.<name>`` from the repository root and import
    generate.py, each other and tests/support.py as modules (no sys.path inserts): each imports that way in a fresh
    process (``-c`` puts the working directory first on sys.path, as ``-m`` does). bench_kernels_ab.py, a script that
    runs on import, is left out."""
    files = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    names = [f"{p.parent.name}.{p.stem}" for p in files if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8")]
    assert {"benchmarks.bench_generate", "benchmarks.bench_llamacpp", "scripts.convert_to_glm",
            "scripts.assemble_hub_folder"} <= set(names)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported')"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["imported"], proc.stderr[-3000:]


# generate.py --tiny
# =====================================================================================================================
@pytest.mark.parametrize("tokenizer_model", ("published", "trained"))
def test_generate_tiny_runs_offline_and_leaves_a_loadable_folder(tmp_path, tokenizer_model):
    """``python generate.py --tiny PROMPT`` as a user runs it, in a fresh process, offline: it prints the prompt and
    its greedy continuation, and the folder it built (in $TMPDIR) loads again and gives the same text. With the
    published tokenizer.model where it is found, else with a small one it trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CHATGLM_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TMPDIR=str(tmp_path))
    if tokenizer_model == "published":
        if not (SHARED_REFERENCE / "tokenizer.model").is_file():
            pytest.skip("no published tokenizer.model in ../shared/reference")
        env["CHATGLM_TOKENIZER_MODEL"] = str(SHARED_REFERENCE / "tokenizer.model")
    else:  # generate.py also looks next to the repo; run a copy where it finds nothing
        script = tmp_path / "code" / "generate.py"
        script.parent.mkdir()
        for name in ["generate.py", "config.json", "generation_config.json", "tokenizer_config.json", *CODE_FILES]:
            shutil.copyfile(REPO / name, script.parent / name)
    prompt = "Once upon a time"
    script = REPO / "generate.py" if tokenizer_model == "published" else script
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--dtype", "fp32",
                           "--max-new-tokens", "6", prompt], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    folders = list(tmp_path.glob("chatglm3-tiny-*"))
    assert len(folders) == 1 and all((folders[0] / name).is_file() for name in CODE_FILES)
    tokenizer = AutoTokenizer.from_pretrained(folders[0], trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folders[0], trust_remote_code=True).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    printed = io.StringIO()  # what the script's TextStreamer prints (byte-fallback pieces decode per chunk)
    with torch.no_grad(), contextlib.redirect_stdout(printed):
        model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                       streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert printed.getvalue().strip() and proc.stdout == prompt + printed.getvalue()
