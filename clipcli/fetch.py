"""Fetching image URLs, guarded: http(s) only; no loopback, private or link-local address
unless allowed (every resolved address is checked before connecting, redirects included, so
DNS cannot point a fetch at the local network); no credentials; bounded size and time;
transient failures retried. :func:`fetch_url` raises :class:`~clipcli.items.ItemError`.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .items import ItemError, has_credentials, url_scheme


@dataclass(frozen=True)
class FetchOptions:
    """How URLs are fetched. ``timeout`` bounds connecting and each read; ``deadline``
    bounds the whole download (a slow drip); ``max_bytes`` is counted while streaming."""

    timeout: float = 10.0
    deadline: float = 60.0
    max_bytes: int = 64 * 1024 * 1024
    retries: int = 2
    backoff: float = 0.5
    allow_private: bool = False


class _Refused(Exception):
    """A request we will not make or finish; never retried."""


class _Transient(Exception):
    """A failure worth retrying (timeouts, resets, 5xx, 429)."""


_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _address_refusal(ip_text: str) -> str | None:
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    kind = "loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private or reserved"
    return f"refused: address {ip} is {kind} (pass --allow-private to fetch from it)"


def _guarded_connector(allow_private: bool):
    """A ``socket.create_connection`` that checks every resolved address before connecting
    to it, so a DNS answer cannot point a fetch at the local network (rebinding included)."""

    def connect(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        refusal = None
        last_error: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:
            if not allow_private:
                refusal = _address_refusal(sockaddr[0])
                if refusal:
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
        raise _Refused(refusal or f"cannot resolve {host}")

    return connect


def _opener(allow_private: bool) -> urllib.request.OpenerDirector:
    connector = _guarded_connector(allow_private)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connector

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connector

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(GuardedHTTPConnection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(GuardedHTTPSConnection, req, context=ssl.create_default_context())

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            parts = urllib.parse.urlsplit(newurl)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise _Refused(f"refused: redirect to unsupported scheme {scheme!r}")
            if has_credentials(newurl):
                raise _Refused("refused: redirect to a URL holding a user name or password")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # ProxyHandler({}): connect directly, so the address check applies to the real server.
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), HTTPHandler, HTTPSHandler, RedirectHandler
    )


def _fetch_once(url: str, options: FetchOptions) -> tuple[bytes, str]:
    from . import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"clipcli/{__version__}"})
    started = time.monotonic()
    try:
        response = _opener(options.allow_private).open(request, timeout=options.timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if 300 <= error.code < 400:  # urllib's own refusal of a redirect (e.g. to file://)
            raise _Refused(f"refused: HTTP {error.code} {error.reason}") from None
        if error.code in _TRANSIENT_STATUS:
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        raise _Refused(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, _Refused):
            raise reason from None
        if isinstance(reason, (TimeoutError, socket.timeout, ConnectionResetError, ConnectionAbortedError)):
            raise _Transient(f"network error: {reason}") from None
        if isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_AGAIN:
            raise _Transient(f"DNS lookup failed temporarily: {reason}") from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise _Refused(f"TLS certificate not valid: {reason.verify_message or reason}") from None
        raise _Refused(f"cannot fetch: {getattr(reason, 'strerror', None) or reason}") from None
    except (TimeoutError, socket.timeout, ConnectionResetError, http.client.RemoteDisconnected) as error:
        raise _Transient(f"network error: {error or type(error).__name__}") from None
    with response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > options.max_bytes:
            raise _Refused(f"too large: {int(declared)} bytes declared (limit {options.max_bytes})")
        content_type = response.headers.get_content_type()
        chunks, total = [], 0
        try:
            while True:
                # read1 returns what has arrived; read(n) would wait for all n bytes of a slow drip.
                chunk = response.read1(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > options.max_bytes:
                    raise _Refused(f"too large: more than {options.max_bytes} bytes")
                if time.monotonic() - started > options.deadline:
                    raise _Refused(f"too slow: not finished after {options.deadline:g} s")
                chunks.append(chunk)
        except (TimeoutError, socket.timeout):
            raise _Transient(f"read timed out after {options.timeout:g} s") from None
        except (http.client.IncompleteRead, ConnectionResetError) as error:
            raise _Transient(f"connection broken: {type(error).__name__}") from None
    return b"".join(chunks), content_type


def fetch_url(url: str, options: FetchOptions = FetchOptions()) -> tuple[bytes, str]:
    """``(body, content_type)`` of an http(s) URL, with retries of transient failures.
    Raises :class:`ItemError` with the reason otherwise."""
    scheme = url_scheme(url)
    if scheme not in ("http", "https"):
        raise ItemError(f"unsupported URL scheme {scheme!r} (only http and https are fetched)")
    if has_credentials(url):
        raise ItemError("refused: the URL holds a user name or password (user:pass@host)")
    for attempt in range(options.retries + 1):
        try:
            return _fetch_once(url, options)
        except _Refused as error:
            raise ItemError(str(error)) from None
        except _Transient as error:
            if attempt == options.retries:
                tries = f" (after {attempt + 1} tries)" if attempt else ""
                raise ItemError(f"{error}{tries}") from None
            time.sleep(options.backoff * 2**attempt)
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise ItemError(f"cannot fetch: {error}") from None
    raise AssertionError("unreachable")
