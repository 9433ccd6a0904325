"""`clipcli index` / `clipcli search`: incremental updates, content reuse, crash safety,
concurrency, bad databases, and search results against a brute-force recomputation with
OpenAI's reference package."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import openai_clip
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.errors import IndexDatabaseError, InputError
from clipcli.http import FetchOptions
from clipcli.images import DecodeOptions
from clipcli.index import Index, default_path
from clipcli.tasks import RunOptions, update_index

DATA = Path(__file__).parent / "data"
runner = CliRunner()
EXACT = RunOptions(decode=DecodeOptions(exact=True), fetch=FetchOptions())


@pytest.fixture
def model(tiny_vit_checkpoint, monkeypatch) -> str:
    monkeypatch.setenv("CLIPCLI_MODEL", str(tiny_vit_checkpoint))
    return str(tiny_vit_checkpoint)


def loader(model: str, calls: list | None = None):
    from clipcli.pipeline import load_model

    def load():
        if calls is not None:
            calls.append(1)
        return load_model(model, device="cpu", towers=("image",))

    return load


def update(db: Path, inputs, model: str, calls: list | None = None, run: RunOptions = RunOptions()):
    with Index(db) as index:
        return update_index(index, [str(p) for p in inputs], model, loader(model, calls), run=run)


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result.stdout


# ----------------------------------------------------------------------------- search parity


def test_search_equals_a_brute_force_recomputation_with_the_reference(photos, model, tmp_path):
    clip = openai_clip()
    reference, preprocess = clip.load(model, device="cpu", jit=False)
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model, run=EXACT)
    files = sorted(p for p in photos.iterdir())
    with torch.no_grad():
        images = reference.encode_image(torch.stack([preprocess(Image.open(p)) for p in files])).float()
        images = images / images.norm(dim=-1, keepdim=True)

        def text(t: str) -> torch.Tensor:
            e = reference.encode_text(clip.tokenize([t])).float()[0]
            return e / e.norm()

    queries = {
        ("a photo of a cat",): text("a photo of a cat"),
        (str(files[2]),): images[2],
        ("2:a rocket", "0.5:an astronaut", "--minus", "a cup of coffee"):
            2 * text("a rocket") + 0.5 * text("an astronaut") - text("a cup of coffee"),
    }
    for args, vector in queries.items():
        scores = images @ (vector / vector.norm())
        expected = sorted(zip(scores.tolist(), map(str, files)), key=lambda s: -s[0])[:4]
        out = cli("search", *args, "--db", str(db), "-k", "4", "--format", "json")
        got = [(r["score"], r["image"]) for r in json.loads(out)]
        assert [name for _, name in got] == [name for _, name in expected], args
        assert np.abs(np.array([s for s, _ in got]) - [s for s, _ in expected]).max() < 1e-4, args
        assert [r["rank"] for r in json.loads(out)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- updates


def test_an_unchanged_tree_never_loads_the_model(photos, model, tmp_path):
    db, calls = tmp_path / "db.sqlite3", []
    first = update(db, [photos], model, calls)
    assert (first.added, first.embedded, len(calls)) == (5, 5, 1)
    again = update(db, [photos], model, calls)
    assert (again.unchanged, again.added, again.model_loaded, len(calls)) == (5, 0, False, 1)
    os.utime(photos / "rocket.jpg")  # touched, same content: hashed, not embedded
    touched = update(db, [photos], model, calls)
    assert (touched.unchanged, touched.embedded, len(calls)) == (5, 0, 1)


def test_changes_renames_duplicates_and_removals(photos, model, tmp_path):
    db, calls = tmp_path / "db.sqlite3", []
    update(db, [photos], model, calls)
    (photos / "chelsea.png").rename(photos / "cat.png")  # a rename: reuses the vector
    shutil.copy(photos / "rocket.jpg", photos / "rocket copy.jpg")  # a duplicate: reuses it too
    (photos / "camera.png").unlink()
    summary = update(db, [photos], model, calls)
    assert (summary.moved, summary.added, summary.removed, summary.unchanged, summary.model_loaded) == (1, 1, 1, 3, False)
    Image.open(DATA / "camera.png").convert("RGB").save(photos / "rocket.jpg")  # new content, same name
    summary = update(db, [photos], model, calls)
    assert (summary.updated, summary.embedded, len(calls)) == (1, 1, 2)
    with Index(db) as index:
        rows = {Path(r["path"]).name: r for r in index.rows()}
        assert sorted(rows) == ["astronaut.png", "cat.png", "grace_hopper.jpg", "rocket copy.jpg", "rocket.jpg"]
        assert rows["rocket copy.jpg"]["sha256"] != rows["rocket.jpg"]["sha256"]
        assert index.db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 5  # the orphan went


def test_failed_files_are_retried_only_once_they_change(photos, model, tmp_path):
    db, calls = tmp_path / "db.sqlite3", []
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff this JPEG stops here")
    assert update(db, [photos], model, calls).failed == 1
    again = update(db, [photos], model, calls)
    assert (again.failed, again.unchanged, again.model_loaded) == (0, 6, False)
    shutil.copy(photos / "rocket.jpg", photos / "broken.jpg")
    fixed = update(db, [photos], model, calls)
    assert (fixed.failed, fixed.updated) == (0, 1)


def test_folders_that_vanish_loop_or_replace_files(photos, model, tmp_path):
    db = tmp_path / "db.sqlite3"
    (photos / "sub").mkdir()
    shutil.copy(photos / "rocket.jpg", photos / "sub" / "r.jpg")
    Image.new("RGB", (40, 30), "red").save(photos / "sub" / "red.png")
    (photos / "sub" / "loop").symlink_to(photos)  # a symlink loop is walked once
    assert update(db, [photos], model).added == 7
    shutil.rmtree(photos / "sub")
    (photos / "rocket.jpg").unlink()
    (photos / "rocket.jpg").mkdir()  # a file replaced by a folder
    summary = update(db, [photos], model)
    assert summary.removed == 3 and summary.failed == 0
    with Index(db) as index:
        assert len(list(index.rows())) == 4


def test_non_utf8_names_are_stored_as_the_filesystems_bytes(photos, model, tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, not UTF-8
    shutil.copy(photos / "camera.png", photos / name)
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    with Index(db) as index:
        keys = [row[0] for row in index.db.execute("SELECT path FROM files")]
    assert os.fsencode(str(photos)) + b"/caf\xe9.png" in keys
    out = runner.invoke(app, ["search", str(photos / name), "--db", str(db), "--format", "paths", "-k", "2"]).stdout_bytes
    assert b"caf\xe9.png" in out.splitlines()[0] or b"camera.png" in out.splitlines()[0]


def test_an_emptied_or_vanished_folder_loses_its_rows(photos, model, tmp_path):
    db = tmp_path / "db.sqlite3"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(photos / "rocket.jpg", other / "r.jpg")
    update(db, [photos, other], model)
    for path in photos.iterdir():
        path.unlink()
    assert update(db, [photos, other], model).removed == 5
    shutil.rmtree(photos)
    shutil.rmtree(other)
    assert update(db, [other], model).removed == 1
    with Index(db) as index:
        assert list(index.rows()) == []
    with pytest.raises(InputError, match="no such file"):
        update(db, [tmp_path / "never-was"], model)


def test_a_folder_that_cannot_be_read_keeps_its_rows(photos, model, tmp_path, monkeypatch):
    db = tmp_path / "db.sqlite3"
    (photos / "sub").mkdir()
    shutil.copy(photos / "rocket.jpg", photos / "sub" / "r2.jpg")
    update(db, [photos], model)
    real = os.scandir

    def refuse(path="."):
        if os.fspath(path).endswith("/sub"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", refuse)
    summary = update(db, [photos], model)
    assert (summary.failed, summary.removed) == (1, 0)
    with Index(db) as index:
        assert any(row["path"].endswith("/sub/r2.jpg") for row in index.rows())


def test_a_newly_unreadable_file_is_reported_and_retried_once_readable(photos, model, tmp_path, monkeypatch):
    """Tested by failing the read (the tests run as root, who reads any file): its row and
    vector stay, it is reported each run, and it is indexed once it can be read, even with
    the same mtime (a fixed permission changes none)."""
    import clipcli.fsutil

    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    target = photos / "rocket.jpg"
    Image.open(DATA / "camera.png").convert("RGB").save(target)  # changed, then unreadable
    real = clipcli.fsutil.sha256_file

    def refuse(path, *args):
        if str(path) == str(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(clipcli.fsutil, "sha256_file", refuse)
    for _ in range(2):
        summary = update(db, [photos], model)
        assert (summary.failed, summary.unchanged, summary.removed) == (1, 4, 0)
    monkeypatch.setattr(clipcli.fsutil, "sha256_file", real)
    assert update(db, [photos], model).updated == 1


def test_a_file_that_changes_while_it_is_embedded_is_left_for_the_next_run(photos, model, tmp_path):
    from clipcli.batching import embed_images
    from clipcli.indexing import update as update_rows
    from clipcli.loading import resolve, source_key
    from clipcli.pipeline import load_model

    target = photos / "rocket.jpg"

    def embed(loaded, items):
        for result in embed_images(loaded, items, normalize=True):
            if result.name == str(target):
                Image.open(DATA / "camera.png").convert("RGB").save(target)  # rewritten under our feet
            yield result

    db = tmp_path / "db.sqlite3"
    with Index(db) as index:
        summary = update_rows(index, [str(photos)], source_key(resolve(model)), lambda: load_model(model, device="cpu"),
                              embed=embed)
        assert summary.failed == 1 and summary.added == 4
        assert not any(row["path"].endswith("rocket.jpg") for row in index.rows())
    assert update(db, [photos], model).added == 1


def test_two_models_in_one_index_never_mix(photos, model, tmp_path, tiny_rn_checkpoint, monkeypatch):
    import clipcli.fsutil

    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    hashed = []
    real = clipcli.fsutil.sha256_file
    monkeypatch.setattr(clipcli.fsutil, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    second = update(db, [photos], str(tiny_rn_checkpoint))
    images_hashed = [path for path in hashed if str(photos) in str(path)]
    assert second.embedded == 5 and images_hashed == []  # the stored hashes serve the second model too
    with Index(db) as index:
        assert [m["vectors"] for m in index.models()] == [5, 5]
    for checkpoint in (model, str(tiny_rn_checkpoint)):
        found = cli("search", "a rocket", "--db", str(db), "-m", checkpoint, "--format", "json")
        assert len(json.loads(found)) == 5


def test_in_does_not_reach_a_sibling_folder_with_the_same_prefix(photos, model, tmp_path):
    db = str(tmp_path / "db.sqlite3")
    sibling = tmp_path / "photos2"
    shutil.copytree(photos, sibling)
    Image.new("RGB", (30, 30), "blue").save(sibling / "blue.png")
    cli("index", str(photos), str(sibling), "--db", db, "-q")
    found = cli("search", "a rocket", "--db", db, "--in", str(photos), "--no-update", "--format", "paths", "-k", "50")
    assert len(found.splitlines()) == 5 and all(line.startswith(str(photos) + "/") for line in found.splitlines())


# ----------------------------------------------------------------------------- the database


def test_files_that_are_not_an_index_are_refused_and_left_alone(tmp_path, photos, model):
    text = tmp_path / "notes.sqlite3"
    text.write_bytes(b"this is not a database, just text\n" * 100)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    newer = tmp_path / "newer.sqlite3"
    update(newer, [photos], model)
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    for path, message in [(text, "not a clipcli index"), (other, "another program"), (newer, "newer than")]:
        before = path.read_bytes()
        result = runner.invoke(app, ["index", str(photos), "--db", str(path)])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert path.read_bytes() == before


def test_a_read_only_index_searches_but_does_not_update(photos, model, tmp_path):
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    with Index(db, readonly=True) as index:
        with pytest.raises(IndexDatabaseError, match="read-only"):
            update_index(index, [str(photos)], model, loader(model))
    assert "rocket.jpg" in cli("search", "a rocket", "--db", str(db), "--format", "paths")


def test_searching_with_a_model_that_has_no_vectors_says_how_to_index(photos, model, tmp_path, tiny_rn_checkpoint):
    db = tmp_path / "db.sqlite3"
    update(db, [photos], model)
    result = runner.invoke(app, ["search", "a cat", "--db", str(db), "-m", str(tiny_rn_checkpoint)])
    assert result.exit_code == 2 and "holds no vectors" in result.stderr and "clipcli index" in result.stderr
    missing = runner.invoke(app, ["search", "a cat", "--db", str(tmp_path / "none.sqlite3")])
    assert missing.exit_code == 2 and "no index at" in missing.stderr


def test_the_default_database_is_under_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CLIPCLI_INDEX", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_path() == tmp_path / "data" / "clipcli" / "index.sqlite3"
    monkeypatch.setenv("CLIPCLI_INDEX", str(tmp_path / "mine.db"))
    assert default_path() == tmp_path / "mine.db"


# ----------------------------------------------------------------------------- the commands


def test_in_limits_results_and_updates_that_folder_first(photos, model, tmp_path):
    db = str(tmp_path / "db.sqlite3")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(photos / "chelsea.png", other / "kitty.png")
    summary = json.loads(cli("index", str(photos), "--db", db, "--format", "json", "-q"))
    assert summary["added"] == 5 and summary["db"] == db
    assert cli("search", "a cat", "--db", db, "--in", str(other), "--no-update", "--format", "paths") == ""
    found = cli("search", "a cat", "--db", db, "--in", str(other), "--format", "paths", "-q").splitlines()
    assert found == [str(other / "kitty.png")]
    everything = cli("search", "a cat", "--db", db, "--format", "jsonl").splitlines()
    assert len(everything) == 6
    scores = [json.loads(line)["score"] for line in everything]
    some = cli("search", "a cat", "--db", db, "--threshold", str(scores[2]), "--format", "jsonl").splitlines()
    assert len(some) == 3
    sheet = tmp_path / "sheet.png"
    cli("search", "a cat", "--db", db, "-k", "3", "-o", str(sheet), "--format", "json")
    assert Image.open(sheet).size == (600, 234)


def test_index_command_reports_failures_on_stderr_and_exits_1(photos, model, tmp_path):
    (photos / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["index", str(photos), "--db", str(tmp_path / "db.sqlite3")])
    assert result.exit_code == 1 and result.stdout == ""
    assert "skipping" in result.stderr and "broken.png" in result.stderr
    assert "5 added" in result.stderr and "1 failed" in result.stderr


# ----------------------------------------------------------------------------- crashes and concurrency


@pytest.fixture
def many(tmp_path) -> Path:
    """300 distinct small images."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        Image.new("RGB", (48, 40), (i % 256, 40 + 100 * (i // 256), (i * 37) % 256)).save(folder / f"{i:03d}.png")
    return folder


def index_process(folder: Path, db: Path, model: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "clipcli", "index", str(folder), "--db", str(db), "-m", model,
               "--batch-size", "2", "--workers", "0", "--device", "cpu", "--threads", "1", "-q"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def vectors(db: Path) -> dict[str, np.ndarray]:
    with Index(db) as index:
        return {os.path.basename(os.fsdecode(path)): np.frombuffer(blob, np.float32) for path, blob in index.db.execute(
            "SELECT f.path, v.vector FROM files f JOIN vectors v ON v.sha256 = f.sha256")}


@pytest.mark.slow  # subprocesses; run by `pytest -m slow` and .ci/run
def test_a_killed_index_run_finishes_on_the_next_run(many, model, tmp_path):
    clean = tmp_path / "clean.sqlite3"
    update(clean, [many], model)
    db = tmp_path / "db.sqlite3"
    process = index_process(many, db, model)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once some batches are committed, before the end
        time.sleep(0.05)
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as check:
                if check.execute("SELECT count(*) FROM files").fetchone()[0] >= 8:
                    break
        except sqlite3.Error:
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    with sqlite3.connect(db) as check:
        assert 8 <= check.execute("SELECT count(*) FROM files").fetchone()[0] < 300
    update(db, [many], model)
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check.execute("SELECT count(*), count(DISTINCT path) FROM files").fetchone() == (300, 300)
    got, want = vectors(db), vectors(clean)
    assert got.keys() == want.keys() and len(got) == 300
    assert max(np.abs(got[k] - want[k]).max() for k in got) < 1e-5


@pytest.mark.slow  # subprocesses; run by `pytest -m slow` and .ci/run
def test_two_index_runs_at_once_both_finish_and_nothing_doubles(many, model, tmp_path):
    db = tmp_path / "db.sqlite3"
    runs = [index_process(many, db, model) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()[-2000:]
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT count(*), count(DISTINCT path) FROM files").fetchone() == (300, 300)
        assert check.execute("SELECT count(*) FROM vectors").fetchone()[0] == 300
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
