"""Issue 21 (the third adversarial probe): the classes of failure it found, one test each.

So far: 1. an empty path (a script's unset ``"$DIR"``) named the current folder, and an index
update then removed every row under it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.errors import InputError
from clipcli.index import Index
from clipcli.tasks import update_index

DATA = Path(__file__).parent / "data"
runner = CliRunner()


@pytest.fixture
def indexed(tmp_path, tiny_vit_checkpoint, monkeypatch) -> tuple[Path, str]:
    """An index of tests/data's photos, with the current folder above them."""
    shutil.copytree(DATA, tmp_path / "photos", ignore=shutil.ignore_patterns("*.md"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPCLI_MODEL", str(tiny_vit_checkpoint))
    db = str(tmp_path / "index.sqlite3")
    result = runner.invoke(app, ["index", "photos", "--db", db, "-q"])
    assert result.exit_code == 0, result.stderr
    return tmp_path, db


def rows(db: str) -> int:
    with Index(db, readonly=True) as index:
        return len(list(index.rows()))


@pytest.mark.parametrize("args", [
    ["index", "", "--db", "{db}"], ["index", "  ", "--db", "{db}"], ["index", "photos", "", "--db", "{db}"],
    ["search", "a cat", "--in", "", "--db", "{db}"], ["search", "a cat", "--in", " ", "--no-update", "--db", "{db}"],
    ["search", "a cat", "--db", ""], ["index", "photos", "--db", "\t"],
    ["encode", "", "-o", "x.npy"], ["encode", "photos", "-o", ""], ["classify", "photos", "-l", "a", "-o", ""],
    ["classify", "photos", "--labels-file", ""], ["similarity", "photos", "--text-file", ""],
    ["encode", "photos", "--cache-dir", ""], ["encode", "photos", "-m", ""], ["train", "--train-data", "", "-o", "r"],
])
def test_an_empty_or_blank_path_is_a_usage_error_and_removes_nothing(indexed, args):
    folder, db = indexed
    before = rows(db)
    result = runner.invoke(app, [a.replace("{db}", db) for a in args])
    assert result.exit_code == 2 and "is empty: it names no file or folder" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and rows(db) == before > 0


def test_the_library_refuses_empty_paths_too(indexed, tiny_vit_checkpoint):
    from clipcli.items import expand_inputs
    from clipcli.pipeline import load_model
    from clipcli.search import parse_terms, search

    folder, db = indexed
    before = rows(db)
    with Index(db) as index:
        for inputs in ([""], [" "], ["photos", ""]):
            with pytest.raises(InputError, match="is empty"):
                update_index(index, inputs, str(tiny_vit_checkpoint), lambda: None)
        loaded = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("text",))
        with pytest.raises(InputError, match="is empty"):
            search(index, loaded, parse_terms(["a cat"]), under=[""])
    assert rows(db) == before
    with pytest.raises(InputError, match="is empty"):
        Index("")
    with pytest.raises(InputError, match="is empty"):
        expand_inputs(["photos", ""])
