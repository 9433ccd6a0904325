"""`clipcli serve` warm against the cold commands (issue 23), on this machine, in one run.

With a random-weight ViT-B-32 (speed does not depend on the weights' values):

- ``search``: a text query over an index of ``--vectors`` (100,000) random unit vectors:
  ``GET /api/search`` p50/p99 over ``--queries`` distinct queries, against a whole
  ``clipcli search`` process.
- ``classify``: one 640x480 photo and three labels: ``POST /api/classify`` p50/p99 against
  a whole ``clipcli classify`` process (its label embeddings cached, as the server's are).
- ``embed``: ``--photos`` (200) photos near 640x480, each uploaded alone by 1, 8 or 32
  concurrent clients (keep-alive connections): images/s, against ``clipcli encode`` of the
  same files: the whole process, and its pipeline once started (``embed_images`` in this
  process, with the same threads, best of two), which is what a warm server competes with.

The server and the commands run with the same ``--threads``. Writes ``--out`` (JSON, with the
machine's description) and prints a Markdown table.

    python benchmarks/serve.py [--threads 2] [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import clipcli, timed, vector_index, vit_b_32  # noqa: E402
from run import build_image_set, environment  # noqa: E402

WORDS = ("cat", "dog", "bicycle", "beach", "mountain", "car", "tree", "house", "boat", "bird", "flower", "city")


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        self.connection.request(method, path, body=body, headers=headers or {})
        answer = self.connection.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{method} {path}: {answer.status} {data[:300]!r}")
        return json.loads(data)

    def upload(self, path: str, files: list[Path], fields: dict | None = None) -> dict:
        boundary = "benchBoundary42"
        parts = [b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n"
                 % (boundary.encode(), k.encode(), v.encode()) for k, v in (fields or {}).items()]
        parts += [b"--%s\r\nContent-Disposition: form-data; name=\"image\"; filename=\"%s\"\r\n"
                  b"Content-Type: image/jpeg\r\n\r\n%s\r\n" % (boundary.encode(), f.name.encode(), f.read_bytes())
                  for f in files]
        body = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
        return self.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def start_server(model: str, db: Path, threads: int, env: dict) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(clipcli("serve", "--db", str(db), "-m", model, "--port", "0", "--device", "cpu",
                                       "--threads", str(threads), "-q"),
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    port = None
    for line in process.stderr:
        if "listening on" in line:
            port = int(line.split("listening on ")[1].split("/")[2].split(":")[1])
        if "is ready" in line:
            break
        if line.startswith("error:"):
            raise SystemExit(line)
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
    return process, port


def percentiles(times: list[float]) -> dict:
    ms = 1000 * np.array(times)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(times)}


def bench_search(port: int, queries: int) -> dict:
    client, times = Client(port), []
    for i in range(queries + 5):
        text = f"a photo of a {WORDS[i % len(WORDS)]} {i}"
        start = time.perf_counter()
        client.request("GET", "/api/search?" + urllib.parse.urlencode({"q": text, "k": 10}))
        if i >= 5:  # the first few warm the vector cache's pages and the allocator
            times.append(time.perf_counter() - start)
    return percentiles(times)


def bench_classify(port: int, photo: Path, requests: int) -> dict:
    client, times = Client(port), []
    fields = {"labels": "a cat,a dog,a car"}
    for i in range(requests + 3):
        start = time.perf_counter()
        client.upload("/api/classify", [photo], fields)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return percentiles(times)


def bench_embed(port: int, photos: list[Path], clients: int) -> dict:
    todo = list(photos)
    lock = threading.Lock()

    def work(_: int) -> int:
        client, done = Client(port), 0
        while True:
            with lock:
                if not todo:
                    return done
                photo = todo.pop()
            client.upload("/api/embed", [photo])
            done += 1

    Client(port).upload("/api/embed", photos[:2])  # warm
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(work, range(clients)))
    elapsed = time.perf_counter() - start
    return {"clients": clients, "images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def encode_in_process(model: str, photos: list[Path], threads: int) -> float:
    """``clipcli encode``'s pipeline once the model is loaded: images/s, best of two."""
    from clipcli.batching import embed_images
    from clipcli.items import Item
    from clipcli.pipeline import load_model

    loaded = load_model(model, device="cpu", threads=threads, towers=("image",))
    items = [Item(name=str(p), path=str(p)) for p in photos]
    list(embed_images(loaded, items[:8]))  # warm
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        done = sum(1 for _ in embed_images(loaded, items))
        best = max(best, done / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/serve"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CLIPCLI_CACHE_DIR": str(args.work / "cache")}
    model = str(vit_b_32(args.work))
    db = vector_index(args.work, args.vectors, model)
    photos = build_image_set(args.work / "photos", args.photos, 640, 480, 85, seed=0)
    common = ["-m", model, "--device", "cpu", "--threads", str(args.threads), "-q"]

    cold_search = clipcli("search", "a photo of a cat", "--db", str(db), "--format", "json", *common)
    cold_classify = clipcli("classify", str(photos[0]), "-l", "a cat,a dog,a car", "-f", "jsonl", *common)
    encode_all = clipcli("encode", str(args.work / "photos"), "-o", str(args.work / "all.npy"), "--overwrite", *common)
    timed(cold_classify, env)  # caches the label embeddings, as the server does after its first request
    cold = {name: [timed(command, env) for _ in range(args.cold_runs)]
            for name, command in (("search", cold_search), ("classify", cold_classify),
                                  ("encode_all", encode_all))}

    started_rate = encode_in_process(model, photos, args.threads)
    process, port = start_server(model, db, args.threads, env)
    try:
        warm = {"search": bench_search(port, args.queries), "classify": bench_classify(port, photos[0], 100),
                "embed": [bench_embed(port, photos, clients) for clients in (1, 8, 32)]}
    finally:
        process.terminate()
        process.wait(60)
    encode_rate = len(photos) / min(cold["encode_all"])
    result = {"environment": environment(), "threads": args.threads, "vectors": args.vectors, "photos": len(photos),
              "cold_s": cold, "warm": warm, "encode_images_per_s": encode_rate,
              "encode_started_images_per_s": started_rate}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print("| what | cold command | warm server p50 | warm p99 |\n|---|---|---|---|")
    for name in ("search", "classify"):
        print(f"| {name} | {min(cold[name]):.2f} s | {warm[name]['p50_ms']:.1f} ms | {warm[name]['p99_ms']:.1f} ms |")
    print(f"\n| clients | server images/s | vs encode ({encode_rate:.1f}/s whole, {started_rate:.1f}/s started) |"
          "\n|---|---|---|")
    for row in warm["embed"]:
        print(f"| {row['clients']} | {row['images_per_s']:.1f} | {row['images_per_s'] / started_rate:.2f}x |")


if __name__ == "__main__":
    main()
