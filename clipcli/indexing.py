"""Bringing an index up to date: walk, compare, hash, reuse, embed, remove.

:func:`update` walks the inputs and compares each file's size and modification time with
its row. A new or changed file is hashed (on 4 threads; an unchanged one keeps its stored
hash), and a file whose content the model already has a vector of (a rename, a move, a
copy) reuses it. The model is loaded only when some content is new, and each batch of new
vectors is committed in its own transaction with its files' rows: a killed run loses at
most the batch in flight. Rows of files gone from an indexed folder are removed last, with
the vectors no file refers to any more. Nothing is removed under a folder that could not
be read, and a file that changed while it was embedded is left for the next run.

A video is a row of its own and one row per frame read (:mod:`clipcli.index_videos`).
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from .decoders import MISSING
from .errors import InputError
from .index import NEXT_GENERATION, Index, key_range, path_key
from .index_videos import FRAME_COLUMNS, frame_rows, frames_done, with_frames
from .items import VIDEO_INTERVAL
from .video import is_video

if TYPE_CHECKING:  # pragma: no cover
    from .metadata import Metadata
    from .pipeline import LoadedModel


METADATA_UPDATE = ("UPDATE files SET width = ?, height = ?, taken = ?, taken_source = ?, camera = ?, gps = ? "
                   "WHERE path = ?")


@dataclass
class Summary:
    """What an update did, by file."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    embedded: int = 0  # files the model ran on (the others reused a vector)
    paired: int = 0  # camera RAW files left out beside their JPEG (or HEIC, PNG, ...) of the same name
    model_loaded: bool = False
    seconds: float = 0.0

    def as_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Scan:
    """A file found by the walk: its key, stat and, once hashed, content sha256."""

    key: bytes
    name: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    error: str | None = None
    unreadable: bool = False  # a read error: reported, never stored (a fixed permission changes no mtime)
    old: tuple | None = field(default=None, repr=False)  # its row before: (size, mtime_ns, sha256, error, taken[, interval])
    meta: "Metadata | None" = None  # read with the hash (clipcli.metadata)
    video: bool = False
    frames: list = field(default_factory=list, repr=False)  # a video's frame rows before this run (FRAME_COLUMNS)
    frame: float | None = None  # a video frame's time; ``source`` is then its video's key
    source: bytes | None = None
    interval: float | None = None  # a video's: the seconds between the frames read

    @property
    def same_file(self) -> bool:
        return self.old is not None and (self.old[0], self.old[1]) == (self.size, self.mtime_ns)

    @property
    def file(self) -> str:
        """The file on disk (a frame's video)."""
        return os.fsdecode(self.source or self.key)

    def done(self, have: set[str], interval: float | None) -> bool:
        """Whether its row holds what this run would store: a failure, a vector of the model, or
        (a video) its frames at ``interval`` (None: any), each a failure or a vector."""
        if self.old[3] is not None:
            return True
        if self.video:
            return (interval is None or self.old[5] == interval) and self.old[5] is not None and frames_done(self.frames, have)
        return self.old[2] in have


@dataclass
class _Run:
    """One update's state: where it writes, how it reaches the model, what it counted."""

    index: Index
    key: str
    load: Callable[[], "LoadedModel"]
    embed: Callable[["LoadedModel", list], Iterator] | None
    report: Callable[[str, str | None], None]
    summary: Summary
    batch_size: int | None = None  # files per commit (None: the device's default batch)
    video_interval: float | None = None  # None: as each video was read, else VIDEO_INTERVAL
    model: int | None = None
    loaded: "LoadedModel | None" = None
    stale: set = field(default_factory=set)  # content sha256s some row stopped pointing to
    videos: list = field(default_factory=list)  # the videos read this run: their rows go in once their frames are
    left_out: set = field(default_factory=set)  # videos with a frame not stored this run: their rows wait

    def interval_of(self, scan: _Scan) -> float:
        """The seconds between a video's frames: as asked, else as it was read before, else the default."""
        if self.video_interval is not None:
            return self.video_interval
        stored = scan.old[5] if scan.old is not None and len(scan.old) > 5 else None
        return VIDEO_INTERVAL if stored is None else stored

    def count(self, kind: str, scan: _Scan) -> None:
        setattr(self.summary, kind, getattr(self.summary, kind) + 1)
        self.report(scan.name, scan.error if kind == "failed" else None)


def update(index: Index, inputs: Sequence[str], key: str, load: Callable[[], "LoadedModel"], *,
           embed: Callable[["LoadedModel", list], Iterator] | None = None, batch_size: int | None = None,
           on_result: Callable[[str, str | None], None] | None = None, raw_pairs: bool = True,
           video_interval: float | None = None) -> Summary:
    """Bring the rows of ``inputs`` (folders, list files, files) up to date for the model
    whose :func:`~clipcli.loading.source_key` is ``key``. ``load()`` is called only if an
    image must be embedded; ``embed(loaded, items)`` yields one
    :class:`~clipcli.batching.Embedding` per item (default: :func:`embed_images`); rows are
    committed every ``batch_size`` files (None: the device's default batch). With ``raw_pairs``,
    a camera RAW file beside a developed twin of the same name is left out
    (:func:`clipcli.items.raw_pairs`; counted as ``paired``). A video is read as a frame every
    ``video_interval`` seconds (None: as it was read before, else every
    :data:`~clipcli.items.VIDEO_INTERVAL`; each frame counts as a file). SQLite's errors leave
    as the index's one-line errors (:meth:`Index.guard`)."""
    from .video import check_interval

    if video_interval is not None:
        check_interval(video_interval)
    with index.guard():
        return _update(index, inputs, key, load, embed, batch_size, on_result, raw_pairs, video_interval)


def _update(index: Index, inputs: Sequence[str], key: str, load: Callable[[], "LoadedModel"],
            embed: Callable[["LoadedModel", list], Iterator] | None, batch_size: int | None,
            on_result: Callable[[str, str | None], None] | None, pair_raws: bool = True,
            video_interval: float | None = None) -> Summary:
    from .fsutil import named

    for arg in inputs:  # before anything: rows under a folder an empty path seemed to name would go
        named(arg, "a path to index")
    run = _Run(index, key, load, embed, on_result or (lambda name, error: None), Summary(), batch_size=batch_size,
               video_interval=video_interval)
    started = time.monotonic()
    if index.readonly:
        index._write()  # raises: say so before walking a tree
    items, roots = _expand(index, inputs)
    if pair_raws:
        from .items import raw_pairs

        items, paired = raw_pairs(items)
        run.summary.paired = len(paired)
    scans, failures, unreadable = _scan(items)
    for name, error in failures:
        run.summary.failed += 1
        run.report(name, error)
    under = _attach_rows(index, scans, roots)
    run.model = index.model_id(key=key)
    have = _shas(index, run.model)
    todo, undated = [], []
    for scan in scans:
        if scan.same_file and scan.done(have, run.video_interval):
            run.summary.unchanged += len(scan.frames) if scan.video and scan.old[3] is None else 1
            if scan.old[4] is None and scan.old[3] is None and not scan.video:  # indexed before dates were kept
                undated.append(scan)
        else:
            todo.append(scan)
    if undated:
        _date(index, undated)
    seen = {scan.key for scan in scans} | {row[0] for scan in scans for row in scan.frames}
    kept = [key_range(folder)[0] for folder in unreadable]
    gone = [(path, row[2], row[3]) for path, row in under.items()
            if path not in seen and not any(path.startswith(low) for low in kept)]
    if todo:
        _hash([scan for scan in todo if not scan.same_file or scan.old[2] is None])
        for scan in todo:
            scan.sha256 = scan.sha256 or scan.old[2]  # same file, no vector of this model yet: hash known
        _apply(run, todo, gone, have)
    if gone:
        with index._write():
            index.db.executemany("DELETE FROM files WHERE path = ?", [(path,) for path, _, _ in gone])
            _collect_garbage(index, run.stale | {sha for _, sha, _ in gone if sha})
        # a video's own row is no image (its frames are counted), unless it failed whole
        run.summary.removed += sum(1 for path, _, error in gone if error is not None or not is_video(os.fsdecode(path)))
    elif run.stale:
        with index._write():
            _collect_garbage(index, run.stale)
    run.summary.seconds = time.monotonic() - started
    return run.summary


def _expand(index: Index, inputs: Sequence[str]) -> tuple[list, list[bytes]]:
    """The items of ``inputs`` and the folders whose rows they cover. An emptied folder
    covers its rows (they are removed); so does a folder that is gone while its parent is
    there and the index holds rows under it. Any other missing input is an error."""
    from .items import EMPTY_FOLDER, expand_inputs

    items, roots = [], []
    for arg in inputs:
        if os.path.isdir(arg):
            roots.append(path_key(arg))
        elif not os.path.lexists(arg) and os.path.isdir(os.path.dirname(os.path.abspath(arg))):
            low, high = key_range(path_key(arg))
            if index.db.execute("SELECT 1 FROM files WHERE path >= ? AND path < ? LIMIT 1", (low, high)).fetchone():
                roots.append(path_key(arg))
                continue
        try:
            items += [item for item in expand_inputs([arg], video_interval=None) if item.error != EMPTY_FOLDER]
        except InputError:
            if not os.path.isdir(arg):
                raise
    return items, roots


def _scan(items) -> tuple[list[_Scan], list[tuple[str, str]], list[bytes]]:
    """Files to compare, ``(name, reason)`` of inputs that cannot be, and folders that could not be read."""
    scans, failures, unreadable, seen = [], [], [], set()
    for item in items:
        if item.url is not None:
            failures.append((item.name, "the index holds local files; download it first"))
            continue
        if item.error is not None:
            failures.append((item.name, item.error))
            if item.path is None and os.path.isdir(item.name):  # its files are unknown, not gone
                unreadable.append(path_key(item.name))
            continue
        key = path_key(item.path)
        if key in seen:
            continue
        seen.add(key)
        try:
            st = os.stat(item.path)
        except OSError as error:
            failures.append((item.name, f"cannot read it: {error.strerror or error}"))
            continue
        if not stat.S_ISREG(st.st_mode):
            failures.append((item.name, "not a regular file"))
            continue
        scans.append(_Scan(key, item.name, st.st_size, st.st_mtime_ns, video=is_video(item.path)))
    return scans, failures, unreadable


def _attach_rows(index: Index, scans: list[_Scan], roots: list[bytes]) -> dict[bytes, tuple]:
    """Each scan's row before this run: one range query per indexed folder, then one
    query per file outside them (files and list entries named on their own). Returns
    the rows under the folders."""
    rows: dict[bytes, tuple] = {}
    lows = [key_range(root)[0] for root in roots]
    for low, high in map(key_range, roots):
        rows.update((r[0], r[1:]) for r in index.db.execute(
            f"SELECT {FRAME_COLUMNS}, interval FROM files WHERE path >= ? AND path < ?", (low, high)))
    for scan in scans:
        scan.old = rows.get(scan.key)
        if scan.old is None and not any(scan.key.startswith(low) for low in lows):
            row = index.db.execute(f"SELECT {FRAME_COLUMNS}, interval FROM files WHERE path = ?",
                                   (scan.key,)).fetchone()
            scan.old = tuple(row[1:]) if row else None
        if scan.video:
            scan.frames = frame_rows(index.db, scan.key)
    return rows


def _shas(index: Index, model: int | None) -> set[str]:
    if model is None:
        return set()
    return {row[0] for row in index.db.execute("SELECT sha256 FROM vectors WHERE model_id = ?", (model,))}


def _hash(scans: list[_Scan]) -> None:
    """Each file's content sha256 and its :class:`~clipcli.metadata.Metadata` (header and EXIF only)."""
    from concurrent.futures import ThreadPoolExecutor

    from .fsutil import sha256_file
    from .metadata import read_metadata

    def one(scan: _Scan) -> None:
        try:
            scan.sha256 = sha256_file(Path(os.fsdecode(scan.key)))
        except OSError as error:
            scan.error, scan.unreadable = f"cannot read it: {error.strerror or error}", True
            return
        scan.meta = read_metadata(os.fsdecode(scan.key), scan.mtime_ns)

    with ThreadPoolExecutor(4) as pool:  # hashlib releases the interpreter lock on large buffers
        list(pool.map(one, scans))


def _date(index: Index, scans: list[_Scan]) -> None:
    """Read the metadata of rows indexed before it was kept, without touching their vectors."""
    from concurrent.futures import ThreadPoolExecutor

    from .metadata import read_metadata

    with ThreadPoolExecutor(4) as pool:
        for start in range(0, len(scans), 1000):  # committed as it goes: an interrupted run keeps what it read
            chunk = scans[start : start + 1000]
            metas = list(pool.map(lambda scan: read_metadata(os.fsdecode(scan.key), scan.mtime_ns), chunk))
            with index._write():
                index.db.executemany(METADATA_UPDATE, [(*meta.row(), scan.key) for scan, meta in zip(chunk, metas)])


def _apply(run: _Run, todo: list[_Scan], gone: list[tuple], have: set[str]) -> None:
    """Store what needs no model (reused vectors, failures), then embed the new content."""
    from .metadata import read_metadata

    moved_from = Counter(sha for _, sha, _ in gone if sha)  # content that left a path this run
    videos, dropped = [s for s in todo if s.video and s.error is None], []
    todo = with_frames(todo, run.interval_of, lambda scan: read_metadata(scan.file, scan.mtime_ns), run.videos,
                       dropped)
    failed = [s for s in todo if s.error is not None]
    for scan in failed:
        run.count("failed", scan)
    ready = [s for s in todo if s.error is None]
    if any(s.sha256 not in have for s in ready):
        run.loaded = loaded = run.load()
        loaded.disable_packing()
        run.summary.model_loaded = True
        # registered also when the key is new but the identity is not
        run.model = run.index._register(run.key, loaded.identity, loaded.name, loaded.embed_dim)
        have = _shas(run.index, run.model)
    reuse = [s for s in ready if s.sha256 in have]
    for scan in reuse:
        if scan.old and scan.old[2] == scan.sha256 and scan.old[3] is None:
            kind = "unchanged"  # touched, same content; or a vector of this model made meanwhile
        elif scan.old is None and moved_from[scan.sha256] > 0:
            kind = "moved"
            moved_from[scan.sha256] -= 1
            run.summary.removed -= 1  # a move is not also a removal
        else:
            kind = "updated" if scan.old else "added"
        run.count(kind, scan)
    broken = [s for s in videos if s.error is not None and getattr(s.error, "fix", None) not in (MISSING, "video_interval")]
    with run.index._write():  # read errors are not stored: the old row stays until the file can be read
        run.index.db.executemany("DELETE FROM files WHERE path = ?", [(row[0],) for row in dropped])
        # a video being read looks changed until its own row is written (last): a killed run reads it again
        run.index.db.executemany("UPDATE files SET size = -1 WHERE path = ?", [(video.key,) for video in run.videos])
        run.summary.removed += len(dropped)  # frames no longer read: another interval, a shorter or broken video
        _put_files(run, reuse + broken)
        _collect_garbage(run.index, {row[3] for row in dropped if row[3]})
    fresh: dict[str, list[_Scan]] = {}  # content sha -> the files holding it
    for scan in ready:
        if scan.sha256 not in have:
            fresh.setdefault(scan.sha256, []).append(scan)
    if fresh:
        _embed(run, fresh)
    if run.videos:
        with run.index._write():
            _put_files(run, [video for video in run.videos if video.key not in run.left_out])


def _changed(scan: _Scan) -> bool:
    """Whether the file is no longer what was hashed (its vector would be stored under the old content)."""
    try:
        st = os.stat(scan.file)
    except OSError:
        return True
    return (st.st_size, st.st_mtime_ns) != (scan.size, scan.mtime_ns)


def _embed(run: _Run, fresh: dict[str, list[_Scan]]) -> None:
    import numpy as np

    from .batching import embed_images, sizes_for
    from .items import Item

    firsts = [group[0] for group in fresh.values()]
    items = [Item(name=scan.name, path=scan.file, frame=scan.frame) for scan in firsts]
    embed = run.embed or (lambda loaded, items: embed_images(loaded, items, normalize=True))
    batch, _ = sizes_for(run.loaded.device, run.batch_size, 0)
    files, vectors = [], []
    for scan, result in zip(firsts, embed(run.loaded, items)):
        group = fresh[scan.sha256]
        run.summary.embedded += 1
        if result.ok and _changed(scan):
            for member in group:
                member.error = "changed while it was being indexed; it is indexed on the next run"
                run.count("failed", member)
            run.left_out.update(member.source for member in group)
            continue
        for member in group:
            member.error = result.error
            run.count(("updated" if member.old else "added") if result.ok else "failed", member)
        if getattr(result.error, "fix", None) in (MISSING, "decode_timeout"):  # not the file's fault: tried again
            run.left_out.update(member.source for member in group)
            continue
        files += group
        if result.ok:
            vectors.append((run.model, scan.sha256, np.asarray(result.embedding, np.float32).tobytes()))
        if len(files) >= batch:
            _commit(run, files, vectors)
            files, vectors = [], []
    _commit(run, files, vectors)


def _commit(run: _Run, files: list[_Scan], vectors: list[tuple]) -> None:
    if not files:
        return
    with run.index._write():
        run.index.db.executemany("INSERT INTO vectors (model_id, sha256, vector) VALUES (?, ?, ?) "
                                 "ON CONFLICT (model_id, sha256) DO UPDATE SET vector = excluded.vector", vectors)
        _put_files(run, files)
        if vectors:
            run.index.db.execute(f"UPDATE models SET generation = {NEXT_GENERATION} WHERE id = ?", (run.model,))


def _put_files(run: _Run, scans: list[_Scan]) -> None:
    now = time.time()
    run.stale.update(s.old[2] for s in scans if s.old and s.old[2] and s.old[2] != s.sha256)
    run.index.db.executemany(
        "INSERT INTO files (path, size, mtime_ns, sha256, error, indexed) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
        "sha256 = excluded.sha256, error = excluded.error, indexed = excluded.indexed",
        [(s.key, s.size, s.mtime_ns, s.sha256, s.error, now) for s in scans])
    run.index.db.executemany(METADATA_UPDATE,  # what was read with the hash (a file not hashed again keeps its own)
                             [(*s.meta.row(), s.key) for s in scans if s.meta is not None])
    run.index.db.executemany("UPDATE files SET interval = ? WHERE path = ?", [(s.interval, s.key) for s in scans if s.video])


def _collect_garbage(index: Index, candidates: set[str]) -> None:
    """Drop the vectors of ``candidates`` (content some row stopped pointing to) that no file
    refers to any more, inside the caller's transaction; only those are looked at."""
    candidates = sorted(candidates)
    for start in range(0, len(candidates), 500):
        chunk = candidates[start : start + 500]
        marks = ",".join("?" * len(chunk))
        orphans = f"sha256 IN ({marks}) AND NOT EXISTS (SELECT 1 FROM files f WHERE f.sha256 = vectors.sha256)"
        models = index.db.execute(f"SELECT DISTINCT model_id FROM vectors WHERE {orphans}", chunk).fetchall()
        if models:
            index.db.execute(f"DELETE FROM vectors WHERE {orphans}", chunk)
            index.db.executemany(f"UPDATE models SET generation = {NEXT_GENERATION} WHERE id = ?", models)
