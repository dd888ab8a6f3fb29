"""Chat for ChatGLM3 chat checkpoints (the ChatGLM3 family shares these files; the base model only continues
text): ``chat`` / ``stream_chat``, the tool-call parser and the logits guard. Built on the public ``generate()``
API only; the model class provides ``_new_cache()`` and ``_cache_argument`` (the name generate() takes the cache
under)."""
import ast
import copy
import threading
from typing import Any, Dict, List, Optional

import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

STOP_ROLES = ("<|user|>", "<|observation|>")


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """If a step's scores are broken (NaN, +Inf, or nothing finite left), replace them by a distribution that
    picks token 5, as published. -Inf alone is normal: top-k/top-p and user processors use it to ban tokens."""

    def __call__(self, input_ids, scores):
        if torch.isnan(scores).any() or torch.isposinf(scores).any() or not torch.isfinite(scores).any(-1).all():
            scores = torch.zeros_like(scores)
            scores[..., 5] = 5e4
        return scores


def parse_tool_call(code: str) -> Dict[str, Any]:
    """Parse ``tool_call(a=1, b="x")`` (optionally inside a ```python fence) into ``{"a": 1, "b": "x"}``.

    Only keyword arguments with Python *literal* values are accepted (``ast.literal_eval``); model output is
    never evaluated as code. Raises ``ValueError`` for anything else."""
    lines = [line for line in code.strip().splitlines() if not line.strip().startswith("```")]
    source = "\n".join(lines).strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"tool call is not valid syntax: {source!r}") from exc
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError(f"expected tool_call(...), got {source!r}")
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError(f"tool_call takes keyword arguments only, got {source!r}")
    params = {}
    for kw in call.keywords:
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except ValueError as exc:
            raise ValueError(f"argument {kw.arg!r} of tool_call is not a literal") from exc
    return params


class ChatMixin:
    """``chat`` / ``stream_chat`` for ChatGLM3 chat checkpoints (the base model only continues text)."""

    def _chat_inputs(self, tokenizer, query, history, role):
        if not isinstance(query, str):
            raise ValueError(f"query must be a string, got {type(query).__name__}")
        history = copy.deepcopy(history) if history else []
        if not isinstance(history, list):
            raise ValueError("history must be a list of {'role': ..., 'content': ...} dicts")
        inputs = tokenizer.build_chat_input(query, history=history, role=role).to(self.device)
        stop_ids = [tokenizer.eos_token_id] + [tokenizer.get_command(t) for t in STOP_ROLES]
        return inputs, history, stop_ids

    def _chat_generate_kwargs(self, stop_ids, max_length, do_sample, top_p, temperature, logits_processor, kwargs):
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        gen = dict(max_length=max_length, do_sample=do_sample, eos_token_id=stop_ids, logits_processor=processors,
                   pad_token_id=stop_ids[0])
        if do_sample:
            gen.update(top_p=top_p, temperature=temperature)
        gen.update(kwargs)
        if "max_new_tokens" in gen:
            gen.pop("max_length")
        return gen

    @staticmethod
    def _strip_stop(tokens, stop_ids):
        """Drop the final token only if it is a stop token (the last real token survives a length stop)."""
        if len(tokens) and int(tokens[-1]) in stop_ids:
            tokens = tokens[:-1]
        return tokens

    def process_response(self, output: str, history: List[dict]):
        """Split a decoded reply into assistant turns; a tool call becomes ``{"name", "parameters"}``."""
        content = ""
        history = copy.deepcopy(history)
        for segment in output.split("<|assistant|>"):
            if not segment.strip():
                continue
            metadata, sep, content = segment.partition("\n")
            if not sep:  # no header line: the whole segment is content
                metadata, content = "", segment
            metadata = metadata.strip()
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            if metadata:
                tools_given = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
                if tools_given:
                    try:
                        content = {"name": metadata, "parameters": parse_tool_call(content)}
                    except ValueError:
                        content = {"name": metadata, "content": content}
                else:
                    content = {"name": metadata, "content": content}
        return content, history

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: Optional[List[dict]] = None, role: str = "user",
             max_length: int = 8192, num_beams: int = 1, do_sample: bool = True, top_p: float = 0.8,
             temperature: float = 0.8, logits_processor=None, **kwargs):
        """One chat turn. Returns ``(response, new_history)``; ``history`` itself is not modified.
        ``response`` is a string, or a dict ``{"name", "parameters"}`` when the model calls a tool."""
        inputs, history, stop_ids = self._chat_inputs(tokenizer, query, history, role)
        gen = self._chat_generate_kwargs(stop_ids, max_length, do_sample, top_p, temperature, logits_processor,
                                         dict(kwargs, num_beams=num_beams))
        outputs = self.generate(**inputs, **gen)
        tokens = self._strip_stop(outputs[0, inputs["input_ids"].shape[1]:].tolist(), stop_ids)
        response = tokenizer.decode(tokens)
        history.append({"role": role, "content": query})
        return self.process_response(response, history)

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history: Optional[List[dict]] = None, role: str = "user",
                    past_key_values=None, max_length: int = 8192, do_sample: bool = True, top_p: float = 0.8,
                    temperature: float = 0.8, logits_processor=None, return_past_key_values: bool = False,
                    **kwargs):
        """Yield ``(response_so_far, new_history)`` (plus the cache with ``return_past_key_values=True``) as
        tokens arrive. Passing back the returned cache as ``past_key_values`` continues the conversation
        without recomputing it (then ``history`` is not re-encoded, as in the published code)."""
        if past_key_values is not None:
            past_ids = getattr(past_key_values, "_chatglm_token_ids", None)
            if past_ids is None:
                raise ValueError("past_key_values must be the cache returned by stream_chat(..., "
                                 "return_past_key_values=True)")
            inputs, _, stop_ids = self._chat_inputs(tokenizer, query, None, role)
            history = copy.deepcopy(history) if history else []
            ids = torch.cat([past_ids.to(self.device), inputs["input_ids"]], dim=1)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            inputs, history, stop_ids = self._chat_inputs(tokenizer, query, history, role)
            inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        gen = self._chat_generate_kwargs(stop_ids, max_length, do_sample, top_p, temperature, logits_processor,
                                         kwargs)
        cache = past_key_values if past_key_values is not None else self._new_cache()
        prompt_len = inputs["input_ids"].shape[1]
        streamer = _TokenQueue()
        result = {}

        def run():
            try:
                result["ids"] = self.generate(**inputs, **gen, **{self._cache_argument: cache}, streamer=streamer)
            except BaseException as exc:  # surfaced in the consuming thread
                result["error"] = exc
            finally:
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        tokens: List[int] = []
        history.append({"role": role, "content": query})
        last = None
        for new in streamer:
            tokens.extend(new)
            response = tokenizer.decode(self._strip_stop(tokens, stop_ids))
            if response and not response.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                last = response
                reply, new_history = self.process_response(response, history)
                yield (reply, new_history, cache) if return_past_key_values else (reply, new_history)
        worker.join()
        if "error" in result:
            raise result["error"]
        cache._chatglm_token_ids = result["ids"].detach()
        response = tokenizer.decode(self._strip_stop(result["ids"][0, prompt_len:].tolist(), stop_ids))
        if response != last:
            reply, new_history = self.process_response(response, history)
            yield (reply, new_history, cache) if return_past_key_values else (reply, new_history)


class _TokenQueue:
    """A minimal streamer: ``generate`` puts token tensors, the consumer iterates lists of new token ids."""

    def __init__(self):
        import queue

        self._queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate first puts the prompt
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self):
        self._queue.put(None)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item
