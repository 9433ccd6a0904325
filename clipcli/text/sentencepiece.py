"""SentencePiece tokenizers from a ``.model`` file, giving the ids ``sentencepiece`` gives.

How a text becomes ids
----------------------
1. Normalize (:meth:`SentencePiece.normalize`). Left to right, each step takes the longest
   user-defined symbol at the current position (kept verbatim), else the longest key of the
   model's character map (replaced by its string: NFKC, a tab becoming a space, a control
   character becoming nothing), else one character as it is (see :mod:`.spm_model`). Then
   the spaces: with ``remove_extra_whitespaces`` (the default) leading spaces go, runs of
   spaces become one and trailing ones go; ``add_dummy_prefix`` puts a space before the text
   (after it, for ``treat_whitespace_as_suffix``) so that a word is the same piece at the
   start of a text as after a space; ``escape_whitespaces`` writes each space as ``▁``. Gemma
   (SigLIP 2) turns all of this off but the escaping: its spaces are pieces like any other.

2. Segment into pieces (:mod:`.pieces`): Viterbi for a Unigram model (T5 and SigLIP, XLM-R and
   XLM-V), score-ordered merges for a BPE one (Gemma), each word of the normalized text once,
   cached. A piece missing from the vocabulary becomes its UTF-8 bytes as ``<0xXX>`` pieces
   with ``byte_fallback``, else ``<unk>`` (a run of them one ``<unk>``).

``split_digits`` needs no step of its own: it only stopped training from making pieces of two
digits, so no such piece exists. The vocabulary's order gives the ids; the special tokens the
model adds around a text (T5's ``</s>``, Gemma's ``<bos>``) come from its tokenizer files, not
from the ``.model`` (:mod:`clipcli.text.tokenizers`).

The Unigram scores are summed in double precision word by word where ``sentencepiece`` sums
them in single precision over the whole text; two segmentations whose scores differ by less
than a float's rounding could in principle come out differently (none did in the tests).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable

from ..errors import CheckpointError
from . import spm_model as spm
from .pieces import SPACE, UNK_PENALTY, ScoreBpe, Unigram, byte_piece, merge_unknown, round32, word_pattern

# A user-defined symbol's score in a Unigram lattice is 0.1 per UTF-8 byte less 0.1 in sentencepiece
# 0.2.3 (measured: the source of 0.2.0 reads "bytes x the highest normal score - 0.1").
USER_SYMBOL_BONUS = 0.1
CHUNK_CACHE_SIZE = 1 << 16


# The largest tokenizer file read: XLM-V's 901,629 pieces are a tokenizer.json of about 50 MB and a
# .model of about 15 MB; a file ten times that is not a vocabulary, and is never read whole.
MAX_FILE_BYTES = 512 << 20


def read_capped(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a tokenizer file; one larger than :data:`MAX_FILE_BYTES` (or unreadable) raises
    :class:`CheckpointError`, before anything is read."""
    limit = MAX_FILE_BYTES
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else b""
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read {what} ({error.strerror or error})") from error
    if size > limit or len(data) > limit:
        raise CheckpointError(f"{path}: {max(size, len(data)):,} bytes, more than the {limit >> 20} MiB "
                              f"{what} may have: not a tokenizer file")
    return data


def read_model(path: str | os.PathLike) -> spm.ModelProto:
    """The ``ModelProto`` of a ``.model`` file; a file that cannot be read raises :class:`CheckpointError`."""
    data = read_capped(path, "the SentencePiece model")
    try:
        return spm.parse_model(data)
    except spm.Malformed as error:
        raise CheckpointError(f"{path}: not a SentencePiece model we can read: {error}") from error


class SentencePiece:
    """A SentencePiece model: :meth:`encode` gives ``sentencepiece``'s ids (no special tokens added)."""

    def __init__(self, proto: spm.ModelProto, source: str = "the SentencePiece model"):
        self.proto = proto
        self.source = source
        pieces, types = proto.pieces, proto.types
        self.pieces: list[str] = pieces
        self.vocab_size = len(pieces)
        self.unk_id = types.index(spm.UNKNOWN)
        for name in ("bos_id", "eos_id", "pad_id"):
            if not -1 <= getattr(proto, name) < len(pieces):
                raise CheckpointError(f"{source}: {name} {getattr(proto, name)} is outside the {len(pieces)} pieces")
        self.bos_id, self.eos_id, self.pad_id = proto.bos_id, proto.eos_id, proto.pad_id
        # Most pieces are normal: build their map at C speed, then take the few others out.
        others = [i for i, t in enumerate(types) if t != spm.NORMAL]
        reserved = {pieces[i]: i for i in others if types[i] not in spm.NORMALISH}
        normal = dict(zip(pieces, range(len(pieces))))
        for piece in reserved:
            del normal[piece]
        if len(normal) != len(pieces) - len(reserved):  # a reserved piece is also a normal one's string
            normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t in spm.NORMALISH}
        self._piece_ids = {**normal, **reserved}
        self._byte_ids = {b: reserved[byte_piece(b)] for b in range(256)} if proto.byte_fallback else None
        self._special_ids = {i for i in others if types[i] in (spm.CONTROL, spm.UNKNOWN)}
        self.user_symbols = [pieces[i] for i in others if types[i] == spm.USER_DEFINED]
        self._user = sorted(self.user_symbols, key=len, reverse=True)
        self._user_first = {s[0] for s in self._user}
        self._model = self._build_model(normal, others)
        self._setup_normalizer()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePiece:
        """The model in ``path``; a damaged or unusable one raises :class:`CheckpointError` naming it."""
        proto = read_model(path)
        try:
            return cls(proto, source=str(path))
        except (ValueError, KeyError, IndexError, TypeError, OverflowError) as error:
            # a Unigram piece past MAX_PIECE_CHARS, or damage the reader let through
            raise CheckpointError(f"{path}: not a SentencePiece model we can use: "
                                  f"{' '.join(str(error).split())[:300]}") from error

    # ------------------------------------------------------------------ the model

    def _build_model(self, normal: dict[str, int], others: list[int]):
        proto, types = self.proto, self.proto.types
        suffix = proto.treat_whitespace_as_suffix
        if proto.model_type == spm.BPE:
            unused = frozenset(i for i in others if types[i] == spm.UNUSED)
            return ScoreBpe(normal, proto.scores, self._piece_ids, self.unk_id, unused=unused,
                            user_symbols=self.user_symbols, byte_ids=self._byte_ids,
                            words=word_pattern(normal, suffix))
        scores = list(proto.scores)
        skipped = set(others)
        min_score = min((s for i, s in enumerate(scores) if i not in skipped), default=3.4028234663852886e38)
        for i in others:
            if types[i] == spm.USER_DEFINED:  # always preferred, by length in bytes
                scores[i] = USER_SYMBOL_BONUS * len(self.pieces[i].encode("utf-8")) - 0.1
        lattice = normal if not any(types[i] == spm.UNUSED for i in others) else \
            {p: i for p, i in normal.items() if types[i] != spm.UNUSED}
        return Unigram(lattice, scores, self.unk_id, unk_score=round32(min_score - UNK_PENALTY), fuse_unknown=False,
                       single_precision=True, byte_ids=self._byte_ids, words=word_pattern(lattice, suffix))

    # ------------------------------------------------------------------ normalization

    def _setup_normalizer(self) -> None:
        proto = self.proto
        try:
            self._charsmap = spm.CharsMap(proto.precompiled_charsmap) if proto.precompiled_charsmap else None
        except spm.Malformed as error:
            raise CheckpointError(f"{self.source}: {error}") from error
        charsmap = self._charsmap
        self._space = SPACE if proto.escape_whitespaces else " "
        # Mapping space-separated chunks on their own is exact when no key or symbol spans a space.
        self._chunked = (charsmap is None or charsmap.space_inert) and not any(" " in s for s in self._user)
        ascii_keys = set(map(chr, charsmap.ascii_table)) if charsmap else set()
        self._ascii_fast = charsmap is not None and not charsmap.ascii_multi and not any(
            set(s) & ascii_keys for s in self._user)
        # Collapsing spaces after mapping equals sentencepiece's piece-by-piece rule unless a
        # replacement string (or a symbol) holds two spaces in a row.
        self._collapse_exact = (charsmap is None or not charsmap.double_space) and not any(
            "  " in s for s in self._user)
        self._map_chunk = functools.lru_cache(maxsize=CHUNK_CACHE_SIZE)(lambda chunk: "".join(self._pieces(chunk)))

    def _pieces(self, text: str) -> Iterable[str]:
        """The normalized string of each step of step 1 (the module docstring), spaces not yet handled."""
        charsmap, i, n = self._charsmap, 0, len(text)
        while i < n:
            if text[i] in self._user_first:
                match = next((s for s in self._user if text.startswith(s, i)), None)
                if match is not None:
                    yield match
                    i += len(match)
                    continue
            length, replacement = charsmap.longest(text, i) if charsmap is not None else (0, None)
            if length:
                yield replacement  # type: ignore[misc]
                i += length
            else:
                yield text[i]
                i += 1

    def _map(self, text: str) -> str:
        if self._charsmap is None:
            return text  # symbols are kept verbatim, everything else too
        if self._ascii_fast and text.isascii():
            return text.translate(self._charsmap.ascii_table)
        if self._chunked:
            return " ".join([self._map_chunk(chunk) for chunk in text.split(" ")])
        return "".join(self._pieces(text))

    def normalize(self, text: str) -> str:
        """The normalized text the pieces are found in (``sentencepiece``'s ``normalize``)."""
        if not text:
            return ""
        proto, space = self.proto, self._space
        mapped = self._map(text)
        prefix = proto.add_dummy_prefix and not proto.treat_whitespace_as_suffix
        suffix = proto.add_dummy_prefix and proto.treat_whitespace_as_suffix
        if not proto.remove_extra_whitespaces:
            body = mapped.replace(" ", SPACE) if proto.escape_whitespaces else mapped
            return (space if prefix else "") + body + (space if suffix else "")
        body = " ".join([word for word in mapped.split(" ") if word])
        if not body or not self._collapse_exact:
            return self._normalize_exact(text)
        if proto.escape_whitespaces:
            body = body.replace(" ", SPACE)
        return ((space if prefix else "") + body).rstrip(space) + (space if suffix else "")

    def _normalize_exact(self, text: str) -> str:
        """sentencepiece's ``Normalizer::Normalize`` step by step, for the cases the fast path leaves."""
        proto, space = self.proto, self._space
        pieces = list(self._pieces(text))
        remove = proto.remove_extra_whitespaces
        start = 0
        while remove and start < len(pieces) and pieces[start] == " ":
            start += 1
        if start == len(pieces):
            return ""
        out = [space] if proto.add_dummy_prefix and not proto.treat_whitespace_as_suffix else []
        previous_space = remove
        for piece in pieces[start:]:
            if previous_space:
                piece = piece.lstrip(" ")
            if piece:
                out.append(piece.replace(" ", SPACE) if proto.escape_whitespaces else piece)
                previous_space = piece.endswith(" ")
            if not remove:
                previous_space = False
        result = "".join(out)
        if remove:
            result = result.rstrip(space)
        if proto.add_dummy_prefix and proto.treat_whitespace_as_suffix:
            result += space
        return result

    # ------------------------------------------------------------------ ids

    def encode(self, text: str) -> list[int]:
        """``sentencepiece``'s ids for ``text``: normalized, segmented, no special tokens."""
        try:
            ids = self._model.encode(self.normalize(text))
        except spm.Malformed as error:  # a damaged character map, found only when walked
            raise CheckpointError(f"{self.source}: {error}") from error
        return ids if self._byte_ids is not None else merge_unknown(ids, self.unk_id)

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (control pieces too), ``unk_id`` when there is none."""
        return self._piece_ids.get(piece, self.unk_id)

    def id_to_piece(self, index: int) -> str:
        return self.pieces[index]

    def is_special(self, index: int) -> bool:
        """Whether an id is a control piece or ``<unk>`` (left out when decoding)."""
        return index in self._special_ids

    def decode(self, ids: Iterable[int] | Any) -> str:
        """The text of ``ids``: pieces joined, bytes decoded, ``▁`` read as a space, control pieces left out."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return decode_pieces((self.pieces[i] for i in ids if 0 <= i < self.vocab_size and not self.is_special(i)),
                             strip_first=self.proto.add_dummy_prefix)


def decode_pieces(pieces: Iterable[str], strip_first: bool = True) -> str:
    """Join pieces into text: ``<0xXX>`` pieces as bytes (invalid UTF-8 as U+FFFD), ``▁`` as a space."""
    data = bytearray()
    for piece in pieces:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                data.append(int(piece[3:5], 16))
                continue
            except ValueError:
                pass
        data += piece.replace(SPACE, " ").encode("utf-8", "surrogatepass")
    text = data.decode("utf-8", errors="replace")
    return text[1:] if strip_first and text.startswith(" ") else text
