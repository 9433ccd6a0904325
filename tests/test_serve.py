"""`clipcli serve` through Starlette's test client: every endpoint equal to its command's output
for the same inputs, the errors, the token, the Host check, the limits and file serving."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from clipcli.cli import app as cli_app  # noqa: E402
from clipcli.serve.app import Limits, create_app  # noqa: E402
from clipcli.serve.service import Service, Settings  # noqa: E402

DATA = Path(__file__).parent / "data"
runner = CliRunner()
TOLERANCE = 1e-5  # batches of other sizes round differently (kernels per CPU); the scores keep 1e-5


def cli(*args: str) -> str:
    result = runner.invoke(cli_app, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


@pytest.fixture
def db(photos, tmp_path, tiny_vit_checkpoint) -> Path:
    path = tmp_path / "index.sqlite3"
    cli("index", str(photos), "--db", str(path), "-m", str(tiny_vit_checkpoint), "-q")
    return path


def client_for(service: Service, **kwargs) -> TestClient:
    return TestClient(create_app(service, **kwargs), base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.fixture
def client(db, tiny_vit_checkpoint):
    service = Service(Settings(str(tiny_vit_checkpoint), db=str(db), load=dict(device="cpu")))
    with client_for(service) as client:
        assert service.wait(60) and service.status == "ok", service.error
        client.service = service
        yield client


def upload(*paths: Path) -> list:
    return [("image", (path.name, path.read_bytes(), "application/octet-stream")) for path in paths]


def close(a, b) -> None:
    np.testing.assert_allclose(np.array(a, np.float64), np.array(b, np.float64), atol=TOLERANCE, rtol=0)


# --------------------------------------------------------------------------- equal to the commands

def test_health_names_the_model_its_scores_and_the_indexed_images(client, photos, tiny_vit_checkpoint):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == str(tiny_vit_checkpoint)
    assert body["score"] == "cosine"
    assert body["images"] == len(list(photos.iterdir()))


def test_embed_texts_equals_encode(client, tiny_vit_checkpoint):
    texts = ["a rocket", "a photo of a cat", "x " * 200]
    args = [a for t in texts for a in ("--text", t)]
    expected = [json.loads(line) for line in cli("encode", *args, "-m", str(tiny_vit_checkpoint), "-f", "jsonl",
                                                 "-q").splitlines()]
    body = client.post("/api/embed", json={"texts": texts}).json()
    assert body["model"] == str(tiny_vit_checkpoint)
    close(body["embeddings"], [r["embedding"] for r in expected])
    assert body["truncated"] == [False, False, True]  # encode says so too
    assert [r.get("truncated", False) for r in expected] == body["truncated"]
    refused = client.post("/api/embed", json={"texts": ["x " * 200], "truncate": False}).json()
    assert refused["embeddings"] == [None] and "context" in refused["errors"][0]["error"]


def test_embed_images_equals_encode_and_a_bad_upload_is_an_error_entry(client, photos, tiny_vit_checkpoint):
    files = sorted(p for p in photos.iterdir() if p.suffix in (".jpg", ".png"))
    expected = [json.loads(line) for line in cli("encode", *map(str, files), "-m", str(tiny_vit_checkpoint),
                                                 "-f", "jsonl", "-q").splitlines()]
    bad = ("image", ("notes.txt", b"not an image", "text/plain"))
    body = client.post("/api/embed", files=[*upload(*files), bad]).json()
    close(body["embeddings"][:-1], [r["embedding"] for r in expected])
    assert body["embeddings"][-1] is None
    assert body["errors"] == [{"index": len(files), "input": "notes.txt", "error": body["errors"][0]["error"]}]
    assert "not an image" in body["errors"][0]["error"] or "cannot" in body["errors"][0]["error"]
    raw = client.post("/api/embed", files=upload(files[0]), data={"normalize": "false"}).json()["embeddings"][0]
    assert abs(np.linalg.norm(raw) - 1) > 1e-3  # unnormalised, as encode --no-normalize


def test_classify_equals_the_command(client, photos, tiny_vit_checkpoint):
    files = sorted(p for p in photos.iterdir() if p.suffix in (".jpg", ".png"))
    expected = [json.loads(line) for line in cli("classify", *map(str, files), "-l", "a rocket,a cat,a woman",
                                                 "-t", "a photo of {}.", "-k", "2", "-m", str(tiny_vit_checkpoint),
                                                 "-f", "jsonl", "-q").splitlines()]
    body = client.post("/api/classify", files=upload(*files),
                       data={"labels": "a rocket,a cat,a woman", "template": "a photo of {}.", "top_k": "2"}).json()
    got = body["results"]
    assert [r["image"] for r in got] == [p.name for p in files]
    for mine, theirs in zip(got, expected):
        assert mine["label"] == theirs["label"] and mine["score_kind"] == theirs["score_kind"] == "softmax"
        assert [t["label"] for t in mine["top"]] == [t["label"] for t in theirs["top"]]
        close([t["score"] for t in mine["top"]], [t["score"] for t in theirs["top"]])


@pytest.mark.parametrize("terms", [["a rocket"], ["a cat", "0.5:on a sofa"], ["a cat", "--minus", "a rocket"]])
def test_search_equals_the_command(client, db, terms):
    expected = json.loads(cli("search", *terms, "--db", str(db), "-k", "4", "--format", "json"))
    query = [("q", t) for t in terms if t != "--minus" and terms[terms.index(t) - 1] != "--minus"]
    query += [("minus", terms[i + 1]) for i, t in enumerate(terms) if t == "--minus"]
    body = client.get("/api/search", params=[*query, ("k", "4")]).json()
    assert [r["image"] for r in body["results"]] == [r["image"] for r in expected]
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
    assert all(r.keys() == e.keys() for r, e in zip(body["results"], expected))
    close([r["score"] for r in body["results"]], [r["score"] for r in expected])
    assert len(body["ids"]) == 4 and all(body["ids"])


def test_search_pages_with_offset_and_filters_with_in_and_threshold(client, db, photos):
    whole = client.get("/api/search", params={"q": "a cat", "k": 5}).json()["results"]
    page = client.get("/api/search", params={"q": "a cat", "k": 2, "offset": 2}).json()["results"]
    assert [r["image"] for r in page] == [r["image"] for r in whole[2:4]]
    assert [r["rank"] for r in page] == [3, 4]
    cut = whole[2]["score"]
    kept = client.get("/api/search", params={"q": "a cat", "k": 5, "threshold": cut}).json()["results"]
    assert [r["image"] for r in kept] == [r["image"] for r in whole[:3]]
    sub = photos / "sub"
    sub.mkdir()
    shutil.copy(photos / "rocket.jpg", sub / "copy.jpg")
    cli("index", str(photos), "--db", str(db), "-q")  # the server sees it: a new generation of the vectors
    found = client.get("/api/search", params={"q": "a rocket", "in": str(sub)}).json()["results"]
    assert [r["image"] for r in found] == [str(sub / "copy.jpg")]
    assert client.get("/health").json()["images"] == len(whole) + 1


def test_search_by_uploaded_image_finds_that_image_first(client, photos):
    body = client.post("/api/search", files=upload(photos / "rocket.jpg"), data={"k": "2"}).json()
    assert body["results"][0]["image"] == str(photos / "rocket.jpg")
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_a_query_naming_a_file_is_text_never_a_path(client, photos):
    """A request's terms never reach the filesystem: a path is searched as the words it spells."""
    path = str(photos / "rocket.jpg")
    as_text = client.get("/api/search", params={"q": path}).json()["results"]
    assert as_text[0]["score"] < 0.99  # an image's own vector would score 1.0
    assert client.get("/api/search", params={"q": f"2:{path}"}).json()["results"] == as_text


# --------------------------------------------------------------------------- errors

def test_errors_are_the_commands_one_line_messages_as_json(client, db):
    cli_error = runner.invoke(cli_app, ["search", "a cat", "--db", str(db), "--min-prob", "0.5"]).stderr
    answer = client.get("/api/search", params={"q": "a cat", "min_prob": "0.5"})
    assert answer.status_code == 400
    assert cli_error.strip().splitlines()[-1] == f"error: {answer.json()['error']}"
    assert answer.json()["option"] == "min_prob" and "--threshold" in answer.json()["error"]
    for params in ({"q": "a cat", "k": "0"}, {"q": "a cat", "k": "many"}, {"q": "a cat", "threshold": "2"},
                   {"q": ""}, {}, {"q": "a cat", "offset": "-1"}, {"q": "a cat", "k": ["1", "2"]}):
        answer = client.get("/api/search", params=params)
        assert answer.status_code == 400, params
        assert "\n" not in answer.json()["error"] and "Traceback" not in answer.text
    assert client.post("/api/embed", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/api/embed", json={"texts": [1, 2]}).status_code == 400
    assert client.post("/api/embed", json=[1]).status_code == 400
    assert client.post("/api/embed", json={}).status_code == 400
    assert client.post("/api/embed", content=b"x", headers={"content-type": "text/plain"}).status_code == 400
    assert client.post("/api/classify", files=upload(DATA / "rocket.jpg"), data={"labels": "a,a"}).status_code == 400
    assert client.post("/api/classify", files=upload(DATA / "rocket.jpg"),
                       data={"labels": "a", "templates": "/etc/passwd"}).status_code == 400
    broken = b"--xx\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\nabc"  # never ends
    answer = client.post("/api/embed", content=broken, headers={"content-type": "multipart/form-data; boundary=xx"})
    assert 400 <= answer.status_code < 500 and answer.json()["error"]
    missing = client.get("/nothing/here")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert client.get("/api/search", params={"q": "x"}, headers={"Host": "evil.example"}).status_code == 403


def test_a_private_url_is_refused_as_the_cli_refuses_it(client, tiny_vit_checkpoint):
    body = client.post("/api/embed", json={"urls": ["http://127.0.0.1:9/x.jpg", "file:///etc/passwd"]})
    assert body.status_code == 400  # not http(s): never fetched
    body = client.post("/api/embed", json={"urls": ["http://127.0.0.1:9/x.jpg"]}).json()
    assert body["embeddings"] == [None]
    result = runner.invoke(cli_app, ["encode", "http://127.0.0.1:9/x.jpg", "-m", str(tiny_vit_checkpoint), "-f",
                                     "jsonl", "-q"])
    assert body["errors"][0]["error"] == json.loads(result.stdout)["error"]  # the CLI's guard, its record


def test_limits_on_body_images_and_texts(db, tiny_vit_checkpoint, photos):
    service = Service(Settings(str(tiny_vit_checkpoint), db=str(db), load=dict(device="cpu")))
    with client_for(service, limits=Limits(max_body=20_000, max_images=2, max_texts=3)) as client:
        assert service.wait(60)
        big = client.post("/api/embed", files=upload(photos / "astronaut.png"))
        assert big.status_code == 413 and "bytes" in big.json()["error"]
        small = ("image", ("a.png", _png(8), "image/png"))
        assert client.post("/api/embed", files=[small] * 3).status_code == 400
        assert client.post("/api/embed", files=[small] * 2).status_code == 200
        assert client.post("/api/embed", json={"texts": ["a"] * 4}).status_code == 400
        assert client.get("/api/search", params={"q": "a", "k": 1001}).status_code == 400


def held(db, checkpoint) -> tuple[Service, threading.Event]:
    """A service whose model loads only once the event is set."""
    from clipcli.pipeline import load_model

    release = threading.Event()

    def slow_loader(name, **kwargs):
        release.wait(30)
        return load_model(name, **kwargs)

    return Service(Settings(str(checkpoint), db=str(db), load=dict(device="cpu")), loader=slow_loader), release


def test_past_max_requests_under_way_a_request_gets_503(db, tiny_vit_checkpoint):
    service, release = held(db, tiny_vit_checkpoint)
    app = create_app(service, limits=Limits(max_requests=0))  # every request is one too many
    with TestClient(app, base_url="http://127.0.0.1") as client:
        answer = client.get("/health")
        release.set()
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "busy" in answer.json()["error"]


def _png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def test_503_with_retry_after_while_the_model_loads(db, tiny_vit_checkpoint):
    service, release = held(db, tiny_vit_checkpoint)
    with client_for(service) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        answer = client.get("/api/search", params={"q": "a cat"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "2"
        release.set()
        assert service.wait(60)
        assert client.get("/health").status_code == 200
        assert client.get("/api/search", params={"q": "a cat"}).status_code == 200


# --------------------------------------------------------------------------- files and tokens

def test_files_are_served_by_id_only(client, photos):
    found = client.get("/api/search", params={"q": "a rocket", "k": 5}).json()
    first = found["ids"][found["results"].index(next(r for r in found["results"] if r["image"].endswith("rocket.jpg")))]
    thumb = client.get(f"/api/thumbnail/{first}")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    full = client.get(f"/api/image/{first}")
    assert full.content == (photos / "rocket.jpg").read_bytes()
    row = first.split(".")[0]
    for bad in ("abc", f"{row}.0000000000", f"{row}", "99999.abcdefabcd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        answer = client.get(f"/api/thumbnail/{bad}")
        assert answer.status_code == 404, bad
        assert answer.headers["content-type"] == "application/json"
    assert client.get("/api/image/../../etc/passwd").status_code == 404


def test_a_symlink_planted_in_an_indexed_folder_is_refused(client, photos, tmp_path):
    found = client.get("/api/search", params={"q": "a rocket", "k": 5}).json()
    index = [r["image"] for r in found["results"]].index(str(photos / "rocket.jpg"))
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(photos / "rocket.jpg", secret)
    (photos / "rocket.jpg").unlink()
    os.symlink(secret, photos / "rocket.jpg")  # the indexed path now leads out of the indexed files
    for kind in ("thumbnail", "image"):
        answer = client.get(f"/api/{kind}/{found['ids'][index]}")
        assert answer.status_code == 404 and "symbolic link" in answer.json()["error"]


def test_files_under_a_linked_folder_are_served(client, photos, tmp_path, db):
    """A library whose folder is a symbolic link (2024 -> /mnt/nas/2024) shows its photos."""
    elsewhere = tmp_path / "nas" / "2024"
    elsewhere.mkdir(parents=True)
    shutil.copy(photos / "chelsea.png", elsewhere / "cat.png")
    os.symlink(elsewhere, photos / "2024")
    cli("index", str(photos), "--db", str(db), "-q")
    found = client.get("/api/search", params={"q": "x", "in": str(photos / "2024")}).json()
    assert [r["image"] for r in found["results"]] == [str(photos / "2024" / "cat.png")]
    assert client.get(f"/api/image/{found['ids'][0]}").content == (elsewhere / "cat.png").read_bytes()


def test_a_token_is_checked_on_every_request(db, tiny_vit_checkpoint):
    service = Service(Settings(str(tiny_vit_checkpoint), db=str(db), load=dict(device="cpu")))
    with client_for(service, token="s3cret-token") as client:
        assert service.wait(60)
        for path in ("/", "/health", "/api/search?q=a", "/static/app.js", "/api/thumbnail/1.0000000000"):
            answer = client.get(path)
            assert answer.status_code == 401 and answer.json()["error"], path
        assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/health?token=s3cret-tokenX").status_code == 401
        assert client.get("/health", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert client.get("/?token=s3cret-token").status_code == 200
        assert client.get("/static/app.js?token=s3cret-token").status_code == 200
        assert "set-cookie" not in client.get("/?token=s3cret-token").headers  # nothing else carries it


def test_another_site_cannot_make_a_browser_use_the_server(client):
    """No token on 127.0.0.1: a page elsewhere must not get the visitor's browser to send work."""
    evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert client.get("/api/search", params={"q": "a cat"}, headers=evil).status_code == 403
    assert client.post("/api/embed", json={"texts": ["a"]}, headers=evil).status_code == 403
    image_tag = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    assert client.get("/api/search", params={"q": "a cat"}, headers=image_tag).status_code == 403
    other_port = {"Origin": "http://127.0.0.1:3000", "Sec-Fetch-Site": "same-site"}
    assert client.post("/api/embed", json={"texts": ["a"]}, headers=other_port).status_code == 403
    own = {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/embed", json={"texts": ["a"]}, headers=own).status_code == 200
    assert client.get("/health", headers={"Sec-Fetch-Site": "none"}).status_code == 200  # an address typed
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert client.get("/", headers=link).status_code == 200  # a link to the page opens it
    assert client.get("/api/search", params={"q": "a"}, headers=link).status_code == 403


def test_cors_lets_a_named_origin_in_with_the_token(db, tiny_vit_checkpoint):
    service = Service(Settings(str(tiny_vit_checkpoint), db=str(db), load=dict(device="cpu")))
    with client_for(service, token="t0ken", cors=("http://app.example",)) as client:
        assert service.wait(60)
        preflight = client.options("/api/embed", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        headers = {"Origin": "http://app.example", "Authorization": "Bearer t0ken"}
        answer = client.post("/api/embed", json={"texts": ["a"]}, headers=headers)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://app.example"
        refused = client.post("/api/embed", json={"texts": ["a"]}, headers={"Origin": "http://app.example"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://app.example"
        other = {"Origin": "http://other.example", "Authorization": "Bearer t0ken"}
        assert client.post("/api/embed", json={"texts": ["a"]}, headers=other).status_code == 403


def test_hostile_requests_are_4xx_never_500(client, photos):
    deep = b"[" * 100_000
    assert client.post("/api/embed", content=deep, headers={"content-type": "application/json"}).status_code == 400
    lone = b'{"texts": ["\\ud800"]}'
    answer = client.post("/api/embed", content=lone, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "Unicode" in answer.json()["error"]
    answer = client.post("/api/search", content=b'{"q": ["a"], "k": "\\ud800"}',
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400
    answer = client.post("/api/search", content=b'{"q": ["a"], "in": ["/\\ud800"]}',
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert client.post("/api/search", json={"q": ["a"], "k": {"x": 1}}).status_code == 400
    for odd in ("%C2%B2.0123456789", "1.ABCDEFABCD", "1.0123456789%00", "-1.0123456789"):
        assert client.get(f"/api/thumbnail/{odd}").status_code == 404, odd
    assert client.get("/api/search", params={"q": "a", "in": "photos"}).status_code == 400  # relative
    many = ",".join(f"l{i}" for i in range(1500))
    answer = client.post("/api/classify", files=upload(photos / "rocket.jpg"), data={"labels": many})
    assert answer.status_code == 400 and "at most 1000" in answer.json()["error"]
    answer = client.post("/api/classify", files=upload(photos / "rocket.jpg"),
                         data={"labels": ",".join(f"l{i}" for i in range(300)), "templates": "imagenet"})
    assert answer.status_code == 400 and "prompts" in answer.json()["error"]


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http" not in page.text.split("<body")[0].replace("http-equiv", "")  # no CDN
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_a_format_browsers_cannot_show_is_sent_as_a_jpeg(client, photos, db):
    scan = photos / "scan.tiff"
    Image.open(photos / "rocket.jpg").save(scan, "TIFF")
    cli("index", str(photos), "--db", str(db), "-q")
    found = client.post("/api/search", files=upload(scan), data={"k": "1"}).json()
    assert found["results"][0]["image"] in (str(scan), str(photos / "rocket.jpg"))  # the same pixels
    found = client.get("/api/search", params={"q": "x", "in": str(scan)}).json()
    full = client.get(f"/api/image/{found['ids'][0]}")
    assert full.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(full.content)).size == Image.open(scan).size


def test_the_listening_socket_says_tcp_so_answers_are_not_held_back():
    """asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP; without it a keep-alive
    client waited 40 ms for every answer (measured: 58 ms against 18 ms for a search)."""
    import socket

    from clipcli.serve.server import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_without_the_extra_serve_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install clipcli` without [serve]
    monkeypatch.delitem(sys.modules, "clipcli.serve.server", raising=False)  # imported by an earlier test
    result = runner.invoke(cli_app, ["serve", "--port", "0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: clipcli serve needs its extra (uvicorn is missing): pip install 'clipcli[serve]'"


def test_search_by_date_equals_the_command(client, db):
    expected = json.loads(cli("search", "a cat", "--db", str(db), "-k", "4", "--sort", "date", "--format", "json"))
    got = client.get("/api/search", params={"q": "a cat", "k": 4, "sort": "date"}).json()["results"]
    assert [r["image"] for r in got] == [r["image"] for r in expected]
    assert [r["taken"] for r in got] == sorted((r["taken"] for r in got), reverse=True)
    newest = got[0]["taken"]
    after = client.get("/api/search", params={"q": "a cat", "after": newest}).json()["results"]
    assert after and all(r["taken"] >= newest for r in after)
    assert client.get("/api/search", params={"q": "a cat", "after": "June"}).status_code == 400
    assert client.get("/api/search", params={"q": "a cat", "sort": "size"}).status_code == 400
