"""ChatGLM3 model for Hugging Face transformers (remote code).

Architecture (ChatGLM3-6B): pre-norm decoder, RMSNorm, fused QKV projection with bias, grouped-query
attention (32 query heads, 2 key/value groups), rotary embedding on the first half of each head's
dimensions with interleaved pairs (GPT-J style, base ``10000 * rope_ratio``), SwiGLU MLP with a fused
gate/up projection, untied output layer.

Internally every tensor is batch-first ``[batch, seq, hidden]``; ``ChatGLMModel`` returns seq-first
*views* (``[seq, batch, hidden]``) because that is the published contract (Kolors, diffusers' KolorsPipeline).
Checkpoint keys, config fields and the quantized storage format are exactly those of the published files.

Everything that differs between transformers versions lives in ``compat.py``.
"""
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import logging

from .chat import STOP_ROLES, ChatMixin, InvalidScoreLogitsProcessor, parse_tool_call  # noqa: F401 (public names)
from .compat import (  # the transformers / torch version differences, by feature detection
    ALL_ATTENTION_FUNCTIONS,
    GenerationMixin,
    GradientCheckpointingLayer,
    _CACHE_FIELD,
    _cache_update,
    _hf_create_causal_mask,
    _is_cache,
    _LEGACY_GRADIENT_CHECKPOINTING,
    _make_output,
    _new_cache,
    _PagedCache,
    _reads_values,
    _SDPA_HAS_GQA,
)
from .configuration_chatglm import ChatGLMConfig
from .generation import GenerationSupport
from .linear import Linear, cpu_kernel, pack_model, unpack_model
from .loading import REMOTE_CODE_FILES, CheckpointIO  # noqa: F401 (REMOTE_CODE_FILES: public)
from .masks import check_inputs, decoder_mask, positions_from_mask
from .parallel import check_tensor_parallel  # noqa: F401 (public)
from .quantization import QuantizedLinear, quantization_backend, quantize, set_quantization_backend

if TYPE_CHECKING:
    # quantization.py and linear.py import the kernel modules lazily (cpu_kernels.py its C source); they are named
    # here too because transformers < 5 copies into its module cache only the files that this module imports (when
    # loading from a local folder).
    from .cpu_kernels import Avx512  # noqa: F401
    from .cpu_source import CPU_SOURCE  # noqa: F401
    from .cuda_kernels import launcher  # noqa: F401

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back to the input dtype (as the published model)."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states):
        steps = _step_kernels(hidden_states)
        out = steps and steps.rms_norm(hidden_states, self.weight, self.eps)
        if out is not None:
            return out
        input_dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(input_dtype)


def _c_kernels_may_run(x):
    """Whether this package's C kernels may stand in for torch ops on ``x``: a bf16 CPU tensor, not under autograd,
    a compiler or a tracer (to which a ctypes call is opaque)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled() and _reads_values()


def _step_kernels(x):
    """This package's CPU kernels for the small steps of a bf16 CPU inference forward (norms, rotary, SwiGLU: one
    call each instead of several torch ops, which after each weight stream run on evicted caches), or None where they
    may not run on ``x`` or the library does not build."""
    return cpu_kernel("steps") if _c_kernels_may_run(x) else None


def _norm(config, device=None):
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)


def _linear(config, in_features, out_features, bias, device=None):
    """A block linear: plain ``nn.Linear``, or an empty ``QuantizedLinear`` when the config says the
    checkpoint is quantized (so a quantized load never materialises full-precision weights)."""
    if config.quantization_bit:
        return QuantizedLinear(
            in_features, out_features, config.quantization_bit, bias=bias, dtype=torch.get_default_dtype(),
            device=device)
    return Linear(in_features, out_features, bias=bias, device=device)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first ``head_dim / 2`` dims of each head, interleaved pairs.

    ``inv_freq`` is kept only because the published checkpoint stores it (as fp16) under
    ``transformer.rotary_pos_emb.inv_freq``; the angles are computed from the config in float32 for the
    positions actually used, so positions beyond ``seq_length`` work and nothing depends on the stored values.
    """

    def __init__(self, config, device=None):
        super().__init__()
        self.rotary_dim = config.head_dim // 2  # 64 for ChatGLM3: half of each head is rotated
        self.base = 10000.0 * float(config.rope_ratio)
        self.register_buffer("inv_freq", self._compute_inv_freq(10000.0, device), persistent=True)

    def _compute_inv_freq(self, base, device=None):
        return 1.0 / (base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim))

    def forward(self, position_ids, dtype):
        """position_ids [b, s] -> (cos, sin), each [b, 1, s, rotary_dim / 2] in ``dtype``."""
        theta = self._compute_inv_freq(self.base, position_ids.device)
        angles = position_ids[:, None, :, None].float() * theta
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """x [b, heads, s, head_dim]; rotate adjacent pairs (x[2i], x[2i+1]) of the first 2*cos.shape[-1] dims."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x0, x1 = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def eager_attention_forward(q, k, v, mask, is_causal, dropout_p):
    """Reference attention with softmax in float32; also returns the probabilities ([b, heads, q, k]).
    mask: [b, 1, q, k], bool (True = attend) or additive float (transformers' eager masks), or None."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v), probs


def _sdpa_attention(q, k, v, mask, is_causal, dropout_p):
    groups = q.shape[1] // k.shape[1]
    single_query_mask = mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)
    if groups > 1 and q.shape[2] == 1 and not is_causal and single_query_mask:
        # One new token (decode): the ``groups`` query heads that share a key/value head become that head's query
        # rows, so SDPA runs on [b, kv_heads, groups, d] against the cache as is -- no key/value copies, and
        # 2 large problems instead of 32 tiny ones (the CPU kernel is ~25x faster at 2k context).
        b, h, _, d = q.shape
        if not dropout_p and _c_kernels_may_run(q):
            # this package's CPU kernel: 2-2.5x SDPA's (an opaque call: not inside torch.compile / export graphs)
            kernel = cpu_kernel("attention")
            if kernel is not None and kernel[0](q, k, v, mask):
                return kernel[1](q, k, v, mask), None
        out = F.scaled_dot_product_attention(
            q.reshape(b, k.shape[1], groups, d), k, v, attn_mask=mask, dropout_p=dropout_p)
        return out.reshape(b, h, 1, d), None
    if groups > 1:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True), None
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal), None


# eager and SDPA are ours (same math as transformers'; ours keep the GQA-folded decode step). Every other
# implementation the installed transformers registers (flex_attention, flash_attention_*, paged|eager, ...) goes
# through its attention interface.
ATTENTION_FUNCTIONS = {"eager": eager_attention_forward, "sdpa": _sdpa_attention}


def _attention_implementation(config):
    """The configured implementation (``config._attn_implementation``; SDPA where the version has no such field)."""
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in ATTENTION_FUNCTIONS and (ALL_ATTENTION_FUNCTIONS is None or impl not in ALL_ATTENTION_FUNCTIONS):
        known = sorted(set(ATTENTION_FUNCTIONS) | set(ALL_ATTENTION_FUNCTIONS or ()))
        raise ValueError(f"attn_implementation={impl!r} is not supported by ChatGLM; use one of {known}")
    return impl


class SelfAttention(nn.Module):
    """Fused QKV projection -> rotary -> cache -> attention (grouped-query) -> output projection."""

    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.q_size = config.num_attention_heads * self.head_dim
        self.kv_size = config.num_key_value_heads * self.head_dim
        # read by transformers' attention functions
        self.is_causal = True
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.query_key_value = _linear(
            config, config.hidden_size, self.q_size + 2 * self.kv_size,
            bias=config.add_bias_linear or config.add_qkv_bias, device=device)
        self.dense = _linear(config, self.q_size, config.hidden_size, bias=config.add_bias_linear, device=device)

    def forward(self, hidden_states, rotary, mask, is_causal, prefix_key=None, prefix_value=None,
                past_key_values=None, output_attentions=False, cache_position=None, attn_kwargs=None):
        """hidden_states [b, s, hidden]; ``prefix_key/value``: this layer's p-tuning prefix when no cache holds it;
        ``attn_kwargs``: what transformers passes to its caches and attention functions (paged attention indices).
        Returns (output [b, s, hidden], attention probabilities or None)."""
        b, s, _ = hidden_states.shape
        qkv, (cos, sin) = self.query_key_value(hidden_states), rotary
        steps = _step_kernels(qkv)  # (the C kernel rotates the query and key heads of qkv in place)
        rotated = steps is not None and steps.rotary_(qkv, (self.q_size + self.kv_size) // self.head_dim,
                                                      self.head_dim, cos, sin)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        if not rotated:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn_kwargs = dict(attn_kwargs) if attn_kwargs else {}  # a paged cache rewrites its copy
        if past_key_values is not None:
            k, v = _cache_update(past_key_values, k, v, self.layer_idx, cache_position, attn_kwargs)
        elif prefix_key is not None:
            k, v = torch.cat((prefix_key, k), dim=2), torch.cat((prefix_value, v), dim=2)
        impl = "eager" if output_attentions else _attention_implementation(self.config)
        dropout_p = self.attention_dropout if self.training else 0.0
        if impl in ATTENTION_FUNCTIONS:
            out, probs = ATTENTION_FUNCTIONS[impl](q, k, v, mask, is_causal, dropout_p)
            out = out.transpose(1, 2)
        else:  # transformers' attention interface, called the way in-library models do: out [b, s, heads, head_dim]
            if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # transformers 5
                attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
            else:
                attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            out, probs = attention(self, q, k, v, mask, dropout=dropout_p, scaling=self.scaling, **attn_kwargs)
        return self.dense(out.reshape(b, s, -1)), probs


class MLP(nn.Module):
    """SwiGLU: ``dense_h_to_4h`` holds [gate; up] stacked; silu(gate) * up -> ``dense_4h_to_h``."""

    def __init__(self, config, device=None):
        super().__init__()
        self.dense_h_to_4h = _linear(
            config, config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear, device=device)
        self.dense_4h_to_h = _linear(
            config, config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear, device=device)

    def forward(self, hidden_states):
        stacked = self.dense_h_to_4h(hidden_states)
        steps = _step_kernels(stacked)
        act = steps and steps.silu_mul(stacked)
        if act is None:
            gate, up = stacked.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return self.dense_4h_to_h(act)


class GLMBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.layer_number = layer_idx + 1  # 1-based, as published
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = _norm(config, device)
        self.self_attention = SelfAttention(config, layer_idx, device=device)
        self.post_attention_layernorm = _norm(config, device)
        self.mlp = MLP(config, device=device)

    def _dropout(self, x):
        return F.dropout(x, p=self.hidden_dropout, training=True) if self.training and self.hidden_dropout else x

    def forward(self, hidden_states, rotary, mask, is_causal, prefix_key=None, prefix_value=None,
                past_key_values=None, output_attentions=False, cache_position=None, attn_kwargs=None):
        # The prefix comes as two positional tensors: checkpointing then keeps their gradients (p-tuning v2).
        normed = self.input_layernorm(hidden_states)
        attn, probs = self.self_attention(normed, rotary, mask, is_causal, prefix_key, prefix_value,
                                          past_key_values=past_key_values, output_attentions=output_attentions,
                                          cache_position=cache_position, attn_kwargs=attn_kwargs)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden_states = residual + self._dropout(attn)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        return residual + self._dropout(self.mlp(normed)), probs


class GLMTransformer(nn.Module):
    """The stack of blocks plus the final norm (``transformer.encoder`` in the checkpoint)."""

    def __init__(self, config, device=None):
        super().__init__()
        self.num_layers = config.num_layers
        self.layers = nn.ModuleList([GLMBlock(config, i, device=device) for i in range(config.num_layers)])
        self.final_layernorm = _norm(config, device) if config.post_layer_norm else None

    def forward(self, hidden_states, rotary, mask, is_causal, prefixes=None, cache=None, output_hidden_states=False,
                output_attentions=False, seq_first=False, cache_position=None, attn_kwargs=None):
        """Returns (final hidden states, per-layer inputs + last layer output or None, attention probs or None).

        With ``seq_first`` the collected hidden states are ``[seq, batch, hidden]`` views that the next layer
        reads back through, so they stay on the autograd graph (``retain_grad`` works on them)."""
        all_hidden = [] if output_hidden_states else None
        all_probs = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                hidden_states = self._collect(all_hidden, hidden_states, seq_first)
            prefix = prefixes[i] if prefixes is not None else (None, None)
            hidden_states, probs = layer(hidden_states, rotary, mask, is_causal, *prefix, past_key_values=cache,
                                         output_attentions=output_attentions, cache_position=cache_position,
                                         attn_kwargs=attn_kwargs)
            if all_probs is not None:
                all_probs.append(probs)
        if all_hidden is not None:  # last layer's output, before the final norm (published contract)
            hidden_states = self._collect(all_hidden, hidden_states, seq_first)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, all_hidden, all_probs

    @staticmethod
    def _collect(store, hidden_states, seq_first):
        if not seq_first:
            store.append(hidden_states)
            return hidden_states
        view = hidden_states.transpose(0, 1)
        store.append(view)
        return view.transpose(0, 1)


class Embedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
        return embeddings.float() if self.fp32_residual_connection else embeddings


class PrefixEncoder(nn.Module):
    """P-tuning v2: learned per-layer key/value prefixes, optionally through a 2-layer MLP."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * config.head_dim * config.num_kv_heads * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if self.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size))

    def forward(self, prefix_tokens):
        prefix = self.embedding(prefix_tokens)
        return self.trans(prefix) if self.prefix_projection else prefix


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained-model plumbing
# ---------------------------------------------------------------------------------------------------------------------
class ChatGLMPreTrainedModel(CheckpointIO, PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    is_parallelizable = False
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    # transformers' attention interface (flex, flash, paged) where the installed version has it
    _supports_attention_backend = ALL_ATTENTION_FUNCTIONS is not None
    _supports_flex_attn = ALL_ATTENTION_FUNCTIONS is not None
    _supports_flash_attn = ALL_ATTENTION_FUNCTIONS is not None
    _supports_flash_attn_2 = ALL_ATTENTION_FUNCTIONS is not None
    _supports_static_cache = _hf_create_causal_mask is not None  # masks sized for a StaticCache
    _can_compile_fullgraph = _hf_create_causal_mask is not None
    _keys_to_ignore_on_load_missing = [r"rotary_pos_emb\.inv_freq"]

    def pack_weights(self):
        """The named conversion to inference layouts (``generate`` calls it; ``linear.pack_model``): quantized
        layers to their kernel's layout (``QuantizedLinear.pack``), bf16 CPU linears to theirs (``Linear.pack``).
        ``parameters()``, ``num_parameters()`` and ``get_memory_footprint()`` of unquantized models stay the same;
        ``train()``, ``.to()``, ``state_dict()``, saving and :meth:`unpack_weights` undo it."""
        return pack_model(self)

    def unpack_weights(self):
        """Every layer back to its dense / stored weights (what :meth:`pack_weights` did, undone)."""
        return unpack_model(self)

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            with torch.no_grad():
                module.inv_freq.copy_(module._compute_inv_freq(10000.0, module.inv_freq.device))

    if _LEGACY_GRADIENT_CHECKPOINTING:  # transformers 4.30 calls model.apply(partial(fn, value=...))
        def _set_gradient_checkpointing(self, module, value=False):
            if isinstance(module, GLMBlock):
                module.gradient_checkpointing = value

    def quantize(self, bits: int, **kwargs):
        """Weight-only int8 / int4 quantization in place (``quantize_output_layer=True`` also quantizes
        ``output_layer``): see quantization.quantize, the one entry point."""
        return quantize(self.unpack_weights(), bits, **kwargs)

    def get_decoder(self):
        """The batch-first body (``base_model``); ``self.transformer`` is the seq-first published one."""
        return self.base_model

    @property
    def base_model(self):
        """transformers' accessor of the body without the head. For the heads it is a batch-first view of
        ``self.transformer`` (``ChatGLMBatchFirstModel``: the same module, parameters and hooks, whose ``forward``
        returns ``[batch, seq, hidden]`` like every in-library base model), so generic code that runs
        ``model.base_model(**batch).last_hidden_state`` (TRL's fused LM head) works; ``model.transformer`` itself
        keeps the published seq-first contract. A bare ``ChatGLMModel`` is its own base model (seq-first)."""
        body = None if isinstance(self, ChatGLMModel) else self.__dict__.get("_modules", {}).get("transformer")
        return self if body is None else ChatGLMBatchFirstModel.view_of(body)


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The bare transformer (``model.transformer``). Outputs are seq-first ``[seq, batch, hidden]``."""

    seq_first = True  # the published layout of forward's inputs_embeds and outputs

    def __init__(self, config: ChatGLMConfig, device=None, empty_init=True):
        super().__init__(config)
        self.num_layers = config.num_layers
        self.multi_query_group_num = config.multi_query_group_num
        self.kv_channels = config.kv_channels
        self.seq_length = config.seq_length
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        self.embedding = Embedding(config, device=device)
        self.rotary_pos_emb = RotaryEmbedding(config, device=device)
        self.encoder = GLMTransformer(config, device=device)
        if config.quantization_bit and config.quantize_output_layer:
            self.output_layer = QuantizedLinear(config.hidden_size, config.padded_vocab_size, config.quantization_bit,
                                                bias=False, dtype=torch.get_default_dtype(), device=device)
        else:
            self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
            self.output_layer.prepack = not config.tie_word_embeddings  # a tied weight is the embedding table too
        if config.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(0.1)
        self.post_init()
        self.freeze_for_prefix_tuning()

    def freeze_for_prefix_tuning(self):
        """P-tuning v2: only ``prefix_encoder`` trains; every other parameter of the transformer is frozen."""
        if self.pre_seq_len is None:
            return
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith("prefix_encoder.")

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_prompt(self, batch_size, device, dtype):
        """P-tuning v2 prefix: per layer (key, value), each [batch, kv_heads, pre_seq_len, head_dim]."""
        cfg = self.config
        tokens = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        prefix = self.dropout(self.prefix_encoder(tokens).to(dtype))
        prefix = prefix.view(batch_size, self.pre_seq_len, cfg.num_layers * 2, cfg.num_key_value_heads, cfg.head_dim)
        prefix = prefix.permute(2, 0, 3, 1, 4)  # [layers*2, b, kv_heads, pre_seq_len, head_dim]
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(cfg.num_layers)]

    def past_length(self, cache):
        """Tokens a cache holds, not counting the p-tuning prefix (which a used cache starts with). An int, or a
        0-d tensor for caches that count on the device (static caches), so that nothing is read back per token."""
        if cache is None or (_PagedCache is not None and isinstance(cache, _PagedCache)):
            return 0  # continuous batching gives positions and masks itself
        held = cache.get_seq_length()
        if not self.pre_seq_len:
            return held
        return held - self.pre_seq_len if held else 0

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, full_attention_mask=None,
            past_key_values=None, inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None,
            output_attentions=None, cache=None, **kwargs):
        """The published interface: ``inputs_embeds`` and every output are seq-first ``[seq, batch, hidden]``
        (batch-first for the ``ChatGLMBatchFirstModel`` view)."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        if self.seq_first and inputs_embeds is not None:
            inputs_embeds = inputs_embeds.transpose(0, 1)
        outputs = self.run(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            full_attention_mask=full_attention_mask, past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, seq_first=self.seq_first, **kwargs)
        return outputs if return_dict else outputs.to_tuple()

    def run(self, input_ids=None, position_ids=None, attention_mask=None, full_attention_mask=None,
            past_key_values=None, inputs_embeds=None, use_cache=None, output_hidden_states=None,
            output_attentions=None, seq_first=False, cache_position=None, **attn_kwargs):
        """The decoder, batch-first: ``inputs_embeds`` [batch, seq, hidden]; outputs batch-first, or seq-first
        views with ``seq_first=True`` (what ``forward`` returns). Both heads call this. ``cache_position`` (the
        cache slots of the new tokens) and ``attn_kwargs`` come from transformers' generate / continuous
        batching and go to the cache and the attention functions."""
        cfg = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        if output_attentions and _attention_implementation(cfg) != "eager":  # as in-library models: warn, return none
            logger.warning_once(f"`{_attention_implementation(cfg)}` attention does not return attention weights "
                                f"(output_attentions=True): load the model with attn_implementation=\"eager\"")
            output_attentions = False
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        past = past_key_values
        if past is not None and not _is_cache(past):
            raise ValueError(
                f"past_key_values must be a transformers Cache (e.g. DynamicCache) as returned by this model, "
                f"got {type(past).__name__}; legacy tuple caches are not supported")
        if use_cache and self.training and any(layer.gradient_checkpointing for layer in self.encoder.layers):
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False
        if use_cache and past is None:
            past = _new_cache(cfg)

        paged = _PagedCache is not None and isinstance(past, _PagedCache)
        prefix_len = self.pre_seq_len or 0
        if prefix_len and (paged or getattr(past, "is_compileable", False)):
            raise ValueError("a p-tuning v2 prefix needs a dynamic cache (DynamicCache), not "
                             f"{type(past).__name__}")
        past_len = self.past_length(past)
        # Values are checked once, at prefill in eager mode: a decode step reads nothing back to the host.
        prefill = not paged and isinstance(past_len, int) and past_len == 0 and _reads_values()
        batch, seq = check_inputs(cfg.padded_vocab_size, self.embedding.word_embeddings.weight.dtype, input_ids,
                                  inputs_embeds, attention_mask, position_ids, past_len, prefill)
        if inputs_embeds is None:
            if input_ids.dtype not in (torch.int32, torch.int64):  # uint8/int8/int16: nn.Embedding wants int32/64
                input_ids = input_ids.long()
            hidden_states = self.embedding(input_ids)
        else:
            hidden_states = inputs_embeds
        device = hidden_states.device

        # P-tuning v2: the prefix keys/values come first. With a cache they are written into it once (and
        # ``past_length`` discounts them); without one each layer prepends its prefix.
        prefixes = None
        if prefix_len and past_len == 0:
            prefixes = self.get_prompt(batch, device, hidden_states.dtype)
            if past is not None:
                for i, (k, v) in enumerate(prefixes):
                    past.update(k, v, i)
                prefixes = None

        if cache_position is None:
            cache_position = torch.arange(seq, device=device) + past_len
        given_positions = position_ids
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = positions_from_mask(attention_mask, seq)
            else:
                position_ids = (torch.arange(seq, device=device) + past_len).unsqueeze(0)
        if prefill and int(position_ids.max()) >= self.seq_length:
            logger.warning_once(f"a position is beyond config.seq_length ({self.seq_length}); rotary angles are "
                                f"computed exactly, but the model was not trained that far")
        rotary = self.rotary_pos_emb(position_ids, hidden_states.dtype)
        mask, is_causal = decoder_mask(cfg, hidden_states, attention_mask, full_attention_mask, past, past_len,
                                       prefix_len, cache_position, given_positions)
        hidden_states, all_hidden, all_probs = self.encoder(
            hidden_states, rotary, mask, is_causal, prefixes=prefixes, cache=past,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, seq_first=seq_first,
            cache_position=cache_position, attn_kwargs=attn_kwargs)
        return _make_output(
            BaseModelOutputWithPast, last_hidden_state=hidden_states.transpose(0, 1) if seq_first else hidden_states,
            past_key_values=past if use_cache else None, hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_probs) if all_probs is not None else None)

class ChatGLMBatchFirstModel(ChatGLMModel):
    """A batch-first view of a ``ChatGLMModel``: what the heads' ``base_model`` and ``get_decoder()`` return.

    It shares the viewed model's whole state (one ``__dict__``: submodules, parameters, buffers, config, hooks,
    training flag), so reading or changing it reads or changes the model; it is never registered as a submodule
    and adds nothing to ``state_dict``. Only ``forward`` differs: ``inputs_embeds`` and every output are
    ``[batch, seq, ...]`` (``ChatGLMModel.run``), as for transformers' own base models."""

    seq_first = False

    def __init__(self, *args, **kwargs):
        raise ValueError("ChatGLMBatchFirstModel is a view, not built on its own: use model.base_model / "
                         "model.get_decoder(), or ChatGLMBatchFirstModel.view_of(chatglm_model)")

    @classmethod
    def view_of(cls, model):
        if not isinstance(model, ChatGLMModel):
            raise ValueError(f"view_of needs a ChatGLMModel, got {type(model).__name__}")
        if isinstance(model, cls):
            return model
        view = object.__new__(cls)
        object.__setattr__(view, "__dict__", model.__dict__)
        return view


class ChatGLMForConditionalGeneration(ChatMixin, GenerationSupport, ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM3 with its language-model head (``output_layer``). Logits are ``[batch, seq, vocab]``."""

    _tied_weights_keys = {}
    _cache_argument = _CACHE_FIELD  # generate()'s name for the cache (chat code passes one)

    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.seq_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.config = config
        self.post_init()

    @property
    def quantized(self):
        return bool(self.config.quantization_bit)

    def _new_cache(self):
        return _new_cache(self.config)

    def get_output_embeddings(self):
        layer = self.transformer.output_layer
        return layer.unpack() if isinstance(layer, Linear) else layer  # whoever takes it reads its weight

    def set_output_embeddings(self, new_embeddings):
        self.transformer.output_layer = new_embeddings

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
            inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
            return_dict=None, return_last_logit=False, logits_to_keep=0, cache=None, num_items_in_batch=None,
            shift_labels=None, **kwargs):
        """Batch-first throughout (transformers convention): ``inputs_embeds`` [batch, seq, hidden], logits
        [batch, seq, vocab], hidden states [batch, seq, hidden]. ``shift_labels`` (already shifted targets, as
        transformers passes for context parallelism) replaces ``labels``."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.transformer.run(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            **kwargs)
        hidden_states = outputs.last_hidden_state
        if return_last_logit:
            logits_to_keep = 1
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep (continuous batching)
            hidden_states = hidden_states[:, logits_to_keep]
        elif logits_to_keep:  # the last n positions
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.transformer.output_layer(hidden_states)

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function_chatglm(logits, labels, num_items_in_batch, shift_labels=shift_labels)
        out = _make_output(CausalLMOutputWithPast, loss=loss, logits=logits,
                           past_key_values=getattr(outputs, _CACHE_FIELD), hidden_states=outputs.hidden_states,
                           attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()

    @staticmethod
    def loss_function_chatglm(logits, labels, num_items_in_batch=None, shift_labels=None):
        """Next-token cross entropy in float32. With ``num_items_in_batch`` (Trainer with gradient
        accumulation) the sum is divided by that count, so accumulated steps add up to the true mean."""
        if shift_labels is not None:
            if shift_labels.shape != logits.shape[:2]:
                raise ValueError(f"shift_labels shape {tuple(shift_labels.shape)} does not match input shape "
                                 f"{tuple(logits.shape[:2])}")
            flat_logits = logits.float().reshape(-1, logits.shape[-1])
            targets = shift_labels.reshape(-1)
        else:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match input shape "
                                 f"{tuple(logits.shape[:2])}")
            flat_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            targets = labels[:, 1:].reshape(-1)
        targets = targets.to(flat_logits.device)
        if num_items_in_batch is None:
            return F.cross_entropy(flat_logits, targets, ignore_index=-100)
        loss = F.cross_entropy(flat_logits, targets, ignore_index=-100, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch

    # -- quantization -------------------------------------------------------------------------------------------------
    def quantization_backend(self) -> str:
        """Which compute backend runs the quantized linears (e.g. ``cpu-int4pack``; ``none`` if not quantized)."""
        return quantization_backend(self)

    @staticmethod
    def set_quantization_backend(name):
        """Force a quantized-matmul backend for every model using this code (``None``/``"auto"``: automatic)."""
        set_quantization_backend(name)


class ChatGLMForSequenceClassification(ChatGLMPreTrainedModel):
    """Classification head on the last non-padding token (works with left or right padding)."""

    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.classifier_head = nn.Linear(config.hidden_size, config.num_labels, bias=True, device=device)
        self.dropout = nn.Dropout(config.classifier_dropout) if config.classifier_dropout is not None else None
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, full_attention_mask=None,
            past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
            return_dict=None, output_attentions=None, **kwargs):
        """Batch-first, like the LM head: ``inputs_embeds`` [batch, seq, hidden], hidden states [b, s, h]."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.transformer.run(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            full_attention_mask=full_attention_mask, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        hidden = outputs.last_hidden_state  # [b, s, h]
        batch, seq = hidden.shape[:2]
        if attention_mask is not None:
            mask = attention_mask[:, -seq:].long()
            last = (torch.arange(seq, device=mask.device) * mask).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = (input_ids != self.config.pad_token_id).long()
            last = (torch.arange(seq, device=real.device) * real).argmax(-1)
        else:
            last = torch.full((batch,), seq - 1, device=hidden.device, dtype=torch.long)
        pooled = hidden[torch.arange(batch, device=hidden.device), last.to(hidden.device)]
        if self.dropout is not None:
            pooled = self.dropout(pooled)
        logits = self.classifier_head(pooled.to(self.classifier_head.weight.dtype))

        loss = None
        if labels is not None:
            loss = self._classification_loss(logits, labels)
        out = _make_output(SequenceClassifierOutputWithPast, loss=loss, logits=logits,
                           past_key_values=getattr(outputs, _CACHE_FIELD), hidden_states=outputs.hidden_states,
                           attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()

    def _classification_loss(self, logits, labels):
        cfg = self.config
        if cfg.problem_type is None:
            if self.num_labels == 1:
                cfg.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                cfg.problem_type = "single_label_classification"
            else:
                cfg.problem_type = "multi_label_classification"
        logits = logits.float()
        if cfg.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1) if self.num_labels == 1 else logits, labels.float())
        if cfg.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.float())