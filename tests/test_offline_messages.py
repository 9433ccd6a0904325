"""Hub models without the hub: an unreachable hub fails at once, and offline or not, the one
line names the model once, every file looked for, the cache and the switches.

The hub is a closed port on 127.0.0.1 (nothing listens: every connection is refused) or the
local file server; nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
from download_server import start_server, stop_server
from typer.testing import CliRunner

from clipcli import hub
from clipcli.errors import OfflineError
from clipcli.loading import resolve
from clipcli.models import registry

LAION = "ViT-B-32/laion2b_s34b_b79k"
TRANSFORMERS = "hf-hub:org/clip-tf"  # a repository in neither the cache nor any hub
FAST = 5.0  # seconds; an unreachable hub took about 25 s per model before


def run(*args):
    from clipcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def closed_port(monkeypatch) -> int:
    """HF_ENDPOINT on a port of 127.0.0.1 that nothing listens on, and no offline switch set."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("CLIPCLI_OFFLINE", raising=False)
    return port


def looked_for(name: str) -> str:
    """What the cache was searched for, as the message lists it."""
    if name == TRANSFORMERS:
        return "no open_clip_config.json or config.json)"
    pretrained = registry.find_pretrained(name)
    *first, last = pretrained.files
    return f"no {', '.join(first)} or {last} of {pretrained.hf_repo})"


def timed_failure(name: str) -> tuple[OfflineError, float]:
    started = time.monotonic()
    with pytest.raises(OfflineError) as caught:
        resolve(name)
    return caught.value, time.monotonic() - started


# --------------------------------------------------------------------------- unreachable


@pytest.mark.parametrize("name", [LAION, TRANSFORMERS])
def test_an_unreachable_hub_fails_at_once_with_one_line(closed_port, name):
    error, seconds = timed_failure(name)
    message = str(error)
    assert seconds < FAST, f"{seconds:.1f} s"
    assert message.startswith(f"{name}: cannot reach the Hugging Face hub (http://127.0.0.1:{closed_port}: ")
    assert f"it is not in the Hugging Face cache ({hub.cache_dir()}: {looked_for(name)}" in message
    assert message.endswith("; CLIPCLI_OFFLINE=1 or HF_HUB_OFFLINE=1 uses only the cache, without trying the hub")
    assert message.count(name.removeprefix(hub.PREFIX)) == 1 and "\n" not in message


def test_a_transformers_repository_names_both_configs_not_the_first(closed_port):
    message = str(timed_failure(TRANSFORMERS)[0])
    assert "open_clip_config.json or config.json" in message
    assert "open_clip_config.json:" not in message and "/open_clip_config.json" not in message


@pytest.mark.parametrize("command", ["classify", "download"])
def test_the_commands_print_it_as_one_line(closed_port, command, sample_images):
    args = [sample_images[0], "--labels", "cat,dog", "--model"] if command == "classify" else []
    started = time.monotonic()
    result = run(command, *args, LAION)
    assert time.monotonic() - started < FAST
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {LAION}: cannot reach the Hugging Face hub")
    assert result.stderr.count("\n") == 1 and result.stderr.count(LAION) == 1


# --------------------------------------------------------------------------- offline by choice


@pytest.fixture
def hub_server(monkeypatch):
    """The local file server as HF_ENDPOINT, to show that nothing asks it."""
    server = start_server()
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.delenv("CLIPCLI_OFFLINE", raising=False)
    yield server
    stop_server(server)


@pytest.mark.parametrize("switch", ["CLIPCLI_OFFLINE", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("name", [LAION, TRANSFORMERS])
def test_offline_names_the_model_the_files_the_cache_and_the_switch(hub_server, monkeypatch, switch, name):
    monkeypatch.setenv(switch, "1")
    error, seconds = timed_failure(name)
    assert str(error) == (f"{name} is not in the Hugging Face cache ({hub.cache_dir()}: {looked_for(name)}, "
                          f"and {switch} is set: the hub is not asked")
    assert hub_server.requests == [] and seconds < FAST


def test_offline_with_part_of_a_repository_cached_names_what_is_missing(monkeypatch, tmp_path):
    from foreign import hf_cache_repo, open_clip_model, save_open_clip

    monkeypatch.delenv("CLIPCLI_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save_open_clip(open_clip_model("quickgelu"), "quickgelu", tmp_path / "m")
    (folder / "open_clip_model.safetensors").unlink()  # the config without its weights
    hf_cache_repo(hub.cache_dir(), "org/half", folder)
    message = str(timed_failure("hf-hub:org/half")[0])
    assert (": no open_clip_model.safetensors, open_clip_pytorch_model.safetensors, open_clip_pytorch_model.bin "
            "or config.json), and HF_HUB_OFFLINE is set") in message


# --------------------------------------------------------------------------- a reachable hub


def test_a_reachable_hub_still_falls_back_from_one_layout_to_the_other(hub_server, tmp_path):
    """A transformers repository on the hub: no open_clip_config.json (the hub's 404 says
    EntryNotFound), so its config.json and weights are downloaded."""
    from foreign import save_transformers, transformers_model

    folder = save_transformers(transformers_model("gelu-eos49407"), tmp_path / "served")
    commit = "d" * 40
    base = "/org/tf/resolve/main/"
    for missing in ("open_clip_config.json", "preprocessor_config.json", "processor_config.json"):
        hub_server.headers[base + missing] = {"status": "404", "X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
    for file in folder.iterdir():
        data = file.read_bytes()
        hub_server.add(base + file.name, data)
        hub_server.headers[base + file.name] = {"X-Repo-Commit": commit}
        if file.suffix == ".safetensors":
            hub_server.headers[base + file.name].update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                                          "X-Linked-Size": str(len(data))})
    source = resolve("hf-hub:org/tf")
    assert source.path.name == "model.safetensors" and source.path.read_bytes() == (folder / source.path.name).read_bytes()
