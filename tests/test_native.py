"""Behaviours transformers' own model and generation test mixins check on in-library models (issue "Behave like a
native transformers model"), through the real trust_remote_code path. References: transformers' GlmForCausalLM,
plain recomputation, and the library's own classes (caches, generate)."""
import warnings

import pytest
import torch

from support import TINY_CONFIG, build_glm, has_transformers_glm, left_padded_batch, load_model, make_model_dir

needs_glm = pytest.mark.skipif(not has_transformers_glm(), reason="this transformers has no GlmForCausalLM")


def _has_cache_classes():
    try:
        from transformers import DynamicCache  # noqa: F401
        return True
    except ImportError:
        return False


needs_cache = pytest.mark.skipif(not _has_cache_classes(), reason="this transformers has no Cache classes")


def _cache_kwarg(model, cache):
    """generate()'s cache argument: ``cache`` on transformers >= 5.24, ``past_key_values`` before."""
    import inspect

    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = "cache" if "cache" in inspect.signature(CausalLMOutputWithPast).parameters else "past_key_values"
    return {field: cache}, field


def test_generate_returns_per_step_hidden_states(tiny_model):
    ids, mask = left_padded_batch()
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3,
                              output_hidden_states=True, return_dict_in_generate=True, pad_token_id=0)
    steps = out.hidden_states
    assert len(steps) == 3
    layers = TINY_CONFIG["num_layers"] + 1
    assert all(len(step) == layers and all(isinstance(h, torch.Tensor) for h in step) for step in steps)
    assert steps[0][0].shape == (3, 8, TINY_CONFIG["hidden_size"])  # prompt: batch-first [b, s, h]
    assert steps[1][0].shape == (3, 1, TINY_CONFIG["hidden_size"])  # then one token per step
    # the prompt's hidden states equal a plain forward's
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(steps[0][-1], ref[-1])


def test_config_vocab_size_is_padded_vocab_size(tiny_model):
    cfg = tiny_model.config
    assert cfg.vocab_size == cfg.padded_vocab_size == TINY_CONFIG["padded_vocab_size"]
    assert "vocab_size" not in cfg.to_dict()  # the published field name is the one written


def test_resize_token_embeddings_forward_save_reload(tmp_path):
    folder = make_model_dir(tmp_path / "src")
    model = load_model(folder)
    old = model.config.padded_vocab_size
    import inspect

    if "pad_to_multiple_of" in inspect.signature(model.resize_token_embeddings).parameters:
        model.resize_token_embeddings(old + 5, pad_to_multiple_of=8)
        assert model.config.vocab_size == old + 8
    else:  # transformers 4.30
        model.resize_token_embeddings(old + 8)
    new = model.config.vocab_size
    assert new == model.config.padded_vocab_size == old + 8
    assert model.get_input_embeddings().weight.shape[0] == new
    assert model.get_output_embeddings().weight.shape[0] == new
    ids = torch.tensor([[1, 5, new - 1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 3, new)
    model.save_pretrained(tmp_path / "resized")
    again = load_model(tmp_path / "resized")
    assert again.config.padded_vocab_size == new
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, logits)


def test_mismatched_classification_head_needs_ignore_mismatched_sizes(tmp_path):
    import transformers

    folder = make_model_dir(tmp_path, num_labels=3)
    model = load_model(folder, cls="AutoModelForSequenceClassification")
    model.save_pretrained(tmp_path / "cls3")
    with pytest.raises((RuntimeError, ValueError)):
        load_model(tmp_path / "cls3", cls="AutoModelForSequenceClassification", num_labels=5)
    model5 = load_model(tmp_path / "cls3", cls="AutoModelForSequenceClassification", num_labels=5,
                        ignore_mismatched_sizes=True)
    assert model5.classifier_head.weight.shape[0] == 5
    assert isinstance(model5, transformers.PreTrainedModel)


def test_hidden_states_are_on_the_autograd_graph(tmp_path):
    folder = make_model_dir(tmp_path)
    model = load_model(folder).train()
    ids, mask = left_padded_batch()
    # LM head: batch-first
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    out.loss.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in out.hidden_states)
    # ChatGLMModel: seq-first, as published
    model.zero_grad()
    base = model.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert base.hidden_states[0].shape[:2] == (ids.shape[1], ids.shape[0])
    for h in base.hidden_states:
        h.retain_grad()
    base.last_hidden_state.float().pow(2).mean().backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in base.hidden_states)


@needs_cache
def test_generate_continues_from_inputs_embeds_and_cache(tiny_model):
    ids, mask = left_padded_batch()
    ids, mask = ids[1:2], mask[1:2]  # no padding: continuation is exact
    embeds = tiny_model.get_input_embeddings()(ids)
    try:
        first = tiny_model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=3,
                                    return_dict_in_generate=True, pad_token_id=0)
    except ValueError as exc:
        if "bos_token_id" in str(exc):
            pytest.skip("this transformers cannot generate from inputs_embeds for decoder-only models")
        raise
    ref = tiny_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4, pad_token_id=0)
    cache = getattr(first, "cache", None) or first.past_key_values
    more = torch.cat([embeds, tiny_model.get_input_embeddings()(first.sequences)], dim=1)
    kwargs, _ = _cache_kwarg(tiny_model, cache)
    second = tiny_model.generate(inputs_embeds=more, attention_mask=torch.ones(more.shape[:2], dtype=torch.long),
                                 do_sample=False, max_new_tokens=1, return_dict_in_generate=True, pad_token_id=0,
                                 **kwargs)
    assert torch.equal(second.sequences[:, -1:], ref[:, -1:])


def test_loss_takes_shift_labels(tiny_model):
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        a = tiny_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        b = tiny_model(input_ids=ids, attention_mask=mask, shift_labels=shifted).loss
        logits = tiny_model(input_ids=ids, attention_mask=mask).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                                            ignore_index=-100)
    torch.testing.assert_close(b, ref)
    torch.testing.assert_close(a, b)


@needs_cache
def test_an_empty_user_cache_is_filled_not_replaced(tiny_model):
    from transformers import DynamicCache

    ids, mask = left_padded_batch()
    cache = DynamicCache()
    with torch.no_grad():
        out = tiny_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    returned = getattr(out, "cache", None) or out.past_key_values
    assert returned is cache and cache.get_seq_length() == ids.shape[1]
    cache = DynamicCache()
    kwargs, _ = _cache_kwarg(tiny_model, cache)
    gen = tiny_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=2,
                              return_dict_in_generate=True, pad_token_id=0, **kwargs)
    assert (getattr(gen, "cache", None) or gen.past_key_values) is cache
    assert cache.get_seq_length() == ids.shape[1] + 1


def test_num_key_value_heads_is_the_true_count(tmp_path):
    from transformers import AutoConfig

    folder = make_model_dir(tmp_path / "mqa")
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True).num_key_value_heads == 2
    folder = make_model_dir(tmp_path / "mha", multi_query_attention=False)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.num_key_value_heads == config.num_attention_heads == TINY_CONFIG["num_attention_heads"]
    model = load_model(folder)
    qkv = model.transformer.encoder.layers[0].self_attention.query_key_value.weight
    assert qkv.shape[0] == (config.num_attention_heads + 2 * config.num_key_value_heads) * config.kv_channels


@needs_glm
def test_eager_attention_probabilities_match_transformers_glm(tiny_dir):
    ids, mask = left_padded_batch()
    try:
        model = load_model(tiny_dir, attn_implementation="eager")
    except (TypeError, ValueError):
        pytest.skip("this transformers does not accept attn_implementation")
    glm = build_glm(model)
    glm.config._attn_implementation = "eager"
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = glm(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    assert len(ours) == len(ref) == TINY_CONFIG["num_layers"]
    valid = mask.bool()  # rows of real query tokens (padding rows differ by convention)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape == (3, TINY_CONFIG["num_attention_heads"], 8, 8)
        torch.testing.assert_close(a.permute(0, 2, 1, 3)[valid], b.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=0)


def test_output_attentions_without_eager_warns_and_returns_none(tiny_dir):
    # as in-library models: a warning (once) and no attention weights, the outputs otherwise unchanged
    try:
        model = load_model(tiny_dir, attn_implementation="sdpa")
    except (TypeError, ValueError):
        model = load_model(tiny_dir)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
        plain = model(input_ids=ids)
    assert out.attentions is None
    torch.testing.assert_close(out.logits, plain.logits)


def _gradients(model, ids, mask):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_gradient_checkpointing_keeps_gradients(tmp_path, pre_seq_len):
    folder = make_model_dir(tmp_path, pre_seq_len=pre_seq_len)
    ids, mask = left_padded_batch()
    plain = load_model(folder).train()
    if pre_seq_len:
        plain.transformer.dropout.p = 0.0  # the published prefix dropout would make the two runs differ
    ref = _gradients(plain, ids, mask)
    assert ref
    model = load_model(folder).train()
    if pre_seq_len:  # same prefix weights in both (a fresh prefix encoder is initialised at random)
        model.transformer.prefix_encoder.load_state_dict(plain.transformer.prefix_encoder.state_dict())
        model.transformer.dropout.p = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    got = _gradients(model, ids, mask)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)


def test_gradient_checkpointing_kwargs_and_every_n_layers(tmp_path):
    folder = make_model_dir(tmp_path, num_layers=4)
    model = load_model(folder).train()
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("this transformers has no activation_checkpointing_enable(every_n_layers=...)")
    model.activation_checkpointing_enable(every_n_layers=2)
    flags = [layer.gradient_checkpointing for layer in model.transformer.encoder.layers]
    assert flags == [True, False, True, False]
    ids, mask = left_padded_batch()
    ref = load_model(folder).train()
    torch.testing.assert_close(_gradients(model, ids, mask), _gradients(ref, ids, mask))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert all(layer.gradient_checkpointing for layer in model.transformer.encoder.layers)
    model.transformer.embedding.word_embeddings.weight.requires_grad_(True)
    torch.testing.assert_close(_gradients(model, ids, mask), _gradients(ref, ids, mask))


def test_torch_export_gives_eager_logits(tiny_model):
    if not hasattr(torch, "export"):
        pytest.skip("this torch has no torch.export")
    ids, mask = left_padded_batch()
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False, "return_dict": False}
    program = torch.export.export(tiny_model, args=(), kwargs=kwargs)  # no data-dependent checks in the graph
    other = {"input_ids": (ids * 7 + 3) % TINY_CONFIG["padded_vocab_size"], "attention_mask": mask.flip(0),
             "use_cache": False, "return_dict": False}
    for inputs in (kwargs, other):
        logits = program.module()(**inputs)[0]
        with torch.no_grad():
            ref = tiny_model(**inputs)[0]
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(logits[valid], ref[valid])


@needs_glm
def test_base_model_is_batch_first_and_transformer_stays_seq_first(tiny_dir):
    """``model.base_model`` / ``get_decoder()`` of the heads (what generic code such as TRL's fused LM head calls)
    are batch-first like transformers' GlmModel; ``model.transformer`` keeps the published seq-first contract.
    The view is the same module: no new parameters or state_dict keys, and changes to it are changes to the model."""
    model = load_model(tiny_dir)
    glm = build_glm(model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = glm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        body = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        seq_first = model.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert body.last_hidden_state.shape == (*ids.shape, TINY_CONFIG["hidden_size"])
    torch.testing.assert_close(body.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(body.hidden_states[0], ref.hidden_states[0])
    torch.testing.assert_close(from_embeds, body.last_hidden_state)
    assert seq_first.last_hidden_state.shape == (ids.shape[1], ids.shape[0], TINY_CONFIG["hidden_size"])
    torch.testing.assert_close(seq_first.last_hidden_state.transpose(0, 1), body.last_hidden_state)


def test_base_model_view_is_the_same_module(tiny_dir):
    model = load_model(tiny_dir)
    ids, mask = left_padded_batch()
    view = model.base_model
    assert isinstance(view, type(model.transformer)) and view is not model.transformer
    assert model.transformer.base_model is model.transformer  # a bare ChatGLMModel is its own (seq-first) body
    assert dict(view.named_parameters()) == dict(model.transformer.named_parameters())
    assert sorted(model.state_dict()) == sorted(load_model(tiny_dir).state_dict())
    assert model.get_input_embeddings() is model.transformer.embedding.word_embeddings
    model.train()
    assert model.base_model.training
    model.eval()
    with pytest.raises(ValueError, match="view"):
        type(view)(model.config)
    with pytest.raises(ValueError, match="ChatGLMModel"):
        type(view).view_of(model)
    cls_model = load_model(tiny_dir, cls="AutoModelForSequenceClassification", num_labels=2)
    with torch.no_grad():
        out = cls_model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (*ids.shape, TINY_CONFIG["hidden_size"])


# -- static cache, torch.compile, the attention interface, continuous batching ------------------------------------------
def _skip_without_static_cache(model):
    if not getattr(model, "_supports_static_cache", False):
        pytest.skip("this transformers has no create_causal_mask (masks sized for a StaticCache)")


@needs_glm
def test_static_cache_generate_matches_transformers_glm(tiny_model):
    _skip_without_static_cache(tiny_model)
    ids, mask = left_padded_batch()
    ref = build_glm(tiny_model).generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5,
                                         pad_token_id=0)
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5, pad_token_id=0,
                              cache_implementation="static")
    assert torch.equal(out, ref)


@needs_glm
def test_compiled_static_decode_has_no_graph_break_or_per_token_recompile(tiny_dir):
    model = load_model(tiny_dir)
    _skip_without_static_cache(model)
    assert model._can_compile_fullgraph
    ids, mask = left_padded_batch()
    new = 8
    ref = build_glm(model).generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                    pad_token_id=0)
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # fullgraph: a graph break raises; dynamic=False: any shape or stride that changes per step would recompile
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0,
                         cache_implementation="static")
    assert torch.equal(out, ref)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # prefill, decode


def test_prepared_4d_masks_equal_the_2d_mask(tiny_model):
    ids, mask = left_padded_batch()
    seq = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    keep = keep | ~mask.bool()[:, None, :, None]  # padding rows attend everywhere (their outputs are unused)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    valid = mask.bool()
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for prepared in (keep, additive):
            out = tiny_model(input_ids=ids, attention_mask=prepared, position_ids=positions, use_cache=False).logits
            torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_logits_to_keep_takes_positions(tiny_model):
    ids = torch.tensor([[5, 9, 33, 17, 4, 8]])
    with torch.no_grad():
        full = tiny_model(input_ids=ids).logits
        kept = tiny_model(input_ids=ids, logits_to_keep=torch.tensor([1, 4])).logits
        last = tiny_model(input_ids=ids, logits_to_keep=2).logits
    torch.testing.assert_close(kept, full[:, [1, 4]])
    torch.testing.assert_close(last, full[:, -2:])


def test_p_tuning_with_a_static_cache_is_a_clear_error(tmp_path):
    model = load_model(make_model_dir(tmp_path, pre_seq_len=3))
    _skip_without_static_cache(model)
    with pytest.raises(ValueError, match="p-tuning"):
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False,
                       cache_implementation="static")


_NATIVE_CAN_BATCH = []  # whether transformers' GlmForCausalLM batches continuously here (checked once)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_continuous_batching_gives_each_prompt_its_greedy_tokens(tiny_model, tiny_dir, impl):
    if not hasattr(tiny_model, "generate_batch"):
        pytest.skip("this transformers has no continuous batching (generate_batch)")
    model = load_model(tiny_dir, attn_implementation=impl)
    from transformers import GenerationConfig

    prompts = [[5, 6, 7, 8, 9], [3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [99]]
    new = 6
    eos = TINY_CONFIG["eos_token_id"]

    def until_eos(tokens):
        tokens = list(tokens)[:new]
        return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens

    expected = {}
    for p in prompts:  # each prompt alone through the ordinary generate()
        alone = model.generate(input_ids=torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        expected[tuple(p)] = until_eos(alone[0, len(p):].tolist())
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)

    def batched(m):
        return {tuple(o.prompt_ids): until_eos(o.generated_tokens)
                for o in (m.generate_batch(inputs=prompts, generation_config=config) or {}).values()}

    if has_transformers_glm() and impl == "sdpa":  # the in-library model: what this transformers can do here
        glm = build_glm(model)
        glm.config._attn_implementation = impl
        try:
            native = batched(glm)
        except Exception:  # noqa: BLE001 - whatever stops the native model stops the check
            native = {}
        _NATIVE_CAN_BATCH.append(native == expected)
    if _NATIVE_CAN_BATCH and not _NATIVE_CAN_BATCH[0]:
        pytest.skip("transformers' own GlmForCausalLM does not batch continuously on this machine either "
                        "(transformers 4.57 sizes the paged cache from GPU memory)")
    got = batched(model)
    assert got == expected
    assert all(len(v) for v in got.values())


@pytest.mark.parametrize("mode", [pytest.param("assisted", marks=needs_cache), "prompt_lookup"])
def test_candidate_decoding_gives_the_greedy_tokens(tiny_model, tmp_path, mode):
    ids = torch.tensor([[5, 9, 33, 17, 4, 5, 9, 33]])
    plain = tiny_model.generate(input_ids=ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    from transformers import GenerationConfig

    if mode == "assisted":
        extra = {"assistant_model": load_model(make_model_dir(tmp_path, seed=1, num_layers=1))}
    else:
        if not hasattr(GenerationConfig(), "prompt_lookup_num_tokens"):
            pytest.skip("this transformers has no prompt lookup decoding")
        extra = {"prompt_lookup_num_tokens": 3}
    out = tiny_model.generate(input_ids=ids, do_sample=False, max_new_tokens=8, pad_token_id=0,
                              return_dict_in_generate=True, output_hidden_states=True, **extra)
    assert torch.equal(out.sequences, plain)
    assert out.hidden_states and all(h is not None for step in out.hidden_states for h in step)


def test_padding_rows_follow_the_published_mask_rule(tiny_dir):
    """Left-padded rows: every position, padding included, equals the original code's mask (written here as the
    published get_masks does: causal and key padding, and a padding query attends to every key). Kolors feeds those
    padded rows of hidden_states[-2] to its UNet."""
    model = load_model(tiny_dir)
    ids, mask = left_padded_batch()
    seq = ids.shape[1]
    full = torch.ones(ids.shape[0], seq, seq).tril_() * mask[:, None, :]
    full = full - (mask[:, :, None] - 1)
    published = (full < 0.5)[:, None]  # True = masked, the published convention
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what the tokenizer gives a left-padded batch
    with torch.no_grad():
        got = model.transformer(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                                use_cache=False)
        ref = model.transformer(input_ids=ids, full_attention_mask=published, position_ids=positions,
                                output_hidden_states=True, use_cache=False)
    for a, b in zip(got.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
