"""Running the app: a socket bound before the model loads, uvicorn on it, a graceful stop.

The server listens first and loads the model on a thread (``/health`` answers "loading"
meanwhile), so a client sees at once that it is coming. uvicorn turns SIGTERM and Ctrl-C
into a graceful shutdown: requests under way finish, then :meth:`Server.run` returns.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import IO, Callable

import uvicorn

from ..errors import ClipcliError
from .service import Service


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one)."""
    name = host.strip("[]")
    try:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it
        # a keep-alive client waits 40 ms for every answer (Nagle's algorithm against delayed ACKs)
        sock = socket.socket(socket.AF_INET6 if ":" in name else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((name, port))
        sock.listen(128)
    except OSError as error:
        raise ClipcliError(f"cannot listen on {host}:{port}: {error.strerror or error}", option="port") from None
    return sock


def log_requests(stream: IO[str], quiet: bool) -> None:
    """The access log (the ``clipcli.serve`` logger, one line per request) on ``stream``;
    only errors when ``quiet``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("clipcli.serve")
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


class Server:
    """``app`` (for ``service``) on ``host:port``, bound now; :meth:`run` serves until stopped."""

    def __init__(self, service: Service, app, host: str, port: int):
        self.service = service
        self.sock = listen(host, port)
        name = host.strip("[]")
        self.url = f"http://{f'[{name}]' if ':' in name else name}:{self.sock.getsockname()[1]}/"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                                     timeout_graceful_shutdown=30, server_header=False))

    def run(self, on_loaded: Callable[[Service], None] | None = None) -> None:
        """Load the model on a thread and serve; return after a graceful shutdown, or raise the
        error that stopped the model from loading (then nothing is served)."""

        def loaded(done: Service) -> None:
            if on_loaded is not None:
                on_loaded(done)
            if done.status != "ok":
                self._server.should_exit = True

        self.service.start(on_loaded=loaded)
        # uvicorn catches SIGTERM while it serves, shuts down gracefully, then raises it again: exit 0 all the same
        signal.signal(signal.SIGTERM, lambda *_: setattr(self._server, "should_exit", True))
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.sock.close()
        if self.service.status == "error":
            raise self.service.error
