"""Issue 21, the index classes: SQLite failures (a damaged file, a bad vector, a full disk,
``ulimit -f``), a vector cache that disagrees with its database, a read-only index with a
write-ahead log left behind, odd files given as the index, and non-finite thresholds and
query weights. Each is one line on stderr with the error's exit code, never a traceback,
and nothing is half-written."""

from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipcli import index as index_module
from clipcli.cli import app
from clipcli.errors import IndexDatabaseError, InputError, NoVectorsError, WriteError
from clipcli.index import Index
from clipcli.search import Term, parse_terms, query_vector
from clipcli.tasks import RunOptions, update_index
from clipcli.vectors import cache_folder, check_threshold
from clipcli.vectors import search as nearest

DATA = Path(__file__).parent / "data"
runner = CliRunner()


@pytest.fixture
def model(tiny_vit_checkpoint, monkeypatch) -> str:
    monkeypatch.setenv("CLIPCLI_MODEL", str(tiny_vit_checkpoint))
    return str(tiny_vit_checkpoint)


def images(folder: Path, count: int, seed: int) -> Path:
    """``count`` distinct small images (noise: no two alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{seed}-{i:03d}.png")
    return folder


def loader(model: str):
    from clipcli.pipeline import load_model

    return lambda: load_model(model, device="cpu", towers=("image",))


def update(db: Path, inputs, model: str, batch_size: int | None = None):
    with Index(db) as index:
        return update_index(index, [str(p) for p in inputs], model, loader(model), run=RunOptions(batch_size=batch_size))


def stored(db: Path) -> dict[str, np.ndarray]:
    """Each file's vector, read from SQLite directly: the truth a search must agree with."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as check:
        return {os.fsdecode(path): np.frombuffer(blob, np.float32) for path, blob in check.execute(
            "SELECT f.path, v.vector FROM files f JOIN vectors v ON v.sha256 = f.sha256")}


def brute_force(db: Path, query: np.ndarray, k: int) -> list[tuple[str, float]]:
    scores = sorted(((float(v @ query), p) for p, v in stored(db).items()), key=lambda s: (-s[0], s[1]))
    return [(p, s) for s, p in scores[:k]]


def searched(db: Path, query: np.ndarray, k: int = 8) -> list[tuple[str, float]]:
    with Index(db, readonly=True) as index:
        return [(hit.name, hit.score) for hit in nearest(index, 1, query, top_k=k)]


def assert_same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [p for p, _ in got] == [p for p, _ in want]
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


def one_line(result, code: int, *words: str) -> str:
    """The command failed with ``code`` and said so in one line holding ``words``."""
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    said = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]  # the tiny model's
    assert "Traceback" not in result.stderr and len(said) == 1, result.stderr
    for word in words:
        assert word in said[0], said
    return said[0]


def checkpointed(db: Path) -> None:
    """Fold the write-ahead log into the file, as a clean close does."""
    with sqlite3.connect(db) as folding:
        folding.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


# ----------------------------------------------------------------------------- 4: SQLite failures


def damage_pages(db: Path) -> None:
    """Every page after the first (the header and the schema) overwritten."""
    checkpointed(db)
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = bytes([0xA5]) * (len(data) - page)
    db.write_bytes(bytes(data))


def truncate_pages(db: Path) -> None:
    checkpointed(db)
    data = db.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    db.write_bytes(data[: page + page // 2])


def overwrite_header(db: Path) -> None:
    checkpointed(db)
    data = bytearray(db.read_bytes())
    data[:16] = b"garbage garbage!"
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [damage_pages, truncate_pages, overwrite_header])
def test_a_damaged_index_is_named_damaged_with_how_to_rebuild_and_left_alone(photos, model, tmp_path, damage):
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    damage(db)
    before = db.read_bytes()
    for args in (["search", "a cat"], ["index", str(photos)], ["search", "a cat", "--in", str(photos)]):
        said = one_line(runner.invoke(app, [*args, "--db", str(db)]), 2, str(db), "damaged", "move it away")
        assert "not a clipcli index" not in said and "upgrade" not in said
        assert db.read_bytes() == before


def test_a_vector_of_the_wrong_length_is_named(photos, model, tmp_path):
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    with sqlite3.connect(db) as change:
        change.execute("UPDATE vectors SET vector = x'00010203' WHERE id = (SELECT max(id) FROM vectors)")
    said = one_line(runner.invoke(app, ["search", "a cat", "--db", str(db)]), 2, str(db), "damaged", "4 bytes")
    assert "move it away" in said
    with Index(db, readonly=True) as index, pytest.raises(IndexDatabaseError, match="is 4 bytes"):
        nearest(index, 1, np.ones(stored(db).popitem()[1].size, np.float32))


def test_a_full_disk_part_way_is_a_write_error_and_nothing_is_half_written(model, tmp_path):
    folder = images(tmp_path / "many", 60, seed=1)
    db = tmp_path / "db.sqlite3"
    with Index(db) as index:
        pages = index.db.execute("PRAGMA page_count").fetchone()[0]
        index.db.execute(f"PRAGMA max_page_count = {pages + 6}")  # SQLite then says "database or disk is full"
        with pytest.raises(WriteError, match="cannot write .*full.*nothing was half-written") as raised:
            update_index(index, [str(folder)], model, loader(model), run=RunOptions(batch_size=4))
    assert raised.value.exit_code == 1 and str(db) in str(raised.value)
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        files, vectors = check.execute("SELECT count(*), count(v.id) FROM files f LEFT JOIN vectors v "
                                       "ON v.sha256 = f.sha256").fetchone()
    assert 0 < files < 60 and files == vectors  # whole batches: every row committed has its vector
    assert update(db, [folder], model).added == 60 - files  # the next run finishes the work


def test_a_file_size_limit_is_one_line_and_exit_code_1(model, tmp_path):
    folder = images(tmp_path / "many", 150, seed=2)
    db = tmp_path / "db.sqlite3"
    limit = 256 * 1024  # room to create the index; not for all of its log

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail

    result = subprocess.run([sys.executable, "-m", "clipcli", "index", str(folder), "--db", str(db), "-m", model,
                             "--batch-size", "4", "--workers", "0", "--device", "cpu", "-q"],
                            capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"cannot write {db}" in result.stderr and "ulimit -f" in result.stderr and "higher limit" in result.stderr
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        files, vectors = check.execute("SELECT count(*), count(v.id) FROM files f LEFT JOIN vectors v "
                                       "ON v.sha256 = f.sha256").fetchone()
    assert files == vectors < 150


def test_sqlite_errors_are_named_by_their_cause(tmp_path):
    db = tmp_path / "db.sqlite3"
    with Index(db) as index:
        def error(code: int, text: str, writing: bool = False):
            failure = sqlite3.OperationalError(text)
            failure.sqlite_errorcode = code
            return index._error(failure, writing)

        assert isinstance(error(13, "database or disk is full", True), WriteError)
        assert "damaged" in str(error(11, "database disk image is malformed"))
        assert "damaged" in str(error(1, "no such table: files"))
        assert "locked" in str(error(5, "database is locked"))
        assert "cannot read" in str(error(266, "disk I/O error"))
        assert isinstance(error(7, "out of memory"), MemoryError)


# ----------------------------------------------------------------------------- 12: the vector cache


def first_hit(db: Path, name: str) -> tuple[str, float]:
    """The best hit for the stored vector of the file ``name`` (an image query of itself)."""
    query = next(v for p, v in stored(db).items() if p.endswith(name))
    got = searched(db, query)
    assert_same(got, brute_force(db, query, 8))
    return got[0]


def test_an_index_restored_from_a_backup_never_searches_a_stale_cache(model, tmp_path):
    db, backup = tmp_path / "db.sqlite3", tmp_path / "backup.sqlite3"
    update(db, [images(tmp_path / "a", 12, seed=3)], model)
    shutil.copy(db, backup)
    update(db, [images(tmp_path / "b", 6, seed=4)], model)  # after the backup: a cache of these rows
    assert first_hit(db, "4-002.png")[1] > 0.9999
    shutil.copy(backup, db)  # restored; the cache stays
    name, score = first_hit(db, "3-005.png")
    assert name.endswith("3-005.png") and score > 0.9999
    update(db, [images(tmp_path / "c", 6, seed=5)], model)  # as many new rows as before the restore
    name, score = first_hit(db, "5-001.png")
    assert name.endswith("5-001.png") and score > 0.9999


def test_a_cache_of_a_restored_backup_at_the_same_generation_is_rebuilt(model, tmp_path):
    """An older clipcli counted generations up by one: a restored backup changed again could
    reach the generation of the cache built before the restore. The cache is checked anyway."""
    db, backup = tmp_path / "db.sqlite3", tmp_path / "backup.sqlite3"
    update(db, [images(tmp_path / "a", 12, seed=3)], model)
    shutil.copy(db, backup)
    update(db, [images(tmp_path / "b", 6, seed=4)], model, batch_size=64)
    first_hit(db, "4-002.png")
    with sqlite3.connect(db) as check:
        generation = check.execute("SELECT generation FROM models").fetchone()[0]
    shutil.copy(backup, db)
    update(db, [images(tmp_path / "c", 6, seed=5)], model, batch_size=64)  # the same ids, other images
    with sqlite3.connect(db) as change:
        change.execute("UPDATE models SET generation = ?", (generation,))
    name, score = first_hit(db, "5-003.png")
    assert name.endswith("5-003.png") and score > 0.9999
    name, score = first_hit(db, "3-007.png")
    assert name.endswith("3-007.png") and score > 0.9999


def cache_files(db: Path) -> tuple[Path, Path]:
    folder = cache_folder(Index(db, readonly=True))
    vectors = [p for p in folder.glob("*.npy") if not p.name.endswith(".ids.npy") and not p.name.startswith(".")]
    assert len(vectors) == 1
    return vectors[0], vectors[0].with_name(vectors[0].name[: -len(".npy")] + ".ids.npy")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def shorter(path: Path) -> None:
    np.save(path, np.load(path)[:-3])  # a valid file, three rows short


def wider(path: Path) -> None:
    data = np.load(path)
    np.save(path, np.concatenate([data, np.ones((len(data), 3), data.dtype)], axis=1))


def foreign(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float64))


@pytest.mark.parametrize("spoil, which", [(truncate, 0), (shorter, 0), (wider, 0), (foreign, 0),
                                          (truncate, 1), (shorter, 1)])  # 0: the vectors, 1: their ids
def test_a_spoiled_cache_file_is_rebuilt(model, tmp_path, spoil, which):
    db = tmp_path / "db.sqlite3"
    update(db, [images(tmp_path / "a", 10, seed=6)], model)
    first_hit(db, "6-004.png")
    spoil(cache_files(db)[which])
    name, score = first_hit(db, "6-004.png")
    assert name.endswith("6-004.png") and score > 0.9999
    cached, ids = cache_files(db)  # rebuilt in place
    assert np.load(cached).shape == (10, stored(db).popitem()[1].size) and np.load(ids).shape == (10,)


def test_a_read_only_cache_folder_is_searched_from_memory(model, tmp_path, monkeypatch):
    db = tmp_path / "db.sqlite3"
    update(db, [images(tmp_path / "a", 8, seed=7)], model)
    first_hit(db, "7-001.png")
    wider(cache_files(db)[0])

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("clipcli.vectors.tempfile.mkstemp", refuse)  # a full disk or a read-only folder
    name, score = first_hit(db, "7-001.png")
    assert name.endswith("7-001.png") and score > 0.9999


# ----------------------------------------------------------------------------- 13: a read-only index with a WAL


LEAVE_A_LOG = """
import os, sys
from clipcli.index import Index
from clipcli.pipeline import load_model
from clipcli.tasks import RunOptions, update_index
db, folder, model = sys.argv[1:]
index = Index(db)
index.db.execute("PRAGMA wal_autocheckpoint = 0")
update_index(index, [folder], model, lambda: load_model(model, device="cpu", towers=("image",)),
             run=RunOptions(batch_size=4))
os._exit(0)  # killed: the log is never folded into the file
"""


@pytest.fixture
def logged(model, tmp_path) -> tuple[Path, int]:
    """An index whose last 16 committed files are only in its write-ahead log."""
    db = tmp_path / "db.sqlite3"
    update(db, [images(tmp_path / "a", 24, seed=8)], model)
    subprocess.run([sys.executable, "-c", LEAVE_A_LOG, str(db), str(images(tmp_path / "b", 16, seed=9)), model],
                   check=True, timeout=300)
    assert Path(f"{db}-wal").stat().st_size > 32
    return db, 40


def cannot_share(monkeypatch) -> None:
    """SQLite cannot create the ``-shm`` file (a read-only folder; the tests may run as root)."""
    connect = sqlite3.connect

    def refuse(target, *args, **kwargs):
        if isinstance(target, str) and target.endswith("?mode=ro"):
            error = sqlite3.OperationalError("unable to open database file")
            error.sqlite_errorcode = 14
            raise error
        return connect(target, *args, **kwargs)

    monkeypatch.setattr(index_module.sqlite3, "connect", refuse)


def test_a_read_only_index_reads_what_its_log_holds(logged):
    db, count = logged
    with Index(db, readonly=True) as index:
        assert len(list(index.rows())) == count
    assert len(brute_force(db, np.ones(stored(db).popitem()[1].size, np.float32), 100)) == count


def test_a_log_that_cannot_be_read_is_refused_never_skipped(logged, monkeypatch):
    db, count = logged
    Path(f"{db}-shm").unlink()
    cannot_share(monkeypatch)
    with pytest.raises(IndexDatabaseError, match="write-ahead log"):
        Index(db, readonly=True)
    one_line(runner.invoke(app, ["search", "a cat", "--db", str(db)]), 2, str(db), "write-ahead log", "writable")


def test_without_a_log_a_read_only_folder_still_reads_the_file(logged, monkeypatch):
    db, count = logged
    checkpointed(db)
    cannot_share(monkeypatch)
    with Index(db, readonly=True) as index:
        assert len(list(index.rows())) == count


# ----------------------------------------------------------------------------- 19: odd files


def another_programs(path: Path, *statements: str) -> Path:
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda p: another_programs(p, "PRAGMA user_version = 7"), ["another program"]),
    (lambda p: another_programs(p, "PRAGMA application_id = 1234"), ["another program"]),
    (lambda p: another_programs(p, "CREATE TABLE t (x)"), ["another program"]),
    (lambda p: another_programs(p, "VACUUM"), ["did not create"]),
    (lambda p: p.write_bytes(b"just some text\n" * 50), ["not a clipcli index", "not an SQLite database"]),
])
def test_other_files_are_refused_for_what_they_are_and_left_untouched(tmp_path, photos, model, make, words):
    path = tmp_path / "other.db"
    make(path)
    before = path.read_bytes()
    for args in (["index", str(photos)], ["search", "a cat"]):
        said = one_line(runner.invoke(app, [*args, "--db", str(path)]), 2, str(path), *words)
        assert "upgrade" not in said and "schema" not in said
        assert path.read_bytes() == before


def test_an_index_missing_its_tables_is_damaged(photos, model, tmp_path):
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    with sqlite3.connect(db) as change:
        change.execute("DROP TABLE model_keys")
    one_line(runner.invoke(app, ["search", "a cat", "--db", str(db)]), 2, "damaged", "model_keys", "move it away")


def test_an_empty_file_is_no_index_yet_and_an_update_starts_one(tmp_path, photos, model):
    """A 0-byte file holds nothing to lose (``touch``, a bind-mount placeholder, a first run
    killed at once): searching says there is no index yet; indexing starts one in it."""
    db = tmp_path / "empty.sqlite3"
    db.touch()
    one_line(runner.invoke(app, ["search", "a cat", "--db", str(db)]), 2, "is an empty file, not an index yet")
    assert db.read_bytes() == b""
    with pytest.raises(NoVectorsError):
        Index(db, readonly=True)
    result = runner.invoke(app, ["index", str(photos), "--db", str(db)])
    assert result.exit_code == 0, result.stderr
    assert len(stored(db)) == 5


def test_a_first_run_killed_before_its_first_commit_is_taken_up(tmp_path, photos, model):
    db = tmp_path / "db.sqlite3"
    with sqlite3.connect(db, isolation_level=None) as started:  # what Index() does before migrating
        started.execute("PRAGMA journal_mode=WAL")
    one_line(runner.invoke(app, ["search", "a cat", "--db", str(db)]), 2, "empty SQLite database, not an index yet")
    assert update(db, [photos], model).added == 5


# ----------------------------------------------------------------------------- 20: thresholds and weights


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "2", "-1.5"])
def test_a_threshold_that_is_no_cosine_is_refused(photos, model, tmp_path, value):
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    said = one_line(runner.invoke(app, ["search", "a cat", "--db", str(db), "--threshold", value]), 2, "--threshold")
    assert "from -1 to 1" in said
    with pytest.raises(InputError) as raised:
        check_threshold(float(value))
    assert raised.value.option == "threshold"
    with Index(db, readonly=True) as index, pytest.raises(InputError, match="threshold"):
        nearest(index, 1, np.ones(stored(db).popitem()[1].size, np.float32), threshold=float(value))


@pytest.mark.parametrize("value", [-1, 0.25, 1.0, None])
def test_thresholds_that_are_cosines_are_taken(value):
    check_threshold(value)


def test_a_weight_too_large_for_a_float_is_refused_for_what_it_is(photos, model, tmp_path):
    weight = "1" * 400
    with pytest.raises(InputError, match="too large") as raised:
        parse_terms([f"{weight}:a cat"])
    assert "cancel" not in str(raised.value) and len(str(raised.value)) < 200
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    said = one_line(runner.invoke(app, ["search", f"{weight}:a cat", "--db", str(db)]), 2, "too large")
    assert "cancel" not in said


def test_large_finite_weights_give_the_query_their_ratio(tiny_vit_checkpoint):
    from clipcli.pipeline import load_model

    loaded = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("text",))
    huge = "9" * 308  # finite, but its square overflows
    got = query_vector(loaded, parse_terms([f"{huge}:a cat", f"{huge}:a dog"]))
    want = query_vector(loaded, [Term("a cat", 1.0), Term("a dog", 1.0)])
    assert np.allclose(got, want, atol=1e-6)
    with pytest.raises(InputError, match="cancel out"):
        query_vector(loaded, parse_terms(["0:a cat"]))
