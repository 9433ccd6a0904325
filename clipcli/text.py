"""Text safe to show: names and messages as one printable line, undecodable bytes kept."""

from __future__ import annotations

import re
import unicodedata


def display(text: str) -> str:
    """``text`` safe to print or encode as UTF-8: undecodable bytes from file names
    (surrogate escapes) are shown as ``\\udcXX``, which JSON reads back losslessly."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text: str) -> str:
    r"""``text`` as one safe line for a terminal: line breaks become spaces; other control
    characters (escape sequences that could retitle or clear the terminal, bidi overrides)
    are shown escaped, as ``\x1b`` or ``\u202e``; undecodable file-name bytes as by
    :func:`display`."""
    out = []
    for char in " ".join(re.split(r"[\r\n\t]+", display(text).strip())):  # line breaks: one space
        code = ord(char)
        if code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif unicodedata.category(char) in ("Cf", "Zl", "Zp") and code not in (0x200D,):
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)
