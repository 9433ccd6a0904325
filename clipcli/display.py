"""Text safe to show: names and messages as one printable line, undecodable bytes kept."""

from __future__ import annotations

import re
import unicodedata

_BREAKS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display(text: str) -> str:
    """``text`` safe to print or encode as UTF-8: undecodable bytes from file names
    (surrogate escapes) are shown as ``\\udcXX``, which JSON reads back losslessly."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def acts_on_terminal(char: str) -> bool:
    """Whether ``char`` could act on a terminal rather than show: a C0 or C1 control or DEL, a
    bidi override or other invisible format character, a line or paragraph separator (the zero
    width joiner is kept: it joins emoji)."""
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0 or (
        code != 0x200D and unicodedata.category(char) in ("Cf", "Zl", "Zp"))


def _shown(char: str) -> str:
    if not acts_on_terminal(char):
        return char
    code = ord(char)
    if code < 0xA0:
        return _BREAKS.get(char) or f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escaped(text: str) -> str:
    r"""``text`` with every character that could act on a terminal shown escaped: control
    characters (``\x1b`` of an escape sequence, ``\n``, ``\t``), bidi overrides and other
    invisible format characters (``\u202e``); undecodable file-name bytes as by :func:`display`.
    For values shown as data (a file name in a table or on an image), where a line break
    must stay visible."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(_shown(char) for char in display(text))


def one_line(text: str) -> str:
    r"""``text`` as one safe line for a terminal: line breaks become spaces; other control
    characters (escape sequences that could retitle or clear the terminal, bidi overrides)
    are shown escaped, as ``\x1b`` or ``\u202e``; undecodable file-name bytes as by
    :func:`display`."""
    return escaped(" ".join(re.split(r"[\r\n\t]+", display(text).strip())))  # line breaks: one space
