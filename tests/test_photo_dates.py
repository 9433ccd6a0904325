"""Dates and metadata in the index (issue 24, item 3): EXIF capture times with and without their
offsets, the file's time when there is none, size as shown (orientation), camera and GPS;
``search --after/--before/--sort date``; and an index made by the previous schema migrated in
place without re-embedding."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.index import MIGRATIONS, Index
from clipcli.metadata import exif_time, iso, parse_when, read_metadata

runner = CliRunner()
DATA = Path(__file__).parent / "data"


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def photo(path: Path, when: str | None = None, offset: str | None = None, *, orientation: int | None = None,
          camera: tuple[str, str] | None = None, gps: bool = False, size=(64, 48), colour=(200, 40, 40)) -> Path:
    """A JPEG with the EXIF the arguments ask for, written by Pillow."""
    image = Image.new("RGB", size, colour)
    exif = Image.Exif()
    details = exif.get_ifd(0x8769)
    if when is not None:
        details[0x9003] = when  # DateTimeOriginal
    if offset is not None:
        details[0x9011] = offset  # OffsetTimeOriginal
    if orientation is not None:
        exif[0x0112] = orientation
    if camera is not None:
        exif[0x010F], exif[0x0110] = camera
    if gps:
        exif.get_ifd(0x8825)[2] = (52.0, 31.0, 0.0)  # GPSLatitude
    image.save(path, "JPEG", exif=exif)
    return path


def utc(*parts: int) -> float:
    return dt.datetime(*parts, tzinfo=dt.timezone.utc).timestamp()


def test_hostile_dates_are_no_dates(tmp_path):
    """Year 9999 shifted past the calendar, year 0, a +99:99 offset, a file time of 1e15 s: never a crash."""
    assert exif_time("9999:12:31 23:59:59", "-05:00") is None
    assert exif_time("0001:01:01 00:00:00", "+01:00") is None
    assert exif_time("2024:06:01 14:30:00", "+99:99") == (utc(2024, 6, 1, 14, 30), "exif-local")
    assert iso(1e20) is None and iso(-1e20) is None
    shot = photo(tmp_path / "far.jpg", "9999:12:31 23:59:59", "-05:00")
    meta = read_metadata(shot, mtime_ns=10**24)
    assert (meta.taken, meta.taken_source) == (None, None) and meta.width == 64


def test_exif_times_with_and_without_offsets():
    assert exif_time("2024:06:01 14:30:00", "+02:00") == (utc(2024, 6, 1, 12, 30), "exif")
    assert exif_time("2024:06:01 14:30:00", "-05:30") == (utc(2024, 6, 1, 20, 0), "exif")
    assert exif_time("2024:06:01 14:30:00") == (utc(2024, 6, 1, 14, 30), "exif-local")  # the camera's clock
    assert exif_time("2024:06:01 14:30:00", "garbage") == (utc(2024, 6, 1, 14, 30), "exif-local")
    assert exif_time("0000:00:00 00:00:00") is None  # a camera without a clock
    assert exif_time("yesterday") is None and exif_time(None) is None and exif_time(b"2024") is None
    assert parse_when("2024-06-01") == utc(2024, 6, 1)
    assert parse_when("2024-06-01T14:30+02:00") == utc(2024, 6, 1, 12, 30)
    assert parse_when("2024-06-01T14:30Z") == utc(2024, 6, 1, 14, 30)
    assert iso(utc(2024, 6, 1, 12, 30)) == "2024-06-01T12:30:00Z" and iso(None) is None
    assert iso(utc(2024, 6, 1, 12, 30), "exif-local") == "2024-06-01T12:30:00"


def test_metadata_read_from_the_header(tmp_path):
    shot = photo(tmp_path / "a.jpg", "2023:12:24 18:00:00", "+01:00", orientation=6, camera=("Canon", "Canon EOS R5"),
                 gps=True)
    meta = read_metadata(shot, mtime_ns=0)
    assert (meta.width, meta.height) == (48, 64)  # orientation 6: shown rotated
    assert (meta.taken, meta.taken_source) == (utc(2023, 12, 24, 17, 0), "exif")
    assert meta.camera == "Canon EOS R5" and meta.gps is True
    plain = read_metadata(photo(tmp_path / "b.jpg"), mtime_ns=1_700_000_000_000_000_000)
    assert (plain.taken, plain.taken_source, plain.camera, plain.gps) == (1_700_000_000.0, "mtime", None, False)
    (tmp_path / "c.jpg").write_bytes(b"not an image")
    broken = read_metadata(tmp_path / "c.jpg", mtime_ns=5_000_000_000)
    assert (broken.width, broken.taken, broken.taken_source) == (None, 5.0, "mtime")


@pytest.fixture
def dated(tmp_path, tiny_vit_checkpoint) -> tuple[Path, Path]:
    folder = tmp_path / "dated"
    folder.mkdir()
    photo(folder / "june.jpg", "2024:06:15 10:00:00", "+00:00", colour=(220, 30, 30))
    photo(folder / "august.jpg", "2024:08:20 10:00:00", colour=(30, 220, 30))
    photo(folder / "march.jpg", "2024:03:01 10:00:00", "+09:00", colour=(30, 30, 220))
    old = photo(folder / "undated.jpg", colour=(120, 120, 120))
    os.utime(old, (utc(2020, 1, 1), utc(2020, 1, 1)))
    db = tmp_path / "dated.sqlite3"
    cli("index", str(folder), "--db", str(db), "-m", str(tiny_vit_checkpoint), "-q")
    return folder, db


def names(records: list[dict]) -> list[str]:
    return [Path(r["image"]).name for r in records]


def test_search_filters_and_sorts_by_capture_time(dated):
    folder, db = dated
    everything = json.loads(cli("search", "a photo", "--db", str(db), "-f", "json", "-k", "10"))
    taken = {Path(r["image"]).name: r["taken"] for r in everything}
    assert taken == {"june.jpg": "2024-06-15T10:00:00Z", "august.jpg": "2024-08-20T10:00:00",  # the camera's clock
                     "march.jpg": "2024-03-01T01:00:00Z", "undated.jpg": "2020-01-01T00:00:00Z"}
    assert {Path(r["image"]).name: r["taken_source"] for r in everything} == {
        "june.jpg": "exif", "august.jpg": "exif-local", "march.jpg": "exif", "undated.jpg": "mtime"}
    assert all((r["width"], r["height"]) == (64, 48) for r in everything)
    summer = json.loads(cli("search", "a photo", "--db", str(db), "-f", "json", "--after", "2024-06-01",
                            "--before", "2024-09-01"))
    assert sorted(names(summer)) == ["august.jpg", "june.jpg"]
    assert [r["rank"] for r in summer] == [1, 2]  # ranks count what the dates let through
    by_date = json.loads(cli("search", "a photo", "--db", str(db), "-f", "json", "--sort", "date"))
    assert names(by_date) == ["august.jpg", "june.jpg", "march.jpg", "undated.jpg"]
    assert sorted(r["rank"] for r in by_date) == [1, 2, 3, 4]  # each keeps its rank by score
    assert names(json.loads(cli("search", "a photo", "--db", str(db), "-f", "json", "--before", "2024-03-01T02:00+00:00",
                                "--after", "2024-03-01"))) == ["march.jpg"]
    bad = runner.invoke(app, ["search", "a photo", "--db", str(db), "--after", "June"])
    assert bad.exit_code == 2 and "give a date" in bad.stderr
    empty = runner.invoke(app, ["search", "a photo", "--db", str(db), "--after", "2024-09-01", "--before", "2024-06-01"])
    assert empty.exit_code == 2 and "range is empty" in empty.stderr
    table = cli("search", "a photo", "--db", str(db), "-f", "table", "--sort", "date")
    assert "taken" in table and "2024-08-20" in table


def test_an_index_of_the_previous_schema_migrates_in_place_without_re_embedding(tmp_path, tiny_vit_checkpoint):
    """Made by schema 2 (the previous release's statements), then opened by this clipcli."""
    folder = tmp_path / "old"
    folder.mkdir()
    photo(folder / "a.jpg", "2022:05:05 05:05:05", "+00:00")
    photo(folder / "b.jpg", colour=(10, 200, 10))
    db = tmp_path / "old.sqlite3"
    cli("index", str(folder), "--db", str(db), "-m", str(tiny_vit_checkpoint), "-q")
    with sqlite3.connect(db) as raw:  # back to schema 2: the columns of 3 and 4 dropped, its version restored
        raw.execute("DROP INDEX files_taken")
        for column in ("width", "height", "taken", "taken_source", "camera", "gps", "interval"):
            raw.execute(f"ALTER TABLE files DROP COLUMN {column}")
        raw.execute(f"PRAGMA user_version = {MIGRATIONS[1][0]}")
        vectors = raw.execute("SELECT id, vector FROM vectors ORDER BY id").fetchall()
    found = json.loads(cli("search", "a photo", "--db", str(db), "-f", "json"))  # a read-only search upgrades it
    assert len(found) == 2 and all(r["taken"] is None for r in found)  # known after the next index run
    summary = json.loads(cli("index", str(folder), "--db", str(db), "-f", "json", "-q"))
    assert summary["unchanged"] == 2 and summary["embedded"] == 0 and summary["model_loaded"] is False
    with Index(db, readonly=True) as index, index.guard():
        assert index.db.execute("PRAGMA user_version").fetchone()[0] == MIGRATIONS[-1][0]
        rows = dict(index.db.execute("SELECT path, taken FROM files").fetchall())
        assert index.db.execute("SELECT id, vector FROM vectors ORDER BY id").fetchall() == vectors
    assert rows[os.fsencode(folder / "a.jpg")] == utc(2022, 5, 5, 5, 5, 5)
    assert rows[os.fsencode(folder / "b.jpg")] is not None  # its file time
    found = json.loads(cli("search", "a photo", "--db", str(db), "-f", "json", "--after", "2022-05-05",
                           "--before", "2022-05-06"))
    assert names(found) == ["a.jpg"]


def test_a_heic_tells_its_date_and_size_in_a_fresh_process(tmp_path):
    """pillow-heif's opener is registered for the metadata too, not only when pixels are decoded."""
    pillow_heif = pytest.importorskip("pillow_heif")
    import subprocess
    import sys

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2024:07:04 09:15:00"
    exif.get_ifd(0x8769)[0x9011] = "-04:00"
    exif[0x0112] = 6
    pillow_heif.from_pillow(Image.new("RGB", (64, 48), (90, 160, 30))).save(tmp_path / "iphone.heic",
                                                                           exif=exif.tobytes())
    code = ("import sys; from clipcli.metadata import read_metadata; "
            "m = read_metadata(sys.argv[1], 0); print(m.width, m.height, m.taken, m.taken_source)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "iphone.heic")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["48", "64", str(utc(2024, 7, 4, 13, 15)), "exif"]


def test_a_filter_letting_most_rows_through_masks_them_in_place_with_the_same_results():
    """A few allowed rows are copied out; most are scored in place with the rest masked: the same
    hits either way (measured against a brute-force ranking)."""
    import numpy as np

    from clipcli.vectors import top_scores

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(10, 410, dtype=np.int64)
    query = vectors[7]
    for allowed in ({int(i) for i in ids[::50]}, {int(i) for i in ids if i % 7}):  # few, then most
        best = top_scores(vectors, ids, query, 5, None, allowed)
        scores = vectors @ query
        brute = sorted(((int(i), float(s)) for i, s in zip(ids, scores) if int(i) in allowed), key=lambda h: -h[1])[:5]
        assert [i for i, _ in best] == [i for i, _ in brute]
        np.testing.assert_allclose([s for _, s in best], [s for _, s in brute], atol=1e-6)
    assert top_scores(vectors, ids, query, 5, None, set()) == []
