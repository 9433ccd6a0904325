"""What a photo says about itself: its size, when it was taken, the camera, whether it has GPS.

Read from the header and the EXIF block only (no pixel is decoded), when ``clipcli index``
hashes a file. The capture time is, in order of trust:

- ``exif``: EXIF DateTimeOriginal (else DateTimeDigitized, else DateTime) with its
  OffsetTimeOriginal (EXIF 2.31): an exact moment;
- ``exif-local``: the same without an offset (most cameras before 2018): the camera's clock
  as it read, stored as if it were UTC, so a date filter means the calendar day the camera
  showed, wherever it was;
- ``video``: a video's creation time from its container (Apple's creation date with its
  offset, else the UTC ``creation_time``); a frame's is the video's plus its own time;
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
    taken_source: str | None = None  # "exif", "exif-local", "video" or "mtime"
    camera: str | None = None
    gps: bool | None = None

    def row(self) -> tuple:
        """The values of the index's columns (width, height, taken, taken_source, camera, gps)."""
        return (self.width, self.height, self.taken, self.taken_source, self.camera,
                None if self.gps is None else int(self.gps))


# Times outside these years are a broken clock or a hostile file: not dates anyone filters by.
_EARLIEST, _LATEST = -5364662400.0, 7258118400.0  # 1800-01-01, 2200-01-01 (UTC)


def _plausible(seconds: float | None) -> float | None:
    return seconds if seconds is not None and _EARLIEST <= seconds < _LATEST else None


def exif_time(text: object, offset: object = None) -> tuple[float, str] | None:
    """An EXIF date (``2024:06:01 14:30:00``) and offset (``+02:00``) as ``(Unix seconds, source)``;
    None for a date that is not one (``0000:00:00``, year 9999); an offset that is not one
    (``+99:99``) is ignored."""
    if not isinstance(text, str) or not (found := _DATE.match(text)):
        return None
    try:
        moment = dt.datetime(*map(int, found.groups()), tzinfo=dt.timezone.utc)
    except ValueError:  # 0000:00:00 00:00:00, as cameras without a clock write
        return None
    zone = _OFFSET.match(offset) if isinstance(offset, str) else None
    if zone is None or int(zone[2]) > 14 or int(zone[3]) > 59:
        seconds, source = moment.timestamp(), "exif-local"
    else:
        minutes = (int(zone[2]) * 60 + int(zone[3])) * (1 if zone[1] == "+" else -1)
        seconds, source = moment.timestamp() - 60 * minutes, "exif"
    return (seconds, source) if _plausible(seconds) is not None else None


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
    """The file's :class:`Metadata`; ``mtime_ns`` (from the walk) dates a file without EXIF.
    Opened as decoding opens it (the same formats; HEIF and AVIF through their openers; a
    camera RAW through its embedded preview, whose EXIF the camera wrote)."""
    mtime = _plausible(mtime_ns / 1e9) if mtime_ns is not None else None
    fallback = Metadata(taken=mtime, taken_source="mtime" if mtime is not None else None)
    try:
        with open(path, "rb") as stream:
            head = stream.read(64)
        if _is_video(os.fspath(path)):
            return _video_metadata(os.fspath(path), fallback)
        if os.path.splitext(os.fspath(path))[1].lower() in _raw_extensions() or _kind(head) == "RAW":
            return _raw_metadata(path, fallback)
        return _exif_metadata(_open(path, head), fallback)
    except Exception:  # noqa: BLE001 (not an image, a malformed header, a missing decoder: a date at least)
        return fallback


def _is_video(path: str) -> bool:
    from .video import is_video

    return is_video(path)


def _video_metadata(path: str, fallback: Metadata) -> Metadata:
    from .video import probe

    info = probe(path)
    created = _plausible(info.created)
    return Metadata(info.width, info.height, created if created is not None else fallback.taken,
                    "video" if created is not None else fallback.taken_source, info.camera, info.gps)


def _raw_extensions() -> frozenset[str]:
    from .items import RAW_EXTENSIONS

    return RAW_EXTENSIONS


def _kind(head: bytes) -> str | None:
    from .decoders import sniff

    return sniff(head)


def _open(path: str | os.PathLike, head: bytes):
    """``Image.open`` restricted to the formats decoding opens."""
    from PIL import Image

    from .decoders import avif_opener, heif_opener
    from .images import PILLOW_FORMATS

    kind = _kind(head)
    if kind == "HEIF":
        heif_opener()
    elif kind == "AVIF":
        avif_opener()
    return Image.open(path, formats=[*PILLOW_FORMATS, *([kind] if kind in ("HEIF", "AVIF") else [])])


def _exif_metadata(image, fallback: Metadata, size: tuple[int, int] | None = None) -> Metadata:
    """What ``image``'s header and EXIF say (``size``: the picture's own, as stored, when the
    image is only its preview)."""
    with image:
        width, height = size or image.size
        exif = image.getexif()
        orientation = exif.get(_ORIENTATION)
        details = exif.get_ifd(_EXIF_IFD)
        gps = bool(exif.get_ifd(_GPS_IFD))
        taken = None
        for tag in (_ORIGINAL, _DIGITIZED, _CHANGED):
            where = exif if tag == _CHANGED else details
            taken = exif_time(where.get(tag), details.get(_OFFSETS[tag]))
            if taken is not None:
                break
        camera = _camera(exif)
    if orientation in (5, 6, 7, 8) and size is None:
        width, height = height, width
    taken_at, source = taken or (fallback.taken, fallback.taken_source)
    return Metadata(width, height, taken_at, source, camera, gps)


def _raw_metadata(path: str | os.PathLike, fallback: Metadata) -> Metadata:
    """A camera RAW: its size from LibRaw (as shown: its flip applied), the rest from the EXIF
    of its embedded JPEG preview."""
    import io

    from PIL import Image

    from .decoders import load_rawpy

    rawpy = load_rawpy()
    with rawpy.imread(os.fspath(path)) as raw:
        sizes = raw.sizes
        size = (sizes.height, sizes.width) if sizes.flip in (5, 6) else (sizes.width, sizes.height)
        try:
            thumb = raw.extract_thumb()
        except Exception:  # noqa: BLE001 (no preview: the size alone)
            thumb = None
    if thumb is None or thumb.format != rawpy.ThumbFormat.JPEG:
        return Metadata(size[0], size[1], fallback.taken, fallback.taken_source)
    return _exif_metadata(Image.open(io.BytesIO(thumb.data), formats=["JPEG"]), fallback, size)


def iso(seconds: float | None, source: str | None = None) -> str | None:
    """Unix seconds as ISO 8601, as the records show them: in UTC (``2024-06-01T12:30:00Z``), or
    for ``exif-local`` the camera's clock with no zone (``2024-06-01T14:30:00``)."""
    try:
        moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc) if seconds is not None else None
    except (ValueError, OverflowError, OSError):  # a time no calendar holds (a hostile row)
        return None
    if moment is None:
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%S" + ("" if source == "exif-local" else "Z"))


def parse_when(text: str, option: str | None = None) -> float:
    """A date (``2024-06-01``: the start of that day, UTC) or a date and time (``2024-06-01T14:30``,
    UTC unless it says ``+02:00`` or ``Z``) as Unix seconds; :class:`InputError` naming
    ``option`` otherwise."""
    from .errors import InputError

    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{text[:40]!r}: give a date (2024-06-01) or a date and time (2024-06-01T14:30, UTC "
                         "unless it says +02:00)", option=option) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()
