"""One HTTP layer under every request clipcli makes: weight downloads and image URLs.

:func:`open_url` opens a URL with clipcli's User-Agent, a connect timeout and a timeout per
read. With ``guard`` (image URLs) it connects only to public addresses: every address DNS
gives is checked before connecting, redirects included, so a DNS answer cannot point a fetch
at the local network; proxies are bypassed so the check applies to the real server, and a
redirect to another scheme or to a URL holding credentials is refused. Every failure becomes
one of three exceptions:

- :class:`TransientError`: worth retrying (timeouts, resets, HTTP 408, 425, 429 and 5xx),
  with the server's Retry-After when it gave one;
- :class:`UnreachableError`: no route to the server (DNS, connection refused);
- :class:`RequestError`: retrying will not help (other 4xx, a refused address or redirect,
  an invalid certificate).

:func:`backoff` is the wait before a retry. :func:`fetch_url` reads one small body (an image)
whole, bounded in size and time, retrying transient failures; it raises
:class:`~clipcli.errors.ItemError` with the reason. The resumable transfer of large files is
:mod:`clipcli.transfer`'s.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import ipaddress
import random
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from . import __version__
from .errors import ItemError

USER_AGENT = f"clipcli/{__version__} (+python urllib)"
TRANSIENT_STATUS = frozenset({408, 425, 429})  # and every 5xx
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# --- URLs ---------------------------------------------------------------------------------

def url_scheme(text: str) -> str | None:
    match = _URL_SCHEME.match(text)
    return match.group(1).lower() if match else None


def has_credentials(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.username is not None or parts.password is not None
    except ValueError:  # not a valid URL: fetching it fails with its own reason
        return False


def redact_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/?#@]*@", r"\1***@", url)


def host_of(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def reason_of(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


# --- failures -----------------------------------------------------------------------------

class TransientError(Exception):
    """A failure worth retrying: the reason, and how long the server asked us to wait."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class RequestError(Exception):
    """A request that failed for good (retrying will not help); ``status`` is the HTTP status
    if any, ``fix`` the key of a remedy (see :mod:`clipcli.errors`)."""

    def __init__(self, reason: str, status: int | None = None, fix: str | None = None):
        super().__init__(reason)
        self.status = status
        self.fix = fix


class UnreachableError(RequestError):
    """No route to the server at all: DNS failed, or the connection was refused. ``temporary``:
    the DNS server could not answer just now (worth a retry for a short fetch, not for deciding
    that we are offline)."""

    def __init__(self, reason: str, temporary: bool = False):
        super().__init__(reason)
        self.temporary = temporary


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
    return isinstance(error, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(error, OSError) and error.errno in (101, 113)  # ENETUNREACH, EHOSTUNREACH
    )


def backoff(failures: int, base: float, maximum: float, retry_after: float | None = None,
            retry_after_max: float = 60.0) -> float:
    """Seconds to wait before retry number ``failures``: the server's Retry-After if given
    (at most ``retry_after_max``), else exponential from ``base`` with jitter."""
    if retry_after is not None:
        return min(retry_after, retry_after_max)
    return min(maximum, base * 2 ** (failures - 1)) * (0.5 + random.random() / 2)


# --- the guard against local addresses ------------------------------------------------------

def _address_refusal(ip_text: str) -> str | None:
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    kind = "loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private or reserved"
    return f"refused: address {ip} is {kind}"


def _guarded_connect(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
    """``socket.create_connection`` that checks every resolved address before connecting to it."""
    host, port = address
    refusal, last_error = None, None
    for family, socktype, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        why = _address_refusal(sockaddr[0])
        if why:
            refusal = why
            continue
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as error:
            sock.close()
            last_error = error
    if last_error is not None:
        raise last_error
    raise RequestError(refusal, fix="allow_private") if refusal else RequestError(f"cannot resolve {host}")


# --- opening a URL --------------------------------------------------------------------------

def _connection_class(base: type, read_timeout: float, public_only: bool) -> type:
    class Connection(base):
        """Connects within the connect timeout, then waits at most ``read_timeout`` per read."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if public_only:
                self._create_connection = _guarded_connect

        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(read_timeout)

    return Connection


def _opener(read_timeout: float, guard: bool, public_only: bool, follow_redirects: bool) -> urllib.request.OpenerDirector:
    http_connection = _connection_class(http.client.HTTPConnection, read_timeout, public_only)
    https_connection = _connection_class(http.client.HTTPSConnection, read_timeout, public_only)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_connection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_connection, req, context=ssl.create_default_context() if guard else self._context)

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not follow_redirects:
                return None
            if guard:
                scheme = urllib.parse.urlsplit(newurl).scheme.lower()
                if scheme not in ("http", "https"):
                    raise RequestError(f"refused: redirect to unsupported scheme {scheme!r}")
                if has_credentials(newurl):
                    raise RequestError("refused: redirect to a URL holding a user name or password")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    handlers: list = [HTTPHandler, HTTPSHandler, RedirectHandler]
    if guard:
        handlers.insert(0, urllib.request.ProxyHandler({}))  # connect directly: the guard sees the real server
    return urllib.request.build_opener(*handlers)


def open_url(url: str, *, connect_timeout: float, read_timeout: float, headers: dict[str, str] | None = None,
             method: str = "GET", follow_redirects: bool = True, guard: bool = False, allow_private: bool = False):
    """The response to ``url``. Failures raise :class:`TransientError`, :class:`UnreachableError`
    or :class:`RequestError`; without ``follow_redirects`` a 3xx answer is returned as is.
    ``guard``: no proxy, redirects only to http(s) URLs without credentials and, unless
    ``allow_private``, connections only to public addresses."""
    request = urllib.request.Request(
        url, method=method, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
    )
    host = host_of(url)
    try:
        opener = _opener(read_timeout, guard, guard and not allow_private, follow_redirects)
        return opener.open(request, timeout=connect_timeout)
    except urllib.error.HTTPError as error:
        if not follow_redirects and 300 <= error.code < 400:
            return error
        error.close()
        reason = f"HTTP {error.code} {error.reason}"
        if error.code in TRANSIENT_STATUS or error.code >= 500:
            raise TransientError(f"{reason} from {host}", _retry_after(error.headers.get("Retry-After"))) from None
        if 300 <= error.code < 400:  # urllib's own refusal of a redirect (e.g. to file://)
            raise RequestError(f"refused: {reason}", error.code) from None
        raise RequestError(reason, error.code) from None
    except urllib.error.URLError as error:
        cause = error.reason
        if isinstance(cause, RequestError):
            raise cause from None
        if isinstance(cause, (TimeoutError, socket.timeout)):
            raise TransientError(f"timed out connecting to {host}") from None
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise RequestError(f"TLS certificate of {host} not valid: {cause.verify_message or cause}") from None
        if isinstance(cause, BaseException) and _unreachable(cause):
            temporary = isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_AGAIN
            raise UnreachableError(f"cannot reach {host} ({reason_of(cause)})", temporary) from None
        raise TransientError(f"cannot connect to {host} ({reason_of(cause)})") from None
    except (TimeoutError, socket.timeout):
        raise TransientError(f"timed out waiting for {host}") from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise TransientError(f"connection to {host} failed ({reason_of(error)})") from None


def read_chunk(response, size: int, url: str) -> bytes:
    """What has arrived of ``response``, at most ``size`` bytes (b"" at the end); a stall or a
    broken connection raises :class:`TransientError`."""
    try:
        return response.read1(size)  # read(n) would wait for all n bytes of a slow drip
    except (TimeoutError, socket.timeout):
        raise TransientError(f"no data from {host_of(url)} within the read timeout") from None
    except (http.client.HTTPException, ConnectionError, OSError) as error:
        raise TransientError(f"connection to {host_of(url)} broke ({reason_of(error)})") from None


# --- one small body, guarded ------------------------------------------------------------------

@dataclass(frozen=True)
class FetchOptions:
    """How image URLs are fetched. ``timeout`` bounds connecting and each read; ``deadline``
    bounds the whole download (a slow drip); ``max_bytes`` is counted while streaming;
    ``allow_private`` lets a fetch reach loopback, private and link-local addresses."""

    timeout: float = 10.0
    deadline: float = 60.0
    max_bytes: int = 64 * 1024 * 1024
    retries: int = 2
    backoff: float = 0.5
    allow_private: bool = False


def _fetch_once(url: str, options: FetchOptions) -> tuple[bytes, str]:
    started = time.monotonic()
    with open_url(url, connect_timeout=options.timeout, read_timeout=options.timeout,
                  guard=True, allow_private=options.allow_private) as response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > options.max_bytes:
            raise RequestError(f"too large: {int(declared)} bytes declared (limit {options.max_bytes})")
        chunks, total = [], 0
        while chunk := read_chunk(response, 65536, url):
            total += len(chunk)
            if total > options.max_bytes:
                raise RequestError(f"too large: more than {options.max_bytes} bytes")
            if time.monotonic() - started > options.deadline:
                raise RequestError(f"too slow: not finished after {options.deadline:g} s")
            chunks.append(chunk)
        return b"".join(chunks), response.headers.get_content_type()


def fetch_url(url: str, options: FetchOptions = FetchOptions()) -> tuple[bytes, str]:
    """``(body, content_type)`` of an http(s) URL, transient failures retried.
    Raises :class:`~clipcli.errors.ItemError` with the reason otherwise."""
    scheme = url_scheme(url)
    if scheme not in ("http", "https"):
        raise ItemError(f"unsupported URL scheme {scheme!r} (only http and https are fetched)")
    if has_credentials(url):
        raise ItemError("refused: the URL holds a user name or password (user:pass@host)")
    for attempt in range(1, options.retries + 2):
        try:
            return _fetch_once(url, options)
        except (TransientError, UnreachableError) as error:
            if attempt > options.retries or not getattr(error, "temporary", True):
                tries = f" (after {attempt} tries)" if attempt > 1 else ""
                raise ItemError(f"{error}{tries}", fix=getattr(error, "fix", None)) from None
            time.sleep(backoff(attempt, options.backoff, options.timeout))  # no Retry-After: one image, not a queue
        except RequestError as error:
            raise ItemError(str(error), fix=error.fix) from None
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise ItemError(f"cannot fetch: {reason_of(error)}") from None
    raise AssertionError("unreachable")
