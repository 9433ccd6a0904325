"""Bytes over HTTP into a partial file, verified and resumable: the transfer under every download.

:func:`transfer` streams a URL into a ``.part`` file while hashing it, resumes with a Range
request (If-Range when the server gave a validator) after a dropped connection or a read
timeout, starts over when a server ignores the Range or answers a wrong Content-Range, and
retries transient failures (timeouts, 5xx, 408, 425, 429) with exponential backoff, honouring a
bounded Retry-After; 403, 404 and other client errors are not retried (a 416 to a Range
request starts over instead). Requests and their
failures are :mod:`clipcli.http`'s; what a finished transfer becomes (a verified file in the
cache) is :mod:`clipcli.download`'s.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, OfflineError
from .feedback import Log, Meter
from .http import RequestError, TransientError, UnreachableError, backoff, host_of, open_url, read_chunk


@dataclass(frozen=True)
class DownloadSettings:
    """Tunables of a transfer (:data:`clipcli.download.DEFAULT_SETTINGS` are the ones downloads use)."""

    connect_timeout: float = 15.0  # seconds to open a connection
    read_timeout: float = 60.0  # seconds without a byte before the connection counts as stalled
    retries: int = 5  # transient failures in a row (without progress) before giving up
    backoff_base: float = 1.0  # first wait; doubles per failure, with jitter
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # a longer Retry-After is cut to this
    chunk_size: int = 1 << 20
    free_space_margin: int = 16 << 20  # bytes to leave free on the disk


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def check_free_space(directory: Path, needed: int, what: str, settings: DownloadSettings) -> None:
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


def open_download(url: str, settings: DownloadSettings, headers: dict[str, str] | None = None, method: str = "GET",
            follow_redirects: bool = True):
    """:func:`clipcli.http.open_url` for downloads: a failure for good is a
    :class:`DownloadError` (with its ``http_status``), no route an :class:`OfflineError`;
    :class:`TransientError` is left for the caller to retry."""
    try:
        return open_url(url, connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
                        headers=headers, method=method, follow_redirects=follow_redirects)
    except UnreachableError as error:
        raise OfflineError(str(error)) from None
    except RequestError as error:
        failure = DownloadError(f"{url}: {error}")
        failure.http_status = error.status
        raise failure from None


# --- one transfer --------------------------------------------------------------------------

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


def transfer(url: str, part: Path, size: int | None, settings: DownloadSettings,
             meter: Meter, log: Log, label: str) -> str:
    """Fill ``part`` with the bytes at ``url`` (resuming what it holds); return their sha256."""
    digest, offset = _resume_point(part, size, settings.chunk_size)
    if offset:
        log(f"resuming {part.name} at {format_size(offset)}")
    if size is not None and offset == size:
        return digest.hexdigest()
    if size is not None:
        check_free_space(part.parent, size - offset, label, settings)
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
                with open_download(url, settings, headers) as response:
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
                            restart(f"{host_of(url)} answered Range bytes={offset}- with Content-Range "
                                    f"{response.headers.get('Content-Range')!r}")
                            if failures > settings.retries:
                                raise DownloadError(f"{url}: the server keeps answering a wrong Content-Range")
                            continue
                    elif offset:
                        restart(f"{host_of(url)} ignored the Range request (HTTP {status})")
                    if offset == 0:
                        etag = response.headers.get("ETag")
                        validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
                    total = offset + length if length is not None else size
                    if length is not None and size is None:
                        check_free_space(part.parent, length, label, settings)
                    meter.update(offset, total)
                    received, overflow = 0, False
                    while chunk := read_chunk(response, settings.chunk_size, url):
                        out.write(chunk)
                        digest.update(chunk)
                        offset += len(chunk)
                        received += len(chunk)
                        meter.update(offset, total)
                        if size is not None and offset > size:
                            overflow = True  # more than the file holds: the hash will say so
                            break
                    if length is not None and received < length and not overflow:
                        raise TransientError(f"connection to {host_of(url)} closed after "
                                         f"{format_size(offset)} of {format_size(total)}")
                out.flush()
                os.fsync(out.fileno())
                return digest.hexdigest()
            except DownloadError as error:
                if getattr(error, "http_status", None) == 416 and offset and failures < settings.retries:
                    failures += 1
                    restart(f"{host_of(url)} cannot serve bytes {offset}- (HTTP 416)")
                    continue
                raise
            except TransientError as error:
                out.flush()
                failures = 1 if offset > start_offset else failures + 1
                if failures > settings.retries:
                    kept = f"; the partial download ({format_size(offset)}) is kept, run again to resume" if offset else ""
                    raise DownloadError(f"gave up on {url} after {failures} failed attempts: {error}{kept}") from None
                wait = backoff(failures, settings.backoff_base, settings.backoff_max, error.retry_after,
                               settings.retry_after_max)
                log(f"{error}; retrying in {wait:.1f} s (attempt {failures + 1} of {settings.retries + 1})")
                time.sleep(wait)
