"""tokenization_chatglm.py's files: a tokenizer folder saved and loaded again (tokenizer.model, tokenizer.json and its
record, tokenizer_config.json from any transformers version), the slow class on every version, and a missing or
broken ``tokenizer.model`` (downloaded, or a clear error that names the file). The tokenizer folders come from
conftest.py (a small SentencePiece model trained here; the published one where found)."""
import hashlib
import json
import os
import uuid

import pytest

from support import SHARED_REFERENCE, SPECIAL_TOKENS, load_tokenizer, make_tokenizer_dir, mixed_corpus


# ----------------------------------------------------------------------------------------------------------------
# saving and loading again
# ----------------------------------------------------------------------------------------------------------------

def _save(t, parent, name):
    """save_pretrained into a uniquely named folder (the name keys the remote-code module cache) with the code."""
    out = parent / f"{name}_{uuid.uuid4().hex[:8]}"
    t.save_pretrained(str(out))
    return out


def test_save_and_reload(tiny_tokenizer_dir, tmp_path):
    texts = mixed_corpus(50, seed=7)
    for fast in (False, True):
        t = load_tokenizer(tiny_tokenizer_dir, fast=fast)
        out = _save(t, tmp_path, "fast" if fast else "slow")
        assert (out / "tokenizer.model").read_bytes() == (tiny_tokenizer_dir / "tokenizer.model").read_bytes()
        assert (out / "tokenizer.json").exists() == fast
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert cfg.get("padding_side") == "left"
        # self-contained on every version: the code, and both classes in auto_map (whichever class saved)
        assert (out / "tokenization_chatglm.py").read_bytes() == (tiny_tokenizer_dir / "tokenization_chatglm.py").read_bytes()
        assert cfg["auto_map"]["AutoTokenizer"] == ["tokenization_chatglm.ChatGLMTokenizer",
                                                   "tokenization_chatglm.ChatGLMTokenizerFast"]
        t2 = load_tokenizer(out, fast=fast)
        assert t2(texts, padding=True)["input_ids"] == t(texts, padding=True)["input_ids"]
        assert t2.pad_token_id == 0 and t2.eos_token_id == 2
        ids = t(texts[-1])["input_ids"]
        assert t2.decode(ids) == t.decode(ids)


@pytest.mark.parametrize("key", ["extra_special_tokens", "additional_special_tokens"])
def test_special_tokens_list_from_any_version(tiny_tokenizer_dir, tmp_path, key):
    """transformers 5.x saves the GLM tokens as a list under extra_special_tokens (4.x: additional_special_tokens,
    and extra_special_tokens is a dict there): both spellings load on every version."""
    folder = make_tokenizer_dir(tmp_path, tiny_tokenizer_dir / "tokenizer.model", "xv")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg[key] = list(SPECIAL_TOKENS) + ["<extra>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for fast in (False, True):
        t = load_tokenizer(folder, fast=fast)
        assert [t.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == list(range(t.vocab_size - 9, t.vocab_size))
        assert "<extra>" in t.all_special_tokens and "<|user|>" in t.all_special_tokens
        assert t.decode(t.get_prefix_tokens(), skip_special_tokens=True) == ""


def test_tokenizer_json_recorded_with_the_model_sha256(tiny_tokenizer_dir, tiny_sp_model, tmp_path):
    fast = load_tokenizer(tiny_tokenizer_dir, fast=True)
    out = _save(fast, tmp_path, "json")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    digest = hashlib.sha256(tiny_sp_model.read_bytes()).hexdigest()
    assert digest in cfg["tokenizer_json_source"]
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["decoder"] and saved["normalizer"] and saved["model"]["byte_fallback"] is True
    t2 = load_tokenizer(out, fast=True)
    assert json.loads(t2.backend_tokenizer.to_str())["model"] == saved["model"]
    texts = mixed_corpus(30, seed=8)
    assert t2(texts)["input_ids"] == fast(texts)["input_ids"]
    # while the record matches, the backend is what tokenizer.json says (here: a file edited to have no decoder)
    saved["decoder"] = None
    (out / "tokenizer.json").write_text(json.dumps(saved))
    assert load_tokenizer(out, fast=True).backend_tokenizer.decoder is None
    # with a stale record, tokenizer.json is ignored and the backend rebuilt from tokenizer.model
    cfg["tokenizer_json_source"] = cfg["tokenizer_json_source"].replace(digest, "0" * 64)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    t3 = load_tokenizer(out, fast=True)
    assert t3.backend_tokenizer.decoder is not None
    ids = fast("Hello 😀 world")["input_ids"]
    assert t3.backend_tokenizer.decode(ids, skip_special_tokens=True) == "Hello 😀 world" == t3.decode(
        ids, skip_special_tokens=True)


def test_slow_tokenizer_on_every_version(tiny_tokenizer_dir):
    """The supported ways to get the SentencePiece tokenizer (transformers 5.x's AutoTokenizer ignores use_fast)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    fast = load_tokenizer(tiny_tokenizer_dir, fast=True)
    for cls in (type(fast).slow_tokenizer_class,
                get_class_from_dynamic_module("tokenization_chatglm.ChatGLMTokenizer", str(tiny_tokenizer_dir))):
        slow = cls.from_pretrained(str(tiny_tokenizer_dir))
        assert type(slow).__name__ == "ChatGLMTokenizer" and not slow.is_fast
        texts = mixed_corpus(20, seed=9)
        assert slow(texts, padding=True)["input_ids"] == fast(texts, padding=True)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# a missing or broken tokenizer.model
# ----------------------------------------------------------------------------------------------------------------

def test_missing_model_is_downloaded(tiny_sp_model, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tiny_sp_model)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    folder = make_tokenizer_dir(tmp_path, None, "nomodel")
    for fast in (False, True):
        t = load_tokenizer(folder, fast=fast)
        assert t("hello")["input_ids"][:2] == [t.get_command("[gMASK]"), t.get_command("sop")]
    assert calls and all(c == ("THUDM/chatglm3-6b-base", "tokenizer.model") for c in calls)


def test_missing_model_offline_error(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = make_tokenizer_dir(tmp_path, None, "offline")
    with pytest.raises(Exception, match="tokenizer.model") as info:
        load_tokenizer(folder, fast=False)
    assert "HF_HUB_OFFLINE" in str(info.value) and "THUDM/chatglm3-6b-base" in str(info.value)


def _with_model_file(parent, data, fast):
    """A tokenizer folder whose tokenizer.model holds ``data`` (False: no such file), loaded through the remote code."""
    folder = make_tokenizer_dir(parent, None, "broken")
    if data is not False:
        (folder / "tokenizer.model").write_bytes(data)
    return load_tokenizer(folder, fast=fast)


BAD_TOKENIZER_FILES = {
    "random-bytes": os.urandom(5000),
    "empty": b"",
    "text": b"hello world\n" * 10,
    "lfs-pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:e7dc4c39\nsize 1018370\n",
    "truncated-real": None,  # first half of the real file
}


@pytest.mark.parametrize("use_fast", [False, True], ids=["slow", "fast"])
@pytest.mark.parametrize("kind", list(BAD_TOKENIZER_FILES))
def test_tokenizer_model_not_sentencepiece_is_a_clear_error(tmp_path, monkeypatch, kind, use_fast):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = BAD_TOKENIZER_FILES[kind]
    if data is None:
        real = SHARED_REFERENCE / "tokenizer.model"
        if not real.exists():
            pytest.skip("no published tokenizer.model")
        data = real.read_bytes()[: real.stat().st_size // 2]
    # a ValueError, not a bare SentencePiece RuntimeError ("INTERNAL: unk is not defined"), which transformers 4.5x
    # would swallow in AutoTokenizer and answer with False
    with pytest.raises(ValueError) as info:
        _with_model_file(tmp_path, data, fast=use_fast)
    assert "tokenizer.model" in str(info.value) and "SentencePiece" in str(info.value), info.value


def test_tokenizer_model_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="tokenizer.model"):
        _with_model_file(tmp_path, False, fast=False)
