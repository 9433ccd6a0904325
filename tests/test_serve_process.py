"""A real `clipcli serve` subprocess on 127.0.0.1: answers equal to the commands', a bounded
load test with concurrent clients, graceful shutdown on SIGTERM, the token a public address
needs, and start-up errors as one line and an exit code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

DATA = Path(__file__).parent / "data"


def _env(tmp: Path) -> dict:
    """The child's environment: its own home, cache and offline switch (module-scoped servers
    outlive the autouse fixture that sets them for a test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPCLI_", "HF_"))}
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), CLIPCLI_CACHE_DIR=str(tmp / "clipcli-cache"),
               CLIPCLI_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


class Server:
    """``clipcli serve ARGS`` on a free port; its stderr lines collected as they come."""

    def __init__(self, *args: str, env: dict):
        self.process = subprocess.Popen([sys.executable, "-m", "clipcli", "serve", "--port", "0", *args],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=env, text=True)
        self.lines: list[str] = []
        self.url = None
        found = threading.Event()

        def drain():  # always: an access log nobody reads would fill the pipe and stall the server
            for line in self.process.stderr:
                self.lines.append(line.rstrip("\n"))
                if "listening on " in line:
                    self.url = line.split("listening on ")[1].split()[0].rstrip(";")
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        found.wait(60)

    def wait_ready(self, headers: dict | None = None) -> dict:
        assert self.url, self.lines
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                return get(self.url + "health", headers)
            except urllib.error.HTTPError as error:
                if error.code != 503:
                    raise
            time.sleep(0.1)
        raise AssertionError(f"not ready: {self.lines}")

    def wait_line(self, text: str) -> None:
        deadline = time.monotonic() + 60
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, self.lines
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def get(url: str, headers: dict | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as answer:
        return json.loads(answer.read())


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def post_files(url: str, files: list[Path]) -> dict:
    boundary = "clipcliBoundary7"
    body = b"".join(b"--%s\r\nContent-Disposition: form-data; name=\"image\"; filename=\"%s\"\r\n"
                    b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (boundary.encode(), f.name.encode(),
                                                                              f.read_bytes()) for f in files)
    body += b"--%s--\r\n" % boundary.encode()
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_vit_checkpoint):
    tmp_path = tmp_path_factory.mktemp("serve")
    photos = tmp_path / "photos"
    shutil.copytree(DATA, photos, ignore=shutil.ignore_patterns("*.md", "icc"))
    db = tmp_path / "index.sqlite3"
    subprocess.run([sys.executable, "-m", "clipcli", "index", str(photos), "--db", str(db), "-m",
                    str(tiny_vit_checkpoint), "-q"], check=True, env=_env(tmp_path))
    return photos, db


@pytest.fixture(scope="module")
def server(indexed):
    photos, db = indexed
    running = Server("--db", str(db), "--batch-window-ms", "20", env=_env(db.parent))
    running.wait_ready()
    yield running
    assert running.stop() == 0, running.lines


@pytest.mark.slow  # a whole process (or a large sheet): with the kill and race tests in `pytest -m slow`
def test_the_real_server_answers_as_the_commands(server, indexed, tmp_path):
    photos, db = indexed
    command = subprocess.run([sys.executable, "-m", "clipcli", "search", "a rocket", "--db", str(db), "-k", "3",
                              "--format", "json"], capture_output=True, text=True, env=_env(tmp_path), check=True)
    expected = json.loads(command.stdout)
    got = get(server.url + "api/search?q=a+rocket&k=3")["results"]
    assert [r["image"] for r in got] == [r["image"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], atol=1e-5, rtol=0)
    server.wait_line('"GET /api/search?q=a+rocket&k=3" 200')  # the access log (written once answered)


@pytest.mark.slow  # a whole process (or a large sheet): with the kill and race tests in `pytest -m slow`
def test_eight_concurrent_clients_get_correct_answers_batched(server, indexed):
    photos, _ = indexed
    files = sorted(p for p in photos.iterdir() if p.suffix in (".jpg", ".png"))
    expected = {f.name: np.array(post_files(server.url + "api/embed", [f])["embeddings"][0]) for f in files}
    query = get(server.url + "api/search?q=a+cat&k=3")["results"]
    before = get(server.url + "health")["batches"]
    stop_at = time.monotonic() + 2

    def client(number: int) -> int:
        done = 0
        while time.monotonic() < stop_at:
            photo = files[(number + done) % len(files)]
            if done % 3 == 2:
                assert [r["image"] for r in get(server.url + "api/search?q=a+cat&k=3")["results"]] == \
                    [r["image"] for r in query]
            else:
                got = np.array(post_files(server.url + "api/embed", [photo])["embeddings"][0])
                np.testing.assert_allclose(got, expected[photo.name], atol=1e-5, rtol=0)
            done += 1
        return done

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(client, range(8)))
    after = get(server.url + "health")["batches"]
    assert min(counts) > 0, counts
    calls, inputs = after["calls"] - before["calls"], after["inputs"] - before["inputs"]
    assert inputs >= sum(c - c // 3 for c in counts) * 0.9  # every embed went through the batcher
    assert calls < inputs, (calls, inputs)  # requests that arrived together shared a model call


@pytest.mark.slow  # a server process of its own each: with the kill and race tests in `pytest -m slow`
def test_sigterm_lets_the_requests_under_way_finish_and_exits_0(indexed, tmp_path):
    """A request whose image URL answers only after the SIGTERM is in flight when it comes."""
    import http.server

    photos, db = indexed
    asked, release = threading.Event(), threading.Event()

    class SlowImage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.set()
            release.wait(30)
            data = (photos / "rocket.jpg").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    running = Server("--db", str(db), "--allow-private", env=_env(tmp_path))
    try:
        running.wait_ready()
        answers = []
        url = f"http://127.0.0.1:{slow.server_address[1]}/photo.jpg"
        sent = threading.Thread(target=lambda: answers.append(post_json(running.url + "api/embed", {"urls": [url]})))
        sent.start()
        assert asked.wait(30), running.lines  # the server is fetching it: the request is under way
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the signal is handled while the request waits; then the image comes
        release.set()
        sent.join(30)
        assert running.process.wait(30) == 0, running.lines
        assert answers and answers[0]["embeddings"][0] is not None, answers
    finally:
        release.set()
        slow.shutdown()
        running.stop()


@pytest.mark.slow  # a server process of its own each: with the kill and race tests in `pytest -m slow`
def test_a_public_address_needs_a_token_made_and_shown_once(indexed, tmp_path):
    _, db = indexed
    running = Server("--db", str(db), "--host", "0.0.0.0", env=_env(tmp_path))
    try:
        running.wait_line("is ready")
        shown = [line for line in running.lines if "token (shown once)" in line]
        assert len(shown) == 1, running.lines
        token = shown[0].split("shown once): ")[1].split(";")[0]
        url = running.url.replace("0.0.0.0", "127.0.0.1")
        running.url = url
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(url + "health")
        assert refused.value.code == 401
        assert running.wait_ready({"Authorization": f"Bearer {token}"})["status"] == "ok"
    finally:
        assert running.stop() == 0


@pytest.mark.slow  # a server process of its own each: with the kill and race tests in `pytest -m slow`
def test_start_up_errors_are_one_line_and_an_exit_code(tmp_path, indexed):
    missing = subprocess.run([sys.executable, "-m", "clipcli", "serve", "--db", str(tmp_path / "none.sqlite3")],
                             capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error:"), missing.stderr
    assert "Traceback" not in missing.stderr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    running = Server("-m", str(broken), env=_env(tmp_path))
    assert running.process.wait(60) == 2
    assert running.lines[-1].startswith("error:") and "Traceback" not in "\n".join(running.lines), running.lines
