"""Exact nearest-neighbour search over an index's vectors, kept contiguous on disk.

SQLite holds the vectors row by row, which is right for small crash-safe updates and wrong
for scanning a million of them (fetching 1M 2 KB rows took 4 s here). So each model's
vectors are also kept as one float32 ``.npy`` matrix (and its vector ids) in a cache folder
beside the database, named by the database's uuid, the model, its *generation* (a number
grown, by a random step, in every transaction that changes the model's vectors) and a digest
of its newest rows. A search memory-maps the current one if it agrees with the database
(vector count, first and last id, width, type: a restored backup, a truncated or foreign
file is never searched), or first rebuilds it from one consistent read of SQLite.
float32 and not float16: CPUs without native half precision convert slowly, and
half-precision sums would cost the 1e-4 the scores must keep.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import numpy as np

from .errors import IndexDatabaseError, InputError, NoVectorsError
from .fsutil import named, umask
from .index import REBUILD, Hit, Index, key_range, path_key


def cache_folder(index: Index) -> Path:
    return index.path.with_name(index.path.name + ".vectors")


def check_threshold(threshold: float | None) -> None:
    """A minimum score must be a cosine: a number from -1 to 1 (NaN would silently match nothing)."""
    if threshold is None:
        return
    try:
        inside = -1.0 <= float(threshold) <= 1.0  # False for NaN
    except (TypeError, ValueError):
        inside = False
    if not inside:
        raise InputError(f"{threshold}: give a cosine, a number from -1 to 1", option="threshold")


@dataclass(frozen=True)
class _State:
    """What a model's cache must agree with, read in the snapshot it is built from."""

    generation: int
    dim: int
    count: int
    first: int | None  # the smallest and largest vector ids
    last: int | None
    newest: str  # a digest of the newest rows' ids and contents: where a restored backup's rows part

    def stem(self, index: Index, model: int) -> str:
        return f"{index.uuid}-m{model}-g{self.generation}-{self.newest}"


def _state(index: Index, model: int) -> _State:
    """Cheap at any size: a count over an index, lookups (0.03 s for 1M vectors)."""
    row = index.db.execute("SELECT generation, dim FROM models WHERE id = ?", (model,)).fetchone()
    if row is None:
        raise NoVectorsError(f"{index.path} has no model {model}")
    if not isinstance(row[1], int) or row[1] < 1:
        raise IndexDatabaseError(f"{index.path} is damaged (model {model} has {row[1]!r} dimensions); {REBUILD}")
    count, first, last = (index.db.execute(f"SELECT {what} FROM vectors WHERE model_id = ?", (model,)).fetchone()[0]
                          for what in ("count(*)", "min(id)", "max(id)"))  # apart: min and max are then lookups
    newest = index.db.execute("SELECT id, sha256 FROM vectors WHERE model_id = ? ORDER BY id DESC LIMIT 64",
                              (model,)).fetchall()
    digest = hashlib.sha256(repr((count, first, last, newest)).encode()).hexdigest()[:12]
    return _State(row[0], row[1], count, first, last, digest)


def _build(index: Index, model: int, state: _State, stream: IO[bytes] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ids of ``model``'s rows in id order and their vectors: written to ``stream`` as an
    ``.npy`` (plain writes: a full disk is an OSError, where writing a memory map is SIGBUS)
    or returned from memory."""
    ids = np.empty(state.count, np.int64)
    width = 4 * state.dim  # bytes of one float32 vector
    vectors = np.empty((state.count, state.dim), np.float32) if stream is None else None
    if stream is not None:
        np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                      "fortran_order": False, "shape": (state.count, state.dim)})
    cursor = index.db.execute("SELECT id, vector FROM vectors WHERE model_id = ? ORDER BY id", (model,))
    row = 0
    while batch := cursor.fetchmany(8192):
        for vector_id, blob in batch:
            if not isinstance(blob, bytes) or len(blob) != width:
                size = f"{len(blob)} bytes" if isinstance(blob, bytes) else f"a {type(blob).__name__}"
                raise IndexDatabaseError(f"{index.path} is damaged (vector {vector_id} of model {model} is {size}, "
                                         f"not {width}: {state.dim} float32 values); {REBUILD}")
        if row + len(batch) > state.count:
            break
        ids[row : row + len(batch)] = [vector_id for vector_id, _ in batch]
        data = b"".join(blob for _, blob in batch)
        if stream is not None:
            stream.write(data)
        else:
            vectors[row : row + len(batch)] = np.frombuffer(data, np.float32).reshape(-1, state.dim)
        row += len(batch)
    if row != state.count:
        raise IndexDatabaseError(f"{index.path} is damaged (model {model} counts {state.count} vectors, "
                                 f"its rows are not those); {REBUILD}")
    return ids, vectors


def _cached(ids_file: Path, vectors_file: Path, state: _State) -> tuple[np.ndarray, np.ndarray] | None:
    """The cache files, if they agree with the database: count, first and last id, width, type.
    A restored backup, a truncated file or another model's file is rebuilt, never searched."""
    try:
        ids, vectors = np.load(ids_file), np.load(vectors_file, mmap_mode="c")  # copy-on-write: writable for torch
    except (OSError, ValueError, EOFError):
        return None
    if (ids.dtype != np.int64 or ids.shape != (state.count,) or vectors.dtype != np.float32
            or vectors.shape != (state.count, state.dim)):
        return None
    if state.count and (ids[0] != state.first or ids[-1] != state.last or not np.all(ids[1:] > ids[:-1])):
        return None
    return ids, vectors


def _rebuild(index: Index, model: int, state: _State, folder: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Build the cache of ``state`` in place (temporary files renamed over); where it cannot
    be written (a read-only place, a full disk), in memory for this search only."""
    temps: list[str] = []
    try:
        folder.mkdir(exist_ok=True)
        for suffix in (".npy", ".ids.npy"):
            fd, temp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=folder)
            os.close(fd)
            temps.append(temp)
            os.chmod(temp, 0o666 & ~umask())  # as readable as the database beside it
        with open(temps[0], "wb") as stream:
            ids, _ = _build(index, model, state, stream)
        vectors = np.load(temps[0], mmap_mode="c")  # mapped before the rename: valid whatever replaces it
        np.save(temps[1], ids)
        os.replace(temps[1], folder / f"{stem}.ids.npy")
        os.replace(temps[0], folder / f"{stem}.npy")
        return ids, vectors
    except OSError:
        for temp in temps:
            Path(temp).unlink(missing_ok=True)
        ids, vectors = _build(index, model, state, None)
        return ids, vectors
    except BaseException:
        for temp in temps:
            Path(temp).unlink(missing_ok=True)
        raise


def load_matrix(index: Index, model: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of ``model``'s current rows: the cache, if it agrees with the
    database, else rebuilt from one consistent read."""
    folder = cache_folder(index)
    index.db.execute("BEGIN")  # one snapshot: the generation, the counts and the rows
    try:
        state = _state(index, model)
        if not state.count:
            return np.empty(0, np.int64), np.empty((0, state.dim), np.float32)
        stem = state.stem(index, model)
        found = _cached(folder / f"{stem}.ids.npy", folder / f"{stem}.npy", state)
        if found is not None:
            return found
        built = _rebuild(index, model, state, folder, stem)
    finally:
        index.db.execute("COMMIT")
    for old in folder.glob(f"{index.uuid}-m{model}-g*.npy"):  # earlier generations (never a newer one)
        found = re.match(rf"{re.escape(index.uuid)}-m{model}-g(\d+)[-.]", old.name)
        if found and (int(found[1]) < state.generation or (
                int(found[1]) == state.generation and not old.name.startswith(f"{stem}."))):
            old.unlink(missing_ok=True)
    return built


def top_scores(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, threshold: float | None,
               allowed: set[int] | None) -> list[tuple[int, float]]:
    """``[(vector id, cosine)]`` of the ``k`` best rows (those in ``allowed``, at least
    ``threshold``), best first; ties by id."""
    import torch

    matrix, candidates = torch.from_numpy(vectors), len(ids)
    excluded = None  # rows scored but not allowed
    if allowed is not None:
        wanted = np.array(sorted(allowed), np.int64)
        rows = np.searchsorted(ids, wanted)
        rows = rows[(rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == wanted)] if len(ids) else rows[:0]
        candidates = len(rows)
        if 4 * len(rows) < len(ids):  # a few: their rows copied out and scored
            ids, matrix = ids[rows], torch.from_numpy(np.ascontiguousarray(vectors[rows]))
        else:  # most (a wide date range): every row scored in place, the others masked, no copy of the matrix
            excluded = torch.ones(len(ids), dtype=torch.bool)
            excluded[torch.from_numpy(rows)] = False
    if not candidates or k <= 0:
        return []
    scores = torch.mv(matrix, torch.from_numpy(np.array(query, np.float32)))  # (N,)
    if excluded is not None:
        scores[excluded] = -torch.inf
    values, rows = torch.topk(scores, min(k, candidates))
    best = [(int(ids[row]), float(value)) for value, row in zip(values.tolist(), rows.tolist())]
    if threshold is not None:
        best = [(i, s) for i, s in best if s >= threshold]
    return sorted(best, key=lambda hit: (-hit[1], hit[0]))


def _place(place: str) -> tuple[bytes, bytes, bytes]:
    """(the path's key, the first key under it, the first key past it)."""
    key = path_key(place)
    return (key, *key_range(key))


def _allowed(index: Index, model: int, under: Sequence[str], taken: tuple[float | None, float | None]) -> set[int] | None:
    """Ids of the model's vectors that some file at or below ``under`` holds, taken within
    ``taken`` (``[after, before)``, either open); None: every vector."""
    allowed: set[int] | None = None
    if under:
        allowed = set()
        for key, low, high in map(_place, under):
            allowed.update(row[0] for row in index.db.execute(
                # CROSS JOIN: walk the files under the place, then their vectors (not every vector)
                "SELECT v.id FROM files f CROSS JOIN vectors v ON v.sha256 = f.sha256 AND v.model_id = ? "
                "WHERE (f.path >= ? AND f.path < ?) OR f.path = ?", (model, low, high, key)))
    if taken != (None, None):
        after, before = taken
        dated = {row[0] for row in index.db.execute(
            "SELECT v.id FROM files f CROSS JOIN vectors v ON v.sha256 = f.sha256 AND v.model_id = ? "
            "WHERE f.taken >= ? AND f.taken < ?", (model, -1e300 if after is None else after,
                                                   1e300 if before is None else before))}
        allowed = dated if allowed is None else allowed & dated
    return allowed


def _files_of(index: Index, model: int, best: list[tuple[int, float]], under: Sequence[str],
              taken: tuple[float | None, float | None]) -> list[tuple]:
    """The files holding the ``best`` vectors (one vector may be several files), best first:
    ``(path, score, taken, width, height, taken_source)``."""
    score = dict(best)
    places = [(key, low) for key, low, _ in map(_place, under)]
    found = []
    for start in range(0, len(best), 500):
        chunk = [vector_id for vector_id, _ in best[start : start + 500]]
        found += index.db.execute(
            f"SELECT f.path, v.id, f.taken, f.width, f.height, f.taken_source FROM vectors v JOIN files f "
            f"ON f.sha256 = v.sha256 "
            # "+": look the ids up by primary key, not by scanning the model's rows (0.24 s at 1M)
            f"WHERE +v.model_id = ? AND v.id IN ({','.join('?' * len(chunk))})", (model, *chunk)).fetchall()
    if places:
        found = [row for row in found if any(row[0] == key or row[0].startswith(low) for key, low in places)]
    after, before = taken
    if after is not None or before is not None:
        found = [row for row in found if row[2] is not None and (after is None or row[2] >= after)
                 and (before is None or row[2] < before)]
    return sorted(((path, score[vector_id], when, width, height, source)
                   for path, vector_id, when, width, height, source in found), key=lambda hit: (-hit[1], hit[0]))


def search(index: Index, model: int, query: np.ndarray, *, top_k: int = 10, threshold: float | None = None,
           under: Sequence[str] = (), after: float | None = None, before: float | None = None) -> list[Hit]:
    """The ``top_k`` files whose vectors score highest against the unit vector ``query``
    (cosine), best first; ``under`` limits them to files at or below those paths, ``after``
    and ``before`` (Unix seconds) to files taken in ``[after, before)`` (clipcli.metadata).
    Exact: every vector of the model is scored."""
    check_threshold(threshold)
    for place in under:
        named(place, "a place to search in")
    taken = (after, before)
    with index.guard():
        ids, vectors = load_matrix(index, model)
        if np.shape(query) != (vectors.shape[1],):
            raise InputError(f"the query has shape {np.shape(query)}; the model's vectors have {vectors.shape[1]} values")
        allowed = _allowed(index, model, under, taken)
        want = top_k
        while True:  # duplicates share a vector: widen until top_k files, or every vector
            best = top_scores(vectors, ids, query, want, threshold, allowed)
            hits = _files_of(index, model, best, under, taken)
            if len(hits) >= top_k or len(best) < want:
                return [Hit(rank, path, score, taken=when, width=width, height=height, taken_source=source)
                        for rank, (path, score, when, width, height, source) in enumerate(hits[:top_k], start=1)]
            want *= 4
