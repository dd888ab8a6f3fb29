"""Property-based fuzzing (issue 7) with hypothesis.

* random tiny configs (heads, key/value groups dividing them, even kv_channels, 1-3 layers, rope_ratio, p-tuning
  prefixes, biases, norms, eager/sdpa) x random batches with random left padding x cache on/off:
  no exceptions, finite outputs, each row independent of the padding and of the other rows, cached decoding equal
  to a full uncached forward, cached and uncached greedy generation equal;
* random hostile tensors (any dtype, shape, value range): a clear ValueError/TypeError or finite output, never a
  crash from deep inside torch;
* random Unicode through the tokenizer (encode -> decode): never crashes, ids stay in the vocabulary.

Models are built in-process from the remote classes (loaded once through trust_remote_code), not from folders, so
the default profile (25 examples per property, see conftest.py) keeps this file well under a minute;
``HYPOTHESIS_PROFILE=long`` runs 500 examples per property.
"""
import shutil
import warnings

import pytest
import torch

from support import REPO, SHARED_REFERENCE, TINY_CONFIG, cache_of, random_state_dict

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(suppress_health_check=list(HealthCheck), deadline=None)
ATOL = 1e-4


@pytest.fixture(scope="module")
def remote_classes(tiny_model):
    """(model class, config class) of the remote code, as loaded by trust_remote_code."""
    return type(tiny_model), type(tiny_model.config)


@st.composite
def tiny_configs(draw):
    groups = draw(st.integers(1, 3))
    multi_query = draw(st.booleans())
    heads = groups * draw(st.integers(1, 3)) if multi_query else draw(st.integers(1, 4))
    return dict(
        num_layers=draw(st.integers(1, 3)),
        padded_vocab_size=draw(st.sampled_from([16, 37, 64])),
        hidden_size=draw(st.sampled_from([8, 16, 24, 32])),
        ffn_hidden_size=draw(st.sampled_from([4, 12, 40])),
        kv_channels=draw(st.sampled_from([2, 4, 6, 8, 10, 16])),
        num_attention_heads=heads,
        multi_query_attention=multi_query,
        multi_query_group_num=groups if multi_query else 1,
        seq_length=draw(st.sampled_from([4, 8, 64])),  # 4 and 8: positions run past seq_length
        rope_ratio=draw(st.sampled_from([1, 0.5, 1.7, 50])),
        pre_seq_len=draw(st.one_of(st.none(), st.integers(1, 4))),
        prefix_projection=draw(st.booleans()),
        add_qkv_bias=draw(st.booleans()),
        add_bias_linear=draw(st.booleans()),
        rmsnorm=draw(st.booleans()),
        post_layer_norm=draw(st.booleans()),
        apply_residual_connection_post_layernorm=draw(st.booleans()),
        layernorm_epsilon=1e-5,
        eos_token_id=2,
        pad_token_id=0,
    ), draw(st.sampled_from(["sdpa", "eager"])), draw(st.integers(0, 2 ** 16))


def build(remote_classes, cfg, attn, seed):
    model_cls, config_cls = remote_classes
    config = config_cls(**cfg)
    config._attn_implementation = attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(config)
    model.load_state_dict(random_state_dict(model, seed=seed, std=0.3))
    return model.eval()


@st.composite
def padded_batches(draw, vocab):
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 7), min_size=batch, max_size=batch))
    width = max(lengths) + draw(st.integers(0, 2))
    ids = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=width, max_size=width),
                        min_size=batch, max_size=batch))
    ids = torch.tensor(ids)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids, mask  # the ids under padding are random on purpose: they must not matter


@FUZZ
@given(spec=tiny_configs(), data=st.data())
def test_random_configs_and_padded_batches(remote_classes, spec, data):
    cfg, attn, seed = spec
    note(f"config={cfg} attn={attn} seed={seed}")
    model = build(remote_classes, cfg, attn, seed)
    ids, mask = data.draw(padded_batches(cfg["padded_vocab_size"]))
    note(f"ids={ids.tolist()} mask={mask.tolist()}")
    batch, width = ids.shape
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = model(ids, attention_mask=mask, use_cache=False).logits
        assert full.shape == (batch, width, cfg["padded_vocab_size"])
        assert torch.isfinite(full).all()

        # each row alone (no padding, positions 0..n-1) equals its real positions in the padded batch
        for row in range(batch):
            start = int((mask[row] == 0).sum())
            alone = model(ids[row:row + 1, start:], use_cache=False).logits
            torch.testing.assert_close(full[row, start:], alone[0], atol=ATOL, rtol=0)

        # prefill k tokens, then decode one token at a time with the returned cache == the uncached forward
        k = data.draw(st.integers(1, width), label="prefill")
        prefill = model(ids[:, :k], attention_mask=mask[:, :k], use_cache=True)
        real = mask[:, :k].bool()
        torch.testing.assert_close(prefill.logits[real], full[:, :k][real], atol=ATOL, rtol=0)
        cache = cache_of(prefill)
        assert cache is not None
        for t in range(k, width):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            cache = cache_of(out)
            real = mask[:, t].bool()
            torch.testing.assert_close(out.logits[real, -1], full[real, t], atol=ATOL, rtol=0)
        assert cache.get_seq_length() == width + (cfg["pre_seq_len"] or 0)


def _first_divergence_is_a_near_tie(a, b, scores_a, prompt_len, tol=1e-3):
    """Greedy runs may only diverge where the top two scores were within ``tol`` (float noise, not a bug)."""
    diff = (a != b).any(0).nonzero()
    if not len(diff):
        return True
    step = int(diff[0]) - prompt_len
    top2 = scores_a[step].float().topk(2, dim=-1).values
    return bool(((top2[:, 0] - top2[:, 1]) < tol).any())


@FUZZ
@given(spec=tiny_configs(), data=st.data())
def test_generate_cache_on_off_equal(remote_classes, spec, data):
    cfg, attn, seed = spec
    cfg = dict(cfg, eos_token_id=None)  # never stop early: compare full runs
    model = build(remote_classes, cfg, attn, seed)
    ids, mask = data.draw(padded_batches(cfg["padded_vocab_size"]))
    note(f"config={cfg} attn={attn} ids={ids.tolist()} mask={mask.tolist()}")
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (ids.shape[0], ids.shape[1] + 4)
    assert all(torch.isfinite(s).all() for s in cached.scores)
    if torch.equal(cached.sequences, uncached.sequences):
        # The two runs use different SDPA kernels (one query vs a masked prefill); with these large random weights
        # float32 noise reaches ~7e-5 of the logits' size, so the tolerance has a relative part too.
        for a, b in zip(cached.scores, uncached.scores):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    else:
        assert _first_divergence_is_a_near_tie(cached.sequences, uncached.sequences, cached.scores, ids.shape[1])


# ---------------------------------------------------------------------------------------------------------------------
# Hostile tensors: a clear error or finite output
# ---------------------------------------------------------------------------------------------------------------------
DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32, torch.float16]


@st.composite
def hostile_tensor(draw, batch, seq, allow_none=True):
    if allow_none and draw(st.booleans()):
        return None
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(batch, seq), (batch, seq), (batch, seq + 1), (batch + 1, seq), (seq,),
                                  (batch, 0), (batch, seq, 1)]))
    low, high = draw(st.sampled_from([(0, 1), (0, 1), (0, 127), (-3, 3), (100, 10 ** 6)]))
    values = torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if dtype == torch.uint8:
        values = values.clamp(0, 255)
    return values.to(dtype)


@FUZZ
@given(data=st.data())
def test_hostile_tensors_give_clear_errors_or_finite_output(tiny_model, data):
    batch, seq = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    ids = data.draw(hostile_tensor(batch, seq, allow_none=False), label="input_ids")
    mask = data.draw(hostile_tensor(batch, seq), label="attention_mask")
    positions = data.draw(hostile_tensor(batch, seq), label="position_ids")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    except (ValueError, TypeError) as err:
        assert str(err).strip()
        assert any(name in str(err) for name in ("input_ids", "attention_mask", "position_ids", "empty", "token id"))
        return
    assert torch.isfinite(logits).all()
    assert logits.shape[-1] == TINY_CONFIG["padded_vocab_size"]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer: random Unicode never crashes encode/decode
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["slow", "fast"])
def tokenizer(request, tmp_path_factory):
    from transformers import AutoTokenizer

    if not (REPO / "tokenization_chatglm.py").exists():
        pytest.skip("tokenization_chatglm.py does not exist yet")
    model_file = SHARED_REFERENCE / "tokenizer.model"
    if not model_file.exists():
        pytest.skip("no published tokenizer.model in ../shared/reference")
    folder = tmp_path_factory.mktemp("tok")
    for name in ("tokenization_chatglm.py", "tokenizer_config.json"):
        if (REPO / name).exists():
            shutil.copyfile(REPO / name, folder / name)
    shutil.copyfile(model_file, folder / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=request.param)
    if request.param and not getattr(tok, "is_fast", False):
        pytest.skip("no fast tokenizer with this transformers")
    return tok


SPECIALS = ["[gMASK]", "sop", "eop", "[MASK]", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "</s>",
            "<unk>", "<s>", "\u2581", "\ufffd", "\x00", "\ufdd0", "\ufdd1", "\r\n", "\t", "  "]
TEXTS = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS),
                           st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=5),
                           st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=8)),
                 max_size=6).map("".join)


@FUZZ
@given(text=TEXTS, pair=st.one_of(st.none(), TEXTS), special=st.booleans())
def test_tokenizer_encode_decode_never_crashes(tokenizer, text, pair, special):
    enc = tokenizer(text, pair) if pair is not None else tokenizer(text)
    ids = enc["input_ids"]
    assert ids and all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids)
    assert len(enc["attention_mask"]) == len(ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=special)
    assert isinstance(decoded, str)
    assert isinstance(tokenizer.convert_ids_to_tokens(ids), list)
    batch = tokenizer([text, "x"], padding=True)
    assert len(batch["input_ids"][0]) == len(batch["input_ids"][1])


@FUZZ
@given(ids=st.lists(st.integers(-5, 70000), max_size=20))
def test_tokenizer_decode_of_arbitrary_ids_is_clear(tokenizer, ids):
    """Decoding any id list gives a str or a clear error for ids outside the vocabulary (never a crash)."""
    try:
        text = tokenizer.decode(ids)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        assert str(err).strip()
        return
    assert isinstance(text, str)
    if all(0 <= i < len(tokenizer) for i in ids):
        assert isinstance(tokenizer.decode(ids, skip_special_tokens=True), str)
