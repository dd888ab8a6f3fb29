"""Shared test helpers, in one place: tiny random ChatGLM3 models written to a folder and loaded back through the
real ``from_pretrained(..., trust_remote_code=True)`` path; tokenizer folders, vocabularies and corpora; a reference
packer for the quantized storage format; transformers' GlmForCausalLM as an independent reference; locations of the
reference data. Tools outside tests/ (benchmarks, scripts) import this too; ``REPO`` and ``CODE_FILES`` may be
reassigned to write another checkout's code."""
import importlib
import io
import json
import os
import random
import shutil
import sys
import types
import uuid
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = Path(os.environ.get("CHATGLM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))

PACKAGE = "chatglm_remote_code_under_test"
# The same for a child process: `python -c CHILD_IMPORT+code REPO` runs code with `m` = quantization.py.
CHILD_IMPORT = ("import sys, types, importlib; pkg = types.ModuleType('rc'); pkg.__path__ = [sys.argv[1]]; "
                "sys.modules['rc'] = pkg; m = importlib.import_module('rc.quantization'); ")


def load_module(name="quantization"):
    """A remote-code file (quantization.py, cpu_kernels.py, ...) imported from the repository as a member of a
    package, so that its relative imports work as they do in transformers' module cache."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(REPO)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


def load_quantization_module():
    return load_module("quantization")


CODE_FILES = list(load_module("loading").REMOTE_CODE_FILES)  # the one list of remote-code files

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


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers: the published vocabulary or a small trained one, tokenizer folders, corpora
# ---------------------------------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]


def real_model_path():
    """The published tokenizer.model: $CHATGLM_TOKENIZER_MODEL or ../shared/reference/tokenizer.model (or None)."""
    env = os.environ.get("CHATGLM_TOKENIZER_MODEL")
    if env:
        return Path(env) if Path(env).is_file() else None
    p = SHARED_REFERENCE / "tokenizer.model"
    return p if p.is_file() else None


def model_dir_with_tokenizer(parent, num_layers):
    """A tiny random model folder (``support.make_model_dir``) with the published vocabulary size (65024 rows)
    and a tokenizer.model: the published one where found, else a small one trained here."""
    folder = make_model_dir(parent, padded_vocab_size=65024, num_layers=num_layers)
    vocab = real_model_path() or train_tiny_model(folder / "trained.model")
    shutil.copyfile(vocab, folder / "tokenizer.model")
    return folder


def function_call_prompt_path():
    p = SHARED_REFERENCE / "function_call.txt"
    return p if p.is_file() else None


_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog.
Large language models are trained on many tokens of text and code.
def add(a, b):
    return a + b
for i in range(10):
    print(i * 2, "hello world")
今天天气真不错，我们一起去公园散步吧。
人工智能正在改变世界，大语言模型可以回答问题、写代码和翻译文本。
你好，请问有什么可以帮您？我想查询一下北京的天气。
Numbers like 12345 and 2024-01-01 are split into digits.
   Indented line with    several   spaces.
class Tokenizer:
    def encode(self, text):
        return [ord(c) for c in text]
Bonjour à tous, ça va très bien. Über straße.
"""


def train_tiny_model(path: Path) -> Path:
    """Train a small SentencePiece model with the same settings as ChatGLM's (BPE, byte fallback, ...)."""
    import sentencepiece as spm

    lines = _TRAIN_TEXT.splitlines() * 30
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def make_tokenizer_dir(parent: Path, model_path: Path, name: str = "tok") -> Path:
    """A hub-style folder: the remote code, its config and a tokenizer.model (unique name: module cache key)."""
    folder = Path(parent) / f"{name}_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    shutil.copy(REPO / "tokenization_chatglm.py", folder / "tokenization_chatglm.py")
    shutil.copy(REPO / "tokenizer_config.json", folder / "tokenizer_config.json")
    if model_path is not None:
        shutil.copy(model_path, folder / "tokenizer.model")
    return folder


def load_tokenizer(folder, fast: bool, **kwargs):
    """Load through the real remote-code path. transformers 5's AutoTokenizer ignores ``use_fast=False`` and picks
    the fast class of auto_map; the slow class is then loaded from the same dynamic module."""
    from transformers import AutoTokenizer

    folder = str(folder)
    if fast:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, **kwargs)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False, **kwargs)
    if not tok.is_fast:
        return tok
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module("tokenization_chatglm.ChatGLMTokenizer", folder)
    return cls.from_pretrained(folder, **kwargs)


_ZH = "今天天气真不错，我们一起去公园散步吧。人工智能正在改变世界，大语言模型可以回答问题、写代码和翻译文本。龘齉𠀀㐀"
_EN = "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces; BPE merges pairs. "
_CODE = 'def f(x):\n    return {"a": [1, 2, 3], \'b\': x ** 2}\n\tif x != None: pass  # comment\r\n'
_SPECIAL = ["😀", "🚀🚀", "👩‍👩‍👧", " 12345 ", "007", "\n\n", "    ", "\t", "ü", "e\u0301", "\x00", "\x07", "\u200b",
            "\u3000", "▁", "<|user|>", "[gMASK]", "sop", "</s>", "<unk>", "\ufeff", "\U0010fffd", "\r\n"]


def mixed_corpus(n: int, seed: int = 0, max_len: int = 200):
    """Deterministic mixed text: Chinese, English, code, emoji, whitespace runs, digits, control characters."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", " \n ", "   leading", "trailing   ", "a  b   c    d", "1 2 3 45 678", "\t\t"]
    for _ in range(n):
        parts = []
        target = rng.randint(1, max_len)
        while sum(map(len, parts)) < target:
            k = rng.random()
            if k < 0.3:
                i = rng.randrange(len(_ZH) - 5)
                parts.append(_ZH[i:i + rng.randint(1, 20)])
            elif k < 0.6:
                i = rng.randrange(len(_EN) - 5)
                parts.append(_EN[i:i + rng.randint(1, 30)])
            elif k < 0.75:
                i = rng.randrange(len(_CODE) - 5)
                parts.append(_CODE[i:i + rng.randint(1, 40)])
            elif k < 0.9:
                parts.append(rng.choice(_SPECIAL))
            else:
                parts.append("".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(rng.randint(1, 4))))
        out.append("".join(parts))
    # lone surrogates are not text; the tokenizers clean them, the raw SentencePiece reference cannot take them
    return [s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") for s in out]


EOS_TEXT = "</s>"


def sp_reference_ids(sp, text: str):
    """Ids of `text` (no prefix) built from raw SentencePiece: "</s>" is the end-of-sequence id, every other
    piece of text between them is encoded by SentencePiece on its own (with its own dummy prefix)."""
    ids = []
    for k, chunk in enumerate(text.split(EOS_TEXT)):
        if k:
            ids.append(sp.eos_id())
        if chunk:
            ids.extend(sp.encode(chunk))
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# Quantization: a reference packer written from the format description (not from quantization.py)
# ---------------------------------------------------------------------------------------------------------------------
BLOCK_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quant_weight(out, inp, dtype, seed=0, zero_rows=(1,)):
    """A seeded random weight (std 0.05) with all-zero rows (the scale-0 case)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inp, generator=gen) * 0.05).to(dtype)
    for r in zero_rows:
        w[r] = 0
    return w


def quant_layer(bits, dtype, out=192, inp=96, bias=True, seed=0):
    """(float nn.Linear, the QuantizedLinear made from it) with a :func:`quant_weight` weight."""
    lin = torch.nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(quant_weight(out, inp, torch.float32, seed))
    lin = lin.to(dtype)
    return lin, load_quantization_module().QuantizedLinear.from_linear(lin, bits)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def quiet_load(folder, **kwargs):
    """:func:`load_model` with warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(folder, **kwargs)


def dequantized_float_model(float_dir, quantized):
    """The float model of ``float_dir`` with every block linear replaced by the exact dequantization of
    ``quantized``'s weight."""
    ref = quiet_load(float_dir)
    qmod = quantization_module_of(quantized)
    q_layers = block_linears(quantized)
    with torch.no_grad():
        for name, lin in block_linears(ref).items():
            ql = q_layers[name]
            lin.weight.copy_(qmod.dequantize_weight(ql.stored_weight(), ql.weight_scale, ql.weight_bit_width))
    return ref


def quantization_module_of(model):
    """The quantization module that a remote-code model actually uses."""
    return sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".quantization"]


def reference_quantize(weight, bits):
    """-> (q int values as int8 [out, in], stored int8, scale). Arithmetic in the weight dtype."""
    qmax = 127 if bits == 8 else 7
    scale = weight.abs().max(dim=1).values / qmax
    safe = scale.clone()
    safe[safe == 0] = 1
    # Saturate: in bf16, max|w| / scale can round up to 128 (bf16 spacing is 1 there), which a plain .to(int8)
    # (the original's code) would wrap to -128, flipping the sign of the row's largest weight.
    q = torch.round(weight / safe[:, None]).clamp(-qmax - 1, qmax).to(torch.int8)
    if bits == 8:
        return q, q.clone(), scale
    return q, reference_pack_int4(q), scale


def reference_pack_int4(q):
    """byte = (q[2j] << 4) | (q[2j+1] & 0xF), as a signed byte."""
    out, cols = q.shape
    ints = q.to(torch.int32)
    high = ints[:, 0::2] << 4
    low = ints[:, 1::2] & 0xF
    byte = (high | low) & 0xFF
    return byte.to(torch.uint8).view(torch.int8)


def reference_unpack_int4(stored):
    u = stored.view(torch.uint8).to(torch.int32)
    high = u >> 4
    low = u & 0xF
    high = torch.where(high >= 8, high - 16, high)
    low = torch.where(low >= 8, low - 16, low)
    return torch.stack((high, low), -1).reshape(stored.shape[0], -1).to(torch.int8)


def block_linears(model):
    """{name: module} of the four linears of every block."""
    return {n: m for n, m in model.named_modules() if n.endswith(BLOCK_LINEARS)}


# ---------------------------------------------------------------------------------------------------------------------
# transformers' own GlmForCausalLM built from a ChatGLM3 model's weights: the same function under a key mapping
# written here, not imported from the package
# ---------------------------------------------------------------------------------------------------------------------
def chatglm_to_glm_state_dict(sd, cfg):
    """Independent key mapping ChatGLM3 -> transformers' Glm (written here, not imported from the package)."""
    q = cfg["num_attention_heads"] * cfg["kv_channels"]
    kv = cfg["multi_query_group_num"] * cfg["kv_channels"]
    out = {}
    for key, t in sd.items():
        k = key.replace("transformer.", "", 1)
        if k.endswith("inv_freq"):
            continue
        if k == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif k == "encoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif k == "output_layer.weight":
            out["lm_head.weight"] = t
        else:
            k = k.replace("encoder.layers.", "model.layers.")
            if "query_key_value" in k:
                base, kind = k.rsplit(".", 1)
                base = base.replace("self_attention.query_key_value", "self_attn")
                qt, kt, vt = t.split([q, kv, kv], dim=0)
                out[f"{base}.q_proj.{kind}"], out[f"{base}.k_proj.{kind}"], out[f"{base}.v_proj.{kind}"] = qt, kt, vt
            else:
                k = (k.replace("self_attention.dense", "self_attn.o_proj")
                     .replace("mlp.dense_h_to_4h", "mlp.gate_up_proj")
                     .replace("mlp.dense_4h_to_h", "mlp.down_proj"))
                out[k] = t
    return out


def build_glm(model):
    from transformers import GlmConfig, GlmForCausalLM

    c = model.config
    kwargs = dict(
        vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.multi_query_group_num, head_dim=c.kv_channels, partial_rotary_factor=0.5,
        rms_norm_eps=c.layernorm_epsilon, attention_bias=True, max_position_embeddings=c.seq_length,
        pad_token_id=0, eos_token_id=2, tie_word_embeddings=False,
    )
    theta = 10000.0 * c.rope_ratio
    cfg = GlmConfig(**kwargs, rope_theta=theta)
    if getattr(cfg, "rope_parameters", None) and cfg.rope_parameters.get("rope_theta") != theta:  # transformers 5
        cfg = GlmConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                   "partial_rotary_factor": 0.5})
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == theta
    glm = GlmForCausalLM(cfg).eval()
    sd = chatglm_to_glm_state_dict(model.state_dict(), c.to_dict())
    missing, unexpected = glm.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return glm


def left_padded_batch():
    ids = torch.tensor([[0, 0, 0, 5, 9, 33, 17, 4], [7, 8, 9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 0, 0, 3, 99]])
    mask = (torch.arange(8)[None, :] >= torch.tensor([3, 0, 6])[:, None]).long()
    return ids, mask
