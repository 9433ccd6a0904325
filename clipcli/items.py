"""Finding inputs: one :class:`Item` per image named on the command line, in order.

An *input* is an image file, a folder (searched recursively for image extensions, in sorted
order), a list file (one path or http(s) URL per line, from a file, a pipe or ``-`` for
stdin) or a URL. :func:`expand_inputs` turns inputs into items; an item that cannot be used
carries its reason and becomes an error record, while usage mistakes (an input that does not
exist, a list file that is not UTF-8) raise :class:`~clipcli.errors.InputError` before any
work. Fetching URLs lives in :mod:`clipcli.http`, decoding in :mod:`clipcli.images`.
"""

from __future__ import annotations

import codecs
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .display import display
from .errors import InputError
from .http import has_credentials, redact_credentials, url_scheme
from .video import DEFAULT_INTERVAL as VIDEO_INTERVAL
from .video import VIDEO_EXTENSIONS, check_interval, frame_name, frame_times, is_video, split_frame

# Camera RAW files (read through rawpy, see clipcli.decoders), and what a camera or a RAW developer
# writes beside one: a RAW file with such a twin of the same stem is skipped by :func:`raw_pairs`.
RAW_EXTENSIONS = frozenset({".cr2", ".cr3", ".nef", ".nrw", ".arw", ".dng", ".orf", ".rw2", ".raf", ".pef", ".srw"})
DEVELOPED_EXTENSIONS = frozenset({".jpg", ".jpeg", ".heic", ".heif", ".avif", ".png", ".tif", ".tiff"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif",
                              ".avif", ".pnm", ".ppm", ".pgm", ".pbm", ".ico"}) | RAW_EXTENSIONS
# Videos are read as frames every few seconds (clipcli.video) and found in folders like images.
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
# Always read as list files; other files without an image extension are sniffed.
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list", ".urls", ".csv", ".tsv"})
MAX_LINE_CHARS = 16384


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One image to score: a local path or an http(s) URL.

    ``name`` is what records show: the path as the user can reach it from the current
    folder (list entries are joined to their list file's folder), or the URL. ``error`` is
    set when the item is known to be unusable before any reading (e.g. an ``ftp://`` URL);
    ``data`` holds the bytes of an image read from a WebDataset shard; ``frame`` the time in
    seconds of a video's frame (:mod:`clipcli.video`; ``name`` is then ``PATH#t=SECONDS``).
    """

    name: str
    path: str | None = None
    url: str | None = None
    error: str | None = None
    data: bytes | None = field(default=None, repr=False)  # the file's bytes, read from an archive
    frame: float | None = None


def url_item(url: str) -> Item:
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        try:
            credentials = has_credentials(url)
        except ValueError as error:
            return Item(name=url, error=f"not a valid URL ({error})")
        if credentials:  # never sent, nor shown: they would travel to every redirect target, and into logs
            return Item(name=redact_credentials(url),
                        error="refused: the URL holds a user name or password (user:pass@host)")
        return Item(name=url, url=url)
    return Item(name=url, error=f"unsupported URL scheme {scheme!r} (only http and https are fetched)")


def has_image_extension(name: str) -> bool:
    """Whether ``name`` is an image's or a video's by its extension (what a folder walk picks up)."""
    base = name.rpartition("/")[2]
    return "." in base.lstrip(".") and "." + base.rpartition(".")[2].lower() in MEDIA_EXTENSIONS


def _twin_key(path: str) -> tuple[str, str]:
    folder, base = os.path.split(path)
    return os.path.normpath(folder or "."), os.path.splitext(base)[0].casefold()


def raw_pairs(items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """``(kept, skipped)``: the items, less each camera RAW file that has a developed twin among
    them (a JPEG, HEIC, AVIF, PNG or TIFF of the same stem, letter case aside, in the same
    folder), which is skipped: the twin is the picture people look at. Order is kept."""
    def extension(item: Item) -> str:
        return os.path.splitext(item.path or "")[1].lower()

    developed = {_twin_key(item.path) for item in items
                 if item.path and not item.error and extension(item) in DEVELOPED_EXTENSIONS}
    kept: list[Item] = []
    skipped: list[Item] = []
    for item in items:
        twin = item.path and extension(item) in RAW_EXTENSIONS and _twin_key(item.path) in developed
        (skipped if twin else kept).append(item)
    return kept, skipped


# --------------------------------------------------------------------------- list files


def parse_list(data: bytes, source: str, *, comments: bool = True) -> list[str]:
    """Lines of a UTF-8 list file (BOM and CRLF allowed), stripped, blank lines skipped.

    With ``comments``, lines starting with ``#`` are skipped too. A decoding error, a NUL
    byte or a line over :data:`MAX_LINE_CHARS` raises :class:`InputError` naming the line.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{source}, line {number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
        if "\x00" in line:
            raise InputError(f"{source}, line {number}: contains a NUL byte (is this a binary file?)")
        if len(line) > MAX_LINE_CHARS:
            raise InputError(f"{source}, line {number}: line is {len(line)} characters long (limit {MAX_LINE_CHARS})")
        line = line.strip()
        if not line or (comments and line.startswith("#")):
            continue
        lines.append(line)
    return lines


def read_lines(path: str | os.PathLike, *, comments: bool = True) -> list[str]:
    """:func:`parse_list` of a file; ``-`` reads stdin."""
    if os.fspath(path) == "-":
        return parse_list(sys.stdin.buffer.read(), "stdin", comments=comments)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"no such file: {display(os.fspath(path))}") from None
    except IsADirectoryError:
        raise InputError(f"{display(os.fspath(path))} is a folder, expected a text file") from None
    except OSError as error:
        raise InputError(f"cannot read {display(os.fspath(path))}: {error.strerror or error}") from None
    return parse_list(data, display(os.fspath(path)), comments=comments)


def _looks_like_text(head: bytes) -> bool:
    """Whether the start of a file reads as a list (UTF-8 text, not binary or SVG/HTML markup)."""
    head = head.removeprefix(codecs.BOM_UTF8)
    if b"\x00" in head or head.lstrip()[:1] == b"<":  # binary, or markup (SVG/HTML): an image item
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _is_list_file(path: str) -> bool:
    """Whether a regular file without an image extension is a list file rather than an image."""
    if os.path.splitext(path)[1].lower() in LIST_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return _looks_like_text(f.read(65536))
    except OSError:
        return False


def _read_stream(path: str) -> bytes:
    """All of a pipe, FIFO or ``/dev/fd/N`` (which can be read only once)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise InputError(f"cannot read {display(path)}: {error.strerror or error}") from None


def _is_stream(path: str) -> bool:
    """A pipe or FIFO (``<(...)`` is one): readable once. Character devices such as
    /dev/zero are not streams here: as items they are refused as not regular files."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _list_entries(lines: Sequence[str], base: str, visited: set) -> Iterator[Item]:
    for line in lines:
        if url_scheme(line):
            yield url_item(line)
            continue
        path = line if os.path.isabs(line) or not base else os.path.join(base, line)
        if os.path.isdir(path):
            yield from walk_folder(path, visited)
        else:
            yield Item(name=path, path=path)


# --------------------------------------------------------------------------- folders


def _sort_key(name: str) -> tuple[str, str]:
    return (name.casefold(), name)


def walk_folder(folder: str, visited: set | None = None, exclude: frozenset[str] = frozenset()) -> Iterator[Item]:
    """Image files under ``folder``, recursively, sorted by name at each level.

    Symlinked folders are followed once: a folder already visited (by device and inode)
    is skipped, so a symlink loop is never followed. Dangling or looping symlinks with an
    image extension become items with an error; an unreadable folder becomes one item
    with an error. Hidden entries (names starting with ``.``) are skipped.
    """
    visited = set() if visited is None else visited
    try:
        st = os.stat(folder)
    except OSError as error:
        yield Item(name=folder, error=f"cannot read folder: {error.strerror or error}")
        return
    if (st.st_dev, st.st_ino) in visited:
        return
    visited.add((st.st_dev, st.st_ino))
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: _sort_key(e.name))
    except OSError as error:
        yield Item(name=folder, error=f"cannot read folder: {error.strerror or error}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = os.path.join(folder, entry.name)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            yield from walk_folder(path, visited, exclude)
        elif has_image_extension(entry.name) and not (exclude and os.path.abspath(path) in exclude):
            yield Item(name=path, path=path)


# --------------------------------------------------------------------------- expansion


EMPTY_FOLDER = ("the folder holds no images (jpg, jpeg, png, webp, heic, heif, avif, bmp, gif, tif, tiff, pnm, ppm, "
                "pgm, pbm, ico, camera RAW: cr2, cr3, nef, nrw, arw, dng, orf, rw2, raf, pef, srw, or video: mp4, m4v, "
                "mov, webm, mkv, avi, 3gp, mts, m2ts, mpg, mpeg, wmv, ogv)")


def _missing(path: str) -> str | None:
    """None when ``path`` exists; "" when it does not; the reason when it cannot be looked at
    (a folder on its way that cannot be searched: one failed item, not the end of the run)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError as error:
        return f"cannot look at it: {error.strerror or error}"
    return None


def expand_inputs(inputs: Sequence[str], *, exclude: Sequence[str | os.PathLike] = (),
                  video_interval: float | None = VIDEO_INTERVAL) -> list[Item]:
    """One :class:`Item` per image named by ``inputs``, in order.

    Each input is a URL, an image file, a video, a folder, a list file or ``-`` (a list on stdin).
    A video is one item per frame read every ``video_interval`` seconds (:func:`frame_items`;
    None: one item for the file, as the index takes it). Files listed in
    ``exclude`` (the run's own outputs) are not picked up from folders.
    A missing input, an empty one (which would mean the current folder) or an empty result
    raises :class:`InputError`.
    """
    from .fsutil import named

    excluded = frozenset(os.path.abspath(p) for p in exclude)
    items: list[Item] = []
    for arg in inputs:
        named(arg, "an input")
        visited: set = set()  # per input: a folder named twice is expanded twice, a loop never
        if arg == "-":
            items.extend(_list_entries(read_lines("-"), "", visited))
        elif url_scheme(arg):
            items.append(url_item(arg))
        elif os.path.isdir(arg):  # a folder named x.jpg included
            items.extend(list(walk_folder(arg, visited, excluded)) or [Item(name=arg, error=EMPTY_FOLDER)])
        elif (problem := _missing(arg)) is not None:
            if problem == "":
                raise InputError(f"no such file or folder: {display(arg)}")
            items.append(Item(name=arg, error=problem))
        elif has_image_extension(arg):
            items.append(Item(name=arg, path=arg))
        elif _is_stream(arg):  # <(...), a FIFO: read once, then sniffed and parsed from the same bytes
            data = _read_stream(arg)
            if not _looks_like_text(data[:65536]):
                raise InputError(f"{display(arg)} is a pipe that does not hold a list of paths or URLs")
            items.extend(_list_entries(parse_list(data, display(arg)), "", visited))
        elif not _is_list_file(arg):
            items.append(Item(name=arg, path=arg))
        else:
            items.extend(_list_entries(read_lines(arg), os.path.dirname(arg), visited))
    if all(item.error == EMPTY_FOLDER for item in items):
        raise InputError(f"no images found in {display(', '.join(inputs))}")
    if video_interval is not None:
        items = _with_frames(items, video_interval)
    return items


def local_item(name: str) -> Item:
    """The item of a local path as an index stores it: a video's frame (``PATH#t=SECONDS``), a
    video (its first frame) or a file."""
    path, t = split_frame(name)
    return Item(name=name, path=path, frame=0.0 if t is None and is_video(path) else t)


def frame_items(item: Item, interval: float = VIDEO_INTERVAL) -> list[Item]:
    """The frame items of a video item (its container probed), or the item with the reason it
    cannot be read."""
    from .errors import ItemError
    from .video import probe

    try:
        times = frame_times(probe(item.path, rotation=False).duration, interval)
    except ItemError as error:
        return [Item(name=item.name, error=error.reason)]
    return [Item(name=frame_name(item.name, t), path=item.path, frame=t) for t in times]


def _with_frames(items: list[Item], interval: float) -> list[Item]:
    """``items`` with each local video replaced by its frames (probed only when there is one)."""
    check_interval(interval)
    out: list[Item] = []
    for item in items:
        if item.path is not None and item.error is None and item.frame is None and is_video(item.path):
            out += frame_items(item, interval)
        else:
            out.append(item)
    return out
