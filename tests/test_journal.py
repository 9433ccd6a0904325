"""The encode journal: append, reopen, crash leftovers discarded, other runs refused; and a real
SIGKILL-and-resume of `clipcli encode` that ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.journal import Journal, JournalError, inputs_hash, journal_path
from clipcli.messages import error_text

IDENTITY = {"sha256": "ab" * 32, "inputs": inputs_hash(["a.jpg", "b.jpg", "c.jpg"]), "count": 3, "key": "image",
            "normalize": True, "dtype": "float32", "dim": 4, "truncate": True}


def ok(index: int, name: str) -> dict:
    return {"index": index, "image": name, "status": "ok"}


def test_append_and_reopen(tmp_path):
    path = journal_path(tmp_path / "emb.npy")
    journal = Journal.open(path, IDENTITY)
    rows = [np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)]
    journal.append([ok(0, "a.jpg"), {"index": None, "image": "b.jpg", "status": "error", "error": "bad"}], rows[:1])
    journal.append([ok(1, "c.jpg")], rows[1:])
    again = Journal.open(path, IDENTITY, resume=True)
    assert [r["image"] for r in again.records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert again.rows == 2
    np.testing.assert_array_equal(again.matrix(), np.stack(rows))
    again.remove()
    assert not os.path.exists(path)


def test_partial_row_and_line_after_a_crash_are_discarded(tmp_path):
    path = journal_path(tmp_path / "emb.npy")
    journal = Journal.open(path, IDENTITY)
    journal.append([ok(0, "a.jpg")], [np.zeros(4, dtype=np.float32)])
    with open(os.path.join(path, "rows.bin"), "ab") as f:  # killed mid-batch: half a row, half a line
        f.write(b"\x00" * 6)
    with open(os.path.join(path, "records.jsonl"), "ab") as f:
        f.write(b'{"index": 1, "image": "b.j')
    again = Journal.open(path, IDENTITY, resume=True)
    assert again.records == [ok(0, "a.jpg")] and again.rows == 1
    assert os.path.getsize(os.path.join(path, "rows.bin")) == 16
    again.append([ok(1, "b.jpg")], [np.ones(4, dtype=np.float32)])
    assert Journal.open(path, IDENTITY, resume=True).matrix().tolist() == [[0] * 4, [1] * 4]


def test_record_whose_row_never_landed_is_discarded(tmp_path):
    path = journal_path(tmp_path / "emb.npy")
    journal = Journal.open(path, IDENTITY)
    journal.append([ok(0, "a.jpg")], [np.zeros(4, dtype=np.float32)])
    with open(os.path.join(path, "records.jsonl"), "ab") as f:
        f.write(b'{"index": 1, "image": "b.jpg", "status": "ok"}\n')
    again = Journal.open(path, IDENTITY, resume=True)
    assert again.records == [ok(0, "a.jpg")] and again.rows == 1


def test_existing_journal_needs_resume_or_overwrite(tmp_path):
    path = journal_path(tmp_path / "emb.npy")
    Journal.open(path, IDENTITY).append([ok(0, "a.jpg")], [np.zeros(4, dtype=np.float32)])
    with pytest.raises(JournalError, match="holds an unfinished run$") as caught:
        Journal.open(path, IDENTITY)
    assert caught.value.fix == "resume"  # the library names the setting; the CLI, its flags:
    assert error_text(caught.value).endswith("unfinished run; pass --resume to continue it or --overwrite to start again")
    fresh = Journal.open(path, IDENTITY, overwrite=True)
    assert fresh.records == [] and fresh.rows == 0


@pytest.mark.parametrize("field, value", [("sha256", "cd" * 32), ("inputs", inputs_hash(["a.jpg"])),
                                          ("normalize", False), ("dtype", "float16")])
def test_journal_of_another_run_is_refused(tmp_path, field, value):
    path = journal_path(tmp_path / "emb.npy")
    Journal.open(path, IDENTITY)
    with pytest.raises(JournalError, match=f"different run \\({field} differ"):
        Journal.open(path, {**IDENTITY, field: value}, resume=True)


# --------------------------------------------------------------------------- the command


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def encode_command(folder, out, ckpt, *extra) -> list[str]:
    return [sys.executable, "-m", "clipcli", "encode", str(folder), "-o", str(out), "--batch-size", "4",
            "--workers", "0", "-q", "-m", str(ckpt), *extra]


@pytest.mark.slow  # 13 s: a killed subprocess; `pytest -m slow` and .ci/run run it
def test_kill_and_resume_is_byte_identical(folder, tiny_vit_checkpoint, tmp_path):
    clean = tmp_path / "clean.npy"
    subprocess.run(encode_command(folder, clean, tiny_vit_checkpoint), check=True, timeout=120)

    out = tmp_path / "out.npy"
    records = Path(journal_path(out)) / "records.jsonl"
    process = subprocess.Popen(encode_command(folder, out, tiny_vit_checkpoint))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if records.exists() and records.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    if process.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert not out.exists()
    done = records.read_bytes().count(b"\n")
    assert 4 <= done < 40

    resumed = subprocess.run(encode_command(folder, out, tiny_vit_checkpoint, "--resume"), timeout=120)
    assert resumed.returncode == 0
    assert out.read_bytes() == clean.read_bytes()
    assert out.with_suffix(".jsonl").read_bytes() == clean.with_suffix(".jsonl").read_bytes()
    assert not os.path.exists(journal_path(out))


def test_cli_refuses_stale_or_foreign_journal(folder, tiny_vit_checkpoint, tmp_path):
    out = tmp_path / "emb.npy"
    Journal.open(journal_path(out), {**IDENTITY, "dim": 8})
    args = ["encode", str(folder), "-o", str(out), "-m", str(tiny_vit_checkpoint), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "pass --resume to continue it or --overwrite" in result.stderr
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 2 and "belongs to a different run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert np.load(out).shape[0] == 40 and not os.path.exists(journal_path(out))


def test_resume_with_another_precision_is_refused(folder, tiny_vit_checkpoint, tmp_path):
    """Rows computed in fp32 and bf16 must never end up in one file."""
    out = tmp_path / "emb.npy"
    args = ["encode", str(folder), "-o", str(out), "-m", str(tiny_vit_checkpoint), "-q", "--device", "cpu"]
    identity = json.loads((_journal_identity(CliRunner(), args, out)).read_text())
    assert identity["precision"] == "float32"
    result = CliRunner().invoke(app, [*args, "--resume", "--precision", "bf16"])
    assert result.exit_code == 2 and "precision" in result.stderr


def _journal_identity(runner, args, out) -> Path:
    """Start a journal the way an interrupted run leaves one: the identity written, no rows."""
    from clipcli import batching

    journal = Path(journal_path(out))
    original = batching.embed_images

    def interrupted(*args, **kwargs):  # the model never runs: the journal has its identity, no rows
        raise KeyboardInterrupt

    batching.embed_images = interrupted
    try:
        assert runner.invoke(app, args).exit_code == 130
    finally:
        batching.embed_images = original
    return journal / "identity.json"


@pytest.mark.slow  # a whole process (or a large sheet): with the kill and race tests in `pytest -m slow`
def test_sigterm_keeps_the_journal_and_exits_130(folder, tiny_vit_checkpoint, tmp_path):
    out = tmp_path / "out.npy"
    records = Path(journal_path(out)) / "records.jsonl"
    process = subprocess.Popen(encode_command(folder, out, tiny_vit_checkpoint), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert process.returncode == 130, stderr
    assert not out.exists() and records.read_bytes().count(b"\n") >= 4
    again = subprocess.run(encode_command(folder, out, tiny_vit_checkpoint), capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_resume_with_other_decode_options_is_refused(folder, tiny_vit_checkpoint, tmp_path):
    """Every option that can change a row belongs to the run's identity (issue 15, item 9)."""
    out = tmp_path / "emb.npy"
    args = ["encode", str(folder), "-o", str(out), "-m", str(tiny_vit_checkpoint), "-q"]
    identity = json.loads(_journal_identity(CliRunner(), args, out).read_text())
    assert identity["max_pixels"] == 89_478_485 and identity["allow_truncated"] is False
    for extra, field in ((["--max-pixels", "1000"], "max_pixels"), (["--allow-truncated"], "allow_truncated")):
        result = CliRunner().invoke(app, [*args, "--resume", *extra])
        assert result.exit_code == 2 and field in result.stderr


def test_a_second_run_on_the_same_output_is_refused(folder, tiny_vit_checkpoint, tmp_path):
    """Two runs writing one journal mixed their rows (issue 15, item 1): the second is refused,
    with --resume or --overwrite alike, and nothing of the first is touched."""
    from clipcli.fsutil import exclusive_lock

    out = tmp_path / "emb.npy"
    args = ["encode", str(folder), "-o", str(out), "-m", str(tiny_vit_checkpoint), "-q"]
    with exclusive_lock(out):  # another run, mid-way
        for extra in ([], ["--resume"], ["--overwrite"]):
            result = CliRunner().invoke(app, [*args, *extra])
            assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
            assert "another run is writing" in result.stderr
        assert not out.exists() and not os.path.exists(journal_path(out))
    assert CliRunner().invoke(app, args).exit_code == 0
    assert np.load(out).shape[0] == 40 and sorted(p.name for p in tmp_path.glob(".*")) == []

