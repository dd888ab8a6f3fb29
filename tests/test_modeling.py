"""configuration_chatglm.py and modeling_chatglm.py: the model's forward, loss and heads through the real
trust_remote_code path, against transformers' own GlmForCausalLM (the same function as ChatGLM3 under a key mapping)
as an independent reference; and the configuration's validation (hostile config.json fields are a ``ValueError``
naming the field, before any weight is read)."""
import ast
import json
import runpy
import warnings

import pytest
import torch

from support import (CODE_FILES, REPO, TINY_CONFIG, build_glm, copy_dir, dtype_kwargs, has_transformers_glm,
                    left_padded_batch, lm_batch, load_model, make_model_dir, random_ids)

needs_glm = pytest.mark.skipif(not has_transformers_glm(), reason="this transformers has no GlmForCausalLM")


@needs_glm
@pytest.mark.parametrize("rope_ratio", [1, 50])
def test_logits_match_transformers_glm(tmp_path, rope_ratio):
    folder = make_model_dir(tmp_path, rope_ratio=rope_ratio)
    model = load_model(folder)
    glm = build_glm(model)
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        ref = glm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert ours.shape == (3, 8, TINY_CONFIG["padded_vocab_size"])
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)


@needs_glm
def test_greedy_generate_matches_transformers_glm(tiny_model):
    glm = build_glm(tiny_model)
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ours = tiny_model.generate(input_ids=ids, attention_mask=mask, **kw)
        ref = glm.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ours, ref)


def _generate(model, ids, mask=None, **kw):
    kw.setdefault("max_new_tokens", 10)
    kw.setdefault("pad_token_id", 0)
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kw)


def test_cache_on_off_identical(tiny_model):
    ids, mask = left_padded_batch()
    a = _generate(tiny_model, ids, mask, do_sample=False, use_cache=True)
    b = _generate(tiny_model, ids, mask, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_left_padded_batch_equals_single_rows(tiny_model):
    ids, mask = left_padded_batch()
    batch = _generate(tiny_model, ids, mask, do_sample=False)
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        single = _generate(tiny_model, ids[row:row + 1, start:], do_sample=False)
        assert torch.equal(batch[row, start:], single[0]), row


def test_beam_one_equals_greedy_and_beam_search_runs(tiny_model):
    ids, mask = left_padded_batch()
    greedy = _generate(tiny_model, ids, mask, do_sample=False)
    beam1 = _generate(tiny_model, ids, mask, do_sample=False, num_beams=1)
    assert torch.equal(greedy, beam1)
    beams = _generate(tiny_model, ids, mask, do_sample=False, num_beams=3)
    assert beams.shape == greedy.shape
    # beam search over single rows equals beam search within the padded batch
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        single = _generate(tiny_model, ids[row:row + 1, start:], do_sample=False, num_beams=3)
        assert torch.equal(beams[row, start:], single[0]), row


def test_sampling_is_seeded_and_batch_consistent(tiny_model):
    ids, mask = left_padded_batch()
    torch.manual_seed(0)
    a = _generate(tiny_model, ids, mask, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(0)
    b = _generate(tiny_model, ids, mask, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(a, b)
    assert ((a[:, 8:] >= 0) & (a[:, 8:] < TINY_CONFIG["padded_vocab_size"])).all()


def test_tokenizer_position_ids_are_honoured(tiny_model):
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with_pos = _generate(tiny_model, ids, mask, do_sample=False, position_ids=positions)
    without = _generate(tiny_model, ids, mask, do_sample=False)
    assert torch.equal(with_pos, without)
    # shifted positions must change the result: they are really used
    shifted = _generate(tiny_model, ids, mask, do_sample=False, position_ids=positions + 7, max_new_tokens=3)
    with torch.no_grad():
        a = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions + 7).logits
        b = tiny_model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, b)
    assert shifted.shape[1] == ids.shape[1] + 3


def test_chatglm_model_output_contract(tiny_dir):
    model = load_model(tiny_dir, cls="AutoModel")
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model.transformer(input_ids=ids, attention_mask=mask, position_ids=positions,
                                output_hidden_states=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
    h = TINY_CONFIG["hidden_size"]
    assert out.last_hidden_state.shape == (8, 3, h)  # seq-first
    assert len(out.hidden_states) == TINY_CONFIG["num_layers"] + 1
    assert all(x.shape == (8, 3, h) for x in out.hidden_states)
    # hidden_states[-1] is the last block's output BEFORE final_layernorm
    normed = model.transformer.encoder.final_layernorm(out.hidden_states[-1])
    torch.testing.assert_close(normed, out.last_hidden_state)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
    # what Kolors reads
    assert out.hidden_states[-2].permute(1, 0, 2).shape == (3, 8, h)
    assert out.hidden_states[-1][-1, :, :].shape == (3, h)
    assert logits.shape == (3, 8, TINY_CONFIG["padded_vocab_size"])
    # tuple output keeps the published order
    tup = model.transformer(input_ids=ids, attention_mask=mask, return_dict=False, use_cache=False)
    torch.testing.assert_close(tup[0], out.last_hidden_state)


def test_labels_give_float32_loss(tmp_path):
    folder = make_model_dir(tmp_path)
    model = load_model(folder)
    model = model.to(torch.bfloat16)
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    # independent computation of the same loss
    logits = out.logits.float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                            ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert model.transformer.output_layer.weight.grad is not None


def test_inputs_embeds_equal_input_ids(tiny_model):
    ids, mask = left_padded_batch()
    with torch.no_grad():
        embeds = tiny_model.get_input_embeddings()(ids)
        a = tiny_model(input_ids=ids, attention_mask=mask).logits
        b = tiny_model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(a, b)
    try:
        gen = _generate(tiny_model, None, mask, inputs_embeds=embeds, do_sample=False, max_new_tokens=4)
    except ValueError as exc:
        if "bos_token_id" in str(exc):
            pytest.skip("this transformers cannot generate from inputs_embeds for decoder-only models")
        raise
    ref = _generate(tiny_model, ids, mask, do_sample=False, max_new_tokens=4)
    assert torch.equal(gen[:, -4:], ref[:, -4:])


def test_eager_and_sdpa_agree(tiny_dir):
    ids, mask = left_padded_batch()
    try:
        eager = load_model(tiny_dir, attn_implementation="eager")
    except (TypeError, ValueError):
        pytest.skip("this transformers does not accept attn_implementation")
    sdpa = load_model(tiny_dir, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask).logits
        b = sdpa(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu(tiny_dir, tiny_model, dtype):
    ids, mask = left_padded_batch()
    kw = {"dtype": dtype}
    try:
        model = load_model(tiny_dir, **kw)
    except TypeError:
        model = load_model(tiny_dir, torch_dtype=dtype)
    assert model.transformer.output_layer.weight.dtype == dtype
    with torch.no_grad():
        low = model(input_ids=ids, attention_mask=mask).logits.float()
        ref = tiny_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(low[real]).all()
    assert (low[real] - ref[real]).abs().max() < 0.15 * ref[real].abs().max()
    gen = _generate(model, ids, mask, do_sample=False, max_new_tokens=3)
    assert gen.shape == (3, 11)


def test_published_bin_shards_load_without_warnings(tmp_path, caplog):
    """A checkpoint in the published layout: float16 sharded pytorch_model-0000N-of-0000M.bin + index,
    including transformer.rotary_pos_emb.inv_freq."""
    src = make_model_dir(tmp_path / "src")
    ref = load_model(src)
    sd = {k: v.half() for k, v in ref.state_dict().items()}
    assert "transformer.rotary_pos_emb.inv_freq" in sd
    dst = tmp_path / "published"
    from support import write_code, write_config
    write_code(dst)
    write_config(dst, torch_dtype="float16")
    keys = list(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, shard_keys in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: sd[k] for k in shard_keys}, dst / name)
        weight_map.update({k: name for k in shard_keys})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (dst / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    import logging
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = load_model(dst, dtype="auto")
        except TypeError:
            model = load_model(dst, torch_dtype="auto")
    text = caplog.text + " ".join(str(w.message) for w in caught)
    for bad in ("newly initialized", "were not used", "missing", "unexpected", "not initialized"):
        assert bad not in text.lower(), text
    assert model.transformer.output_layer.weight.dtype == torch.float16
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and configuration errors (issue: clear ValueError before heavy work)
# ---------------------------------------------------------------------------------------------------------------------
def test_out_of_vocab_ids_raise_value_error(tiny_model):
    vocab = TINY_CONFIG["padded_vocab_size"]
    with pytest.raises(ValueError, match=rf"{vocab}\b.*\[0, {vocab}\)"):
        tiny_model(input_ids=torch.tensor([[1, 2, vocab]]))
    with pytest.raises(ValueError, match=r"-3"):
        tiny_model(input_ids=torch.tensor([[1, -3, 2]]))
    with pytest.raises(ValueError, match="integer"):
        tiny_model(input_ids=torch.tensor([[1.0, 2.0]]))


def test_mismatched_shapes_raise_value_error(tiny_model):
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids"):
        tiny_model(input_ids=ids, position_ids=torch.arange(5)[None])


@pytest.mark.parametrize("overrides,match", [
    (dict(num_attention_heads=6, multi_query_group_num=4), "divisible"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(quantization_bit=3), "quantization_bit"),
    (dict(kv_channels=7), "kv_channels"),
    (dict(pre_seq_len=0), "pre_seq_len"),
])
def test_invalid_config_raises(tmp_path, overrides, match):
    from transformers import AutoConfig
    from support import write_code, write_config
    write_code(tmp_path)
    write_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)


def test_positions_beyond_seq_length_work_with_one_warning(tmp_path, caplog):
    import logging
    folder = make_model_dir(tmp_path, seq_length=8)
    model = load_model(folder)
    ids = torch.arange(1, 13)[None]  # 12 tokens > seq_length 8
    caplog.set_level(logging.WARNING)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        model(input_ids=ids)
    assert torch.isfinite(full).all()
    assert sum("beyond config.seq_length" in r.getMessage() for r in caplog.records) <= 1
    # rotary really is computed for positions past the table: equal to a model with a long seq_length
    long_model = load_model(folder, seq_length=4096)
    with torch.no_grad():
        torch.testing.assert_close(long_model(input_ids=ids).logits, full)


@pytest.mark.parametrize("loaded_as, written", [
    (None, "THUDM/chatglm3-6b-base"),  # a local folder: never written, the published name instead
    ("THUDM/chatglm3-6b-32k", "THUDM/chatglm3-6b-32k"),  # a ChatGLM3-6B hub id is kept
    ("someone/my-fine-tune", "THUDM/chatglm3-6b-base"),
])
def test_saved_config_keeps_a_name_converters_recognise(tiny_dir, tmp_path, loaded_as, written):
    """llama.cpp's converter recognises ChatGLM3 by ``_name_or_path`` (as in the published config.json); the
    library drops the field (5.x, 4.57) or writes the local folder (4.30) on save."""
    from transformers import AutoConfig

    model = load_model(tiny_dir)
    assert model.config.name_or_path == str(tiny_dir)
    if loaded_as:
        model.config.name_or_path = loaded_as
    model.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["_name_or_path"] == written
    # transformers' own behaviours are unchanged: the loaded name is the folder, to_dict keeps the live value
    again = load_model(tmp_path / "saved")
    assert again.config.name_or_path == str(tmp_path / "saved")
    assert again.config.to_dict()["_name_or_path"] == str(tmp_path / "saved")
    assert AutoConfig.from_pretrained(tmp_path / "saved", trust_remote_code=True).num_layers == cfg["num_layers"]
    with torch.no_grad():
        ids = torch.tensor([[3, 4, 5]])
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_save_pretrained_copies_remote_code(tiny_model, tmp_path):
    import subprocess
    import sys
    tiny_model.save_pretrained(tmp_path / "saved")
    for name in CODE_FILES:
        assert (tmp_path / "saved" / name).read_bytes() == (REPO / name).read_bytes(), name
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert cfg["architectures"]  # written by transformers
    code = (
        "import torch, transformers, sys\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(m(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "saved")], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        expected = tiny_model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().item()
    assert abs(float(out.stdout.strip().splitlines()[-1]) - expected) < 1e-3


def test_remote_code_files_are_the_files_the_code_imports():
    """loading.py's REMOTE_CODE_FILES, the one list that saves, hub folders, scripts and tests copy, is exactly the
    configuration, model and tokenizer code plus every sibling file they import, directly or through another
    (relative imports, lazy ones included): a new file cannot be left out of a saved folder."""
    todo, imported = ["configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"], set()
    while todo:
        name = todo.pop()
        if name in imported:
            continue
        imported.add(name)
        for node in ast.walk(ast.parse((REPO / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                todo += [f"{module.split('.')[0]}.py" for module in
                         ([node.module] if node.module else [alias.name for alias in node.names])]
    assert len(set(CODE_FILES)) == len(CODE_FILES) and set(CODE_FILES) == imported
    assert CODE_FILES[:3] == ["configuration_chatglm.py", "modeling_chatglm.py", "chat.py"]  # what "has our code" checks
    # the scripts read the same list
    for script in ("generate.py", "scripts/convert_to_glm.py"):
        assert list(runpy.run_path(str(REPO / script), run_name="not_main")["CODE_FILES"]) == CODE_FILES, script
    bench = runpy.run_path(str(REPO / "benchmarks" / "bench_generate.py"), run_name="not_main")
    assert bench["code_files"](REPO) == CODE_FILES


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    folder = make_model_dir(tmp_path)
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = load_model(folder).train()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
            assert all(layer.gradient_checkpointing for layer in model.transformer.encoder.layers)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append(model.transformer.encoder.layers[0].self_attention.query_key_value.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_sequence_classification_pools_last_real_token(tmp_path):
    folder = make_model_dir(tmp_path, num_labels=3)
    model = load_model(folder, cls="AutoModelForSequenceClassification")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        for row in range(3):
            start = int((mask[row] == 0).sum())
            single = model(input_ids=ids[row:row + 1, start:]).logits
            torch.testing.assert_close(batch[row], single[0], atol=1e-5, rtol=0)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    assert out.loss.dtype == torch.float32
    bf16 = model.to(torch.bfloat16)
    assert bf16.classifier_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16(input_ids=ids, attention_mask=mask).logits.dtype == torch.bfloat16


def test_embedding_getters_setters(tiny_model):
    emb = tiny_model.get_input_embeddings()
    assert emb is tiny_model.transformer.embedding.word_embeddings
    assert tiny_model.get_output_embeddings() is tiny_model.transformer.output_layer
    assert tiny_model.transformer.get_input_embeddings() is emb

# ---------------------------------------------------------------------------------------------------------------------
# Hostile config.json fields (ChatGLMConfig's validation)
# ---------------------------------------------------------------------------------------------------------------------
# config.json fields: (field, value, regex the ValueError must match, marks)
CONFIG_CASES = [
    ("num_layers", "28", "num_layers", ()),
    ("num_layers", 0, "num_layers", ()),
    ("hidden_size", 0, "hidden_size", ()),
    ("hidden_size", -64, "hidden_size", ()),
    ("hidden_size", 64.0, "hidden_size", ()),
    ("seq_length", 32768.5, "seq_length", ()),
    ("seq_length", -1, "seq_length", ()),
    ("padded_vocab_size", None, "padded_vocab_size", ()),
    ("padded_vocab_size", "128", "padded_vocab_size", ()),
    ("ffn_hidden_size", True, "ffn_hidden_size", ()),
    ("kv_channels", 15, "kv_channels", ()),
    ("kv_channels", 0, "kv_channels", ()),
    ("num_attention_heads", 3, "num_attention_heads|divisible", ()),
    ("multi_query_group_num", 0, "multi_query_group_num", ()),
    ("multi_query_group_num", 3, "divisible|multi_query_group_num", ()),
    ("quantization_bit", 3, "quantization_bit", ()),
    ("quantization_bit", "8", "quantization_bit", ()),
    ("pre_seq_len", -1, "pre_seq_len", ()),
    ("pre_seq_len", 0, "pre_seq_len", ()),
    ("rope_ratio", "50", "rope_ratio", ()),
    ("rope_ratio", 0, "rope_ratio", ()),
    ("layernorm_epsilon", "1e-5", "layernorm_epsilon", ()),
    ("layernorm_epsilon", -1e-5, "layernorm_epsilon", ()),
    ("hidden_dropout", 2.0, "hidden_dropout", ()),
    ("attention_dropout", "x", "attention_dropout", ()),
    ("classifier_dropout", 5, "classifier_dropout", ()),
    ("use_cache", "no", "use_cache", ()),
    ("rmsnorm", "yes", "rmsnorm", ()),
    ("multi_query_attention", "false", "multi_query_attention", ()),
]


@pytest.mark.parametrize(
    "field,value,match",
    [pytest.param(f, v, m, id=f"{f}={v!r}", marks=marks) for f, v, m, marks in CONFIG_CASES])
def test_config_json_hostile_field(tiny_dir, tmp_path, field, value, match):
    from transformers import AutoConfig

    folder = copy_dir(tiny_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=match):
        load_model(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Loss normalisation and the sequence-classification head
# ---------------------------------------------------------------------------------------------------------------------
def test_forward_normalises_by_num_items_in_batch(tiny_model):
    ids, labels = lm_batch()
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        mean = tiny_model(input_ids=ids, labels=labels).loss
        summed = tiny_model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(summed, mean / 2, rtol=1e-5, atol=1e-6)


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
