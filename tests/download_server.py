"""A file server on 127.0.0.1 with scripted faults, for the download tests.

Each request takes the next fault from ``server.faults`` (then behaves) and is recorded in
``server.requests`` (method, path, Range, If-Range). Faults:

- ``"drop:N"``: full headers, N bytes of the body, then the connection closes
- ``"no-length"``: no Content-Length; the body ends when the connection closes
- ``"ignore-range"``: answers 200 with the whole file even to a Range request
- ``"bad-range"``: answers a Range request with a Content-Range 7 bytes off
- ``"status:503"`` (any code), ``"retry-after:1"``: 429 with Retry-After: 1
- ``"stall:N:S"``: N bytes, then silence for S seconds, then the connection closes
- ``"wrong-bytes"``: the right length, one flipped byte
- ``"throttle:B"``: the whole file at about B bytes per second

Files not in ``server.files`` answer 404. Range requests are served (206) by default, with
a strong ETag and If-Range honoured.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    if_range: str | None


@dataclass
class FaultyServer:
    httpd: ThreadingHTTPServer
    files: dict[str, bytes] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # extra headers per path
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path``; returns its sha256."""
        self.files[path] = data
        return hashlib.sha256(data).hexdigest()

    def gets(self, path: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and (path is None or r.path == path)]

    def next_fault(self) -> str:
        with self.lock:
            return self.faults.pop(0) if self.faults else ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    @property
    def state(self) -> FaultyServer:
        return self.server.state  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        state = self.state
        state.requests.append(Request(self.command, self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        fault = state.next_fault()
        kind, _, arg = fault.partition(":")
        extra = state.headers.get(self.path, {})
        if kind in ("status", "retry-after"):
            code = int(arg) if kind == "status" else 429
            self.send_response(code)
            if kind == "retry-after":
                self.send_header("Retry-After", arg)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            return
        data = state.files.get(self.path)
        if data is None:
            if extra:  # a HEAD-only resource (a hub redirect)
                self.send_response(int(extra.get("status", 302)))
                for key, value in extra.items():
                    if key != "status":
                        self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                return
            self.send_error(404)
            return
        if kind == "wrong-bytes":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        requested = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        use_range = requested and kind != "ignore-range" and (if_range is None or if_range == etag)
        if use_range:
            start = int(requested.split("=")[1].split("-")[0])
            claimed = start + 7 if kind == "bad-range" else start
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {claimed}-{len(data) - 1}/{len(data)}")
            start = claimed
        else:
            self.send_response(200)
        payload = data[start:]
        if kind != "no-length":
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Connection", "close")
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        try:
            if kind == "drop":
                self.wfile.write(payload[: int(arg)])
            elif kind == "stall":
                count, _, seconds = arg.partition(":")
                self.wfile.write(payload[: int(count)])
                self.wfile.flush()
                state.stop.wait(float(seconds))
            elif kind == "throttle":
                rate = int(arg)
                step = max(1, rate // 20)
                for i in range(0, len(payload), step):
                    if state.stop.is_set():
                        return
                    self.wfile.write(payload[i: i + step])
                    self.wfile.flush()
                    time.sleep(step / rate)
            else:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


def start_server() -> FaultyServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    state = FaultyServer(httpd)
    httpd.state = state  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return state


def stop_server(state: FaultyServer) -> None:
    state.stop.set()
    state.httpd.shutdown()
    state.httpd.server_close()
