"""The search index's targets (issue 13), measured on this machine.

- ``tree``: 100,000 distinct tiny PNGs in 100 folders, indexed with a tiny random model; then
  a no-op re-index (whole ``clipcli index`` process, model never loaded) and a re-index
  after changing 1% of the files.
- ``search``: 1,000,000 random unit 512-d vectors stored for a random-weight ViT-B-32; the
  first search (which builds the contiguous vector cache), then per-query time in process
  (``search()``: state, bfloat16 scan, float32 re-scoring of the candidates, the files), the
  top 10 of the bfloat16 scan against that of the float32 one on the same cache (alternating,
  the same random queries, the hits compared), and a whole ``clipcli search`` process against a
  whole ``clipcli encode --text-file`` of one caption (the same start-up and model load,
  without the search).
- ``scan``: ``--scan-vectors`` (10,000,000) random unit 512-d vectors written straight into
  the cache's files (a float32 ``.npy`` and its bfloat16 rounding; no SQLite index: at 10M
  it would take 45 GB), then the top 10 of random queries from the memory-mapped files, with
  the process's peak RSS. The files stay in ``--work`` for another run: delete them after.
- ``throughput``: ``clipcli index`` against ``clipcli encode`` of the same 200 photos near
  640x480 with a random-weight ViT-B-32, alternating, best of ``--rounds``.

    python benchmarks/index.py [--only tree,search,throughput,scan] [--work DIR] [--out FILE.json]
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


def unit_queries(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, 512)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def scan_against_float32(ids: np.ndarray, vectors: np.ndarray, scan, queries: np.ndarray) -> dict:
    """Per query, the top 10 by the bfloat16 scan and by a float32 scan of every row, alternating."""
    from clipcli.vectors import top_scores

    times: dict[str, list[float]] = {"bfloat16": [], "float32": []}
    same = True
    for at, query in enumerate(queries):
        found = {}
        for kind in ("bfloat16", "float32") if at % 2 == 0 else ("float32", "bfloat16"):
            start = time.perf_counter()
            found[kind] = top_scores(vectors, ids, query, 10, None, None, scan if kind == "bfloat16" else None)
            times[kind].append(time.perf_counter() - start)
        same &= [i for i, _ in found["bfloat16"]] == [i for i, _ in found["float32"]]
    return {"top10_ms_median_bfloat16": 1000 * float(np.median(times["bfloat16"])),
            "top10_ms_median_float32": 1000 * float(np.median(times["float32"])), "same_top10": same,
            "top10_ms_bfloat16": [1000 * t for t in times["bfloat16"]],
            "top10_ms_float32": [1000 * t for t in times["float32"]]}


def bench_search(work: Path, count: int, queries: int = 9) -> dict:
    import torch

    from clipcli.index import Index
    from clipcli.vectors import load_cache, search

    model = str(vit_b_32(work))
    db = vector_index(work, count, model)
    shutil.rmtree(db.with_name(db.name + ".vectors"), ignore_errors=True)  # the first search rebuilds it
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    with Index(db, readonly=True) as index:
        query = unit_queries(1, 1)[0]
        start = time.perf_counter()
        search(index, 1, query, top_k=10)
        first = time.perf_counter() - start
    os.sync()  # the cache's 3 GB written back before the steady-state queries are timed
    with Index(db, readonly=True) as index:
        times = []
        for query in unit_queries(queries, 2):
            start = time.perf_counter()
            search(index, 1, query, top_k=10)
            times.append(time.perf_counter() - start)
        compared = scan_against_float32(*load_cache(index, 1), unit_queries(queries, 3))
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
            "vectors_mb": count * 512 * 4 / 2**20, "scanned_mb": count * 512 * 2 / 2**20, **compared}


def scan_files(work: Path, count: int) -> tuple[Path, Path]:
    """A float32 ``.npy`` of ``count`` random unit 512-d vectors and its ``.bf16`` rounding
    (clipcli.vectors' format: the array, then the rows' largest norm), built once."""
    from clipcli.vectors import _rounded

    exact, rounded = work / f"scan-{count}.npy", work / f"scan-{count}.bf16"
    if exact.exists() and rounded.exists():
        return exact, rounded
    rng, norm = np.random.default_rng(0), 0.0
    with open(f"{exact}.tmp", "wb") as exact_out, open(f"{rounded}.tmp", "wb") as rounded_out:
        for out, dtype in ((exact_out, np.float32), (rounded_out, np.uint16)):
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                       "fortran_order": False, "shape": (count, 512)})
        for start in range(0, count, 100_000):
            block = rng.standard_normal((min(100_000, count - start), 512), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            bits, largest = _rounded(block)
            norm = max(norm, largest)
            exact_out.write(block.tobytes())
            rounded_out.write(bits.tobytes())
        rounded_out.write(np.array([norm], "<f8").tobytes())
    os.replace(f"{exact}.tmp", exact)
    os.replace(f"{rounded}.tmp", rounded)
    return exact, rounded


def measure_scan(exact: Path, rounded: Path, queries: int) -> dict:
    """The top 10 of ``queries`` random queries (after one untimed) from memory-mapped cache
    files, and this process's peak RSS."""
    import resource

    import torch

    from clipcli.vectors import Scan, top_scores

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    vectors, bits = np.load(exact, mmap_mode="c"), np.load(rounded, mmap_mode="c")
    with open(rounded, "rb") as file:
        file.seek(bits.offset + bits.nbytes)
        scan = Scan(bits, float(np.frombuffer(file.read(8), "<f8")[0]))
    ids, times = np.arange(1, len(bits) + 1), []
    for query in unit_queries(queries + 1, 4):
        start = time.perf_counter()
        top_scores(vectors, ids, query, 10, None, None, scan)
        times.append(time.perf_counter() - start)
    return {"first_ms": 1000 * times[0], "top10_ms_median": 1000 * float(np.median(times[1:])),
            "top10_ms": [1000 * t for t in times[1:]],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_scan(work: Path, count: int, queries: int = 7) -> dict:
    """:func:`measure_scan` on files of ``count`` vectors, in a process of its own."""
    start = time.perf_counter()
    exact, rounded = scan_files(work, count)
    built = time.perf_counter() - start
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import index; "
            f"print(json.dumps(index.measure_scan({str(exact)!r}, {str(rounded)!r}, {queries})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the scan of {count} vectors failed: {done.stderr[-2000:]}")
    return {"vectors": count, "files_built_s": built, **json.loads(done.stdout.splitlines()[-1]),
            "scanned_mb": count * 512 * 2 / 2**20, "float32_file_mb": count * 512 * 4 / 2**20}


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
    parser.add_argument("--scan-vectors", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "load_before": os.getloadavg()}
    run_parts(args.only, {"tree": lambda: bench_tree(args.work, args.files),
                          "search": lambda: bench_search(args.work, args.vectors),
                          "throughput": lambda: bench_throughput(args.work, args.rounds),
                          "scan": lambda: bench_scan(args.work, args.scan_vectors)}, report, args.out)


def run_parts(only: str, parts: dict, report: dict, out: Path) -> None:
    """The parts named in ``only`` (comma-separated; other names are skipped), in that order, each
    timed and printed as it ends, into ``report``; then the report as JSON at ``out``."""
    for part in only.split(","):
        if part not in parts:
            continue
        start = time.perf_counter()
        report[part] = parts[part]()
        print(part, f"{time.perf_counter() - start:.0f} s:", json.dumps(report[part]), flush=True)
    report["load_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
