"""The package inside the tools people already use (issue 13): TRL's SFTTrainer (full and LoRA),
lm-evaluation-harness's HFLM, and llama.cpp's convert_hf_to_gguf.py on a saved fine-tune. Tiny random models
through the real ``from_pretrained(..., trust_remote_code=True)`` path and the published ``tokenizer.model``
(``../shared/reference`` or ``$CHATGLM_TOKENIZER_MODEL``; else a small SentencePiece model trained here).

Each test needs its client installed and is skipped otherwise (the plain 3-version CI venvs have none of them);
``.ci/run``'s "clients" stage makes a venv with all of them and runs this file. References are independent of the
code under test: our own log-softmax over a direct forward of the model, the saved safetensors, raw ids."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import load_model, make_model_dir
from tokenizer_helpers import real_model_path, train_tiny_model

GMASK, SOP, EOS = 64790, 64792, 2


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny model with the published vocabulary size (65024 rows) and the tokenizer files."""
    folder = make_model_dir(tmp_path_factory.mktemp("clients"), padded_vocab_size=65024, num_layers=2)
    vocab = real_model_path()
    if vocab is None:
        vocab = train_tiny_model(folder / "trained.model")
    shutil.copyfile(vocab, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def tok(lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_dir, trust_remote_code=True)


def prefix_ids(tok):
    return tok.convert_tokens_to_ids(["[gMASK]", "sop"])


# =====================================================================================================================
# TRL: SFTTrainer, full fine-tune and LoRA
# =====================================================================================================================
TEXTS = ["今天天气真不错，我们一起去公园散步吧。", "The capital of France is Paris.", "def add(a, b):\n    return a + b",
         "人工智能正在改变世界。"]


def _own_loss(model, batch):
    """Mean next-token negative log-likelihood over the labelled positions, from the head's logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked[keep]).mean().item()


def _needs_trl_on_this_device():
    """TRL's SFTTrainer always runs its fused LM head. TRL 1.15 computes it only with its Triton kernel (a GPU):
    without Triton its kernel is None and every model fails, so the test says so instead of failing."""
    pytest.importorskip("trl")
    import trl.trainer.utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", True) is None:
        pytest.skip("this TRL's SFTTrainer needs Triton (a CUDA/XPU GPU) for its fused LM head; no CPU path")


def _sft(lm_dir, tok, tmp_path, dataset, peft_config=None, lr=1e-2, steps=4):
    from trl import SFTConfig, SFTTrainer

    model = load_model(lm_dir).train()
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2,
                     learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                         peft_config=peft_config)
    return trainer


def _check_examples_and_fused_loss(trainer, tok):
    """Every tokenized example is ``[gMASK] sop ... </s>`` with the eos as id 2 (what the model must learn to stop
    on); TRL's loss on a batch (its fused LM head runs ``model.base_model`` and reads ``last_hidden_state``
    batch-first) equals our log-softmax over the head's logits."""
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for ex in examples:
        assert ex["input_ids"][:2] == prefix_ids(tok), ex
        assert ex["input_ids"][-1] == EOS == tok.eos_token_id, ex
        assert ex["input_ids"].count(EOS) == 1, ex
    batch = trainer.data_collator(examples[:2])
    assert (batch["labels"] == EOS).sum() == 2  # the eos is a trained target of both rows
    model = trainer.model
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch)).item()
    model.train()
    own = _own_loss(model, batch)
    assert math.isclose(trl_loss, own, rel_tol=1e-4, abs_tol=1e-4), (trl_loss, own)
    return batch, own


def test_trl_sft_full_fine_tune_lowers_the_loss(lm_dir, tok, tmp_path):
    _needs_trl_on_this_device()
    from datasets import Dataset

    trainer = _sft(lm_dir, tok, tmp_path, Dataset.from_dict({"text": TEXTS}))
    batch, before = _check_examples_and_fused_loss(trainer, tok)
    initial = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    after = _own_loss(trainer.model, batch)
    assert after < before - 0.5, (before, after)
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, initial[k])]
    assert any("query_key_value" in k for k in changed) and any("output_layer" in k for k in changed)


def test_trl_sft_lora_trains_only_the_adapters(lm_dir, tok, tmp_path):
    _needs_trl_on_this_device()
    pytest.importorskip("peft")
    from datasets import Dataset
    from peft import LoraConfig, PeftModel

    data = Dataset.from_dict({"prompt": ["今天天气", "The capital of France is", "1 + 1 =", "你好"],
                              "completion": ["真不错。", " Paris.", " 2", "，世界！"]})
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value", "dense_h_to_4h"], lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    trainer = _sft(lm_dir, tok, tmp_path, data, peft_config=config, lr=5e-2, steps=6)
    assert isinstance(trainer.model, PeftModel)
    for ex in trainer.train_dataset:  # only the completion (and its eos) is trained
        labelled = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
        assert labelled[-1] == EOS and ex["labels"][:2] == [-100, -100], ex
    batch, before = _check_examples_and_fused_loss(trainer, tok)
    frozen = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" not in k}
    trainer.train()
    assert _own_loss(trainer.model, batch) < before - 0.5
    assert all(torch.equal(v, frozen[k]) for k, v in trainer.model.named_parameters() if "lora_" not in k)
    # the merged model saves as a plain ChatGLM folder that loads back with the same logits
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=batch["input_ids"]).logits,
                                   merged.eval()(input_ids=batch["input_ids"]).logits)
