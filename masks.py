"""Input checks, position ids and attention masks of the ChatGLM3 decoder (batch-first).

Masks are bool ``[batch, 1, queries, keys]`` (True = attend), transformers' own masks where the installed version
builds them (``compat._causal_mask``: sized for the cache, in the format of the attention implementation), or None
with ``is_causal``. Nothing here reads a tensor back to the host in a decode step.
"""
import torch

from .compat import _causal_mask, _hf_create_causal_mask, _reads_values


def _is_integer(t):
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_inputs(vocab_size, embed_dtype, input_ids, inputs_embeds, attention_mask, position_ids, past_len, prefill):
    """ValueError for malformed inputs, before any compute; returns (batch, seq). Shapes and dtypes always; values
    (which read tensors back to the host) only at ``prefill``."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                        ("attention_mask", attention_mask), ("position_ids", position_ids)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input_ids is not None:
        if not _is_integer(input_ids):
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if prefill and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"input_ids contains token id {low if low < 0 else high}, outside the vocabulary "
                                 f"[0, {vocab_size})")
        batch, seq = input_ids.shape
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be 3-D, got shape {tuple(inputs_embeds.shape)}")
        batch, seq = inputs_embeds.shape[:2]
        if inputs_embeds.dtype != embed_dtype:
            raise ValueError(f"inputs_embeds has dtype {inputs_embeds.dtype}, but the model runs in {embed_dtype}")
    if batch == 0 or seq == 0:
        raise ValueError(f"empty input: batch={batch}, seq={seq}")
    if attention_mask is not None and attention_mask.dim() == 4:  # prepared by the caller (continuous batching)
        if attention_mask.shape[0] not in (1, batch) or attention_mask.shape[2] != seq:
            raise ValueError(f"a 4-D attention_mask must be [batch, 1, {seq}, keys], got {tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool and not attention_mask.dtype.is_floating_point:
            raise ValueError(f"a 4-D attention_mask must be bool (True = attend) or additive float, got dtype "
                             f"{attention_mask.dtype}")
    elif attention_mask is not None:
        # A cache counting on the device (static) has a tensor length: only the batch size is checked then.
        lengths = (seq, past_len + seq) if isinstance(past_len, int) else (attention_mask.shape[1],)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in lengths:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{batch}, "
                             f"{past_len + seq}] (batch, past + new tokens)")
        if prefill and attention_mask.numel() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
            raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got {bad!r}")
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}; expected [{batch}, {seq}] like input_ids")
        if not _is_integer(position_ids):
            raise ValueError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        if prefill and position_ids.numel() and int(position_ids.min()) < 0:
            raise ValueError(f"position_ids must be >= 0, got {int(position_ids.min())}")
    return batch, seq


def positions_from_mask(attention_mask, seq):
    """Position ids of the last ``seq`` tokens of a 2-D mask: left padding does not count."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    return positions[:, -seq:]


def padding_queries_attend_everywhere(mask, attention_mask, seq):
    """The published rule for padding positions (original code, diffusers' bundled Kolors encoder): a padding query
    attends to every key, so its row is never empty and its hidden states are those the original gives (Kolors
    feeds the padded rows of ``hidden_states[-2]`` to its UNet, bit for bit). Applied to transformers' bool (SDPA)
    or additive (eager) masks."""
    if not isinstance(mask, torch.Tensor) or attention_mask is None or attention_mask.dim() != 2:
        return mask
    pad_query = ~attention_mask[:, -seq:].bool()[:, None, :, None]  # [b, 1, seq, 1]
    return mask | pad_query if mask.dtype == torch.bool else mask.masked_fill(pad_query, 0.0)


def _own_mask(attention_mask, full_attention_mask, batch, seq, past_len, prefix_len, device):
    """(mask, is_causal) built here: transformers 4.30, p-tuning prefixes, the published ``full_attention_mask``.
    The keys are the prefix (``prefix_len``, always attended), the cache (``past_len``), then the new tokens."""
    start = prefix_len + past_len  # keys before the new tokens
    if full_attention_mask is not None:  # published convention: True = masked
        return ~full_attention_mask.bool(), False
    if attention_mask is not None and attention_mask.dim() == 4:  # already prepared (bool or additive)
        return attention_mask, False
    if attention_mask is None:
        if seq == 1:
            return None, False
        if start == 0:
            return None, True
        key_valid = None
    else:
        key_valid = attention_mask.bool()
        if key_valid.shape[1] == seq and past_len > 0:  # mask given for new tokens only
            key_valid = torch.cat([key_valid.new_ones(batch, past_len), key_valid], dim=1)
        if prefix_len:
            key_valid = torch.cat([key_valid.new_ones(batch, prefix_len), key_valid], dim=1)
        if seq == 1:  # a padding query attends to everything, so no row becomes NaN
            return key_valid[:, None, None, :] | ~key_valid[:, None, None, -1:], False
        if start == 0 and _reads_values() and bool(key_valid.all()):
            return None, True
    q_pos = torch.arange(start, start + seq, device=device)
    k_pos = torch.arange(start + seq, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(batch, 1, seq, start + seq)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :] | ~key_valid[:, None, -seq:, None]
    return mask, False


def decoder_mask(config, hidden_states, attention_mask, full_attention_mask, cache, past_len, prefix_len,
                 cache_position, position_ids):
    """(mask, is_causal) for the decoder's attention. ``past_len``: tokens in the cache, prefix not counted;
    ``position_ids``: as the caller gave them (transformers' masks use them to find packed sequences)."""
    batch, seq = hidden_states.shape[:2]
    if _hf_create_causal_mask is None or full_attention_mask is not None or prefix_len:
        return _own_mask(attention_mask, full_attention_mask, batch, seq, past_len, prefix_len, hidden_states.device)
    if (attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == seq
            and isinstance(past_len, int) and past_len > 0):  # a mask for the new tokens only
        attention_mask = torch.cat([attention_mask.new_ones(batch, past_len), attention_mask], dim=1)
    mask = _causal_mask(config, hidden_states, attention_mask, cache, cache_position, position_ids)
    mask = padding_queries_attend_everywhere(mask, attention_mask, seq)
    return mask, mask is None and seq > 1
