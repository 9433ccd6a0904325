"""The download guarantees, each against a local server that misbehaves in one way.

For every fault: the final file exists only when its sha256 matched, nothing is left beside
it (partial, lock or temp files), and the error says what happened.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest
from download_server import start_server, stop_server

from clipcli import cache as cache_module
from clipcli import download, transfer
from clipcli.download import DownloadSettings, download_url, model_file
from clipcli.errors import ChecksumError, DownloadError, OfflineError, UnknownModelError
from clipcli.feedback import Feedback
from clipcli.models import registry

PAYLOAD = random.Random(0).randbytes(200_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = DownloadSettings(connect_timeout=2.0, read_timeout=0.3, retries=3, backoff_base=0.01, backoff_max=0.05,
                        retry_after_max=5.0, chunk_size=4096, free_space_margin=0)


@pytest.fixture
def server():
    state = start_server()
    yield state
    stop_server(state)


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """conftest makes every test offline; these tests talk to 127.0.0.1 only."""
    monkeypatch.delenv("CLIPCLI_OFFLINE", raising=False)
    monkeypatch.setattr(download, "DEFAULT_SETTINGS", FAST)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never the real hub


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "clipcli-cache"


def leftovers(directory: Path) -> list[str]:
    """Partial, lock and temp files: everything hidden."""
    return sorted(p.name for p in directory.glob(".*")) if directory.exists() else []


def assert_verified(path: Path) -> None:
    assert path.read_bytes() == PAYLOAD
    assert cache_module.read_meta(path)["sha256"] == SHA
    assert leftovers(path.parent) == []


@pytest.fixture
def said() -> list[str]:
    """What a download reported through its log callback."""
    return []


def test_plain_download_writes_file_and_sidecar(server, cache, said):
    server.add("/w.pt", PAYLOAD)
    path = download_url(server.url("/w.pt"), cache / "w.pt", SHA, feedback=Feedback(log=said.append))
    assert path == cache / "w.pt"
    assert_verified(path)
    assert cache_module.read_meta(path) == {"name": "w.pt", "sha256": SHA, "size": len(PAYLOAD), "url": server.url("/w.pt")}
    assert "sha256 verified" in "\n".join(said)


def test_the_library_reports_through_callbacks_and_never_prints(server, cache, capsys):
    server.add("/w.pt", PAYLOAD)
    meters, said = [], []

    class Meter:
        def __init__(self, label):
            self.label, self.updates, self.closed = label, [], False
            meters.append(self)

        def update(self, done, total):
            self.updates.append((done, total))

        def close(self):
            self.closed = True

    download_url(server.url("/w.pt"), cache / "w.pt", SHA, feedback=Feedback(log=said.append, meter=Meter))
    (meter,) = meters
    assert meter.label == "w.pt" and meter.closed
    assert meter.updates[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in meter.updates] == sorted(done for done, _ in meter.updates)
    assert any("sha256 verified" in line for line in said)
    download_url(server.url("/w.pt"), cache / "w2.pt", SHA)  # the default: silence
    assert capsys.readouterr() == ("", "")


def test_dropped_connection_resumes_with_range_and_if_range(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["drop:50000"]
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    first, second = server.gets()
    assert first.range is None
    assert second.range == "bytes=50000-" and second.if_range and second.if_range.startswith('"')


def test_repeated_drops_make_progress_and_finish(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["drop:30000"] * 6  # more drops than retries: progress resets the count
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    assert len(server.gets()) == 7


def test_no_content_length(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["no-length"]
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))


def test_range_ignored_restarts_from_zero(server, cache, said):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["drop:50000", "ignore-range"]
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA, feedback=Feedback(log=said.append)))
    assert len(server.gets()) == 2
    assert "ignored the Range request" in "\n".join(said)


def test_wrong_content_range_restarts_from_zero(server, cache, said):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["drop:50000", "bad-range"]
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA, feedback=Feedback(log=said.append)))
    requests = server.gets()
    assert [r.range for r in requests] == [None, "bytes=50000-", None]
    assert "Content-Range" in "\n".join(said)


def test_503_then_ok(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["status:503", "status:502"]
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    assert len(server.gets()) == 3


def test_429_honours_retry_after(server, cache, said):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["retry-after:1"]
    start = time.monotonic()
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA, feedback=Feedback(log=said.append)))
    assert time.monotonic() - start >= 0.95
    assert "HTTP 429" in "\n".join(said)


def test_retry_after_is_bounded(server, cache, monkeypatch):
    monkeypatch.setattr(download, "DEFAULT_SETTINGS", DownloadSettings(**{**FAST.__dict__, "retry_after_max": 0.1}))
    server.add("/w.pt", PAYLOAD)
    server.faults = ["retry-after:3600"]
    start = time.monotonic()
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    assert time.monotonic() - start < 2


def test_stall_longer_than_read_timeout_resumes(server, cache, said):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["stall:40000:3"]
    start = time.monotonic()
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA, feedback=Feedback(log=said.append)))
    assert time.monotonic() - start < 2.5  # gave up on the stalled connection after the read timeout
    assert server.gets()[1].range == "bytes=40000-"
    assert "read timeout" in "\n".join(said)


def test_wrong_bytes_once_is_downloaded_again(server, cache, said):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["wrong-bytes"]
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA, feedback=Feedback(log=said.append)))
    assert "downloading once more from scratch" in "\n".join(said)


def test_wrong_bytes_twice_fails_with_both_hashes(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["wrong-bytes", "wrong-bytes"]
    bad = hashlib.sha256(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 0xFF])).hexdigest()
    with pytest.raises(ChecksumError) as caught:
        download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    message = str(caught.value)
    assert f"expected {SHA}, got {bad}" in message and "\n" not in message
    assert not (cache / "w.pt").exists() and not (cache / "w.pt.json").exists()
    assert leftovers(cache) == []


@pytest.mark.parametrize("code", [404, 403])
def test_client_errors_are_not_retried(server, cache, code):
    server.add("/w.pt", PAYLOAD)
    server.faults = [f"status:{code}"] * 5
    with pytest.raises(DownloadError, match=f"HTTP {code}") as caught:
        download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    assert not isinstance(caught.value, ChecksumError)
    assert len(server.gets()) == 1
    assert list(cache.iterdir()) == []


def test_missing_file_404(server, cache):
    with pytest.raises(DownloadError, match=r"/nothing\.pt: HTTP 404"):
        download_url(server.url("/nothing.pt"), cache / "n.pt", SHA)
    assert list(cache.iterdir()) == []


def test_persistent_5xx_gives_up_after_bounded_retries(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["status:503"] * 10
    with pytest.raises(DownloadError, match="gave up .* after 4 failed attempts: HTTP 503"):
        download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    assert len(server.gets()) == 4
    assert list(cache.iterdir()) == []


def test_gave_up_mid_file_keeps_partial_then_resumes(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["drop:60000"] + ["status:503"] * 4
    with pytest.raises(DownloadError, match="partial download .* is kept, run again to resume"):
        download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    assert not (cache / "w.pt").exists()
    part = download.partial_path(cache / "w.pt", SHA)
    assert part.stat().st_size == 60000
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    assert server.gets()[-1].range == "bytes=60000-"
    assert server.gets()[-1].if_range is None  # a new run has no validator: the hash guards the join


def test_stale_partial_with_wrong_bytes_is_replaced(server, cache):
    server.add("/w.pt", PAYLOAD)
    cache.mkdir()
    download.partial_path(cache / "w.pt", SHA).write_bytes(b"garbage" * 1000)
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    assert [r.range for r in server.gets()] == ["bytes=7000-", None]


def test_ctrl_c_leaves_nothing_at_final_path_and_resumes(server, cache, monkeypatch):
    server.add("/w.pt", PAYLOAD)
    real_read = transfer.read_chunk
    calls = {"n": 0}

    def interrupted(response, size, url):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_read(response, size, url)

    monkeypatch.setattr(transfer, "read_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    assert not (cache / "w.pt").exists()
    part = download.partial_path(cache / "w.pt", SHA)
    assert [p.name for p in cache.iterdir()] == [part.name]  # no lock left
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD)
    monkeypatch.setattr(transfer, "read_chunk", real_read)
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    assert server.gets()[-1].range == f"bytes={kept}-"


def test_not_enough_disk_space(server, cache, monkeypatch):
    server.add("/w.pt", PAYLOAD)
    monkeypatch.setattr(transfer, "_free_bytes", lambda directory: 1000)
    with pytest.raises(DownloadError, match=r"not enough free disk space .* needs 195\.3 KiB, 1000 B free"):
        download_url(server.url("/w.pt"), cache / "w.pt", SHA, size=len(PAYLOAD))
    assert server.gets() == []  # checked before the first byte when the size is known
    with pytest.raises(DownloadError, match="not enough free disk space"):
        download_url(server.url("/w.pt"), cache / "w.pt", SHA)  # ... else from Content-Length
    assert list(cache.iterdir()) == []


def test_unreachable_server_is_offline(cache):
    with pytest.raises(OfflineError, match=r"cannot reach 127\.0\.0\.1:9"):
        download_url("http://127.0.0.1:9/w.pt", cache / "w.pt", SHA)
    assert list(cache.iterdir()) == []


def test_offline_env_refuses_to_download(server, cache, monkeypatch):
    server.add("/w.pt", PAYLOAD)
    monkeypatch.setenv("CLIPCLI_OFFLINE", "1")
    with pytest.raises(OfflineError, match="CLIPCLI_OFFLINE"):
        download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    assert server.requests == []


def test_bad_sha256_argument(cache):
    with pytest.raises(DownloadError, match="not a sha256"):
        download_url("http://127.0.0.1:9/w.pt", cache / "w.pt", "abc")


def test_cached_file_reused_and_corrupt_one_replaced(server, cache):
    server.add("/w.pt", PAYLOAD)
    path = download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    assert download_url(server.url("/w.pt"), cache / "w.pt", SHA) == path
    assert len(server.gets()) == 1
    # same size, different bytes: only a full check notices
    path.write_bytes(bytes(len(PAYLOAD)))
    assert download_url(server.url("/w.pt"), cache / "w.pt", SHA).read_bytes() != PAYLOAD
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA, verify=True))
    assert len(server.gets()) == 2
    # truncated: the size check notices
    path.write_bytes(PAYLOAD[:100])
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
    assert len(server.gets()) == 3


def test_force_downloads_again(server, cache):
    server.add("/w.pt", PAYLOAD)
    download_url(server.url("/w.pt"), cache / "w.pt", SHA)
    assert_verified(download_url(server.url("/w.pt"), cache / "w.pt", SHA, force=True))
    assert len(server.gets()) == 2


def test_concurrent_downloads_of_one_file(server, cache):
    server.add("/w.pt", PAYLOAD)
    server.faults = ["throttle:1000000"]  # ~0.2 s, long enough for the second to wait on the lock
    results, errors = [], []

    def run():
        try:
            results.append(download_url(server.url("/w.pt"), cache / "w.pt", SHA))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and results == [cache / "w.pt"] * 3
    assert len(server.gets()) == 1  # the others found the first one's verified file
    assert_verified(cache / "w.pt")


def test_concurrent_processes(server, cache, tmp_path):
    """Two processes: one lock file, one download, one intact result."""
    import subprocess
    import sys

    server.add("/w.pt", PAYLOAD)
    server.faults = ["throttle:400000"]
    script = (
        "import sys; from clipcli import download;"
        "download.download_url(sys.argv[1], sys.argv[2], sys.argv[3]); print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    procs = [subprocess.Popen([sys.executable, "-c", script, server.url("/w.pt"), str(cache / "w.pt"), SHA],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=20) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(server.gets()) == 1
    assert_verified(cache / "w.pt")


# --- released models: sources, OpenAI's cache, offline -------------------------------------

@pytest.fixture
def fake_model(monkeypatch, server):
    """A released model whose file is PAYLOAD, served as OpenAI's URL by the local server."""
    info = registry.ModelInfo("Fake/1", "Fake-1.pt", SHA, len(PAYLOAD), 32, 16, "timm/fake_clip.openai", ("fake-1",))
    monkeypatch.setattr(registry, "MODELS", (info,))
    monkeypatch.setattr(registry, "OPENAI_URL", server.base + "/clip/models/{sha256}/{file}")
    return info


def openai_path(info) -> str:
    return f"/clip/models/{info.sha256}/{info.file}"


def test_model_file_downloads_then_reuses(server, fake_model, cache):
    server.add(openai_path(fake_model), PAYLOAD)
    assert model_file("fake-1") == cache / "Fake-1.pt"
    assert model_file("FAKE/1") == cache / "Fake-1.pt"
    assert len(server.gets()) == 1
    assert_verified(cache / "Fake-1.pt")


def test_model_file_honours_cache_dir_argument(server, fake_model, tmp_path):
    server.add(openai_path(fake_model), PAYLOAD)
    assert model_file("Fake/1", cache_dir=tmp_path / "elsewhere") == tmp_path / "elsewhere" / "Fake-1.pt"


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPCLI_CACHE_DIR", str(tmp_path / "a"))
    assert cache_module.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CLIPCLI_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_module.default_cache_dir() == tmp_path / "xdg" / "clipcli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_module.default_cache_dir() == Path.home() / ".cache" / "clipcli"
    assert cache_module.resolve_cache_dir(tmp_path / "b") == tmp_path / "b"


def test_corrupt_cached_model_is_replaced(server, fake_model, cache, said):
    server.add(openai_path(fake_model), PAYLOAD)
    cache.mkdir()
    (cache / "Fake-1.pt").write_bytes(PAYLOAD[:1234])
    assert model_file("Fake/1", feedback=Feedback(log=said.append)) == cache / "Fake-1.pt"
    assert_verified(cache / "Fake-1.pt")
    assert "is corrupt (1234 bytes instead of 200000)" in "\n".join(said)


def test_verify_replaces_same_size_corruption(server, fake_model, cache):
    server.add(openai_path(fake_model), PAYLOAD)
    model_file("Fake/1")
    (cache / "Fake-1.pt").write_bytes(bytes(len(PAYLOAD)))
    assert download.download_model(fake_model, verify=True) == cache / "Fake-1.pt"
    assert_verified(cache / "Fake-1.pt")
    assert len(server.gets()) == 2


def test_reuses_openai_cache_without_network(server, fake_model, cache, isolated_home):
    clip_cache = isolated_home / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    (clip_cache / "Fake-1.pt").write_bytes(PAYLOAD)
    path = model_file("Fake/1")
    assert path == cache / "Fake-1.pt" and path.read_bytes() == PAYLOAD
    assert os.path.samefile(path, clip_cache / "Fake-1.pt")  # hard link, no second copy
    assert server.requests == []
    assert leftovers(cache) == []


def test_openai_cache_is_copied_when_it_cannot_be_linked(server, fake_model, cache, isolated_home, monkeypatch):
    clip_cache = isolated_home / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    (clip_cache / "Fake-1.pt").write_bytes(PAYLOAD)

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    path = model_file("Fake/1")
    assert path.read_bytes() == PAYLOAD and not os.path.samefile(path, clip_cache / "Fake-1.pt")
    assert server.requests == [] and leftovers(cache) == []


def test_openai_cache_is_used_in_place_without_room_to_copy(server, fake_model, cache, isolated_home, monkeypatch):
    clip_cache = isolated_home / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    (clip_cache / "Fake-1.pt").write_bytes(PAYLOAD)
    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(18, "cross-device")))
    monkeypatch.setattr(transfer, "_free_bytes", lambda directory: 10)
    assert model_file("Fake/1") == clip_cache / "Fake-1.pt"
    assert server.requests == [] and leftovers(cache) == []


def test_openai_cache_with_wrong_hash_is_not_used(server, fake_model, cache, isolated_home):
    server.add(openai_path(fake_model), PAYLOAD)
    clip_cache = isolated_home / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    (clip_cache / "Fake-1.pt").write_bytes(bytes(len(PAYLOAD)))
    assert model_file("Fake/1").read_bytes() == PAYLOAD
    assert (clip_cache / "Fake-1.pt").read_bytes() == bytes(len(PAYLOAD))  # not ours: left alone
    assert len(server.gets()) == 1


def test_falls_back_to_hub_safetensors(server, fake_model, cache, monkeypatch):
    hub_bytes = PAYLOAD[::-1]
    hub_sha = hashlib.sha256(hub_bytes).hexdigest()
    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.headers["/timm/fake_clip.openai/resolve/main/open_clip_model.safetensors"] = {
        "status": "302", "Location": "/cdn/blob", "X-Linked-Etag": f'"{hub_sha}"',
        "X-Linked-Size": str(len(hub_bytes)), "X-Repo-Commit": commit,
    }
    server.add(f"/timm/fake_clip.openai/resolve/{commit}/open_clip_model.safetensors", hub_bytes)
    path = model_file("Fake/1")  # OpenAI's URL answers 404
    assert path == cache / "Fake-1.safetensors" and path.read_bytes() == hub_bytes
    assert cache_module.read_meta(path)["sha256"] == hub_sha
    assert [r.method for r in server.requests] == ["GET", "HEAD", "GET"]
    assert model_file("Fake/1") == path and len(server.requests) == 3  # cached: no network


def test_hub_without_a_sha256_is_skipped(server, fake_model, cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    server.headers["/timm/fake_clip.openai/resolve/main/open_clip_model.safetensors"] = {
        "status": "302", "Location": "/cdn/blob", "ETag": '"abc"'}
    with pytest.raises(DownloadError, match="Hugging Face hub: .*the hub reported no sha256 for the file"):
        model_file("Fake/1")
    assert [r.method for r in server.requests] == ["GET", "HEAD"]
    assert not cache.exists() or list(cache.iterdir()) == []


def test_falls_back_to_mirror(server, fake_model, cache, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "Fake-1.pt").write_bytes(PAYLOAD)
    monkeypatch.setenv("CLIPCLI_MIRROR", str(mirror))  # a folder works as well as a URL
    assert model_file("Fake/1") == cache / "Fake-1.pt"
    assert_verified(cache / "Fake-1.pt")


def test_offline_message_is_one_actionable_line(fake_model, cache, monkeypatch):
    monkeypatch.setenv("CLIPCLI_OFFLINE", "1")
    with pytest.raises(OfflineError) as caught:
        model_file("Fake/1")
    assert str(caught.value) == (
        f"Fake/1 is not in the cache ({cache}) and could not be downloaded: CLIPCLI_OFFLINE is set. "
        "Run `clipcli download Fake/1` on a machine with internet and copy Fake-1.pt into the cache, "
        "or give a checkpoint file instead of the name."
    )
    assert caught.value.exit_code == 2


def test_no_network_is_offline(fake_model, cache, monkeypatch, capsys):
    monkeypatch.setattr(registry, "OPENAI_URL", "http://127.0.0.1:9/{sha256}/{file}")
    with pytest.raises(OfflineError) as caught:
        model_file("Fake/1")
    message = str(caught.value)
    assert message.startswith(f"Fake/1 is not in the cache ({cache}) and could not be downloaded: OpenAI: cannot reach")
    assert "Hugging Face hub: cannot reach" in message and "; CLIPCLI_MIRROR: not set. Run" in message
    assert "\n" not in message
    assert not cache.exists() or list(cache.iterdir()) == []
    assert capsys.readouterr().err == ""  # the exception is the one line; nothing said before it


def test_a_failed_source_does_not_repeat_the_model_name(server, fake_model, cache, said):
    """``Fake/1 ... could not be downloaded: OpenAI: URL does not match``, not ``OpenAI: Fake/1 from URL``."""
    server.add(openai_path(fake_model), PAYLOAD[::-1])  # the right size, the wrong bytes
    with pytest.raises(DownloadError) as caught:
        model_file("Fake/1", feedback=Feedback(log=said.append))
    message, url = str(caught.value), server.url(openai_path(fake_model))
    assert message.startswith(f"Fake/1 is not in the cache ({cache}) and could not be downloaded: OpenAI: {url} "
                              f"does not match its sha256: expected {SHA}, got ")
    assert message.count("Fake/1") == 2  # the model, and the command that downloads it
    assert said[-1].startswith(f"Fake/1: OpenAI: {url} does not match its sha256")


def test_all_sources_failing_is_a_download_error(server, fake_model, cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base)  # 404 for the hub too
    with pytest.raises(DownloadError) as caught:
        model_file("Fake/1")
    assert not isinstance(caught.value, OfflineError)
    assert "OpenAI: " in str(caught.value) and "HTTP 404" in str(caught.value)


def test_unknown_model_lists_the_released_ones():
    with pytest.raises(UnknownModelError) as caught:
        model_file("ViT-Q/99")
    assert str(caught.value) == (
        "'ViT-Q/99' is neither a released model (RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, "
        "ViT-B/16, ViT-L/14, ViT-L/14@336px), an OpenCLIP ARCH/TAG or hf-hub:ORG/REPO name (see `clipcli models`), "
        "nor an existing checkpoint file"
    )
