"""The model in the wider ecosystem: conversion to/from transformers' Glm, hub-folder assembly, PEFT (LoRA and
p-tuning v2), Trainer with gradient accumulation, accelerate big-model loading, save_pretrained round trips and
sequence classification. Tiny random models only; every test runs on CPU in a second or two."""
import contextlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import (CODE_FILES, REPO, SHARED_REFERENCE, TINY_CONFIG, has_transformers_glm, load_model,
                      make_model_dir, published_config_dict)

needs_glm = pytest.mark.skipif(not has_transformers_glm(), reason="this transformers has no GlmForCausalLM (< 4.46)")
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="accelerate is not installed")


def _load_script(name):
    """Import scripts/<name>.py as module ``name`` (assemble_hub_folder imports convert_to_glm by that name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


convert = _load_script("convert_to_glm")
assemble = _load_script("assemble_hub_folder")


def dtype_kwargs(dtype):
    """``dtype=`` on transformers >= 4.56 (``torch_dtype`` deprecated there), ``torch_dtype=`` before."""
    from transformers import PretrainedConfig

    return {"dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype": dtype}


def random_ids(batch=2, seq=10, seed=0, low=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, TINY_CONFIG["padded_vocab_size"], (batch, seq), generator=gen)


def logits_of(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


def read_safetensors_folder(folder):
    """All tensors of a (possibly sharded) safetensors folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


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


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)


# =====================================================================================================================
# 1. scripts/convert_to_glm.py and scripts/assemble_hub_folder.py
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
# 2. PEFT: LoRA and p-tuning v2
# =====================================================================================================================
def lm_batch(batch=2, seq=12, seed=1):
    ids = random_ids(batch, seq, seed)
    labels = ids.clone()
    labels[:, :3] = -100  # a "prompt" that is not trained on
    return ids, labels


def train_steps(model, ids, labels, steps=5, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


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


@needs_peft
@pytest.mark.parametrize("targets", [None, ["dense", "dense_h_to_4h", "dense_4h_to_h"]],
                         ids=["default-query_key_value", "dense-mlp"])
def test_lora_trains_with_gradient_checkpointing_and_merges(tiny_dir, targets):
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_dir)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    assert model.is_gradient_checkpointing
    kwargs = {} if targets is None else {"target_modules": targets}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, **kwargs))
    lora_modules = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert lora_modules == ({"query_key_value"} if targets is None else set(targets))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids, labels = lm_batch()
    losses = train_steps(peft_model, ids, labels, steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses

    # gradient checkpointing changes nothing numerically
    grads = []
    for enabled in (True, False):
        if not enabled:
            peft_model.base_model.model.gradient_checkpointing_disable()
        peft_model.train()
        peft_model.zero_grad()
        peft_model(input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad])
    peft_model.eval()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    adapter_logits = logits_of(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, ids), adapter_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_of(load_model(tiny_dir), ids), adapter_logits, atol=1e-3)  # training did change it


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_ptuning_v2_trains_only_the_prefix_encoder(tmp_path, prefix_projection):
    folder = make_model_dir(tmp_path, pre_seq_len=4, prefix_projection=prefix_projection)
    model = load_model(folder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable), trainable
    if prefix_projection:
        assert any(".trans." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, labels = lm_batch()
    losses = train_steps(model, ids, labels, steps=3, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if name in trainable:
            assert changed or name.endswith("bias"), name
        else:
            assert not changed and param.grad is None, name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)


# =====================================================================================================================
# 3. Trainer with gradient accumulation
# =====================================================================================================================
def _trainer_passes_num_items():
    from transformers import Trainer

    return "num_items_in_batch" in inspect.signature(Trainer.compute_loss).parameters


def test_trainer_gradient_accumulation_loss_is_the_token_mean(tiny_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    # Two micro-batches with very different numbers of trained tokens, so that the mean of the two micro-batch
    # means differs from the mean over all tokens. Label 0 is -100 in both (no shift ambiguity in the count).
    ids = random_ids(2, 12, seed=3)
    examples = []
    for row, first_trained in zip(ids, (2, 10)):
        labels = row.clone()
        labels[:first_trained] = -100
        examples.append({"input_ids": row, "attention_mask": torch.ones_like(row), "labels": labels})

    model = load_model(tiny_dir)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("num_items_in_batch")), with_kwargs=True)
    reference = load_model(tiny_dir)
    reference.train()
    sums, counts, means = [], [], []
    for ex in examples:
        logits = reference(input_ids=ex["input_ids"][None]).logits.float()
        tok = torch.nn.functional.cross_entropy(logits[0, :-1], ex["labels"][1:], ignore_index=-100, reduction="sum")
        n = int((ex["labels"][1:] != -100).sum())
        sums.append(tok)
        counts.append(n)
        means.append(tok / n)
    token_mean = sum(sums) / sum(counts)
    micro_mean = sum(means) / len(means)
    assert abs(token_mean.item() - micro_mean.item()) > 1e-2  # the test can tell the two apart

    lr = 0.1
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      optimizers=(torch.optim.SGD(params, lr=lr), None))
    before = model.transformer.output_layer.weight.detach().clone()
    result = trainer.train()

    passes = _trainer_passes_num_items()
    expected = token_mean if passes else micro_mean
    assert result.training_loss == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    if passes:
        assert len(seen) == 2 and all(s is not None and int(s) == sum(counts) for s in seen), seen
    # The optimizer step used the gradient of that same loss (SGD, no clipping, no decay).
    grad = torch.autograd.grad(expected, reference.transformer.output_layer.weight)[0]
    torch.testing.assert_close(model.transformer.output_layer.weight.detach(), before - lr * grad, atol=1e-5, rtol=1e-4)


def test_forward_normalises_by_num_items_in_batch(tiny_model):
    ids, labels = lm_batch()
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        mean = tiny_model(input_ids=ids, labels=labels).loss
        summed = tiny_model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(summed, mean / 2, rtol=1e-5, atol=1e-6)


# =====================================================================================================================
# 4. accelerate big-model loading
# =====================================================================================================================
def _model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@needs_accelerate
def test_device_map_auto_with_cpu_and_disk_offload(tiny_dir, tmp_path):
    plain = load_model(tiny_dir)
    budget = int(_model_bytes(plain) * 0.6)  # the embedding fits in "cpu" memory, the rest goes to disk
    model = load_model(tiny_dir, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "off"))
    placement = {str(v) for v in model.hf_device_map.values()}
    assert placement == {"cpu", "disk"}, model.hf_device_map
    blocks = [k for k in model.hf_device_map if "encoder.layers." in k]
    assert all(k.split("encoder.layers.")[1].isdigit() for k in blocks), model.hf_device_map  # GLMBlocks whole
    ids = random_ids(2, 6)
    assert torch.equal(greedy(model, ids, 6), greedy(plain, ids, 6))
    torch.testing.assert_close(logits_of(model, ids), logits_of(plain, ids), atol=1e-5, rtol=0)


@needs_accelerate
def test_init_empty_weights_and_load_checkpoint_and_dispatch(tiny_dir, tmp_path):
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = load_model(tiny_dir)
    config = AutoConfig.from_pretrained(tiny_dir, trust_remote_code=True)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert empty.transformer.output_layer.weight.device.type == "meta"
    budget = _model_bytes(plain) // 2
    model = load_checkpoint_and_dispatch(
        empty, str(tiny_dir), device_map="auto", no_split_module_classes=["GLMBlock"],
        max_memory={"cpu": budget}, offload_folder=str(tmp_path / "off"), dtype=torch.float32)
    model.eval()
    blocks = {k for k in model.hf_device_map if "encoder.layers." in k}
    assert all(k.rsplit(".", 1)[-1].isdigit() for k in blocks), model.hf_device_map  # whole GLMBlocks
    ids = random_ids(1, 7)
    assert torch.equal(greedy(model, ids, 6), greedy(plain, ids, 6))


def test_low_cpu_mem_usage_load(tiny_dir, tiny_model):
    model = load_model(tiny_dir, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in model.parameters())
    ids = random_ids()
    torch.testing.assert_close(logits_of(model, ids), logits_of(tiny_model, ids), atol=0, rtol=0)


# =====================================================================================================================
# 5. save_pretrained -> fresh offline process
# =====================================================================================================================
_CHILD = r"""
import json, sys, torch, transformers
folder, out = sys.argv[1], sys.argv[2]
kwargs = {k: getattr(torch, v) for k, v in json.loads(sys.argv[3]).items()}
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)
ids = torch.load(out, weights_only=True)["input_ids"]
with torch.no_grad():
    logits = model.eval()(input_ids=ids).logits
torch.save({"input_ids": ids, "logits": logits, "cls": type(model).__name__,
            "module": type(model).__module__}, out)
"""


def test_save_pretrained_folder_loads_in_fresh_offline_process(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    out = tmp_path / "saved"
    try:
        model.save_pretrained(out, safe_serialization=True)
    except TypeError:  # safe_serialization removed (always safetensors)
        model.save_pretrained(out)
    for name in CODE_FILES:  # every remote-code file; the fresh process below imports them from its module cache
        assert (out / name).read_bytes() == (REPO / name).read_bytes(), name
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == published_config_dict()["auto_map"]
    assert cfg["model_type"] == "chatglm"

    ids = random_ids(2, 9)
    io_file = tmp_path / "io.pt"
    torch.save({"input_ids": ids}, io_file)
    home = tmp_path / "hf-home"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home),
               HF_MODULES_CACHE=str(home / "modules"), PYTHONPATH="")
    dtype_arg = {k: "float32" for k in dtype_kwargs(None)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(io_file), json.dumps(dtype_arg)],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(io_file, weights_only=False)
    assert child["cls"] == "ChatGLMForConditionalGeneration"
    assert child["module"].startswith("transformers_modules.")  # loaded through trust_remote_code
    torch.testing.assert_close(child["logits"].float(), logits_of(model, ids), atol=1e-6, rtol=0)


# =====================================================================================================================
# 6. AutoModelForSequenceClassification
# =====================================================================================================================
def test_sequence_classification_pools_last_token_with_left_padding(tiny_dir):
    model = load_model(tiny_dir, cls="AutoModelForSequenceClassification", num_labels=3)
    assert type(model).__name__ == "ChatGLMForSequenceClassification"
    ids = random_ids(2, 8, seed=5)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = [model(input_ids=ids[i:i + 1, int(mask[i].argmax()):]).logits for i in range(2)]
    assert batch.shape == (2, 3)
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-5, rtol=0)

    labels = torch.tensor([2, 0])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.classifier_head.weight.grad is not None
    torch.testing.assert_close(out.loss.detach(), torch.nn.functional.cross_entropy(out.logits.float().detach(),
                                                                                    labels))


def test_sequence_classification_head_in_model_dtype(tiny_dir):
    model = load_model(tiny_dir, cls="AutoModelForSequenceClassification", num_labels=3,
                       **dtype_kwargs(torch.bfloat16))
    assert model.classifier_head.weight.dtype == torch.bfloat16
    assert model.transformer.output_layer.weight.dtype == torch.bfloat16
    ids = random_ids(2, 6)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]))
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (2, 3)
    assert torch.isfinite(out.loss)
