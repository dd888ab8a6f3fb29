"""masks.py and generation.py: the input checks every forward and generate() runs (hostile ids, masks, positions,
caches: a clear ``ValueError`` that names the problem, or documented correct behaviour -- never a hang, silent
garbage or a harmed model), what attention masks mean (padding, all-zero rows, dtypes, prompts past
``seq_length``), and generate()'s life cycle (interrupts, threads, caches). Property-based with hypothesis (the
default profile in conftest.py; ``HYPOTHESIS_PROFILE=long`` for 500 examples): random tiny configs x random left-padded
batches x cache on/off, and random hostile tensors. Models built in-process from the remote classes (loaded once
through trust_remote_code) or the session's ``tiny_model``.

Documented behaviour decided here:
* ``max_new_tokens=0`` (or negative) -> ``ValueError`` on every supported transformers version.
* a prompt longer than ``config.seq_length`` works (rotary angles are exact) with ONE warning per process.
* ``position_ids`` beyond ``seq_length`` work, with that same warning; negative ones are a ``ValueError``.
* an ``attention_mask`` row of all zeros gives finite output for that row and leaves the other rows unchanged.
"""
import logging
import re
import threading
import warnings

import pytest
import torch

from support import TINY_CONFIG, cache_of, load_model, make_model_dir, random_state_dict

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VOCAB = TINY_CONFIG["padded_vocab_size"]
FUZZ = settings(suppress_health_check=list(HealthCheck), deadline=None)
ATOL = 1e-4


def gen(model, ids, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("max_new_tokens", 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, **kw)


PROMPT = torch.tensor([[5, 17, 33, 9, 64, 2 + 1]])


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Logits and a greedy continuation of a fresh model, to check that a model survived a fault unharmed."""
    fresh = load_model(tiny_dir)
    with torch.no_grad():
        logits = fresh(PROMPT).logits
    return {"logits": logits, "tokens": gen(fresh, PROMPT, max_new_tokens=8)}


def assert_unharmed(model, reference):
    assert not model.training
    assert torch.is_grad_enabled()
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, reference["logits"], atol=0, rtol=0)
    assert torch.equal(gen(model, PROMPT, max_new_tokens=8), reference["tokens"])


# =====================================================================================================================
# 1. Hostile forward() inputs
# =====================================================================================================================
IDS = torch.tensor([[5, 6, 7, 8]])


def _past_tuple():
    k = torch.zeros(1, 2, 3, 16)
    return tuple((k, k) for _ in range(TINY_CONFIG["num_layers"]))


# (id, kwargs builder, expected exception types, regex the message must match, marks)
FORWARD_CASES = [
    ("ids-equal-vocab", lambda: dict(input_ids=torch.tensor([[1, VOCAB]])), ValueError, rf"{VOCAB}\b.*{VOCAB}", ()),
    ("ids-huge", lambda: dict(input_ids=torch.tensor([[1, 2 ** 40]])), ValueError, rf"{2 ** 40}.*{VOCAB}", ()),
    ("ids-negative", lambda: dict(input_ids=torch.tensor([[-1, 3]])), ValueError, rf"-1\b.*{VOCAB}", ()),
    ("ids-int64-min", lambda: dict(input_ids=torch.tensor([[-(2 ** 63), 3]])), ValueError, rf"{-(2 ** 63)}", ()),
    ("ids-float", lambda: dict(input_ids=torch.tensor([[1.0, 2.0]])), ValueError, "integer|dtype", ()),
    ("ids-float-nan", lambda: dict(input_ids=torch.tensor([[float("nan"), 2.0]])), ValueError, "integer|dtype", ()),
    ("ids-bool", lambda: dict(input_ids=torch.tensor([[True, False]])), ValueError, "integer|dtype", ()),
    ("ids-complex", lambda: dict(input_ids=torch.tensor([[1 + 0j]])), ValueError, "integer|dtype", ()),
    ("ids-python-list", lambda: dict(input_ids=[[1, 2, 3]]), (ValueError, TypeError), "input_ids",
     ()),
    ("ids-1d", lambda: dict(input_ids=torch.tensor([1, 2, 3])), ValueError, r"input_ids.*shape", ()),
    ("ids-3d", lambda: dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), ValueError, r"input_ids.*shape", ()),
    ("empty-batch", lambda: dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), ValueError, "empty", ()),
    ("empty-seq", lambda: dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty", ()),
    ("empty-both", lambda: dict(input_ids=torch.zeros(0, 0, dtype=torch.long)), ValueError, "empty", ()),
    ("no-input", lambda: dict(), ValueError, "input_ids.*inputs_embeds", ()),
    ("ids-and-embeds", lambda: dict(input_ids=IDS, inputs_embeds=torch.zeros(1, 4, 64)), ValueError,
     "input_ids.*inputs_embeds", ()),
    ("embeds-2d", lambda: dict(inputs_embeds=torch.zeros(4, 64)), ValueError, "inputs_embeds", ()),
    ("embeds-float64", lambda: dict(inputs_embeds=torch.zeros(1, 4, 64, dtype=torch.float64)), ValueError,
     "dtype", ()),
    ("mask-short", lambda: dict(input_ids=IDS, attention_mask=torch.ones(1, 3, dtype=torch.long)), ValueError,
     "attention_mask", ()),
    ("mask-long-without-past", lambda: dict(input_ids=IDS, attention_mask=torch.ones(1, 5, dtype=torch.long)),
     ValueError, "attention_mask", ()),
    ("mask-batch", lambda: dict(input_ids=IDS, attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError,
     "attention_mask", ()),
    ("mask-1d", lambda: dict(input_ids=IDS, attention_mask=torch.ones(4, dtype=torch.long)), ValueError,
     "attention_mask", ()),
    ("mask-4d", lambda: dict(input_ids=IDS, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.long)), ValueError,
     "attention_mask", ()),
    ("mask-value-2", lambda: dict(input_ids=IDS, attention_mask=torch.tensor([[1, 2, 1, 1]])), ValueError,
     "attention_mask.*2", ()),
    ("mask-value-negative", lambda: dict(input_ids=IDS, attention_mask=torch.tensor([[1, -1, 1, 1]])), ValueError,
     "attention_mask", ()),
    ("mask-value-half", lambda: dict(input_ids=IDS, attention_mask=torch.tensor([[1.0, 0.5, 1.0, 1.0]])),
     ValueError, "attention_mask", ()),
    ("mask-python-list", lambda: dict(input_ids=IDS, attention_mask=[[1, 1, 1, 1]]), (ValueError, TypeError),
     "attention_mask", ()),
    ("positions-negative", lambda: dict(input_ids=IDS, position_ids=torch.tensor([[-1, 0, 1, 2]])), ValueError,
     r"position_ids.*-1", ()),
    ("positions-float", lambda: dict(input_ids=IDS, position_ids=torch.tensor([[0.0, 1.5, 2.0, 3.0]])),
     ValueError, "position_ids", ()),
    ("positions-long", lambda: dict(input_ids=IDS, position_ids=torch.arange(5)[None]), ValueError,
     "position_ids", ()),
    ("positions-short", lambda: dict(input_ids=IDS, position_ids=torch.arange(3)[None]), ValueError,
     "position_ids", ()),
    ("positions-batch", lambda: dict(input_ids=IDS, position_ids=torch.arange(4)[None].repeat(3, 1)), ValueError,
     "position_ids", ()),
    ("positions-1d", lambda: dict(input_ids=IDS, position_ids=torch.arange(4)), ValueError, "position_ids", ()),
    ("past-legacy-tuple", lambda: dict(input_ids=IDS, past_key_values=_past_tuple()), ValueError,
     "Cache|tuple", ()),
    ("labels-shape", lambda: dict(input_ids=IDS, labels=torch.ones(1, 3, dtype=torch.long)), ValueError,
     "labels", ()),
]


@pytest.mark.parametrize(
    "build,exc,match", [pytest.param(b, e, m, id=i, marks=marks) for i, b, e, m, marks in FORWARD_CASES])
def test_hostile_forward_inputs(tiny_model, reference, build, exc, match):
    with torch.no_grad(), pytest.raises(exc, match=match):
        tiny_model(**build())
    assert_unharmed(tiny_model, reference)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_small_integer_id_dtypes_work(tiny_model, dtype):
    """Any integer dtype that can hold the ids gives the int64 result (or, at least, a ValueError naming it)."""
    ids = torch.tensor([[5, 6, 7, 100]])
    with torch.no_grad():
        expected = tiny_model(ids).logits
        try:
            got = tiny_model(ids.to(dtype)).logits
        except ValueError as err:
            assert str(dtype) in str(err)
            return
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32, torch.float16])
def test_attention_mask_dtypes_equivalent(tiny_model, dtype):
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = tiny_model(ids, attention_mask=mask).logits
        got = tiny_model(ids, attention_mask=mask.to(dtype)).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


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


# =====================================================================================================================
# 2. Hostile generate() inputs
# =====================================================================================================================
GENERATE_CASES = [
    ("ids-out-of-range", lambda: dict(inputs=torch.tensor([[1, VOCAB + 5]])), ValueError, str(VOCAB + 5), ()),
    ("ids-negative", lambda: dict(inputs=torch.tensor([[-7, 1]])), ValueError, "-7", ()),
    ("ids-float", lambda: dict(inputs=torch.tensor([[1.0, 2.0]])), ValueError, "integer|dtype|float|Float", ()),
    ("empty-seq", lambda: dict(inputs=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty|prompt", ()),
    ("empty-batch", lambda: dict(inputs=torch.zeros(0, 3, dtype=torch.long)), ValueError, "empty|prompt", ()),
    ("mask-shape-padded", lambda: dict(inputs=IDS, attention_mask=torch.tensor([[0, 1, 1]])), ValueError,
     "attention_mask", ()),
    ("mask-shape-all-ones", lambda: dict(inputs=IDS, attention_mask=torch.ones(1, 3, dtype=torch.long)), ValueError,
     "attention_mask", ()),
    ("mask-values", lambda: dict(inputs=IDS, attention_mask=torch.tensor([[1, 1, 2, 1]])), ValueError,
     "attention_mask", ()),
    ("positions-float", lambda: dict(inputs=IDS, position_ids=torch.tensor([[0.0, 1.0, 2.5, 3.0]])), ValueError,
     "position_ids", ()),
    ("max-new-tokens-negative", lambda: dict(inputs=IDS, max_new_tokens=-1), ValueError, "max_new_tokens", ()),
]


@pytest.mark.parametrize(
    "build,exc,match", [pytest.param(b, e, m, id=i, marks=marks) for i, b, e, m, marks in GENERATE_CASES])
def test_hostile_generate_inputs(tiny_model, reference, build, exc, match):
    kwargs = build()
    ids = kwargs.pop("inputs")
    kwargs.setdefault("max_new_tokens", 3)
    try:
        out = gen(tiny_model, ids, **kwargs)
    except exc as err:
        assert err.args and re.search(match, str(err)), err
    else:
        pytest.fail(f"DID NOT RAISE {exc}: output {out.tolist()}")
    assert_unharmed(tiny_model, reference)


def test_max_new_tokens_zero_is_a_value_error(tiny_model):
    """Documented behaviour: ``max_new_tokens=0`` is a ValueError (what transformers >= 4.3x do), on every version."""
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen(tiny_model, IDS, max_new_tokens=0)


# =====================================================================================================================
# 3. Masks, padding, long prompts, positions
# =====================================================================================================================
def test_all_zero_mask_row_is_finite_and_isolated(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 14, 15], [0, 0, 21, 22, 23]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        full = tiny_model(ids, attention_mask=mask).logits
        without = tiny_model(ids[[0, 2]], attention_mask=mask[[0, 2]]).logits
        alone = tiny_model(ids[1:2], attention_mask=mask[1:2]).logits
        all_zero = tiny_model(ids, attention_mask=torch.zeros_like(mask)).logits
    assert torch.isfinite(full).all() and torch.isfinite(all_zero).all()
    torch.testing.assert_close(full[[0, 2]], without, atol=1e-5, rtol=0)
    torch.testing.assert_close(full[1], alone[0], atol=1e-5, rtol=0)  # defined: independent of the batch

    out = gen(tiny_model, ids, attention_mask=mask, max_new_tokens=4)
    ref = gen(tiny_model, ids[[0, 2]], attention_mask=mask[[0, 2]], max_new_tokens=4)
    assert torch.equal(out[[0, 2]], ref)
    assert ((out[1, 5:] >= 0) & (out[1, 5:] < VOCAB)).all()


def test_empty_and_whitespace_strings_through_tokenizer(tiny_model, real_fast):
    tok = real_fast  # the published vocabulary
    for text in ["", " ", "\n", "\t \n"]:
        enc = tok([text], return_tensors="pt")
        assert enc["input_ids"].shape[1] >= 1  # the [gMASK] sop prefix is always there
        ids = enc["input_ids"] % VOCAB  # the tiny model has a small vocabulary
        out = gen(tiny_model, ids, attention_mask=enc["attention_mask"], max_new_tokens=2)
        assert out.shape == (1, ids.shape[1] + 2)
    batch = tok(["", "hello world", " "], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[0] == 3
    assert tok.decode([]) == ""


def _forget_warnings_given():
    """transformers' ``logger.warning_once`` (which the model uses) remembers what it said in an ``lru_cache``."""
    logging.Logger.warning_once.cache_clear()


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    return load_model(make_model_dir(tmp_path_factory.mktemp("short"), seq_length=16))


def _seq_warnings(caplog):
    return [r for r in caplog.records if "seq_length" in r.getMessage()]


def test_prompt_longer_than_seq_length_works_with_one_warning(short_model, caplog):
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    _forget_warnings_given()
    caplog.set_level(logging.WARNING)
    out = gen(short_model, ids, max_new_tokens=6)
    assert out.shape == (2, 26)
    with torch.no_grad():
        logits = short_model(out).logits
    assert torch.isfinite(logits).all()
    assert len(_seq_warnings(caplog)) == 1, [r.getMessage() for r in _seq_warnings(caplog)]
    # cached generation agrees with a full uncached forward at positions beyond seq_length
    uncached = gen(short_model, ids, max_new_tokens=6, use_cache=False)
    assert torch.equal(out, uncached)


def test_position_ids_beyond_seq_length_work_with_warning(short_model, caplog):
    _forget_warnings_given()
    caplog.set_level(logging.WARNING)
    with torch.no_grad():
        out = short_model(IDS, position_ids=torch.tensor([[100, 101, 102, 103]])).logits
    assert torch.isfinite(out).all()
    assert len(_seq_warnings(caplog)) == 1, [r.getMessage() for r in _seq_warnings(caplog)]


# =====================================================================================================================
# 4. Random configs x random padded batches x cache on/off (hypothesis)
# =====================================================================================================================
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


# =====================================================================================================================
# 5. Faults during generation leave the model reusable; thread safety; caches
# =====================================================================================================================
def test_stopping_criteria_interrupt_leaves_model_reusable(tiny_model, reference):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.calls = 0
            self.n = n

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return self.calls >= self.n

    out = gen(tiny_model, PROMPT, max_new_tokens=8, stopping_criteria=StoppingCriteriaList([StopAfter(2)]))
    assert out.shape[1] == PROMPT.shape[1] + 2
    assert torch.equal(out, reference["tokens"][:, : out.shape[1]])
    assert_unharmed(tiny_model, reference)


@pytest.mark.parametrize("where", ["logits_processor", "streamer"])
def test_keyboard_interrupt_during_generate_leaves_model_reusable(tiny_model, reference, where):
    from transformers import LogitsProcessor, LogitsProcessorList

    class Boom:
        def __init__(self):
            self.calls = 0

        def hit(self):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt

    class Processor(LogitsProcessor, Boom):
        def __call__(self, input_ids, scores):
            self.hit()
            return scores

    class Streamer(Boom):
        def put(self, value):
            self.hit()

        def end(self):
            pass

    kwargs = ({"logits_processor": LogitsProcessorList([Processor()])} if where == "logits_processor"
              else {"streamer": Streamer()})
    with pytest.raises(KeyboardInterrupt):
        gen(tiny_model, PROMPT, max_new_tokens=8, **kwargs)
    assert_unharmed(tiny_model, reference)


def test_concurrent_generate_equals_sequential(tiny_model):
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    prompts = [torch.randint(3, VOCAB, (1 + i % 2, 5 + i), generator=g) for i, g in enumerate(gens)]
    sequential = [gen(tiny_model, p, max_new_tokens=8) for p in prompts]
    results, errors = {}, []

    def worker(i):
        try:
            for r in range(3):
                results[(i, r)] = gen(tiny_model, prompts[i], max_new_tokens=8)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "generate hung in a thread"
    assert not errors, errors
    for (i, _), out in results.items():
        assert torch.equal(out, sequential[i]), i


def test_cache_object_reuse_across_calls_is_not_shared(tiny_model):
    """Two independent forward passes never share state through a default cache."""
    with torch.no_grad():
        a = tiny_model(PROMPT, use_cache=True)
        b = tiny_model(PROMPT, use_cache=True)
    assert cache_of(a) is not cache_of(b)
    assert cache_of(a).get_seq_length() == cache_of(b).get_seq_length() == PROMPT.shape[1]
