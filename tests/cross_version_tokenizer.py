"""Cross-version tokenizer folders: save with one transformers version, load and check with another.

    python tests/cross_version_tokenizer.py save  OUT    # writes OUT/fast and OUT/slow with this venv's transformers
    python tests/cross_version_tokenizer.py check OUT    # loads both with this venv, slow and fast, checks vs SentencePiece

The vocabulary is the published tokenizer.model (../shared/reference or $CHATGLM_TOKENIZER_MODEL) or, without it, a
tiny SentencePiece model trained with ChatGLM's settings. The check compares ids and decoded text with raw
SentencePiece, not with the tokenizer's own output. `.ci/run` runs it for every (saving venv, loading venv) pair.
"""

import json
import sys
import tempfile
import warnings
from pathlib import Path

import sentencepiece as spm
import transformers

from support import (  # tests/ is on sys.path when this runs as a script
    REPO,
    SPECIAL_TOKENS,
    load_tokenizer,
    make_tokenizer_dir,
    mixed_corpus,
    real_model_path,
    sp_reference_ids,
    train_tiny_model,
)

TEXTS = mixed_corpus(200, seed=21) + ["你好，世界！\nHello world, it's 2024.", "TRL example</s>", "<|user|>[gMASK]sop"]


def save(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    model = real_model_path() or train_tiny_model(Path(tempfile.mkdtemp()) / "tiny.model")
    src = make_tokenizer_dir(Path(tempfile.mkdtemp()), model, "src")
    for fast in (True, False):
        target = out / ("fast" if fast else "slow")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_tokenizer(src, fast=fast).save_pretrained(str(target))
        config = json.loads((target / "tokenizer_config.json").read_text())
        assert config["auto_map"]["AutoTokenizer"] == [
            "tokenization_chatglm.ChatGLMTokenizer", "tokenization_chatglm.ChatGLMTokenizerFast"], config["auto_map"]
        assert (target / "tokenization_chatglm.py").read_bytes() == (REPO / "tokenization_chatglm.py").read_bytes()
    (out / "saved_with.txt").write_text(transformers.__version__)
    print(f"saved with transformers {transformers.__version__}: {sorted(p.name for p in (out / 'fast').iterdir())}")


def check(out: Path):
    saved_with = (out / "saved_with.txt").read_text().strip()
    failures = []
    for folder in ("fast", "slow"):
        sp = spm.SentencePieceProcessor(model_file=str(out / folder / "tokenizer.model"))
        n_sp = sp.get_piece_size()
        for fast in (True, False):
            what = f"{folder} folder saved with {saved_with}, loaded {'fast' if fast else 'slow'} with {transformers.__version__}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tok = load_tokenizer(out / folder, fast=fast)
            except Exception as error:  # report every combination, then fail
                failures.append(f"{what}: load failed: {type(error).__name__}: {error}")
                continue
            problems = []
            if tok.is_fast != fast:
                problems.append(f"is_fast is {tok.is_fast}")
            if [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] != list(range(n_sp, n_sp + len(SPECIAL_TOKENS))):
                problems.append("special token ids")
            if (tok.pad_token_id, tok.eos_token_id, tok.padding_side) != (0, 2, "left"):
                problems.append(f"pad/eos/padding_side {(tok.pad_token_id, tok.eos_token_id, tok.padding_side)}")
            got = tok(TEXTS)["input_ids"]
            prefix = [n_sp + 1, n_sp + 3]  # [gMASK] sop
            for text, ids in zip(TEXTS, got):
                if ids != prefix + sp_reference_ids(sp, text):
                    problems.append(f"ids of {text!r:.60}")
                    break
                body = ids[2:]
                if "</s>" not in text and tok.decode(body) != sp.decode(body):
                    problems.append(f"decode of {text!r:.60}")
                    break
            if tok.decode(prefix + [2]) != "[gMASK]sop</s>" or tok.decode(prefix + [2], skip_special_tokens=True):
                problems.append("decode of special ids")
            if fast and tok.backend_tokenizer.decode(got[0], skip_special_tokens=False) != tok.decode(got[0]):
                problems.append("backend decode differs from decode")
            if problems:
                failures.append(f"{what}: " + "; ".join(problems))
            else:
                print(f"ok: {what}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "check"):
        sys.exit(__doc__)
    (save if sys.argv[1] == "save" else check)(Path(sys.argv[2]))
