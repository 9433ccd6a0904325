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
