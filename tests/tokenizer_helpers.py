"""Helpers for tests/test_tokenizer.py: where the vocabularies come from, how tokenizers are loaded, test corpora."""

import io
import os
import random
import shutil
import uuid
from pathlib import Path

import transformers

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]


def real_model_path():
    """The published tokenizer.model: $CHATGLM_TOKENIZER_MODEL or ../shared/reference/tokenizer.model (or None)."""
    env = os.environ.get("CHATGLM_TOKENIZER_MODEL")
    if env:
        return Path(env) if Path(env).is_file() else None
    p = REFERENCE_DIR / "tokenizer.model"
    return p if p.is_file() else None


def model_dir_with_tokenizer(parent, num_layers):
    """A tiny random model folder (``support.make_model_dir``) with the published vocabulary size (65024 rows)
    and a tokenizer.model: the published one where found, else a small one trained here."""
    from support import make_model_dir

    folder = make_model_dir(parent, padded_vocab_size=65024, num_layers=num_layers)
    vocab = real_model_path() or train_tiny_model(folder / "trained.model")
    shutil.copyfile(vocab, folder / "tokenizer.model")
    return folder


def function_call_prompt_path():
    p = REFERENCE_DIR / "function_call.txt"
    return p if p.is_file() else None


_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog.
Large language models are trained on many tokens of text and code.
def add(a, b):
    return a + b
for i in range(10):
    print(i * 2, "hello world")
今天天气真不错，我们一起去公园散步吧。
人工智能正在改变世界，大语言模型可以回答问题、写代码和翻译文本。
你好，请问有什么可以帮您？我想查询一下北京的天气。
Numbers like 12345 and 2024-01-01 are split into digits.
   Indented line with    several   spaces.
class Tokenizer:
    def encode(self, text):
        return [ord(c) for c in text]
Bonjour à tous, ça va très bien. Über straße.
"""


def train_tiny_model(path: Path) -> Path:
    """Train a small SentencePiece model with the same settings as ChatGLM's (BPE, byte fallback, ...)."""
    import sentencepiece as spm

    lines = _TRAIN_TEXT.splitlines() * 30
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def make_tokenizer_dir(parent: Path, model_path: Path, name: str = "tok") -> Path:
    """A hub-style folder: the remote code, its config and a tokenizer.model (unique name: module cache key)."""
    folder = Path(parent) / f"{name}_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "tokenization_chatglm.py", folder / "tokenization_chatglm.py")
    shutil.copy(REPO_ROOT / "tokenizer_config.json", folder / "tokenizer_config.json")
    if model_path is not None:
        shutil.copy(model_path, folder / "tokenizer.model")
    return folder


def load_tokenizer(folder, fast: bool, **kwargs):
    """Load through the real remote-code path.

    transformers 5.x's AutoTokenizer ignores use_fast and always picks the fast class of auto_map; the slow class is
    then loaded from the same dynamic module.
    """
    from transformers import AutoTokenizer

    folder = str(folder)
    if fast:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, **kwargs)
    if TRANSFORMERS_MAJOR < 5:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False, **kwargs)
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module("tokenization_chatglm.ChatGLMTokenizer", folder)
    return cls.from_pretrained(folder, **kwargs)


_ZH = "今天天气真不错，我们一起去公园散步吧。人工智能正在改变世界，大语言模型可以回答问题、写代码和翻译文本。龘齉𠀀㐀"
_EN = "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces; BPE merges pairs. "
_CODE = 'def f(x):\n    return {"a": [1, 2, 3], \'b\': x ** 2}\n\tif x != None: pass  # comment\r\n'
_SPECIAL = ["😀", "🚀🚀", "👩‍👩‍👧", " 12345 ", "007", "\n\n", "    ", "\t", "ü", "e\u0301", "\x00", "\x07", "\u200b",
            "\u3000", "▁", "<|user|>", "[gMASK]", "sop", "</s>", "<unk>", "\ufeff", "\U0010fffd", "\r\n"]


def mixed_corpus(n: int, seed: int = 0, max_len: int = 200):
    """Deterministic mixed text: Chinese, English, code, emoji, whitespace runs, digits, control characters."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", " \n ", "   leading", "trailing   ", "a  b   c    d", "1 2 3 45 678", "\t\t"]
    for _ in range(n):
        parts = []
        target = rng.randint(1, max_len)
        while sum(map(len, parts)) < target:
            k = rng.random()
            if k < 0.3:
                i = rng.randrange(len(_ZH) - 5)
                parts.append(_ZH[i:i + rng.randint(1, 20)])
            elif k < 0.6:
                i = rng.randrange(len(_EN) - 5)
                parts.append(_EN[i:i + rng.randint(1, 30)])
            elif k < 0.75:
                i = rng.randrange(len(_CODE) - 5)
                parts.append(_CODE[i:i + rng.randint(1, 40)])
            elif k < 0.9:
                parts.append(rng.choice(_SPECIAL))
            else:
                parts.append("".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(rng.randint(1, 4))))
        out.append("".join(parts))
    # lone surrogates are not text; the tokenizers clean them, the raw SentencePiece reference cannot take them
    return [s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") for s in out]


EOS_TEXT = "</s>"


def sp_reference_ids(sp, text: str):
    """Ids of `text` (no prefix) built from raw SentencePiece: "</s>" is the end-of-sequence id, every other
    piece of text between them is encoded by SentencePiece on its own (with its own dummy prefix)."""
    ids = []
    for k, chunk in enumerate(text.split(EOS_TEXT)):
        if k:
            ids.append(sp.eos_id())
        if chunk:
            ids.extend(sp.encode(chunk))
    return ids
