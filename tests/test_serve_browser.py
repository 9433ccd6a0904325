"""The search page of ``clipcli serve`` in a real browser: headless Chromium driven by Selenium.

A tiny random CLIP indexes the sample photos plus generated pictures (more than one page of
results, so that scrolling loads a second one); ``clipcli serve`` runs as a subprocess, as a user
starts it, and the page's results are compared with what the JSON API answers to the same query.
Skipped where Chromium, chromedriver or Selenium are missing.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("selenium")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs chromium and chromedriver on PATH", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

DATA = Path(__file__).parent / "data"
PAGE = 48          # the page asks for this many results at a time
SHAPES = 55        # generated pictures besides the sample photos: 60 images, two pages
TOKEN = "secret-t0ken"
QUERY = "a photo of a rocket"
WAIT = 30          # seconds any one browser condition may take


# --------------------------------------------------------------------------- the server

class Server:
    """``clipcli serve`` as a subprocess; its stderr is drained all along (uvicorn logs there)."""

    def __init__(self, args: list[str], env: dict[str, str], token: str | None = None):
        self.token = token
        self.proc = subprocess.Popen([sys.executable, "-m", "clipcli", "serve", *args, "--port", "0"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._listening(timeout=60)
        self._healthy(timeout=60)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop(check=False)
                pytest.fail(f"clipcli serve said nothing of listening in {timeout} s:\n{''.join(self.log)}")
            if line is None:
                pytest.fail(f"clipcli serve exited ({self.proc.wait()}) before listening:\n{''.join(self.log)}")
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+/)", line)
            if found:
                return found.group(1)

    def _healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        answer = None
        while time.monotonic() < deadline:
            status, answer = get(self.url + "health", token=self.token)
            if status == 200 and answer.get("status") == "ok":
                return
            time.sleep(0.2)  # polling the server's own condition, not waiting in place of one
        self.stop(check=False)
        pytest.fail(f"/health never answered ok in {timeout} s (last: {answer}):\n{''.join(self.log)}")

    def stop(self, check: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        if check:
            assert code == 0, f"clipcli serve ended with {code} on SIGTERM:\n{''.join(self.log)}"


@contextmanager
def serving(args: list[str], env: dict[str, str], token: str | None = None):
    server = Server([*args, "--token", token] if token else args, env, token)
    try:
        yield server
    finally:
        server.stop(check=sys.exc_info()[0] is None)


def _answer(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"raw": body.decode("utf-8", "replace")}
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _answer(urllib.request.Request(url, headers=headers))


def post_search(base: str, fields: list[tuple[str, str]], files: list[tuple[str, bytes]],
                token: str | None = None) -> tuple[int, dict]:
    """POST /api/search as a multipart form, as the page sends it."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for filename, data in files:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return _answer(urllib.request.Request(base + "api/search", data=body, headers=headers, method="POST"))


def api_search(base: str, query: str, k: int = PAGE, offset: int = 0, token: str | None = None) -> dict:
    params = urllib.parse.urlencode({"q": query, "k": k, "offset": offset})
    status, answer = get(f"{base}api/search?{params}", token=token)
    assert status == 200, answer
    return answer


# --------------------------------------------------------------------------- fixtures

def _shapes(folder: Path, count: int) -> None:
    """Pictures of coloured shapes, each different, so that an image query has one best match."""
    from PIL import Image, ImageDraw

    folder.mkdir()
    rng = random.Random(7)
    for n in range(count):
        image = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            box = sorted(rng.sample(range(96), 2)) + sorted(rng.sample(range(96), 2))
            x0, x1, y0, y1 = box
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        image.save(folder / f"shape-{n:02d}.png")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_vit_checkpoint):
    """An index of the photos and a server on it: (base URL, photos folder, env, server args)."""
    root = tmp_path_factory.mktemp("serve-browser")
    photos = root / "photos"
    photos.mkdir()
    for source in sorted(DATA.iterdir()):
        if source.suffix.lower() in (".jpg", ".jpeg", ".png"):
            shutil.copy(source, photos / source.name)
    _shapes(photos / "shapes", SHAPES)

    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLIPCLI_MODEL", "CLIPCLI_MIRROR", "CLIPCLI_INDEX") and not k.startswith("HF_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_DATA_HOME=str(home / ".local/share"),
               CLIPCLI_CACHE_DIR=str(root / "clipcli-cache"), CLIPCLI_OFFLINE="1")
    db = root / "index.db"
    done = subprocess.run([sys.executable, "-m", "clipcli", "index", str(photos), "--db", str(db),
                           "-m", str(tiny_vit_checkpoint), "-q"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    args = ["--db", str(db), "-m", str(tiny_vit_checkpoint)]
    with serving(args, env) as server:
        yield {"url": server.url, "photos": photos, "env": env, "args": args}


@pytest.fixture(scope="module")
def driver():
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


@pytest.fixture(autouse=True)
def no_script_errors(driver):
    """No test may leave an error of the page's own script in the console (an HTTP error
    answer the page shows, as the error test provokes, logs a failed resource: not counted)."""
    driver.get_log("browser")
    yield
    errors = [entry["message"] for entry in driver.get_log("browser")
              if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert not errors, errors


# --------------------------------------------------------------------------- page helpers

def open_page(driver, url: str) -> None:
    driver.get("about:blank")  # a URL that differs only in its #hash would not load the page again
    driver.get(url)
    WebDriverWait(driver, WAIT).until(EC.visibility_of_element_located((By.ID, "q")))


def tiles(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results .tile")


def wait_for_tiles(driver, count: int) -> list:
    WebDriverWait(driver, WAIT).until(lambda d: len(tiles(d)) >= count,
                                      f"fewer than {count} tiles; status: {status_text(driver)!r}")
    return tiles(driver)


def status_text(driver) -> str:
    return driver.find_element(By.ID, "status").text


def search(driver, query: str, count: int) -> list:
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query, Keys.ENTER)
    WebDriverWait(driver, WAIT).until(lambda d: f"results for “{query}”" in status_text(d),
                                      "no summary of the search in the status line")
    return wait_for_tiles(driver, count)


def thumbnails_loaded(driver, count: int) -> bool:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results .tile img')).slice(0, arguments[0])"
        ".every(img => img.complete && img.naturalWidth > 0)", count)


def screenshot(driver, path: Path) -> Path:
    """Save the window as PNG, and a copy in $CLIPCLI_SCREENSHOT_DIR when set (to look at)."""
    assert driver.save_screenshot(str(path))
    if os.environ.get("CLIPCLI_SCREENSHOT_DIR"):
        target = Path(os.environ["CLIPCLI_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def active(driver):
    return driver.execute_script("return document.activeElement")


def press(driver, key: str) -> None:
    ActionChains(driver).send_keys(key).perform()


# --------------------------------------------------------------------------- tests

def test_text_search_shows_the_api_results_in_rank_order(site, driver, tmp_path):
    base = site["url"]
    expected = api_search(base, QUERY)
    assert len(expected["results"]) == PAGE  # 60 images: a full first page
    open_page(driver, base)
    assert active(driver) == driver.find_element(By.ID, "q")  # the query box has the focus

    shown = search(driver, QUERY, PAGE)[:PAGE]
    ranks = [int(t.get_attribute("data-rank")) for t in shown]
    scores = [float(t.get_attribute("data-score")) for t in shown]
    paths = [t.get_attribute("data-path") for t in shown]
    assert ranks == list(range(1, PAGE + 1))
    assert all(a >= b for a, b in zip(scores, scores[1:])), scores
    assert paths == [r["image"] for r in expected["results"]]
    assert scores == pytest.approx([r["score"] for r in expected["results"]], abs=1e-6)
    for tile, result in zip(shown[:5], expected["results"]):
        image = tile.find_element(By.TAG_NAME, "img")
        assert image.get_attribute("alt") == Path(result["image"]).name
        assert image.get_attribute("loading") == "lazy"
        assert tile.get_attribute("tabindex") == "0"
        assert f"{result['score']:.3f}" in tile.text

    _, health = get(base + "health")
    status = status_text(driver)
    assert f"results for “{QUERY}”" in status and expected["score_kind"] in status
    assert Path(health["model"]).name in status  # a model file shows as its name
    WebDriverWait(driver, WAIT).until(lambda d: thumbnails_loaded(d, 5), "the first thumbnails did not load")

    data = screenshot(driver, tmp_path / "serve-results.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000, len(data)

    # The query is in the address: a reload repeats the search.
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(driver.current_url).fragment).get("q") == [QUERY]
    driver.refresh()
    again = wait_for_tiles(driver, PAGE)
    assert driver.find_element(By.ID, "q").get_attribute("value") == QUERY
    assert [t.get_attribute("data-path") for t in again[:PAGE]] == paths


def test_back_repeats_the_search_before(site, driver):
    base = site["url"]
    open_page(driver, base)
    first = [t.get_attribute("data-path") for t in search(driver, "a cat", PAGE)]
    second = [t.get_attribute("data-path") for t in search(driver, QUERY, PAGE)]
    assert first != second
    driver.back()
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "q").get_attribute("value") == "a cat")
    WebDriverWait(driver, WAIT).until(lambda d: [t.get_attribute("data-path") for t in tiles(d)] == first,
                                      "the results of the search before did not come back")


def test_scrolling_to_the_end_loads_the_next_page(site, driver):
    base = site["url"]
    everything = api_search(base, QUERY, k=1000)["results"]
    assert len(everything) == SHAPES + 5
    open_page(driver, base)
    search(driver, QUERY, PAGE)
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    shown = wait_for_tiles(driver, len(everything))
    assert [int(t.get_attribute("data-rank")) for t in shown] == list(range(1, len(everything) + 1))
    assert [t.get_attribute("data-path") for t in shown] == [r["image"] for r in everything]
    assert status_text(driver).startswith(f"{len(everything)} results for")


def test_an_image_query_finds_that_image_first(site, driver):
    base = site["url"]
    photo = site["photos"] / "rocket.jpg"
    open_page(driver, base)
    driver.find_element(By.ID, "image-input").send_keys(str(photo))
    WebDriverWait(driver, WAIT).until(lambda d: "rocket.jpg" in status_text(d) and "results for" in status_text(d),
                                      "no summary of the image search")
    shown = wait_for_tiles(driver, PAGE)
    first = shown[0]
    assert first.get_attribute("data-rank") == "1"
    assert Path(first.get_attribute("data-path")).resolve() == photo.resolve()
    assert float(first.get_attribute("data-score")) > 0.99

    status, answer = post_search(base, [("k", str(PAGE))], [("rocket.jpg", photo.read_bytes())])
    assert status == 200, answer
    assert [t.get_attribute("data-path") for t in shown[:PAGE]] == [r["image"] for r in answer["results"]]

    preview = driver.find_element(By.ID, "query-image")
    assert preview.is_displayed()
    driver.find_element(By.ID, "query-image-clear").click()
    WebDriverWait(driver, WAIT).until(lambda d: not tiles(d) and not preview.is_displayed())


def test_an_image_query_with_text_sends_both(site, driver):
    base = site["url"]
    photo = site["photos"] / "chelsea.png"
    open_page(driver, base)
    driver.find_element(By.ID, "q").send_keys("a cat")
    driver.find_element(By.ID, "image-input").send_keys(str(photo))
    WebDriverWait(driver, WAIT).until(lambda d: "“a cat”" in status_text(d), "no summary of the search")
    shown = wait_for_tiles(driver, PAGE)
    status, answer = post_search(base, [("q", "a cat"), ("k", str(PAGE))], [("chelsea.png", photo.read_bytes())])
    assert status == 200, answer
    assert [t.get_attribute("data-path") for t in shown[:PAGE]] == [r["image"] for r in answer["results"]]


def test_a_server_error_shows_its_message_and_no_trace(site, driver, tmp_path):
    base = site["url"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is no JPEG\n" * 64)
    status, answer = post_search(base, [("k", str(PAGE))], [("broken.jpg", broken.read_bytes())])
    assert 400 <= status < 600 and answer.get("error"), (status, answer)

    open_page(driver, base)
    driver.find_element(By.ID, "image-input").send_keys(str(broken))
    line = driver.find_element(By.ID, "status")
    WebDriverWait(driver, WAIT).until(lambda d: "error" in line.get_attribute("class"), "no error in the status")
    assert line.text.startswith(answer["error"].splitlines()[0])
    assert "\n" not in line.text and "Traceback" not in line.text
    assert not tiles(driver)


def test_the_viewer_shows_the_full_image_and_steps_through_results(site, driver, tmp_path):
    base = site["url"]
    open_page(driver, base)
    shown = search(driver, QUERY, PAGE)
    paths = [t.get_attribute("data-path") for t in shown[:2]]

    shown[0].click()
    viewer = driver.find_element(By.ID, "viewer")
    WebDriverWait(driver, WAIT).until(EC.visibility_of(viewer))
    path = driver.find_element(By.ID, "viewer-path")
    assert path.text == paths[0]
    assert driver.find_element(By.ID, "viewer-score").text.startswith("score ")
    full = driver.find_element(By.CSS_SELECTOR, "#viewer img")
    WebDriverWait(driver, WAIT).until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", full),
        "the full image did not load")
    assert "/api/image/" in full.get_attribute("src")
    assert screenshot(driver, tmp_path / "serve-viewer.png").stat().st_size > 10_000

    press(driver, Keys.ARROW_RIGHT)
    WebDriverWait(driver, WAIT).until(lambda d: path.text == paths[1])
    press(driver, Keys.ARROW_LEFT)
    WebDriverWait(driver, WAIT).until(lambda d: path.text == paths[0])

    press(driver, Keys.ESCAPE)
    WebDriverWait(driver, WAIT).until(EC.invisibility_of_element(viewer))
    assert active(driver) == tiles(driver)[0]  # the focus goes back where it was

    tiles(driver)[1].click()
    WebDriverWait(driver, WAIT).until(EC.visibility_of(viewer))
    assert path.text == paths[1]
    driver.find_element(By.ID, "viewer-close").click()
    WebDriverWait(driver, WAIT).until(EC.invisibility_of_element(viewer))


def test_arrow_keys_move_between_tiles_as_laid_out(site, driver):
    base = site["url"]
    open_page(driver, base)
    shown = search(driver, QUERY, PAGE)
    # Tiles of the first row share its top edge; the grid's layout gives the row length.
    top = shown[0].rect["y"]
    per_row = sum(1 for t in shown if t.rect["y"] == top)
    assert 1 < per_row < PAGE

    driver.execute_script("arguments[0].focus()", shown[0])
    press(driver, Keys.ARROW_RIGHT)
    assert active(driver) == shown[1]
    press(driver, Keys.ARROW_DOWN)
    assert active(driver) == shown[1 + per_row]
    press(driver, Keys.ARROW_UP)
    press(driver, Keys.ARROW_LEFT)
    assert active(driver) == shown[0]
    press(driver, Keys.ARROW_LEFT)  # nothing before the first
    assert active(driver) == shown[0]

    press(driver, Keys.ENTER)  # Enter opens the focused tile
    viewer = driver.find_element(By.ID, "viewer")
    WebDriverWait(driver, WAIT).until(EC.visibility_of(viewer))
    assert driver.find_element(By.ID, "viewer-path").text == shown[0].get_attribute("data-path")
    press(driver, Keys.ESCAPE)
    WebDriverWait(driver, WAIT).until(EC.invisibility_of_element(viewer))

    press(driver, "/")  # "/" comes back to the query box from anywhere
    assert active(driver) == driver.find_element(By.ID, "q")


def test_a_server_with_a_token_serves_the_page_opened_with_it(site, driver):
    with serving(site["args"], site["env"], token=TOKEN) as server:
        base = server.url
        status, answer = get(base + "api/search?q=rocket")
        assert status == 401 and answer.get("error"), (status, answer)
        expected = api_search(base, QUERY, token=TOKEN)

        open_page(driver, base + "?token=" + TOKEN)
        shown = search(driver, QUERY, PAGE)
        assert [t.get_attribute("data-path") for t in shown[:PAGE]] == [r["image"] for r in expected["results"]]
        # Images carry the token in their address, since <img> sends no header.
        WebDriverWait(driver, WAIT).until(lambda d: thumbnails_loaded(d, 5), "thumbnails did not load with the token")
        assert driver.execute_script("return sessionStorage.getItem('clipcli.token')") == TOKEN
