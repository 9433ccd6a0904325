"""`clipcli models`, `clipcli download`, `clipcli convert` as a user runs them.

CliRunner for exact stdout/stderr/exit codes; real subprocesses for a download that is
killed (SIGKILL) or interrupted (Ctrl-C) mid-transfer and then resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from download_server import start_server, stop_server
from typer.testing import CliRunner

from clipcli import download
from clipcli.cli import app, weights_commands
from clipcli.download import DownloadSettings
from clipcli.models import registry

PAYLOAD = random.Random(1).randbytes(150_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
CLIPCLI = Path(sys.executable).parent / "clipcli"
runner = CliRunner()


@pytest.fixture
def server():
    state = start_server()
    yield state
    stop_server(state)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("CLIPCLI_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(download, "DEFAULT_SETTINGS", DownloadSettings(
        connect_timeout=2, read_timeout=0.5, retries=2, backoff_base=0.01, backoff_max=0.05, free_space_margin=0))


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "clipcli-cache"  # what conftest points CLIPCLI_CACHE_DIR at


@pytest.fixture
def fake_model(monkeypatch, server):
    info = registry.ModelInfo("Fake/1", "Fake-1.pt", SHA, len(PAYLOAD), 32, 16, "timm/fake_clip.openai")
    monkeypatch.setattr(registry, "MODELS", (info,))
    monkeypatch.setattr(registry, "OPENAI_URL", server.base + "/m/{sha256}/{file}")
    server.add(f"/m/{SHA}/Fake-1.pt", PAYLOAD)
    return info


def invoke(*args: str):
    return runner.invoke(app, list(args))


def usage_error(result) -> str:
    """A usage error's message: one line, exit code 2 (not Typer's box)."""
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*")) if directory.exists() else []


# --- models ------------------------------------------------------------------------------

def test_models_json_lists_the_nine_uncached():
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["name"] for r in records[:9]] == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
                                                "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    vit = records[5]
    assert vit == {"name": "ViT-B/32", "released": True, "input_resolution": 224, "embed_dim": 512,
                   "size": 353976522, "cached": False, "path": None,
                   "sha256": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
                   "url": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
                   "family": "OpenAI", "parameters": 151_277_313, "license": "MIT", "imagenet_top1": 63.3,
                   "score_kind": "softmax", "multilingual": False, "context_length": 77}
    assert result.stderr == ""


def test_models_in_a_pipe_is_json_lines():
    result = invoke("models")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[8]["name"] == "ViT-L/14@336px"
    assert len(lines) == 9 + len(registry.pretrained()) + len(registry.hub_aliases())
    assert {"ViT-B-32/laion2b_s34b_b79k", "ViT-H-14-378/dfn5b", "ViT-bigG-14/laion2b_s39b_b160k",
            "ViT-B-16-SigLIP2/webli", "hf-hub:google/siglip-base-patch16-224"} <= {line["name"] for line in lines}


def test_models_table_on_a_terminal(monkeypatch, cache):
    cache.mkdir()
    with open(cache / "RN50.pt", "wb") as f:
        f.truncate(registry.MODELS[0].size)  # sparse, of the right size: counts as cached
    monkeypatch.setattr(weights_commands, "_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "160")
    result = invoke("models")
    assert result.exit_code == 0
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    assert "┃ name " in result.stdout and "licence" in result.stdout
    vit = next(row for row in rows if "ViT-B/32" in row)
    assert [cell.strip() for cell in vit.split("│")[1:11]] == ["ViT-B/32", "OpenAI", "softmax", "151M", "224", "512",
                                                               "en", "MIT", "63.3", "no"]
    assert next(row for row in rows if "RN50 " in row).split("│")[10].strip() != "no"
    siglip = next(row for row in rows if "ViT-B-16-SigLIP2/webli" in row)
    assert [cell.strip() for cell in siglip.split("│")[2:4]] == ["SigLIP 2", "sigmoid"]


def test_models_shows_cached_and_url_downloads(online, server, cache, fake_model):
    server.add("/custom.pt", PAYLOAD[::-1])
    assert invoke("download", "Fake/1").exit_code == 0
    other_sha = hashlib.sha256(PAYLOAD[::-1]).hexdigest()
    assert invoke("download", server.url("/custom.pt"), "--sha256", other_sha, "--name", "mine.pt").exit_code == 0
    records = json.loads(invoke("models", "--format", "json").stdout)
    assert [records[0], records[-1]] == [
        {"name": "Fake/1", "released": True, "input_resolution": 32, "embed_dim": 16, "size": len(PAYLOAD),
         "cached": True, "path": str(cache / "Fake-1.pt"), "sha256": SHA, "url": server.url(f"/m/{SHA}/Fake-1.pt"),
         "family": "OpenAI", "parameters": None, "license": None, "imagenet_top1": None, "score_kind": "softmax",
         "multilingual": False, "context_length": None},
        {"name": "mine.pt", "released": False, "input_resolution": None, "embed_dim": None, "size": len(PAYLOAD),
         "cached": True, "path": str(cache / "mine.pt"), "sha256": other_sha, "url": server.url("/custom.pt"),
         "family": None, "parameters": None, "license": None, "imagenet_top1": None, "score_kind": None,
         "multilingual": None, "context_length": None},
    ]
    assert len(records) == 2 + len(registry.pretrained()) + len(registry.hub_aliases())


# --- download URL --------------------------------------------------------------------------

def test_download_url_prints_path_on_stdout(online, server, cache):
    server.add("/w/ckpt.pt", PAYLOAD)
    result = invoke("download", server.url("/w/ckpt.pt"), "--sha256", SHA.upper())
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{cache / 'ckpt.pt'}\n"
    assert "sha256 verified" in result.stderr
    assert (cache / "ckpt.pt").read_bytes() == PAYLOAD and hidden(cache) == []
    again = invoke("download", server.url("/w/ckpt.pt"), "--sha256", SHA, "--quiet")
    assert again.stdout == result.stdout and again.stderr == "" and len(server.gets()) == 1


def test_download_url_resumes_after_drop(online, server, cache):
    server.add("/ckpt.pt", PAYLOAD)
    server.faults = ["drop:70000"]
    result = invoke("download", server.url("/ckpt.pt"), "--sha256", SHA, "--cache-dir", str(cache / "x"))
    assert result.exit_code == 0, result.stderr
    assert server.gets()[1].range == "bytes=70000-"
    assert "closed after 68.4 KiB of 146.5 KiB; retrying" in result.stderr


def test_download_url_needs_sha256(online, server):
    result = invoke("download", server.url("/ckpt.pt"))
    assert "a URL needs --sha256 HEX, the sha256 the file must have" in usage_error(result)
    assert server.requests == []


def test_download_url_checksum_mismatch(online, server, cache):
    server.add("/ckpt.pt", PAYLOAD)
    wrong = "0" * 64
    result = invoke("download", server.url("/ckpt.pt"), "--sha256", wrong)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == (f"error: ckpt.pt from {server.url('/ckpt.pt')} does not match its sha256: expected {wrong}, "
                         f"got {SHA} (150000 bytes); the download was deleted")
    assert list(cache.iterdir()) == []
    assert len(server.gets()) == 2  # retried once


def test_download_url_404(online, server, cache):
    result = invoke("download", server.url("/missing.pt"), "--sha256", SHA)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == f"error: {server.url('/missing.pt')}: HTTP 404 Not Found"
    assert list(cache.iterdir()) == []


def test_download_url_refuses_a_released_file_name(online, server):
    result = invoke("download", server.url("/ckpt.pt"), "--sha256", SHA, "--name", "ViT-B-32.pt")
    assert "ViT-B-32.pt is where the released model ViT-B/32 is cached; choose another --name" in usage_error(result)


def test_download_url_offline(server, cache):
    server.add("/ckpt.pt", PAYLOAD)  # conftest sets CLIPCLI_OFFLINE=1
    result = invoke("download", server.url("/ckpt.pt"), "--sha256", SHA)
    assert result.exit_code == 2
    assert result.stderr == f"error: not downloading {server.url('/ckpt.pt')}: CLIPCLI_OFFLINE is set\n"
    assert server.requests == []


# --- download NAME -------------------------------------------------------------------------

def test_download_released_name_offline_is_one_line(cache):
    result = invoke("download", "vit-b-32")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: ViT-B/32 is not in the cache ({cache}) and could not be downloaded: CLIPCLI_OFFLINE is set. "
        "Run `clipcli download ViT-B/32` on a machine with internet and copy ViT-B-32.pt into the cache, "
        "or give a checkpoint file instead of the name.\n"
    )


def test_download_unknown_name():
    result = invoke("download", "ViT-Z/1")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: 'ViT-Z/1' is neither a released model (RN50, RN101,")


def test_download_name_then_cached_then_verify(online, server, cache, fake_model):
    first = invoke("download", "fake/1")
    assert first.exit_code == 0 and first.stdout == f"{cache / 'Fake-1.pt'}\n"
    second = invoke("download", "Fake/1")
    assert second.stdout == first.stdout and f"Fake/1: cached at {cache / 'Fake-1.pt'}" in second.stderr
    (cache / "Fake-1.pt").write_bytes(bytes(len(PAYLOAD)))  # same size: only --verify notices
    assert invoke("download", "Fake/1").exit_code == 0 and len(server.gets()) == 1
    verified = invoke("download", "Fake/1", "--verify")
    assert verified.exit_code == 0 and "is corrupt (sha256" in verified.stderr
    assert (cache / "Fake-1.pt").read_bytes() == PAYLOAD and len(server.gets()) == 2
    forced = invoke("download", "Fake/1", "--force", "-q")
    assert forced.exit_code == 0 and forced.stderr == "" and len(server.gets()) == 3


def test_download_several_names_reports_each_failure(online, server, cache, fake_model):
    result = invoke("download", "Fake/1", "bogus")
    assert result.exit_code == 2
    assert result.stdout == f"{cache / 'Fake-1.pt'}\n"
    assert "error: 'bogus' is neither a released model (Fake/1)" in result.stderr  # the name said once


def test_download_all(online, server, cache, fake_model):
    result = invoke("download", "--all", "-q")
    assert result.exit_code == 0 and result.stdout == f"{cache / 'Fake-1.pt'}\n"


@pytest.mark.parametrize("args, message", [
    ((), "name a released model"),
    (("--all", "RN50"), "give model names or --all, not both"),
    (("RN50", "--sha256", SHA), "--sha256 and --name go with a URL"),
    (("http://127.0.0.1:9/a.pt", "http://127.0.0.1:9/b.pt", "--sha256", SHA), "one URL at a time"),
])
def test_download_usage_errors(args, message):
    assert message in usage_error(invoke("download", *args))


# --- a real process, killed and interrupted mid-transfer -----------------------------------

BIG = random.Random(2).randbytes(3_000_000)
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def _start(url: str, cache: Path, tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CLIPCLI_OFFLINE"}
    env.update(HOME=str(tmp_path / "home"), CLIPCLI_CACHE_DIR=str(cache))
    return subprocess.Popen([str(CLIPCLI), "download", url, "--sha256", BIG_SHA, "--name", "big.pt"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_partial(cache: Path, at_least: int) -> Path:
    part = download.partial_path(cache / "big.pt", BIG_SHA)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if part.exists() and part.stat().st_size >= at_least:
            return part
        time.sleep(0.02)
    raise AssertionError("the download never started")


@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_cli_process_stopped_mid_transfer_resumes(server, cache, tmp_path, how):
    server.add("/big.pt", BIG)
    server.faults = ["throttle:2000000"]  # 1.5 s for the whole file; we stop it well before
    proc = _start(server.url("/big.pt"), cache, tmp_path)
    part = _wait_for_partial(cache, 600_000)
    proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    if how == "ctrl-c":
        assert proc.returncode == 130 and err.splitlines()[-1] == "error: interrupted"
        assert hidden(cache) == [part.name]  # lock released and removed, partial kept
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (cache / "big.pt").exists()
    kept = part.stat().st_size
    assert 0 < kept < len(BIG)

    resumed = _start(server.url("/big.pt"), cache, tmp_path)
    out, err = resumed.communicate(timeout=30)
    assert resumed.returncode == 0, err
    assert out == f"{cache / 'big.pt'}\n"
    assert f"resuming {part.name} at" in err
    assert server.gets()[-1].range == f"bytes={kept}-"
    assert (cache / "big.pt").read_bytes() == BIG and hidden(cache) == []


# --- convert -------------------------------------------------------------------------------

def test_convert_round_trips_with_identical_outputs(tiny_vit_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    import clipcli
    from clipcli.checkpoint import read_state_dict

    dst = tmp_path / "out" / "tiny.safetensors"
    result = invoke("convert", str(tiny_vit_checkpoint), str(dst))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{dst}\n" and "float16" in result.stderr
    source = read_state_dict(tiny_vit_checkpoint)
    converted = load_file(dst)
    assert set(converted) == set(source) - {"input_resolution", "context_length", "vocab_size"}
    assert all(torch.equal(converted[k], source[k]) for k in converted)
    assert hidden(dst.parent) == []

    a, _ = clipcli.load(tiny_vit_checkpoint, device="cpu")
    b, _ = clipcli.load(dst, device="cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = clipcli.tokenize(["a cat", "a dog on a skateboard"])
    with torch.no_grad():
        for x, y in zip(a(images, tokens), b(images, tokens)):
            assert torch.equal(x, y)  # same weights, same code: bit-identical logits


def test_convert_to_float32(tiny_rn_checkpoint, tmp_path):
    from safetensors.torch import load_file

    dst = tmp_path / "rn.safetensors"
    result = invoke("convert", str(tiny_rn_checkpoint), str(dst), "--dtype", "float32", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    tensors = load_file(dst)
    assert {str(t.dtype) for t in tensors.values() if t.is_floating_point()} == {"torch.float32"}


def test_convert_refuses_to_overwrite(tiny_vit_checkpoint, tmp_path):
    dst = tmp_path / "tiny.safetensors"
    dst.write_bytes(b"keep me")
    result = invoke("convert", str(tiny_vit_checkpoint), str(dst))
    assert result.exit_code == 2 and result.stderr == f"error: {dst} already exists; pass --overwrite to replace it\n"
    assert dst.read_bytes() == b"keep me"
    assert invoke("convert", str(tiny_vit_checkpoint), str(dst), "--overwrite").exit_code == 0
    assert dst.read_bytes() != b"keep me"


def test_convert_needs_safetensors_suffix(tiny_vit_checkpoint, tmp_path):
    result = invoke("convert", str(tiny_vit_checkpoint), str(tmp_path / "x.pt"))
    assert f"{tmp_path / 'x.pt'} must end in .safetensors" in usage_error(result)


def test_convert_bad_source_is_one_line_and_writes_nothing(tmp_path):
    src = tmp_path / "notes.pt"
    src.write_text("not a checkpoint")
    result = invoke("convert", str(src), str(tmp_path / "out.safetensors"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and str(src) in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "notes.pt"]


def test_convert_unknown_name():
    result = invoke("convert", "ViT-Z/1", "out.safetensors")
    assert result.exit_code == 2 and "is not a model name" in result.stderr
