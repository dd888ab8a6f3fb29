"""What transformers' ``generate()`` needs from the ChatGLM3 LM head: prompt checks, packing, the inputs of each
step (new tokens, position ids for left-padded batches, static-cache masks). Mixed into
``ChatGLMForConditionalGeneration`` before ``GenerationMixin``."""
import torch

from .compat import _causal_mask, _hf_create_causal_mask
from .masks import padding_queries_attend_everywhere, positions_from_mask


def _contiguous(t):  # as generate() makes them: a strided slice would recompile a compiled forward per step
    return t.clone(memory_format=torch.contiguous_format)


class GenerationSupport:  # (transformers 4.30's can_generate() rejects classes whose name holds "GenerationMixin")
    def generate(self, inputs=None, *args, **kwargs):
        """``GenerationMixin.generate`` with the prompt checked first, so that every transformers version gives
        the same clear ``ValueError`` (4.30 indexes an empty prompt before the model sees it, and generates one
        token for ``max_new_tokens=0``), and the weights in their inference layouts (``pack_weights``)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and kwargs.get("inputs_embeds") is None:
            if ids.dim() != 2 or ids.numel() == 0:
                raise ValueError(f"generate() needs a non-empty [batch, seq] prompt, got input_ids of shape "
                                 f"{tuple(ids.shape)}")
        mask = kwargs.get("attention_mask")
        if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
            # transformers 5 drops an all-ones mask before the model could notice its shape
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(ids.shape)} like "
                             f"input_ids")
        max_new = kwargs.get("max_new_tokens")
        if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0):
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {max_new!r}.")
        if not self.training:
            self.pack_weights()
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
        use_cache=None, **kwargs,
    ):
        """Works with the generate() of every supported transformers version: slices the new tokens using
        the cache length, keeps position ids right for left-padded batches (derived from the attention mask, or
        continued from the ones the tokenizer supplied), and passes every other model kwarg through."""
        past = kwargs.pop("cache", None)
        if past is None:
            past = past_key_values
        past_len = self.transformer.past_length(past)
        seq = kwargs.pop("next_sequence_length", None)  # transformers >= 5.24 says how many tokens are new
        if seq is None and kwargs.get("cache_position") is not None:  # 4.36 - 5.23
            seq = kwargs["cache_position"].shape[0]
        model_inputs = {}
        if inputs_embeds is not None and (past_len == 0 or input_ids.shape[1] == 0):
            # The prompt as embeddings (its start may already be in a cache from an earlier generate).
            if inputs_embeds.shape[1] <= past_len:
                raise ValueError(f"inputs_embeds has {inputs_embeds.shape[1]} positions but the cache already holds "
                                 f"{past_len}: pass the whole sequence (cached part included)")
            model_inputs["inputs_embeds"] = inputs_embeds[:, past_len:]
            total = inputs_embeds.shape[1]
            seq = total - past_len
        else:
            # New tokens: what generate says, else everything past the cache. After a prompt given as
            # inputs_embeds, input_ids holds only the generated tokens, so it can be shorter than the cache.
            total = input_ids.shape[1]
            if seq is None:
                seq = total - past_len if total > past_len else 1
            model_inputs["input_ids"] = _contiguous(input_ids[:, -seq:])
            total = max(total, past_len + seq)
        if position_ids is not None:
            missing = total - position_ids.shape[1]
            if missing > 0:  # transformers 4.x does not extend user-supplied position_ids
                step = torch.arange(1, missing + 1, device=position_ids.device, dtype=position_ids.dtype)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + step], dim=1)
            position_ids = _contiguous(position_ids[:, -seq:])
        elif attention_mask is not None:
            position_ids = positions_from_mask(attention_mask, seq).contiguous()
        if (getattr(past, "is_compileable", False) and _hf_create_causal_mask is not None and not self.config.pre_seq_len
                and attention_mask is not None and attention_mask.dim() == 2):
            # A static cache: the mask is built here, outside a compiled forward, at the cache's fixed size (as
            # generate() does for in-library models), so every decode step feeds the same shapes.
            stub = torch.empty(attention_mask.shape[0], seq, 0, device=attention_mask.device,
                               dtype=self.transformer.embedding.word_embeddings.weight.dtype)
            positions = kwargs.get("cache_position")
            if positions is None:
                positions = torch.arange(seq, device=attention_mask.device) + past_len
            full = _causal_mask(self.config, stub, attention_mask, past, positions, None)
            if full is not None:
                attention_mask = padding_queries_attend_everywhere(full, attention_mask, seq)
        model_inputs.update(
            past_key_values=past, position_ids=position_ids, attention_mask=attention_mask, use_cache=use_cache)
        if "logits_to_keep" not in kwargs:
            model_inputs["return_last_logit"] = True
        for key, value in kwargs.items():  # output_hidden_states, output_attentions, logits_to_keep, ...
            model_inputs.setdefault(key, value)
        return model_inputs

    def _reorder_cache(self, past_key_values, beam_idx):  # transformers < 4.42 beam search
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
