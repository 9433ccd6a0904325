"""The search index's targets (issue 13), measured on this machine.

- ``tree``: 100,000 distinct tiny PNGs in 100 folders, indexed with a tiny random model; then
  a no-op re-index (whole ``clipcli index`` process, model never loaded) and a re-index
  after changing 1% of the files.
- ``search``: 1,000,000 random unit 512-d vectors stored for a random-weight ViT-B-32; the
  first search (which builds the contiguous vector cache), then per-query time in process,
  and a whole ``clipcli search`` process against a whole ``clipcli encode --text-file`` of one
  caption (the same start-up and model load, without the search).
- ``throughput``: ``clipcli index`` against ``clipcli encode`` of the same 200 photos near
  640x480 with a random-weight ViT-B-32, alternating, best of ``--rounds``.

    python benchmarks/index.py [--only tree,search,throughput] [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_image_set, environment  # noqa: E402

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)


def checkpoint(path: Path, **config) -> Path:
    """A random-weight model that describes itself (safetensors + architecture metadata)."""
    if path.exists():
        return path
    import torch

    from clipcli.models.clip import CLIPConfig
    from clipcli.models.factory import METADATA_KEY, create_model
    from clipcli.train.loop import save_checkpoint

    torch.manual_seed(0)
    model = create_model(CLIPConfig(**config))
    save_checkpoint(model, path, {METADATA_KEY: model.config})
    return path


def timed(command: list[str], env: dict | None = None) -> float:
    return measured(command, env)[0]


def measured(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``command`` as a whole process."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return elapsed, int(done.stderr.strip().splitlines()[-1]) / 1024


def clipcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipcli", *args]


def bench_tree(work: Path, count: int) -> dict:
    from PIL import Image

    tree = work / "tree"
    if not (tree / ".done").exists():
        shutil.rmtree(tree, ignore_errors=True)
        for i in range(count):
            folder = tree / f"{i // 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i % 256, i // 256 % 256, i // 65536)).save(folder / f"{i:06d}.png")
        (tree / ".done").write_text(str(count))
    model = str(checkpoint(work / "tiny.safetensors", **TINY))
    db = work / "tree.sqlite3"
    for leftover in work.glob("tree.sqlite3*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    command = clipcli("index", str(tree), "--db", str(db), "-m", model, "--device", "cpu", "--format", "json", "-q")
    first = timed(command)
    noop = [timed(command) for _ in range(3)]
    changed = sorted(tree.rglob("*.png"))[:: 100]  # 1%
    for i, path in enumerate(changed):
        Image.new("RGB", (8, 8), (255 - i % 256, 7, 9)).save(path)
    one_percent = timed(command)
    return {"files": count, "first_index_s": first, "noop_reindex_s": min(noop), "noop_runs_s": noop,
            "changed_files": len(changed), "reindex_1pct_s": one_percent}


VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def vit_b_32(work: Path) -> Path:
    """A random-weight ViT-B-32 that describes itself."""
    return checkpoint(work / "vit-b-32.safetensors", **VIT_B_32)


def vector_index(work: Path, count: int, model: str) -> Path:
    """An index holding ``count`` random unit 512-d vectors of ``model``, one file each (built once)."""
    from clipcli.index import Index
    from clipcli.pipeline import load_model

    db = work / f"search-{count}.sqlite3"
    if db.exists():
        return db
    loaded = load_model(model, device="cpu", towers=("text",))
    temp = db.with_suffix(".tmp")
    for leftover in work.glob(temp.name + "*"):
        leftover.unlink()
    rng = np.random.default_rng(0)
    with Index(temp) as index:
        index.db.execute("BEGIN")
        index.db.execute("INSERT INTO models (identity, name, dim) VALUES (?, ?, 512)", (loaded.identity, model))
        for start in range(0, count, 100_000):
            block = rng.standard_normal((min(100_000, count - start), 512)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            shas = [f"{i:064x}" for i in range(start, start + len(block))]
            index.db.executemany("INSERT INTO vectors (model_id, sha256, vector) VALUES (1, ?, ?)",
                                 zip(shas, (row.tobytes() for row in block)))
            index.db.executemany("INSERT INTO files (path, size, mtime_ns, sha256, error, indexed) VALUES (?, 1, 1, ?, NULL, 0)",
                                 ((f"/photos/{i // 1000:04d}/{i:07d}.jpg".encode(), sha)
                                  for i, sha in zip(range(start, start + len(block)), shas)))
        index.db.execute("UPDATE models SET generation = 1")
        index.db.execute("COMMIT")
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{temp}{suffix}").exists():
            os.replace(f"{temp}{suffix}", f"{db}{suffix}")
    return db


def bench_search(work: Path, count: int, queries: int = 7) -> dict:
    import torch

    from clipcli.index import Index
    from clipcli.vectors import search

    model = str(vit_b_32(work))
    db = vector_index(work, count, model)
    shutil.rmtree(db.with_name(db.name + ".vectors"), ignore_errors=True)  # the first search rebuilds it
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    with Index(db, readonly=True) as index:
        query = np.random.default_rng(1).standard_normal(512).astype(np.float32)
        query /= np.linalg.norm(query)
        start = time.perf_counter()
        search(index, 1, query, top_k=10)
        first = time.perf_counter() - start
    with Index(db, readonly=True) as index:
        times = []
        for _ in range(queries):
            start = time.perf_counter()
            search(index, 1, query, top_k=10)
            times.append(time.perf_counter() - start)
    search = clipcli("search", "a photo of a cat", "--db", str(db), "-m", model, "--device", "cpu", "--format", "json")
    captions = work / "caption.txt"
    captions.write_text("a photo of a cat\n")
    encode = clipcli("encode", "--text-file", str(captions), "-m", model, "--device", "cpu", "-o", "-", "-q")
    whole = [(measured(search), measured(encode)) for _ in range(3)]
    return {"vectors": count, "first_search_s": first, "query_ms_median": 1000 * float(np.median(times)),
            "query_ms": [1000 * t for t in times], "whole_search_s": min(w[0][0] for w in whole),
            "whole_encode_one_caption_s": min(w[1][0] for w in whole),
            "search_overhead_s": min(w[0][0] for w in whole) - min(w[1][0] for w in whole),
            "search_peak_rss_mb": max(w[0][1] for w in whole), "encode_peak_rss_mb": max(w[1][1] for w in whole),
            "vectors_mb": count * 512 * 4 / 2**20}


def bench_throughput(work: Path, rounds: int) -> dict:
    photos = work / "photos"
    build_image_set(photos, 200, 640, 480, 85, seed=0)
    model = str(vit_b_32(work))
    common = ["-m", model, "--device", "cpu", "--threads", "2", "-q"]
    encode, index = [], []
    for round_ in range(rounds):
        for leftover in work.glob("throughput.sqlite3*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        runs = [("encode", clipcli("encode", str(photos), "-o", str(work / "t.npy"), "--overwrite", *common)),
                ("index", clipcli("index", str(photos), "--db", str(work / "throughput.sqlite3"), *common))]
        for name, command in runs if round_ % 2 == 0 else runs[::-1]:
            (encode if name == "encode" else index).append(timed(command))
    return {"images": 200, "encode_s": min(encode), "index_s": min(index), "index_vs_encode": min(encode) / min(index),
            "encode_runs_s": encode, "index_runs_s": index}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="tree,search,throughput")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/index"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index.json"))
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "load_before": os.getloadavg()}
    for part in args.only.split(","):
        start = time.perf_counter()
        if part == "tree":
            report["tree"] = bench_tree(args.work, args.files)
        elif part == "search":
            report["search"] = bench_search(args.work, args.vectors)
        elif part == "throughput":
            report["throughput"] = bench_throughput(args.work, args.rounds)
        print(part, f"{time.perf_counter() - start:.0f} s:", json.dumps(report.get(part)), flush=True)
    report["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
