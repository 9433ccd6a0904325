"""Exact nearest-neighbour search over an index's vectors, kept contiguous on disk.

SQLite holds the vectors row by row, which is right for small crash-safe updates and wrong
for scanning a million of them (fetching 1M 2 KB rows took 4 s here). So each model's
vectors are also kept as one float32 ``.npy`` matrix (and its vector ids) in a cache folder
beside the database, named by the database's uuid, the model and its *generation* (a
counter bumped in every transaction that changes the model's vectors). A search
memory-maps the current one, or first rebuilds it from one consistent read of SQLite.
float32 and not float16: CPUs without native half precision convert slowly, and
half-precision sums would cost the 1e-4 the scores must keep.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .fsutil import named, umask
from .index import Hit, Index, key_range, path_key


def cache_folder(index: Index) -> Path:
    return index.path.with_name(index.path.name + ".vectors")


def _build(index: Index, model: int, dim: int, count: int, target: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``model`` in id order, into ``target`` (an ``.npy`` written in place) or memory."""
    ids = np.empty(count, np.int64)
    if target is not None:
        vectors = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(count, dim))
    else:
        vectors = np.empty((count, dim), np.float32)
    cursor = index.db.execute("SELECT id, vector FROM vectors WHERE model_id = ? ORDER BY id", (model,))
    row = 0
    while batch := cursor.fetchmany(8192):
        ids[row : row + len(batch)] = [vector_id for vector_id, _ in batch]
        vectors[row : row + len(batch)] = np.frombuffer(b"".join(blob for _, blob in batch), np.float32).reshape(-1, dim)
        row += len(batch)
    if row != count:
        raise RuntimeError(f"expected {count} vectors, read {row}")
    if target is not None:
        vectors.flush()
    return ids, vectors


def load_matrix(index: Index, model: int, generation: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of ``model`` at ``generation``, from the cache or rebuilt into it."""
    folder = cache_folder(index)
    stem = f"{index.uuid}-m{model}-g{generation}"
    ids_file, vectors_file = folder / f"{stem}.ids.npy", folder / f"{stem}.npy"
    try:
        return np.load(ids_file), np.load(vectors_file, mmap_mode="c")  # copy-on-write: no copy, writable for torch
    except (OSError, ValueError):
        pass
    index.db.execute("BEGIN")  # one snapshot: the generation and the rows it counts
    try:
        current = index.db.execute("SELECT generation, dim FROM models WHERE id = ?", (model,)).fetchone()
        count = index.db.execute("SELECT count(*) FROM vectors WHERE model_id = ?", (model,)).fetchone()[0]
        if current[0] != generation:  # changed since the caller looked: build the newer one
            generation, stem = current[0], f"{index.uuid}-m{model}-g{current[0]}"
            ids_file, vectors_file = folder / f"{stem}.ids.npy", folder / f"{stem}.npy"
        try:
            folder.mkdir(exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".npy", dir=folder)
            os.close(fd)
            os.chmod(temp, 0o666 & ~umask())  # as readable as the database beside it
        except OSError:  # a read-only place: build in memory for this search only
            return _build(index, model, current[1], count, None)
        try:
            ids, _ = _build(index, model, current[1], count, Path(temp))
            np.save(ids_file, ids)
            os.replace(temp, vectors_file)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    finally:
        index.db.execute("COMMIT")
    for old in folder.glob(f"{index.uuid}-m{model}-g*.npy"):  # earlier generations (never a newer one)
        found = re.match(rf"{re.escape(index.uuid)}-m{model}-g(\d+)\.", old.name)
        if found and int(found[1]) < generation:
            old.unlink(missing_ok=True)
    try:
        return ids, np.load(vectors_file, mmap_mode="c")
    except (OSError, ValueError):  # replaced meanwhile by another search's newer generation
        return load_matrix(index, model, index.db.execute(
            "SELECT generation FROM models WHERE id = ?", (model,)).fetchone()[0])


def top_scores(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, threshold: float | None,
               allowed: set[int] | None) -> list[tuple[int, float]]:
    """``[(vector id, cosine)]`` of the ``k`` best rows (those in ``allowed``, at least
    ``threshold``), best first; ties by id."""
    import torch

    if allowed is not None:
        wanted = np.array(sorted(allowed), np.int64)
        rows = np.searchsorted(ids, wanted)
        rows = rows[(rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == wanted)] if len(ids) else rows[:0]
        ids, matrix = ids[rows], torch.from_numpy(np.ascontiguousarray(vectors[rows]))
    else:
        matrix = torch.from_numpy(vectors)
    if not len(ids) or k <= 0:
        return []
    scores = torch.mv(matrix, torch.from_numpy(np.ascontiguousarray(query, np.float32)))  # (N,)
    values, rows = torch.topk(scores, min(k, len(ids)))
    best = [(int(ids[row]), float(value)) for value, row in zip(values.tolist(), rows.tolist())]
    if threshold is not None:
        best = [(i, s) for i, s in best if s >= threshold]
    return sorted(best, key=lambda hit: (-hit[1], hit[0]))


def _place(place: str) -> tuple[bytes, bytes, bytes]:
    """(the path's key, the first key under it, the first key past it)."""
    key = path_key(place)
    return (key, *key_range(key))


def _allowed(index: Index, model: int, under: Sequence[str]) -> set[int]:
    """Ids of the model's vectors that some file at or below ``under`` holds."""
    allowed: set[int] = set()
    for key, low, high in map(_place, under):
        allowed.update(row[0] for row in index.db.execute(
            # CROSS JOIN: walk the files under the place, then their vectors (not every vector)
            "SELECT v.id FROM files f CROSS JOIN vectors v ON v.sha256 = f.sha256 AND v.model_id = ? "
            "WHERE (f.path >= ? AND f.path < ?) OR f.path = ?", (model, low, high, key)))
    return allowed


def _files_of(index: Index, model: int, best: list[tuple[int, float]],
              under: Sequence[str]) -> list[tuple[bytes, float]]:
    """The files holding the ``best`` vectors (one vector may be several files), best first."""
    score = dict(best)
    places = [(key, low) for key, low, _ in map(_place, under)]
    found = []
    for start in range(0, len(best), 500):
        chunk = [vector_id for vector_id, _ in best[start : start + 500]]
        found += index.db.execute(
            f"SELECT f.path, v.id FROM vectors v JOIN files f ON f.sha256 = v.sha256 "
            # "+": look the ids up by primary key, not by scanning the model's rows (0.24 s at 1M)
            f"WHERE +v.model_id = ? AND v.id IN ({','.join('?' * len(chunk))})", (model, *chunk)).fetchall()
    if places:
        found = [(p, v) for p, v in found if any(p == key or p.startswith(low) for key, low in places)]
    return sorted(((path, score[vector_id]) for path, vector_id in found), key=lambda hit: (-hit[1], hit[0]))


def search(index: Index, model: int, query: np.ndarray, *, top_k: int = 10, threshold: float | None = None,
           under: Sequence[str] = ()) -> list[Hit]:
    """The ``top_k`` files whose vectors score highest against the unit vector ``query``
    (cosine), best first; ``under`` limits them to files at or below those paths. Exact:
    every vector of the model is scored."""
    generation = index.db.execute("SELECT generation FROM models WHERE id = ?", (model,)).fetchone()[0]
    ids, vectors = load_matrix(index, model, generation)
    for place in under:
        named(place, "a place to search in")
    allowed = _allowed(index, model, under) if under else None
    want = top_k
    while True:  # duplicates share a vector: widen until top_k files, or every vector
        best = top_scores(vectors, ids, query, want, threshold, allowed)
        hits = _files_of(index, model, best, under)
        if len(hits) >= top_k or len(best) < want:
            return [Hit(rank, path, score) for rank, (path, score) in enumerate(hits[:top_k], start=1)]
        want *= 4
