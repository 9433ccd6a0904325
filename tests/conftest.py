"""Shared fixtures: an isolated home and cache for every test, and small released-format checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from checkpoints import random_reference_model, save_released

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Never touch the user's home, cache or the network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("CLIPCLI_CACHE_DIR", str(tmp_path / "clipcli-cache"))
    monkeypatch.setenv("CLIPCLI_OFFLINE", "1")
    monkeypatch.delenv("CLIPCLI_MODEL", raising=False)
    monkeypatch.delenv("CLIPCLI_MIRROR", raising=False)
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)  # the HF cache is under the fake home
    return home


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(checkpoint_dir) -> Path:
    """A tiny ViT CLIP (32 px input) as an OpenAI-style TorchScript ``.pt`` with fp16 weights."""
    return save_released(random_reference_model("tiny-vit", seed=1), checkpoint_dir / "tiny-vit.pt")


@pytest.fixture(scope="session")
def tiny_rn_checkpoint(checkpoint_dir) -> Path:
    """A tiny ModifiedResNet CLIP (64 px input) as an OpenAI-style TorchScript ``.pt``."""
    return save_released(random_reference_model("tiny-rn", seed=2), checkpoint_dir / "tiny-rn.pt")


@pytest.fixture
def sample_images(tmp_path) -> list[Path]:
    """The sample photos in tests/data, copied so a test may modify them."""
    out = []
    for source in sorted(DATA.glob("*")):
        if source.suffix.lower() in (".png", ".jpg", ".jpeg"):
            out.append(Path(shutil.copy(source, tmp_path / source.name)))
    return out


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder holding the sample photos of tests/data (a test module may define its own)."""
    folder = tmp_path / "photos"
    shutil.copytree(DATA, folder, ignore=shutil.ignore_patterns("*.md", "icc"))
    return folder


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, read offline (tests lay repositories out in it)."""
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and much faster on a machine shared with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
