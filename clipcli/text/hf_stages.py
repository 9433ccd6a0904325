"""The text stages of a ``tokenizer.json``: its normalizers and pre-tokenizers (see :mod:`.tokenizer_json`).

Each stage is built from its JSON object into a plain function. A piece of text travels with one
flag, whether it starts where the input text starts, which ``Metaspace``'s ``first`` scheme
needs (``tokenizers`` keeps full offsets for it; here each stage says whether it removed the
first character). The character classes are Rust's, as ``tokenizers`` uses them: whitespace is
Unicode's White_Space, a digit any ``\\p{N}``, a word character ``\\w``.

A ``Regex`` pattern comes from the file and runs as written, so each use has a time limit
(:data:`REGEX_SECONDS`): a pattern that backtracks catastrophically (``(a|aa)+$``) raises
:class:`PatternTimeout` instead of taking seconds that double with each character.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from typing import Any, Callable

import regex

from .spm_model import CharsMap, Malformed

WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space, Rust's char::is_whitespace
_WS = "[" + re.escape(WHITESPACE) + "]"
_GRAPHEMES = regex.compile(r"\X")
TOKEN_ID_LIMIT = 1 << 31  # ids are below it: an embedding table never has 2**31 rows
REGEX_SECONDS = 1.0  # a sane pattern takes milliseconds on the longest text tokenized (65,536 characters)

Piece = tuple[str, bool]  # a stretch of text, and whether it starts where the input starts


class Unsupported(ValueError):
    """A component of a ``tokenizer.json`` we do not implement (or a malformed one)."""


def get_field(spec: dict, key: str, kind: type | tuple = object, default: Any = ...) -> Any:
    if not isinstance(spec, dict):
        raise Unsupported(f"expected an object, found {type(spec).__name__}")
    if key not in spec:
        if default is ...:
            raise Unsupported(f"{spec.get('type', 'an entry')} has no {key!r}")
        return default
    value = spec[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Unsupported(f"{spec.get('type', 'an entry')}'s {key!r} is not a {getattr(kind, '__name__', kind)}")
    return value


def parse_token_id(value: Any, what: str, digits: bool = False) -> int:
    """An id as a file writes it: an integer (or, with ``digits``, a string of ASCII digits: a
    JSON object's key) from 0 to below :data:`TOKEN_ID_LIMIT`; else :class:`Unsupported` naming ``what``."""
    if digits and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)  # (str.isdigit alone takes "²", which int() refuses)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < TOKEN_ID_LIMIT:
        raise Unsupported(f"{what} {str(value)[:20]!r} is not a token id (a whole number from 0 to 2**31 - 1)")
    return value


def get_id(spec: dict, key: str) -> int:
    return parse_token_id(get_field(spec, key, object), f"{spec.get('type', 'an entry')}'s {key!r}")


class PatternTimeout(Unsupported):
    """A ``Regex`` pattern that ran past :data:`REGEX_SECONDS` on a text."""


class _TimedPattern:
    """A compiled ``Regex`` pattern whose every use stops after :data:`REGEX_SECONDS`."""

    def __init__(self, source: str):
        self.source = source
        try:
            self._compiled = regex.compile(source)
        except (regex.error, OverflowError, RecursionError) as error:
            raise Unsupported(f"regex {source!r}: {error}") from error

    def _timed(self, method: str, text: str, *args):
        try:
            result = getattr(self._compiled, method)(*args, text, timeout=REGEX_SECONDS)
            return list(result) if method == "finditer" else result  # the matches are found while iterating
        except TimeoutError:
            raise PatternTimeout(f"regex {self.source[:80]!r} ran for over {REGEX_SECONDS:g} s on a "
                                 f"{len(text):,}-character text: a pattern that backtracks without end") from None

    def split(self, text: str) -> list[str]:
        return self._timed("split", text)

    def match(self, text: str):
        return self._timed("match", text)

    def finditer(self, text: str) -> list:
        return self._timed("finditer", text)

    def sub(self, replace: Callable, text: str) -> str:
        return self._timed("sub", text, replace)


def _pattern(spec: dict) -> re.Pattern | _TimedPattern:
    pattern = get_field(spec, "pattern", dict)
    if isinstance(pattern.get("String"), str):  # a literal: no backtracking, no time limit needed
        return re.compile(re.escape(pattern["String"])) if pattern["String"] else re.compile(r"(?!)")
    if isinstance(pattern.get("Regex"), str):
        return _TimedPattern(pattern["Regex"])
    raise Unsupported("a pattern that is neither a String nor a Regex")


# --------------------------------------------------------------------------- normalizers

Normalizer = Callable[[str, bool], tuple[str, bool]]


def _precompiled(spec: dict) -> Normalizer:
    encoded = spec.get("precompiled_charsmap")
    if not encoded:
        return lambda text, origin: (text, origin)
    try:
        charsmap = CharsMap(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError, Malformed) as error:
        raise Unsupported(f"Precompiled's charsmap: {error}") from error

    def apply(text: str, origin: bool) -> tuple[str, bool]:
        if text.isascii() and not charsmap.ascii_multi and "\r\n" not in text:
            out = text.translate(charsmap.ascii_table)
        else:
            out = charsmap.apply_graphemes(text, _GRAPHEMES.findall(text))
        return out, origin  # (tokenizers keeps the start even when the first cluster maps to nothing)

    return apply


def _lowercase(text: str, origin: bool) -> tuple[str, bool]:
    # Character by character, as tokenizers does: no final-sigma rule.
    return (text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)), origin


def _replace(spec: dict) -> Normalizer:
    pattern, content = _pattern(spec), get_field(spec, "content", str)

    def apply(text: str, origin: bool) -> tuple[str, bool]:
        if origin and not content and (match := pattern.match(text)) and match.end() > 0:
            origin = False
        return pattern.sub(lambda _: content, text), origin

    return apply


def _strip(spec: dict) -> Normalizer:
    left, right = get_field(spec, "strip_left", bool, False), get_field(spec, "strip_right", bool, False)

    def apply(text: str, origin: bool) -> tuple[str, bool]:
        if left:
            stripped = text.lstrip(WHITESPACE)
            origin = origin and len(stripped) == len(text)
            text = stripped
        return (text.rstrip(WHITESPACE) if right else text), origin

    return apply


def normalizer(spec: dict | None) -> Normalizer | None:
    """The function ``(text, starts at the input's start) -> (normalized, same)`` a spec describes."""
    if spec is None:
        return None
    kind = get_field(spec, "type", str)
    if kind == "Sequence":
        steps = [step for step in map(normalizer, get_field(spec, "normalizers", list)) if step is not None]

        def sequence(text: str, origin: bool) -> tuple[str, bool]:
            for step in steps:
                text, origin = step(text, origin)
            return text, origin

        return sequence
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text, origin: (unicodedata.normalize(kind, text), origin)
    if kind == "Prepend":
        prepend = get_field(spec, "prepend", str)
        return lambda text, origin: ((prepend + text) if text else text, origin)
    builders = {"Precompiled": _precompiled, "Replace": _replace, "Strip": _strip}
    if kind == "Lowercase":
        return _lowercase
    if kind not in builders:
        raise Unsupported(f"normalizer {kind!r}")
    return builders[kind](spec)


# --------------------------------------------------------------------------- pre-tokenizers

PreTokenizer = Callable[[list[Piece]], list[Piece]]
BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def _matches(pattern, text: str, invert: bool = False) -> list[tuple[int, int, bool]]:
    """``tokenizers``' find_matches: the whole text as ``(start, end, is a match)`` stretches."""
    out, previous = [], 0
    for match in pattern.finditer(text):
        start, end = match.span()
        if previous != start:
            out.append((previous, start, invert))
        out.append((start, end, not invert))
        previous = end
    if previous != len(text) or not text:
        out.append((previous, len(text), invert))
    return out


def split(piece: Piece, pattern, behavior: str, invert: bool = False) -> list[Piece]:
    """One piece cut by ``pattern`` with one of :data:`BEHAVIORS` (``tokenizers``' NormalizedString.split)."""
    text, origin = piece
    if behavior == "Removed" and not invert:  # the common case (whitespace), at C speed
        return [(part, origin and k == 0) for k, part in enumerate(pattern.split(text)) if part]
    spans: list[list] = []  # [start, end, remove]
    previous = False
    matches = _matches(pattern, text, invert)
    if behavior == "MergedWithNext":
        for start, end, is_match in reversed(matches):
            if is_match and not previous and spans:
                spans[-1][0] = start
            else:
                spans.append([start, end, False])
            previous = is_match
        spans.reverse()
    else:
        for start, end, is_match in matches:
            if behavior == "Removed" or behavior == "Isolated":
                spans.append([start, end, is_match and behavior == "Removed"])
            elif spans and ((behavior == "Contiguous" and is_match == previous)
                            or (behavior == "MergedWithPrevious" and is_match and not previous)):
                spans[-1][1] = end
            else:
                spans.append([start, end, False])
            previous = is_match
    return [(text[start:end], origin and start == 0) for start, end, remove in spans if not remove and start < end]


def _metaspace(spec: dict) -> PreTokenizer:
    replacement = get_field(spec, "replacement", str)
    scheme = get_field(spec, "prepend_scheme", str, "always")
    if spec.get("add_prefix_space") is False:
        scheme = "never"
    if scheme not in ("always", "first", "never") or len(replacement) != 1:
        raise Unsupported(f"Metaspace with prepend_scheme {scheme!r} and replacement {replacement!r}")
    cut = get_field(spec, "split", bool, True)

    def apply(pieces: list[Piece]) -> list[Piece]:
        out = []
        for text, origin in pieces:
            text = text.replace(" ", replacement)
            if not text.startswith(replacement) and (scheme == "always" or (scheme == "first" and origin)):
                text = replacement + text
            if not cut or replacement not in text[1:]:
                out.append((text, origin))
                continue
            # Split merged with the next piece, for one character: a cut before each replacement.
            first, *rest = text.split(replacement)
            out.extend([(first, origin)] if first else [])
            out.extend((replacement + part, origin and not first and k == 0) for k, part in enumerate(rest))
        return out

    return apply


def _splitter(pattern, behavior: str, invert: bool = False) -> PreTokenizer:
    return lambda pieces: [part for piece in pieces for part in split(piece, pattern, behavior, invert)]


def pre_tokenizer(spec: dict | None) -> PreTokenizer | None:
    """The function from pieces to pre-tokens a spec describes."""
    if spec is None:
        return None
    kind = get_field(spec, "type", str)
    if kind == "Sequence":
        steps = [step for step in map(pre_tokenizer, get_field(spec, "pretokenizers", list)) if step is not None]

        def sequence(pieces: list[Piece]) -> list[Piece]:
            for step in steps:
                pieces = step(pieces)
            return pieces

        return sequence
    if kind == "Metaspace":
        return _metaspace(spec)
    if kind == "WhitespaceSplit":
        return _splitter(re.compile(_WS), "Removed")
    if kind == "Whitespace":
        return _splitter(regex.compile(rf"\w+|[^\w{re.escape(WHITESPACE)}]+"), "Removed", invert=True)
    if kind == "Digits":
        return _splitter(regex.compile(r"\p{N}"), "Isolated" if get_field(spec, "individual_digits", bool, False) else "Contiguous")
    if kind == "Split":
        behavior = get_field(spec, "behavior", str)
        if behavior not in BEHAVIORS:
            raise Unsupported(f"Split behavior {behavior!r}")
        return _splitter(_pattern(spec), behavior, get_field(spec, "invert", bool, False))
    raise Unsupported(f"pre-tokenizer {kind!r}")
