"""chat / stream_chat (ChatGLM3 chat models share these files) on a tiny random model with the published
vocabulary. Model replies are scripted with a logits processor so behaviour is checked exactly."""
import json
import shutil
import sys

import pytest
import torch
from transformers import LogitsProcessor

from support import SHARED_REFERENCE, load_model, make_model_dir

TOKENIZER_MODEL = SHARED_REFERENCE / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER_MODEL.exists(), reason=f"{TOKENIZER_MODEL} not available")
USER, ASSISTANT, OBSERVATION = 64795, 64796, 64797


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    folder = make_model_dir(tmp_path_factory.mktemp("chat"), padded_vocab_size=65024, num_layers=1)
    shutil.copyfile(TOKENIZER_MODEL, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def model(chat_dir):
    return load_model(chat_dir)


@pytest.fixture(scope="module")
def tokenizer(chat_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(chat_dir, trust_remote_code=True, use_fast=False)


def modeling_module(model):
    return sys.modules[type(model).__module__]


class Script(LogitsProcessor):
    """Force the model to emit ``tokens`` one per step; records the prompt it saw."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.prompt = None
        self.step = 0

    def __call__(self, input_ids, scores):
        if self.prompt is None:
            self.prompt = input_ids[0].tolist()
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[min(self.step, len(self.tokens) - 1)]] = 0
        self.step += 1
        return forced


def encode_reply(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_parse_tool_call_is_literal_only(model):
    parse = modeling_module(model).parse_tool_call
    assert parse("```python\ntool_call(city_name='北京', n=3, xs=[1, 2])\n```") == {
        "city_name": "北京", "n": 3, "xs": [1, 2]}
    for hostile in ("tool_call(x=__import__('os').system('echo pwned'))", "exec('1')", "tool_call(1, 2)",
                    "tool_call(**{'a': 1})", "tool_call(x=open('f'))", "tool_call(x=1"):
        with pytest.raises(ValueError):
            parse(hostile)


def test_process_response_formats(model):
    process = modeling_module(model).ChatMixin.process_response
    tools_history = [{"role": "system", "content": "x", "tools": [{"name": "get_weather"}]}]
    reply, hist = process(None, "get_weather\n```python\ntool_call(city_name='Paris')\n```", tools_history)
    assert reply == {"name": "get_weather", "parameters": {"city_name": "Paris"}}
    assert hist[-1]["metadata"] == "get_weather" and tools_history == [tools_history[0]]
    reply, _ = process(None, "interpreter\n```python\nprint(1)\n```", [])
    assert reply == {"name": "interpreter", "content": "```python\nprint(1)\n```"}
    reply, hist = process(None, "\n Hello there", [])
    assert reply == "Hello there" and hist[-1] == {"role": "assistant", "metadata": "", "content": "Hello there"}
    reply, _ = process(None, "no newline at all", [])  # the base's unguarded split raised here
    assert reply == "no newline at all"


def test_chat_plain_reply_and_history_untouched(model, tokenizer):
    reply_ids = encode_reply(tokenizer, "你好，我是人工智能助手。")
    script = Script(reply_ids + [USER])
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": "hello"}]
    before = json.dumps(history)
    response, new_history = model.chat(tokenizer, "你好", history=history, logits_processor=[script],
                                       do_sample=False)
    assert json.dumps(history) == before  # not mutated behind the caller's back
    assert response == "你好，我是人工智能助手。"
    assert new_history[-2] == {"role": "user", "content": "你好"}
    assert new_history[-1]["content"] == response
    expected_prompt = tokenizer.build_chat_input("你好", history=history)["input_ids"][0].tolist()
    assert script.prompt == expected_prompt


def test_chat_keeps_last_token_on_length_stop(model, tokenizer):
    reply_ids = encode_reply(tokenizer, "one two three four five six")
    script = Script(reply_ids)
    response, _ = model.chat(tokenizer, "count", logits_processor=[script], do_sample=False,
                             max_new_tokens=len(reply_ids))
    assert response == "one two three four five six"


def test_tool_call_and_observation_round_trip(model, tokenizer):
    tools = [{"name": "get_weather", "description": "weather", "parameters": {"city_name": "str"}}]
    history = [{"role": "system", "content": "Answer with tools.", "tools": tools}]
    call = "get_weather\n```python\ntool_call(city_name='Beijing')\n```"
    script = Script(encode_reply(tokenizer, call) + [OBSERVATION])
    response, history2 = model.chat(tokenizer, "Weather in Beijing?", history=history, logits_processor=[script],
                                     do_sample=False)
    assert response == {"name": "get_weather", "parameters": {"city_name": "Beijing"}}
    result = json.dumps({"temperature": 20})
    final = Script(encode_reply(tokenizer, "It is 20 degrees.") + [USER])
    answer, history3 = model.chat(tokenizer, result, history=history2, role="observation", logits_processor=[final],
                                  do_sample=False)
    assert answer == "It is 20 degrees."
    assert OBSERVATION in final.prompt and final.prompt[-1] == ASSISTANT
    assert history3[-2] == {"role": "observation", "content": result}


def test_stream_chat_streams_and_matches_chat(model, tokenizer):
    text = "流式输出：一二三四五"
    reply_ids = encode_reply(tokenizer, text)
    chunks = list(model.stream_chat(tokenizer, "hi", logits_processor=[Script(reply_ids + [USER])], do_sample=False))
    assert len(chunks) >= 3
    responses = [c[0] for c in chunks]
    assert responses[-1] == text
    assert all(text.startswith(r) for r in responses)  # prefixes, never broken characters
    assert all("\ufffd" not in r for r in responses)


def test_stream_chat_past_key_values_continues(model, tokenizer):
    first = list(model.stream_chat(tokenizer, "hi", do_sample=False, max_new_tokens=4, return_past_key_values=True))
    _, hist, past = first[-1]
    prev_ids = past._chatglm_token_ids
    second = list(model.stream_chat(tokenizer, "more", history=hist, past_key_values=past, do_sample=False,
                                    max_new_tokens=4, return_past_key_values=True))
    # Reference: the same token sequence run without any cache.
    query_ids = tokenizer.build_chat_input("more", role="user")["input_ids"]
    ids = torch.cat([prev_ids, query_ids], dim=1)
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                         use_cache=False, eos_token_id=[2, USER, OBSERVATION], pad_token_id=0)
    assert torch.equal(second[-1][2]._chatglm_token_ids, ref)
    with pytest.raises(ValueError, match="return_past_key_values"):
        next(model.stream_chat(tokenizer, "x", past_key_values=object()))
