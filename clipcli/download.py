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
import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__, registry
from .errors import ChecksumError, DownloadError, OfflineError, UnknownModelError
from .fsutil import atomic_write, exclusive_lock, fsync_folder, sha256_file
from .registry import ModelInfo

Log = Callable[[str], None]


@dataclass(frozen=True)
class DownloadSettings:
    """Tunables; tests replace :data:`DEFAULT_SETTINGS` with fast ones."""

    connect_timeout: float = 15.0  # seconds to open a connection
    read_timeout: float = 60.0  # seconds without a byte before the connection counts as stalled
    retries: int = 5  # transient failures in a row (without progress) before giving up
    backoff_base: float = 1.0  # first wait; doubles per failure, with jitter
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # a longer Retry-After is cut to this
    chunk_size: int = 1 << 20
    free_space_margin: int = 16 << 20  # bytes to leave free on the disk


DEFAULT_SETTINGS = DownloadSettings()
USER_AGENT = f"clipcli/{__version__} (+python urllib)"
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


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _check_free_space(directory: Path, needed: int, what: str, settings: DownloadSettings) -> None:
    free = _free_bytes(directory)
    if needed + settings.free_space_margin > free:
        raise DownloadError(
            f"not enough free disk space in {directory} for {what}: "
            f"needs {format_size(needed)}, {format_size(free)} free"
        )


def format_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# --- a lock per destination -------------------------------------------------------------

# --- HTTP ---------------------------------------------------------------------------------

def _connection_class(base: type, read_timeout: float) -> type:
    class Connection(base):
        """Connects within the connect timeout, then waits at most ``read_timeout`` per read."""

        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(read_timeout)

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self._connection = _connection_class(http.client.HTTPConnection, read_timeout)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self._connection = _connection_class(http.client.HTTPSConnection, read_timeout)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _opener(settings: DownloadSettings, follow_redirects: bool = True) -> urllib.request.OpenerDirector:
    handlers: list = [_HTTPHandler(settings.read_timeout), _HTTPSHandler(settings.read_timeout)]
    if not follow_redirects:
        handlers.append(_NoRedirect())
    return urllib.request.build_opener(*handlers)


class _Transient(Exception):
    """A failure worth retrying: the reason, and how long the server asked us to wait."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _unreachable(error: BaseException) -> bool:
    """No route to the server at all (DNS, refused, unreachable): retrying will not help."""
    return isinstance(error, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(error, OSError) and error.errno in (101, 113)  # ENETUNREACH, EHOSTUNREACH
    )


def _open(url: str, headers: dict[str, str], settings: DownloadSettings, method: str = "GET",
          follow_redirects: bool = True):
    """Open ``url``; errors become :class:`_Transient`, :class:`OfflineError` or :class:`DownloadError`."""
    request = urllib.request.Request(
        url, method=method, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
    )
    try:
        return _opener(settings, follow_redirects).open(request, timeout=settings.connect_timeout)
    except urllib.error.HTTPError as error:
        if not follow_redirects and 300 <= error.code < 400:
            return error
        error.close()
        reason = f"HTTP {error.code} {error.reason} from {_host(url)}"
        if error.code in (408, 429) or error.code >= 500:
            raise _Transient(reason, _retry_after(error.headers.get("Retry-After"))) from None
        failure = DownloadError(f"{url}: HTTP {error.code} {error.reason}")
        failure.http_status = error.code
        raise failure from None
    except urllib.error.URLError as error:
        cause = error.reason
        if isinstance(cause, (TimeoutError, socket.timeout)):
            raise _Transient(f"timed out connecting to {_host(url)}") from None
        if isinstance(cause, BaseException) and _unreachable(cause):
            raise OfflineError(f"cannot reach {_host(url)} ({_reason(cause)})") from None
        raise _Transient(f"cannot connect to {_host(url)} ({_reason(cause)})") from None
    except (TimeoutError, socket.timeout):
        raise _Transient(f"timed out waiting for {_host(url)}") from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise _Transient(f"connection to {_host(url)} failed ({_reason(error)})") from None


def _reason(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _read(response, size: int, url: str) -> bytes:
    try:
        return response.read1(size)
    except (TimeoutError, socket.timeout):
        raise _Transient(f"no data from {_host(url)} for the read timeout") from None
    except (http.client.HTTPException, ConnectionError, OSError) as error:
        raise _Transient(f"connection to {_host(url)} broke ({_reason(error)})") from None


# --- progress on stderr -----------------------------------------------------------------

class _Progress:
    """A rich progress bar on stderr (bytes, rate, ETA), or nothing."""

    def __init__(self, label: str, enabled: bool):
        self._bar = self._task = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
            self._task = self._bar.add_task(label, total=None)
            self._bar.start()

    def update(self, completed: int, total: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _stderr_log(message: str) -> None:
    from .items import one_line

    print(one_line(message), file=sys.stderr, flush=True)


def _loggers(quiet: bool | None) -> tuple[Log, bool]:
    """(message sink, whether to show a progress bar); ``quiet=None`` means automatic."""
    log: Log = (lambda message: None) if quiet else _stderr_log
    return log, not quiet and sys.stderr.isatty()


# --- one verified download ----------------------------------------------------------------

def partial_path(dest: Path, sha256: str) -> Path:
    return dest.with_name(f".{dest.name}.{sha256[:16]}.part")


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _resume_point(part: Path, size: int | None, chunk_size: int) -> tuple["hashlib._Hash", int]:
    """The hash state and length of what an earlier run left in ``part`` (0 if unusable)."""
    digest, offset = hashlib.sha256(), 0
    if part.exists():
        with open(part, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
                offset += len(chunk)
    if size is not None and offset > size:
        return hashlib.sha256(), 0
    return digest, offset


def _backoff(error: _Transient, failures: int, settings: DownloadSettings) -> float:
    """Seconds to wait before retry number ``failures``: Retry-After if given (bounded),
    else exponential with jitter."""
    if error.retry_after is not None:
        return min(error.retry_after, settings.retry_after_max)
    wait = min(settings.backoff_max, settings.backoff_base * 2 ** (failures - 1))
    return wait * (0.5 + random.random() / 2)


def _transfer(url: str, part: Path, size: int | None, settings: DownloadSettings,
              progress: _Progress, log: Log, label: str) -> str:
    """Fill ``part`` with the bytes at ``url`` (resuming what it holds); return their sha256."""
    digest, offset = _resume_point(part, size, settings.chunk_size)
    if offset:
        log(f"resuming {part.name} at {format_size(offset)}")
    if size is not None and offset == size:
        return digest.hexdigest()
    if size is not None:
        _check_free_space(part.parent, size - offset, label, settings)
    validator = None
    failures = 0
    announced = False
    with open(part, "ab") as out:
        if offset == 0:
            out.truncate(0)

        def restart(why: str) -> None:
            nonlocal digest, offset
            log(f"{why}; restarting from the beginning")
            out.truncate(0)
            digest, offset = hashlib.sha256(), 0

        while True:
            start_offset = offset
            try:
                headers = {}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                    if validator:
                        headers["If-Range"] = validator
                with _open(url, headers, settings) as response:
                    if not announced:
                        log(f"downloading {label} from {url}" + (f" ({format_size(size)})" if size else ""))
                        announced = True
                    status = getattr(response, "status", None) or 200
                    length = response.headers.get("Content-Length")
                    length = int(length) if length and length.isdigit() else None
                    if status == 206:
                        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
                        if not offset or not match or int(match.group(1)) != offset:
                            failures += 1
                            restart(f"{_host(url)} answered Range bytes={offset}- with Content-Range "
                                    f"{response.headers.get('Content-Range')!r}")
                            if failures > settings.retries:
                                raise DownloadError(f"{url}: the server keeps answering a wrong Content-Range")
                            continue
                    elif offset:
                        restart(f"{_host(url)} ignored the Range request (HTTP {status})")
                    if offset == 0:
                        etag = response.headers.get("ETag")
                        validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
                    total = offset + length if length is not None else size
                    if length is not None and size is None:
                        _check_free_space(part.parent, length, label, settings)
                    progress.update(offset, total)
                    received, overflow = 0, False
                    while chunk := _read(response, settings.chunk_size, url):
                        out.write(chunk)
                        digest.update(chunk)
                        offset += len(chunk)
                        received += len(chunk)
                        progress.update(offset, total)
                        if size is not None and offset > size:
                            overflow = True  # more than the file holds: the hash will say so
                            break
                    if length is not None and received < length and not overflow:
                        raise _Transient(f"connection to {_host(url)} closed after "
                                         f"{format_size(offset)} of {format_size(total)}")
                out.flush()
                os.fsync(out.fileno())
                return digest.hexdigest()
            except DownloadError as error:
                if getattr(error, "http_status", None) == 416 and offset and failures < settings.retries:
                    failures += 1
                    restart(f"{_host(url)} cannot serve bytes {offset}- (HTTP 416)")
                    continue
                raise
            except _Transient as error:
                out.flush()
                failures = 1 if offset > start_offset else failures + 1
                if failures > settings.retries:
                    kept = f"; the partial download ({format_size(offset)}) is kept, run again to resume" if offset else ""
                    raise DownloadError(f"gave up on {url} after {failures} failed attempts: {error}{kept}") from None
                wait = _backoff(error, failures, settings)
                log(f"{error}; retrying in {wait:.1f} s (attempt {failures + 1} of {settings.retries + 1})")
                time.sleep(wait)


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
    log, show_progress = _loggers(quiet)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot create the cache directory {dest.parent}: {_reason(error)}") from None
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
        progress = _Progress(label, show_progress)
        try:
            for attempt in (1, 2):
                actual = _transfer(url, part, size, settings, progress, log, label)
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
            raise DownloadError(f"cannot write {part}: {_reason(error)}") from None
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
        raise DownloadError(f"cannot delete the corrupt file {path}: {_reason(error)}") from None


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
        response = _open(url, {}, settings, method="HEAD", follow_redirects=False)
    except _Transient as error:
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
    log, _ = _loggers(quiet)
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
                _check_free_space(cache, source.stat().st_size, info.name, settings)
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
    log, _ = _loggers(quiet)
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
