"""A photo folder through `clipcli index`: a camera RAW file beside its JPEG is left out (and
counted), unless asked for; a RAW file alone is indexed. (The RAW decoding itself is tested in
tests/test_photo_formats.py; a JPEG named .nef stands for one here: the decoder reads its bytes.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from clipcli.cli import app

DATA = Path(__file__).parent / "data"


def index(folder: Path, db: Path, model: Path, *more: str) -> dict:
    result = CliRunner().invoke(app, ["index", str(folder), "--db", str(db), "-m", str(model), "-f", "json", "-q",
                                      *more])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def indexed(db: Path) -> list[str]:
    from clipcli.index import Index

    with Index(db, readonly=True) as opened, opened.guard():
        return sorted(Path(row[0].decode()).name for row in opened.db.execute("SELECT path FROM files"))


def test_a_raw_file_beside_its_jpeg_is_left_out_unless_asked(tmp_path, tiny_vit_checkpoint):
    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copy(DATA / "rocket.jpg", folder / "IMG_0001.JPG")
    shutil.copy(DATA / "rocket.jpg", folder / "img_0001.nef")  # its RAW twin (letter case aside)
    shutil.copy(DATA / "grace_hopper.jpg", folder / "IMG_0002.nef")  # a RAW alone
    summary = index(folder, tmp_path / "a.sqlite3", tiny_vit_checkpoint)
    assert summary["paired"] == 1 and summary["added"] == 2
    assert indexed(tmp_path / "a.sqlite3") == ["IMG_0001.JPG", "IMG_0002.nef"]
    both = index(folder, tmp_path / "b.sqlite3", tiny_vit_checkpoint, "--keep-raw-pairs")
    assert both["paired"] == 0 and both["added"] == 3
    line = CliRunner().invoke(app, ["index", str(folder), "--db", str(tmp_path / "c.sqlite3"), "-m",
                                    str(tiny_vit_checkpoint)]).stderr
    assert "1 RAW left out beside their JPEG" in line
