"""Where weights live and how they get there: the cache, and a verified, resumable download.

The cache is one folder (``$CLIPCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipcli``, else
``~/.cache/clipcli``). A released model is cached under OpenAI's file name (``ViT-B-32.pt``)
or, when it came from the Hugging Face hub, as ``ViT-B-32.safetensors``. Every file this
module downloads gets a sidecar ``<file>.json`` with its sha256, size and source, so a
cached file is checked before use (size always, the full sha256 on request).

A download never leaves a bad file at its final path:

1. It takes a lock on the destination (``fcntl.flock``), so two processes downloading the
   same file do not interleave; the second one finds the first one's verified file.
2. It streams into a partial file next to the destination (``.<file>.<sha256[:16]>.part``),
   hashing while it writes. A dropped connection or a read timeout resumes with a Range
   request (If-Range when the server gave a validator); a server that ignores the Range or
   answers a wrong Content-Range makes it start over from zero. Timeouts, 5xx, 408 and 429
   are retried with exponential backoff (Retry-After honoured, bounded); 403, 404 and other
   client errors are not.
3. Only when the sha256 matches is the partial file renamed into place (atomic). On a
   mismatch it is deleted and the download runs once more from scratch, then fails with
   both hashes. An interrupted run (Ctrl-C, killed process, retries exhausted) keeps the
   partial file, so the next run resumes where it stopped.

Sources for a released model, in order: OpenAI's URL, the same weights as fp32 safetensors
on the Hugging Face hub (verified against the sha256 the hub reports), ``$CLIPCLI_MIRROR``.
A matching file in OpenAI's own cache (``~/.cache/clip``) is reused without downloading.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import registry
from .errors import ChecksumError, DownloadError, OfflineError, UnknownModelError
from .fsutil import atomic_write, exclusive_lock, fsync_folder, sha256_file
from .registry import ModelInfo
from .transfer import (
    DEFAULT_SETTINGS,
    DownloadSettings,
    Log,
    Progress,
    TransientError,
    check_free_space,
    format_size,
    loggers,
    open_url,
    partial_path,
    reason_of,
    transfer,
)

HF_ENDPOINT = "https://huggingface.co"  # $HF_ENDPOINT overrides, as in huggingface_hub


# --- the cache ------------------------------------------------------------------------

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
    return os.environ.get("CLIPCLI_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_meta(path: Path) -> dict | None:
    """The sidecar of a downloaded file: ``{"sha256", "size", "url", "name"}``, or None."""
    try:
        meta = json.loads(meta_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not _is_sha256(meta.get("sha256")):
        return None
    return meta


def _write_meta(path: Path, meta: dict) -> None:
    with atomic_write(meta_path(path), overwrite=True, text=True) as f:
        f.write(json.dumps(meta, indent=1) + "\n")


def _is_sha256(value: object) -> bool:
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
        return None
    if size is not None and actual_size != size:
        return f"{actual_size} bytes instead of {size}"
    return f"sha256 {actual} instead of {sha256}"


def download_url(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    *,
    size: int | None = None,
    name: str | None = None,
    force: bool = False,
    verify: bool = False,
    quiet: bool | None = None,
    settings: DownloadSettings | None = None,
) -> Path:
    """Download ``url`` to ``dest``, which exists afterwards only if its sha256 matches.

    An existing ``dest`` is kept if it checks out (its size, or its full hash with
    ``verify``) and replaced otherwise; ``force`` downloads again regardless. ``size``, when
    known, lets the free-space check run before the first byte. Writes the sidecar
    ``dest.json``. Raises :class:`ChecksumError`, :class:`OfflineError` or
    :class:`DownloadError`, each with a one-line message.
    """
    settings = settings or DEFAULT_SETTINGS
    dest = Path(dest).expanduser()
    sha256 = sha256.strip().lower()
    if not _is_sha256(sha256):
        raise DownloadError(f"{sha256!r} is not a sha256 (64 hexadecimal digits)")
    label = name or dest.name
    log, show_progress = loggers(quiet)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot create the cache directory {dest.parent}: {reason_of(error)}") from None
    with exclusive_lock(dest, wait=True, on_wait=log):
        if dest.exists() and not force:
            known_size, meta = size, read_meta(dest)
            if known_size is None and meta and meta["sha256"] == sha256:
                known_size = meta.get("size")
            problem = file_problem(dest, sha256, known_size, full=verify)
            if problem is None:
                log(f"{label}: cached at {dest}" + (" (sha256 verified)" if verify else ""))
                return dest
            log(f"{label}: the cached file {dest} is corrupt ({problem}); downloading it again")
            _discard(dest)
        if offline():
            raise OfflineError(f"not downloading {url}: CLIPCLI_OFFLINE is set")
        part = partial_path(dest, sha256)
        progress = Progress(label, show_progress)
        try:
            for attempt in (1, 2):
                actual = transfer(url, part, size, settings, progress, log, label)
                if actual == sha256:
                    break
                received = part.stat().st_size
                part.unlink()
                if attempt == 1:
                    log(f"{label}: sha256 mismatch (expected {sha256}, got {actual}); downloading once more from scratch")
            else:
                raise ChecksumError(
                    f"{label} from {url} does not match its sha256: expected {sha256}, got {actual} "
                    f"({received} bytes); the download was deleted"
                )
            _write_meta(dest, {"name": label, "sha256": sha256, "size": part.stat().st_size, "url": url})
            os.replace(part, dest)
            fsync_folder(dest.parent)
        except DownloadError as error:
            if 400 <= getattr(error, "http_status", 0) < 500:
                part.unlink(missing_ok=True)  # gone from this server: nothing to resume
            raise
        except OSError as error:
            raise DownloadError(f"cannot write {part}: {reason_of(error)}") from None
        finally:
            progress.close()
            with contextlib.suppress(OSError):
                if part.stat().st_size == 0:
                    part.unlink()
        log(f"{label}: saved {dest} ({format_size(dest.stat().st_size)}, sha256 verified)")
        return dest


def _discard(path: Path) -> None:
    """Delete a corrupt cached file and its sidecar."""
    try:
        path.unlink(missing_ok=True)
        meta_path(path).unlink(missing_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot delete the corrupt file {path}: {reason_of(error)}") from None


# --- released models -----------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One place a released model can come from, resolved to a URL, hash and file name."""

    label: str
    url: str
    sha256: str
    size: int | None
    file: str


def hub_source(info: ModelInfo, settings: DownloadSettings) -> Source:
    """The model's safetensors on the Hugging Face hub, pinned to the commit the hub reports.

    The expected sha256 is the one the hub reports for the LFS file (``X-Linked-Etag`` of a
    HEAD request that does not follow the redirect to the CDN).
    """
    endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
    url = f"{endpoint}/{info.hf_repo}/resolve/main/{registry.HF_FILE}"
    try:
        response = open_url(url, {}, settings, method="HEAD", follow_redirects=False)
    except TransientError as error:
        raise DownloadError(str(error)) from None
    with response:
        headers = response.headers
    sha256 = (headers.get("X-Linked-Etag") or "").strip().strip('"').lower()
    if not _is_sha256(sha256):
        raise DownloadError(f"{url}: the hub reported no sha256 for the file")
    size = headers.get("X-Linked-Size")
    commit = (headers.get("X-Repo-Commit") or "").strip()
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        url = f"{endpoint}/{info.hf_repo}/resolve/{commit}/{registry.HF_FILE}"
    return Source("Hugging Face hub", url, sha256, int(size) if size and size.isdigit() else None,
                  f"{info.stem}.safetensors")


def _sources(info: ModelInfo, settings: DownloadSettings) -> list[tuple[str, Callable[[], Source]]]:
    """(label, resolver) per source, in the order to try them; resolving may need the network."""
    sources = [
        ("OpenAI", lambda: Source("OpenAI", info.url, info.sha256, info.size, info.file)),
        ("Hugging Face hub", lambda: hub_source(info, settings)),
    ]
    mirror = os.environ.get("CLIPCLI_MIRROR", "").strip()
    if mirror:
        base = mirror if "://" in mirror else Path(mirror).expanduser().resolve().as_uri()
        url = f"{base.rstrip('/')}/{info.file}"
        sources.append(("CLIPCLI_MIRROR", lambda: Source("CLIPCLI_MIRROR", url, info.sha256, info.size, info.file)))
    return sources


def find_cached(info: ModelInfo, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file for ``info`` whose size checks out, without side effects; else None."""
    cache = resolve_cache_dir(cache_dir)
    pt = cache / info.file
    with contextlib.suppress(OSError):
        if info.size is not None and pt.stat().st_size == info.size:
            return pt
    hub = cache / f"{info.stem}.safetensors"
    meta = read_meta(hub)
    with contextlib.suppress(OSError):
        if meta and meta.get("size") == hub.stat().st_size:
            return hub
    return None


def cached_model_file(info: ModelInfo, cache_dir: str | os.PathLike | None = None, *, verify: bool = False,
                      quiet: bool | None = None) -> Path | None:
    """The verified cached file for ``info``, or None; a corrupt cached file is deleted."""
    cache = resolve_cache_dir(cache_dir)
    log, _ = loggers(quiet)
    candidates = [(cache / info.file, info.sha256, info.size)]
    hub = cache / f"{info.stem}.safetensors"
    meta = read_meta(hub)
    if meta:
        candidates.append((hub, meta["sha256"], meta.get("size")))
    elif hub.exists():
        log(f"ignoring {hub}: it has no {meta_path(hub).name} to verify it against")
    for path, sha256, size in candidates:
        with contextlib.suppress(OSError):
            if not verify and size is not None and path.stat().st_size == size:
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
            _discard(path)
    return None


def _reuse_openai_cache(info: ModelInfo, cache: Path, log: Log, settings: DownloadSettings) -> Path | None:
    """OpenAI's cached file for ``info`` if its sha256 matches: hard-linked into our cache,
    else copied, else (no room, read-only cache) used where it is."""
    source = openai_cache_dir() / info.file
    try:
        if not source.is_file() or (info.size is not None and source.stat().st_size != info.size):
            return None
        if sha256_file(source) != info.sha256:
            log(f"not reusing {source}: its sha256 does not match {info.name}")
            return None
    except OSError:
        return None
    dest = cache / info.file
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(dest, wait=True, on_wait=log):
            try:
                os.link(source, tmp)
                how = "linked"
            except OSError:
                check_free_space(cache, source.stat().st_size, info.name, settings)
                shutil.copyfile(source, tmp)
                if sha256_file(tmp) != info.sha256:
                    raise DownloadError(f"the copy in {cache} does not match {info.sha256}") from None
                how = "copied"
            os.replace(tmp, dest)
    except (OSError, DownloadError) as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log(f"{info.name}: using {source} (OpenAI's cache) where it is: {error}")
        return source
    log(f"{info.name}: {how} {source} (OpenAI's cache) to {dest}")
    return dest


def _not_cached(info: ModelInfo, cache: Path, reason: str) -> str:
    return (f"{info.name} is not in the cache ({cache}) and could not be downloaded: {reason}. "
            f"Run `clipcli download {info.name}` on a machine with internet and copy {info.file} "
            f"into the cache, or pass --model PATH.")


def fetch_model(info: ModelInfo, cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                quiet: bool | None = None, settings: DownloadSettings | None = None) -> Path:
    """Get ``info`` into the cache from the first source that works; return its path."""
    settings = settings or DEFAULT_SETTINGS
    cache = resolve_cache_dir(cache_dir)
    log, _ = loggers(quiet)
    if not force:
        reused = _reuse_openai_cache(info, cache, log, settings)
        if reused:
            return reused
    if offline():
        raise OfflineError(_not_cached(info, cache, "CLIPCLI_OFFLINE is set"))
    failures: list[tuple[str, DownloadError]] = []
    for label, resolve in _sources(info, settings):
        try:
            source = resolve()
            return download_url(source.url, cache / source.file, source.sha256, size=source.size,
                                name=info.name, force=force, quiet=quiet, settings=settings)
        except DownloadError as error:
            failures.append((label, error))
            if not isinstance(error, OfflineError):
                log(f"{info.name}: {label}: {error}")
    reason = "; ".join(f"{label}: {error}" for label, error in failures)
    if not os.environ.get("CLIPCLI_MIRROR"):
        reason += "; CLIPCLI_MIRROR: not set"
    error_type = OfflineError if all(isinstance(e, OfflineError) for _, e in failures) else DownloadError
    raise error_type(_not_cached(info, cache, reason))


def download_model(info: ModelInfo, cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                   verify: bool = False, quiet: bool | None = None,
                   settings: DownloadSettings | None = None) -> Path:
    """``clipcli download NAME``: the cached file (re-verified with ``verify``) or a fresh download."""
    if not force:
        cached = cached_model_file(info, cache_dir, verify=verify, quiet=quiet)
        if cached:
            return cached
    return fetch_model(info, cache_dir, force=force, quiet=quiet, settings=settings)


def unknown_model(name: str) -> UnknownModelError:
    names = ", ".join(info.name for info in registry.MODELS)
    return UnknownModelError(f"{name!r} is neither a released model ({names}), an OpenCLIP ARCH/TAG or "
                             "hf-hub:ORG/REPO name (see `clipcli models`), nor an existing checkpoint file")


def model_file(name: str, cache_dir: str | os.PathLike | None = None, *, quiet: bool | None = None,
               settings: DownloadSettings | None = None) -> Path:
    """The local checkpoint for a released model name, downloading it on first use."""
    info = registry.find_model(str(name))
    if info is None:
        raise unknown_model(str(name))
    return download_model(info, cache_dir, quiet=quiet, settings=settings)


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
