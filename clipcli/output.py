"""Records out: JSON Lines, JSON, CSV or a table on stdout; messages on stderr.

A *record* is a flat-ish dict, one per input, in input order. :class:`RecordWriter`
streams JSON Lines as records arrive (a pipeline sees the first result at once) and
buffers the other formats. Files are written by :mod:`clipcli.fsutil` (atomic writes).
What a run says on stderr is the CLI's (:mod:`clipcli.cli.render`).

Every value comes from outside (file names, labels, captions), so none is ever read as
markup: a table draws each cell, header and title as plain rich ``Text`` with control
characters escaped (:func:`clipcli.display.escaped`), and JSON escapes them as ``\\uXXXX``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import IO, Any, Callable, Sequence

from .display import acts_on_terminal, display, escaped

FORMATS = ("jsonl", "json", "csv", "table")


def file_format(path: str) -> str:
    """The record format a file's name asks for: ``.jsonl``, ``.json`` or ``.csv``."""
    from .errors import InputError

    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in ("jsonl", "json", "csv"):
        raise InputError(f"{path}: name a .jsonl, .json or .csv file, or choose the format", option="output")
    return suffix


def default_format(stream: IO[str]) -> str:
    """``table`` on a terminal, ``jsonl`` anywhere else (pipes, files)."""
    try:
        return "table" if stream.isatty() else "jsonl"
    except (AttributeError, ValueError):
        return "jsonl"


def to_json(value: Any, indent: int | None = None) -> str:
    """JSON text of ``value``, UTF-8 safe: undecodable file-name bytes (lone surrogates)
    become ``\\udcXX`` escapes, which JSON readers turn back into the same string.

    With ``indent``, short containers and lists of numbers stay on one line, so a matrix
    prints one row per line.

    Characters that act on a terminal and that JSON leaves raw (DEL and the C1 controls such
    as the one-byte CSI, bidi overrides, line and paragraph separators) are written as
    ``\\uXXXX`` escapes too, so a record printed to a terminal cannot restyle it; readers
    get the same string back.
    """
    text = _pretty(value, indent, 0) if indent else json.dumps(value, ensure_ascii=False, allow_nan=False)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _RAW.sub(_json_escape, text) if not text.isascii() or "\x7f" in text else text


_RAW = re.compile("[\x7f-\U0010ffff]")  # only these can need it: JSON escapes C0 itself


def _json_escape(match: re.Match) -> str:
    char = match.group()
    return json.dumps(char)[1:-1] if acts_on_terminal(char) else char  # \uXXXX; a surrogate pair beyond the BMP


def _pretty(value: Any, indent: int, level: int) -> str:
    compact = json.dumps(value, ensure_ascii=False, allow_nan=False)
    if not isinstance(value, (list, dict)) or not value or len(compact) <= 80:
        return compact
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return compact
    inner, outer = " " * (indent * (level + 1)), " " * (indent * level)
    if isinstance(value, dict):
        parts = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_pretty(v, indent, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(parts) + "\n" + outer + "}"
    parts = [f"{inner}{_pretty(v, indent, level + 1)}" for v in value]
    return "[\n" + ",\n".join(parts) + "\n" + outer + "]"


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits is not None else repr(value)
    if isinstance(value, (list, dict)):
        return to_json(value)
    return display(str(value))


class RecordWriter:
    """Write records to ``stream`` in ``fmt``; use as a context manager.

    ``columns`` fixes the CSV/table columns (default: keys in order of first appearance).
    ``view`` reshapes a record for CSV and table only (e.g. a nested list as a string);
    ``paths_column`` is shortened in tables (see :func:`write_table`).
    """

    def __init__(
        self,
        stream: IO[str],
        fmt: str,
        columns: Sequence[str] | None = None,
        view: Callable[[dict], dict] | None = None,
        title: str | None = None,
        paths_column: str | None = None,
    ):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.stream, self.fmt, self.columns, self.view, self.title = stream, fmt, columns, view, title
        self.paths_column = paths_column
        self.buffer: list[dict] = []

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None or not issubclass(kind, BrokenPipeError):
            self.close()

    def write(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self.stream.write(to_json(record) + "\n")
            self.stream.flush()
        else:
            self.buffer.append(record)

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write(to_json(self.buffer, indent=2) + "\n")
        elif self.fmt in ("csv", "table"):
            rows = [self.view(r) if self.view else r for r in self.buffer]
            columns = list(self.columns or _columns(rows))
            if self.fmt == "csv":
                write_csv(self.stream, rows, columns)
            else:
                write_table(self.stream, rows, columns, self.title, self.paths_column)
        self.buffer = []
        self.stream.flush()


def _columns(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_csv(stream: IO[str], rows: Sequence[dict], columns: Sequence[str]) -> None:
    """RFC 4180 CSV with a header row; floats at full precision, lists as JSON."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])


def common_folder(names: Sequence[Any]) -> str:
    """The folder every name is in (for a shorter table), or "" if they are not all local paths."""
    from .http import url_scheme

    if not names or not all(isinstance(n, str) and n and not url_scheme(n) for n in names):
        return ""
    try:
        folder = os.path.commonpath([os.path.dirname(n) or "." for n in names])
    except ValueError:  # absolute and relative mixed
        return ""
    return "" if folder in ("", ".") else folder


def write_table(
    stream: IO[str], rows: Sequence[dict], columns: Sequence[str], title: str | None = None, paths_column: str | None = None
) -> None:
    """A rich table; floats to 4 decimals, error rows in red. The ``paths_column`` is shown
    relative to the folder all its paths share, named in the caption.

    Every cell, header, title and caption is drawn literally: ``[bold]a.png`` or ``:smile:``
    as written, never as markup or an emoji, and ``\\x1b[2J`` escaped (:func:`~clipcli.display.escaped`).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def literal(value: Any) -> Text:
        return Text(escaped(_cell(value, digits=4)))

    table = Table(title=literal(title) if title else None, show_lines=False, header_style="bold")
    folder = common_folder([row.get(paths_column) for row in rows]) if paths_column else ""
    if folder:
        table.caption = Text(f"paths relative to {escaped(folder)}")
        rows = [{**row, paths_column: os.path.relpath(row[paths_column], folder)} for row in rows]
    for column in columns:
        numeric = any(isinstance(row.get(column), float) for row in rows)
        table.add_column(literal(column), justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        style = "red" if row.get("status") == "error" else None
        table.add_row(*[literal(row.get(c)) for c in columns], style=style)
    Console(file=stream, soft_wrap=False).print(table)


def write_paths(stream: IO[bytes], paths: Sequence[bytes], separator: bytes = b"\n") -> list[bytes]:
    """Each path followed by ``separator``, as the filesystem's bytes: ``b"\\n"`` for
    ``xargs -d '\\n'``, ``b"\\0"`` for ``xargs -0`` (as ``find -print0``).

    A path that holds the separator itself (a name with a line break) would read as two
    paths, the second one chosen by whoever named the file, so it is left out; the paths
    left out are returned for the caller to report. No path holds a NUL byte.
    """
    kept = [path for path in paths if separator not in path]
    stream.write(b"".join(path + separator for path in kept))
    stream.flush()
    return [path for path in paths if separator in path]


def text_stream(binary: IO[bytes]) -> IO[str]:
    """A UTF-8 text wrapper for writing records to a binary stream."""
    return io.TextIOWrapper(binary, encoding="utf-8", newline="\n", write_through=True)
