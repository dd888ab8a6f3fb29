"""The package inside the tools people already use (issue 13): TRL's SFTTrainer (full and LoRA),
lm-evaluation-harness's HFLM, and llama.cpp's convert_hf_to_gguf.py on a saved fine-tune. Tiny random models
through the real ``from_pretrained(..., trust_remote_code=True)`` path and the published ``tokenizer.model``
(``../shared/reference`` or ``$CHATGLM_TOKENIZER_MODEL``; else a small SentencePiece model trained here).

Each test needs its client installed and is skipped otherwise (the plain 3-version CI venvs have none of them);
``.ci/run``'s "clients" stage makes a venv with all of them and runs this file. References are independent of the
code under test: our own log-softmax over a direct forward of the model, the saved safetensors, raw ids."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import load_model, real_model_path
from llama_cpp_sdist import SDIST_ENV, converter_script, find_sdist

GMASK, SOP, EOS = 64790, 64792, 2


def needs(*modules):
    """Skip (at collection, before any fixture is built) unless the client's packages are installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed; .ci/run's clients "
                                                      f"stage installs them)")




def prefix_ids(lm_tokenizer):
    return lm_tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])


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


def _sft(lm_dir, lm_tokenizer, tmp_path, dataset, peft_config=None, lr=1e-2, steps=4):
    from trl import SFTConfig, SFTTrainer

    model = load_model(lm_dir).train()
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2,
                     learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=lm_tokenizer,
                         peft_config=peft_config)
    return trainer


def _check_examples_and_fused_loss(trainer, lm_tokenizer):
    """Every tokenized example is ``[gMASK] sop ... </s>`` with the eos as id 2 (what the model must learn to stop
    on); TRL's loss on a batch (its fused LM head runs ``model.base_model`` and reads ``last_hidden_state``
    batch-first) equals our log-softmax over the head's logits."""
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for ex in examples:
        assert ex["input_ids"][:2] == prefix_ids(lm_tokenizer), ex
        assert ex["input_ids"][-1] == EOS == lm_tokenizer.eos_token_id, ex
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


@needs("trl", "datasets")
def test_trl_sft_full_fine_tune_lowers_the_loss(lm_dir, lm_tokenizer, tmp_path):
    _needs_trl_on_this_device()
    from datasets import Dataset

    trainer = _sft(lm_dir, lm_tokenizer, tmp_path, Dataset.from_dict({"text": TEXTS}))
    batch, before = _check_examples_and_fused_loss(trainer, lm_tokenizer)
    initial = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    after = _own_loss(trainer.model, batch)
    assert after < before - 0.5, (before, after)
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, initial[k])]
    assert any("query_key_value" in k for k in changed) and any("output_layer" in k for k in changed)


@needs("trl", "datasets", "peft")
def test_trl_sft_lora_trains_only_the_adapters(lm_dir, lm_tokenizer, tmp_path):
    _needs_trl_on_this_device()
    from datasets import Dataset
    from peft import LoraConfig, PeftModel

    data = Dataset.from_dict({"prompt": ["今天天气", "The capital of France is", "1 + 1 =", "你好"],
                              "completion": ["真不错。", " Paris.", " 2", "，世界！"]})
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value", "dense_h_to_4h"], lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    trainer = _sft(lm_dir, lm_tokenizer, tmp_path, data, peft_config=config, lr=5e-2, steps=6)
    assert isinstance(trainer.model, PeftModel)
    for ex in trainer.train_dataset:  # only the completion (and its eos) is trained
        labelled = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
        assert labelled[-1] == EOS and ex["labels"][:2] == [-100, -100], ex
    batch, before = _check_examples_and_fused_loss(trainer, lm_tokenizer)
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


# =====================================================================================================================
# lm-evaluation-harness: HFLM on a saved folder, requests built here (no dataset download)
# =====================================================================================================================
LL_REQUESTS = [("今天天气", "真不错"), ("The capital of France is", " Paris"), ("1 + 1 =", " 2"),
               ("def add(a, b):\n", "    return a + b")]
ROLLING = ["今天天气真不错，我们一起去公园散步吧。", "The quick brown fox jumps over the lazy dog."]
GEN_CONTEXTS = ["今天天气", "The capital of France is", "Hello"]


class _Reference:
    """Hand-computed scores: raw SentencePiece ids with the [gMASK] sop prefix (the special ids follow the
    SentencePiece pieces), and our own log-softmax over direct forwards of the model."""

    def __init__(self, folder):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
        n = self.sp.get_piece_size()
        self.prefix = [n + 1, n + 3]  # [gMASK], sop
        self.model = load_model(folder)

    def logprobs(self, ids):
        with torch.no_grad():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)

    def loglikelihood(self, context, continuation):
        """lm-eval's rule: trailing whitespace of the context moves to the continuation; encode the whole text and
        the context, the continuation is what follows the context."""
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        ctx = self.prefix + self.sp.encode(context)
        whole = self.prefix + self.sp.encode(context + continuation)
        cont = whole[len(ctx):]
        logp = self.logprobs(whole[:-1])[len(ctx) - 1:]
        targets = torch.tensor(cont)
        score = logp.gather(-1, targets[:, None]).sum().item()
        return score, bool(torch.equal(logp.argmax(-1), targets))

    def rolling(self, text):
        """One window: the prefix token (eos) conditions the first token; every token of [gMASK] sop text is scored."""
        ids = self.prefix + self.sp.encode(text)
        logp = self.logprobs([EOS] + ids[:-1])
        return logp.gather(-1, torch.tensor(ids)[:, None]).sum().item()

    def greedy(self, context, max_new, until):
        ids = self.prefix + self.sp.encode(context)
        out = []
        for _ in range(max_new):
            nxt = int(self.logprobs(ids + out)[-1].argmax())
            out.append(nxt)
            if nxt == EOS:
                break
        text = self.sp.decode([i for i in out if 2 < i < self.sp.get_piece_size()])
        for stop in until:
            text = text.split(stop)[0]
        return out, text


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# The two tests below check the published vocabulary itself (token strings at the GLM ids, words that encode to
# tokens); the tiny tokenizer the other tests train when ../shared is absent has neither.
needs_published_vocab = pytest.mark.skipif(real_model_path() is None, reason="needs the published tokenizer.model "
                                           "(../shared/reference or $CHATGLM_TOKENIZER_MODEL)")


@needs("lm_eval")
@needs_published_vocab
def test_lm_eval_harness_scores_equal_hand_computed_values(lm_dir):
    from lm_eval.models.huggingface import HFLM

    ref = _Reference(lm_dir)
    runs = {bs: HFLM(pretrained=str(lm_dir), trust_remote_code=True, batch_size=bs, device="cpu", dtype="float32")
            for bs in (1, 3)}
    lm = runs[1]
    # decode of eos is its string: lm-eval keeps the [gMASK] sop prefix and a real stop string
    assert lm.tokenizer.decode([lm.eot_token_id]) == "</s>" and lm.prefix_token_id == EOS
    assert lm.tok_encode("今天天气")[:2] == ref.prefix

    expected = [ref.loglikelihood(c, x) for c, x in LL_REQUESTS]
    expected_rolling = [ref.rolling(t) for t in ROLLING]
    for bs, run in runs.items():
        got = run.loglikelihood(_requests("loglikelihood", LL_REQUESTS), disable_tqdm=True)
        for (score, greedy), (want, want_greedy) in zip(got, expected):
            assert math.isclose(score, want, rel_tol=1e-5, abs_tol=1e-4), (bs, score, want)
            assert greedy == want_greedy
        rolling = run.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in ROLLING]),
                                            disable_tqdm=True)
        for score, want in zip(rolling, expected_rolling):
            assert math.isclose(score, want, rel_tol=1e-5, abs_tol=1e-4), (bs, score, want)

    # generate_until: greedy, stopping at a stop string taken from the reference's own continuation
    max_new = 8
    plain = [ref.greedy(c, max_new, [])[1] for c in GEN_CONTEXTS]
    stop = next(t[2:4] for t in plain if len(t) >= 4)
    gen_args = [(c, {"until": [stop], "max_gen_toks": max_new, "do_sample": False}) for c in GEN_CONTEXTS]
    want = [ref.greedy(c, max_new, [stop])[1] for c in GEN_CONTEXTS]
    assert any(len(w) < len(p) for w, p in zip(want, plain))  # the stop string cut at least one continuation
    assert any(len(w) > 1 for w in want)
    for bs, run in runs.items():
        got = run.generate_until(_requests("generate_until", gen_args), disable_tqdm=True)
        assert got == want, (bs, got, want)


# =====================================================================================================================
# llama.cpp: convert_hf_to_gguf.py (from the llama-cpp-python source distribution) on a saved fine-tune
# =====================================================================================================================
def _sdist():
    return find_sdist()


def _converter(tmp_path):
    return converter_script(find_sdist(), tmp_path / "sdist")


@pytest.mark.skipif(_sdist() is None, reason=f"no llama-cpp-python sdist: set {SDIST_ENV} to "
                    f"llama_cpp_python-*.tar.gz (pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36) "
                    f"or put one in ~/.cache/chatglm3-tests")
@needs("gguf")
@needs_published_vocab
def test_llama_cpp_converter_takes_a_saved_fine_tune(lm_dir, lm_tokenizer, tmp_path):
    import gguf
    from safetensors.torch import load_file

    script = _converter(tmp_path)
    # a "fine-tune": change the weights, save model and tokenizer with the library's save_pretrained
    model = load_model(lm_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    saved = tmp_path / "fine-tune"
    model.save_pretrained(saved)
    lm_tokenizer.save_pretrained(saved)
    cfg = json.loads((saved / "config.json").read_text())
    assert "THUDM/chatglm3-6b" in cfg["_name_or_path"]  # what the converter recognises ChatGLM3 by

    out = tmp_path / "model.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = subprocess.run([sys.executable, str(script), str(saved), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    reader = gguf.GGUFReader(str(out))

    def field(name):
        f = reader.fields[name]
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i].item()
                    for i in f.data]
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else part.item()

    assert field("general.architecture") == "chatglm"
    assert field("tokenizer.ggml.pre") == "chatglm-spm"  # the ChatGLM3 SentencePiece vocabulary, not GLM-4's
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 65024 and tokens[GMASK] == "[gMASK]" and tokens[SOP] == "sop"
    assert field("tokenizer.ggml.eos_token_id") == EOS
    assert field("chatglm.block_count") == cfg["num_layers"]
    assert field("chatglm.embedding_length") == cfg["hidden_size"]
    assert field("chatglm.attention.head_count_kv") == cfg["multi_query_group_num"]
    assert field("tokenizer.chat_template") == lm_tokenizer.chat_template

    # tensors: the converter's name mapping, values unchanged (GGUF stores the torch shape reversed)
    weights = load_file(str(saved / "model.safetensors"))
    names = {"transformer.embedding.word_embeddings.weight": "token_embd.weight",
             "transformer.encoder.final_layernorm.weight": "output_norm.weight",
             "transformer.output_layer.weight": "output.weight"}
    for i in range(cfg["num_layers"]):
        pre, blk = f"transformer.encoder.layers.{i}.", f"blk.{i}."
        names.update({pre + "input_layernorm.weight": blk + "attn_norm.weight",
                      pre + "self_attention.query_key_value.weight": blk + "attn_qkv.weight",
                      pre + "self_attention.query_key_value.bias": blk + "attn_qkv.bias",
                      pre + "self_attention.dense.weight": blk + "attn_output.weight",
                      pre + "post_attention_layernorm.weight": blk + "ffn_norm.weight",
                      pre + "mlp.dense_h_to_4h.weight": blk + "ffn_up.weight",
                      pre + "mlp.dense_4h_to_h.weight": blk + "ffn_down.weight"})
    assert sorted(k for k in weights if not k.endswith("inv_freq")) == sorted(names)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(names.values())
    for key, name in names.items():
        t = tensors[name]
        assert [int(n) for n in t.shape][::-1] == list(weights[key].shape), name
        got = torch.from_numpy(t.data.copy()).reshape(weights[key].shape)
        assert torch.equal(got, weights[key].float()), name


# =====================================================================================================================
# diffusers: KolorsPipeline.encode_prompt with our text encoder and tokenizer = with diffusers' bundled ChatGLM ones
# =====================================================================================================================
@needs("diffusers")
def test_kolors_encode_prompt_equals_diffusers_bundled_chatglm(lm_dir, lm_tokenizer):
    from diffusers import KolorsPipeline
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig as DiffusersConfig
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel as DiffusersModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer as DiffusersTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    ours = get_class_from_dynamic_module("modeling_chatglm.ChatGLMModel", str(lm_dir)).from_pretrained(lm_dir).eval()
    cfg = json.loads((lm_dir / "config.json").read_text())
    theirs = DiffusersModel(DiffusersConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    their_tok = DiffusersTokenizer(vocab_file=str(lm_dir / "tokenizer.model"))

    prompts = ["一只可爱的小猫，坐在窗台上", "A photo of an astronaut riding a horse on the moon"]
    results = []
    for encoder, tokenizer in ((ours, lm_tokenizer), (theirs, their_tok)):
        pipe = KolorsPipeline(vae=None, text_encoder=encoder, tokenizer=tokenizer, unet=None, scheduler=None)
        with torch.no_grad():
            results.append(pipe.encode_prompt(prompts, device=torch.device("cpu"), do_classifier_free_guidance=True,
                                              negative_prompt=["低质量", "blurry"], max_sequence_length=48))
    for got, want in zip(*results):
        assert got.shape == want.shape and torch.equal(got, want)
    assert results[0][0].shape == (2, 48, cfg["hidden_size"]) and results[0][2].shape == (2, cfg["hidden_size"])
