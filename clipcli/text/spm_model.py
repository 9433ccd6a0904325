"""Reading a SentencePiece ``.model`` file: its protobuf, and the character map it normalizes with.

The file
--------
A ``.model`` is one serialized ``ModelProto`` (``sentencepiece_model.proto``), read here by hand
from the protobuf wire format: a message is a run of fields, each a varint key (field number << 3
| wire type) and a value that is a varint (type 0), 8 or 4 raw bytes (types 1 and 5, a ``float`` is
type 5) or a varint length and that many bytes (type 2: strings, bytes and nested messages).
Fields may come in any order, a field given twice keeps the last value, and unknown fields are
skipped. What is read:

- ``pieces`` (field 1, repeated ``SentencePiece{piece=1, score=2, type=3}``): the vocabulary, in
  id order. Types: NORMAL 1, UNKNOWN 2 (exactly one: ``<unk>``), CONTROL 3 (``<s>``, ``</s>``,
  never produced from text), USER_DEFINED 4 (always kept whole), UNUSED 5, BYTE 6 (``<0x41>``).
- ``trainer_spec`` (2): ``model_type`` (3: UNIGRAM 1, BPE 2; WORD and CHAR are refused),
  ``byte_fallback`` (35), ``split_digits`` (25), ``treat_whitespace_as_suffix`` (24) and the
  special ids and pieces (``unk_id`` 40, ``bos_id`` 41, ``eos_id`` 42, ``pad_id`` 43, pieces 45-48).
- ``normalizer_spec`` (3): ``name`` (1), ``precompiled_charsmap`` (2), ``add_dummy_prefix`` (3),
  ``remove_extra_whitespaces`` (4), ``escape_whitespaces`` (5); the booleans default to true.

The character map
-----------------
``precompiled_charsmap`` is how a model normalizes text (NFKC and friends, compiled at training
time): a little-endian uint32 with the trie's size in bytes, the trie (a Darts-clone double array
of uint32 units), then the replacement strings, each ended by a NUL byte. The trie's keys are UTF-8
strings ("ﬁ", "e" + U+0301, a tab); a key's value is the offset of its replacement. Walking a key
byte ``b`` from node ``n`` goes to ``n ^ b``; that unit must carry label ``b``, and its offset
leads on; a unit with its leaf bit set ends a key, its value in the unit the offset leads to.

Two ways of applying it exist and each tokenizer family relies on one:
:meth:`CharsMap.longest` is SentencePiece's (at each position the longest key that matches,
else the character itself), and :meth:`CharsMap.apply_graphemes` is the ``tokenizers`` library's
``Precompiled`` (per extended grapheme cluster: a cluster under 6 bytes whose start is a key is
replaced whole by the *shortest* such key's value, otherwise each character on its own).
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class Malformed(ValueError):
    """A file does not parse; callers turn it into a :class:`CheckpointError` naming the file."""


# --------------------------------------------------------------------------- protobuf wire format


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise Malformed("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise Malformed("varint longer than 10 bytes")


def _field(data: bytes, pos: int, end: int) -> tuple[int, int, int | bytes, int]:
    """The field at ``pos``: ``(field number, wire type, value, position after it)``."""
    key, pos = _varint(data, pos)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise Malformed("field number 0")
    if wire == 0:
        value, pos = _varint(data, pos)
        return number, wire, value, pos
    if wire in (1, 5):
        size = 8 if wire == 1 else 4
    elif wire == 2:
        size, pos = _varint(data, pos)
    else:
        raise Malformed(f"unsupported wire type {wire} (field {number})")
    if pos + size > end:
        raise Malformed(f"field {number} runs past the end of its message")
    return number, wire, data[pos : pos + size], pos + size


def _fields(data: bytes):
    """Yield ``(field number, wire type, value)`` for each field of one message."""
    pos, end = 0, len(data)
    while pos < end:
        number, wire, value, pos = _field(data, pos, end)
        yield number, wire, value


def _int32(value: int) -> int:
    """A varint read as a (two's-complement) int32, as ``-1`` ids are stored."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value, what: str) -> str:
    if not isinstance(value, bytes):
        raise Malformed(f"{what} is not a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Malformed(f"{what} is not UTF-8") from error


# --------------------------------------------------------------------------- ModelProto


@dataclass
class ModelProto:
    """The parts of a ``.model`` file tokenizing needs (field numbers in the module docstring)."""

    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    split_digits: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


_TRAINER_INTS = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
_TRAINER_BOOLS = {35: "byte_fallback", 25: "split_digits", 24: "treat_whitespace_as_suffix"}
_TRAINER_STRINGS = {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}
_NORMALIZER_BOOLS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


_KINDS = frozenset((NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE))
NORMALISH = frozenset((NORMAL, USER_DEFINED, UNUSED))  # the kinds looked up as pieces, the rest "reserved"


def _piece(data: bytes, start: int, stop: int) -> tuple[str, bytes, int]:
    """One ``SentencePiece`` message: its piece, its score's 4 bytes and its type."""
    piece, score, kind = b"", b"\0\0\0\0", NORMAL
    pos = start
    while pos < stop:
        number, wire, value, pos = _field(data, pos, stop)
        if number == 1 and wire == 2:
            piece = value
        elif number == 2 and wire == 5:
            score = value
        elif number == 3 and wire == 0:
            kind = value
    return piece, score, kind  # type: ignore[return-value]


def _read_pieces(data: bytes, pos: int, end: int, model: ModelProto) -> int:
    """Read the run of pieces (field 1) starting at ``pos``; return where it stops.

    Most pieces are laid out as ``0A len piece 15 float [18 type]``; those are read without the
    general field loop (XLM-V has 900k of them).
    """
    pieces, kinds, scores = model.pieces, model.types, bytearray()
    try:
        while pos < end and data[pos] == 0x0A:
            size, start = (data[pos + 1], pos + 2) if pos + 1 < end and data[pos + 1] < 0x80 else _varint(data, pos + 1)
            stop = start + size
            if stop > end:
                raise Malformed("a piece runs past the end of the file")
            length = data[start + 1] if size > 1 else 0
            if (size == 7 + length or size == 9 + length) and data[start] == 0x0A and length < 0x80 \
                    and data[start + 2 + length] == 0x15 and (size == 7 + length or data[start + 7 + length] == 0x18):
                pieces.append(data[start + 2 : start + 2 + length].decode("utf-8"))
                scores += data[start + 3 + length : start + 7 + length]
                kinds.append(data[start + 8 + length] if size > 7 + length else NORMAL)
            else:
                piece, score, kind = _piece(data, start, stop)
                if not isinstance(piece, bytes) or not isinstance(score, bytes):
                    raise Malformed(f"piece {len(pieces)} is malformed")
                pieces.append(piece.decode("utf-8"))
                scores += score
                kinds.append(kind)
            pos = stop
    except UnicodeDecodeError as error:
        raise Malformed(f"piece {len(pieces)} is not UTF-8") from error
    values = array("f")
    values.frombytes(bytes(scores))
    if sys.byteorder == "big":  # pragma: no cover
        values.byteswap()
    model.scores += values.tolist()
    return pos


def _check(model: ModelProto) -> None:
    pieces, kinds = model.pieces, model.types
    if not pieces:
        raise Malformed("no pieces (not a SentencePiece model)")
    if "" in pieces:
        raise Malformed(f"piece {pieces.index('')} is empty")
    if not _KINDS.issuperset(kinds):
        index = next(i for i, kind in enumerate(kinds) if kind not in _KINDS)
        raise Malformed(f"piece {index} ({pieces[index]!r}) has unknown type {kinds[index]}")
    if model.model_type not in (UNIGRAM, BPE):
        name = _MODEL_TYPES.get(model.model_type, str(model.model_type))
        raise Malformed(f"model type {name!r} is not supported (only unigram and bpe)")
    if kinds.count(UNKNOWN) != 1:
        raise Malformed(f"{kinds.count(UNKNOWN)} <unk> pieces, not one")
    reserved = [pieces[i] for i, kind in enumerate(kinds) if kind not in NORMALISH]
    if len(set(pieces)) != len(pieces):  # a piece may only repeat as one normal and one reserved
        normal = [p for p, kind in zip(pieces, kinds) if kind in NORMALISH]
        for group in (normal, reserved):
            if len(set(group)) != len(group):
                seen: set[str] = set()
                raise Malformed(f"piece {next(p for p in group if p in seen or seen.add(p))!r} is defined twice")
    if model.byte_fallback and not {f"<0x{b:02X}>" for b in range(256)}.issubset(
            p for p, kind in zip(pieces, kinds) if kind == BYTE):
        raise Malformed("byte_fallback is set but the 256 byte pieces are not all there")


def parse_model(data: bytes) -> ModelProto:
    """A ``ModelProto`` from the bytes of a ``.model`` file; raises :class:`Malformed`."""
    model = ModelProto()
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0x0A:
            pos = _read_pieces(data, pos, end, model)
            continue
        number, wire, value, pos = _field(data, pos, end)
        if number == 2 and wire == 2:
            for sub, sub_wire, sub_value in _fields(value):  # type: ignore[arg-type]
                if sub in _TRAINER_INTS and sub_wire == 0:
                    setattr(model, _TRAINER_INTS[sub], _int32(sub_value))  # type: ignore[arg-type]
                elif sub in _TRAINER_BOOLS and sub_wire == 0:
                    setattr(model, _TRAINER_BOOLS[sub], bool(sub_value))
                elif sub in _TRAINER_STRINGS and sub_wire == 2:
                    setattr(model, _TRAINER_STRINGS[sub], _text(sub_value, "a special piece"))
        elif number == 3 and wire == 2:
            for sub, sub_wire, sub_value in _fields(value):  # type: ignore[arg-type]
                if sub == 1 and sub_wire == 2:
                    model.normalizer_name = _text(sub_value, "the normalizer name")
                elif sub == 2 and sub_wire == 2:
                    model.precompiled_charsmap = sub_value  # type: ignore[assignment]
                elif sub in _NORMALIZER_BOOLS and sub_wire == 0:
                    setattr(model, _NORMALIZER_BOOLS[sub], bool(sub_value))
    _check(model)
    return model


# --------------------------------------------------------------------------- the character map

_LABEL_MASK = (1 << 31) | 0xFF
_VALUE_MASK = (1 << 31) - 1
_INERT = (-1, None)  # a character that neither is a key nor starts one


class CharsMap:
    """A precompiled character map: its trie walked byte by byte, with what each character does cached."""

    def __init__(self, blob: bytes):
        if len(blob) <= 4:
            raise Malformed("precompiled_charsmap is shorter than its header")
        size = int.from_bytes(blob[:4], "little")
        if size >= len(blob) or size % 4:
            raise Malformed("precompiled_charsmap's trie size does not fit the blob")
        units = array("I")
        units.frombytes(blob[4 : 4 + size])
        if sys.byteorder == "big":  # pragma: no cover
            units.byteswap()
        self._units = units.tolist()
        self._strings_blob = blob[4 + size :]
        try:
            self._strings_blob.decode("utf-8")
        except UnicodeDecodeError as error:
            raise Malformed("precompiled_charsmap's replacement strings are not UTF-8") from error
        self.double_space = b"  " in self._strings_blob  # a replacement holding two spaces in a row
        self._root = self._offset(self._units[0]) if self._units else -1
        self._strings: dict[int, str] = {}
        self._chars: dict[str, tuple[int, str | None]] = {}
        self.space_inert = self.char(" ") == _INERT
        # Plain ASCII is mapped by str.translate when no key spans two ASCII characters.
        self.ascii_table = {ord(chr(c)): self.char(chr(c))[1] for c in range(128) if self.char(chr(c))[1] is not None}
        self.ascii_multi = any(
            self._step(self.char(chr(c))[0], b)[0] >= 0 for c in range(128) if self.char(chr(c))[0] >= 0 for b in range(1, 128)
        )

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def _step(self, node: int, byte: int) -> tuple[int, int]:
        """Follow ``byte`` from ``node``: ``(next node, value offset or -1)``; node -1 when there is no edge."""
        units = self._units
        if node < 0:
            return -1, -1
        node ^= byte
        if node >= len(units):
            return -1, -1
        unit = units[node]
        if (unit & _LABEL_MASK) != byte:
            return -1, -1
        node ^= self._offset(unit)
        if (unit >> 8) & 1:
            if node >= len(units):
                raise Malformed("precompiled_charsmap's trie points outside itself")
            return node, units[node] & _VALUE_MASK
        return node, -1

    def _string(self, offset: int) -> str:
        text = self._strings.get(offset)
        if text is None:
            blob = self._strings_blob
            if offset >= len(blob):
                raise Malformed("precompiled_charsmap points past its replacement strings")
            end = blob.find(b"\0", offset)
            text = blob[offset : end if end >= 0 else len(blob)].decode("utf-8", errors="replace")
            self._strings[offset] = text
        return text

    def _walk(self, node: int, char: str) -> tuple[int, int]:
        value = -1
        for byte in char.encode("utf-8", "surrogatepass"):
            node, value = self._step(node, byte)
            if node < 0:
                return -1, -1
        return node, value

    def char(self, char: str) -> tuple[int, str | None]:
        """``(node after the character or -1, its replacement or None)``, cached."""
        entry = self._chars.get(char)
        if entry is None:
            if char == "\0" or self._root < 0:  # NUL never matches: both libraries stop there
                entry = _INERT
            else:
                node, value = self._walk(self._root, char)
                entry = (node, self._string(value) if value >= 0 else None)
            self._chars[char] = entry
        return entry

    def longest(self, text: str, start: int) -> tuple[int, str | None]:
        """SentencePiece's lookup: ``(characters matched, replacement)`` for the longest key at ``start``."""
        node, replacement = self.char(text[start])
        length = 1 if replacement is not None else 0
        end = start + 1
        while node >= 0 and end < len(text) and text[end] != "\0":
            node, value = self._walk(node, text[end])
            end += 1
            if value >= 0:
                length, replacement = end - start, self._string(value)
        return length, replacement

    def shortest(self, cluster: str) -> str | None:
        """``tokenizers``' lookup: the replacement of the shortest key the cluster starts with, or None."""
        node, replacement = self.char(cluster[0])
        for char in cluster[1:]:
            if replacement is not None or node < 0 or char == "\0":
                break
            node, value = self._walk(node, char)
            if value >= 0:
                replacement = self._string(value)
        return replacement

    def apply_graphemes(self, text: str, clusters) -> str:
        """``tokenizers``' ``Precompiled`` normalizer over ``clusters``, the text's grapheme clusters."""
        out = []
        for cluster in clusters:
            if len(cluster.encode("utf-8", "surrogatepass")) < 6:
                replacement = self.shortest(cluster)
                if replacement is not None:
                    out.append(replacement)
                    continue
            for char in cluster:
                replacement = self.char(char)[1]
                out.append(char if replacement is None else replacement)
        return "".join(out)
