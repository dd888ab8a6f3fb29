"""The model inside transformers' own machinery and its companion libraries: pipelines and streamers, PEFT (LoRA
and p-tuning v2), Trainer with gradient accumulation, and accelerate's big-model loading (device_map with CPU and disk
offload, init_empty_weights + load_checkpoint_and_dispatch). Tiny random models through the real trust_remote_code
path; the pipelines use conftest.py's lm_dir / lm_tokenizer (the published vocabulary when available, else a small
SentencePiece model trained here). Tools outside transformers (TRL, lm-eval, llama.cpp, diffusers): test_clients.py."""
import importlib.util
import inspect
import threading

import pytest
import torch

from support import greedy, lm_batch, load_model, logits_of, make_model_dir, random_ids

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="accelerate is not installed")


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
def lm(lm_dir):
    return load_model(lm_dir)


def generate_alone(lm, lm_tokenizer, prompt, n=6):
    inputs = lm_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return lm.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=lm_tokenizer.pad_token_id)[0]


def strip_left_pad(ids, pad_id):
    ids = list(ids)
    while ids and ids[0] == pad_id:
        ids.pop(0)
    return ids


@needs_modern_pipeline
def test_text_generation_pipeline_equals_generate(lm_dir, lm, lm_tokenizer):
    from transformers import pipeline
    pipe = pipeline("text-generation", model=str(lm_dir), trust_remote_code=True)
    for prompt in PROMPTS:
        out = pipe(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)[0]
        assert list(out["generated_token_ids"]) == generate_alone(lm, lm_tokenizer, prompt).tolist()
        text = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
        expected_new = lm_tokenizer.decode(generate_alone(lm, lm_tokenizer, prompt)[len(lm_tokenizer(prompt)["input_ids"]):],
                                  skip_special_tokens=True)
        assert text.startswith(prompt)
        assert text[len(prompt):].strip() == expected_new.strip()


@needs_modern_pipeline
def test_batched_pipeline_with_padding_equals_single(lm_dir, lm, lm_tokenizer):
    from transformers import pipeline
    pipe = pipeline("text-generation", model=lm, tokenizer=lm_tokenizer)
    outs = pipe(PROMPTS, batch_size=2, max_new_tokens=6, do_sample=False, return_tensors=True)
    for prompt, out in zip(PROMPTS, outs):
        ids = strip_left_pad(out[0]["generated_token_ids"], lm_tokenizer.pad_token_id)
        assert ids == generate_alone(lm, lm_tokenizer, prompt).tolist(), prompt


def test_streamers(lm, lm_tokenizer):
    from transformers import TextIteratorStreamer, TextStreamer
    prompt = PROMPTS[0]
    full = generate_alone(lm, lm_tokenizer, prompt, n=8)
    n_prompt = len(lm_tokenizer(prompt)["input_ids"])
    expected = lm_tokenizer.decode(full[n_prompt:], skip_special_tokens=True)

    streamer = TextIteratorStreamer(lm_tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = lm_tokenizer(prompt, return_tensors="pt")
    worker = threading.Thread(target=lm.generate, kwargs=dict(
        **inputs, max_new_tokens=8, do_sample=False, pad_token_id=lm_tokenizer.pad_token_id, streamer=streamer))
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
        lm.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=lm_tokenizer.pad_token_id,
                    streamer=Capture(lm_tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert "".join(printed) == expected


# =====================================================================================================================
# PEFT: LoRA and p-tuning v2
# =====================================================================================================================
def train_steps(model, ids, labels, steps=5, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@needs_peft
@pytest.mark.parametrize("targets", [None, ["dense", "dense_h_to_4h", "dense_4h_to_h"]],
                         ids=["default-query_key_value", "dense-mlp"])
def test_lora_trains_with_gradient_checkpointing_and_merges(tiny_dir, targets):
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_dir)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    assert model.is_gradient_checkpointing
    kwargs = {} if targets is None else {"target_modules": targets}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, **kwargs))
    lora_modules = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert lora_modules == ({"query_key_value"} if targets is None else set(targets))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids, labels = lm_batch()
    losses = train_steps(peft_model, ids, labels, steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses

    # gradient checkpointing changes nothing numerically
    grads = []
    for enabled in (True, False):
        if not enabled:
            peft_model.base_model.model.gradient_checkpointing_disable()
        peft_model.train()
        peft_model.zero_grad()
        peft_model(input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad])
    peft_model.eval()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    adapter_logits = logits_of(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, ids), adapter_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_of(load_model(tiny_dir), ids), adapter_logits, atol=1e-3)  # training did change it


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_ptuning_v2_trains_only_the_prefix_encoder(tmp_path, prefix_projection):
    folder = make_model_dir(tmp_path, pre_seq_len=4, prefix_projection=prefix_projection)
    model = load_model(folder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable), trainable
    if prefix_projection:
        assert any(".trans." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, labels = lm_batch()
    losses = train_steps(model, ids, labels, steps=3, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if name in trainable:
            assert changed or name.endswith("bias"), name
        else:
            assert not changed and param.grad is None, name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)


# =====================================================================================================================
# Trainer with gradient accumulation
# =====================================================================================================================
def _trainer_passes_num_items():
    from transformers import Trainer

    return "num_items_in_batch" in inspect.signature(Trainer.compute_loss).parameters


def test_trainer_gradient_accumulation_loss_is_the_token_mean(tiny_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    # Two micro-batches with very different numbers of trained tokens, so that the mean of the two micro-batch
    # means differs from the mean over all tokens. Label 0 is -100 in both (no shift ambiguity in the count).
    ids = random_ids(2, 12, seed=3)
    examples = []
    for row, first_trained in zip(ids, (2, 10)):
        labels = row.clone()
        labels[:first_trained] = -100
        examples.append({"input_ids": row, "attention_mask": torch.ones_like(row), "labels": labels})

    model = load_model(tiny_dir)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("num_items_in_batch")), with_kwargs=True)
    reference = load_model(tiny_dir)
    reference.train()
    sums, counts, means = [], [], []
    for ex in examples:
        logits = reference(input_ids=ex["input_ids"][None]).logits.float()
        tok = torch.nn.functional.cross_entropy(logits[0, :-1], ex["labels"][1:], ignore_index=-100, reduction="sum")
        n = int((ex["labels"][1:] != -100).sum())
        sums.append(tok)
        counts.append(n)
        means.append(tok / n)
    token_mean = sum(sums) / sum(counts)
    micro_mean = sum(means) / len(means)
    assert abs(token_mean.item() - micro_mean.item()) > 1e-2  # the test can tell the two apart

    lr = 0.1
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      optimizers=(torch.optim.SGD(params, lr=lr), None))
    before = model.transformer.output_layer.weight.detach().clone()
    result = trainer.train()

    passes = _trainer_passes_num_items()
    expected = token_mean if passes else micro_mean
    assert result.training_loss == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    if passes:
        assert len(seen) == 2 and all(s is not None and int(s) == sum(counts) for s in seen), seen
    # The optimizer step used the gradient of that same loss (SGD, no clipping, no decay).
    grad = torch.autograd.grad(expected, reference.transformer.output_layer.weight)[0]
    torch.testing.assert_close(model.transformer.output_layer.weight.detach(), before - lr * grad, atol=1e-5, rtol=1e-4)


# =====================================================================================================================
# accelerate big-model loading
# =====================================================================================================================
def _model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@needs_accelerate
def test_device_map_auto_with_cpu_and_disk_offload(tiny_dir, tmp_path):
    plain = load_model(tiny_dir)
    budget = int(_model_bytes(plain) * 0.6)  # the embedding fits in "cpu" memory, the rest goes to disk
    model = load_model(tiny_dir, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "off"))
    placement = {str(v) for v in model.hf_device_map.values()}
    assert placement == {"cpu", "disk"}, model.hf_device_map
    blocks = [k for k in model.hf_device_map if "encoder.layers." in k]
    assert all(k.split("encoder.layers.")[1].isdigit() for k in blocks), model.hf_device_map  # GLMBlocks whole
    ids = random_ids(2, 6)
    assert torch.equal(greedy(model, ids, 6), greedy(plain, ids, 6))
    torch.testing.assert_close(logits_of(model, ids), logits_of(plain, ids), atol=1e-5, rtol=0)


@needs_accelerate
def test_init_empty_weights_and_load_checkpoint_and_dispatch(tiny_dir, tmp_path):
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = load_model(tiny_dir)
    config = AutoConfig.from_pretrained(tiny_dir, trust_remote_code=True)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert empty.transformer.output_layer.weight.device.type == "meta"
    budget = _model_bytes(plain) // 2
    model = load_checkpoint_and_dispatch(
        empty, str(tiny_dir), device_map="auto", no_split_module_classes=["GLMBlock"],
        max_memory={"cpu": budget}, offload_folder=str(tmp_path / "off"), dtype=torch.float32)
    model.eval()
    blocks = {k for k in model.hf_device_map if "encoder.layers." in k}
    assert all(k.rsplit(".", 1)[-1].isdigit() for k in blocks), model.hf_device_map  # whole GLMBlocks
    ids = random_ids(1, 7)
    assert torch.equal(greedy(model, ids, 6), greedy(plain, ids, 6))
