"""transformers pipelines and streamers on a tiny random model + the ChatGLM3 tokenizer (the published
vocabulary when available, else a small SentencePiece model trained here)."""
import threading

import pytest
import torch

from support import load_model
from tokenizer_helpers import model_dir_with_tokenizer

def _pipeline_keeps_special_tokens():
    import inspect
    from transformers.pipelines.text_generation import TextGenerationPipeline
    return "add_special_tokens" in inspect.signature(TextGenerationPipeline.preprocess).parameters


needs_modern_pipeline = pytest.mark.skipif(
    not _pipeline_keeps_special_tokens(),
    reason="this transformers' text-generation pipeline tokenizes prompts without special tokens (no [gMASK] sop "
           "prefix) and does not load remote tokenizers by itself (transformers < 4.3x)")

PROMPTS = ["今天天气真不错", "Hello world, this is a much longer prompt than the first one"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return model_dir_with_tokenizer(tmp_path_factory.mktemp("pipe"), num_layers=1)


@pytest.fixture(scope="module")
def lm(lm_dir):
    return load_model(lm_dir)


@pytest.fixture(scope="module")
def tok(lm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(lm_dir, trust_remote_code=True)


def generate_alone(lm, tok, prompt, n=6):
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        return lm.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)[0]


def strip_left_pad(ids, pad_id):
    ids = list(ids)
    while ids and ids[0] == pad_id:
        ids.pop(0)
    return ids


@needs_modern_pipeline
def test_text_generation_pipeline_equals_generate(lm_dir, lm, tok):
    from transformers import pipeline
    pipe = pipeline("text-generation", model=str(lm_dir), trust_remote_code=True)
    for prompt in PROMPTS:
        out = pipe(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)[0]
        assert list(out["generated_token_ids"]) == generate_alone(lm, tok, prompt).tolist()
        text = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
        expected_new = tok.decode(generate_alone(lm, tok, prompt)[len(tok(prompt)["input_ids"]):],
                                  skip_special_tokens=True)
        assert text.startswith(prompt)
        assert text[len(prompt):].strip() == expected_new.strip()


@needs_modern_pipeline
def test_batched_pipeline_with_padding_equals_single(lm_dir, lm, tok):
    from transformers import pipeline
    pipe = pipeline("text-generation", model=lm, tokenizer=tok)
    outs = pipe(PROMPTS, batch_size=2, max_new_tokens=6, do_sample=False, return_tensors=True)
    for prompt, out in zip(PROMPTS, outs):
        ids = strip_left_pad(out[0]["generated_token_ids"], tok.pad_token_id)
        assert ids == generate_alone(lm, tok, prompt).tolist(), prompt


def test_streamers(lm, tok):
    from transformers import TextIteratorStreamer, TextStreamer
    prompt = PROMPTS[0]
    full = generate_alone(lm, tok, prompt, n=8)
    n_prompt = len(tok(prompt)["input_ids"])
    expected = tok.decode(full[n_prompt:], skip_special_tokens=True)

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    inputs = tok(prompt, return_tensors="pt")
    worker = threading.Thread(target=lm.generate, kwargs=dict(
        **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, streamer=streamer))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == expected
    assert all("\ufffd" not in p for p in pieces)

    printed = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    with torch.no_grad():
        lm.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                    streamer=Capture(tok, skip_prompt=True, skip_special_tokens=True))
    assert "".join(printed) == expected
