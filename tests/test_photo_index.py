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


def index(folder: Path, db: Path, model: Path, *more: str, code: int = 0) -> dict:
    result = CliRunner().invoke(app, ["index", str(folder), "--db", str(db), "-m", str(model), "-f", "json", "-q",
                                      *more])
    assert result.exit_code == code, (result.stdout, result.stderr)
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


def test_a_photo_failed_for_a_missing_decoder_is_indexed_once_it_is_installed(tmp_path, tiny_vit_checkpoint,
                                                                              monkeypatch):
    import sys

    import pytest
    from PIL import Image

    pillow_heif = pytest.importorskip("pillow_heif")
    from clipcli import decoders

    folder = tmp_path / "phone"
    folder.mkdir()
    pillow_heif.from_pillow(Image.new("RGB", (64, 48), (90, 160, 30))).save(folder / "IMG_0001.heic")
    db = tmp_path / "phone.sqlite3"
    with monkeypatch.context() as blocked:  # as if `pip install clipcli` without [photos]
        blocked.setitem(sys.modules, "pillow_heif", None)
        blocked.setattr(decoders, "_registered", set())
        before = index(folder, db, tiny_vit_checkpoint, code=1)
    assert before["failed"] == 1 and indexed(db) == []  # not stored: the file is not at fault
    after = index(folder, db, tiny_vit_checkpoint)
    assert after["added"] == 1 and indexed(db) == ["IMG_0001.heic"]


def test_a_webdataset_shard_of_heic_and_avif_members_is_encoded(tmp_path, tiny_vit_checkpoint):
    import io
    import tarfile

    import pytest
    from PIL import Image

    pillow_heif = pytest.importorskip("pillow_heif")
    members = {}
    picture = Image.open(DATA / "chelsea.png").convert("RGB")
    buffer = io.BytesIO()
    pillow_heif.from_pillow(picture).save(buffer, format="HEIF")
    members["0000.heic"] = buffer.getvalue()
    buffer = io.BytesIO()
    picture.save(buffer, "AVIF")
    members["0001.avif"] = buffer.getvalue()
    members.update({"0000.txt": b"a cat", "0001.txt": b"a cat again"})
    shard = tmp_path / "photos-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["encode", str(shard), "-m", str(tiny_vit_checkpoint), "-o", f"{out}/", "-q"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    import numpy as np

    vectors = np.concatenate([np.load(part) for part in sorted((out / "img_emb").glob("*.npy"))])
    assert vectors.shape[0] == 2 and np.isfinite(vectors).all()  # both members embedded
