"""What every request passes before the routes: the token, the Host header, the body size,
and the access log line.

- **Token.** A server with a token answers only requests that carry it: the header
  ``Authorization: Bearer TOKEN``, the query parameter ``token`` (how the page is opened;
  the answer then sets it as a same-site cookie, so the page's scripts, styles and images
  need not repeat it), or that cookie. Compared in constant time.
- **Host.** A server on a loopback address answers only requests addressed to a loopback
  name: a web page elsewhere cannot reach it through DNS rebinding.
- **Size.** A body longer than ``max_body`` bytes is refused with 413, from its
  Content-Length before it is read, or as it arrives when the length is not announced.
- **Log.** One line per request on the ``clipcli.serve`` logger (the CLI sends it to
  stderr): client, method, path (the token left out), status, milliseconds.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from http.cookies import SimpleCookie
from typing import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

LOG = logging.getLogger("clipcli.serve")
COOKIE = "clipcli_token"
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

    def __init__(self, app, *, token: str | None, max_body: int, loopback_only: bool):
        self.app = app
        self.token = token
        self.max_body = max_body
        self.loopback_only = loopback_only

    def _token_of(self, scope: Scope) -> tuple[str | None, bool]:
        """The token the request carries, and whether it came in the query string."""
        auth = _header(scope, b"authorization")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if "token" in query:
            return query["token"], True
        cookie = SimpleCookie()
        try:
            cookie.load(_header(scope, b"cookie"))
        except Exception:  # noqa: BLE001 (a malformed cookie header carries no token)
            return None, False
        return (cookie[COOKIE].value if COOKIE in cookie else None), False

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

        try:
            await self._guarded(scope, receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            LOG.info('%s "%s %s" %s %.1f ms', client[0], scope.get("method", ""), self._shown_path(scope),
                     status[0] or "-", 1000 * (time.perf_counter() - started))

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = _header(scope, b"host").rsplit(":", 1)[0] if not _header(scope, b"host").endswith("]") \
            else _header(scope, b"host")
        if self.loopback_only and not is_loopback(host):
            await send_json(send, 403, {"error": f"this server answers requests to 127.0.0.1 or localhost, "
                                                 f"not to {host[:100]!r}"})
            return
        set_cookie: list[tuple[bytes, bytes]] = []
        if self.token is not None:
            given, from_query = self._token_of(scope)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                await send_json(send, 401, {"error": "this server needs its token: send the header "
                                                     "'Authorization: Bearer TOKEN' or open the page as /?token=TOKEN"},
                                [(b"www-authenticate", b"Bearer")])
                return
            if from_query:
                set_cookie = [(b"set-cookie", f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode())]
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
                message = {**message, "headers": [*message.get("headers", []), *set_cookie]}
            await send(message)

        try:
            await self.app(scope, counted_receive, marked_send)
        except TooLarge:  # the app answered 413 already, unless it had not begun to
            if not started[0]:
                await send_json(send, 413, {"error": f"the request body is over {self.max_body} bytes, the most "
                                                     "this server takes (--max-upload-mb)"})
