"""Video files as frames: a video is scored as the frames it shows every few seconds.

A video named as an input (or found in a folder by its extension, :data:`VIDEO_EXTENSIONS`) becomes
one item per frame: the first frame, then one every ``interval`` seconds
(:data:`DEFAULT_INTERVAL`; 0: the first frame only), each named ``PATH#t=SECONDS`` (the Media
Fragments spelling, ``clip.mp4#t=12.5``), so a record, an index row or a search hit says where in
the video it is. Frames are read through PyAV (FFmpeg), which comes with
``pip install "clipcli[photos]"``; without it a video fails with a reason naming the extra.

Each frame is read on its own: the container is opened, seeked to a keyframe before the time,
and decoded up to the first frame at or after it (:func:`_frame_at`), so frames decode on the
pipeline's worker threads like images, and a video damaged halfway gives its frames up to the
damage and a reason for each one after. A video gives at most :data:`MAX_FRAMES` frames. The frame is shown upright (the display matrix's
rotation, as phones record portrait video) and converted to RGB; the pixel cap applies to the
video's size before anything is decoded.

Nothing is imported until a video is met.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .decoders import EXTRA, MISSING
from .errors import ItemError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# The decoding options are clipcli.images.DecodeOptions (not imported: images imports this module).
DecodeOptions = Any

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".3gp", ".mts", ".m2ts", ".mpg",
                              ".mpeg", ".wmv", ".ogv"})
DEFAULT_INTERVAL = 5.0
MAX_FRAMES = 10_000  # a video's frames read at most: 14 hours at the default interval
MARK = "#t="
# A creation time before this is a container's zero (QuickTime's 1904, Unix's 1970), not a date.
_NO_DATE_BEFORE = 86400.0
# Apple's creation date carries the local offset; the container's creation_time is UTC.
_CREATED = ("com.apple.quicktime.creationdate", "creation_time")
_MODEL = ("com.apple.quicktime.model", "model")
_MAKE = ("com.apple.quicktime.make", "make")
_LOCATION = ("com.apple.quicktime.location.ISO6709", "location")


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says: ``duration`` in seconds (None: unknown), the size as shown
    (rotation applied), ``created`` in Unix seconds UTC, the camera, whether it has a location."""

    duration: float | None
    width: int
    height: int
    created: float | None = None
    camera: str | None = None
    gps: bool = False


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def seconds_text(t: float) -> str:
    """``5``, ``2.5``, ``0.125``: a frame's time as names carry it (milliseconds at most)."""
    return f"{t:.3f}".rstrip("0").rstrip(".")


def frame_name(name: str, t: float) -> str:
    return f"{name}{MARK}{seconds_text(t)}"


def split_frame(name: str) -> tuple[str, float | None]:
    """``("clip.mp4", 12.5)`` for ``clip.mp4#t=12.5``; ``(name, None)`` for anything else (a
    file whose own name holds ``#t=`` without being a video's frame stays what it is)."""
    head, mark, tail = name.rpartition(MARK)
    if not mark or not is_video(head):
        return name, None
    try:
        t = float(tail)
    except ValueError:
        return name, None
    return (head, t) if math.isfinite(t) and t >= 0 else (name, None)


def file_of(path: bytes) -> bytes:
    """The file a path as an index stores it names: a frame's video, else the path itself."""
    return os.fsencode(split_frame(os.fsdecode(path))[0])


def check_interval(interval: float) -> None:
    """0 (the first frame only) or at least a millisecond (names carry milliseconds)."""
    from .errors import InputError

    if not (isinstance(interval, (int, float)) and math.isfinite(interval) and (interval == 0 or interval >= 1e-3)):
        raise InputError(f"{interval}: give the seconds between frames, 0.001 or more (or 0: the first frame only)",
                         option="video_interval")


def frame_times(duration: float | None, interval: float) -> list[float]:
    """The times read: 0, then every ``interval`` seconds before ``duration`` (only 0 when either
    is unknown or 0); :class:`ItemError` past :data:`MAX_FRAMES` (a duration a hostile header
    claims, or an interval too small for the video)."""
    if not interval or not duration or duration <= 0:
        return [0.0]
    count = math.ceil(round(duration / interval, 6))
    if count > MAX_FRAMES:
        raise ItemError(f"{count} frames ({seconds_text(duration)} s of video, one every {seconds_text(interval)} s) "
                        f"are over the limit of {MAX_FRAMES} a video", fix="video_interval")
    return [float(round(i * interval, 3)) for i in range(max(1, count))]


def load_av():
    try:
        import av
    except (ImportError, OSError):
        raise ItemError(f"unsupported format: video (needs PyAV: {EXTRA})", fix=MISSING) from None
    return av


def _text(error: BaseException) -> str:
    return (str(error) or type(error).__name__).strip().splitlines()[0]


def _open(path: str):
    av = load_av()
    try:
        container = av.open(os.fspath(path), mode="r", metadata_errors="replace")
    except av.FFmpegError as error:
        raise ItemError(f"cannot open video: {_text(error)}") from None
    if not container.streams.video:
        container.close()
        raise ItemError("no video stream in this file")
    if container.streams.video[0].codec_context is None:
        codec = getattr(container.streams.video[0], "codec_tag", "") or "unknown"
        container.close()
        raise ItemError(f"cannot decode video: FFmpeg has no decoder for its codec ({codec!r})")
    return av, container


def _created(metadata: dict) -> float | None:
    for key in _CREATED:
        text = metadata.get(key)
        if not text:
            continue
        try:
            moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        seconds = moment.timestamp()
        if seconds > _NO_DATE_BEFORE:
            return seconds
    return None


def _first(metadata: dict, keys: tuple[str, ...]) -> str | None:
    return next((metadata[key].strip() for key in keys if (metadata.get(key) or "").strip()), None)


def _first_frame(container, stream):
    """The first decoded frame (None for a stream that decodes to nothing)."""
    return next(iter(container.decode(stream)), None)


def probe(path: str, rotation: bool = True) -> VideoInfo:
    """What ``path``'s container says, and (with ``rotation``) its first frame's rotation, which
    only a decoded frame tells (the size as shown); :class:`ItemError` when it is no video we
    can read."""
    av, container = _open(path)
    try:
        with container:
            stream = container.streams.video[0]
            metadata = {**stream.metadata, **container.metadata}
            duration = None
            if stream.duration is not None and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            width, height = stream.codec_context.width, stream.codec_context.height
            first = _first_frame(container, stream) if rotation else None
            rotation = int(round(getattr(first, "rotation", 0) or 0)) if first is not None else 0
    except ItemError:
        raise
    except Exception as error:  # noqa: BLE001 - a hostile container is one failed item, never a crash
        raise ItemError(f"cannot read video ({type(error).__name__}): {_text(error)}") from None
    make, model = _first(metadata, _MAKE), _first(metadata, _MODEL)
    camera = model if model and make and model.lower().startswith(make.lower()) else " ".join(filter(None, (make, model)))
    if rotation in (90, -90, 270, -270):
        width, height = height, width
    return VideoInfo(duration if duration and math.isfinite(duration) else None, width, height,
                     _created(metadata), camera[:200] or None, bool(_first(metadata, _LOCATION)))


def _upright(image: "Image.Image", degrees: float) -> "Image.Image":
    from PIL import Image

    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180,
            -90: Image.Transpose.ROTATE_270, 270: Image.Transpose.ROTATE_270}.get(int(round(degrees or 0)))
    return image.transpose(turn) if turn is not None else image


def _frame_at(container, stream, t: float):
    """The first frame at or after ``t`` seconds from the stream's start, else the last one when
    ``t`` is within a frame and a half of the end; :class:`ItemError` otherwise.

    A seek lands on the keyframe at or before its target where the container has an index (MP4,
    MKV, WebM); MPEG-TS and -PS have none and may land after it: then the seek is made again from
    10 s earlier, then from the start, and frames are decoded forward to the time."""
    base = stream.time_base
    start = stream.start_time or 0  # in the stream's time base: 0.2 s or more in TS files
    offset = float(start * base)
    span = float(1 / stream.average_rate) if stream.average_rate else 0.1  # one frame's time
    last = None
    for target in dict.fromkeys((t, max(0.0, t - 10.0), 0.0)):
        if target > 0:
            container.seek(start + int(target / base), stream=stream, backward=True, any_frame=False)
        elif t > 0:  # the file's beginning (a seek to the stream's start lands after it in TS)
            container.seek(0)
        last, overshot = None, False
        for frame in container.decode(stream):
            when = None if frame.time is None else frame.time - offset
            if last is None and when is not None and when > t + 1.5 * span and target > 0:
                overshot = True  # landed after the time: seek from earlier
                break
            last = frame
            if when is None or when >= t - 1e-3:
                return frame
        if not overshot:
            break  # the stream ended before the time
    end = None if last is None or last.time is None else last.time - offset
    if end is not None and t - end <= 1.5 * span:
        return last
    ends = "" if end is None else f" (it ends at {seconds_text(end)} s)"
    raise ItemError(f"no video frame at {seconds_text(t)} s: the stream ends before it{ends}")


def read_frame(path: str, t: float, options: "DecodeOptions") -> "Image.Image":
    """The frame shown at ``t`` seconds (see :func:`_frame_at`), upright and RGB;
    :class:`ItemError` with the reason otherwise."""
    av, container = _open(path)
    try:
        with container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > options.max_pixels:
                raise ItemError(f"image too large: {width}x{height} = {width * height} pixels exceeds the limit "
                                f"of {options.max_pixels}", fix="max_pixels")
            stream.thread_type = "SLICE"  # the pipeline runs several frames at once already
            frame = _frame_at(container, stream, t)
            return _upright(frame.to_image(), getattr(frame, "rotation", 0))  # RGB
    except ItemError:
        raise
    except av.FFmpegError as error:
        raise ItemError(f"cannot decode video frame at {seconds_text(t)} s: {_text(error)}") from None
    except Exception as error:  # noqa: BLE001 - a hostile stream is one failed item, never a crash
        raise ItemError(f"cannot decode video frame at {seconds_text(t)} s ({type(error).__name__}): "
                        f"{_text(error)}") from None
