"""Exact nearest-neighbour search over an index's vectors, kept contiguous on disk.

SQLite holds the vectors row by row, which is right for small crash-safe updates and wrong
for scanning a million of them (fetching 1M 2 KB rows took 4 s here). So each model's
vectors are also kept in a cache folder beside the database, named by the database's uuid,
the model, its *generation* (a number grown, by a random step, in every transaction that
changes the model's vectors) and a digest of its newest rows: a float32 ``.npy`` matrix, its
vector ids, and the same matrix rounded to bfloat16 (``.bf16``), all three written from one
consistent read of SQLite. A search memory-maps the current ones if they agree with the
database (vector count, first and last id, width, type: a restored backup, a truncated or
foreign file is never searched), or first rebuilds them.

A search scans the bfloat16 matrix, then scores its candidates again from the float32 rows:
half the bytes to read per query, and a product that CPUs with AVX512-BF16 or AMX run
natively (1M x 512, 2 threads of a Sapphire Rapids: 47 ms against float32's 90; with
PyTorch's AVX2 kernels forced, about 105 against 107 to 130), while the hits stay exactly
those of float32, ties by id. Rounding moves a score by at most a bound computed per query
(:meth:`Scan.slack`), so every row that could be in the exact top k is a candidate
(:func:`_floor`): 25 of 1M random vectors for a top 10. float16 was measured too (three
more significant bits, a narrower bound), but PyTorch converts it: 122 to 139 ms, slower
than float32; int8 ran natively only with AMX or VNNI (51 ms; 255 with AVX2 kernels).

The candidates' float32 rows come from the memory-mapped ``.npy``, which clipcli.duplicates
reads whole anyway: a few rows a query. Reading them from SQLite instead would save that
file (2 GB at 1M) but read a later snapshot than the scan's, one lookup a row, and a query
with many candidates (near-identical photos, a large k) would cost seconds; from the map it
costs at most a float32 scan, which is what a query does whose bound leaves most rows in.
The price: 6 bytes a value on disk instead of 4, all written by the first search after an
update.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Sequence

import numpy as np

from .errors import IndexDatabaseError, InputError, NoVectorsError
from .fsutil import named, umask
from .index import REBUILD, Hit, Index, key_range, path_key

if TYPE_CHECKING:
    import torch

_BF16 = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding to nearest moves a value by at most this, relatively
_F32 = 2.0**-24
_TRAILER = 8  # bytes after a .bf16 file's array: Scan.norm, a float64


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
class Scan:
    """A model's vectors rounded to bfloat16, the matrix a search scans, and the largest norm
    of its rows, which bounds what the rounding moves a score by."""

    bits: np.ndarray  # (N, D) uint16: each float32 value's upper half, rounded to nearest even
    norm: float  # the largest ||v|| of the float32 rows (inf where a value is not finite or near overflow)

    def slack(self, query: np.ndarray) -> tuple[float, float]:
        """``(a, b)``: the exact score ``s = q.v`` of every row is within ``a + b |t|`` of the
        scanned score ``t``. With q', v' the roundings: ``q.v - q'.v' = q.(v - v') + (q - q').v'``,
        where ``||v - v'|| <= 2^-8 ||v||`` (each value moves by at most 2^-8 of itself) and
        ``||v'|| <= (1 + 2^-8) ||v||``; the float32 sum of the products (exact: 8 by 8 bits) is
        off by at most ``D 2^-24 ||q'|| ||v'||``; rounding the sum to bfloat16 by ``2^-8 |t| / (1 - 2^-8)``.
        Infinite where the norm is: the scan is then not used."""
        import torch

        exact = torch.from_numpy(np.array(query, np.float64))
        rounded = exact.float().bfloat16().double()
        size, off, rounded_size = (float(torch.linalg.vector_norm(x)) for x in (exact, exact - rounded, rounded))
        summed, largest = len(query) * _F32 / (1 - len(query) * _F32), (1 + _BF16) * self.norm
        a = size * _BF16 * self.norm + off * largest + summed * rounded_size * largest
        # widened for the float32 norm's own rounding (at most (D/2 + 1) 2^-24) and this arithmetic's
        return a * (1 + len(query) * 2**-22) + 2**-40, _BF16 / (1 - _BF16)


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
    """Cheap at any size: lookups and a count (4 ms for 1M vectors of one model; 33 ms where
    the index holds several models' vectors, which SQLite counts row by row)."""
    row = index.db.execute("SELECT generation, dim FROM models WHERE id = ?", (model,)).fetchone()
    if row is None:
        raise NoVectorsError(f"{index.path} has no model {model}")
    if not isinstance(row[1], int) or row[1] < 1:
        raise IndexDatabaseError(f"{index.path} is damaged (model {model} has {row[1]!r} dimensions); {REBUILD}")
    first, last = (index.db.execute(f"SELECT {what} FROM vectors WHERE model_id = ?", (model,)).fetchone()[0]
                   for what in ("min(id)", "max(id)"))  # apart: min and max are then lookups
    only = all(index.db.execute(f"SELECT {what}(model_id) FROM vectors").fetchone()[0] == model for what in ("min", "max"))
    count = index.db.execute("SELECT count(*) FROM vectors" if only else "SELECT count(*) FROM vectors WHERE model_id = ?",
                             () if only else (model,)).fetchone()[0]  # the first counts pages of an index
    newest = index.db.execute("SELECT id, sha256 FROM vectors WHERE model_id = ? ORDER BY id DESC LIMIT 64",
                              (model,)).fetchall()
    digest = hashlib.sha256(repr((count, first, last, newest)).encode()).hexdigest()[:12]
    return _State(row[0], row[1], count, first, last, digest)


def _rounded(block: np.ndarray) -> tuple[np.ndarray, float]:
    """float32 rows rounded to bfloat16 (as uint16 bits) and their largest norm: inf where a
    value is not finite or so large (2^100) that its rounding could overflow."""
    import torch

    exact = torch.from_numpy(block)
    norm = float(torch.linalg.vector_norm(exact, dim=1).max()) if len(block) else 0.0
    return exact.bfloat16().view(torch.int16).numpy().view(np.uint16), norm if norm < 2.0**100 else math.inf


def _build(index: Index, model: int, state: _State, streams: tuple[IO[bytes], IO[bytes]] | None
           ) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray] | None]:
    """The ids of ``model``'s rows in id order, their largest norm, and the vectors and their
    rounding: written to ``streams`` (the float32 ``.npy``, the ``.bf16``; plain writes: a full
    disk is an OSError, where writing a memory map is SIGBUS) or returned."""
    ids = np.empty(state.count, np.int64)
    width, shape = 4 * state.dim, (state.count, state.dim)  # bytes of one float32 vector
    vectors = np.empty(shape, np.float32) if streams is None else None
    bits = np.empty(shape, np.uint16) if streams is None else None
    if streams is not None:
        for stream, dtype in zip(streams, (np.float32, np.uint16)):
            np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": shape})
    cursor = index.db.execute("SELECT id, vector FROM vectors WHERE model_id = ? ORDER BY id", (model,))
    row, norm = 0, 0.0
    while batch := cursor.fetchmany(8192):
        for vector_id, blob in batch:
            if not isinstance(blob, bytes) or len(blob) != width:
                size = f"{len(blob)} bytes" if isinstance(blob, bytes) else f"a {type(blob).__name__}"
                raise IndexDatabaseError(f"{index.path} is damaged (vector {vector_id} of model {model} is {size}, "
                                         f"not {width}: {state.dim} float32 values); {REBUILD}")
        if row + len(batch) > state.count:
            break
        ids[row : row + len(batch)] = [vector_id for vector_id, _ in batch]
        data = bytearray().join(blob for _, blob in batch)  # writable: torch reads it in place
        block = np.frombuffer(data, np.float32).reshape(-1, state.dim)
        rounded, largest = _rounded(block)
        norm = max(norm, largest)
        if streams is not None:
            streams[0].write(data)
            streams[1].write(rounded)
        else:
            vectors[row : row + len(batch)] = block
            bits[row : row + len(batch)] = rounded
        row += len(batch)
    if row != state.count:
        raise IndexDatabaseError(f"{index.path} is damaged (model {model} counts {state.count} vectors, "
                                 f"its rows are not those); {REBUILD}")
    if streams is not None:
        streams[1].write(np.array([norm], "<f8").tobytes())
        return ids, norm, None
    return ids, norm, (vectors, bits)


def _cached(folder: Path, stem: str, state: _State) -> tuple[np.ndarray, np.ndarray, Scan] | None:
    """The cache files, if they agree with the database: count, first and last id, width, type,
    the rounded file's trailer. A restored backup, a truncated file or another model's file is
    rebuilt, never searched."""
    try:
        ids, vectors = np.load(folder / f"{stem}.ids.npy"), np.load(folder / f"{stem}.npy", mmap_mode="c")
        bits = np.load(folder / f"{stem}.bf16", mmap_mode="c")  # copy-on-write: writable for torch
        with open(folder / f"{stem}.bf16", "rb") as file:
            file.seek(bits.offset + bits.nbytes)
            trailer = file.read(_TRAILER + 1)
    except (OSError, ValueError, EOFError):
        return None
    if (ids.dtype != np.int64 or ids.shape != (state.count,) or vectors.dtype != np.float32
            or vectors.shape != (state.count, state.dim) or bits.dtype != np.uint16 or bits.shape != vectors.shape
            or len(trailer) != _TRAILER):
        return None
    if state.count and (ids[0] != state.first or ids[-1] != state.last or not np.all(ids[1:] > ids[:-1])):
        return None
    return ids, vectors, Scan(bits, float(np.frombuffer(trailer, "<f8")[0]))


def _rebuild(index: Index, model: int, state: _State, folder: Path, stem: str) -> tuple[np.ndarray, np.ndarray, Scan]:
    """Build the cache of ``state`` in place (temporary files renamed over); where it cannot
    be written (a read-only place, a full disk), in memory for this search only."""
    temps: list[str] = []
    try:
        folder.mkdir(exist_ok=True)
        for suffix in (".npy", ".bf16", ".ids.npy"):
            fd, temp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=folder)
            os.close(fd)
            temps.append(temp)
            os.chmod(temp, 0o666 & ~umask())  # as readable as the database beside it
        with open(temps[0], "wb") as matrix_out, open(temps[1], "wb") as rounded_out:
            ids, norm, _ = _build(index, model, state, (matrix_out, rounded_out))
        # mapped before the renames: valid whatever replaces them
        vectors, bits = np.load(temps[0], mmap_mode="c"), np.load(temps[1], mmap_mode="c")
        np.save(temps[2], ids)
        for temp, suffix in zip(temps[::-1], (".ids.npy", ".bf16", ".npy")):
            os.replace(temp, folder / f"{stem}{suffix}")
        return ids, vectors, Scan(bits, norm)
    except OSError:
        for temp in temps:
            Path(temp).unlink(missing_ok=True)
        ids, norm, (vectors, bits) = _build(index, model, state, None)
        return ids, vectors, Scan(bits, norm)
    except BaseException:
        for temp in temps:
            Path(temp).unlink(missing_ok=True)
        raise


def load_cache(index: Index, model: int) -> tuple[np.ndarray, np.ndarray, Scan]:
    """``(ids, vectors, scan)`` of ``model``'s current rows: the cache, if it agrees with the
    database, else rebuilt from one consistent read."""
    folder = cache_folder(index)
    index.db.execute("BEGIN")  # one snapshot: the generation, the counts and the rows
    try:
        state = _state(index, model)
        if not state.count:
            return (np.empty(0, np.int64), np.empty((0, state.dim), np.float32),
                    Scan(np.empty((0, state.dim), np.uint16), 0.0))
        stem = state.stem(index, model)
        found = _cached(folder, stem, state)
        if found is not None:
            return found
        built = _rebuild(index, model, state, folder, stem)
    finally:
        index.db.execute("COMMIT")
    for old in folder.glob(f"{index.uuid}-m{model}-g*"):  # earlier generations (never a newer one)
        found = re.match(rf"{re.escape(index.uuid)}-m{model}-g(\d+)[-.].*\.(npy|bf16)$", old.name)
        if found and (int(found[1]) < state.generation or (
                int(found[1]) == state.generation and not old.name.startswith(f"{stem}."))):
            old.unlink(missing_ok=True)
    return built


def load_matrix(index: Index, model: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of ``model``'s current rows in float32 (:func:`load_cache`)."""
    ids, vectors, _ = load_cache(index, model)
    return ids, vectors


def _floor(scores: torch.Tensor, k: int, threshold: float | None, slack: tuple[float, float]) -> float:
    """The lowest scanned score ``t`` a row of the exact top ``k`` (at least ``threshold``) can
    have. Each exact score is within ``e(t) = a + b|t|`` of ``t``; ``t - e(t)`` and ``t + e(t)``
    both grow with ``t`` (``b < 1``): the k-th best exact score is at least ``low``, the k-th
    best ``t`` less its ``e``, and only a row whose ``t + e(t)`` reaches ``low`` can be above it."""
    import torch

    a, b = slack
    kth = float(torch.topk(scores, k, sorted=False).values.min())
    low = max(kth - a - b * abs(kth), -math.inf if threshold is None else threshold)
    floor = (low - a) / (1 + b) if low >= a else (low - a) / (1 - b)
    return floor - 2**-20 * (1 + abs(floor))  # compared in float32


def top_scores(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, threshold: float | None,
               allowed: set[int] | None, scan: Scan | None = None) -> list[tuple[int, float]]:
    """``[(vector id, cosine)]`` of the ``k`` best rows (those in ``allowed``, at least
    ``threshold``), best first; ties by id. Given ``scan`` (the same rows rounded), it is
    scanned and only the rows that can be among them are scored from ``vectors``: the same hits."""
    import torch

    rows, excluded, candidates = None, None, len(ids)  # rows: a few allowed rows, copied out and scored
    if allowed is not None:
        wanted = np.array(sorted(allowed), np.int64)
        rows = np.searchsorted(ids, wanted)
        rows = rows[(rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == wanted)] if len(ids) else rows[:0]
        candidates = len(rows)
        if 4 * len(rows) >= len(ids):  # most (a wide date range): every row scored in place, the others masked
            excluded = torch.ones(len(ids), dtype=torch.bool)
            excluded[torch.from_numpy(rows)] = False
            rows = None
    if not candidates or k <= 0:
        return []
    k = min(k, candidates)
    best = None if scan is None else _scanned(vectors, ids, query, k, threshold, rows, excluded, scan)
    if best is None:  # no scan, or one that cannot narrow the rows down
        matrix = vectors if rows is None else np.ascontiguousarray(vectors[rows])  # a few rows: copied out
        scores = torch.mv(torch.from_numpy(matrix), torch.from_numpy(np.array(query, np.float32)))  # (N,)
        if excluded is not None:
            scores[excluded] = -torch.inf
        values, at = torch.topk(scores, k)
        at = at.numpy() if rows is None else rows[at.numpy()]
        best = list(zip(ids[at].tolist(), values.tolist()))
    if threshold is not None:
        best = [(i, s) for i, s in best if s >= threshold]
    return sorted(best, key=lambda hit: (-hit[1], hit[0]))


def _scanned(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, threshold: float | None,
             rows: np.ndarray | None, excluded: torch.Tensor | None, scan: Scan) -> list[tuple[int, float]] | None:
    """:func:`top_scores` by the rounded rows (``rows`` of them, or all but ``excluded``), then
    the candidates' exact scores (float64 sums of the float32 values); None where the slack
    leaves most rows candidates (then a float32 scan of every row costs no more)."""
    import torch

    slack = scan.slack(query)
    if not math.isfinite(slack[0]):
        return None
    matrix = torch.from_numpy(scan.bits if rows is None else np.ascontiguousarray(scan.bits[rows]))
    scores = torch.mv(matrix.view(torch.bfloat16), torch.from_numpy(np.array(query, np.float32)).bfloat16()).float()
    if excluded is not None:
        scores[excluded] = -torch.inf
    floor = _floor(scores, k, threshold, slack)
    if not math.isfinite(floor):
        return None
    found = torch.nonzero(scores >= floor)[:, 0].numpy()  # (C,) in row order
    if 8 * len(found) > len(scores):
        return None
    at = found if rows is None else rows[found]
    wide = np.asarray(query, np.float64)
    exact = np.concatenate([vectors[at[start : start + 4096]].astype(np.float64) @ wide
                            for start in range(0, len(at), 4096)] or [np.empty(0)])
    order = np.lexsort((ids[at], -exact))[:k]
    return list(zip(ids[at[order]].tolist(), exact[order].tolist()))


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
    Exact: the hits and scores of every vector of the model scored (:func:`top_scores`)."""
    check_threshold(threshold)
    for place in under:
        named(place, "a place to search in")
    taken = (after, before)
    with index.guard():
        ids, vectors, scan = load_cache(index, model)
        if np.shape(query) != (vectors.shape[1],):
            raise InputError(f"the query has shape {np.shape(query)}; the model's vectors have {vectors.shape[1]} values")
        allowed = _allowed(index, model, under, taken)
        want = top_k
        while True:  # duplicates share a vector: widen until top_k files, or every vector
            best = top_scores(vectors, ids, query, want, threshold, allowed, scan)
            hits = _files_of(index, model, best, under, taken)
            if len(hits) >= top_k or len(best) < want:
                return [Hit(rank, path, score, taken=when, width=width, height=height, taken_source=source)
                        for rank, (path, score, when, width, height, source) in enumerate(hits[:top_k], start=1)]
            want *= 4
