"""Shared test helpers: tiny random ChatGLM3 models written to a folder and loaded back through the real
``from_pretrained(..., trust_remote_code=True)`` path, and locations of the reference data. Tools outside tests/
(benchmarks, scripts) import this too; ``REPO`` and ``CODE_FILES`` may be reassigned to write another checkout's code."""
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = Path(os.environ.get("CHATGLM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
sys.path.insert(0, str(REPO))
from generate import CODE_FILES  # noqa: E402  (loading.py's REMOTE_CODE_FILES, the one list)

sys.path.pop(0)

TINY_CONFIG = dict(
    num_layers=2,
    padded_vocab_size=128,
    hidden_size=64,
    ffn_hidden_size=96,
    kv_channels=16,
    num_attention_heads=4,
    seq_length=256,
    multi_query_attention=True,
    multi_query_group_num=2,
    add_qkv_bias=True,
    add_bias_linear=False,
    rmsnorm=True,
    post_layer_norm=True,
    layernorm_epsilon=1e-5,
    eos_token_id=2,
    pad_token_id=0,
)


def published_config_dict():
    return json.loads((REPO / "config.json").read_text())


def write_code(folder):
    """Copy the remote-code files (and tokenizer config) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in CODE_FILES + ["tokenizer_config.json"]:
        if (REPO / name).exists():
            shutil.copyfile(REPO / name, folder / name)
    return folder


def write_config(folder, **overrides):
    cfg = published_config_dict()
    cfg.update(TINY_CONFIG)
    cfg["torch_dtype"] = "float32"
    cfg.update(overrides)
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def random_state_dict(model, seed=0, std=0.2):
    """Seeded random weights (larger than HF's init so that outputs are not trivially flat)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("inv_freq") or not tensor.is_floating_point():
            sd[name] = tensor
        elif name.endswith("layernorm.weight"):
            sd[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
        else:
            sd[name] = std * torch.randn(tensor.shape, generator=gen)
    return sd


def make_model_dir(folder, seed=0, safe_serialization=True, **config_overrides):
    """Write a tiny random ChatGLM3 checkpoint (code + config + weights) into ``folder`` and return it.

    The model is built through ``AutoModelForCausalLM.from_config(..., trust_remote_code=True)`` so that the
    files under test are used, then saved with the library's ``save_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = write_code(folder)
    write_config(folder, **config_overrides)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.load_state_dict(random_state_dict(model, seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.save_pretrained(folder, safe_serialization=safe_serialization)
        except TypeError:
            model.save_pretrained(folder)
    write_config(folder, **config_overrides)  # keep the published key order/values, not the re-serialised ones
    return folder


def load_model(folder, cls="AutoModelForCausalLM", **kwargs):
    import transformers

    kwargs.setdefault("trust_remote_code", True)
    model = getattr(transformers, cls).from_pretrained(folder, **kwargs)
    return model.eval()


def cache_of(output):
    """The cache of a model output (transformers 5.24 renamed the field to ``cache``)."""
    for key in ("cache", "past_key_values"):
        if key in output.keys():
            return output[key]
    return None


def has_transformers_glm():
    try:
        from transformers import GlmConfig, GlmForCausalLM  # noqa: F401
        return True
    except ImportError:
        return False


def copy_dir(src, dst):
    """A copy of the folder ``src`` at ``dst`` (a fresh path), returned as a Path."""
    shutil.copytree(src, dst)
    return Path(dst)


def dtype_kwargs(dtype):
    """``dtype=`` on transformers >= 4.56 (``torch_dtype`` deprecated there), ``torch_dtype=`` before."""
    from transformers import PretrainedConfig

    return {"dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype": dtype}


def random_ids(batch=2, seq=10, seed=0, low=3):
    """Seeded random token ids inside the tiny vocabulary (above the special ids 0-2 by default)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, TINY_CONFIG["padded_vocab_size"], (batch, seq), generator=gen)


def lm_batch(batch=2, seq=12, seed=1):
    """(input_ids, labels) for causal-LM training: the first 3 tokens are a "prompt" that is not trained on."""
    ids = random_ids(batch, seq, seed)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def logits_of(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


def greedy(model, ids, n=8):
    """``n`` greedy tokens after ``ids`` (never stopping at eos)."""
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)


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
