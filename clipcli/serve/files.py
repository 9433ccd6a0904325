"""The files the server shows: named by id, never by a path from the request, and only if indexed.

A result's file is named by an id made of its row in the index's ``files`` table and a
digest of its path (``"17.3fa9c0d1e2"``): a request can name only a file the index holds,
and an id that outlived its row (the index rebuilt, the row reused) names nothing rather
than another file. An indexed path whose last component is a symbolic link is served only
when the file it leads to is indexed too: a link planted among the photos (or a photo
swapped for one) pointing at ``~/.ssh`` or another user's files is refused. Linked folders
on the way (``~/Pictures`` itself a link, ``2024 -> /mnt/nas/2024``) are the ones the index
walked, and their files are served.

Thumbnails are made on demand (the decoder's size and format limits apply, as for the
model) and kept in a bounded cache keyed by the file's path, size and modification time. A
video's frame (``PATH#t=SECONDS``, :mod:`clipcli.video`) is shown as a JPEG of that frame.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
from collections import OrderedDict
from typing import Sequence

from ..errors import InputError
from ..images import DecodeOptions, decode_image, read_image
from ..index import Index, path_key
from ..video import MARK, is_video, seconds_text, split_frame

THUMBNAIL_SIDE = 256
# Formats a browser shows as they are; any other indexed image is sent as a JPEG of itself.
BROWSER_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                 "BMP": "image/bmp", "AVIF": "image/avif"}


class NotServed(InputError):
    """The id names no file the index holds, or the file cannot be shown."""


def _digest(path: bytes) -> str:
    return hashlib.sha256(path).hexdigest()[:10]


def file_ids(index: Index, paths: Sequence[bytes]) -> list[str]:
    """The id of each indexed path (as :class:`~clipcli.index.Hit` holds it)."""
    ids = []
    with index.guard():
        for path in paths:
            row = index.db.execute("SELECT rowid FROM files WHERE path = ?", (path,)).fetchone()
            ids.append(f"{row[0]}.{_digest(path)}" if row else "")
    return ids


def resolve_id(index: Index, file_id: str) -> str:
    """The real path of the file ``file_id`` names, checked (see the module docstring), or
    :class:`NotServed`."""
    if not re.fullmatch(r"[0-9]{1,18}\.[0-9a-f]{10}", file_id, re.ASCII):
        raise NotServed(f"{file_id[:40]!r} is not a file id")
    row_text, _, digest = file_id.partition(".")
    with index.guard():
        row = index.db.execute("SELECT path, sha256 FROM files WHERE rowid = ? AND error IS NULL",
                               (int(row_text),)).fetchone()
        if row is None or _digest(row[0]) != digest:
            raise NotServed(f"no indexed file has the id {file_id}")
        path, frame = split_frame(os.fsdecode(row[0]))  # a video's frame: the video is the file checked
        if frame is not None and not (row[1] or "").endswith(f"{MARK}{seconds_text(frame)}"):
            path, frame = os.fsdecode(row[0]), None  # a file named like a frame, indexed as a file
        indexed = "SELECT 1 FROM files WHERE path = ? AND error IS NULL"
        real = os.path.realpath(path)
        if os.path.islink(path) and index.db.execute(indexed, (path_key(real),)).fetchone() is None:
            raise NotServed(f"file {file_id} leads out of the indexed files (a symbolic link)")
    return real if frame is None else f"{real}{MARK}{seconds_text(frame)}"


def _read(path: str, limit: int) -> bytes:
    """The file's bytes: a regular file, opened without following a link planted since."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise NotServed(f"cannot read the file: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotServed("not a regular file")
        if info.st_size > limit:
            raise NotServed(f"the file is larger than {limit >> 20} MiB")
        return stream.read(limit + 1)[:limit]


class Thumbnails:
    """JPEG thumbnails (at most :data:`THUMBNAIL_SIDE` pixels a side), made on demand and kept
    up to ``max_bytes`` (least recently used first out)."""

    def __init__(self, decode: DecodeOptions = DecodeOptions(), max_bytes: int = 64 << 20,
                 max_file: int = 256 << 20):
        self.decode = decode
        self.max_bytes = max_bytes
        self.max_file = max_file
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._reading = threading.BoundedSemaphore(2)  # files held in memory at once: 2 x max_file at most

    def thumbnail(self, path: str) -> bytes:
        file, frame = split_frame(path)
        try:
            info = os.stat(file)
        except OSError as error:
            raise NotServed(f"cannot read the file: {error.strerror or error}") from None
        key = (path, info.st_size, info.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with self._reading:
            if frame is not None or is_video(file):
                image = self._frame(path)
            else:
                image = self._decode(_read(path, self.max_file), path, draft=2 * THUMBNAIL_SIDE)
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            data = _jpeg(image, quality=82)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = data
                self._size += len(data)
            while self._size > self.max_bytes and self._cache:
                self._size -= len(self._cache.popitem(last=False)[1])
        return data

    def full(self, path: str) -> tuple[bytes, str]:
        """The image as a browser can show it: the file itself in a format browsers read,
        else a JPEG of it. ``(bytes, media type)``."""
        from PIL import Image

        if is_video(split_frame(path)[0]):
            with self._reading:
                return _jpeg(self._frame(path), quality=90), "image/jpeg"
        with self._reading:
            data = _read(path, self.max_file)
            try:
                with Image.open(io.BytesIO(data)) as probe:
                    kind = BROWSER_TYPES.get(probe.format or "")
            except Exception:  # noqa: BLE001 (the decoder below says why)
                kind = None
            if kind is not None:
                return data, kind
            return _jpeg(self._decode(data, path), quality=90), "image/jpeg"

    def _frame(self, path: str):
        """A video's frame (``PATH#t=SECONDS``), decoded from the video file."""
        from ..errors import ItemError
        from ..items import local_item

        try:
            return read_image(local_item(path), self.decode)
        except ItemError as error:
            raise NotServed(str(error)) from None

    def _decode(self, data: bytes, path: str, draft: int | None = None):
        from dataclasses import replace

        from ..errors import ItemError

        options = replace(self.decode, draft_size=draft) if draft else self.decode
        try:  # Pillow's process-wide limits are the service's, set once (images.pillow_limits)
            return decode_image(io.BytesIO(data), options, name=path)  # a RAW is known by its extension too
        except ItemError as error:
            raise NotServed(str(error)) from None


def _jpeg(image, quality: int) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()
