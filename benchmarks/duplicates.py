"""`clipcli duplicates` at scale (issue 24), measured on this machine.

- ``command``: a whole ``clipcli duplicates --db DB`` process (all three tiers) over
  ``--vectors`` random unit 512-d vectors stored as benchmarks/index.py's ``vector_index``
  stores them (one file each, a random-weight ViT-B-32): wall time and peak RSS, the first
  run building the contiguous vector cache, then warm; and a process that only imports torch
  and the CLI, the floor under both.
- ``pairs``: :func:`clipcli.duplicates.similar_pairs` alone in process at ``--sizes`` and at
  ``--vectors``, to show the N^2 growth that the 1,000,000 figure is extrapolated from (at
  1M the products alone are 100x the 100k ones: an hour or more here, so not run unless asked
  with ``--vectors 1000000``).

Random vectors have no pairs near the thresholds: this measures the products and the scan, not
the grouping, which runs over the pairs kept only.

    python benchmarks/duplicates.py [--vectors 100000] [--sizes 25000,50000] [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import clipcli, measured, run_parts, vector_index, vit_b_32  # noqa: E402
from run import environment  # noqa: E402


def cpu_flags() -> list[str]:
    """The vector instruction sets the CPU reports (what the matrix products run on)."""
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx", "fma", "amx", "sse4")
    return sorted(flag for flag in line.split(":", 1)[1].split() if flag.startswith(wanted))


def bench_command(work: Path, count: int, runs: int = 2) -> dict:
    db = vector_index(work, count, str(vit_b_32(work)))
    for cache in db.parent.glob(db.name + ".vectors"):
        for file in cache.iterdir():
            file.unlink()  # the first run builds the cache
    command = clipcli("duplicates", "--db", str(db), "--format", "jsonl")
    first = measured(command)
    warm = [measured(command) for _ in range(runs)]
    imports = measured([sys.executable, "-c", "import torch, clipcli.cli"])  # what any run holds before work
    return {"vectors": count, "first_s": first[0], "first_peak_rss_mb": first[1],
            "imports_s": imports[0], "imports_peak_rss_mb": imports[1],
            "warm_s": min(w[0] for w in warm), "warm_peak_rss_mb": max(w[1] for w in warm),
            "warm_runs_s": [w[0] for w in warm], "vectors_mb": count * 512 * 4 / 2**20}


def bench_pairs(sizes: list[int]) -> dict:
    import torch

    from clipcli.duplicates import SIMILAR
    from clipcli.pairs import bfloat16_pays, similar_pairs

    rng = np.random.default_rng(0)
    out = {"threads": torch.get_num_threads(), "threshold": SIMILAR, "bfloat16_pays": bfloat16_pays()}
    for fast in (False, True):
        mode = "bf16+fp32" if fast else "fp32"
        seconds = out.setdefault(mode, {"seconds": {}, "pairs": {}})
        for size in sizes:
            if size > 100_000 and not fast:  # float32 at 1M is half an hour here: extrapolated instead
                continue
            vectors = rng.standard_normal((size, 512), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            start = time.perf_counter()
            left, _, _ = similar_pairs(vectors, SIMILAR, fast=fast)
            seconds["seconds"][size] = time.perf_counter() - start
            seconds["pairs"][size] = len(left)
            print(f"pairs {mode} {size}: {seconds['seconds'][size]:.1f} s", flush=True)
        largest = max(seconds["seconds"])
        per_pair = seconds["seconds"][largest] / (largest * largest / 2)  # the products grow as N^2 / 2
        seconds["gflops"] = largest * largest / 2 * 512 * 2 / seconds["seconds"][largest] / 1e9
        seconds["extrapolated_1m_s"] = per_pair * 1e12 / 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="pairs,command")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--sizes", default="25000,50000")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/duplicates"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/duplicates.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "cpu_flags": cpu_flags(), "cores": len(os.sched_getaffinity(0)),
              "load_before": os.getloadavg()}
    run_parts(args.only, {"pairs": lambda: bench_pairs([*map(int, filter(None, args.sizes.split(","))), args.vectors]),
                          "command": lambda: bench_command(args.work, args.vectors)}, report, args.out)


if __name__ == "__main__":
    main()
