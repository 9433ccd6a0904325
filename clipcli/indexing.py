"""Bringing an index up to date: walk, compare, hash, reuse, embed, remove.

:func:`update` walks the inputs and compares each file's size and modification time with
its row; only new or changed files are hashed (on 4 threads), and a file whose content the
model already has a vector of (a rename, a move, a copy) reuses it. The model is loaded only
when some content is new, and each batch of new vectors is committed in its own transaction
with its files' rows: a killed run loses at most the batch in flight. Rows of files gone from
an indexed folder are removed last, with the vectors no file refers to any more.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from .index import Index, Summary, _under, path_key

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import LoadedModel


@dataclass
class _Scan:
    """A file found by the walk: its key, stat and, once hashed, content sha256."""

    key: bytes
    name: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    error: str | None = None
    old: tuple | None = field(default=None, repr=False)  # its row before this run: (size, mtime_ns, sha256, error)


def update(index: Index, inputs: Sequence[str], key: str, load: Callable[[], "LoadedModel"], *,
           embed: Callable[["LoadedModel", list], Iterator] | None = None,
           on_result: Callable[[str, str | None], None] | None = None) -> Summary:
    """Bring the rows of ``inputs`` (folders, list files, files) up to date for the model
    whose :func:`~clipcli.pipeline.source_key` is ``key``. ``load()`` is called only if an
    image must be embedded; ``embed(loaded, items)`` yields one
    :class:`~clipcli.batching.Embedding` per item (default: :func:`embed_images`)."""
    from .items import expand_inputs

    started, summary = time.monotonic(), Summary()
    report = on_result or (lambda name, error: None)
    if index.readonly:
        index._write()  # raises: say so before walking a tree
    items = expand_inputs(list(inputs))
    roots = [path_key(arg) for arg in inputs if os.path.isdir(arg)]
    scans, failures = _scan(items)
    for name, error in failures:
        summary.failed += 1
        report(name, error)
    under = _attach_rows(index, scans, roots)
    model = index.model_id(key=key)
    have = _shas(index, model)
    todo = []
    for scan in scans:
        old = scan.old
        if old and (old[0], old[1]) == (scan.size, scan.mtime_ns) and (old[3] is not None or old[2] in have):
            summary.unchanged += 1
        else:
            todo.append(scan)
    seen = {scan.key for scan in scans}
    gone = [(path, row[2]) for path, row in under.items() if path not in seen]  # (path, sha256)
    if todo:
        _hash(todo)
        _apply(index, todo, gone, key, model, have, load, embed, report, summary)
    if gone:
        with index._write():
            index.db.executemany("DELETE FROM files WHERE path = ?", [(path,) for path, _ in gone])
            _collect_garbage(index, )
        summary.removed += len(gone)
    summary.seconds = time.monotonic() - started
    return summary

def _scan(items) -> tuple[list[_Scan], list[tuple[str, str]]]:
    scans, failures, seen = [], [], set()
    for item in items:
        if item.url is not None:
            failures.append((item.name, "the index holds local files; download it first"))
            continue
        if item.error is not None:
            failures.append((item.name, item.error))
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
        scans.append(_Scan(key, item.name, st.st_size, st.st_mtime_ns))
    return scans, failures

def _attach_rows(index: Index, scans: list[_Scan], roots: list[bytes]) -> dict[bytes, tuple]:
    """Each scan's row before this run: one range query per indexed folder, then one
    query per file outside them (files and list entries named on their own). Returns
    the rows under the folders."""
    rows: dict[bytes, tuple] = {}
    lows = [_under(root)[0] for root in roots]
    for low, high in map(_under, roots):
        rows.update((r[0], r[1:]) for r in index.db.execute(
            "SELECT path, size, mtime_ns, sha256, error FROM files WHERE path >= ? AND path < ?", (low, high)))
    for scan in scans:
        scan.old = rows.get(scan.key)
        if scan.old is None and not any(scan.key.startswith(low) for low in lows):
            row = index.db.execute("SELECT size, mtime_ns, sha256, error FROM files WHERE path = ?",
                                  (scan.key,)).fetchone()
            scan.old = tuple(row) if row else None
    return rows

def _shas(index: Index, model: int | None) -> set[str]:
    if model is None:
        return set()
    return {row[0] for row in index.db.execute("SELECT sha256 FROM vectors WHERE model_id = ?", (model,))}

def _hash(scans: list[_Scan]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from .fsutil import sha256_file

    def one(scan: _Scan) -> None:
        try:
            scan.sha256 = sha256_file(Path(os.fsdecode(scan.key)))
        except OSError as error:
            scan.error = f"cannot read it: {error.strerror or error}"

    with ThreadPoolExecutor(4) as pool:  # hashlib releases the interpreter lock on large buffers
        list(pool.map(one, scans))

def _apply(index: Index, todo, gone, key, model, have, load, embed, report, summary) -> None:

    moved_from = Counter(sha for _, sha in gone if sha)  # content that left a path this run
    failed = [s for s in todo if s.error is not None]
    for scan in failed:
        summary.failed += 1
        report(scan.name, scan.error)
    ready = [s for s in todo if s.error is None]
    if any(s.sha256 not in have for s in ready):
        loaded = load()
        summary.model_loaded = True
        model = index._register(key, loaded)  # also when the key is new but the identity is not
        have = _shas(index, model)
    reuse = [s for s in ready if s.sha256 in have]
    for scan in reuse:
        if scan.old and scan.old[2] == scan.sha256 and scan.old[3] is None:
            kind = "unchanged"  # touched, same content
        else:
            kind = "moved" if scan.old is None and moved_from[scan.sha256] > 0 else ("updated" if scan.old else "added")
        if kind == "moved":
            moved_from[scan.sha256] -= 1
            summary.removed -= 1  # a move is not also a removal
        setattr(summary, kind, getattr(summary, kind) + 1)
        report(scan.name, None)
    with index._write():
        _put_files(index, reuse + failed)
    fresh: dict[str, list[_Scan]] = {}  # content sha -> the files holding it
    for scan in ready:
        if scan.sha256 not in have:
            fresh.setdefault(scan.sha256, []).append(scan)
    if fresh:
        _embed(index, fresh, model, loaded, embed, report, summary)

def _embed(index: Index, fresh: dict[str, list[_Scan]], model: int, loaded, embed, report, summary) -> None:
    import numpy as np

    from .batching import default_batch_size, embed_images
    from .items import Item

    firsts = [group[0] for group in fresh.values()]
    items = [Item(name=scan.name, path=os.fsdecode(scan.key)) for scan in firsts]
    run = embed or (lambda loaded, items: embed_images(loaded, items, normalize=True))
    batch = default_batch_size(loaded.device)
    files, vectors = [], []
    for scan, result in zip(firsts, run(loaded, items)):
        group = fresh[scan.sha256]
        for member in group:
            member.error = result.error
            kind = "updated" if member.old else "added"
            if result.ok:
                setattr(summary, kind, getattr(summary, kind) + 1)
            else:
                summary.failed += 1
            report(member.name, result.error)
        summary.embedded += 1
        files += group
        if result.ok:
            vectors.append((model, scan.sha256, np.asarray(result.embedding, np.float32).tobytes()))
        if len(files) >= batch:
            _commit(index, files, vectors, model)
            files, vectors = [], []
    _commit(index, files, vectors, model)

def _commit(index: Index, files: list[_Scan], vectors: list[tuple], model: int) -> None:
    if not files:
        return
    with index._write():
        index.db.executemany("INSERT INTO vectors (model_id, sha256, vector) VALUES (?, ?, ?) "
                            "ON CONFLICT (model_id, sha256) DO UPDATE SET vector = excluded.vector", vectors)
        _put_files(index, files)
        if vectors:
            index.db.execute("UPDATE models SET generation = generation + 1 WHERE id = ?", (model,))

def _put_files(index: Index, scans: list[_Scan]) -> None:
    now = time.time()
    index.db.executemany(
        "INSERT INTO files (path, size, mtime_ns, sha256, error, indexed) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
        "sha256 = excluded.sha256, error = excluded.error, indexed = excluded.indexed",
        [(s.key, s.size, s.mtime_ns, s.sha256, s.error, now) for s in scans])

def _collect_garbage(index: Index) -> None:
    """Drop vectors no file refers to any more (inside the caller's transaction)."""
    orphans = index.db.execute("SELECT DISTINCT model_id FROM vectors v WHERE NOT EXISTS "
                              "(SELECT 1 FROM files f WHERE f.sha256 = v.sha256)").fetchall()
    if orphans:
        index.db.execute("DELETE FROM vectors WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.sha256 = vectors.sha256)")
        index.db.executemany("UPDATE models SET generation = generation + 1 WHERE id = ?", orphans)
