"""What a cold one-image run relies on (issue 27, item 3): a file's sha256 is read once, a
converted safetensors tensor is not mapped beside its copy, labels in the cache never load the
text tower, and the command line builds only its command and ends without tearing the
interpreter down. No timing is asserted (benchmarks/cold_start.py measures)."""

from __future__ import annotations

import atexit
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clipcli import cache, hub
from clipcli.loading import resolve, weights_sha256

DATA = Path(__file__).parent / "data"


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files :mod:`clipcli.cache` reads whole to hash, in order."""
    calls: list[str] = []
    real = cache.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache, "sha256_file", counting)
    return calls


# --------------------------------------------------------------------------- hashing once


def test_a_checkpoint_is_hashed_once_then_again_only_when_it_changes(tmp_path, hashed):
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cache.remembered_sha256(path) == digest
    assert cache.remembered_sha256(path) == digest
    assert hashed == ["w.bin"]

    stat = path.stat()
    path.write_bytes(b"WEIGHTS" * 1000)  # rewritten in place: a new mtime
    assert cache.remembered_sha256(path) == hashlib.sha256(b"WEIGHTS" * 1000).hexdigest()
    assert hashed == ["w.bin"] * 2

    # Replaced by a file of the same size and mtime (rsync -t, cp -p): a new inode says so.
    other = tmp_path / "other.bin"
    other.write_bytes(b"wEIGHTS" * 1000)
    os.utime(other, ns=(stat.st_atime_ns, path.stat().st_mtime_ns))
    os.replace(other, path)
    assert cache.remembered_sha256(path) == hashlib.sha256(b"wEIGHTS" * 1000).hexdigest()
    assert hashed == ["w.bin"] * 3


def test_the_model_identity_reads_the_weights_once(tiny_vit_checkpoint, hashed):
    source = resolve(tiny_vit_checkpoint)
    first = weights_sha256(source)
    assert weights_sha256(resolve(tiny_vit_checkpoint)) == first == \
        hashlib.sha256(Path(tiny_vit_checkpoint).read_bytes()).hexdigest()
    assert hashed == [Path(tiny_vit_checkpoint).name]


def test_a_download_remembers_the_sha256_it_was_checked_against(tmp_path, monkeypatch, hashed):
    from download_server import start_server, stop_server

    from clipcli import download
    from clipcli.download import DownloadSettings, download_url

    monkeypatch.delenv("CLIPCLI_OFFLINE", raising=False)
    monkeypatch.setattr(download, "DEFAULT_SETTINGS", DownloadSettings(connect_timeout=2.0, read_timeout=2.0,
                                                                      retries=1, free_space_margin=0))
    payload = b"released weights" * 5000
    digest = hashlib.sha256(payload).hexdigest()
    server = start_server()
    try:
        server.add("/w.pt", payload)
        path = download_url(server.url("/w.pt"), tmp_path / "cache" / "w.pt", digest)
    finally:
        stop_server(server)
    assert cache.remembered_sha256(path) == digest
    assert cache.file_problem(path, digest, len(payload), full=False) is None
    assert hashed == []  # hashed while it downloaded, never read again
    assert cache.file_problem(path, digest, len(payload), full=True) is None  # asked for: read again
    assert hashed == ["w.pt"]


# --------------------------------------------------------------------------- reading weights


def test_safetensors_converted_as_read_or_mapped_as_stored(tmp_path):
    from safetensors.torch import load_file, save_file

    from clipcli.checkpoint import read_safetensors

    torch.manual_seed(0)
    stored = {"a": torch.randn(3, 5).half(), "b": torch.randn(7).bfloat16(), "c": torch.randn(2, 2),
              "ids": torch.arange(6), "big": torch.randn(64, 33).half()}
    path = tmp_path / "w.safetensors"
    save_file(stored, str(path))
    reference = load_file(str(path))
    as_stored = read_safetensors(path)
    assert {k: v.dtype for k, v in as_stored.items()} == {k: v.dtype for k, v in stored.items()}
    assert all(torch.equal(as_stored[k], reference[k]) for k in stored)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        read = read_safetensors(path, dtype, keep=lambda key: key != "c")
        assert read["c"].is_meta and read["c"].shape == (2, 2) and read["c"].dtype == dtype
        assert read["ids"].dtype == torch.int64 and torch.equal(read["ids"], reference["ids"])
        for key in ("a", "b", "big"):
            assert read[key].dtype == dtype and torch.equal(read[key], reference[key].to(dtype)), key


# --------------------------------------------------------------------------- labels in the cache


def test_cached_labels_need_no_text_tower_nor_tokenizer(tiny_vit_checkpoint, monkeypatch):
    from clipcli.pipeline import label_classifier, load_model
    from clipcli.text import tokenizers

    first = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("image",))
    built = label_classifier(first, ["cat", "dog"], ["a photo of a {}."])
    assert "text" in first.model.towers  # the miss loaded it

    def refused(*args, **kwargs):
        raise AssertionError("a text was tokenized")

    monkeypatch.setattr(tokenizers.ClipTokenizer, "encode_texts", refused)
    cold = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("image",))
    assert torch.equal(label_classifier(cold, ["cat", "dog"], ["a photo of a {}."]), built)
    assert cold.model.towers == ("image",)  # the text tower's weights were never read


# --------------------------------------------------------------------------- the hub cache


def test_no_hub_library_when_the_hub_cache_lacks_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # importing it now fails
    assert hub.cached_file("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors") is None
    (tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai").mkdir(parents=True)
    with pytest.raises(ImportError):  # a repository that is there: the library looks
        hub.cached_file("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors")


# --------------------------------------------------------------------------- the command line


def app_module():
    return sys.modules["clipcli.cli.app"]


class Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch) -> list[int]:
    codes: list[int] = []

    def fake_exit(code):
        codes.append(code)
        raise Exited

    import clipcli.cli  # noqa: F401  (loads clipcli.cli.app)

    monkeypatch.setattr(app_module().os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "gettrace", lambda: None)  # as if not under coverage or a debugger
    return codes


def test_exit_now_runs_the_atexit_handlers_then_ends_the_process(exits, monkeypatch):
    ran = []  # not this test session's own handlers: the whole-process test below runs real ones
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append(list(exits)))
    with pytest.raises(Exited):
        app_module().exit_now(SystemExit(3))
    assert ran == [[]] and exits == [3]
    with pytest.raises(Exited):
        app_module().exit_now(SystemExit(None))
    assert exits == [3, 0]


def test_exit_now_keeps_the_normal_exit_when_something_needs_it(exits):
    with pytest.raises(SystemExit) as raised:  # a message: Python prints it
        app_module().exit_now(SystemExit("error: no"))
    assert raised.value.code == "error: no"

    release = threading.Event()
    worker = threading.Thread(target=release.wait)  # Python waits for a non-daemon thread
    worker.start()
    try:
        with pytest.raises(SystemExit):
            app_module().exit_now(SystemExit(0))
    finally:
        release.set()
        worker.join()

    sys.setprofile(lambda *args: None)  # python -m cProfile reports after main returns
    try:
        with pytest.raises(SystemExit):
            app_module().exit_now(SystemExit(0))
    finally:
        sys.setprofile(None)
    assert exits == []


def test_only_the_command_run_is_built():
    from clipcli.cli import app

    every = [info.name for info in app.registered_commands]
    with app_module().only_command(["clipcli", "classify", "x.jpg"]):
        assert [info.name for info in app.registered_commands] == ["classify"]
    assert [info.name for info in app.registered_commands] == every
    for argv in (["clipcli"], ["clipcli", "--help"], ["clipcli", "clasify"]):
        with app_module().only_command(argv):
            assert [info.name for info in app.registered_commands] == every


@pytest.mark.slow  # a whole process (or a large sheet): with the kill and race tests in `pytest -m slow`
def test_a_whole_process_ends_with_its_records_status_and_exit_handlers(tmp_path, tiny_vit_checkpoint):
    """Through ``main``: every record is on stdout (flushed before the process ends), the exit
    status is the command's (1: an image failed), and atexit handlers ran."""
    marker = tmp_path / "atexit-ran"
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")
    script = ("import atexit, pathlib, sys; atexit.register(pathlib.Path(sys.argv[1]).write_text, 'yes'); "
              "sys.argv = ['clipcli', *sys.argv[2:]]; from clipcli.cli import main; main()")
    command = [sys.executable, "-c", script, str(marker), "classify", str(DATA / "rocket.jpg"),
               str(tmp_path / "broken.jpg"), "-l", "cat,rocket", "-m", str(tiny_vit_checkpoint), "--device", "cpu",
               "-q", "-f", "jsonl"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CLIPCLI_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 1, done.stderr
    assert [line.count('"status": "ok"') for line in done.stdout.splitlines()] == [1, 0]
    assert marker.read_text() == "yes"
