"""Partitioned encoding on this CPU (issue 14's scaling row).

- ``split``: 400 JPEGs near 640x480 with a random-weight ViT-B/32, one process with 2 torch
  threads against 2 processes (``--rank 0/1 --world 2``) with 1 thread each, whole processes,
  best of ``--rounds`` alternating runs.
- ``overhead``: 1,000 tiny PNGs with a tiny model, as 1 partition and as 100 partitions of 10:
  the difference per partition is what a partition costs (manifest check, 2 files written
  and renamed with fsync, the parquet writer).

    python benchmarks/scale.py [--work DIR] [--out FILE.json] [--rounds 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import TINY, checkpoint  # noqa: E402
from run import build_image_set, environment  # noqa: E402


def encode(folder: Path, out: Path, model: str, *extra: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "clipcli", "encode", str(folder), "-m", model, "-o", f"{out}/", "--device", "cpu",
            "--threads", str(threads), "-q", *extra]


def wall(commands: list[list[str]], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1" if len(commands) > 1 else "2")
    start = time.perf_counter()
    running = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    for process in running:
        if process.wait() != 0:
            raise SystemExit(process.stderr.read().decode()[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/scale"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    photos = args.work / "photos"
    build_image_set(photos, 400, 640, 480, 85, seed=0)
    vit = str(checkpoint(args.work / "vit-b-32.safetensors", **dict(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
        context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)))
    one, two = [], []
    for round_ in range(args.rounds):
        runs = [("one", [encode(photos, args.work / "o1", vit, "--partition-size", "50", threads=2)]),
                ("two", [encode(photos, args.work / "o2", vit, "--partition-size", "50", "--rank", str(r), "--world", "2",
                                threads=1) for r in (0, 1)])]
        for name, commands in runs if round_ % 2 == 0 else runs[::-1]:
            (one if name == "one" else two).append(wall(commands, args.work / ("o1" if name == "one" else "o2")))
    tiny_images = args.work / "tiny"
    if not tiny_images.is_dir():
        from PIL import Image

        tiny_images.mkdir()
        for i in range(1000):
            Image.new("RGB", (8, 8), (i % 256, i // 256, 9)).save(tiny_images / f"{i:04d}.png")
    tiny = str(checkpoint(args.work / "tiny.safetensors", **TINY))
    whole = min(wall([encode(tiny_images, args.work / "t1", tiny, "--partition-size", "1000", threads=2)], args.work / "t1")
                for _ in range(args.rounds))
    parts = min(wall([encode(tiny_images, args.work / "t2", tiny, "--partition-size", "10", threads=2)], args.work / "t2")
                for _ in range(args.rounds))
    report = {"environment": environment(), "images": 400, "one_process_2_threads_s": min(one),
              "two_processes_1_thread_s": min(two), "one_images_per_s": 400 / min(one), "two_images_per_s": 400 / min(two),
              "runs": {"one": one, "two": two}, "tiny_1_partition_s": whole, "tiny_100_partitions_s": parts,
              "overhead_ms_per_partition": 1000 * (parts - whole) / 99, "load": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
