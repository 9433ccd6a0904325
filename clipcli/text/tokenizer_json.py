"""Tokenizers from a ``tokenizer.json`` (Hugging Face ``tokenizers``), giving the ids that library gives.

A ``tokenizer.json`` describes a pipeline, each stage a JSON object with a ``type``:

1. Added tokens (``added_tokens``): special tokens such as ``</s>`` are found in the raw text
   first (leftmost, longest) and become their ids directly; ``lstrip``/``rstrip`` let one take
   the spaces beside it, ``single_word`` only matches outside words. Tokens marked
   ``normalized`` are looked for after normalization instead.
2. The normalizer, on each stretch of text between added tokens: ``Precompiled`` (SentencePiece's
   character map, applied per grapheme cluster as ``tokenizers`` does: see :mod:`.spm_model`),
   ``NFC``/``NFD``/``NFKC``/``NFKD``, ``Lowercase``, ``Replace`` (a string or a regex),
   ``Prepend``, ``Strip`` and ``Sequence``.
3. The pre-tokenizer cuts it into pre-tokens: ``WhitespaceSplit``, ``Whitespace``, ``Metaspace``
   (spaces become ``▁``; a ``▁`` is prepended ``always``, to the ``first`` pre-token only, or
   ``never``; ``split`` cuts before each ``▁``), ``Split`` (a string or regex, with a behaviour:
   the matches removed, isolated, merged with the previous or next piece, or contiguous runs
   isolated; ``invert`` swaps matches and the rest), ``Digits`` and ``Sequence``.
4. The model segments each pre-token: ``Unigram`` or ``BPE`` (:mod:`.pieces`, in ``tokenizers``'
   flavour: merges by rank, unknowns fused, double precision).
5. The post-processor's ``single`` template (``TemplateProcessing``, ``RobertaProcessing``,
   ``BertProcessing``) gives the ids around the text: T5's ``$A </s>``, XLM-R's ``<s> $A </s>``.

Anything else (WordPiece, byte-level BPE, BERT's normalizer, a dropout) raises
:class:`Unsupported`, which :meth:`JsonTokenizer.from_file` turns into a :class:`CheckpointError`
naming the file and the component: a tokenizer that would give other ids is never used.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Iterable

import regex

from ..errors import CheckpointError
from .hf_stages import (
    WHITESPACE,
    PatternTimeout,
    Unsupported,
    get_field,
    get_id,
    normalizer,
    parse_token_id,
    pre_tokenizer,
)
from .pieces import LONGEST_CACHED_WORD, WORD_CACHE_SIZE, RankBpe, Unigram, byte_piece, word_pattern
from .sentencepiece import decode_pieces, read_capped
from .spm_model import Malformed

_WORD_CHAR = regex.compile(r"\w")  # Rust's \w: letters, marks, digits, connectors

# --------------------------------------------------------------------------- post-processors


def _special_ids(spec: dict | None) -> tuple[list[int], list[int]]:
    """The ids a post-processor puts before and after a single text."""
    if spec is None:
        return [], []
    kind = get_field(spec, "type", str)
    if kind == "ByteLevel":
        return [], []
    if kind in ("RobertaProcessing", "BertProcessing"):
        cls, sep = get_field(spec, "cls", list), get_field(spec, "sep", list)
        if len(cls) != 2 or len(sep) != 2:
            raise Unsupported(f"{kind}'s cls/sep")
        return [parse_token_id(cls[1], f"{kind}'s cls id")], [parse_token_id(sep[1], f"{kind}'s sep id")]
    if kind == "Sequence":
        prefix: list[int] = []
        suffix: list[int] = []
        for step in get_field(spec, "processors", list):
            before, after = _special_ids(step)
            prefix, suffix = before + prefix, suffix + after
        return prefix, suffix
    if kind != "TemplateProcessing":
        raise Unsupported(f"post-processor {kind!r}")
    specials = get_field(spec, "special_tokens", dict, {})
    prefix, suffix, seen = [], [], False
    for item in get_field(spec, "single", list):
        if isinstance(item, dict) and "Sequence" in item and get_field(item["Sequence"], "id", str) == "A" and not seen:
            seen = True
        elif isinstance(item, dict) and "SpecialToken" in item:
            name = get_field(item["SpecialToken"], "id", str)
            ids = get_field(specials.get(name, {"type": f"special token {name!r}"}), "ids", list)
            (suffix if seen else prefix).extend(parse_token_id(i, f"special token {name!r}'s id") for i in ids)
        else:
            raise Unsupported(f"TemplateProcessing item {json.dumps(item)[:60]}")
    if not seen:
        raise Unsupported("TemplateProcessing without $A")
    return prefix, suffix


# --------------------------------------------------------------------------- models


def _model(spec: dict):
    kind = get_field(spec, "type", str, None)
    if kind == "Unigram" or (kind is None and isinstance(spec.get("vocab"), list)):
        vocab = get_field(spec, "vocab", list)
        if not vocab or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                and isinstance(e[1], (int, float)) for e in vocab):
            raise Unsupported("Unigram's vocab is not a list of [piece, score]")
        pieces = [e[0] for e in vocab]
        scores = [float(e[1]) for e in vocab]
        unk_id = get_id(spec, "unk_id") if spec.get("unk_id") is not None else None
        if unk_id is not None and not 0 <= unk_id < len(pieces):
            raise Unsupported(f"Unigram's unk_id {unk_id} is outside its {len(pieces)} pieces")
        token_ids = {piece: i for i, piece in enumerate(pieces)}
        byte_ids = None
        if get_field(spec, "byte_fallback", bool, False):
            byte_ids = {b: token_ids[byte_piece(b)] for b in range(256) if byte_piece(b) in token_ids}
        return Unigram(token_ids, scores, unk_id, unk_score=min(scores) - 10.0, fuse_unknown=True,
                       single_precision=False, byte_ids=byte_ids, words=word_pattern(token_ids)), pieces
    if kind == "BPE":
        vocab = get_field(spec, "vocab", dict)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2 * len(vocab) + 1024 for i in vocab.values()):
            raise Unsupported("BPE's vocab has ids out of range (not integers from 0 to about its size)")
        merges = []
        for merge in get_field(spec, "merges", list):
            parts = merge.split(" ") if isinstance(merge, str) else merge
            if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)):
                raise Unsupported(f"BPE merge {json.dumps(merge)[:40]}")
            merges.append((parts[0], parts[1]))
        if spec.get("dropout") not in (None, 0, 0.0):
            raise Unsupported("BPE with dropout (random segmentation)")
        prefix, suffix = spec.get("continuing_subword_prefix"), spec.get("end_of_word_suffix")
        ignore = get_field(spec, "ignore_merges", bool, False)
        try:
            model = RankBpe(vocab, merges, unk_token=get_field(spec, "unk_token", (str, type(None)), None),
                            fuse_unk=get_field(spec, "fuse_unk", bool, False), byte_fallback=get_field(spec, "byte_fallback", bool, False),
                            prefix=prefix, suffix=suffix, ignore_merges=ignore,
                            words=None if prefix or suffix or ignore else word_pattern(vocab))
        except ValueError as error:
            raise Unsupported(f"BPE: {error}") from error
        pieces = [""] * (max(vocab.values(), default=-1) + 1)
        for token, i in vocab.items():
            pieces[i] = token
        return model, pieces
    raise Unsupported(f"model {kind!r}")


# --------------------------------------------------------------------------- the tokenizer


class _AddedTokens:
    """The added tokens of one kind (raw or normalized), found leftmost-longest as tokenizers does."""

    def __init__(self, tokens: list[tuple[str, int, dict]]):
        self._tokens = {content: (token_id, entry) for content, token_id, entry in tokens}
        ordered = sorted(self._tokens, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def split(self, text: str, origin: bool) -> list[tuple[str, int | None, bool]]:
        if self._pattern is None or not text:
            return [(text, None, origin)]
        out: list[tuple[str, int | None, bool]] = []
        done = 0
        for match in self._pattern.finditer(text):
            start, stop = match.span()
            token_id, entry = self._tokens[match.group()]
            if entry.get("single_word") and ((start > 0 and _WORD_CHAR.match(text[start - 1]))
                                             or (stop < len(text) and _WORD_CHAR.match(text[stop]))):
                continue
            if entry.get("lstrip"):
                start = max(len(text[:start].rstrip(WHITESPACE)), done)
            if entry.get("rstrip"):
                stop = len(text) - len(text[stop:].lstrip(WHITESPACE))
            if done < start:
                out.append((text[done:start], None, origin and done == 0))
            out.append((text[start:stop], token_id, False))
            done = stop
        if done < len(text):
            out.append((text[done:], None, origin and done == 0))
        return out


class JsonTokenizer:
    """A ``tokenizer.json``'s pipeline: :meth:`encode` gives the text's ids, :attr:`prefix` and
    :attr:`suffix` the ids its post-processor puts around them."""

    def __init__(self, spec: dict, source: str = "tokenizer.json"):
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise Unsupported("no model")
        self.source = source
        self._normalize = normalizer(spec.get("normalizer"))
        self._pre_tokenize = pre_tokenizer(spec.get("pre_tokenizer"))
        self._model, self.pieces = _model(spec["model"])
        self._pre_token_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(lambda piece: tuple(self._model.encode(piece)))
        self.prefix, self.suffix = _special_ids(spec.get("post_processor"))
        self.added: dict[str, int] = {}
        self.special_ids: set[int] = set()
        raw, normalized = [], []
        for entry in spec.get("added_tokens") or []:
            content, added_id = get_field(entry, "content", str), parse_token_id(get_field(entry, "id", object), "an added token's id")
            if not content:
                continue
            self.added[content] = added_id
            if entry.get("special"):
                self.special_ids.add(added_id)
            if entry.get("normalized") and self._normalize is not None:
                normalized.append((self._normalize(content, False)[0], added_id, entry))
            else:
                raw.append((content, added_id, entry))
        self._raw, self._normalized = _AddedTokens(raw), _AddedTokens(normalized)
        self._ids = {piece: i for i, piece in enumerate(self.pieces) if piece}
        self._ids.update(self.added)
        self._tokens = {i: piece for piece, i in self._ids.items()}
        self.vocab_size = max([len(self.pieces) - 1, *self.added.values(), *self.prefix, *self.suffix]) + 1

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> JsonTokenizer:
        data = read_capped(path, "the tokenizer")
        try:
            spec = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: a number of 5,000 digits
            raise CheckpointError(f"{path}: not a tokenizer.json (bad JSON: {error})") from error
        try:
            return cls(spec, source=str(path))
        except (Unsupported, Malformed, ValueError, TypeError, KeyError, IndexError, OverflowError,
                RecursionError) as error:  # ValueError: a Unigram piece past MAX_PIECE_CHARS; OverflowError: a score of 1e400
            raise CheckpointError(f"{path}: unsupported tokenizer: {' '.join(str(error).split())[:300]}") from error

    def _segments(self, text: str) -> Iterable[tuple[str, int | None, bool]]:
        for part, token_id, origin in self._raw.split(text, True):
            if token_id is not None or self._normalize is None:
                yield part, token_id, origin
                continue
            normalized, origin = self._normalize(part, origin)
            yield from self._normalized.split(normalized, origin)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (added tokens, normalizer, pre-tokenizer, model), without the post-processor's."""
        try:
            return self._encode(text)
        except (Malformed, PatternTimeout) as error:  # a damaged character map, found only when walked
            raise CheckpointError(f"{self.source}: {error}") from error

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part, token_id, origin in self._segments(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            pieces = [(part, origin)] if part else []
            if self._pre_tokenize is not None:
                pieces = self._pre_tokenize(pieces)
            for piece, _ in pieces:
                ids.extend(self._pre_token_ids(piece) if len(piece) <= LONGEST_CACHED_WORD else self._model.encode(piece))
        return ids

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def decode(self, ids: Iterable[int] | Any) -> str:
        """The text of ``ids``, special tokens left out (a plain reading: ``▁`` as a space, byte pieces as bytes)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        tokens = (self._tokens.get(i, "") for i in ids if i not in self.special_ids)
        return decode_pieces(tokens, strip_first=True)
