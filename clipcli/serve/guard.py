"""What every request passes before the routes: the token, where it comes from, its size,
and the access log line.

- **Token.** A server with a token answers only requests that carry it: the header
  ``Authorization: Bearer TOKEN``, or the query parameter ``token`` (how the page is opened,
  and how it asks for its files and images). Compared in constant time.
- **Host.** A server on a loopback address answers only requests addressed to a loopback
  name: a web page elsewhere cannot reach it through DNS rebinding.
- **Origin.** A browser says where a request comes from (``Origin``, ``Sec-Fetch-Site``):
  only the server's own page, a page of a ``--cors`` origin, or the user typing the address
  is answered. Another site cannot make the browser of someone running the server send it
  work (an ``<img>`` or a form posting to 127.0.0.1), even without a token. Programs such as
  curl send neither header and are answered.
- **Size.** A body longer than ``max_body`` bytes is refused with 413, from its
  Content-Length before it is read, or as it arrives when the length is not announced; past
  ``max_requests`` requests under way, a new one gets 503 (each may hold a body in memory).
- **Log.** One line per request on the ``clipcli.serve`` logger (the CLI sends it to
  stderr): client, method, path (the token left out), status, milliseconds.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

LOG = logging.getLogger("clipcli.serve")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class TooLarge(Exception):
    """A request body grew past the limit while it was read."""


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


class Guard:
    """The ASGI middleware of the module docstring, around ``app``."""

    def __init__(self, app, *, token: str | None, max_body: int, loopback_only: bool, origins: tuple[str, ...] = (),
                 max_requests: int = 256):
        self.app = app
        self.max_requests = max_requests
        self.under_way = 0  # one event loop: no lock needed
        self.token = token
        self.max_body = max_body
        self.loopback_only = loopback_only
        self.origins = {origin.rstrip("/") for origin in origins}

    def _token_of(self, scope: Scope) -> str | None:
        auth = _header(scope, b"authorization")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get("token")

    def _foreign(self, scope: Scope) -> str | None:
        """Why a browser's request from another site is refused, or None."""
        origin = _header(scope, b"origin")
        if origin:
            own = f"{scope.get('scheme', 'http')}://{_header(scope, b'host')}"
            return None if origin in (own, *self.origins) else f"a page of {origin[:100]}"
        site = _header(scope, b"sec-fetch-site")
        if site in ("", "same-origin", "none"):  # not a browser, the page itself, or an address typed
            return None
        if _header(scope, b"sec-fetch-mode") == "navigate" and scope.get("method") == "GET" \
                and scope.get("path") == "/":  # a link to the page: it opens, and asks for the rest itself
            return None
        return f"a {site} page"

    def _shown_path(self, scope: Scope) -> str:
        query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
                 if k != "token"]
        path = scope.get("path", "")
        return f"{path}?{urlencode(query)}" if query else path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]

        async def logged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.under_way += 1
        try:
            if self.under_way > self.max_requests:
                await send_json(logged_send, 503, {"error": f"busy: {self.under_way - 1} requests are under way; "
                                                            "try again shortly"}, [(b"retry-after", b"1")])
            else:
                await self._guarded(scope, receive, logged_send)
        finally:
            self.under_way -= 1
            client = scope.get("client") or ("-", 0)
            LOG.info('%s "%s %s" %s %.1f ms', client[0], scope.get("method", ""), self._shown_path(scope),
                     status[0] or "-", 1000 * (time.perf_counter() - started))

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = _header(scope, b"host")
        host = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]  # the port left out
        if self.loopback_only and not is_loopback(host):
            await send_json(send, 403, {"error": f"this server answers requests to 127.0.0.1 or localhost, "
                                                 f"not to {host[:100]!r}"})
            return
        foreign = self._foreign(scope)
        if foreign is not None:
            await send_json(send, 403, {"error": f"refused: {foreign} may not use this server (--cors ORIGIN "
                                                 "allows one)"})
            return
        if self.token is not None:
            given = self._token_of(scope)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                await send_json(send, 401, {"error": "this server needs its token: send the header "
                                                     "'Authorization: Bearer TOKEN' or open the page as /?token=TOKEN"},
                                [(b"www-authenticate", b"Bearer")])
                return
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_body:
            await send_json(send, 413, {"error": f"the request body is {int(length)} bytes; this server takes at "
                                                 f"most {self.max_body} (--max-upload-mb)"})
            return
        received, started = [0], [False]

        async def counted_receive() -> dict:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body:
                raise TooLarge
            return message

        async def marked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, marked_send)
        except TooLarge:  # the app answered 413 already, unless it had not begun to
            if not started[0]:
                await send_json(send, 413, {"error": f"the request body is over {self.max_body} bytes, the most "
                                                     "this server takes (--max-upload-mb)"})
