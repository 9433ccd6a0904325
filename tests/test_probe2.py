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
from test_journal import _journal_identity
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.items import EMPTY_FOLDER

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


# --------------------------------------------------------------------------- item 4: write failures


def test_stdout_on_a_full_disk_is_one_line(tiny_vit_checkpoint):
    for command in (["encode", str(DATA / "rocket.jpg"), "-m", str(tiny_vit_checkpoint)], ["models"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([sys.executable, "-m", "clipcli", *command, "-q" if command[0] != "models" else
                                     "--format=jsonl"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr == "error: cannot write stdout: No space left on device\n"


def test_a_full_disk_while_writing_an_output_is_one_line(tmp_path, tiny_vit_checkpoint, monkeypatch):
    import errno

    from clipcli import fsutil

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    out = tmp_path / "records.jsonl"
    result = run("encode", DATA / "rocket.jpg", "-m", tiny_vit_checkpoint, "-o", out, "-q")
    assert result.exit_code == 1 and result.stderr == f"error: cannot write {out}: No space left on device\n"
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_an_output_in_a_missing_folder_or_on_a_folder_is_refused_first(tmp_path, tiny_vit_checkpoint):
    (tmp_path / "folder.npy").mkdir()
    for target in (tmp_path / "missing" / "emb.npy", tmp_path / "folder.npy"):
        result = run("encode", DATA / "rocket.jpg", "-m", tiny_vit_checkpoint, "-o", target, "-q")
        assert result.exit_code == 2 and result.stderr.startswith(f"error: cannot write {target}")


# --------------------------------------------------------------------------- items 13, 21: convert


def test_convert_follows_the_umask(tmp_path, tiny_vit_checkpoint):
    mask = os.umask(0o022)
    try:
        out = tmp_path / "m.safetensors"
        assert run("convert", tiny_vit_checkpoint, out, "-q").exit_code == 0
        assert out.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_convert_interrupted_leaves_no_temporary_file(tmp_path, tiny_vit_checkpoint, monkeypatch):
    import safetensors.torch

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    result = run("convert", tiny_vit_checkpoint, tmp_path / "m.safetensors")
    assert result.exit_code == 130
    assert not (tmp_path / "m.safetensors").exists() and not list(tmp_path.glob(".*"))


# --------------------------------------------------------------------------- items 10-13: train


def _pairs_csv(folder: Path, images: list[Path], encoding: str = "utf-8") -> Path:
    path = folder / "pairs.csv"
    rows = ["filepath,title"] + [f"{image},a caf\u00e9 photo {i}" for i, image in enumerate(images)]
    path.write_bytes("\n".join(rows).encode(encoding) + b"\n")
    return path


def _train(*args):
    return run("train", "--arch", "tiny", "--image-size", "32", "--epochs", "1", "--batch-size", "2",
               "--workers", "0", "--quiet", "--device", "cpu", *args)


def test_train_checks_the_zeroshot_folder_before_training(tmp_path):
    data = _pairs_csv(tmp_path, [DATA / "rocket.jpg", DATA / "chelsea.png"])
    result = _train("--train-data", data, "--out", tmp_path / "run", "--zeroshot-dir", tmp_path / "absent")
    assert result.exit_code == 2 and "no such folder" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_skips_a_batch_of_only_unreadable_images(tmp_path):
    bad = []
    for i in range(4):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not an image")
        bad.append(tmp_path / f"bad{i}.jpg")
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # would block a reader forever
    data = _pairs_csv(tmp_path, [*bad, fifo, DATA / "rocket.jpg"])
    result = _train("--train-data", data, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "run" / "last.safetensors").is_file()


def test_train_inputs_and_outputs_that_are_wrong_are_one_line(tmp_path):
    good = [DATA / "rocket.jpg", DATA / "chelsea.png"]
    latin = _pairs_csv(tmp_path, good, encoding="latin-1")
    result = _train("--train-data", latin, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "not UTF-8" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "file").write_text("x")
    result = _train("--train-data", _pairs_csv(tmp_path, good), "--out", tmp_path / "file")
    assert result.exit_code == 2 and "is a file" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow  # 8 s of training in a subprocess; run by `pytest -m slow`
def test_sigterm_during_training_exits_130_and_leaves_no_temporary_file(tmp_path):
    import signal
    import time

    images = []
    for i in range(64):
        images.append(tmp_path / f"img{i}.png")
        shutil.copy(DATA / "chelsea.png", images[-1])
    data = _pairs_csv(tmp_path, images)
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "clipcli", "train", "--arch", "tiny", "--train-data", str(data),
                                "--out", str(out), "--epochs", "50", "--batch-size", "8", "--workers", "0",
                                "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "metrics.jsonl").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


# --------------------------------------------------------------------------- item 18: labels are data


def test_a_label_starting_with_a_hash_is_kept(tmp_path, tiny_vit_checkpoint):
    labels = tmp_path / "labels.txt"
    labels.write_text("#hashtag\ncat\n\n")
    result = run("classify", DATA / "rocket.jpg", "--labels-file", labels, "-m", tiny_vit_checkpoint, "-q",
                 "--top-k", "5")
    assert result.exit_code == 0, result.stderr
    assert sorted(t["label"] for t in records(result.stdout)[0]["top"]) == ["#hashtag", "cat"]


# --------------------------------------------------------------------------- items 16, 17, 19, 20, 22


def test_control_characters_in_names_are_escaped_on_stderr(tmp_path, tiny_vit_checkpoint):
    evil = tmp_path / "\x1b]0;pwned\x07\x1b[2J\u202ephoto.jpg"
    evil.write_bytes(b"not a jpeg\r\nsecond line")
    result = run("encode", evil, DATA / "rocket.jpg", "-m", tiny_vit_checkpoint)
    assert result.exit_code == 1
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr and "\u202e" not in result.stderr
    assert "\\x1b]0;pwned\\x07" in result.stderr and "\\u202e" in result.stderr
    assert all(line.startswith(("skipping", "encoded", "note:")) for line in result.stderr.splitlines())


def test_messages_are_one_line():
    from clipcli.display import one_line

    assert one_line("redirect loop:\nThe last 30x error message was:\r\nFound") == \
        "redirect loop: The last 30x error message was: Found"
    assert one_line("a\tb\x00c\x9bd") == "a b\\x00c\\x9bd"


def test_a_url_with_credentials_is_refused_and_never_sent(tiny_vit_checkpoint):
    result = run("encode", "http://user:secret@127.0.0.1:9/cat.jpg", DATA / "rocket.jpg", "-m", tiny_vit_checkpoint,
                 "--allow-private", "-f", "jsonl")
    assert result.exit_code == 1
    first = records(result.stdout)[0]
    assert first["status"] == "error" and "user name or password" in first["error"]


def test_a_missing_projection_is_named(tmp_path, tiny_vit_checkpoint):
    from checkpoints import released_state_dict, save_safetensors

    state = {k: v.float() for k, v in released_state_dict(tiny_vit_checkpoint).items() if k != "visual.proj"}
    result = run("encode", DATA / "rocket.jpg", "-m", save_safetensors(state, tmp_path / "m.safetensors"))
    assert result.exit_code == 2 and "missing keys: visual.proj" in result.stderr


def test_a_cpu_index_is_refused(tiny_vit_checkpoint):
    result = run("encode", DATA / "rocket.jpg", "-m", tiny_vit_checkpoint, "--device", "cpu:99")
    assert result.exit_code == 2 and "one CPU device" in result.stderr


def test_a_folder_with_no_images_says_so(tmp_path, tiny_vit_checkpoint):
    (tmp_path / "x.jpg").mkdir()
    result = run("encode", tmp_path / "x.jpg", DATA / "rocket.jpg", "-m", tiny_vit_checkpoint, "-f", "jsonl")
    assert result.exit_code == 1
    assert records(result.stdout)[0] == {"image": str(tmp_path / "x.jpg"), "status": "error",
                                         "error": EMPTY_FOLDER}
    alone = run("encode", tmp_path / "x.jpg", "-m", tiny_vit_checkpoint)
    assert alone.exit_code == 2 and "no images found" in alone.stderr


def test_a_failing_torch_import_is_one_line(tmp_path):
    """Under a low `ulimit -v`, importing torch fails: one line, not a traceback."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20)); "
              "sys.argv = ['clipcli', 'encode', sys.argv[1]]; from clipcli.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", script, str(DATA / "rocket.jpg")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode in (1, 2), result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


# --------------------------------------------------------------------------- item 15: damaged journals


@pytest.mark.parametrize("damage", ["rows-deleted", "records-deleted", "identity-a-list", "a-file-in-its-place"])
def test_a_damaged_journal_is_one_line_and_overwrite_starts_over(damage, tmp_path, tiny_vit_checkpoint):
    from clipcli.journal import journal_path

    images = tmp_path / "images"
    images.mkdir()
    for name in ("rocket.jpg", "chelsea.png"):
        shutil.copy(DATA / name, images / name)
    out = tmp_path / "emb.npy"
    journal = Path(journal_path(out))
    args = ["encode", images, "-o", out, "-m", tiny_vit_checkpoint, "-q"]
    _journal_identity(CliRunner(), [str(a) for a in args], out)  # as an interrupted run leaves it
    if damage == "rows-deleted":
        (journal / "rows.bin").unlink()
    elif damage == "records-deleted":
        (journal / "records.jsonl").unlink()
    elif damage == "identity-a-list":
        (journal / "identity.json").write_text("[1, 2]")
    else:
        shutil.rmtree(journal)
        journal.write_text("not a folder")
    result = run(*args, "--resume")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--overwrite" in result.stderr
    assert "damaged" in result.stderr or "should be a journal folder" in result.stderr
    assert run(*args, "--overwrite").exit_code == 0 and out.is_file() and not journal.exists()


# --------------------------------------------------------------------------- item 14: Ctrl-C and the network


@pytest.mark.slow  # a whole process (or a large sheet): with the kill and race tests in `pytest -m slow`
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_ends_a_run_at_once_while_a_url_stalls(signal_name, tiny_vit_checkpoint):
    import signal
    import time

    from download_server import start_server, stop_server

    server = start_server()
    try:
        server.add("/cat.jpg", (DATA / "rocket.jpg").read_bytes())
        server.faults = ["stall:10:60"]  # headers and 10 bytes, then silence for a minute
        process = subprocess.Popen([sys.executable, "-m", "clipcli", "encode", server.url("/cat.jpg"),
                                    str(DATA / "rocket.jpg"), "-m", str(tiny_vit_checkpoint), "--allow-private",
                                    "-q", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not server.gets("/cat.jpg"):
            time.sleep(0.05)
        time.sleep(0.5)
        interrupted = time.monotonic()
        process.send_signal(getattr(signal, signal_name))
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        stop_server(server)
    assert process.returncode == 130, stderr
    assert took < 3.5, f"{took:.1f} s to stop"


def test_pillow_warnings_about_a_corrupt_exif_stay_off_stderr(tmp_path, tiny_vit_checkpoint):
    import io
    import struct

    from PIL import Image

    entries = struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x010F, 2, 5000, 100)  # past the end
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + tiff)
    (tmp_path / "exif.jpg").write_bytes(buffer.getvalue())
    result = subprocess.run([sys.executable, "-W", "always", "-m", "clipcli", "encode", str(tmp_path / "exif.jpg"),
                             "-m", str(tiny_vit_checkpoint), "-q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# --------------------------------------------------------------------------- from the review of the fixes


def test_a_character_device_is_one_failed_item_not_read_forever(tiny_vit_checkpoint):
    result = run("encode", "/dev/zero", DATA / "rocket.jpg", "-m", tiny_vit_checkpoint, "-f", "jsonl", "-q")
    assert result.exit_code == 1
    assert records(result.stdout)[0] == {"image": "/dev/zero", "status": "error", "error": "not a regular file"}


def test_similarity_json_to_a_full_disk_is_one_line(tiny_vit_checkpoint):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "clipcli", "similarity", str(DATA / "rocket.jpg"), "--text", "a",
                                 "-m", str(tiny_vit_checkpoint), "-f", "json", "-q"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == "error: cannot write stdout: No space left on device\n"


def test_credentials_are_not_shown_either(tiny_vit_checkpoint):
    result = run("encode", "https://user:secret@example.org/cat.jpg", DATA / "rocket.jpg", "-m", tiny_vit_checkpoint,
                 "-f", "jsonl")
    assert "secret" not in result.stdout and "secret" not in result.stderr
    assert records(result.stdout)[0]["image"] == "https://***@example.org/cat.jpg"


def test_a_journal_record_that_is_not_a_record_is_damage(tmp_path, tiny_vit_checkpoint):
    from clipcli.journal import journal_path

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DATA / "rocket.jpg", images / "rocket.jpg")
    out = tmp_path / "emb.npy"
    args = ["encode", str(images), "-o", str(out), "-m", str(tiny_vit_checkpoint), "-q"]
    _journal_identity(CliRunner(), args, out)
    (Path(journal_path(out)) / "records.jsonl").write_text("[1]\n")
    result = run(*args, "--resume")
    assert result.exit_code == 2 and "damaged" in result.stderr and result.stderr.count("\n") == 1


def test_train_overwrite_keeps_the_old_run_when_an_input_is_bad(tmp_path):
    good = _pairs_csv(tmp_path, [DATA / "rocket.jpg", DATA / "chelsea.png"])
    assert _train("--train-data", good, "--out", tmp_path / "run").exit_code == 0
    before = (tmp_path / "run" / "last.safetensors").read_bytes()
    latin = tmp_path / "latin"
    latin.mkdir()
    result = _train("--train-data", _pairs_csv(latin, [DATA / "rocket.jpg"] * 2, encoding="latin-1"),
                    "--out", tmp_path / "run", "--overwrite")
    assert result.exit_code == 2 and (tmp_path / "run" / "last.safetensors").read_bytes() == before


def test_train_device_is_checked(tmp_path):
    good = _pairs_csv(tmp_path, [DATA / "rocket.jpg", DATA / "chelsea.png"])
    result = run("train", "--train-data", good, "--out", tmp_path / "run", "--device", "cpu:99", "--quiet")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
