#!/usr/bin/env python
"""Convert a ChatGLM3 checkpoint folder to transformers' own ``GlmForCausalLM`` format, and back.

    python -m scripts.convert_to_glm SRC_CHATGLM_DIR OUT_GLM_DIR [--verify]
    python -m scripts.convert_to_glm SRC_GLM_DIR OUT_CHATGLM_DIR --reverse [--verify]

ChatGLM3 and transformers' Glm compute the same function; only the parameter layout differs:

    ChatGLM3 (published keys)                               Glm
    transformer.embedding.word_embeddings.weight            model.embed_tokens.weight
    transformer.encoder.layers.N.input_layernorm.weight     model.layers.N.input_layernorm.weight
    ...self_attention.query_key_value.{weight,bias}         ...self_attn.{q,k,v}_proj.{weight,bias}  (split rows)
    ...self_attention.dense.weight                          ...self_attn.o_proj.weight
    ...post_attention_layernorm.weight                      ...post_attention_layernorm.weight
    ...mlp.dense_h_to_4h.weight   ([gate; up])              ...mlp.gate_up_proj.weight               (same order)
    ...mlp.dense_4h_to_h.weight                             ...mlp.down_proj.weight
    transformer.encoder.final_layernorm.weight              model.norm.weight
    transformer.output_layer.weight                         lm_head.weight
    transformer.rotary_pos_emb.inv_freq                     (not stored; recomputed with base 10000 on reverse)

Config: ``partial_rotary_factor`` 0.5 (rotary on the first half of each head, interleaved pairs in both),
``head_dim`` = kv_channels, ``num_key_value_heads`` = multi_query_group_num, ``attention_bias`` = add_qkv_bias,
rope theta = 10000 * rope_ratio (``rope_parameters`` on transformers 5, ``rope_theta`` on 4.x),
``max_position_embeddings`` = seq_length, ``rms_norm_eps`` = layernorm_epsilon, ``vocab_size`` = padded_vocab_size.

Tensors are streamed: every source shard is opened lazily (safetensors ``safe_open`` or ``torch.load(mmap=True)``)
and each output shard is written before the next one is built, so the model is never held twice in memory.
Output is always safetensors. Tokenizer files (tokenizer.model, tokenizer_config.json, tokenization_chatglm.py)
travel with the weights; on ``--reverse`` the remote-code files are taken from ``--code-dir`` (this repo).

``--verify`` loads both folders (the ChatGLM side with this repo's code) and compares the logits on a random
prompt; it needs a transformers version that has ``GlmForCausalLM`` (>= 4.46). The conversion itself needs only
torch and safetensors.
"""
import argparse
import json
import math
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from generate import CODE_FILES as _CODE_FILES  # (loading.py's REMOTE_CODE_FILES, the one list)

REPO = Path(__file__).resolve().parent.parent
ROPE_BASE = 10000.0
CODE_FILES = tuple(_CODE_FILES)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "added_tokens.json", "tokenization_chatglm.py")

# ---------------------------------------------------------------------------------------------------------------------
# Reading a checkpoint folder lazily
# ---------------------------------------------------------------------------------------------------------------------
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def load_torch_file(path):
    """``torch.load`` a .bin shard without reading it into memory (mmap), weights only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:  # legacy (non-zip) serialization cannot be memory-mapped
        if "mmap" not in str(exc):
            raise
        print(f"warning: {path} is in the legacy torch format; loading it fully into memory", file=sys.stderr)
        return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointReader:
    """Tensor names of a checkpoint folder -> tensors, read on demand, one tensor at a time for safetensors."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._open = {}
        self.weight_map = self._weight_map()  # name -> file name, in file order

    def _weight_map(self):
        for name in INDEX_FILES:
            path = self.folder / name
            if path.is_file():
                return OrderedDict(json.loads(path.read_text())["weight_map"])
        for name in SINGLE_FILES:
            path = self.folder / name
            if path.is_file():
                return OrderedDict((key, name) for key in self._keys_of(name))
        raise FileNotFoundError(
            f"no checkpoint in {self.folder}: expected one of {INDEX_FILES + SINGLE_FILES}")

    def _keys_of(self, file_name):
        handle = self._handle(file_name)
        return list(handle.keys())

    def _handle(self, file_name):
        if file_name not in self._open:
            path = self.folder / file_name
            if file_name.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file_name] = safe_open(str(path), framework="pt", device="cpu")
            else:
                self._open[file_name] = load_torch_file(path)
        return self._open[file_name]

    @property
    def files(self):
        return sorted(set(self.weight_map.values()))

    def keys(self):
        return list(self.weight_map)

    def file_of(self, name):
        return self.weight_map[name]

    def get(self, name):
        handle = self._handle(self.weight_map[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]

    def dtype_of(self, name):
        """dtype of a tensor without reading its data (safetensors header, or the memory-mapped tensor)."""
        handle = self._handle(self.weight_map[name])
        if hasattr(handle, "get_slice"):
            code = handle.get_slice(name).get_dtype()
            return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[code]
        return handle[name].dtype

    def close(self, file_name=None):
        """Drop open handles (all, or one file's) so their memory maps can be released."""
        for key in [file_name] if file_name else list(self._open):
            self._open.pop(key, None)


# ---------------------------------------------------------------------------------------------------------------------
# Writing safetensors shards
# ---------------------------------------------------------------------------------------------------------------------
def shard_names(count, prefix="model"):
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def save_shard(tensors, path):
    """Write one safetensors shard (contiguous, unshared copies where needed), ``format=pt`` metadata."""
    from safetensors.torch import save_file

    seen, clean = set(), {}
    for name, t in tensors.items():
        t = t.contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # views into a bigger storage (or shared storage) cannot be saved as-is
        if ptr is not None:
            seen.add(ptr)
        clean[name] = t
    save_file(clean, str(path), metadata={"format": "pt"})


def write_index(out_dir, weight_map, total_size, index_name="model.safetensors.index.json"):
    index = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / index_name).write_text(json.dumps(index, indent=2) + "\n")


def write_plan(reader, plan, out_dir, dtype=None):
    """Write the converted tensors shard by shard.

    ``plan`` is a list of (output shard group, out_name, source names, combine function); output shards follow
    the source shards, so at most one output shard is held in memory. Returns the list of files written."""
    groups = OrderedDict()
    for group, out_name, sources, fn in plan:
        groups.setdefault(group, []).append((out_name, sources, fn))
    names = shard_names(len(groups))
    weight_map, total_size = {}, 0
    for file_name, (group, entries) in zip(names, groups.items()):
        tensors = OrderedDict()
        for out_name, sources, fn in entries:
            t = fn(*[reader.get(s) for s in sources])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[out_name] = t
            weight_map[out_name] = file_name
            total_size += t.numel() * t.element_size()
        save_shard(tensors, Path(out_dir) / file_name)
        del tensors
        reader.close(group)
    if len(names) > 1:
        write_index(out_dir, weight_map, total_size)
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------------------------------------------------
def _dtype_name(cfg):
    return cfg.get("torch_dtype") or cfg.get("dtype")


def check_convertible(cfg):
    """Raise ValueError for ChatGLM configs that transformers' Glm cannot express."""
    problems = []
    expect = dict(rmsnorm=True, post_layer_norm=True, add_bias_linear=False,
                  apply_residual_connection_post_layernorm=False, fp32_residual_connection=False)
    for key, value in expect.items():
        if cfg.get(key, value) != value:
            problems.append(f"{key}={cfg[key]!r} (Glm needs {value!r})")
    if cfg.get("quantization_bit", 0):
        problems.append(f"quantization_bit={cfg['quantization_bit']} (convert the float checkpoint)")
    if cfg.get("pre_seq_len"):
        problems.append(f"pre_seq_len={cfg['pre_seq_len']} (p-tuning v2 prefixes have no Glm equivalent)")
    if not cfg.get("original_rope", True):
        problems.append("original_rope=False")
    if problems:
        raise ValueError("cannot convert this ChatGLM config to Glm: " + "; ".join(problems))


def chatglm_dims(cfg):
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("multi_query_group_num", 1) if cfg.get("multi_query_attention") else heads
    return heads, kv_heads, head_dim


def glm_config_kwargs(cfg):
    """GlmConfig keyword arguments (version independent part) for a ChatGLM config dict."""
    check_convertible(cfg)
    heads, kv_heads, head_dim = chatglm_dims(cfg)
    kwargs = dict(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        attention_dropout=cfg.get("attention_dropout", 0.0),
        max_position_embeddings=cfg["seq_length"],
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        use_cache=cfg.get("use_cache", True),
        pad_token_id=cfg.get("pad_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
    )
    return kwargs


def rope_theta_of(cfg):
    return ROPE_BASE * float(cfg.get("rope_ratio", 1) or 1)


def build_glm_config_dict(cfg):
    """The Glm config.json for a ChatGLM config dict, serialised by the installed transformers when it has
    ``GlmConfig`` (rope in ``rope_parameters`` on 5.x, ``rope_theta`` + ``partial_rotary_factor`` on 4.x),
    else written by hand in the 4.x layout (which 5.x also reads)."""
    kwargs = glm_config_kwargs(cfg)
    theta = rope_theta_of(cfg)
    dtype = _dtype_name(cfg)
    try:
        from transformers import GlmConfig
    except ImportError:
        GlmConfig = None
    if GlmConfig is None:
        out = dict(architectures=["GlmForCausalLM"], model_type="glm", partial_rotary_factor=0.5, rope_theta=theta,
                   initializer_range=0.02, **kwargs)
        if dtype:
            out["torch_dtype"] = dtype
        return out
    probe = GlmConfig()
    if isinstance(getattr(probe, "rope_parameters", None), dict):  # transformers 5: rope settings in one dict
        config = GlmConfig(**kwargs, rope_parameters={
            "rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5})
    else:
        config = GlmConfig(**kwargs, rope_theta=theta, partial_rotary_factor=0.5)
    config.architectures = ["GlmForCausalLM"]
    out = config.to_dict()
    out.pop("_name_or_path", None)
    # Drop generic PretrainedConfig fields left at their defaults (id2label, return_dict, ...): noise in config.json.
    from transformers import PretrainedConfig

    keep = {"architectures", "model_type", "transformers_version", "use_cache", "tie_word_embeddings",
            "pad_token_id", "eos_token_id", "bos_token_id", "dtype", "torch_dtype"}
    base = PretrainedConfig().to_dict()
    for key in [k for k in out if k in base and k not in keep and out[k] == base[k] and k not in kwargs]:
        del out[key]
    if dtype:
        # Keep the checkpoint dtype under the key this transformers writes (``dtype`` on 5.x, ``torch_dtype`` 4.x).
        key = "dtype" if "dtype" in out else "torch_dtype"
        out[key] = dtype
    return out


def glm_rope(glm):
    rope = glm.get("rope_parameters") or glm.get("rope_scaling") or {}
    theta = rope.get("rope_theta", glm.get("rope_theta", ROPE_BASE))
    factor = rope.get("partial_rotary_factor", glm.get("partial_rotary_factor", 0.5))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return float(theta), float(factor), rope_type


def chatglm_config_from_glm(glm, template=None):
    """ChatGLM config.json dict for a Glm config dict, in the published key order of ``template``."""
    theta, factor, rope_type = glm_rope(glm)
    problems = []
    if abs(factor - 0.5) > 1e-9:
        problems.append(f"partial_rotary_factor={factor} (ChatGLM rotates exactly half of each head)")
    if rope_type not in (None, "default"):
        problems.append(f"rope_type={rope_type!r} (ChatGLM has plain rotary only)")
    if glm.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={glm['hidden_act']!r}")
    if problems:
        raise ValueError("cannot convert this Glm config to ChatGLM: " + "; ".join(problems))
    heads = glm["num_attention_heads"]
    kv_heads = glm.get("num_key_value_heads") or heads
    head_dim = glm.get("head_dim") or glm["hidden_size"] // heads
    cfg = OrderedDict(template or {})
    # Converters (llama.cpp's convert_hf_to_gguf.py) recognise ChatGLM3 by this name, as in the published config.json.
    if "THUDM/chatglm3-6b" not in str(cfg.get("_name_or_path", "")):
        cfg["_name_or_path"] = "THUDM/chatglm3-6b-base"
        cfg.move_to_end("_name_or_path", last=False)
    values = dict(
        add_bias_linear=False,
        add_qkv_bias=bool(glm.get("attention_bias", True)),
        attention_dropout=glm.get("attention_dropout", 0.0),
        ffn_hidden_size=glm["intermediate_size"],
        hidden_size=glm["hidden_size"],
        kv_channels=head_dim,
        layernorm_epsilon=glm.get("rms_norm_eps", 1e-5),
        multi_query_attention=kv_heads != heads or bool(cfg.get("multi_query_attention", True)),
        multi_query_group_num=kv_heads,
        num_attention_heads=heads,
        num_layers=glm["num_hidden_layers"],
        original_rope=True,
        padded_vocab_size=glm["vocab_size"],
        post_layer_norm=True,
        rmsnorm=True,
        seq_length=glm["max_position_embeddings"],
        use_cache=glm.get("use_cache", True),
        tie_word_embeddings=bool(glm.get("tie_word_embeddings", False)),
        eos_token_id=glm.get("eos_token_id"),
        pad_token_id=glm.get("pad_token_id"),
    )
    ratio = theta / ROPE_BASE
    if abs(ratio - 1.0) > 1e-12 or "rope_ratio" in cfg:
        values["rope_ratio"] = int(ratio) if float(ratio).is_integer() else ratio
    dtype = _dtype_name(glm)
    if dtype:
        values["torch_dtype"] = dtype
    for key, value in values.items():
        if value is None and key in ("eos_token_id", "pad_token_id"):
            cfg.pop(key, None)
            continue
        cfg[key] = value
    cfg.setdefault("model_type", "chatglm")
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Tensor mapping
# ---------------------------------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_GLM_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SAME_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_TOP_REVERSE = {v: k for k, v in _TOP.items()}
_SAME_REVERSE = {v: k for k, v in _SAME_IN_LAYER.items()}
INV_FREQ_KEY = "transformer.rotary_pos_emb.inv_freq"


def _identity(t):
    return t


def _rows(start, stop):
    return lambda t: t[start:stop].clone()


def chatglm_to_glm_plan(reader, cfg):
    heads, kv_heads, head_dim = chatglm_dims(cfg)
    q, kv = heads * head_dim, kv_heads * head_dim
    plan, unknown = [], []
    for name in reader.keys():
        group = reader.file_of(name)
        if name in _TOP:
            plan.append((group, _TOP[name], [name], _identity))
            continue
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # a derived buffer; Glm recomputes it
        m = _LAYER.match(name)
        if m and m.group(2) in _SAME_IN_LAYER:
            plan.append((group, f"model.layers.{m.group(1)}.{_SAME_IN_LAYER[m.group(2)]}", [name], _identity))
        elif m and m.group(2) in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = m.group(2).rsplit(".", 1)[1]
            prefix = f"model.layers.{m.group(1)}.self_attn"
            for proj, (a, b) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
                plan.append((group, f"{prefix}.{proj}_proj.{kind}", [name], _rows(a, b)))
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unexpected ChatGLM tensors (quantized or p-tuning checkpoint?): {unknown[:8]}")
    return plan


def inv_freq_tensor(head_dim, dtype):
    """The ``inv_freq`` buffer as the published checkpoint stores it: base 10000 over half of each head."""
    rot = head_dim // 2
    return (1.0 / (ROPE_BASE ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))).to(dtype)


def glm_to_chatglm_plan(reader, glm):
    heads = glm["num_attention_heads"]
    head_dim = glm.get("head_dim") or glm["hidden_size"] // heads
    plan, unknown, qkv = [], [], OrderedDict()
    for name in reader.keys():
        group = reader.file_of(name)
        if name in _TOP_REVERSE:
            plan.append((group, _TOP_REVERSE[name], [name], _identity))
            continue
        m = _GLM_LAYER.match(name)
        rest = m.group(2) if m else None
        if rest in _SAME_REVERSE:
            plan.append((group, f"transformer.encoder.layers.{m.group(1)}.{_SAME_REVERSE[rest]}", [name], _identity))
        elif rest and re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", rest):
            kind = rest.rsplit(".", 1)[1]
            qkv.setdefault((int(m.group(1)), kind), {})[rest.split(".")[1][0]] = name
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unexpected Glm tensors: {unknown[:8]}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} {kind}: q/k/v projections incomplete ({sorted(parts)})")
        srcs = [parts["q"], parts["k"], parts["v"]]
        plan.append((reader.file_of(parts["q"]),
                     f"transformer.encoder.layers.{layer}.self_attention.query_key_value.{kind}", srcs,
                     lambda a, b, c: torch.cat([a, b, c], dim=0)))
    embed = "model.embed_tokens.weight"
    if embed in reader.weight_map:
        dtype = reader.dtype_of(embed)
        plan.append((reader.file_of(embed), INV_FREQ_KEY, [], lambda: inv_freq_tensor(head_dim, dtype)))
    # Keep the published order inside each shard: group by shard, then embedding, layers by index, head.
    order = {f: i for i, f in enumerate(reader.files)}

    def sort_key(entry):
        group, out_name = entry[0], entry[1]
        m = _LAYER.match(out_name)
        layer = int(m.group(1)) if m else (-1 if "embedding" in out_name or "rotary" in out_name else 1 << 30)
        return order[group], layer, out_name

    return sorted(plan, key=sort_key)


# ---------------------------------------------------------------------------------------------------------------------
# Folder-level conversion
# ---------------------------------------------------------------------------------------------------------------------
def _read_json(path):
    return json.loads(Path(path).read_text(), object_pairs_hook=OrderedDict)


def _copy_if_exists(src_dir, dst_dir, names):
    copied = []
    for name in names:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(dst_dir) / name)
            copied.append(name)
    return copied


def _prepare_out(out_dir, overwrite):
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty (use --overwrite)")
        for pattern in ("*.safetensors", "*.bin", "*.index.json"):
            for old in out_dir.glob(pattern):
                old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _torch_dtype(name):
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _copy_tokenizer(src, out, code_dir):
    """Vocabulary from the source; the tokenizer code and its config (auto_map) from this repo when it has them
    (a THUDM snapshot's original tokenizer code fails on transformers >= 4.34), else from the source."""
    _copy_if_exists(src, out, [n for n in TOKENIZER_FILES if n not in ("tokenization_chatglm.py",
                                                                      "tokenizer_config.json")])
    for name in ("tokenization_chatglm.py", "tokenizer_config.json"):
        if not _copy_if_exists(code_dir, out, [name]):
            _copy_if_exists(src, out, [name])


def convert_chatglm_to_glm(src, out, dtype=None, overwrite=False, code_dir=REPO):
    src, out = Path(src), _prepare_out(out, overwrite)
    cfg = _read_json(src / "config.json")
    if cfg.get("model_type", "chatglm") != "chatglm":
        raise ValueError(f"{src} has model_type {cfg.get('model_type')!r}, expected 'chatglm' (use --reverse?)")
    glm_cfg = build_glm_config_dict(cfg)
    if dtype is not None:
        glm_cfg["dtype" if "dtype" in glm_cfg else "torch_dtype"] = str(dtype).replace("torch.", "")
    reader = CheckpointReader(src)
    files = write_plan(reader, chatglm_to_glm_plan(reader, cfg), out, dtype)
    (out / "config.json").write_text(json.dumps(glm_cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if cfg.get(k) is not None}
    if (src / "generation_config.json").is_file():
        gen.update(_read_json(src / "generation_config.json"))
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _copy_tokenizer(src, out, code_dir)
    return files


def convert_glm_to_chatglm(src, out, dtype=None, overwrite=False, code_dir=REPO):
    src, out = Path(src), _prepare_out(out, overwrite)
    glm = _read_json(src / "config.json")
    if glm.get("model_type") != "glm":
        raise ValueError(f"{src} has model_type {glm.get('model_type')!r}, expected 'glm'")
    template = _read_json(Path(code_dir) / "config.json") if (Path(code_dir) / "config.json").is_file() else None
    cfg = chatglm_config_from_glm(glm, template)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    reader = CheckpointReader(src)
    files = write_plan(reader, glm_to_chatglm_plan(reader, glm), out, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # Remote code from this repo; tokenizer as in the forward direction.
    _copy_if_exists(code_dir, out, CODE_FILES)
    _copy_tokenizer(src, out, code_dir)
    if not _copy_if_exists(src, out, ["generation_config.json"]):
        _copy_if_exists(code_dir, out, ["generation_config.json"])
    missing = [n for n in CODE_FILES[:3] if not (out / n).is_file()]
    if missing:
        print(f"warning: {code_dir} lacks {missing}; the folder may not load with trust_remote_code",
              file=sys.stderr)
    return files


# ---------------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------------
def dtype_kwargs(dtype):
    """``from_pretrained`` dtype argument: ``dtype=`` where configs have a ``dtype`` field (transformers >= 4.56,
    where ``torch_dtype`` is deprecated), else ``torch_dtype=``."""
    from transformers import PretrainedConfig

    return {"dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype": dtype}


def _from_pretrained(cls, folder, dtype, **kwargs):
    return cls.from_pretrained(folder, **dtype_kwargs(dtype), **kwargs).eval()


def load_chatglm(folder, code_dir=REPO, dtype=torch.float32):
    """Load a ChatGLM folder with this repo's modeling code (not the folder's own copy, which may be the
    original remote code that no longer runs on current transformers)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    code_dir = str(Path(code_dir).resolve())
    config_cls = get_class_from_dynamic_module("configuration_chatglm.ChatGLMConfig", code_dir)
    model_cls = get_class_from_dynamic_module("modeling_chatglm.ChatGLMForConditionalGeneration", code_dir)
    config = config_cls.from_pretrained(folder)
    return _from_pretrained(model_cls, folder, dtype, config=config)


def load_glm(folder, dtype=torch.float32):
    try:
        from transformers import GlmForCausalLM
    except ImportError as exc:
        raise RuntimeError("--verify needs a transformers version with GlmForCausalLM (>= 4.46)") from exc
    return _from_pretrained(GlmForCausalLM, folder, dtype)


def compare_logits(chatglm_dir, glm_dir, code_dir=REPO, seq_len=16, batch=2, seed=0, dtype=torch.float32,
                   atol=1e-4, rtol=1e-4):
    """Run both models on the same random prompt; return (max abs diff, tolerance, same argmax)."""
    chatglm = load_chatglm(chatglm_dir, code_dir, dtype)
    vocab = chatglm.config.padded_vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a = chatglm(input_ids=ids).logits.float()
    del chatglm
    glm = load_glm(glm_dir, dtype)
    with torch.no_grad():
        b = glm(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    tol = atol + rtol * b.abs().max().item()
    return diff, tol, bool(torch.equal(a.argmax(-1), b.argmax(-1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source checkpoint folder (ChatGLM3, or Glm with --reverse)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--reverse", action="store_true", help="convert a Glm folder back to ChatGLM3")
    parser.add_argument("--dtype", default=None,
                        help="cast floating tensors (float16, bfloat16, float32); --verify then compares against the "
                             "uncast source, so loosen --atol/--rtol")
    parser.add_argument("--code-dir", default=str(REPO), help="folder with the ChatGLM3 remote code (this repo)")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in OUT")
    parser.add_argument("--verify", action="store_true", help="load both and compare logits on a random prompt")
    parser.add_argument("--verify-dtype", default="float32", help="dtype both models are loaded in for --verify")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    dtype = _torch_dtype(args.dtype)
    if args.reverse:
        files = convert_glm_to_chatglm(args.src, args.out, dtype, args.overwrite, args.code_dir)
    else:
        files = convert_chatglm_to_glm(args.src, args.out, dtype, args.overwrite, args.code_dir)
    print(f"wrote {len(files)} shard(s) to {args.out}")
    if args.verify:
        chatglm_dir, glm_dir = (args.out, args.src) if args.reverse else (args.src, args.out)
        diff, tol, same = compare_logits(chatglm_dir, glm_dir, args.code_dir, dtype=_torch_dtype(args.verify_dtype),
                                         atol=args.atol, rtol=args.rtol)
        print(f"verify: max |logits diff| = {diff:.3e} (tolerance {tol:.3e}), same argmax: {same}")
        if not math.isfinite(diff) or diff > tol:
            print("verify FAILED", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
