"""What a photo says about itself: its size, when it was taken, the camera, whether it has GPS.

Read from the header and the EXIF block only (no pixel is decoded), when ``clipcli index``
hashes a file. The capture time is, in order of trust:

- ``exif``: EXIF DateTimeOriginal (else DateTimeDigitized, else DateTime) with its
  OffsetTimeOriginal (EXIF 2.31): an exact moment;
- ``exif-local``: the same without an offset (most cameras before 2018): the camera's clock
  as it read, stored as if it were UTC, so a date filter means the calendar day the camera
  showed, wherever it was;
- ``mtime``: the file's modification time, when the file has no usable EXIF date.

Width and height are the image as shown (EXIF orientation 5 to 8 swaps them). Nothing here
raises on a malformed file: what cannot be read is None.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass

_DATE = re.compile(r"^\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")
# EXIF tags (Pillow's ExifTags.Base values)
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_ORIGINAL, _DIGITIZED, _CHANGED = 0x9003, 0x9004, 0x0132
_OFFSETS = {0x9003: 0x9011, 0x9004: 0x9012, 0x0132: 0x9010}  # each date's own offset tag
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112


@dataclass(frozen=True)
class Metadata:
    width: int | None = None
    height: int | None = None
    taken: float | None = None  # Unix seconds, UTC
    taken_source: str | None = None  # "exif", "exif-local" or "mtime"
    camera: str | None = None
    gps: bool | None = None

    def row(self) -> tuple:
        """The values of the index's columns (width, height, taken, taken_source, camera, gps)."""
        return (self.width, self.height, self.taken, self.taken_source, self.camera,
                None if self.gps is None else int(self.gps))


def exif_time(text: object, offset: object = None) -> tuple[float, str] | None:
    """An EXIF date (``2024:06:01 14:30:00``) and offset (``+02:00``) as ``(Unix seconds, source)``."""
    if not isinstance(text, str) or not (found := _DATE.match(text)):
        return None
    try:
        moment = dt.datetime(*map(int, found.groups()), tzinfo=dt.timezone.utc)
    except ValueError:  # 0000:00:00 00:00:00, as cameras without a clock write
        return None
    zone = _OFFSET.match(offset) if isinstance(offset, str) else None
    if zone is None:
        return moment.timestamp(), "exif-local"
    minutes = (int(zone[2]) * 60 + int(zone[3])) * (1 if zone[1] == "+" else -1)
    return moment.timestamp() - 60 * minutes, "exif"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def _camera(exif) -> str | None:
    make, model = _text(exif.get(_MAKE)), _text(exif.get(_MODEL))
    if make and model and model.lower().startswith(make.split()[0].lower()):
        return model[:200]  # "Canon" + "Canon EOS R5": the model says it
    return " ".join(filter(None, (make, model)))[:200] or None


def read_metadata(path: str | os.PathLike, mtime_ns: int | None = None) -> Metadata:
    """The file's :class:`Metadata`; ``mtime_ns`` (from the walk) dates a file without EXIF."""
    import warnings

    from PIL import Image

    fallback = (mtime_ns / 1e9, "mtime") if mtime_ns is not None else (None, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a large or odd header is decoded elsewhere, not here
            with Image.open(path) as image:
                width, height = image.size
                exif = image.getexif()
                orientation = exif.get(_ORIENTATION)
                details = exif.get_ifd(_EXIF_IFD)
                gps = bool(exif.get_ifd(_GPS_IFD))
    except Exception:  # noqa: BLE001 (not an image Pillow opens, or a malformed header: a date at least)
        return Metadata(taken=fallback[0], taken_source=fallback[1])
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    taken = None
    for tag in (_ORIGINAL, _DIGITIZED, _CHANGED):
        where = exif if tag == _CHANGED else details
        taken = exif_time(where.get(tag), details.get(_OFFSETS[tag]))
        if taken is not None:
            break
    taken_at, source = taken or fallback
    return Metadata(width, height, taken_at, source, _camera(exif), gps)


def iso(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC (``2024-06-01T12:30:00Z``), as the records show them."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_when(text: str) -> float:
    """A date (``2024-06-01``: the start of that day, UTC) or a date and time (``2024-06-01T14:30``,
    UTC unless it says ``+02:00`` or ``Z``) as Unix seconds. Raises ValueError."""
    moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()
