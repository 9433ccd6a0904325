"""Issue 15: cases from the second adversarial probe, each failing before its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipcli.cli import app

DATA = Path(__file__).parent / "data"


def run(*args, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# --------------------------------------------------------------------------- item 2: lists from pipes


@pytest.fixture
def long_list(tmp_path) -> tuple[Path, list[str]]:
    """A 70 KB list: the photo, then thousands of missing files (each one error record)."""
    shutil.copy(DATA / "rocket.jpg", tmp_path / "rocket.jpg")
    lines = [str(tmp_path / "rocket.jpg")] + [str(tmp_path / f"missing-{i:05d}-{'x' * 8}.jpg")
                                               for i in range(1200)]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 65536
    return path, lines


def test_a_list_from_process_substitution_keeps_every_line(long_list, tiny_vit_checkpoint, tmp_path):
    path, lines = long_list
    command = (f"{sys.executable} -m clipcli encode <(cat {path}) -m {tiny_vit_checkpoint} -q "
               f"-o {tmp_path / 'out.jsonl'}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # the missing files failed, the rest went on
    out = records((tmp_path / "out.jsonl").read_text())
    assert [r["image"] for r in out] == lines
    assert out[0]["status"] == "ok" and all(r["status"] == "error" for r in out[1:])


def test_a_small_list_from_a_fifo_without_extension(tmp_path, tiny_vit_checkpoint):
    shutil.copy(DATA / "rocket.jpg", tmp_path / "rocket.jpg")
    fifo = tmp_path / "listing"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as f:
            f.write(f"{tmp_path / 'rocket.jpg'}\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    result = run("encode", fifo, "-m", tiny_vit_checkpoint, "-q")
    writer.join(timeout=10)
    assert result.exit_code == 0, result.stderr
    assert [r["image"] for r in records(result.stdout)] == [str(tmp_path / "rocket.jpg")]


def test_binary_data_from_a_pipe_is_one_line(tmp_path, tiny_vit_checkpoint):
    fifo = tmp_path / "blob"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write((DATA / "rocket.jpg").read_bytes())

    threading.Thread(target=write, daemon=True).start()
    result = run("encode", fifo, "-m", tiny_vit_checkpoint, "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "does not hold a list" in result.stderr


# --------------------------------------------------------------------------- items 7, 8: hostile checkpoints


def _with_data_pkl(source: Path, target: Path, data: bytes | None = None, cut: int | None = None) -> Path:
    """A copy of a TorchScript archive whose ``data.pkl`` is replaced (or cut short)."""
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for member in src.infolist():
            content = src.read(member)
            if member.filename.endswith("/data.pkl") and member.filename.count("/") == 1:
                content = data if data is not None else content[:cut]
            dst.writestr(member, content)
    return target


PICKLES = {
    "truncated": None,
    "reduce-on-a-module-class": b"\x80\x02c__torch__.m\nM\n(K\x01tR.",
    "int-tensor-size": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x01\x00\x00\x00sK\x00K\x05K\x01tR."),
    "storage-of-no-type": b"\x80\x02(X\x07\x00\x00\x00storageX\x01\x00\x00\x00xX\x01\x00\x00\x000tQ.",
    "not-a-module": b"\x80\x02K\x05.",
}


@pytest.mark.parametrize("case", sorted(PICKLES))
def test_malformed_torchscript_archives_are_one_line(case, tiny_vit_checkpoint, tmp_path, sample_images):
    import clipcli
    from clipcli.errors import CheckpointError

    archive = _with_data_pkl(tiny_vit_checkpoint, tmp_path / f"{case}.pt", PICKLES[case], cut=100)
    with pytest.raises(CheckpointError):
        clipcli.load(archive, device="cpu")
    result = run("encode", sample_images[0], "--model", archive)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("content", [b"cat\ndog\n", b"root:x:0:0:root:/root:/bin/bash\n", b"", b"\x00" * 64])
def test_a_file_that_is_no_checkpoint_is_one_line(content, tmp_path, sample_images):
    path = tmp_path / "labels.txt"
    path.write_bytes(content)
    result = run("encode", sample_images[0], "--model", path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "is not a checkpoint file" in result.stderr or "not a readable checkpoint" in result.stderr


# --------------------------------------------------------------------------- items 3, 5, 6


def test_similarity_with_a_failing_input_twice(tmp_path, tiny_vit_checkpoint, sample_images):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    result = run("similarity", bad, sample_images[0], bad, "--text", "a cat", "-m", tiny_vit_checkpoint,
                 "-f", "jsonl", "-q")
    assert result.exit_code == 1, result.stderr
    assert [(r["image"], r["status"]) for r in records(result.stdout)] == [
        (str(bad), "error"), (str(sample_images[0]), "ok"), (str(bad), "error")]


@pytest.mark.parametrize("scale", [100.0, 1e6, float("inf")])
def test_a_huge_logit_scale_gives_finite_probabilities(scale, tmp_path, tiny_vit_checkpoint, sample_images):
    import torch
    from checkpoints import released_state_dict, save_safetensors

    state = {k: v.float() for k, v in released_state_dict(tiny_vit_checkpoint).items()}
    state["logit_scale"] = torch.tensor(scale)
    ckpt = save_safetensors(state, tmp_path / "hot.safetensors")
    for fmt in ("json", "csv", "jsonl"):
        result = run("classify", *sample_images[:2], "-l", "cat,dog", "-m", ckpt, "-f", fmt, "-q")
        assert result.exit_code == 0, result.stderr
        assert "nan" not in result.stdout.lower() and "inf" not in result.stdout.lower()
    top = [r["score"] for r in records(run("classify", sample_images[0], "-l", "cat,dog", "-m", ckpt, "-q").stdout)]
    assert top == [1.0]  # a hard argmax
    result = run("similarity", *sample_images[:2], "--text", "a", "--text", "b", "-m", ckpt, "-f", "json", "-q")
    assert result.exit_code == 0 and "NaN" not in result.stdout and "Infinity" not in result.stdout


def test_dollar_signs_are_drawn_literally(tmp_path, tiny_vit_checkpoint):
    image = tmp_path / "$x^2$ price $5.jpg"
    shutil.copy(DATA / "rocket.jpg", image)
    out = tmp_path / "heat.png"
    result = run("similarity", image, "--text", "costs $5 or $10", "--text", r"$\frac{1}{0}$", "-m",
                 tiny_vit_checkpoint, "-o", out, "--title", "$unbalanced", "-q")
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_size > 1000
