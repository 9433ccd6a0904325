"""A video in the index: a row of its own and one row per frame read (:mod:`clipcli.indexing`).

The video's row holds its content sha256, its metadata and the ``interval`` its frames were read
at; each frame's row is keyed ``PATH#t=SECONDS`` (:mod:`clipcli.video`) and holds the content
``SHA256#t=SECONDS``, so a copy of a video reuses its frames' vectors. A video is up to date when
its row holds the interval asked for (or, when none is asked, any) and every frame has a row
with a vector or a failure. When it is read again, the frames kept keep their rows (updated in
place, their dates with them), those no longer read are removed, and the video's own row is
written last: a run killed part-way through a video reads it again next time.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

from .decoders import MISSING
from .errors import ItemError
from .video import MARK, frame_name, frame_times, probe, seconds_text, split_frame

FRAME_COLUMNS = "path, size, mtime_ns, sha256, error, taken"


def frame_range(key: bytes) -> tuple[bytes, bytes]:
    """Keys from ``PATH#t=`` to ``PATH#t>`` (">" is the byte after "="): a superset of the frames."""
    mark = MARK.encode()
    return key + mark, key + mark[:-1] + b">"


def frame_rows(db, key: bytes) -> list[tuple]:
    """The rows (``FRAME_COLUMNS``) of the frames of the video ``key``; a file named like one
    (``clip.mp4#t=5.jpg``, a folder ``clip.mp4#t=old/``) is no frame of it."""
    video = os.fsdecode(key)
    rows = db.execute(f"SELECT {FRAME_COLUMNS} FROM files WHERE path >= ? AND path < ?", frame_range(key)).fetchall()
    return [row for row in rows if (found := split_frame(os.fsdecode(row[0])))[0] == video and found[1] is not None]


def frames_done(frames: list[tuple], have: set[str]) -> bool:
    """Whether every frame row holds a vector of the model (its content in ``have``) or a failure."""
    return bool(frames) and all(error is not None or sha in have for _, _, _, sha, error, _ in frames)


def with_frames(scans: list, interval_of: Callable, read_meta: Callable, videos: list, dropped: list) -> list:
    """``scans`` with each video that opens in place of its frames' scans, keyed and named
    ``PATH#t=SECONDS``, their content ``SHA256#t=SECONDS``, ``old`` their own row before this run,
    their capture time the video's plus their own. A video that does not open keeps its scan,
    with the reason. The videos read are appended to ``videos`` (each with its ``interval``),
    and the rows of frames no longer read to ``dropped``."""
    out = []
    for scan in scans:
        if not scan.video or scan.error is not None:
            out.append(scan)
            continue
        if scan.meta is None:  # not hashed again (another model, another interval): its dates all the same
            scan.meta = read_meta(scan)
        scan.interval = interval_of(scan)
        try:
            times = frame_times(probe(scan.file, rotation=False).duration, scan.interval)
        except ItemError as error:
            scan.error = error.reason
            if error.fix not in (MISSING, "video_interval"):  # the file at fault: its frames go with it
                dropped += scan.frames
            out.append(scan)
            continue
        videos.append(scan)
        olds = {row[0]: row[1:] for row in scan.frames}
        keys = set()
        for t in times:
            text, meta = seconds_text(t), scan.meta
            if meta is not None and meta.taken is not None and meta.taken_source == "video":
                meta = replace(meta, taken=meta.taken + t)
            key = scan.key + (MARK + text).encode()
            keys.add(key)
            out.append(replace(scan, key=key, name=frame_name(scan.name, t), sha256=f"{scan.sha256}{MARK}{text}",
                               old=olds.get(key), meta=meta, video=False, frames=[], frame=t, source=scan.key))
        dropped += [row for row in scan.frames if row[0] not in keys]
    return out
