"""Bytes over HTTP into a partial file, verified and resumable: the transfer under every download.

:func:`transfer` streams a URL into a ``.part`` file while hashing it, resumes with a Range
request (If-Range when the server gave a validator) after a dropped connection or a read
timeout, starts over when a server ignores the Range or answers a wrong Content-Range, and
retries transient failures (timeouts, 5xx, 408, 429) with exponential backoff, honouring a
bounded Retry-After; 403, 404 and other client errors are not retried. :func:`open_url`
classifies every HTTP failure as :class:`TransientError`, :class:`~clipcli.errors.OfflineError`
or :class:`~clipcli.errors.DownloadError`. What a finished transfer becomes (a verified file
in the cache) is :mod:`clipcli.download`'s.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
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

from . import __version__
from .errors import DownloadError, OfflineError

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


class TransientError(Exception):
    """A failure worth retrying: the reason, and how long the server asked us to wait."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def host_of(url: str) -> str:
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


def open_url(url: str, headers: dict[str, str], settings: DownloadSettings, method: str = "GET",
          follow_redirects: bool = True):
    """Open ``url``; errors become :class:`TransientError`, :class:`OfflineError` or :class:`DownloadError`."""
    request = urllib.request.Request(
        url, method=method, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
    )
    try:
        return _opener(settings, follow_redirects).open(request, timeout=settings.connect_timeout)
    except urllib.error.HTTPError as error:
        if not follow_redirects and 300 <= error.code < 400:
            return error
        error.close()
        reason = f"HTTP {error.code} {error.reason} from {host_of(url)}"
        if error.code in (408, 429) or error.code >= 500:
            raise TransientError(reason, _retry_after(error.headers.get("Retry-After"))) from None
        failure = DownloadError(f"{url}: HTTP {error.code} {error.reason}")
        failure.http_status = error.code
        raise failure from None
    except urllib.error.URLError as error:
        cause = error.reason
        if isinstance(cause, (TimeoutError, socket.timeout)):
            raise TransientError(f"timed out connecting to {host_of(url)}") from None
        if isinstance(cause, BaseException) and _unreachable(cause):
            raise OfflineError(f"cannot reach {host_of(url)} ({reason_of(cause)})") from None
        raise TransientError(f"cannot connect to {host_of(url)} ({reason_of(cause)})") from None
    except (TimeoutError, socket.timeout):
        raise TransientError(f"timed out waiting for {host_of(url)}") from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise TransientError(f"connection to {host_of(url)} failed ({reason_of(error)})") from None


def reason_of(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _read(response, size: int, url: str) -> bytes:
    try:
        return response.read1(size)
    except (TimeoutError, socket.timeout):
        raise TransientError(f"no data from {host_of(url)} for the read timeout") from None
    except (http.client.HTTPException, ConnectionError, OSError) as error:
        raise TransientError(f"connection to {host_of(url)} broke ({reason_of(error)})") from None


# --- progress on stderr -----------------------------------------------------------------

class Progress:
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


def loggers(quiet: bool | None) -> tuple[Log, bool]:
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


def _backoff(error: TransientError, failures: int, settings: DownloadSettings) -> float:
    """Seconds to wait before retry number ``failures``: Retry-After if given (bounded),
    else exponential with jitter."""
    if error.retry_after is not None:
        return min(error.retry_after, settings.retry_after_max)
    wait = min(settings.backoff_max, settings.backoff_base * 2 ** (failures - 1))
    return wait * (0.5 + random.random() / 2)


def transfer(url: str, part: Path, size: int | None, settings: DownloadSettings,
              progress: Progress, log: Log, label: str) -> str:
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
                with open_url(url, headers, settings) as response:
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
                wait = _backoff(error, failures, settings)
                log(f"{error}; retrying in {wait:.1f} s (attempt {failures + 1} of {settings.retries + 1})")
                time.sleep(wait)
