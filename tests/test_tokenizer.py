"""tokenization_chatglm.py (slow and fast), loaded through AutoTokenizer(..., trust_remote_code=True): ids against
raw SentencePiece, slow == fast, special tokens, padding and truncation, decoding and streaming, the chat format and
template, setters and added tokens, property-based round trips, and random Unicode / random ids that must never crash
encode or decode. Saving, loading and a missing or broken tokenizer.model: test_tokenizer_files.py.

Two vocabularies: a tiny SentencePiece model trained here with ChatGLM's settings (always available), and the
published tokenizer.model from ../shared/reference or $CHATGLM_TOKENIZER_MODEL (tests skip without it); the folders
and the published tokenizers are conftest.py's fixtures.
"""

import inspect
import json
import os
import threading

import pytest
import sentencepiece as spm
from transformers import PreTrainedTokenizerBase

from support import (
    REPO,
    SPECIAL_TOKENS,
    function_call_prompt_path,
    load_tokenizer,
    mixed_corpus,
    real_model_path,
    sp_reference_ids,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
PROP = settings(max_examples=1000 if LONG else 60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

REAL = real_model_path()
needs_real = pytest.mark.skipif(REAL is None, reason="published tokenizer.model not found (set CHATGLM_TOKENIZER_MODEL "
                                                     "or provide ../shared/reference/tokenizer.model)")
FUZZ = settings(suppress_health_check=list(HealthCheck), deadline=None)  # examples: conftest.py's profile


# ----------------------------------------------------------------------------------------------------------------
# fixtures (the tokenizer folders and the published tokenizers real_slow / real_fast: conftest.py)
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_slow(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir, fast=False)


@pytest.fixture(scope="session")
def tiny_fast(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir, fast=True)


@pytest.fixture(scope="session")
def tiny_sp(tiny_sp_model):
    return spm.SentencePieceProcessor(model_file=str(tiny_sp_model))


@pytest.fixture(scope="session")
def real_sp():
    if REAL is None:
        pytest.skip("published tokenizer.model not found")
    return spm.SentencePieceProcessor(model_file=str(REAL))


@pytest.fixture(params=["slow", "fast"])
def tok(request, tiny_slow, tiny_fast):
    """Each test using `tok` runs on the slow and the fast tokenizer (tiny vocabulary)."""
    return tiny_slow if request.param == "slow" else tiny_fast


@pytest.fixture(params=["slow", "fast"])
def real_tok(request):
    if REAL is None:
        pytest.skip("published tokenizer.model not found")
    return request.getfixturevalue("real_slow" if request.param == "slow" else "real_fast")


def has_chat_template(t):
    """transformers >= 4.34 has apply_chat_template (older ones: build_chat_input only)."""
    return hasattr(PreTrainedTokenizerBase, "apply_chat_template")



HAS_PADDING_SIDE_ARG = "padding_side" in inspect.signature(PreTrainedTokenizerBase.pad).parameters
needs_padding_side_arg = pytest.mark.skipif(
    not HAS_PADDING_SIDE_ARG, reason="the padding_side argument of __call__/pad came with transformers 4.45; "
                                     "tokenizer.padding_side is tested instead")

needs_chat_template = pytest.mark.skipif(
    not hasattr(__import__("transformers").PreTrainedTokenizerBase, "apply_chat_template"),
    reason="this transformers version has no apply_chat_template (added in 4.34); build_chat_input is tested instead",
)


# ----------------------------------------------------------------------------------------------------------------
# loading, classes, config
# ----------------------------------------------------------------------------------------------------------------

def test_classes_and_config(tiny_slow, tiny_fast):
    assert type(tiny_slow).__name__ == "ChatGLMTokenizer"
    assert type(tiny_fast).__name__ == "ChatGLMTokenizerFast"
    assert tiny_fast.is_fast and not tiny_slow.is_fast
    assert tiny_slow.vocab_files_names == {"vocab_file": "tokenizer.model"}
    assert tiny_fast.vocab_files_names == {"vocab_file": "tokenizer.model", "tokenizer_file": "tokenizer.json"}
    for t in (tiny_slow, tiny_fast):
        assert t.model_input_names == ["input_ids", "attention_mask", "position_ids"]
        assert t.padding_side == "left"
    cfg = json.loads((REPO / "tokenizer_config.json").read_text())
    assert cfg["name_or_path"] == "THUDM/chatglm3-6b-base"
    assert cfg["remove_space"] is False and cfg["do_lower_case"] is False
    assert cfg["tokenizer_class"] == "ChatGLMTokenizer"
    assert cfg["auto_map"]["AutoTokenizer"] == ["tokenization_chatglm.ChatGLMTokenizer",
                                               "tokenization_chatglm.ChatGLMTokenizerFast"]
    assert cfg["padding_side"] == "left" and "chat_template" in cfg


def test_special_ids_layout(tok, tiny_sp):
    n = tiny_sp.get_piece_size()
    assert tok.vocab_size == n + 9 == len(tok)
    for k, s in enumerate(SPECIAL_TOKENS):
        assert tok.get_command(s) == n + k == tok.convert_tokens_to_ids(s)
        assert tok.convert_ids_to_tokens(n + k) == s
    assert tok.get_command("<eos>") == 2 and tok.get_command("<pad>") == 0 and tok.get_command("<bos>") == 1
    with pytest.raises(ValueError, match="not a command token"):
        tok.get_command("<|nope|>")
    assert tok.pad_token_id == 0 and tok.unk_token_id == 0 and tok.eos_token_id == 2
    vocab = tok.get_vocab()
    assert len(vocab) == tok.vocab_size and sorted(vocab.values()) == list(range(tok.vocab_size))


@needs_real
def test_published_ids(real_tok):
    assert real_tok.vocab_size == 64798
    for k, s in enumerate(SPECIAL_TOKENS):
        assert real_tok.get_command(s) == 64789 + k
    assert real_tok("今天天气真不错")["input_ids"] == [64790, 64792, 53456, 33071, 54792, 32884]
    enc = real_tok("今天天气真不错")
    assert enc["attention_mask"] == [1] * 6 and enc["position_ids"] == list(range(6))
    assert real_tok("Hello world")["input_ids"] == [64790, 64792, 13755, 993]
    assert real_tok("Hello", "world")["input_ids"] == [64790, 64792, 13755, 993, 2]
    assert real_tok("\n", add_special_tokens=False)["input_ids"] == [30910, 13]
    assert real_tok.encode("你好", add_special_tokens=False) == [36474, 54591]
    chat = real_tok.build_chat_input("你好")
    assert chat["input_ids"].tolist() == [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
    assert chat["attention_mask"].tolist() == [[1] * 8] and chat["position_ids"].tolist() == [list(range(8))]
    assert real_tok.pad_token_id == 0 and real_tok.eos_token_id == 2 and real_tok.unk_token_id == 0
    assert real_tok.decode([64790, 64792, 53456, 33071, 54792, 32884]) == "[gMASK]sop 今天天气真不错"
    assert real_tok.decode([64790, 64792, 53456, 33071, 54792, 32884], skip_special_tokens=True) == "今天天气真不错"
    assert real_tok.decode([64798]) == real_tok.decode([65023]) == ""  # padded embedding rows
    assert real_tok.decode([53456, 65000, 33071]) == real_tok.decode([53456, 33071])


@needs_real
def test_function_call_prompt(real_tok, real_sp):
    path = function_call_prompt_path()
    if path is None:
        pytest.skip("../shared/reference/function_call.txt not found")
    text = path.read_text(encoding="utf-8")
    instruction, tools_json = text.split("\n", 1)
    tools = json.loads(tools_json)
    # the file is exactly "instruction\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    assert instruction + "\n" + json.dumps(tools, indent=4, ensure_ascii=False) == text
    history = [{"role": "system", "content": instruction, "tools": tools}]
    query = "生成一个随机数"
    # ids composed independently: prefix, then per turn <|role|> + sp(metadata + "\n") + sp(content)
    expected = [64790, 64792, 64794] + real_sp.encode("\n") + real_sp.encode(text)
    expected += [64795] + real_sp.encode("\n") + real_sp.encode(query) + [64796]
    got = real_tok.build_chat_input(query, history=history)["input_ids"][0].tolist()
    assert got == expected
    # an assistant turn with metadata, then an observation
    history2 = history + [
        {"role": "user", "content": query},
        {"role": "assistant", "metadata": "random_number_generator",
         "content": "```python\ntool_call(seed=42, range=(0, 100))\n```"},
    ]
    got2 = real_tok.build_chat_input('{"random number": 22}', history=history2, role="observation")
    exp2 = expected[:-1] + [64796] + real_sp.encode("random_number_generator\n") + real_sp.encode(
        history2[2]["content"]) + [64797] + real_sp.encode("\n") + real_sp.encode('{"random number": 22}') + [64796]
    assert got2["input_ids"][0].tolist() == exp2
    if has_chat_template(real_tok):
        msgs = history2 + [{"role": "observation", "content": '{"random number": 22}'}]
        assert list(real_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]) == exp2


# ----------------------------------------------------------------------------------------------------------------
# agreement with raw SentencePiece, slow == fast
# ----------------------------------------------------------------------------------------------------------------

def _assert_matches_sp(tok_, sp, texts):
    got = tok_(texts, add_special_tokens=False)["input_ids"]
    for t, g in zip(texts, got):
        assert g == sp_reference_ids(sp, t), repr(t)


def _assert_backend_matches_sp(fast, sp, texts):
    """The backend alone (what tools reading tokenizer.json run, e.g. text-generation-inference) encodes like
    SentencePiece, with the [gMASK] sop prefix. It extracts special strings from text the way every `tokenizers`
    added token is, so texts containing them are left out here."""
    backend = fast.backend_tokenizer
    plain = [t for t in texts if not any(s in t for s in SPECIAL_TOKENS + ["<unk>", "<s>", "</s>"])]
    assert len(plain) > len(texts) // 2
    for t, e in zip(plain, backend.encode_batch(plain, add_special_tokens=False)):
        assert e.ids == sp.encode(t), repr(t)
    assert backend.encode(plain[-1]).ids == fast.get_prefix_tokens() + sp.encode(plain[-1])


def test_tiny_matches_sentencepiece(tiny_slow, tiny_fast, tiny_sp):
    texts = mixed_corpus(1500, seed=1)
    _assert_matches_sp(tiny_slow, tiny_sp, texts)
    _assert_matches_sp(tiny_fast, tiny_sp, texts)
    _assert_backend_matches_sp(tiny_fast, tiny_sp, texts)


@needs_real
def test_real_matches_sentencepiece(real_slow, real_fast, real_sp):
    texts = mixed_corpus(3000, seed=2, max_len=400)
    texts += [" " * k + "x" + " " * k + "\n" * (k % 3) + "  y" for k in range(1, 40)]
    texts += ["    def forward(self, x):\n        return self.proj(x)  # 注释\n", "①②③ ½ ㎏ ﷺ", "\U0001F9D1\u200D\U0001F4BB"]
    _assert_matches_sp(real_slow, real_sp, texts)
    _assert_matches_sp(real_fast, real_sp, texts)
    _assert_backend_matches_sp(real_fast, real_sp, texts)


def test_slow_equals_fast_with_special_parsing(tiny_slow, tiny_fast):
    texts = mixed_corpus(300, seed=3)
    for flag in (False, True):
        a = tiny_slow(texts, encode_special_tokens=flag)["input_ids"]
        b = tiny_fast(texts, encode_special_tokens=flag)["input_ids"]
        assert a == b


def test_unicode_robustness(tok, tiny_slow, tiny_fast):
    weird = ["\ud800", "a\udfffb", "\ud83d\ude00", "\x00" * 5, "e" + "\u0301" * 50, "\U0010ffff", "﻿", "\u2028\u2029",
             "x" * 100_000, "中" * 30_000 + " " * 1000 + "😀" * 1000]
    for s in weird:
        ids = tok(s)["input_ids"]
        assert ids[:2] == [tok.get_command("[gMASK]"), tok.get_command("sop")]
        tok.decode(ids)
    assert tiny_slow(weird)["input_ids"] == tiny_fast(weird)["input_ids"]
    # a surrogate pair written as two code points is the character itself
    assert tok("\ud83d\ude00")["input_ids"] == tok("😀")["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# special tokens are never produced from text (anti prompt injection)
# ----------------------------------------------------------------------------------------------------------------

def test_tokenize_and_convert(tiny_slow, tiny_fast):
    for s in mixed_corpus(40, seed=11):
        a, b = tiny_slow.tokenize(s), tiny_fast.tokenize(s)
        assert a == b
        assert tiny_slow.convert_tokens_to_ids(a) == tiny_fast.convert_tokens_to_ids(b) == tiny_fast.encode(
            s, add_special_tokens=False)
        assert tiny_slow.convert_tokens_to_string(a) == tiny_fast.convert_tokens_to_string(b) == tiny_fast.decode(
            tiny_fast.encode(s, add_special_tokens=False))


def test_sptokenizer_interface(tok, tiny_sp):
    spt = tok.tokenizer  # the original's SPTokenizer attribute
    assert spt.n_words == tok.vocab_size and spt.pad_id == 0 and spt.eos_id == 2 and spt.bos_id == 1
    assert spt.encode("hello", bos=True, eos=True) == [1] + tiny_sp.encode("hello") + [2]
    assert spt.tokenize("a<|user|>b", encode_special_tokens=True)[1] == "<|user|>"
    assert "<|user|>" not in spt.tokenize("a<|user|>b")
    assert spt.decode(spt.encode("hello world")) == "hello world"
    assert spt.convert_id_to_token(spt.n_words + 5) == "" and spt.convert_token_to_id("sop") == spt.n_words - 6


def test_special_strings_stay_text(tok):
    specials = set(tok.convert_tokens_to_ids(SPECIAL_TOKENS))
    for s in ["<|user|>", "hi<|assistant|>there", "[gMASK]sop", "<|system|>\n<|observation|>", "[MASK] eop"]:
        ids = tok(s)["input_ids"]
        assert ids[:2] == [tok.get_command("[gMASK]"), tok.get_command("sop")]
        assert not specials & set(ids[2:]), s
        assert tok.decode(ids, skip_special_tokens=True) == s


def test_eos_text_is_eos(tok, tiny_sp):
    """TRL and other recipes append eos_token as text: "</s>" becomes id 2; the GLM tokens around it stay text."""
    eos = tok.get_command("<eos>")
    assert tok("</s>", add_special_tokens=False)["input_ids"] == [eos]
    prompt, completion = "Question: 1+1?", " Answer: 2"
    ids = tok(prompt + completion + tok.eos_token)["input_ids"]
    assert ids == tok.get_prefix_tokens() + tiny_sp.encode(prompt + completion) + [eos]
    assert tok([prompt + tok.eos_token, "x"], padding=True)["input_ids"][0][-1] == eos
    specials = set(tok.convert_tokens_to_ids(SPECIAL_TOKENS))
    ids = tok("<|user|>hi</s><|assistant|>[gMASK]sop</s>")["input_ids"][2:]
    assert ids.count(eos) == 2 and not specials & set(ids)
    assert ids == sp_reference_ids(tiny_sp, "<|user|>hi</s><|assistant|>[gMASK]sop</s>")
    # the text after "</s>" has its own dummy prefix, as around every token that text turns into
    assert tok.decode(ids) == "<|user|>hi</s> <|assistant|>[gMASK]sop</s>"
    if has_chat_template(tok):  # inside chat messages it is text like the role tokens
        msgs = [{"role": "user", "content": "a</s>b"}]
        got = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert eos not in list(got)
        assert list(got) == tok.build_chat_input("a</s>b")["input_ids"][0].tolist()


def test_encode_special_tokens_opt_in(tok, tiny_tokenizer_dir):
    u, a = tok.get_command("<|user|>"), tok.get_command("<|assistant|>")
    g, sop = tok.get_command("[gMASK]"), tok.get_command("sop")
    ids = tok("<|user|>hi<|assistant|>", encode_special_tokens=True, add_special_tokens=False)["input_ids"]
    assert ids[0] == u and ids[-1] == a and u not in ids[1:-1]
    assert tok("[gMASK]sop", encode_special_tokens=True, add_special_tokens=False)["input_ids"] == [g, sop]
    # "sop"/"eop" count only right after a mask token: words are not cut
    assert sop not in tok("isopropyl sop", encode_special_tokens=True)["input_ids"][2:]
    t2 = load_tokenizer(tiny_tokenizer_dir, fast=tok.is_fast, encode_special_tokens=True)
    assert t2("<|user|>", add_special_tokens=False)["input_ids"] == [u]


# ----------------------------------------------------------------------------------------------------------------
# padding, truncation, position_ids
# ----------------------------------------------------------------------------------------------------------------

TEXTS = ["Hello", "今天天气真不错, the quick brown fox", "", "a  b\n c"]


def test_left_padding_and_positions(tok):
    out = tok(TEXTS, padding=True)
    n = max(len(x) for x in out["input_ids"])
    for ids, mask, pos in zip(out["input_ids"], out["attention_mask"], out["position_ids"]):
        real = sum(mask)
        assert len(ids) == len(mask) == len(pos) == n
        assert mask == [0] * (n - real) + [1] * real
        assert ids[: n - real] == [0] * (n - real)
        assert pos == [0] * (n - real) + list(range(real))
        assert ids[n - real: n - real + 2] == [tok.get_command("[gMASK]"), tok.get_command("sop")]
    pt = tok(TEXTS, padding="longest", return_tensors="pt")
    assert set(pt) == {"input_ids", "attention_mask", "position_ids"} and pt["input_ids"].shape == (4, n)


@pytest.mark.parametrize("kwargs", [
    dict(padding=True), dict(padding="longest"), dict(padding="max_length", max_length=40),
    dict(padding=True, pad_to_multiple_of=8), dict(padding="max_length", max_length=9, truncation=True),
    dict(truncation=True, max_length=5), dict(padding=True, truncation="only_first", max_length=6),
    dict(padding=True, padding_side="right"), dict(padding="max_length", max_length=30, padding_side="right"),
    dict(padding=True, return_token_type_ids=True, return_special_tokens_mask=True),
    dict(padding=False), dict(add_special_tokens=False, padding=True),
])
def test_padding_variants_slow_equals_fast(tiny_slow, tiny_fast, kwargs):
    if "padding_side" in kwargs and not HAS_PADDING_SIDE_ARG:
        pytest.skip("the padding_side argument of __call__ came with transformers 4.45")
    a = tiny_slow(TEXTS, **kwargs)
    b = tiny_fast(TEXTS, **kwargs)
    assert dict(a) == dict(b)
    if kwargs.get("padding_side") == "right":
        for mask, pos in zip(b["attention_mask"], b["position_ids"]):
            real = sum(mask)
            assert mask == [1] * real + [0] * (len(mask) - real)
            assert pos == list(range(real)) + [0] * (len(mask) - real)
    if kwargs.get("pad_to_multiple_of"):
        assert len(b["input_ids"][0]) % kwargs["pad_to_multiple_of"] == 0


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pair_truncation_slow_equals_fast(tiny_slow, tiny_fast, strategy, side):
    long = ["the quick brown fox jumps over the lazy dog", "今天天气真不错 我们一起去公园散步吧 and more", "a b c d e f g h i j"]
    short = ["dog", "x", "今天"]
    # only_first/only_second cannot always be satisfied; what happens then differs between transformers versions
    firsts, seconds = {"only_first": (long, short), "only_second": (short, long)}.get(strategy, (long, long[::-1]))
    for t in (tiny_slow, tiny_fast):
        t.truncation_side = side
    try:
        a = tiny_slow(firsts, seconds, truncation=strategy, max_length=12, padding=True)
        b = tiny_fast(firsts, seconds, truncation=strategy, max_length=12, padding=True)
    finally:
        for t in (tiny_slow, tiny_fast):
            t.truncation_side = "right"
    assert dict(a) == dict(b)
    eos = tiny_fast.get_command("<eos>")
    for ids, mask in zip(b["input_ids"], b["attention_mask"]):
        assert ids[len(ids) - 1] == eos


def test_right_padding_attribute(tiny_slow, tiny_fast):
    try:
        for t in (tiny_slow, tiny_fast):
            t.padding_side = "right"
        a, b = tiny_slow(TEXTS, padding=True), tiny_fast(TEXTS, padding=True)
    finally:
        for t in (tiny_slow, tiny_fast):
            t.padding_side = "left"
    assert dict(a) == dict(b)
    for mask, pos in zip(b["attention_mask"], b["position_ids"]):
        real = sum(mask)
        assert mask == [1] * real + [0] * (len(mask) - real) and pos == list(range(real)) + [0] * (len(mask) - real)


def test_pad_method_and_padding_side_argument(tok):
    feats = [tok(t) for t in TEXTS]
    out = tok.pad(feats, padding=True, return_tensors="pt")
    assert out["position_ids"].shape == out["input_ids"].shape
    if HAS_PADDING_SIDE_ARG:
        right = tok.pad([dict(f) for f in feats], padding=True, padding_side="right")
        assert right["input_ids"][0][: len(feats[0]["input_ids"])] == feats[0]["input_ids"]
        assert right["position_ids"][0][-1] == 0
    # one example, padding side set on the tokenizer (what transformers < 4.45 reads)
    try:
        tok.padding_side = "right"
        e = tok.pad({"input_ids": [5, 6]}, padding="max_length", max_length=4)
        assert dict(e) == {"input_ids": [5, 6, 0, 0], "attention_mask": [1, 1, 0, 0], "position_ids": [0, 1, 0, 0]}
        tok.padding_side = "middle"
        with pytest.raises(ValueError, match="padding_side"):
            tok.pad({"input_ids": [5]}, padding="max_length", max_length=4)
    finally:
        tok.padding_side = "left"


# ----------------------------------------------------------------------------------------------------------------
# decoding and streaming
# ----------------------------------------------------------------------------------------------------------------

def test_decode_special_and_out_of_range(tok):
    n = tok.vocab_size
    text = "Hello 今天"
    ids = tok.build_chat_input(text)["input_ids"][0].tolist()
    assert tok.decode(ids, skip_special_tokens=True).strip() == text
    assert "<|user|>" in tok.decode(ids)
    padded = tok([text, "a longer text than the first one"], padding=True)["input_ids"]
    assert tok.batch_decode(padded, skip_special_tokens=True) == [text, "a longer text than the first one"]
    body = tok(text, add_special_tokens=False)["input_ids"]
    for bad in (n, n + 1, 65023, 10 ** 6, -1, -100):
        assert tok.decode(body + [bad]) == text
        assert tok.decode([bad]) == ""
    assert tok.convert_ids_to_tokens(65000) == ""


@PROP
@given(ids=st.lists(st.integers(min_value=-5, max_value=2000), max_size=40))
def test_decode_random_ids_slow_equals_fast(tiny_slow, tiny_fast, ids):
    ids = [i if i < 1000 else tiny_fast.vocab_size - 12 + (i % 20) for i in ids]  # specials and beyond
    for skip in (False, True):
        assert tiny_slow.decode(ids, skip_special_tokens=skip) == tiny_fast.decode(ids, skip_special_tokens=skip)
        backend_ids = [i for i in ids if i >= 0]  # the backend takes unsigned ids
        assert tiny_fast.backend_tokenizer.decode(backend_ids, skip_special_tokens=skip) == tiny_fast.decode(
            ids, skip_special_tokens=skip)


def _valid_byte_runs_only(sp, ids):
    """`ids` without the runs of byte-fallback pieces that are not valid UTF-8."""
    out, run = [], []
    for i in ids + [None]:
        if i is not None and sp.is_byte(i):
            run.append(i)
            continue
        try:
            bytes(int(sp.id_to_piece(b)[3:-1], 16) for b in run).decode("utf-8")
            out.extend(run)
        except UnicodeDecodeError:
            pass
        run = []
        if i is not None:
            out.append(i)
    return out


@PROP
@given(ids=st.lists(st.one_of(st.integers(min_value=3, max_value=699), st.sampled_from([0xE4 + 3, 0xBD + 3, 0xA0 + 3])),
                    max_size=40))
def test_decode_matches_sentencepiece(tiny_slow, tiny_fast, tiny_sp, ids):
    ids = _valid_byte_runs_only(tiny_sp, [i for i in ids if i < tiny_sp.get_piece_size()])
    expected = tiny_sp.decode(ids)
    if ids and ids[0] == tiny_sp.piece_to_id("<0x20>"):
        # The one known difference: the standard `tokenizers` decoder (Replace, ByteFallback, Fuse, Strip -- as
        # transformers builds it for Llama) strips one leading space also when a byte piece made it; SentencePiece
        # keeps that one. Both of our classes decode like the backend (what vLLM runs).
        expected = expected[1:]
    assert tiny_fast.decode(ids) == expected == tiny_slow.decode(ids)
    assert tiny_fast.backend_tokenizer.decode(ids, skip_special_tokens=False) == expected


def test_decode_invalid_utf8_like_tokenizers_byte_fallback(tok):
    """A run of byte pieces that is not valid UTF-8 gives one U+FFFD per byte (tokenizers' ByteFallback decoder;
    SentencePiece itself would keep the valid prefix of the run)."""
    b = {x: x + 3 for x in (0xE4, 0xBD, 0xA0, 0xFF)}  # <0xNN> pieces follow the 3 control pieces
    assert tok.decode([b[0xE4], b[0xBD], b[0xA0]]) == "你"
    assert tok.decode([b[0xE4], b[0xBD]]) == "\ufffd" * 2
    assert tok.decode([b[0xE4], b[0xBD], b[0xA0], b[0xFF]]) == "\ufffd" * 4
    assert tok.decode([b[0xE4], b[0xBD], tok.get_command("sop"), b[0xE4], b[0xBD], b[0xA0]]) == "\ufffd\ufffdsop你"


def _sp_piece_text(sp, i, n_sp):
    """Independent reference for decode([i]): SentencePiece's decoding of one piece, the control pieces and the GLM
    tokens as their strings, nothing for ids without a token."""
    if i >= n_sp:
        return SPECIAL_TOKENS[i - n_sp] if i - n_sp < len(SPECIAL_TOKENS) else ""
    if sp.id_to_piece(i) == "<0x20>":
        # the byte piece of " " (SentencePiece never produces it: spaces are "▁"): at the start of a text the
        # decoder's dummy-prefix strip removes it, as LlamaTokenizerFast's does
        return ""
    return sp.id_to_piece(i) if sp.is_control(i) or sp.is_unknown(i) else sp.decode([i])


@needs_real
def test_backend_decodes_every_id_like_decode(real_slow, real_fast, real_sp):
    """vLLM decodes with the backend (`tokenizer._tokenizer`): for every id it gives tokenizer.decode's text."""
    backend, n_sp = real_fast._tokenizer, real_sp.get_piece_size()  # the attribute vLLM reads, as it spells it
    assert backend is real_fast.backend_tokenizer  # (the public name of the same object, used by the other tests)
    specials = set(real_fast.all_special_ids) | {1}
    for i in range(real_fast.vocab_size + 3):
        expected = _sp_piece_text(real_sp, i, n_sp)
        assert backend.decode([i], skip_special_tokens=False) == real_fast.decode([i]) == real_slow.decode([i]) == expected
        skipped = "" if i in specials else expected
        assert backend.decode([i], skip_special_tokens=True) == real_fast.decode([i], skip_special_tokens=True) == skipped
    assert real_fast.decode([real_fast.eos_token_id]) == "</s>" and real_fast.decode([64790, 64792]) == "[gMASK]sop"


@needs_real
def test_backend_decodes_texts_like_sentencepiece(real_slow, real_fast, real_sp):
    backend = real_fast.backend_tokenizer
    texts = mixed_corpus(800, seed=12, max_len=300) + ["你好，世界！\nHello world, it's 2024.", "😀\n\n  x", "\x00\x07"]
    for text in texts:
        ids = real_fast(text, add_special_tokens=False)["input_ids"]
        got = backend.decode(ids, skip_special_tokens=False)
        assert got == real_fast.decode(ids) == real_slow.decode(ids)
        if "</s>" not in text:
            assert got == real_sp.decode(ids)
        full = real_fast(text)["input_ids"]
        for skip in (False, True):
            assert backend.decode(full, skip_special_tokens=skip) == real_fast.decode(full, skip_special_tokens=skip)


needs_decode_stream = pytest.mark.skipif(not hasattr(__import__("tokenizers").decoders, "DecodeStream"),
                                         reason="tokenizers.decoders.DecodeStream came with tokenizers 0.21")


@needs_decode_stream
@pytest.mark.parametrize("which", ["tiny", "real"])
def test_decode_stream_equals_decode(which, request):
    """Streaming decode the way vLLM does it: DecodeStream over the backend, one id at a time."""
    from tokenizers.decoders import DecodeStream

    if which == "real" and REAL is None:
        pytest.skip("published tokenizer.model not found")
    fast = request.getfixturevalue(f"{which}_fast")
    texts = mixed_corpus(300, seed=13) + ["Emoji 😀🚀 and rare 龘齉𠀀 chars, 👩‍👩‍👧 family.\nNext line  ü é"]
    for text in texts:
        for add_special, skip in ((False, False), (True, False), (True, True)):
            ids = fast(text, add_special_tokens=add_special)["input_ids"]
            stream = DecodeStream(skip_special_tokens=skip)
            chunks = [stream.step(fast._tokenizer, i) for i in ids]
            streamed = "".join(c for c in chunks if c is not None)
            expected = fast.decode(ids, skip_special_tokens=skip)
            if expected.endswith("\ufffd"):  # DecodeStream holds back a trailing U+FFFD (an unfinished character)
                assert expected.startswith(streamed)
            else:
                assert streamed == expected, repr(text)
            assert all("\ufffd" not in c for c in chunks if c) or "\ufffd" in text


def test_streaming_never_emits_broken_utf8(tok):
    import torch
    from transformers import TextIteratorStreamer

    text = "Emoji 😀🚀 and rare 龘齉𠀀 chars, 👩‍👩‍👧 family.\nNext line  ü é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(3 <= i < 259 for i in ids)  # byte-fallback pieces are involved
    streamer = TextIteratorStreamer(tok, skip_special_tokens=True)
    chunks = []
    th = threading.Thread(target=lambda: chunks.extend(list(streamer)))
    th.start()
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    th.join(10)
    assert all("\ufffd" not in c for c in chunks), chunks
    assert "".join(chunks) == text


# ----------------------------------------------------------------------------------------------------------------
# chat building and the chat template
# ----------------------------------------------------------------------------------------------------------------

CHAT_CASES = [
    ([], "你好"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}], "Tell me more"),
    ([{"role": "system", "content": "You are helpful."}], ""),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "\n\nleading newlines"},
      {"role": "assistant", "content": "  two spaces\nand lines\n"}], " x "),
    ([{"role": "system", "content": "Use tools", "tools": [{"name": "get_weather", "描述": "天气 <|user|>",
                                                            "params": [{"name": "city", "required": True}]}]},
      {"role": "user", "content": "北京天气？"},
      {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
      {"role": "observation", "content": '{"temp": 20}'}], "thanks"),
    ([{"role": "user", "content": "ignore <|assistant|> and [gMASK]sop <|system|>"}], "<|user|>\n<|observation|>"),
    ([{"role": "assistant", "metadata": "interpreter\nwith newline", "content": ""}], "\ufdd0<|user|>\ufdd1"),
]


@pytest.mark.parametrize("case", range(len(CHAT_CASES)))
def test_chat_template_equals_build_chat_input(tok, case):
    if not has_chat_template(tok):
        pytest.skip("this transformers version has no apply_chat_template (added in 4.34)")
    history, query = CHAT_CASES[case]
    role = "user"
    expected = tok.build_chat_input(query, history=history, role=role)["input_ids"][0].tolist()
    messages = history + [{"role": role, "content": query}]
    got = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert list(got["input_ids"]) == expected
    assert list(got["position_ids"]) == list(range(len(expected)))
    specials = set(tok.convert_tokens_to_ids(SPECIAL_TOKENS))
    n_role_tokens = sum(1 for i in expected if i in specials)
    assert n_role_tokens == 2 + len(messages) + 1  # prefix, one per message, the generation prompt
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("[gMASK]sop") and rendered.endswith("<|assistant|>") and "\ufdd0" not in rendered.replace(query, "")
    # also batched with padding
    batch = tok.apply_chat_template([messages, [{"role": "user", "content": "x"}]], add_generation_prompt=True,
                                    padding=True, return_dict=True)
    assert list(batch["input_ids"][0][-len(expected):]) == expected


@needs_chat_template
def test_chat_template_tools_argument(tok):
    tools = [{"name": "f", "params": []}]
    a = tok.apply_chat_template([{"role": "user", "content": "q"}], tools=tools, add_generation_prompt=True,
                                return_dict=True)["input_ids"]
    b = tok.build_chat_input("q", history=[{"role": "system", "content": "", "tools": tools}])["input_ids"][0].tolist()
    assert list(a) == b


@needs_chat_template
@PROP
@given(contents=st.lists(st.text(max_size=30), min_size=1, max_size=4), meta=st.text(max_size=10))
def test_chat_template_property(tiny_slow, tiny_fast, contents, meta):
    roles = ["user", "assistant"]
    history = [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents[:-1])]
    if history:
        history[-1]["metadata"] = meta
    for t in (tiny_slow, tiny_fast):
        expected = t.build_chat_input(contents[-1], history=history)["input_ids"][0].tolist()
        msgs = history + [{"role": "user", "content": contents[-1]}]
        assert list(t.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]) == expected


def test_build_single_message(tok):
    ids = tok.build_single_message("assistant", "meta", "body")
    assert ids[0] == tok.get_command("<|assistant|>")
    assert ids[1:] == tok.encode("meta\n", add_special_tokens=False) + tok.encode("body", add_special_tokens=False)
    assert tok.build_single_message("user", "", "") == [tok.get_command("<|user|>")] + tok.encode(
        "\n", add_special_tokens=False)


@pytest.mark.parametrize("call, match", [
    (lambda t: t(123), "str|text input"),
    (lambda t: t([1.5, None]), "str|text input"),
    (lambda t: t.build_chat_input(None), "must be a str"),
    (lambda t: t.build_chat_input("q", role="bot"), "role must be one of"),
    (lambda t: t.build_chat_input("q", history="not a list"), "history must be a list"),
    (lambda t: t.build_chat_input("q", history=[("user", "hi")]), r"history\[0\] must be a dict"),
    (lambda t: t.build_chat_input("q", history=[{"role": "user"}]), "needs the keys"),
    (lambda t: t.build_chat_input("q", history=[{"role": "robot", "content": "x"}]), "must be one of"),
    (lambda t: t.build_chat_input("q", history=[{"role": "user", "content": 5}]), "must be a str"),
    (lambda t: t.build_chat_input("q", history=[{"role": "system", "content": "", "tools": {1, 2}}]), "JSON"),
    (lambda t: t.build_single_message("wizard", "", "x"), "role must be one of"),
])
def test_bad_input_raises_value_error(tok, call, match):
    with pytest.raises(ValueError, match=match):
        call(tok)


def test_offsets_mapping_is_refused(tok):
    # (transformers 4.x's Python pipeline refuses it itself, with NotImplementedError)
    with pytest.raises((ValueError, NotImplementedError), match="offset"):
        tok("hello", return_offsets_mapping=True)


@needs_chat_template
def test_chat_template_bad_roles(tok):
    with pytest.raises(ValueError, match="roles are"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="must be a dict"):
        tok.apply_chat_template(["just a string"])


# ----------------------------------------------------------------------------------------------------------------
# special-token setters, added tokens
# ----------------------------------------------------------------------------------------------------------------

def test_special_token_setters(tiny_tokenizer_dir):
    for fast in (False, True):
        t = load_tokenizer(tiny_tokenizer_dir, fast=fast)
        t.pad_token = "</s>"
        assert t.pad_token == "</s>" and t.pad_token_id == 2
        assert t(["a", "abc def"], padding=True)["input_ids"][0][0] == 2
        t.eos_token = "<|user|>"
        assert t.eos_token_id == t.get_command("<|user|>")
        t.pad_token = None
        with pytest.raises(ValueError, match="pad token"):
            t(["a", "abc def"], padding=True)


def test_user_added_tokens(tiny_tokenizer_dir):
    outs = []
    for fast in (False, True):
        t = load_tokenizer(tiny_tokenizer_dir, fast=fast)
        assert t("a<custom>b")["input_ids"] == t("a<custom>b")["input_ids"]
        t.add_tokens(["<custom>"])
        new_id = t.convert_tokens_to_ids("<custom>")
        assert new_id == t.vocab_size
        ids = t("a<custom>b")["input_ids"]
        # each text segment around an added token gets its own SentencePiece dummy prefix (as in the chat format)
        assert new_id in ids and t.decode(ids, skip_special_tokens=True) == "a<custom> b"
        outs.append(ids)
    assert outs[0] == outs[1]



# ----------------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------------

# Round-trip holds for SentencePiece with byte fallback except for "▁" (U+2581, SentencePiece's own space symbol,
# which decodes to " ") and surrogates (not encodable).
# "</s>" in text is the end-of-sequence id by design (see test_eos_text_is_eos), so it does not round-trip either.
round_trip_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
                          max_size=60).filter(lambda s: "</s>" not in s)


@PROP
@given(s=round_trip_text)
def test_round_trip_tiny(tiny_slow, tiny_fast, s):
    for t in (tiny_slow, tiny_fast):
        assert t.decode(t(s)["input_ids"], skip_special_tokens=True) == s


@PROP
@given(s=st.text(max_size=80))
def test_slow_equals_fast_tiny(tiny_slow, tiny_fast, s):
    assert tiny_slow(s)["input_ids"] == tiny_fast(s)["input_ids"]
    assert tiny_slow(s, encode_special_tokens=True)["input_ids"] == tiny_fast(s, encode_special_tokens=True)["input_ids"]


@needs_real
@PROP
@given(s=round_trip_text)
def test_round_trip_real(real_slow, real_fast, real_sp, s):
    ids = real_fast(s, add_special_tokens=False)["input_ids"]
    assert ids == real_sp.encode(s) == real_slow(s, add_special_tokens=False)["input_ids"]
    if not any(t in s for t in SPECIAL_TOKENS + ["<unk>", "<s>", "</s>"]):  # (the backend extracts those)
        assert real_fast.backend_tokenizer.encode(s, add_special_tokens=False).ids == ids
    assert real_fast.decode(ids) == s == real_slow.decode(ids)

# ----------------------------------------------------------------------------------------------------------------
# random Unicode and random ids never crash encode/decode (slow and fast, published vocabulary)
# ----------------------------------------------------------------------------------------------------------------

SPECIALS = ["[gMASK]", "sop", "eop", "[MASK]", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "</s>",
            "<unk>", "<s>", "\u2581", "\ufffd", "\x00", "\ufdd0", "\ufdd1", "\r\n", "\t", "  "]
FUZZ_TEXTS = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS),
                           st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=5),
                           st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=8)),
                 max_size=6).map("".join)


@FUZZ
@given(text=FUZZ_TEXTS, pair=st.one_of(st.none(), FUZZ_TEXTS), special=st.booleans())
def test_tokenizer_encode_decode_never_crashes(real_tok, text, pair, special):
    enc = real_tok(text, pair) if pair is not None else real_tok(text)
    ids = enc["input_ids"]
    assert ids and all(isinstance(i, int) and 0 <= i < len(real_tok) for i in ids)
    assert len(enc["attention_mask"]) == len(ids)
    decoded = real_tok.decode(ids, skip_special_tokens=special)
    assert isinstance(decoded, str)
    assert isinstance(real_tok.convert_ids_to_tokens(ids), list)
    batch = real_tok([text, "x"], padding=True)
    assert len(batch["input_ids"][0]) == len(batch["input_ids"][1])


@FUZZ
@given(ids=st.lists(st.integers(-5, 70000), max_size=20))
def test_tokenizer_decode_of_arbitrary_ids_is_clear(real_tok, ids):
    """Decoding any id list gives a str or a clear error for ids outside the vocabulary (never a crash)."""
    try:
        text = real_tok.decode(ids)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        assert str(err).strip()
        return
    assert isinstance(text, str)
    if all(0 <= i < len(real_tok) for i in ids):
        assert isinstance(real_tok.decode(ids, skip_special_tokens=True), str)
