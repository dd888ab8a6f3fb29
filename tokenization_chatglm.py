"""Tokenizers for ChatGLM3-6B(-Base): `ChatGLMTokenizer` (SentencePiece) and `ChatGLMTokenizerFast` (`tokenizers`).

Both give exactly the ids of the published tokenizer:

* ids ``0 .. 64788`` are the SentencePiece pieces of ``tokenizer.model``; ids ``64789 .. 64797`` are the GLM tokens
  ``[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>``;
* a text is prefixed with ``[gMASK] sop``, a pair is ``[gMASK] sop A B </s>``;
* batches are padded on the left with id 0 and carry ``position_ids`` (0 on the first real token, 0 on pads).

The anti-injection rule: text never turns into GLM ids unless asked for (``encode_special_tokens=True``), so
``tokenizer("<|user|>")`` is five ordinary pieces. ``apply_chat_template`` is the one place where the template's own
role tokens become ids; the special strings inside the messages are escaped first and stay text. The exception is
``</s>``: outside chat messages it is the end-of-sequence id 2, as with every HF tokenizer (TRL appends ``eos_token``
as text). Tokens added with ``add_tokens`` become ids wherever they occur, each text chunk around them getting its
own SentencePiece dummy prefix.

``decode`` follows HF conventions (special ids give their strings unless ``skip_special_tokens=True``) and equals
SentencePiece's decoding, except that a run of byte-fallback pieces that is not UTF-8 gives one U+FFFD per byte.

Everything else (batching, padding, truncation, pairs, tensors) is transformers' own code: both classes run
transformers' Python encode pipeline (``tokenize`` -> ids -> ``prepare_for_model`` -> ``pad``), because the rule
above cannot be written as a `tokenizers` added-token table, and both encode the plain-text chunks with
SentencePiece (faster per call than `tokenizers`; the ids are the same). The fast tokenizer's backend
(``tokenizer._tokenizer``) is a complete `tokenizers` pipeline built from ``tokenizer.model`` by `_build_backend`,
for the tools that run it directly: its encode gives SentencePiece's ids, and ``tokenizer._tokenizer.decode`` and
``tokenizers.decoders.DecodeStream`` (vLLM) give exactly ``tokenizer.decode``, which the fast class decodes with.
``save_pretrained`` writes it as ``tokenizer.json`` and records the sha256 of ``tokenizer.model`` in
tokenizer_config.json; a load uses tokenizer.json only while that record matches.

On transformers 5.x ``AutoTokenizer`` always returns the fast class; the slow one is
``type(tok).slow_tokenizer_class.from_pretrained(folder)`` (see README).
"""

import copy
import hashlib
import inspect
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Union

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

HUB_REPO_ID = "THUDM/chatglm3-6b-base"
_MODULE = "tokenization_chatglm"  # this file's name in a model folder (auto_map)
VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
TOKENIZER_JSON = "tokenizer.json"
# Bumped whenever _build_backend's output changes, so that tokenizer.json files written by older code are rebuilt.
_BUILDER_VERSION = 1

# Appended after the SentencePiece vocabulary, in this order (ids 64789 .. 64797 for the published model).
GLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                      "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")
SPACE = "\u2581"  # SentencePiece's whitespace symbol
_EOS_TEXT = "</s>"
_MAX_ID = 2 ** 32 - 1  # the backend takes u32 ids; anything else has no token

# Special strings where text may contain them (encode_special_tokens=True, chat templates): role and mask tokens
# anywhere, "sop"/"eop" only right after a mask token, so that "isopropyl" or "people" are never cut.
_SPECIAL_PATTERN = r"\[[gs]?MASK\](?:sop|eop)?|<\|(?:system|user|assistant|observation)\|>"
# apply_chat_template escapes special strings (and the two escape characters) in the messages as OPEN + s + CLOSE;
# both are Unicode noncharacters, which never occur in interchanged text.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_ESCAPABLE = _SPECIAL_PATTERN + "|" + re.escape(_EOS_TEXT) + "|" + _OPEN + "|" + _CLOSE
_ESCAPABLE_RE = re.compile(_ESCAPABLE)
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
# Differences between the supported versions (transformers 4.30.2 .. 5.x, tokenizers 0.13.3 ..), all detected here
# --------------------------------------------------------------------------------------------------------------

# transformers >= 4.45: `_pad` (and `pad`, `__call__`) take `padding_side`; 4.30 reads `self.padding_side` only.
_PAD_TAKES_SIDE = "padding_side" in inspect.signature(PreTrainedTokenizerBase._pad).parameters
# transformers >= 4.34: the `added_tokens_decoder` table (and saved configs carrying it); `apply_chat_template`.
_HAS_ADDED_TOKENS_DECODER = hasattr(PreTrainedTokenizer, "added_tokens_decoder")
_HAS_CHAT_TEMPLATE = hasattr(PreTrainedTokenizerBase, "apply_chat_template")
# The Python encode pipeline the fast tokenizer borrows from the slow base class: 4.x has `_encode_plus`,
# `_batch_encode_plus` and `_batch_prepare_for_model` there (prepare_for_model is shared); 5.x has one
# `_encode_plus` for single texts and batches, plus `prepare_for_model` and `truncate_sequences`.
_PythonEncodePipeline = type("_PythonEncodePipeline", (), {
    name: vars(PreTrainedTokenizer)[name]
    for name in ("_encode_plus", "_batch_encode_plus", "_batch_prepare_for_model", "prepare_for_model",
                 "truncate_sequences")
    if name in vars(PreTrainedTokenizer)})


def _added_tokens(tok) -> Dict[int, str]:
    """id -> string of every added token: `added_tokens_decoder` from transformers 4.34, `get_added_vocab` before."""
    if _HAS_ADDED_TOKENS_DECODER:
        return {i: str(t) for i, t in tok.added_tokens_decoder.items()}
    return {i: t for t, i in tok.get_added_vocab().items()}


def _has_complete_pipeline() -> bool:
    """tokenizers >= 0.13.3: BPE byte_fallback, the Prepend normalizer, the ByteFallback/Fuse/Strip decoders."""
    if not hasattr(normalizers, "Prepend") or not all(hasattr(decoders, n) for n in ("ByteFallback", "Fuse", "Strip")):
        return False
    try:
        models.BPE(vocab={"a": 0}, merges=[], byte_fallback=True)
    except TypeError:
        return False
    return True


def _special_tokens_kwargs(kwargs: dict) -> None:
    """The GLM tokens are "additional special tokens". transformers 5.x saves them as a list under
    `extra_special_tokens`, a name 4.x uses for a dict of named tokens: a list is read as the additional ones, so a
    folder saved with any supported version loads with every other. 4.30 has no `added_tokens_decoder`."""
    extra = kwargs.pop("extra_special_tokens", None)
    additional = list(kwargs.pop("additional_special_tokens", None) or [])
    if isinstance(extra, dict):
        kwargs["extra_special_tokens"] = extra
    elif extra:
        additional += list(extra)
    additional = [str(t.get("content") if isinstance(t, dict) else t) for t in additional]
    kwargs["additional_special_tokens"] = list(GLM_SPECIAL_TOKENS) + [
        t for t in dict.fromkeys(additional) if t not in GLM_SPECIAL_TOKENS]
    if not _HAS_ADDED_TOKENS_DECODER:
        kwargs.pop("added_tokens_decoder", None)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _clean_text(text, what: str = "text") -> str:
    """Check that `text` is a str and make it encodable: surrogate pairs are joined, lone surrogates become U+FFFD."""
    if not isinstance(text, str):
        raise ValueError(f"ChatGLM tokenizer: {what} must be a str, got {type(text).__name__}: {text!r:.80}")
    if _SURROGATE_RE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _resolve_vocab_file(vocab_file: Optional[str]) -> str:
    """A path to tokenizer.model; downloaded from the hub when the folder lacks it."""
    if vocab_file is not None and os.path.isdir(vocab_file):
        vocab_file = os.path.join(vocab_file, VOCAB_FILES_NAMES["vocab_file"])
    if vocab_file is not None and os.path.isfile(vocab_file):
        return vocab_file
    where = f" at {vocab_file!r}" if vocab_file else " in the tokenizer folder"
    how = (f"Put the published tokenizer.model next to tokenization_chatglm.py, pass vocab_file=..., or fetch it once "
           f"with `huggingface-cli download {HUB_REPO_ID} tokenizer.model` while online.")
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
        raise ValueError(f"ChatGLM tokenizer: tokenizer.model not found{where}, and downloading it from the hub repo "
                         f"{HUB_REPO_ID!r} failed ({reason}). {how}") from e


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


def _mark_special_strings(obj):
    """Escape the special strings in every str inside `obj` (messages, tools, ...); dict keys are left alone."""
    if isinstance(obj, str):
        return _ESCAPABLE_RE.sub(lambda m: _OPEN + m.group(0) + _CLOSE, obj)
    if isinstance(obj, dict):
        return {k: _mark_special_strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_mark_special_strings(v) for v in obj)
    return obj


def _to_int_list(token_ids) -> List[int]:
    if hasattr(token_ids, "tolist"):  # torch / numpy
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    out = []
    for t in token_ids:
        t = t.tolist() if hasattr(t, "tolist") else t
        if isinstance(t, list):
            raise ValueError("decode expects one sequence of ids; use batch_decode for a batch")
        out.append(int(t))
    return out


class SPTokenizer:
    """The SentencePiece model plus the GLM special tokens appended after it (the original's interface)."""

    def __init__(self, model_path: str):
        self.sp_model = _load_sentencepiece(model_path)
        self.n_sp = self.sp_model.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()
        self.pad_id = self.unk_id  # ChatGLM pads with id 0 (<unk>)
        self.special_tokens = {tok: self.n_sp + i for i, tok in enumerate(GLM_SPECIAL_TOKENS)}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.n_words = self.n_sp + len(GLM_SPECIAL_TOKENS)
        self._pieces = None

    @property
    def pieces(self) -> List[str]:
        if self._pieces is None:
            self._pieces = [self.sp_model.id_to_piece(i) for i in range(self.n_sp)]
        return self._pieces

    def tokenize(self, s: str, encode_special_tokens: bool = False) -> List[str]:
        if not encode_special_tokens:
            return self.sp_model.encode(s, out_type=str)
        out, pos = [], 0
        for m in re.finditer(_SPECIAL_PATTERN, s):
            out += self.sp_model.encode(s[pos:m.start()], out_type=str) + _split_special_match(m.group(0))
            pos = m.end()
        return out + self.sp_model.encode(s[pos:], out_type=str)

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> List[int]:
        return [self.bos_id] * bos + self.sp_model.encode(_clean_text(s)) + [self.eos_id] * eos

    def decode(self, ids: List[int]) -> str:
        return self.decode_ids(ids)

    def decode_tokens(self, tokens: List[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def convert_token_to_id(self, token: str) -> int:
        return self.special_tokens[token] if token in self.special_tokens else self.sp_model.piece_to_id(token)

    def convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        return self.sp_model.id_to_piece(index) if 0 <= index < self.n_sp else ""  # padded embedding rows: no token

    def decode_ids(self, ids, literal: Optional[Dict[int, str]] = None, skip=()) -> str:
        """Decode exactly as the fast backend's decoder does: every id becomes its string (pieces, control pieces,
        GLM tokens, `literal` for other ids; ids without a token are dropped), "▁" becomes " ", a run of byte pieces
        its UTF-8 text (one U+FFFD per byte when it is not UTF-8), and the text loses one leading space."""
        out, run = [], bytearray()
        for i in ids:
            if i in skip:
                continue
            if 0 <= i < self.n_sp and self.sp_model.is_byte(i):
                run.append(int(self.pieces[i][3:-1], 16))
                continue
            s = self.pieces[i] if 0 <= i < self.n_sp else self.index_special_tokens.get(i, (literal or {}).get(i))
            if s is None:
                continue
            out.append(_utf8_or_replacement(run))
            run.clear()
            out.append(s.replace(SPACE, " "))
        text = "".join(out) + _utf8_or_replacement(run)
        return text[1:] if text.startswith(" ") else text


def _utf8_or_replacement(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


def _split_special_match(s: str) -> List[str]:
    """'[gMASK]sop' -> ['[gMASK]', 'sop']; a role or mask token alone -> [it]."""
    return [s[:-3], s[-3:]] if s.endswith(("sop", "eop")) else [s]


# --------------------------------------------------------------------------------------------------------------
# what both tokenizers share (placed before the transformers base class in the MRO)
# --------------------------------------------------------------------------------------------------------------


class _ChatGLMTokenizerMixin:
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def _glm_setup(self, vocab_file: Optional[str], kwargs: dict) -> str:
        """What must exist before the base __init__ (newer transformers call get_vocab there); fills `kwargs`."""
        vocab_file = _resolve_vocab_file(vocab_file)
        self.name = "GLMTokenizer"
        self.vocab_file = vocab_file
        self.tokenizer = SPTokenizer(vocab_file)
        self.special_tokens = {"<bos>": self.tokenizer.bos_id, "<eos>": self.tokenizer.eos_id,
                               "<pad>": self.tokenizer.pad_id}
        self.encode_special_tokens = bool(kwargs.get("encode_special_tokens", False))
        self._glm_chat_depth = 0
        self._glm_regex_cache = {}
        kwargs.pop("tokenizer_json_source", None)  # the fast tokenizer's record of its tokenizer.json
        for name, default in (("unk_token", "<unk>"), ("pad_token", "<unk>"), ("eos_token", _EOS_TEXT),
                              ("padding_side", "left"), ("clean_up_tokenization_spaces", False),
                              ("chat_template", DEFAULT_CHAT_TEMPLATE)):
            kwargs.setdefault(name, default)
        _special_tokens_kwargs(kwargs)
        return vocab_file

    # ---- vocabulary and special tokens ----
    def get_command(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self.tokenizer.special_tokens:
            return self.tokenizer.special_tokens[token]
        raise ValueError(f"ChatGLM tokenizer: {token!r} is not a command token; known: "
                         f"{sorted(self.special_tokens) + list(self.tokenizer.special_tokens)}")

    def _glm_user_added(self) -> Dict[int, str]:
        """Tokens added with add_tokens / add_special_tokens beyond the published vocabulary (cached)."""
        cached = self.__dict__.get("_glm_added_tokens")
        if cached is None:
            try:
                table = _added_tokens(self)
            except AttributeError:  # asked by the base __init__ before its tables exist (not cached)
                return {}
            cached = self.__dict__["_glm_added_tokens"] = {i: t for i, t in table.items() if i >= self.tokenizer.n_words}
        return cached

    def _glm_forget(self):
        """Drop what is cached about the vocabulary (after the base __init__ and every `_add_tokens`)."""
        self.__dict__.pop("_glm_added_tokens", None)
        self.__dict__.pop("_glm_vocab", None)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        self._glm_forget()
        try:
            return super()._add_tokens(new_tokens, special_tokens=special_tokens)
        finally:
            self._glm_forget()

    def convert_tokens_to_ids(self, tokens):
        """The base classes' conversion, through one cached dict (a backend call per token costs more than BPE)."""
        vocab = self.__dict__.get("_glm_vocab")
        if vocab is None:
            vocab = self.__dict__["_glm_vocab"] = self.get_vocab()
        unk = vocab.get(str(self.unk_token)) if self.unk_token is not None else None
        if tokens is None or isinstance(tokens, str):
            return None if tokens is None else vocab.get(tokens, unk)
        return [vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        added, skip = self._glm_user_added(), set(self.all_special_ids) if skip_special_tokens else ()
        tokens = [added[i] if i in added else self.tokenizer.convert_id_to_token(i) for i in _to_int_list(ids)
                  if i not in skip]
        single = isinstance(ids, int) or getattr(ids, "ndim", None) == 0
        return tokens[0] if single else tokens

    # ---- text -> pieces (the anti-injection rule lives here) ----
    def _glm_regex(self, specials: bool, chat: bool):
        """(regex, {string: id}) for splitting text: escaped strings (chat, kept as text, group "lit"), special
        strings (chat or encode_special_tokens), and what becomes an id wherever it occurs: "</s>" and added tokens."""
        added = {t: i for i, t in self._glm_user_added().items()}
        added.setdefault(_EOS_TEXT, self.tokenizer.eos_id)
        key = (specials, chat, tuple(sorted(added.items())))
        if key not in self._glm_regex_cache:
            parts = [_OPEN + "(?P<lit>" + _ESCAPABLE + ")" + _CLOSE] if chat else []
            parts += [_SPECIAL_PATTERN] if specials else []
            parts += [re.escape(t) for t in sorted(added, key=len, reverse=True)]
            if len(self._glm_regex_cache) > 16:
                self._glm_regex_cache.clear()
            self._glm_regex_cache[key] = (re.compile("|".join(parts)), added)
        return self._glm_regex_cache[key]

    def _glm_split(self, text: str, encode_special_tokens=None) -> List[Union[str, int]]:
        """Plain-text chunks (str, each encoded on its own, with its own dummy prefix) and token ids (int)."""
        chat = self._glm_chat_depth > 0
        specials = self.encode_special_tokens if encode_special_tokens is None else bool(encode_special_tokens)
        regex, added = self._glm_regex(specials or chat, chat)
        out: List[Union[str, int]] = []
        pos = 0
        for m in regex.finditer(text):
            lit = m.group("lit") if chat else None
            chunk = text[pos:m.start()] + (lit or "")
            if chunk and out and isinstance(out[-1], str):
                out[-1] += chunk
            elif chunk:
                out.append(chunk)
            if lit is None:
                s = m.group(0)
                out += [added[s]] if s in added else [self.tokenizer.special_tokens[t] for t in _split_special_match(s)]
            pos = m.end()
        if pos < len(text):
            out.append(out.pop() + text[pos:] if out and isinstance(out[-1], str) else text[pos:])
        return out

    def tokenize(self, text, **kwargs) -> List[str]:
        """Pieces of `text`: the base classes turn them into ids, then add the prefix, truncate and pad."""
        if kwargs.get("return_offsets_mapping"):  # (5.x passes it down here; 4.x refuses it before)
            raise ValueError("ChatGLM tokenizer: return_offsets_mapping is not supported")
        tokens: List[str] = []
        for part in self._glm_split(_clean_text(text), kwargs.get("encode_special_tokens")):
            tokens += self.tokenizer.sp_model.encode(part, out_type=str) if isinstance(part, str) else [
                self.convert_ids_to_tokens(part)]
        return tokens

    # ---- what the published format adds around sequences ----
    def get_prefix_tokens(self) -> List[int]:
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None) -> List[int]:
        ids = self.get_prefix_tokens() + list(token_ids_0)
        return ids if token_ids_1 is None else ids + list(token_ids_1) + [self.get_command("<eos>")]

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> List[int]:
        first = [0] * (2 + len(token_ids_0))
        return first if token_ids_1 is None else first + [1] * (len(token_ids_1) + 1)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(t in special) for t in token_ids_0]
        return [1, 1] + [0] * len(token_ids_0) + ([] if token_ids_1 is None else [0] * len(token_ids_1) + [1])

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def _pad(self, encoded_inputs, max_length=None, padding_strategy="do_not_pad", pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None, **kwargs) -> dict:
        """transformers' padding of one example, plus `position_ids` (0 .. n-1 on the real tokens, 0 on pads)."""
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"ChatGLM tokenizer: padding_side must be 'left' or 'right', got {side!r}")
        n = len(encoded_inputs[self.model_input_names[0]])
        positions = list(encoded_inputs.pop("position_ids", None) or range(n))
        if _PAD_TAKES_SIDE:
            out = super()._pad(encoded_inputs, max_length, padding_strategy, pad_to_multiple_of,
                               padding_side=side, return_attention_mask=return_attention_mask)
        else:  # transformers < 4.45 pads on self.padding_side
            saved, self.padding_side = self.padding_side, side
            try:
                out = super()._pad(encoded_inputs, max_length, padding_strategy, pad_to_multiple_of,
                                   return_attention_mask=return_attention_mask)
            finally:
                self.padding_side = saved
        fill = [0] * (len(out[self.model_input_names[0]]) - n)
        out["position_ids"] = fill + positions if side == "left" else positions + fill
        return out

    # ---- decoding ----
    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        spt = self.tokenizer
        skip = (set(self.all_special_ids) | set(spt.index_special_tokens) | {spt.unk_id, spt.bos_id, spt.eos_id}
                if skip_special_tokens else ())
        text = spt.decode_ids(_to_int_list(token_ids), literal=self._glm_user_added(), skip=skip)
        if clean_up_tokenization_spaces if clean_up_tokenization_spaces is not None else self.clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    # ---- saving ----
    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; the folder also carries this code and an auto_map naming both classes
        (4.30 writes the source folder into it, 4.5x only the slow class when the slow tokenizer saves)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = os.path.join(str(save_directory), "tokenizer_config.json")
        if not kwargs.get("filename_prefix") and os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            config.setdefault("auto_map", {})["AutoTokenizer"] = [f"{_MODULE}.ChatGLMTokenizer",
                                                                  f"{_MODULE}.ChatGLMTokenizerFast"]
            if "added_tokens_decoder" not in config and _HAS_ADDED_TOKENS_DECODER:
                # (5.x omits it and then parses the whole tokenizer.json at every load to find the added tokens)
                config["added_tokens_decoder"] = {str(i): {
                    "content": str(t), "special": bool(getattr(t, "special", True)),
                    **{k: bool(getattr(t, k, False)) for k in ("lstrip", "normalized", "rstrip", "single_word")}}
                    for i, t in self.added_tokens_decoder.items()}
            with open(config_file, "w", encoding="utf-8") as f:
                f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            code_file = os.path.join(str(save_directory), _MODULE + ".py")
            if not os.path.exists(code_file):
                shutil.copyfile(os.path.abspath(__file__), code_file)
        return files

    def save_vocabulary(self, save_directory, filename_prefix: Optional[str] = None):
        save_directory = str(save_directory)
        target = (os.path.join(save_directory, VOCAB_FILES_NAMES["vocab_file"]) if os.path.isdir(save_directory)
                  else save_directory)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    # ---- chat ----
    def build_single_message(self, role: str, metadata: str, message: str) -> List[int]:
        if role not in ROLES:
            raise ValueError(f"ChatGLM tokenizer: role must be one of {ROLES}, got {role!r}")
        metadata = _clean_text("" if metadata is None else metadata, "metadata")
        encode = self.tokenizer.sp_model.encode  # content is text, special strings and "</s>" included
        return [self.get_command(f"<|{role}|>")] + encode(f"{metadata}\n") + encode(_clean_text(message, "message content"))

    def build_chat_input(self, query: str, history: Optional[List[dict]] = None, role: str = "user"):
        history = [] if history is None else history
        if not isinstance(history, (list, tuple)):
            raise ValueError(f"ChatGLM tokenizer: history must be a list of message dicts, got {type(history).__name__}")
        input_ids = self.get_prefix_tokens()
        for n, item in enumerate(history):
            if not isinstance(item, dict):
                raise ValueError(f"ChatGLM tokenizer: history[{n}] must be a dict with 'role' and 'content', got "
                                 f"{type(item).__name__}: {item!r:.80}")
            if "role" not in item or "content" not in item:
                raise ValueError(f"ChatGLM tokenizer: history[{n}] needs the keys 'role' and 'content', got {sorted(item)}")
            if item["role"] not in ROLES:
                raise ValueError(f"ChatGLM tokenizer: history[{n}]['role'] must be one of {ROLES}, got {item['role']!r}")
            content = _clean_text(item["content"], f"history[{n}]['content']")
            if item["role"] == "system" and item.get("tools") is not None:
                try:
                    content += "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"ChatGLM tokenizer: history[{n}]['tools'] is not JSON-serialisable: {e}") from e
            input_ids += self.build_single_message(item["role"], item.get("metadata") or "", content)
        input_ids += self.build_single_message(role, "", query) + [self.get_command("<|assistant|>")]
        return self.pad({"input_ids": [input_ids]}, return_tensors="pt")

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' apply_chat_template, with the special strings inside the messages kept as text.

        Roles: system/user/assistant/observation; optional keys "metadata" and (system only) "tools". With the
        default template the ids equal `build_chat_input`'s."""
        if not _HAS_CHAT_TEMPLATE:
            raise NotImplementedError(
                "apply_chat_template needs transformers >= 4.34; on this version use tokenizer.build_chat_input()")
        if kwargs.get("chat_template") is None and not args:
            _validate_conversation(conversation)
        kwargs.pop("sanitize_control_tokens", None)  # always done here
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("ChatGLM tokenizer: return_assistant_tokens_mask is not supported")
        if not kwargs.get("tokenize", True):
            return super().apply_chat_template(conversation, *args, **kwargs)
        conversation = _mark_special_strings(conversation)
        for key in ("tools", "documents"):
            if kwargs.get(key) is not None:
                kwargs[key] = _mark_special_strings(kwargs[key])
        self._glm_chat_depth += 1
        try:
            return super().apply_chat_template(conversation, *args, **kwargs)
        finally:
            self._glm_chat_depth -= 1


def _validate_conversation(conversation):
    nested = isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple))
    for conv in conversation if nested else [conversation]:
        conv = getattr(conv, "messages", conv)
        if not isinstance(conv, (list, tuple)):
            raise ValueError(f"ChatGLM tokenizer: a conversation must be a list of message dicts, got {type(conv).__name__}")
        for n, msg in enumerate(conv):
            if not isinstance(msg, dict):
                raise ValueError(f"ChatGLM tokenizer: message {n} must be a dict, got {type(msg).__name__}")
            if msg.get("role") not in ROLES:
                raise ValueError(f"ChatGLM tokenizer: message {n} has role {msg.get('role')!r}; ChatGLM3 roles are {ROLES}")
            if msg.get("content") is not None and not isinstance(msg["content"], str):
                raise ValueError(f"ChatGLM tokenizer: message {n} content must be a str, got {type(msg['content']).__name__}")
            if msg.get("metadata") is not None and not isinstance(msg["metadata"], str):
                raise ValueError(f"ChatGLM tokenizer: message {n} metadata must be a str")


# --------------------------------------------------------------------------------------------------------------
# slow tokenizer
# --------------------------------------------------------------------------------------------------------------


class ChatGLMTokenizer(_ChatGLMTokenizerMixin, PreTrainedTokenizer):
    """SentencePiece-based ChatGLM3 tokenizer (the published interface, with the originals' bugs fixed)."""

    def __init__(self, vocab_file=None, **kwargs):
        self._glm_setup(vocab_file, kwargs)
        super().__init__(**kwargs)
        self._glm_forget()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_words

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.tokenizer.convert_id_to_token(i): i for i in range(self.tokenizer.n_words)}
        vocab.update(getattr(self, "added_tokens_encoder", {}))
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.tokenizer.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokenizer.convert_id_to_token(index)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        ids, literal = [], {}
        for t in tokens:
            i = self.tokenizer.convert_token_to_id(t)
            if i == self.tokenizer.unk_id and t != self.tokenizer.pieces[i]:  # not a piece: keep it verbatim
                i = -1 - len(literal)
                literal[i] = t
            ids.append(i)
        return self.tokenizer.decode_ids(ids, literal=literal)


# --------------------------------------------------------------------------------------------------------------
# fast tokenizer
# --------------------------------------------------------------------------------------------------------------

_BACKEND_CACHE: Dict[tuple, Tokenizer] = {}


def _source_fingerprint(vocab_file: str) -> str:
    """What a tokenizer.json built from `vocab_file` by this code is recorded with (in tokenizer_config.json)."""
    with open(vocab_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"tokenizer.model sha256 {digest}, builder {_BUILDER_VERSION}"


def _read_sentencepiece_model(path: str):
    """(pieces, scores, types, eos id) of a SentencePiece model, after checking the settings the backend emulates.
    Piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte."""
    sp = _load_sentencepiece(path)
    from sentencepiece import sentencepiece_model_pb2 as model_pb2  # (protobuf)

    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    problems = [what for what, bad in (
        ("model_type is not BPE", ts.model_type != model_pb2.TrainerSpec.BPE),
        (f"normalizer {ns.name!r} is not identity", ns.name not in ("identity", "") or bool(ns.precompiled_charsmap)),
        ("remove_extra_whitespaces is true", ns.remove_extra_whitespaces),
        ("add_dummy_prefix is false", not ns.add_dummy_prefix),
        ("treat_whitespace_as_suffix is true", ts.treat_whitespace_as_suffix),
        ("it has user-defined or unused pieces", any(p.type in (4, 5) for p in proto.pieces))) if bad]
    if problems:
        raise ValueError(f"ChatGLMTokenizerFast cannot emulate {path}: " + "; ".join(problems))
    return [p.piece for p in proto.pieces], [p.score for p in proto.pieces], [p.type for p in proto.pieces], sp.eos_id()


def _build_backend(path: str) -> Tokenizer:
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
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _BACKEND_CACHE:
        pieces, scores, types, eos_id = _read_sentencepiece_model(path)
        vocab = {p: i for i, p in enumerate(pieces)}
        for k, tok in enumerate(GLM_SPECIAL_TOKENS):  # never produced by merges, only used for id <-> token
            vocab.setdefault(tok, len(pieces) + k)
        normal = {p: i for i, p in enumerate(pieces) if types[i] == 1}
        ranked = sorted((-scores[pid], pid, normal[piece[:c]], normal[piece[c:]], piece[:c], piece[c:])
                        for piece, pid in normal.items() for c in range(1, len(piece))
                        if piece[:c] in normal and piece[c:] in normal)
        unk = pieces[types.index(2)] if 2 in types else None
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[(l, r) for *_, l, r in ranked], unk_token=unk,
                                       fuse_unk=False, byte_fallback=True))
        if not any(re.search("[^" + SPACE + "]" + SPACE, p) for p in normal):
            backend.pre_tokenizer = pre_tokenizers.Split(Regex(SPACE + "+"), behavior="merged_with_next")
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        control = [p for p, t in zip(pieces, types) if t in (2, 3)]
        backend.add_special_tokens([AddedToken(t, normalized=False) for t in control + list(GLM_SPECIAL_TOKENS)])
        eos = pieces[eos_id]
        backend.post_processor = processors.TemplateProcessing(
            single="[gMASK]:0 sop:0 $A:0", pair=f"[gMASK]:0 sop:0 $A:0 $B:1 {eos}:1",
            special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("sop", vocab["sop"]), (eos, eos_id)])
        _BACKEND_CACHE[key] = backend
    return copy.deepcopy(_BACKEND_CACHE[key])


class ChatGLMTokenizerFast(_ChatGLMTokenizerMixin, _PythonEncodePipeline, PreTrainedTokenizerFast):
    """`tokenizers`-backed ChatGLM3 tokenizer: same ids, padding, decoding and chat building as ChatGLMTokenizer.

    Encoding goes through transformers' Python pipeline (`_PythonEncodePipeline`), as for the slow tokenizer; the
    backend (`tokenizer._tokenizer`, see `_build_backend`) decodes, is saved as tokenizer.json, and serves the tools
    that run it directly."""

    vocab_files_names = {**VOCAB_FILES_NAMES, "tokenizer_file": TOKENIZER_JSON}
    slow_tokenizer_class = ChatGLMTokenizer

    def __init__(self, vocab_file=None, tokenizer_file=None, tokenizer_json_source=None, **kwargs):
        if not _has_complete_pipeline():
            raise ValueError("ChatGLMTokenizerFast needs tokenizers >= 0.13.3 (BPE byte_fallback, the Prepend "
                             "normalizer, the ByteFallback/Fuse/Strip decoders); use ChatGLMTokenizer instead")
        vocab_file = self._glm_setup(vocab_file, kwargs)
        source = _source_fingerprint(vocab_file)
        for k in ("tokenizer_object", "vocab", "merges", "from_slow"):
            kwargs.pop(k, None)
        try:
            if tokenizer_json_source != source or not tokenizer_file or not os.path.isfile(tokenizer_file):
                raise FileNotFoundError("no tokenizer.json recorded as built from this tokenizer.model")
            super().__init__(tokenizer_file=tokenizer_file, **kwargs)  # (a tokenizer_object would be deep-copied)
        except Exception:  # none usable: missing, stale, or written by a newer `tokenizers` than this one
            super().__init__(tokenizer_object=_build_backend(vocab_file), **kwargs)
        self.vocab_file = vocab_file
        self.init_kwargs["tokenizer_json_source"] = source
        self._glm_forget()
        # transformers advises against `pad` after encoding with a fast tokenizer; here that is the design
        self.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        return kwargs  # (5.x) the backend is built in __init__, not by transformers' SentencePiece converter

    def _convert_id_to_token(self, index: int) -> str:
        # as the slow class (and the published code): "" for the padded embedding rows, which have no token
        # (llama.cpp's converter walks every id up to padded_vocab_size through this method)
        return self.tokenizer.convert_id_to_token(index)

    @property
    def can_save_slow_tokenizer(self) -> bool:
        return bool(self.vocab_file) and os.path.isfile(self.vocab_file)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        path = os.path.join(str(save_directory), (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_JSON)
        self._tokenizer.save(path)
        return tuple(file_names) + tuple(self.save_vocabulary(save_directory, filename_prefix)) + (path,)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        # added tokens are matched on the raw text (see _glm_split); a "normalized" one would decode with a "▁"
        raw = [AddedToken(t, normalized=False) if isinstance(t, str) else t for t in new_tokens]
        for n, t in enumerate(raw):
            if getattr(t, "normalized", False):
                extra = {"special": t.special} if getattr(t, "special", None) is not None else {}
                raw[n] = AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                    normalized=False, **extra)
        return super()._add_tokens(raw, special_tokens=special_tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        ids = [i for i in _to_int_list(token_ids) if 0 <= i < _MAX_ID]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces if clean_up_tokenization_spaces is not None else self.clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text
