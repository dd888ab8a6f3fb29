"""Tokenizers for ChatGLM3-6B(-Base): a SentencePiece ("slow") one and a `tokenizers` ("fast") one.

Both produce exactly the ids of the published tokenizer:

* ids ``0 .. 64788`` are the SentencePiece pieces of ``tokenizer.model`` (BPE, byte fallback, dummy prefix ``▁``,
  identity normalizer, whitespace kept as is);
* ids ``64789 .. 64797`` are the GLM special tokens ``[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
  <|assistant|> <|observation|>``;
* a single text is prefixed with ``[gMASK] sop``; a pair is ``[gMASK] sop A B </s>``;
* batches are padded on the left with id 0 and carry ``position_ids`` that start at 0 on the first real token.

Text never turns into the GLM special ids unless asked for (``encode_special_tokens=True``):
``tokenizer("<|user|>")`` is five ordinary pieces. ``apply_chat_template`` is the one place where the template's own
role tokens become ids; the special-token strings inside the messages are escaped first, so they stay text there
too. The one exception is ``</s>``: outside chat messages it is the end-of-sequence id 2, as with every HF tokenizer
(training recipes such as TRL's append ``eos_token`` as text).

``decode`` follows HF conventions: special ids give their strings (``</s>``, ``[gMASK]``, ``<|user|>`` ...) unless
``skip_special_tokens=True``. It equals SentencePiece's decoding on the pieces, except that a run of byte-fallback
pieces that is not valid UTF-8 becomes one U+FFFD per byte (what `tokenizers`' ByteFallback decoder does).

The fast tokenizer's backend (``tokenizer._tokenizer``) is a complete `tokenizers` pipeline built from
``tokenizer.model`` (Metaspace-style normalizer, BPE with byte fallback, ByteFallback/Fuse/Strip decoder, the
``[gMASK] sop`` post-processor), so ``tokenizer._tokenizer.decode(ids, skip_special_tokens=...)`` and
``tokenizers.decoders.DecodeStream`` give exactly ``tokenizer.decode``'s text (vLLM decodes this way).
``save_pretrained`` writes it as ``tokenizer.json``; loading uses that file only when tokenizer_config.json records
the sha256 of the tokenizer.model next to it, otherwise it is rebuilt from tokenizer.model.

On transformers 5.x ``AutoTokenizer`` always returns the fast class; the slow one is
``ChatGLMTokenizer.from_pretrained(folder)`` after ``get_class_from_dynamic_module("tokenization_chatglm.ChatGLMTokenizer",
folder)`` (see README).

Remote code: this module imports only the standard library, ``sentencepiece``, ``tokenizers`` and ``transformers``.
"""

import copy
import hashlib
import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding

try:  # the enums moved around between versions; both spellings exist on 4.30 .. 5.x
    from transformers.utils import PaddingStrategy
except ImportError:  # pragma: no cover
    from transformers.tokenization_utils_base import PaddingStrategy
from transformers.tokenization_utils_base import TruncationStrategy

from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import BPE as _RustBPE
from transformers import PreTrainedTokenizerFast


HUB_REPO_ID = "THUDM/chatglm3-6b-base"
_MODULE = "tokenization_chatglm"  # this file's name in a model folder (auto_map)
VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}

# Appended after the SentencePiece vocabulary, in this order (ids 64789 .. 64797 for the published model).
GLM_SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")
SPACE = "\u2581"  # SentencePiece's whitespace symbol "▁"

# How text that is *allowed* to contain special tokens is split (encode_special_tokens=True, chat templates):
# the four role tokens and the three mask tokens anywhere; "sop"/"eop" only right after a mask token, so words
# such as "isopropyl" or "people" are never cut.
_SPECIAL_PATTERN = r"\[[gs]?MASK\](?:sop|eop)?|<\|(?:system|user|assistant|observation)\|>"
# apply_chat_template escapes special-token strings (and the escape characters themselves) found in the
# messages as MARK_OPEN + s + MARK_CLOSE, so that only the template's own role tokens become ids. The two
# characters are Unicode noncharacters, which never occur in interchanged text.
_MARK_OPEN, _MARK_CLOSE = "\ufdd0", "\ufdd1"
# "</s>" in text is the end of the sequence (training recipes append eos_token as text), except inside chat messages.
_EOS_TEXT = "</s>"
_MARKABLE_RE = re.compile(_SPECIAL_PATTERN + "|" + _EOS_TEXT + "|" + _MARK_OPEN + "|" + _MARK_CLOSE)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")

DEFAULT_CHAT_TEMPLATE = (
    "{%- set ns = namespace(tools=none) -%}"
    "{%- if tools is defined and tools is not none and tools -%}{%- set ns.tools = tools -%}{%- endif -%}"
    "[gMASK]sop"
    "{%- if ns.tools is not none and (messages | length == 0 or messages[0]['role'] != 'system') -%}"
    "<|system|>\n {{ '\n' + (ns.tools | tojson(indent=4)) }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}"
    "{{ raise_exception('ChatGLM3 roles are system, user, assistant and observation, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- set content = message['content'] if message['content'] is defined and message['content'] is not none else '' -%}"
    "{%- if message['role'] == 'system' and message['tools'] is defined and message['tools'] is not none -%}"
    "{%- set content = content + '\n' + (message['tools'] | tojson(indent=4)) -%}"
    "{%- elif loop.first and message['role'] == 'system' and ns.tools is not none -%}"
    "{%- set content = content + '\n' + (ns.tools | tojson(indent=4)) -%}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['metadata'] is defined and message['metadata'] is not none -%}{{ message['metadata'] }}{%- endif -%}"
    "{{ '\n' }}"
    # The published format encodes the header line and the content separately, so the content gets its own
    # SentencePiece dummy prefix. "\n" is a byte-fallback piece that never merges with a neighbour, so writing
    # the content as " " + content gives exactly those ids.
    "{%- if content -%}{{ ' ' + content }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


# --------------------------------------------------------------------------------------------------------------
# helpers shared by both tokenizers
# --------------------------------------------------------------------------------------------------------------


def _clean_text(text: Any, what: str = "text") -> str:
    """Check that `text` is a str and make it encodable: surrogate pairs are joined, lone surrogates become U+FFFD."""
    if not isinstance(text, str):
        raise ValueError(f"ChatGLM tokenizer: {what} must be a str, got {type(text).__name__}: {text!r:.80}")
    if _SURROGATE_RE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _utf8_or_replacement(data: bytes) -> str:
    """A run of byte-fallback pieces: its UTF-8 text, or one U+FFFD per byte when it is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def _resolve_vocab_file(vocab_file: Optional[str]) -> str:
    """Return a path to tokenizer.model, downloading it from the hub when it is not next to the code."""
    if vocab_file is not None and os.path.isdir(vocab_file):
        vocab_file = os.path.join(vocab_file, VOCAB_FILES_NAMES["vocab_file"])
    if vocab_file is not None and os.path.isfile(vocab_file):
        return vocab_file
    where = f" at {vocab_file!r}" if vocab_file else " in the tokenizer folder"
    how = (
        f"Put the published tokenizer.model next to tokenization_chatglm.py, pass vocab_file=..., or fetch it once "
        f"with `huggingface-cli download {HUB_REPO_ID} tokenizer.model` while online."
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover
        raise ValueError(f"ChatGLM tokenizer: tokenizer.model not found{where}, and huggingface_hub is not "
                         f"installed to download it. {how}") from e
    try:
        return hf_hub_download(repo_id=HUB_REPO_ID, filename=VOCAB_FILES_NAMES["vocab_file"])
    except Exception as e:  # offline mode, no network, missing auth ...
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set and the file is not in the hub cache" if offline else f"{type(e).__name__}: {e}"
        raise ValueError(
            f"ChatGLM tokenizer: tokenizer.model not found{where}, and downloading it from the hub repo "
            f"{HUB_REPO_ID!r} failed ({reason}). {how}"
        ) from e


def _padding_strategy(value) -> PaddingStrategy:
    if isinstance(value, PaddingStrategy):
        return value
    if value is True:
        return PaddingStrategy.LONGEST
    if value is False or value is None:
        return PaddingStrategy.DO_NOT_PAD
    return PaddingStrategy(value)


def _truncation_strategy(value) -> TruncationStrategy:
    if isinstance(value, TruncationStrategy):
        return value
    if value is True:
        return TruncationStrategy.LONGEST_FIRST
    if value is False or value is None:
        return TruncationStrategy.DO_NOT_TRUNCATE
    return TruncationStrategy(value)


def _mark_special_strings(obj):
    """Escape special-token strings in every str inside `obj` (messages, tools, ...); dict keys are left alone."""
    if isinstance(obj, str):
        return _MARKABLE_RE.sub(lambda m: _MARK_OPEN + m.group(0) + _MARK_CLOSE, obj)
    if isinstance(obj, dict):
        return {k: _mark_special_strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        marked = [_mark_special_strings(v) for v in obj]
        return marked if isinstance(obj, list) else tuple(marked)
    return obj


class SPTokenizer:
    """The SentencePiece model plus the GLM special tokens appended after it."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ValueError(f"ChatGLM tokenizer: no SentencePiece model at {model_path!r}")
        self.sp_model = _load_sentencepiece(model_path)
        self.n_sp = self.sp_model.get_piece_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.unk_id = self.sp_model.unk_id()
        self.pad_id = self.unk_id  # ChatGLM pads with id 0 (<unk>)
        self.special_tokens = {tok: self.n_sp + i for i, tok in enumerate(GLM_SPECIAL_TOKENS)}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.n_words = self.n_sp + len(GLM_SPECIAL_TOKENS)
        self.role_special_token_expression = "|".join(re.escape(f"<|{r}|>") for r in ROLES)
        self._tables = None

    def _decode_tables(self):
        """(piece strings, byte value of byte-fallback pieces or -1), built on first use."""
        if self._tables is None:
            sp = self.sp_model
            pieces = [sp.id_to_piece(i) for i in range(self.n_sp)]
            byte_value = [int(p[3:-1], 16) if sp.is_byte(i) else -1 for i, p in enumerate(pieces)]
            self._tables = (pieces, byte_value)
        return self._tables

    @property
    def pieces(self) -> List[str]:
        return self._decode_tables()[0]

    # the interface of the original SPTokenizer
    def tokenize(self, s: str, encode_special_tokens: bool = False) -> List[str]:
        if encode_special_tokens:
            out = []
            for seg in _split_special(s, False, self.n_sp):
                out.extend([self.index_special_tokens[seg]] if isinstance(seg, int) else self.sp_model.encode(seg, out_type=str))
            return out
        return self.sp_model.encode(s, out_type=str)

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.sp_model.encode(_clean_text(s))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: List[int]) -> str:
        return _pieces_to_text(self, ids)

    def decode_tokens(self, tokens: List[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.piece_to_id(token)

    def convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if 0 <= index < self.n_sp:
            return self.sp_model.id_to_piece(index)
        return ""  # the padded rows of the embedding (64798 .. 65023) and anything else out of range


_RANGE: List[int] = list(range(4096))  # shared 0..n-1 prefix for position_ids
_SPECIAL_RE = re.compile(_SPECIAL_PATTERN)
_CHAT_RE = re.compile(
    _MARK_OPEN + "(?P<lit>" + _SPECIAL_PATTERN + "|" + _EOS_TEXT + "|" + _MARK_OPEN + "|" + _MARK_CLOSE + ")" + _MARK_CLOSE
    + "|" + _SPECIAL_PATTERN
)
_SPECIAL_IDS_BY_STRING = {tok: i for i, tok in enumerate(GLM_SPECIAL_TOKENS)}  # offsets from n_sp


def _special_match_to_offsets(s: str) -> List[int]:
    """'[gMASK]sop' -> [offset of [gMASK], offset of sop]; offsets are relative to the first special id."""
    if s.endswith("]") or s.startswith("<|"):
        return [_SPECIAL_IDS_BY_STRING[s]]
    return [_SPECIAL_IDS_BY_STRING[s[:-3]], _SPECIAL_IDS_BY_STRING[s[-3:]]]


def _split_special(text: str, chat: bool, n_sp: int = 0, added: Optional[Tuple[re.Pattern, Dict[str, int]]] = None):
    """Split text into plain-text segments (str) and special ids (int, = offset + n_sp).

    chat=True additionally un-escapes what `_mark_special_strings` escaped (as text). `added` is an optional
    (regex, {token: id}) for the other tokens that become ids wherever they occur (``</s>``, tokens a user added
    with `add_tokens`); escaped text is never matched by it.
    """
    pattern = _CHAT_RE if chat else _SPECIAL_RE
    out: List[Union[str, int]] = []

    def add_text(t: str):
        if out and isinstance(out[-1], str):
            out[-1] += t
        else:
            out.append(t)

    def add_raw(t: str):
        for part in _split_added(t, added):
            add_text(part) if isinstance(part, str) else out.append(part)

    pos = 0
    for m in pattern.finditer(text):
        add_raw(text[pos:m.start()])
        pos = m.end()
        lit = m.group("lit") if chat else None
        if lit is not None:
            add_text(lit)
        else:
            out.extend(n_sp + off for off in _special_match_to_offsets(m.group(0)))
    add_raw(text[pos:])
    return [x for x in out if x != ""]


def _split_added(text: str, added) -> List[Union[str, int]]:
    if not added:
        return [text]
    regex, table = added
    out: List[Union[str, int]] = []
    pos = 0
    for m in regex.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(table[m.group(0)])
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _pieces_to_text(spt: SPTokenizer, ids: Sequence[int], literal: Optional[Dict[int, str]] = None,
                    skip: Sequence[int] = ()) -> str:
    """Decode ids exactly as the fast tokenizer's `tokenizers` decoder does (and so as vLLM does).

    Every id becomes its string (pieces, control pieces such as ``</s>``, GLM special tokens, `literal` for added
    tokens; ids without a token are dropped), "▁" becomes " ", a run of byte-fallback pieces becomes its UTF-8 text
    (or one U+FFFD per byte when the run is not valid UTF-8), and the text loses one leading space (the dummy prefix).
    """
    pieces, byte_value = spt._decode_tables()
    n_sp, specials = spt.n_sp, spt.index_special_tokens
    out: List[str] = []
    buf = bytearray()
    for i in ids:
        if i in skip:
            continue
        if 0 <= i < n_sp:
            if byte_value[i] >= 0:
                buf.append(byte_value[i])
                continue
            s = pieces[i]
        else:
            s = specials.get(i)
            if s is None and literal is not None:
                s = literal.get(i)
            if s is None:
                continue
        if buf:
            out.append(_utf8_or_replacement(bytes(buf)))
            buf.clear()
        out.append(s.replace(SPACE, " "))
    if buf:
        out.append(_utf8_or_replacement(bytes(buf)))
    text = "".join(out)
    return text[1:] if text.startswith(" ") else text


def _to_int_list(token_ids) -> List[int]:
    if hasattr(token_ids, "tolist"):  # torch / numpy
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    out = []
    for t in token_ids:
        if hasattr(t, "tolist"):
            t = t.tolist()
        if isinstance(t, list):
            raise ValueError("decode expects one sequence of ids; use batch_decode for a batch")
        out.append(int(t))
    return out


class _ChatGLMTokenizerMixin:
    """Everything the slow and the fast ChatGLM tokenizers share (placed before the transformers base in the MRO)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    # ---- construction ----
    def _glm_setup(self, vocab_file: Optional[str], encode_special_tokens: bool, kwargs: dict) -> str:
        vocab_file = _resolve_vocab_file(vocab_file)
        self.name = "GLMTokenizer"
        self.vocab_file = vocab_file
        self.tokenizer = SPTokenizer(vocab_file)
        self.special_tokens = {"<bos>": self.tokenizer.bos_id, "<eos>": self.tokenizer.eos_id,
                               "<pad>": self.tokenizer.pad_id}
        self.encode_special_tokens = bool(encode_special_tokens)
        self._glm_chat_depth = 0
        self._glm_added_cache = (-1, None)
        # Special tokens go through __init__ kwargs so that the standard setters and *_token_id work everywhere.
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("pad_token", "<unk>")
        kwargs.setdefault("eos_token", "</s>")
        # The GLM tokens are "additional special tokens". transformers 5.x saves them as a list under
        # `extra_special_tokens`, a name 4.x uses for a dict of named tokens: a list is read as the additional ones,
        # so that a folder saved on any supported version loads on every other.
        extra = kwargs.pop("extra_special_tokens", None)
        additional = list(kwargs.pop("additional_special_tokens", None) or [])
        if isinstance(extra, dict):
            kwargs["extra_special_tokens"] = extra
        elif extra:
            additional += list(extra)
        additional = [t.get("content") if isinstance(t, dict) else t for t in additional]
        kwargs["additional_special_tokens"] = list(GLM_SPECIAL_TOKENS) + [
            t for t in dict.fromkeys(additional) if str(t) not in GLM_SPECIAL_TOKENS]
        kwargs.setdefault("chat_template", DEFAULT_CHAT_TEMPLATE)
        return vocab_file

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_words

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.tokenizer.convert_id_to_token(i): i for i in range(self.tokenizer.n_words)}
        try:
            vocab.update(self.added_tokens_encoder)
        except AttributeError:  # called by an old base __init__ before the added-token tables exist
            pass
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokenizer.convert_id_to_token(index)

    def _glm_user_added(self) -> Dict[int, str]:
        """Tokens added with add_tokens / add_special_tokens beyond the published vocabulary (cached: asking the
        backend is expensive on some versions; `_add_tokens` invalidates the cache)."""
        cached = self.__dict__.get("_glm_added_tokens")
        if cached is not None:
            return cached
        n = self.tokenizer.n_words
        try:
            decoder = {i: str(t) for i, t in self.added_tokens_decoder.items()}
        except AttributeError:  # transformers < 4.34
            try:
                decoder = {i: t for t, i in self.get_added_vocab().items()}
            except (AttributeError, TypeError):
                return {}
        cached = {i: t for i, t in decoder.items() if i >= n}
        self.__dict__["_glm_added_tokens"] = cached
        return cached

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        self.__dict__.pop("_glm_added_tokens", None)
        try:
            return super()._add_tokens(new_tokens, special_tokens=special_tokens)
        finally:
            self.__dict__.pop("_glm_added_tokens", None)

    def _glm_added_regex(self):
        """(regex, {string: id}) of the tokens that become ids wherever they occur in text: ``</s>`` and the
        tokens a user added."""
        added = self._glm_user_added()
        key = tuple(sorted(added.items()))
        if self._glm_added_cache[0] != key:
            table = {tok: i for i, tok in added.items()}
            if self.tokenizer.convert_id_to_token(self.tokenizer.eos_id) == _EOS_TEXT:
                table.setdefault(_EOS_TEXT, self.tokenizer.eos_id)
            regex = re.compile("|".join(re.escape(t) for t in sorted(table, key=len, reverse=True))) if table else None
            self._glm_added_cache = (key, (regex, table) if table else None)
        return self._glm_added_cache[1]

    def get_command(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self.tokenizer.special_tokens:
            return self.tokenizer.special_tokens[token]
        raise ValueError(
            f"ChatGLM tokenizer: {token!r} is not a command token; known: "
            f"{sorted(self.special_tokens) + list(self.tokenizer.special_tokens)}"
        )

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        single = isinstance(ids, int) or (hasattr(ids, "ndim") and getattr(ids, "ndim") == 0)
        id_list = _to_int_list(ids)
        added = self._glm_user_added()
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        tokens = [added[i] if i in added else self.tokenizer.convert_id_to_token(i) for i in id_list if i not in skip]
        return tokens[0] if single else tokens

    # ---- splitting text ----
    def _glm_segments(self, text: str, encode_special_tokens: Optional[bool]) -> List[Union[str, int]]:
        parse = self.encode_special_tokens if encode_special_tokens is None else bool(encode_special_tokens)
        chat = self._glm_chat_depth > 0
        added = self._glm_added_regex()
        if chat or parse:
            return _split_special(text, chat, self.tokenizer.n_sp, added)
        if added:
            return _split_added(text, added)
        return [text] if text else []

    # ---- special tokens around sequences ----
    def get_prefix_tokens(self) -> List[int]:
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None) -> List[int]:
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.get_command("<eos>")]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> List[int]:
        first = [0] * (2 + len(token_ids_0))
        return first if token_ids_1 is None else first + [1] * (len(token_ids_1) + 1)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if t in special else 0 for t in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    # ---- padding ----
    def _pad(self, encoded_inputs, max_length: Optional[int] = None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of: Optional[int] = None, padding_side: Optional[str] = None,
             return_attention_mask: Optional[bool] = None, **kwargs) -> dict:
        """Pad one example; always adds `position_ids` (0 .. n-1 on the real tokens, 0 on pads).

        Accepts the `padding_side` argument newer transformers pass (None -> `self.padding_side`).
        """
        padding_strategy = _padding_strategy(padding_strategy)
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"ChatGLM tokenizer: padding_side must be 'left' or 'right', got {side!r}")
        required = encoded_inputs[self.model_input_names[0]]
        seq_len = len(required)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = seq_len
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
            max_length = ((max_length // pad_to_multiple_of) + 1) * pad_to_multiple_of
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * seq_len
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(seq_len))
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None and seq_len < max_length:
            if self.pad_token_id is None:
                raise ValueError("ChatGLM tokenizer: padding needs a pad token, but tokenizer.pad_token is None")
            n = max_length - seq_len
            fill = {
                self.model_input_names[0]: self.pad_token_id,
                "attention_mask": 0,
                "position_ids": 0,
                "token_type_ids": getattr(self, "pad_token_type_id", 0),
                "special_tokens_mask": 1,
            }
            for key, value in fill.items():
                if key in encoded_inputs:
                    seq = list(encoded_inputs[key])
                    encoded_inputs[key] = [value] * n + seq if side == "left" else seq + [value] * n
        return encoded_inputs

    # ---- decoding ----
    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: Optional[bool] = None,
                **kwargs) -> str:
        ids = _to_int_list(token_ids)
        added = self._glm_user_added()
        spt = self.tokenizer
        skip = (set(self.all_special_ids) | set(spt.index_special_tokens) | {spt.unk_id, spt.bos_id, spt.eos_id}
                if skip_special_tokens else ())
        text = _pieces_to_text(self.tokenizer, ids, literal=added, skip=skip)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = getattr(self, "clean_up_tokenization_spaces", False)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        ids = []
        literal = {}
        for t in tokens:
            i = self.tokenizer.convert_token_to_id(t)
            if i == self.tokenizer.unk_id and t != self.tokenizer.pieces[i]:  # not a piece: keep it verbatim
                i = -1 - len(literal)
                literal[i] = t
            ids.append(i)
        return _pieces_to_text(self.tokenizer, ids, literal=literal)

    # ---- saving ----
    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; the folder then also carries this code and an auto_map naming both classes
        (4.30 writes the source folder into it, 4.5x writes only the slow class when saving the slow tokenizer)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = os.path.join(str(save_directory), "tokenizer_config.json")
        if not kwargs.get("filename_prefix") and os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            config.setdefault("auto_map", {})["AutoTokenizer"] = [f"{_MODULE}.ChatGLMTokenizer",
                                                                  f"{_MODULE}.ChatGLMTokenizerFast"]
            if "added_tokens_decoder" not in config and hasattr(self, "added_tokens_decoder"):
                # (5.x omits it and then parses the whole tokenizer.json at every load to find the added tokens)
                config["added_tokens_decoder"] = {
                    str(i): {"content": str(t), "lstrip": bool(getattr(t, "lstrip", False)),
                             "normalized": bool(getattr(t, "normalized", False)),
                             "rstrip": bool(getattr(t, "rstrip", False)),
                             "single_word": bool(getattr(t, "single_word", False)),
                             "special": bool(getattr(t, "special", True))}
                    for i, t in self.added_tokens_decoder.items()}
            with open(config_file, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
                f.write("\n")
            code_file = os.path.join(str(save_directory), _MODULE + ".py")
            if not os.path.exists(code_file):
                shutil.copyfile(os.path.abspath(__file__), code_file)
        return files

    def save_vocabulary(self, save_directory, filename_prefix: Optional[str] = None) -> Tuple[str]:
        save_directory = str(save_directory)
        if os.path.isdir(save_directory):
            target = os.path.join(save_directory, VOCAB_FILES_NAMES["vocab_file"])
        else:
            target = save_directory
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    # ---- chat ----
    def build_single_message(self, role: str, metadata: str, message: str) -> List[int]:
        if role not in ROLES:
            raise ValueError(f"ChatGLM tokenizer: role must be one of {ROLES}, got {role!r}")
        metadata = _clean_text("" if metadata is None else metadata, "metadata")
        message = _clean_text(message, "message content")
        return ([self.get_command(f"<|{role}|>")] + self._glm_encode_plain(f"{metadata}\n")
                + self._glm_encode_plain(message))

    def build_chat_input(self, query: str, history: Optional[List[dict]] = None, role: str = "user") -> BatchEncoding:
        if history is None:
            history = []
        if not isinstance(history, (list, tuple)):
            raise ValueError(f"ChatGLM tokenizer: history must be a list of message dicts, got {type(history).__name__}")
        input_ids: List[int] = []
        for n, item in enumerate(history):
            if not isinstance(item, dict):
                raise ValueError(f"ChatGLM tokenizer: history[{n}] must be a dict with 'role' and 'content', got "
                                 f"{type(item).__name__}: {item!r:.80}")
            if "role" not in item or "content" not in item:
                raise ValueError(f"ChatGLM tokenizer: history[{n}] needs the keys 'role' and 'content', got "
                                 f"{sorted(item)}")
            if item["role"] not in ROLES:
                raise ValueError(f"ChatGLM tokenizer: history[{n}]['role'] must be one of {ROLES}, got {item['role']!r}")
            content = _clean_text(item["content"], f"history[{n}]['content']")
            if item["role"] == "system" and item.get("tools") is not None:
                try:
                    content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"ChatGLM tokenizer: history[{n}]['tools'] is not JSON-serialisable: {e}") from e
            input_ids.extend(self.build_single_message(item["role"], item.get("metadata") or "", content))
        input_ids.extend(self.build_single_message(role, "", query))
        input_ids.append(self.get_command("<|assistant|>"))
        return self._glm_pad_batch([{"input_ids": self.get_prefix_tokens() + input_ids}],
                                   PaddingStrategy.DO_NOT_PAD, None, None, None, None, return_tensors="pt")

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' apply_chat_template, with the special-token strings inside the messages kept as text.

        Messages may have the roles system/user/assistant/observation and the optional keys "metadata" and (system
        only) "tools". With the default template the ids equal `build_chat_input`'s.
        """
        base = super()
        if not hasattr(base, "apply_chat_template"):
            raise NotImplementedError(
                "apply_chat_template needs transformers >= 4.34; on this version use tokenizer.build_chat_input()")
        if kwargs.get("chat_template") is None and not args:
            _validate_conversation(conversation)
        kwargs.pop("sanitize_control_tokens", None)  # always done here
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("ChatGLM tokenizer: return_assistant_tokens_mask is not supported")
        if not kwargs.get("tokenize", True):
            return base.apply_chat_template(conversation, *args, **kwargs)
        conversation = _mark_special_strings(conversation)
        for key in ("tools", "documents"):
            if kwargs.get(key) is not None:
                kwargs[key] = _mark_special_strings(kwargs[key])
        self._glm_chat_depth += 1
        try:
            return base.apply_chat_template(conversation, *args, **kwargs)
        finally:
            self._glm_chat_depth -= 1

    # ---- shared batch machinery (used by the fast tokenizer and by build_chat_input) ----
    def _glm_pad_batch(self, examples: List[dict], padding_strategy, max_length, pad_to_multiple_of, padding_side,
                       return_attention_mask, return_tensors=None) -> BatchEncoding:
        padding_strategy = _padding_strategy(padding_strategy)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = max((len(e["input_ids"]) for e in examples), default=0)
            padding_strategy = PaddingStrategy.MAX_LENGTH
        elif padding_strategy == PaddingStrategy.MAX_LENGTH and max_length is None:
            raise ValueError("ChatGLM tokenizer: padding='max_length' needs max_length")
        if all(len(e) == 1 for e in examples) and return_attention_mask is not False:
            # the common case (only input_ids): pad the whole batch with list arithmetic
            side = padding_side if padding_side is not None else self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"ChatGLM tokenizer: padding_side must be 'left' or 'right', got {side!r}")
            seqs = [e["input_ids"] for e in examples]
            target = max_length if padding_strategy == PaddingStrategy.MAX_LENGTH else None
            if target is not None and pad_to_multiple_of is not None and target % pad_to_multiple_of != 0:
                target = ((target // pad_to_multiple_of) + 1) * pad_to_multiple_of
            longest = max((len(x) for x in seqs), default=0)
            if len(_RANGE) < longest:
                _RANGE.extend(range(len(_RANGE), longest))
            ids, mask, pos = [], [], []
            pad_id = None
            for x in seqs:
                n = len(x)
                k = target - n if target is not None and target > n else 0
                if k:
                    if pad_id is None:
                        pad_id = self.pad_token_id
                        if pad_id is None:
                            raise ValueError("ChatGLM tokenizer: padding needs a pad token, but tokenizer.pad_token "
                                             "is None")
                    if side == "left":
                        ids.append([pad_id] * k + x)
                        mask.append([0] * k + [1] * n)
                        pos.append([0] * k + _RANGE[:n])
                    else:
                        ids.append(x + [pad_id] * k)
                        mask.append([1] * n + [0] * k)
                        pos.append(_RANGE[:n] + [0] * k)
                else:
                    ids.append(list(x))
                    mask.append([1] * n)
                    pos.append(_RANGE[:n])
            return BatchEncoding({"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                                 tensor_type=return_tensors)
        batch: Dict[str, list] = {}
        for e in examples:
            e = self._pad(e, max_length=max_length, padding_strategy=padding_strategy,
                          pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                          return_attention_mask=return_attention_mask)
            for k, v in e.items():
                batch.setdefault(k, []).append(v)
        return BatchEncoding(batch, tensor_type=return_tensors)

    def _glm_truncate(self, ids, pair, strategy: TruncationStrategy, max_length, add_special_tokens):
        if strategy == TruncationStrategy.DO_NOT_TRUNCATE or max_length is None:
            return ids, pair
        total = len(ids) + (len(pair) if pair is not None else 0)
        if add_special_tokens:
            total += self.num_special_tokens_to_add(pair is not None)
        remove = total - max_length
        if remove <= 0:
            return ids, pair
        left = self.truncation_side == "left"

        def cut(seq, n):
            if n <= 0:
                return seq
            return seq[n:] if left else seq[:-n]

        if strategy == TruncationStrategy.LONGEST_FIRST and pair is not None:
            # same result as removing one token at a time from the longer sequence (ties: from the second)
            a, b = len(ids), len(pair)
            diff = abs(a - b)
            first = min(diff, remove)
            rest = remove - first
            if a > b:
                ra, rb = first + rest // 2, rest - rest // 2
            else:
                ra, rb = rest // 2, first + rest - rest // 2
            return cut(ids, ra), cut(pair, rb)
        if strategy == TruncationStrategy.ONLY_SECOND:
            if pair is not None and len(pair) > remove:
                return ids, cut(pair, remove)
            return ids, pair
        # ONLY_FIRST, or LONGEST_FIRST on a single sequence
        if len(ids) > remove:
            return cut(ids, remove), pair
        if strategy == TruncationStrategy.LONGEST_FIRST and pair is None:
            return [], pair
        return ids, pair


def _validate_conversation(conversation):
    convs = conversation
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        pass
    else:
        convs = [conversation]
    for c, conv in enumerate(convs):
        conv = getattr(conv, "messages", conv)
        if not isinstance(conv, (list, tuple)):
            raise ValueError(f"ChatGLM tokenizer: a conversation must be a list of message dicts, got {type(conv).__name__}")
        for n, msg in enumerate(conv):
            if not isinstance(msg, dict):
                raise ValueError(f"ChatGLM tokenizer: message {n} must be a dict, got {type(msg).__name__}")
            if msg.get("role") not in ROLES:
                raise ValueError(f"ChatGLM tokenizer: message {n} has role {msg.get('role')!r}; ChatGLM3 roles are {ROLES}")
            content = msg.get("content", "")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"ChatGLM tokenizer: message {n} content must be a str, got {type(content).__name__}")
            if msg.get("metadata") is not None and not isinstance(msg["metadata"], str):
                raise ValueError(f"ChatGLM tokenizer: message {n} metadata must be a str")


# --------------------------------------------------------------------------------------------------------------
# slow tokenizer
# --------------------------------------------------------------------------------------------------------------


class ChatGLMTokenizer(_ChatGLMTokenizerMixin, PreTrainedTokenizer):
    """SentencePiece-based ChatGLM3 tokenizer (the published interface, with the originals' bugs fixed)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file=None, padding_side="left", clean_up_tokenization_spaces=False,
                 encode_special_tokens=False, **kwargs):
        kwargs.pop("tokenizer_json_source", None)  # the fast tokenizer's record of its tokenizer.json
        if not hasattr(PreTrainedTokenizer, "added_tokens_decoder"):  # transformers < 4.34 has no such table
            kwargs.pop("added_tokens_decoder", None)
        # The SentencePiece model must exist before the base __init__: newer transformers call get_vocab there.
        self._glm_setup(vocab_file, encode_special_tokens, kwargs)
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         encode_special_tokens=encode_special_tokens, **kwargs)
        self.__dict__.pop("_glm_added_tokens", None)

    def _glm_encode_plain(self, text: str) -> List[int]:
        return self.tokenizer.sp_model.encode(text) if text else []

    def tokenize(self, text, **kwargs) -> List[str]:
        text = _clean_text(text)
        encode_special_tokens = kwargs.pop("encode_special_tokens", None)
        pieces: List[str] = []
        added = self._glm_user_added()
        for seg in self._glm_segments(text, encode_special_tokens):
            if isinstance(seg, int):
                pieces.append(added.get(seg) or self.tokenizer.convert_id_to_token(seg))
            else:
                pieces.extend(self.tokenizer.sp_model.encode(seg, out_type=str))
        return pieces

    def _tokenize(self, text, **kwargs):
        return self.tokenizer.sp_model.encode(text, out_type=str)


# --------------------------------------------------------------------------------------------------------------
# fast tokenizer
# --------------------------------------------------------------------------------------------------------------

TOKENIZER_JSON = "tokenizer.json"
# Bumped whenever _build_backend's output changes, so that tokenizer.json files written by older code are rebuilt.
_BUILDER_VERSION = 1
_HAS_INNER_SPACE = re.compile("[^" + SPACE + "]" + SPACE)
_BACKEND_CACHE: Dict[Tuple[str, int, int], Any] = {}
_MAX_ID = 2 ** 32 - 1  # the backend takes u32 ids; anything else (negative, huge) has no token


def _has_complete_pipeline() -> bool:
    """tokenizers >= 0.13.3 has every part of a SentencePiece-style pipeline: BPE byte_fallback, the Prepend
    normalizer and the ByteFallback / Fuse / Strip decoders."""
    from tokenizers import decoders, normalizers

    if not hasattr(normalizers, "Prepend") or not all(hasattr(decoders, n) for n in ("ByteFallback", "Fuse", "Strip")):
        return False
    try:
        _RustBPE(vocab={"a": 0}, merges=[], byte_fallback=True)
    except TypeError:
        return False
    return True


_COMPLETE = _has_complete_pipeline()


def _source_fingerprint(vocab_file: str) -> str:
    """What a tokenizer.json built from `vocab_file` by this code is recorded with (in tokenizer_config.json)."""
    with open(vocab_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"tokenizer.model sha256 {digest}, builder {_BUILDER_VERSION}"


def _load_sentencepiece(path: str):
    """Open a SentencePiece model; a file that is not one gives a ValueError naming it (a ValueError on purpose:
    transformers 4.4x-4.5x swallow a RuntimeError from a tokenizer constructor and return ``False``)."""
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except Exception as error:  # sentencepiece raises RuntimeError/OSError ("could not parse ModelProto", ...)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        hint = " It looks like a git-lfs pointer or a truncated download." if size < 4096 else ""
        raise ValueError(f"ChatGLM tokenizer: {path!r} ({size} bytes) is not a SentencePiece model file "
                         f"(tokenizer.model): {type(error).__name__}: {error}.{hint}") from error


def _read_sentencepiece_model(path: str):
    """(pieces, scores, types) from the model proto; also checks the normalizer settings we emulate."""
    sp = _load_sentencepiece(path)  # validates the file
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:  # protobuf missing: read the same facts through the processor
        model_pb2 = None
    if model_pb2 is not None:
        proto = model_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        ns, ts = proto.normalizer_spec, proto.trainer_spec
        problems = []
        if ts.model_type != model_pb2.TrainerSpec.BPE:
            problems.append("model_type is not BPE")
        if ns.name not in ("identity", "") or ns.precompiled_charsmap:
            problems.append(f"normalizer {ns.name!r} is not identity")
        if ns.remove_extra_whitespaces:
            problems.append("remove_extra_whitespaces is true")
        if not ns.add_dummy_prefix:
            problems.append("add_dummy_prefix is false")
        if ts.treat_whitespace_as_suffix:
            problems.append("treat_whitespace_as_suffix is true")
        if problems:
            raise ValueError(f"ChatGLMTokenizerFast cannot emulate {path}: " + "; ".join(problems))
        # piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
        return [p.piece for p in proto.pieces], [p.score for p in proto.pieces], [p.type for p in proto.pieces]
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(6 if sp.is_byte(i) else 2 if sp.is_unknown(i) else 3 if sp.is_control(i)
                     else 5 if sp.is_unused(i) else 1)
    return pieces, scores, types


def _build_backend(path: str):
    """The complete `tokenizers` pipeline for the SentencePiece model at `path` (a fresh copy per call).

    * model: BPE over the pieces (ids as in tokenizer.model, the GLM tokens after them), byte fallback, one merge
      per way of splitting a normal piece into two normal pieces, ranked by that piece's score (SentencePiece
      merges the adjacent pair whose concatenation is the best-scoring piece);
    * normalizer: the dummy prefix "▁" and " " -> "▁" (SentencePiece's identity normalizer plus add_dummy_prefix);
    * pre-tokenizer: cut before every run of "▁" (exact when no piece has "▁" after another character, true for the
      published vocabulary; it lets `tokenizers` cache words);
    * decoder: "▁" -> " ", byte pieces -> UTF-8, fuse, drop one leading space;
    * post-processor: "[gMASK] sop A" and "[gMASK] sop A B </s>"; the control pieces and the GLM tokens are special
      added tokens.
    """
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    cached = _BACKEND_CACHE.get(key)
    if cached is None:
        pieces, scores, types = _read_sentencepiece_model(path)
        if any(t in (4, 5) for t in types):
            raise ValueError("ChatGLMTokenizerFast: user-defined or unused SentencePiece pieces are not supported")
        eos = pieces[_load_sentencepiece(path).eos_id()]
        vocab = {p: i for i, p in enumerate(pieces)}
        n_sp = len(pieces)
        for k, tok in enumerate(GLM_SPECIAL_TOKENS):  # never produced by merges, only used for id <-> token
            vocab.setdefault(tok, n_sp + k)
        normal = {p: i for i, p in enumerate(pieces) if types[i] == 1}
        ranked = []
        for piece, pid in normal.items():
            for cut in range(1, len(piece)):
                l, r = piece[:cut], piece[cut:]
                if l in normal and r in normal:
                    ranked.append((-scores[pid], pid, normal[l], normal[r], l, r))
        ranked.sort()
        merges = [(l, r) for *_, l, r in ranked]
        unk = pieces[types.index(2)] if 2 in types else None
        backend = _RustTokenizer(_RustBPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=False, byte_fallback=True))
        if not any(_HAS_INNER_SPACE.search(p) for p, t in zip(pieces, types) if t == 1):
            backend.pre_tokenizer = pre_tokenizers.Split(Regex(SPACE + "+"), behavior="merged_with_next")
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        control = [p for p, t in zip(pieces, types) if t in (2, 3)]
        backend.add_special_tokens([AddedToken(t, normalized=False) for t in control + list(GLM_SPECIAL_TOKENS)])
        g, sop = vocab["[gMASK]"], vocab["sop"]
        backend.post_processor = processors.TemplateProcessing(
            single="[gMASK]:0 sop:0 $A:0", pair="[gMASK]:0 sop:0 $A:0 $B:1 " + eos + ":1",
            special_tokens=[("[gMASK]", g), ("sop", sop), (eos, vocab[eos])])
        cached = backend
        _BACKEND_CACHE[key] = cached
    return copy.deepcopy(cached)


class _RebuildBackend(Exception):
    """tokenizer.json is missing or not recorded as built from the tokenizer.model next to it."""


class ChatGLMTokenizerFast(_ChatGLMTokenizerMixin, PreTrainedTokenizerFast):
    """`tokenizers`-backed ChatGLM3 tokenizer: same ids, padding, decoding and chat building as ChatGLMTokenizer.

    Its backend (`tokenizer._tokenizer`) is a complete `tokenizers` pipeline (see `_build_backend`), so tools that
    decode with it directly (vLLM, `tokenizers.decoders.DecodeStream`) get exactly `tokenizer.decode`'s text.
    `save_pretrained` writes it as tokenizer.json and records the sha256 of tokenizer.model in
    tokenizer_config.json (`tokenizer_json_source`); loading uses that file only while the record matches.
    """

    vocab_files_names = {**VOCAB_FILES_NAMES, "tokenizer_file": TOKENIZER_JSON}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    slow_tokenizer_class = ChatGLMTokenizer

    def __init__(self, vocab_file=None, tokenizer_file=None, padding_side="left", clean_up_tokenization_spaces=False,
                 encode_special_tokens=False, tokenizer_json_source=None, **kwargs):
        if not _COMPLETE:
            raise ValueError("ChatGLMTokenizerFast needs tokenizers >= 0.13.3 (BPE byte_fallback, the Prepend "
                             "normalizer, the ByteFallback/Fuse/Strip decoders); use ChatGLMTokenizer instead")
        vocab_file = self._glm_setup(vocab_file, encode_special_tokens, kwargs)
        if not hasattr(PreTrainedTokenizerFast, "added_tokens_decoder"):  # transformers < 4.34 has no such table
            kwargs.pop("added_tokens_decoder", None)
        source = _source_fingerprint(vocab_file)
        for k in ("tokenizer_object", "vocab", "merges", "from_slow"):
            kwargs.pop(k, None)
        common = dict(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                      encode_special_tokens=encode_special_tokens, **kwargs)
        try:
            if tokenizer_json_source != source or not tokenizer_file or not os.path.isfile(tokenizer_file):
                raise _RebuildBackend
            super().__init__(tokenizer_file=tokenizer_file, **common)  # written by this code from this tokenizer.model
        except Exception:  # no usable tokenizer.json (also: one written by a newer `tokenizers` than this one)
            super().__init__(tokenizer_object=_build_backend(vocab_file), **common)
        self.vocab_file = vocab_file
        self.init_kwargs["tokenizer_json_source"] = source
        # Plain text is encoded by the same model without the added tokens: special-token strings in text never
        # become ids there (the anti-injection rule); ChatGLM's own splitting happens in Python beforehand.
        self._glm_plain = _RustTokenizer(self._tokenizer.model)
        self._glm_plain.pre_tokenizer = self._tokenizer.pre_tokenizer
        self._glm_plain.normalizer = self._tokenizer.normalizer
        self.__dict__.pop("_glm_added_tokens", None)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # transformers 5.x would convert tokenizer.model with its generic SentencePiece converter; we build
        # our own backend in __init__.
        return kwargs

    @property
    def can_save_slow_tokenizer(self) -> bool:
        return bool(self.vocab_file) and os.path.isfile(self.vocab_file)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        path = os.path.join(str(save_directory), (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_JSON)
        self._tokenizer.save(path)
        return tuple(file_names) + tuple(self.save_vocabulary(save_directory, filename_prefix)) + (path,)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        # Added tokens are matched on the raw text (each text chunk around them gets its own dummy prefix, as in
        # the slow tokenizer); a "normalized" one would also decode with the dummy "▁" in front.
        from tokenizers import AddedToken

        raw = []
        for t in new_tokens:
            if isinstance(t, str):
                t = AddedToken(t, normalized=False)
            elif getattr(t, "normalized", False):
                extra = {"special": t.special} if getattr(t, "special", None) is not None else {}
                t = AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                               normalized=False, **extra)
            raw.append(t)
        return super()._add_tokens(raw, special_tokens=special_tokens)

    # ---- decoding: the backend's own decoder ----
    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [i for i in _to_int_list(token_ids) if 0 <= i < _MAX_ID]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = getattr(self, "clean_up_tokenization_spaces", False)
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ---- encoding ----
    def _glm_encode_texts(self, texts: List[str]) -> List[List[int]]:
        plain = self._glm_plain
        if hasattr(plain, "encode_batch_fast"):  # tokenizers >= 0.21: no offsets computed
            return [e.ids for e in plain.encode_batch_fast(texts, add_special_tokens=False)]
        return [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]

    def _glm_encode_plain(self, text: str) -> List[int]:
        return self._glm_encode_texts([text])[0] if text else []

    def _glm_ids_for(self, inputs: List[Any], is_split_into_words: bool, encode_special_tokens) -> List[List[int]]:
        """Ids (no prefix) for each input: str, list of words, or list of ids."""
        if not is_split_into_words and all(type(x) is str for x in inputs):
            parse = self.encode_special_tokens if encode_special_tokens is None else encode_special_tokens
            joined = "".join(inputs)
            if not parse and self._glm_chat_depth == 0 and not self._glm_user_added() and _EOS_TEXT not in joined:
                # hot path: plain strings, nothing to split out (one surrogate check for the whole batch)
                if _SURROGATE_RE.search(joined):
                    inputs = [_clean_text(x) for x in inputs]
                return self._glm_encode_texts(inputs)
        plans = []  # per input: list of (int id) or (index into texts)
        texts: List[str] = []
        for x in inputs:
            if isinstance(x, str):
                parts = [x]
            elif isinstance(x, (list, tuple)) and all(isinstance(t, int) for t in x):
                plans.append([("id", t) for t in x])
                continue
            elif isinstance(x, (list, tuple)) and is_split_into_words and all(isinstance(t, str) for t in x):
                parts = list(x)
            else:
                raise ValueError(f"ChatGLM tokenizer: text must be a str (or a list of str with "
                                 f"is_split_into_words=True), got {type(x).__name__}: {x!r:.80}")
            plan = []
            for part in parts:
                for seg in self._glm_segments(_clean_text(part), encode_special_tokens):
                    if isinstance(seg, int):
                        plan.append(("id", seg))
                    else:
                        plan.append(("text", len(texts)))
                        texts.append(seg)
            plans.append(plan)
        encoded = self._glm_encode_texts(texts) if texts else []
        result = []
        for plan in plans:
            if len(plan) == 1 and plan[0][0] == "text":
                result.append(encoded[plan[0][1]])
                continue
            ids: List[int] = []
            for kind, v in plan:
                if kind == "id":
                    ids.append(v)
                else:
                    ids.extend(encoded[v])
            result.append(ids)
        return result

    def _glm_encode(self, items: List[Any], is_batched: bool, add_special_tokens=True,
                    padding_strategy=PaddingStrategy.DO_NOT_PAD,
                    truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE, max_length=None, stride=0,
                    is_split_into_words=False, pad_to_multiple_of=None, padding_side=None, return_tensors=None,
                    return_token_type_ids=None, return_attention_mask=None, return_overflowing_tokens=False,
                    return_special_tokens_mask=False, return_offsets_mapping=False, return_length=False,
                    verbose=True, **kwargs) -> BatchEncoding:
        if return_overflowing_tokens or return_offsets_mapping:
            raise ValueError("ChatGLMTokenizerFast does not support return_overflowing_tokens or "
                             "return_offsets_mapping; use ChatGLMTokenizer (use_fast=False)")
        encode_special_tokens = kwargs.pop("encode_special_tokens", None)
        kwargs.pop("split_special_tokens", None)
        firsts = [it[0] for it in items]
        seconds = [it[1] for it in items]
        have_pairs = [s is not None for s in seconds]
        ids_all = self._glm_ids_for(firsts + [s for s in seconds if s is not None], is_split_into_words,
                                    encode_special_tokens)
        first_ids = ids_all[:len(firsts)]
        pair_iter = iter(ids_all[len(firsts):])
        pair_ids = [next(pair_iter) if h else None for h in have_pairs]
        truncation_strategy = _truncation_strategy(truncation_strategy)
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        examples = []
        simple = (not return_token_type_ids and not return_special_tokens_mask and not any(have_pairs)
                  and (truncation_strategy == TruncationStrategy.DO_NOT_TRUNCATE or max_length is None))
        if simple:  # hot path: single sequences, no truncation, no extra outputs
            if add_special_tokens:
                prefix = self.get_prefix_tokens()
                first_ids = [prefix + a for a in first_ids]
            examples = [{"input_ids": a} for a in first_ids]
            if verbose and first_ids:
                self._eventual_warn_about_too_long_sequence(max(first_ids, key=len), max_length, verbose)
        for a, b in zip(first_ids, pair_ids) if not simple else ():
            a, b = self._glm_truncate(a, b, truncation_strategy, max_length, add_special_tokens)
            if add_special_tokens:
                seq = self.build_inputs_with_special_tokens(a, b)
                tt = self.create_token_type_ids_from_sequences(a, b)
            else:
                seq = a + (b if b is not None else [])
                tt = [0] * len(seq)
            ex = {"input_ids": seq}
            if return_token_type_ids:
                ex["token_type_ids"] = tt
            if return_special_tokens_mask:
                ex["special_tokens_mask"] = (self.get_special_tokens_mask(a, b) if add_special_tokens
                                             else [0] * len(seq))
            if verbose:
                self._eventual_warn_about_too_long_sequence(seq, max_length, verbose)
            examples.append(ex)
        out = self._glm_pad_batch(examples, padding_strategy, max_length, pad_to_multiple_of, padding_side,
                                  return_attention_mask, return_tensors=None)
        if return_length:
            out["length"] = [len(x) for x in out["input_ids"]]
        if not is_batched:
            data = {k: v[0] for k, v in out.items()}
            return BatchEncoding(data, tensor_type=return_tensors, prepend_batch_axis=return_tensors is not None)
        return BatchEncoding(dict(out), tensor_type=return_tensors)

    @staticmethod
    def _glm_as_pair(x, split: bool):
        """(first, second-or-None) for one batch element."""
        if split:
            if isinstance(x, tuple) and len(x) == 2 and all(isinstance(t, (list, tuple)) for t in x):
                return x[0], x[1]
            return x, None
        if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(t, str) for t in x):
            return x[0], x[1]
        return x, None

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs) -> BatchEncoding:
        # transformers 4.x entry point for batches
        split = kwargs.get("is_split_into_words", False)
        if all(type(x) is str for x in batch_text_or_text_pairs):
            items = [(x, None) for x in batch_text_or_text_pairs]
        else:
            items = [self._glm_as_pair(x, split) for x in batch_text_or_text_pairs]
        return self._glm_encode(items, True, *args, **kwargs)

    def _encode_plus(self, text, text_pair=None, *args, **kwargs) -> BatchEncoding:
        if hasattr(PreTrainedTokenizerFast, "_batch_encode_plus"):  # transformers 4.x: always one example
            return self._glm_encode([(text, text_pair)], False, *args, **kwargs)
        # transformers 5.x: one entry point for single examples and batches
        split = kwargs.get("is_split_into_words", False)
        if isinstance(text, (list, tuple)) and (
            (not split and (len(text) == 0 or not isinstance(text[0], int)))
            or (split and len(text) > 0 and isinstance(text[0], (list, tuple)))
        ):
            if text_pair is not None:
                if not isinstance(text_pair, (list, tuple)) or len(text_pair) != len(text):
                    raise ValueError("ChatGLM tokenizer: text_pair must be a batch as long as text")
                items = list(zip(text, text_pair))
            elif all(type(x) is str for x in text):
                items = [(x, None) for x in text]
            else:
                items = [self._glm_as_pair(x, split) for x in text]
            return self._glm_encode(items, True, *args, **kwargs)
        return self._glm_encode([(text, text_pair)], False, *args, **kwargs)

    def tokenize(self, text, pair=None, add_special_tokens: bool = False, **kwargs) -> List[str]:
        ids = self._glm_ids_for([text], False, kwargs.get("encode_special_tokens"))[0]
        if pair is not None:
            ids2 = self._glm_ids_for([pair], False, kwargs.get("encode_special_tokens"))[0]
            ids = self.build_inputs_with_special_tokens(ids, ids2) if add_special_tokens else ids + ids2
        elif add_special_tokens:
            ids = self.build_inputs_with_special_tokens(ids)
        return self.convert_ids_to_tokens(ids)

    def _convert_token_to_id_with_added_voc(self, token: str) -> int:
        added = {t: i for i, t in self._glm_user_added().items()}
        if token in added:
            return added[token]
        return self.tokenizer.convert_token_to_id(token)

    def convert_tokens_to_ids(self, tokens):
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._convert_token_to_id_with_added_voc(tokens)
        return [self._convert_token_to_id_with_added_voc(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_words

    def get_vocab(self) -> Dict[str, int]:
        return _ChatGLMTokenizerMixin.get_vocab(self)
