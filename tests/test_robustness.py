"""Issue 5's acceptance run: a folder that mixes good photos with every kind of bad file runs
to the end with one record per file, exit code 1, and the good photos' embeddings equal
(to 1e-6) to a clean run on the good photos alone."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from test_items import _png_header
from typer.testing import CliRunner

from clipcli.cli import app

DATA = Path(__file__).parent / "data"


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    buffer = io.BytesIO()
    image.save(buffer, **kwargs)
    path.write_bytes(buffer.getvalue())


def _good_files(folder: Path) -> list[str]:
    """Real photos and the colour modes, orientations and animations that must decode."""
    cat = Image.open(DATA / "chelsea.png").convert("RGB").resize((120, 80))
    shutil.copy(DATA / "rocket.jpg", folder / "rocket.jpg")
    shutil.copy(DATA / "camera.png", folder / "camera.png")  # grayscale
    _save(cat.convert("CMYK"), folder / "cmyk.jpg", format="JPEG")
    _save(cat.convert("RGBA"), folder / "rgba.png", format="PNG")
    _save(cat.convert("LA"), folder / "la.png", format="PNG")
    palette = cat.convert("P")
    palette.info["transparency"] = 0
    _save(palette, folder / "palette.png", format="PNG", transparency=0)
    _save(cat.convert("L").point(lambda v: v * 257).convert("I;16"), folder / "grey16.png", format="PNG")
    _save(cat.convert("1"), folder / "bilevel.png", format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(cat, folder / "phone.jpg", format="JPEG", exif=exif)
    frames = [cat, cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    _save(cat, folder / "photo.WEBP", format="WEBP")
    return sorted(p.name for p in folder.iterdir())


def _bad_files(folder: Path) -> dict[str, str]:
    """name -> a word the error reason must contain."""
    jpeg = (DATA / "rocket.jpg").read_bytes()
    png = (DATA / "camera.png").read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("just some text, not a picture\n")
    (folder / "page.png").write_text("<!doctype html><html><body>404 Not Found</body></html>")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (folder / "layers.tif").write_bytes(b"8BPS\x00\x01" + b"\x00" * 40)  # a PSD in disguise
    os.symlink(folder / "nowhere.jpg", folder / "dangling.jpg")
    os.symlink(folder, folder / "loop")
    # the second probe (issue 15): escape sequences in a name, a FIFO
    (folder / "\x1b]0;pwned\x07title.jpg").write_bytes(b"\r\nnot a picture\r\n")
    os.mkfifo(folder / "pipe.jpg")
    return {
        "\x1b]0;pwned\x07title.jpg": "text",
        "pipe.jpg": "regular file",
        "empty.jpg": "empty",
        "notes.jpg": "text",
        "page.png": "HTML",
        "cut.jpg": "truncated",
        "cut.png": "truncated",
        "bomb.png": "too large",
        "layers.tif": "PSD",
        "dangling.jpg": "",
    }


def _encode(folder: Path, out: Path, checkpoint) -> tuple[int, np.ndarray, list[dict]]:
    result = CliRunner().invoke(
        app, ["encode", str(folder), "-o", str(out), "-m", str(checkpoint), "--batch-size", "3", "--quiet"],
        catch_exceptions=False,
    )
    manifest = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    return result.exit_code, np.load(out), manifest


def test_a_folder_of_every_bad_case_runs_to_the_end(tmp_path, tiny_vit_checkpoint):
    clean, mixed = tmp_path / "clean", tmp_path / "mixed"
    clean.mkdir()
    good = _good_files(clean)
    shutil.copytree(clean, mixed)
    bad = _bad_files(mixed)

    clean_code, clean_rows, clean_manifest = _encode(clean, tmp_path / "clean.npy", tiny_vit_checkpoint)
    assert clean_code == 0 and all(r["status"] == "ok" for r in clean_manifest)
    assert len(clean_rows) == len(good)

    code, rows, manifest = _encode(mixed, tmp_path / "mixed.npy", tiny_vit_checkpoint)
    assert code == 1
    by_name = {Path(r["image"]).name: r for r in manifest}
    assert sorted(by_name) == sorted(good + list(bad)), "one record per file, the loop not followed"
    for name, word in bad.items():
        record = by_name[name]
        assert record["status"] == "error" and record["index"] is None, name
        assert word.lower() in record["error"].lower(), (name, record["error"])
    assert np.isfinite(rows).all()
    clean_by_name = {Path(r["image"]).name: clean_rows[r["index"]] for r in clean_manifest}
    for name in good:
        record = by_name[name]
        assert record["status"] == "ok", (name, record.get("error"))
        # Another input list may batch the good files differently: equal to float rounding, not bit for bit.
        np.testing.assert_allclose(rows[record["index"]], clean_by_name[name], rtol=0, atol=1e-6, err_msg=name)
