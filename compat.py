"""Every difference between the supported transformers (4.30.2 to 5.x) and torch versions that the model code
meets, each found by a feature test (an import, a signature, a dataclass field), never by a version string. The
model imports what it needs from here; nothing here depends on the model."""
import dataclasses
import functools
import inspect
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 4.36
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import DynamicCache as _HFDynamicCache
except ImportError:  # transformers 4.30 - 4.35: no Cache classes
    _HFCache = _HFDynamicCache = None

try:  # transformers >= 4.40 exposes it here; 4.52+ no longer mixes it into PreTrainedModel
    from transformers.generation import GenerationMixin
except ImportError:  # pragma: no cover
    from transformers.generation.utils import GenerationMixin

# transformers 5.24 renamed the cache field of model outputs (and the forward kwarg) to ``cache``.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

try:  # transformers >= 4.52: the block base class that gradient_checkpointing_enable(...) configures
    from transformers.modeling_layers import GradientCheckpointingLayer

    _LEGACY_GRADIENT_CHECKPOINTING = False
except ImportError:  # transformers 4.30: the model's own _set_gradient_checkpointing(module, value) hook sets the flag
    _LEGACY_GRADIENT_CHECKPOINTING = True

    class GradientCheckpointingLayer(nn.Module):
        """Same contract as transformers' class: ``gradient_checkpointing`` on a block checkpoints its forward
        (positional arguments are the checkpointed inputs; the cache is dropped while checkpointing)."""

        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                kwargs["past_key_values"] = None
                return torch.utils.checkpoint.checkpoint(
                    functools.partial(super().__call__, **kwargs), *args, use_reentrant=False)
            return super().__call__(*args, **kwargs)

try:  # transformers >= 4.48: the attention-function registry (flex_attention, flash_attention_*, paged variants)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # transformers 4.30: our own eager / SDPA only
    ALL_ATTENTION_FUNCTIONS = None

try:  # transformers >= 4.53: the mask for every attention implementation and cache kind (static, sliding, paged)
    from transformers.masking_utils import create_causal_mask as _hf_create_causal_mask

    _MASK_PARAMS = frozenset(inspect.signature(_hf_create_causal_mask).parameters)
except ImportError:  # transformers 4.30: ChatGLMModel._attention_mask builds it
    _hf_create_causal_mask, _MASK_PARAMS = None, frozenset()

try:  # transformers >= 4.54: continuous batching's paged cache
    from transformers.generation.continuous_batching import PagedAttentionCache as _PagedCache
except ImportError:
    _PagedCache = None

# transformers 4.36 - 4.57: Cache.update(key, value, layer_idx, cache_kwargs) (a static cache writes at
# cache_kwargs["cache_position"]); 5.x: Cache.update(key, value, layer_idx, **kwargs) (paged caches read ``kwargs``).
_CACHE_KWARGS_DICT = _HFCache is not None and "cache_kwargs" in inspect.signature(_HFCache.update).parameters


def _cache_update(cache, key, value, layer_idx, cache_position, attn_kwargs):
    if not _CACHE_KWARGS_DICT:
        return cache.update(key, value, layer_idx, kwargs=attn_kwargs)
    if _PagedCache is not None and isinstance(cache, _PagedCache):
        return cache.update(key, value, layer_idx, **attn_kwargs)
    return cache.update(key, value, layer_idx, {"cache_position": cache_position})


def _causal_mask(config, embeds, attention_mask, cache, cache_position, position_ids):
    """transformers' ``create_causal_mask``, whose argument names differ between versions."""
    kwargs = {"config": config, "attention_mask": attention_mask}
    kwargs["inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds"] = embeds
    kwargs["cache" if "cache" in _MASK_PARAMS else "past_key_values"] = cache
    if "cache_position" in _MASK_PARAMS:
        kwargs["cache_position"] = cache_position
    if position_ids is not None:  # only ones the caller gave: transformers reads them to detect packed sequences
        kwargs["position_ids"] = position_ids
    return _hf_create_causal_mask(**kwargs)


# torch >= 2.5: SDPA takes ``enable_gqa``. It is a builtin without an inspectable signature; its docstring names it.
_SDPA_HAS_GQA = "enable_gqa" in (getattr(F.scaled_dot_product_attention, "__doc__", None) or "")


class _KVCache:
    """Minimal key/value cache for transformers versions without ``cache_utils`` (4.30-4.35).

    Same interface subset as ``DynamicCache``: ``update``, ``get_seq_length``, ``reorder_cache``.
    Tensors are ``[batch, kv_heads, seq, head_dim]``.
    """

    def __init__(self):
        self.key_cache: List[torch.Tensor] = []
        self.value_cache: List[torch.Tensor] = []

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx == len(self.key_cache):
            self.key_cache.append(key)
            self.value_cache.append(value)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx=0):
        return self.key_cache[layer_idx].shape[-2] if layer_idx < len(self.key_cache) else 0

    def reorder_cache(self, beam_idx):
        for i in range(len(self.key_cache)):
            self.key_cache[i] = self.key_cache[i].index_select(0, beam_idx.to(self.key_cache[i].device))
            self.value_cache[i] = self.value_cache[i].index_select(0, beam_idx.to(self.value_cache[i].device))

    def __len__(self):
        return len(self.key_cache)


def _new_cache(config):
    if _HFDynamicCache is None:
        return _KVCache()
    try:
        return _HFDynamicCache(config=config)
    except TypeError:  # transformers < 4.56: no config argument
        return _HFDynamicCache()


def _is_cache(obj):
    return (isinstance(obj, _KVCache) or (_HFCache is not None and isinstance(obj, _HFCache))
            or (_PagedCache is not None and isinstance(obj, _PagedCache)))


_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # (torch < 2.3: none)


def _reads_values():
    """Whether checks may read tensor values back to the host (and opaque C kernels may run): not while
    torch.compile / torch.export / jit trace the graph (there the values are symbolic; the shape and dtype checks
    still run)."""
    return not (_IS_COMPILING() or torch.jit.is_tracing())


def _make_output(cls, **fields):
    """Build a transformers output, naming the cache field the way the installed version does."""
    if "past_key_values" in fields and _CACHE_FIELD != "past_key_values":
        fields[_CACHE_FIELD] = fields.pop("past_key_values")
    return cls(**fields)
