"""How weights get into the cache (:mod:`clipcli.cache`): a verified, resumable download.

Every file this module downloads gets a sidecar ``<file>.json`` with its sha256, size and
source. Progress and news go to the caller's :class:`~clipcli.feedback.Feedback`.

A download never leaves a bad file at its final path:

1. It takes a lock on the destination (``fcntl.flock``), so two processes downloading the
   same file do not interleave; the second one finds the first one's verified file.
2. It streams into a partial file next to the destination (``.<file>.<sha256[:16]>.part``),
   hashing while it writes. A dropped connection or a read timeout resumes with a Range
   request (If-Range when the server gave a validator); a server that ignores the Range or
   answers a wrong Content-Range makes it start over from zero. Timeouts, 5xx, 408, 425 and 429
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
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cache import (
    cached_model_file,
    discard,
    file_problem,
    is_sha256,
    offline,
    openai_cache_dir,
    read_meta,
    remember_sha256,
    resolve_cache_dir,
    write_meta,
)
from .errors import ChecksumError, DownloadError, OfflineError, UnknownModelError
from .feedback import SILENT, Feedback, Log
from .fsutil import exclusive_lock, fsync_folder, sha256_file
from .http import TransientError, reason_of
from .models import registry
from .models.registry import ModelInfo
from .transfer import DownloadSettings, check_free_space, format_size, open_download, transfer

DEFAULT_SETTINGS = DownloadSettings()  # tests replace these with fast ones
HF_ENDPOINT = "https://huggingface.co"  # $HF_ENDPOINT overrides, as in huggingface_hub


def partial_path(dest: Path, sha256: str) -> Path:
    return dest.with_name(f".{dest.name}.{sha256[:16]}.part")


def download_url(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    *,
    size: int | None = None,
    name: str | None = None,
    force: bool = False,
    verify: bool = False,
    feedback: Feedback = SILENT,
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
    if not is_sha256(sha256):
        raise DownloadError(f"{sha256!r} is not a sha256 (64 hexadecimal digits)")
    label = name or dest.name
    log = feedback.log
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
            discard(dest)
        if offline():
            raise OfflineError(f"not downloading {url}: CLIPCLI_OFFLINE is set")
        part = partial_path(dest, sha256)
        meter = feedback.open_meter(label)
        try:
            for attempt in (1, 2):
                actual = transfer(url, part, size, settings, meter, log, label)
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
            write_meta(dest, {"name": label, "sha256": sha256, "size": part.stat().st_size, "url": url})
            os.replace(part, dest)
            fsync_folder(dest.parent)
            remember_sha256(dest, sha256)  # hashed as it came: loading it never hashes it again
        except DownloadError as error:
            if 400 <= getattr(error, "http_status", 0) < 500:
                part.unlink(missing_ok=True)  # gone from this server: nothing to resume
            raise
        except OSError as error:
            raise DownloadError(f"cannot write {part}: {reason_of(error)}") from None
        finally:
            meter.close()
            with contextlib.suppress(OSError):
                if part.stat().st_size == 0:
                    part.unlink()
        log(f"{label}: saved {dest} ({format_size(dest.stat().st_size)}, sha256 verified)")
        return dest


# --- released models -----------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One place a released model can come from, resolved to a URL, hash and file name."""

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
        response = open_download(url, settings, method="HEAD", follow_redirects=False)
    except TransientError as error:
        raise DownloadError(str(error)) from None
    with response:
        headers = response.headers
    sha256 = (headers.get("X-Linked-Etag") or "").strip().strip('"').lower()
    if not is_sha256(sha256):
        raise DownloadError(f"{url}: the hub reported no sha256 for the file")
    size = headers.get("X-Linked-Size")
    commit = (headers.get("X-Repo-Commit") or "").strip()
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        url = f"{endpoint}/{info.hf_repo}/resolve/{commit}/{registry.HF_FILE}"
    return Source(url, sha256, int(size) if size and size.isdigit() else None,
                  f"{info.stem}.safetensors")


def _sources(info: ModelInfo, settings: DownloadSettings) -> list[tuple[str, Callable[[], Source]]]:
    """(label, resolver) per source, in the order to try them; resolving may need the network."""
    sources = [
        ("OpenAI", lambda: Source(info.url, info.sha256, info.size, info.file)),
        ("Hugging Face hub", lambda: hub_source(info, settings)),
    ]
    mirror = os.environ.get("CLIPCLI_MIRROR", "").strip()
    if mirror:
        base = mirror if "://" in mirror else Path(mirror).expanduser().resolve().as_uri()
        url = f"{base.rstrip('/')}/{info.file}"
        sources.append(("CLIPCLI_MIRROR", lambda: Source(url, info.sha256, info.size, info.file)))
    return sources


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
        remember_sha256(source, info.sha256)
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
                check_free_space(cache, source.stat().st_size, info.file, settings)
                shutil.copyfile(source, tmp)
                if sha256_file(tmp) != info.sha256:
                    raise DownloadError(f"the copy in {cache} does not match {info.sha256}") from None
                how = "copied"
            os.replace(tmp, dest)
            remember_sha256(dest, info.sha256)
    except (OSError, DownloadError) as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log(f"{info.name}: using {source} (OpenAI's cache) where it is: {error}")
        return source
    log(f"{info.name}: {how} {source} (OpenAI's cache) to {dest}")
    return dest


def _unnamed(name: str, error: DownloadError) -> str:
    """A source's error without the model name it may open with (``NAME from URL ...``): the
    line it goes into has said the name already."""
    text = str(error)
    return text[len(name) + 1:].removeprefix("from ") if text.startswith(f"{name} ") else text


def _not_cached(info: ModelInfo, cache: Path, reason: str) -> str:
    return (f"{info.name} is not in the cache ({cache}) and could not be downloaded: {reason}. "
            f"Run `clipcli download {info.name}` on a machine with internet and copy {info.file} "
            f"into the cache, or give a checkpoint file instead of the name.")


def fetch_model(info: ModelInfo, cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                feedback: Feedback = SILENT, settings: DownloadSettings | None = None) -> Path:
    """Get ``info`` into the cache from the first source that works; return its path."""
    settings = settings or DEFAULT_SETTINGS
    cache = resolve_cache_dir(cache_dir)
    log = feedback.log
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
                                name=info.name, force=force, feedback=feedback, settings=settings)
        except DownloadError as error:
            failures.append((label, error))
            if not isinstance(error, OfflineError):
                log(f"{info.name}: {label}: {_unnamed(info.name, error)}")
    reason = "; ".join(f"{label}: {_unnamed(info.name, error)}" for label, error in failures)
    if not os.environ.get("CLIPCLI_MIRROR"):
        reason += "; CLIPCLI_MIRROR: not set"
    error_type = OfflineError if all(isinstance(e, OfflineError) for _, e in failures) else DownloadError
    raise error_type(_not_cached(info, cache, reason))


def download_model(info: ModelInfo, cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                   verify: bool = False, feedback: Feedback = SILENT,
                   settings: DownloadSettings | None = None) -> Path:
    """The cached file for ``info`` (re-verified with ``verify``), else a fresh download."""
    if not force:
        cached = cached_model_file(info, cache_dir, verify=verify, feedback=feedback)
        if cached:
            return cached
    return fetch_model(info, cache_dir, force=force, feedback=feedback, settings=settings)


def unknown_model(name: str) -> UnknownModelError:
    names = ", ".join(info.name for info in registry.MODELS)
    return UnknownModelError(f"{name!r} is neither a released model ({names}), an OpenCLIP ARCH/TAG or "
                             "hf-hub:ORG/REPO name (see `clipcli models`), nor an existing checkpoint file")


def model_file(name: str, cache_dir: str | os.PathLike | None = None, *, feedback: Feedback = SILENT,
               settings: DownloadSettings | None = None) -> Path:
    """The local checkpoint for a released model name, downloading it on first use."""
    info = registry.find_model(str(name))
    if info is None:
        raise unknown_model(str(name))
    return download_model(info, cache_dir, feedback=feedback, settings=settings)
