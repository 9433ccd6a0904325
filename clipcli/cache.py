"""The cache: where downloaded weights, their sidecars, label embeddings and checksums live.

One folder (``$CLIPCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipcli``, else ``~/.cache/clipcli``):

- ``ViT-B-32.pt`` (OpenAI's file name) or ``ViT-B-32.safetensors`` (from the Hugging Face
  hub), and any file ``clipcli download URL`` fetched; each downloaded file has a sidecar
  ``<file>.json`` with its sha256, size and source, so a cached file is checked before use
  (size always, the full sha256 on request) and a corrupt one is deleted;
- ``labels/``: zero-shot classifiers by model, labels and templates (:func:`entry`);
- ``checksums/``: the sha256 of local checkpoints by path, size, mtime and inode
  (:func:`remembered_sha256`; a download records its own), so identifying a model does not
  re-read gigabytes.

A cache entry that cannot be written is not an error. Locks are :func:`clipcli.fsutil.exclusive_lock`;
downloading is :mod:`clipcli.download`'s. Hugging Face hub files stay in the HF cache (:mod:`clipcli.hub`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from .errors import ClipcliError, DownloadError
from .feedback import SILENT, Feedback, Log
from .fsutil import atomic_write, exclusive_lock, sha256_file
from .hub import env_flag
from .models import registry
from .models.registry import ModelInfo

# --- where ------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$CLIPCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipcli``, else ``~/.cache/clipcli``."""
    if os.environ.get("CLIPCLI_CACHE_DIR"):
        return Path(os.environ["CLIPCLI_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "clipcli"
    return Path.home() / ".cache" / "clipcli"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def openai_cache_dir() -> Path:
    """Where OpenAI's ``clip.load`` keeps its downloads."""
    return Path.home() / ".cache" / "clip"


def offline() -> bool:
    """``$CLIPCLI_OFFLINE``: use the cache only (``HF_HUB_OFFLINE`` is for the hub's files)."""
    return env_flag("CLIPCLI_OFFLINE")


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_meta(path: Path) -> dict | None:
    """The sidecar of a downloaded file: ``{"sha256", "size", "url", "name"}``, or None."""
    try:
        meta = json.loads(meta_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not is_sha256(meta.get("sha256")):
        return None
    return meta


def write_meta(path: Path, meta: dict) -> None:
    with atomic_write(meta_path(path), overwrite=True, text=True) as f:
        f.write(json.dumps(meta, indent=1) + "\n")


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def file_problem(path: Path, sha256: str, size: int | None, *, full: bool) -> str | None:
    """Why ``path`` is not the expected file, or None when it is.

    The size is always compared; the full sha256 only with ``full`` or when the size is
    unknown. A size mismatch is confirmed by hashing, since the sha256 is what defines the file.
    """
    try:
        actual_size = path.stat().st_size
    except OSError as error:
        return f"cannot read it ({error.strerror})"
    if size is not None and actual_size == size and not full:
        return None
    actual = sha256_file(path)
    if actual == sha256:
        remember_sha256(path, actual)
        return None
    if size is not None and actual_size != size:
        return f"{actual_size} bytes instead of {size}"
    return f"sha256 {actual} instead of {sha256}"


def discard(path: Path) -> None:
    """Delete a corrupt cached file and its sidecar."""
    try:
        path.unlink(missing_ok=True)
        meta_path(path).unlink(missing_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot delete the corrupt file {path}: {error.strerror or error}") from None


def _candidates(info: ModelInfo, cache: Path, log: Log = SILENT.log) -> list[tuple[Path, str, int | None]]:
    """``(path, sha256, size)`` of the files that may hold ``info``: OpenAI's file, then the
    hub's safetensors if its sidecar says what it must be."""
    candidates = [(cache / info.file, info.sha256, info.size)]
    hub = cache / f"{info.stem}.safetensors"
    meta = read_meta(hub)
    if meta:
        candidates.append((hub, meta["sha256"], meta.get("size")))
    elif hub.exists():
        log(f"ignoring {hub}: it has no {meta_path(hub).name} to verify it against")
    return candidates


def _size_matches(path: Path, size: int | None) -> bool:
    with contextlib.suppress(OSError):
        return size is not None and path.stat().st_size == size
    return False


def find_cached(info: ModelInfo, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file for ``info`` whose size checks out, without side effects; else None."""
    return next((path for path, _, size in _candidates(info, resolve_cache_dir(cache_dir)) if _size_matches(path, size)),
                None)


def cached_model_file(info: ModelInfo, cache_dir: str | os.PathLike | None = None, *, verify: bool = False,
                      feedback: Feedback = SILENT) -> Path | None:
    """The verified cached file for ``info``, or None; a corrupt cached file is deleted."""
    log = feedback.log
    for path, sha256, size in _candidates(info, resolve_cache_dir(cache_dir), log):
        if not verify and _size_matches(path, size):
            return path
        if not path.exists():
            continue
        with exclusive_lock(path, wait=True, on_wait=log):
            if not path.exists():
                continue
            problem = file_problem(path, sha256, size, full=verify)
            if problem is None:
                return path
            log(f"{info.name}: the cached file {path} is corrupt ({problem}); deleting it")
            discard(path)
    return None


def cache_listing(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One record per released model (cached or not), then one per other downloaded file.

    Cheap and read-only: cached files are recognised by their size (see :func:`find_cached`).
    ``size`` is the cached file's size, or the download size of a model not yet cached.
    """
    cache = resolve_cache_dir(cache_dir)
    records, known = [], set()
    for info in registry.MODELS:
        path = find_cached(info, cache)
        meta = read_meta(path) if path else None
        known.update({info.file, f"{info.stem}.safetensors"})
        records.append({
            "name": info.name, "released": True, "input_resolution": info.input_resolution,
            "embed_dim": info.embed_dim, "size": path.stat().st_size if path else info.size,
            "cached": path is not None, "path": str(path) if path else None,
            "sha256": meta["sha256"] if meta else info.sha256,
            "url": meta.get("url") if meta else info.url,
        })
    if cache.is_dir():
        for sidecar in sorted(cache.glob("*.json")):
            path = sidecar.with_name(sidecar.name[: -len(".json")])
            meta = read_meta(path)
            if path.name in known or meta is None or not path.is_file():
                continue
            records.append({
                "name": meta.get("name") or path.name, "released": False, "input_resolution": None,
                "embed_dim": None, "size": path.stat().st_size, "cached": True, "path": str(path),
                "sha256": meta["sha256"], "url": meta.get("url"),
            })
    return records


# --- small entries: label embeddings, checksums -------------------------------------------------

def entry(kind: str, key: str, suffix: str = "") -> Path:
    """The cache file of kind ``kind`` (a subfolder) for ``key`` (hashed)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return default_cache_dir() / kind / (digest + suffix)


def save_entry(path: Path, write) -> None:
    """Write a cache entry atomically with ``write(file)``; a cache that cannot be written is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, overwrite=True) as f:
            write(f)
    except (OSError, ClipcliError):
        pass


def _stamp(path: str | os.PathLike) -> tuple[str, str]:
    """``(real path, stamp)``: what says a file is the one hashed before. Size and mtime alone
    miss a file replaced by another of the same size and mtime (``rsync -t``, ``cp -p``, an
    unpacked archive): that one is a new inode."""
    real = os.path.realpath(path)
    info = os.stat(real)
    return real, f"{real}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}\0{info.st_dev}"


def remember_sha256(path: str | os.PathLike, sha256: str) -> None:
    """Record ``sha256`` as the file's, for a file just hashed whole (a download checked against
    it): :func:`remembered_sha256` then never reads it again while it stays the same file."""
    with contextlib.suppress(OSError):
        memo = entry("checksums", _stamp(path)[1])
        save_entry(memo, lambda f: f.write(f"{sha256}\n".encode()))


def remembered_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed once: remembered by real path, size, mtime, inode and device
    (identifying a model must not read hundreds of MB on every run: 0.3 s for ViT-B/32)."""
    real, stamp = _stamp(path)
    memo = entry("checksums", stamp)
    with contextlib.suppress(OSError):
        value = memo.read_text().strip()
        if is_sha256(value):
            return value
    value = sha256_file(real)
    save_entry(memo, lambda f: f.write(f"{value}\n".encode()))
    return value
