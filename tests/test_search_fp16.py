"""Issue 27, item 4: a search scans the vector cache rounded to bfloat16, then scores the
candidates again from float32, and must return exactly the hits of an exact search.

Every test compares with a brute-force ranking (float64 sums of the stored float32 vectors,
ties by id) on 20,000 random unit vectors of 64 values plus a cluster of
near-ties: 200 rows whose exact scores against one direction are 1e-5 apart, 200 times closer
than bfloat16 can tell apart, so a scan alone would misorder them.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipcli import vectors as vectors_module
from clipcli.index import NEXT_GENERATION, Index
from clipcli.vectors import Scan, cache_folder, load_cache, search, top_scores

DIM, COUNT, TIES = 64, 20_000, 200


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def near_ties(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``TIES`` unit rows whose cosines with ``direction`` are 0.9, 0.9 + 1e-5, ... (shuffled),
    with two identical rows among them: an exact tie, which the ids settle."""
    cosines = rng.permutation(0.9 + 1e-5 * np.arange(TIES))
    across = rng.standard_normal((TIES, DIM))
    across -= np.outer(across @ direction, direction)
    rows = cosines[:, None] * direction + np.sqrt(1 - cosines**2)[:, None] * unit(across).astype(np.float64)
    rows[7] = rows[3]
    return rows.astype(np.float32)


def add(index: Index, rows: np.ndarray, start: int) -> None:
    """Rows as an index update stores them: vectors, a file each, a new generation."""
    shas = [f"{start + i:064x}" for i in range(len(rows))]
    index.db.execute("BEGIN")
    index.db.executemany("INSERT INTO vectors (model_id, sha256, vector) VALUES (1, ?, ?)",
                         zip(shas, (row.tobytes() for row in rows)))
    index.db.executemany("INSERT INTO files (path, size, mtime_ns, sha256, error, indexed) VALUES (?, 1, 1, ?, NULL, 0)",
                         ((f"/photos/{start + i:06d}.jpg".encode(), sha) for i, sha in enumerate(shas)))
    index.db.execute(f"UPDATE models SET generation = {NEXT_GENERATION}")
    index.db.execute("COMMIT")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """(the index's path, the direction of the near-ties)."""
    rng = np.random.default_rng(27)
    direction = unit(rng.standard_normal(DIM)).astype(np.float64)
    rows = unit(rng.standard_normal((COUNT, DIM)))
    rows[rng.choice(COUNT, TIES, replace=False)] = near_ties(direction, rng)
    db = tmp_path_factory.mktemp("fp16") / "index.sqlite3"
    with Index(db) as index:
        index.db.execute("INSERT INTO models (identity, name, dim) VALUES ('test', 'test', ?)", (DIM,))
        add(index, rows, 0)
    return db, direction


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int, threshold: float | None = None,
                allowed: set[int] | None = None) -> list[tuple[int, float]]:
    scores = np.asarray(vectors, np.float64) @ np.asarray(query, np.float64)
    keep = np.ones(len(ids), bool) if allowed is None else np.isin(ids, list(allowed))
    if threshold is not None:
        keep &= scores >= threshold
    order = np.lexsort((ids[keep], -scores[keep]))[:k]
    return list(zip(ids[keep][order].tolist(), scores[keep][order].tolist()))


def assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]], atol: float = 1e-9) -> None:
    """The same ids in the same order, scores to ``atol`` (1e-9: the candidates' scores are
    float64 sums too; 1e-6 where every row is scored by float32 sums)."""
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=atol)


@pytest.fixture
def scanned(monkeypatch) -> list:
    """What each scan returned (None: it could not narrow the rows down)."""
    seen = []
    original = vectors_module._scanned

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    monkeypatch.setattr(vectors_module, "_scanned", spy)
    return seen


def queries(direction: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """Random unit queries, the near-ties' direction and queries within 1e-4 of it (their top k
    all near-ties, a few 1e-7 apart)."""
    rng = np.random.default_rng(seed)
    near = [unit(direction)] + [unit(direction + 1e-4 * rng.standard_normal(DIM)) for _ in range(count // 2 - 1)]
    return [unit(rng.standard_normal(DIM)) for _ in range(count - len(near))] + near


def test_the_rounding_moves_no_score_beyond_the_slack(library):
    """The premise of the candidate bound, checked on this CPU's bfloat16 product: every row's
    exact score is within ``a + b |t|`` of its scanned score ``t``."""
    import torch

    db, direction = library
    with Index(db, readonly=True) as index:
        ids, vectors, scan = load_cache(index, 1)
    matrix = torch.from_numpy(np.asarray(scan.bits)).view(torch.bfloat16)
    for query in queries(direction, 6, seed=1):
        scanned_scores = torch.mv(matrix, torch.from_numpy(query).bfloat16()).double().numpy()
        exact = np.asarray(vectors, np.float64) @ query.astype(np.float64)
        a, b = scan.slack(query)
        assert np.all(np.abs(exact - scanned_scores) <= a + b * np.abs(scanned_scores))
        assert 0 < a < 0.01  # a useful bound: 0.005 to 0.006 for unit vectors


def test_top_k_equals_a_brute_force_ranking(library, scanned):
    db, direction = library
    with Index(db, readonly=True) as index:
        ids, vectors, scan = load_cache(index, 1)
    assert scan.bits.dtype == np.uint16 and scan.bits.shape == vectors.shape == (COUNT, DIM)
    for k in (1, 10, 50):
        for query in queries(direction, 20, seed=k):
            assert_same(top_scores(vectors, ids, query, k, None, None, scan), brute_force(ids, vectors, query, k))
    assert len(scanned) == 60 and all(found is not None for found in scanned)  # every one from the scan


def test_a_threshold_and_allowed_rows_give_the_brute_force_hits(library, scanned):
    db, direction = library
    with Index(db, readonly=True) as index:
        ids, vectors, scan = load_cache(index, 1)
    rng = np.random.default_rng(5)
    few = {int(i) for i in rng.choice(ids, 2000, replace=False)}  # copied out
    most = {int(i) for i in ids if i % 5}  # scored in place, the rest masked
    for query in queries(direction, 8, seed=9):
        for threshold in (None, 0.3, 0.90099, 0.95):
            for allowed in (None, few, most, set()):
                got = top_scores(vectors, ids, query, 10, threshold, allowed, scan)
                assert_same(got, brute_force(ids, vectors, query, 10, threshold, allowed))
    assert any(found for found in scanned) and all(found is not None for found in scanned)


def test_search_returns_the_brute_force_files_and_an_update_rebuilds_the_cache(library, tmp_path):
    source, direction = library
    db = tmp_path / "index.sqlite3"
    db.write_bytes(source.read_bytes())
    query = unit(direction)
    with Index(db, readonly=True) as index:
        ids, vectors, _ = load_cache(index, 1)
        hits = search(index, 1, query, top_k=12, threshold=0.9)
    want = brute_force(ids, vectors, query, 12, 0.9)
    assert [hit.name for hit in hits] == [f"/photos/{i - 1:06d}.jpg" for i, _ in want]  # vector i: file i - 1
    np.testing.assert_allclose([hit.score for hit in hits], [s for _, s in want], rtol=0, atol=1e-9)
    before = sorted(p.name for p in cache_folder(Index(db, readonly=True)).iterdir())
    assert [name.rsplit(".", 1)[-1] for name in before] == ["bf16", "npy", "npy"]

    rng = np.random.default_rng(11)
    with Index(db) as index:
        add(index, unit(direction + 1e-3 * rng.standard_normal((40, DIM))), COUNT)
    with Index(db, readonly=True) as index:
        hits = search(index, 1, query, top_k=12)
        ids, vectors, _ = load_cache(index, 1)
    assert len(ids) == COUNT + 40
    want = brute_force(ids, vectors, query, 12)
    assert all(i > COUNT for i, _ in want)  # the new rows are the best
    assert [hit.name for hit in hits] == [f"/photos/{i - 1:06d}.jpg" for i, _ in want]
    after = sorted(p.name for p in cache_folder(Index(db, readonly=True)).iterdir())
    assert len(after) == 3 and not set(after) & set(before)  # the older generation's files went


def test_a_spoiled_rounded_file_is_rebuilt(library, tmp_path):
    source, direction = library
    db = tmp_path / "index.sqlite3"
    db.write_bytes(source.read_bytes())
    with Index(db, readonly=True) as index:
        load_cache(index, 1)
    rounded = next(cache_folder(Index(db, readonly=True)).glob("*.bf16"))
    size = rounded.stat().st_size
    for spoil in (lambda data: data[:-1], lambda data: data[:-8] + np.array([1.0]).tobytes() + b"x",
                  lambda data: data[: len(data) // 2]):
        rounded.write_bytes(spoil(rounded.read_bytes()))
        with Index(db, readonly=True) as index:
            ids, vectors, scan = load_cache(index, 1)
        assert scan.norm > 0.99 and rounded.stat().st_size == size
        query = unit(direction)
        assert_same(top_scores(vectors, ids, query, 10, None, None, scan), brute_force(ids, vectors, query, 10))


def test_from_memory_and_with_a_non_finite_vector_the_hits_are_the_same(library, tmp_path, monkeypatch, scanned):
    source, direction = library
    db = tmp_path / "index.sqlite3"
    db.write_bytes(source.read_bytes())
    query = unit(direction)

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("clipcli.vectors.tempfile.mkstemp", refuse)
        with Index(db, readonly=True) as index:
            ids, vectors, scan = load_cache(index, 1)
    assert not cache_folder(Index(db, readonly=True)).exists() or not any(cache_folder(Index(db, readonly=True)).iterdir())
    assert isinstance(scan, Scan) and not isinstance(vectors, np.memmap)
    assert_same(top_scores(vectors, ids, query, 10, None, None, scan), brute_force(ids, vectors, query, 10))
    assert scanned[-1] is not None

    huge = np.zeros((1, DIM), np.float32)
    huge[0, 0] = np.inf  # a damaged row: no rounding bounds it, so every row is scored in float32
    with Index(db) as index:
        add(index, huge, COUNT)
    with Index(db, readonly=True) as index:
        ids, vectors, scan = load_cache(index, 1)
    assert scan.norm == np.inf
    assert_same(top_scores(vectors, ids, query, 10, None, None, scan), brute_force(ids, vectors, query, 10), 1e-6)
    assert scanned[-1] is None
