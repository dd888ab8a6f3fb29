"""Fixtures shared by several test files, and pytest hooks; the helpers they use live in support.py. Each fixture
name means one thing across the suite; fixtures used by one file only live in it.

Models:      tiny_dir / tiny_model -- the tiny random ChatGLM3 (support.TINY_CONFIG), folder and loaded model;
             lm_dir / lm_tokenizer -- a tiny model with the published vocabulary size and a tokenizer.model (the
             published one where found, else a small one trained here), and its tokenizer (AutoTokenizer);
             kernel_float_dir -- a tiny float model whose block linears fit the CPU kernels' width rules.
Quantization: automatic_quantization_backend -- the automatic backend choice before and after a test.
Tokenizers:  tiny_sp_model / tiny_tokenizer_dir -- a small SentencePiece model trained with ChatGLM's settings, and a
             tokenizer folder around it; real_dir / real_slow / real_fast -- the published tokenizer.model
             (../shared/reference or $CHATGLM_TOKENIZER_MODEL; tests using them skip without it)."""
import os

import pytest

from support import (load_model, load_quantization_module, load_tokenizer, make_model_dir, make_tokenizer_dir,
                     model_dir_with_tokenizer, real_model_path, train_tiny_model)

try:
    from hypothesis import settings

    settings.register_profile("default", max_examples=25, deadline=None)
    settings.register_profile("long", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except Exception:  # hypothesis missing or profile already registered
    pass


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def kernel_float_dir(tmp_path_factory):
    """A tiny model whose every block linear fits the CPU kernels' width rules (in % 128, out % 8)."""
    return make_model_dir(tmp_path_factory.mktemp("qkernel"), seed=4, hidden_size=128, ffn_hidden_size=256,
                          kv_channels=32, num_attention_heads=4)


@pytest.fixture
def automatic_quantization_backend():
    quantization = load_quantization_module()
    quantization.set_quantization_backend(None)
    yield
    quantization.set_quantization_backend(None)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """A tiny model with the published vocabulary size (65024 rows) and the tokenizer files."""
    return model_dir_with_tokenizer(tmp_path_factory.mktemp("lm"), num_layers=2)


@pytest.fixture(scope="session")
def lm_tokenizer(lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_dir, trust_remote_code=True)


@pytest.fixture(scope="session")
def tiny_sp_model(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("spm") / "tiny.model")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_sp_model):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tinytok"), tiny_sp_model, "tiny")


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory):
    real = real_model_path()
    if real is None:
        pytest.skip("published tokenizer.model not found")
    return make_tokenizer_dir(tmp_path_factory.mktemp("real"), real, "real")


@pytest.fixture(scope="session")
def real_slow(real_dir):
    return load_tokenizer(real_dir, fast=False)


@pytest.fixture(scope="session")
def real_fast(real_dir):
    return load_tokenizer(real_dir, fast=True)
