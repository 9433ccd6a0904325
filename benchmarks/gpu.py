"""clipcli on one CUDA GPU: model-only speed per architecture and precision, decoding alone,
and end to end (decode workers + model) in process and as a whole ``clipcli encode``;
decoding in worker threads against worker processes.

Random weights (speed does not depend on their values), synthetic JPEGs near 640x480 made
from the sample photos (``run.build_image_set``). Model-only rates time ``encode_image`` on
random inputs already on the GPU, batch 256 (64 for models over 900M parameters), and
``encode_text`` on 1,024 prompts, each for ``--budget`` seconds after two warm-up batches,
synchronising before the clock stops. "Decode only" runs the same pipeline
(:func:`clipcli.batching.embed_images`) with a model that does nothing, so it is the ceiling
that decoding puts on end-to-end speed.

    python benchmarks/gpu.py [--out results.json] [--images 3072] [--budget 2] [--skip-models]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_image_set, environment  # noqa: E402

import clipcli  # noqa: E402
from clipcli.batching import embed_images  # noqa: E402
from clipcli.items import expand_inputs  # noqa: E402
from clipcli.models.clip import CLIPConfig  # noqa: E402
from clipcli.models.factory import METADATA_KEY, create_model  # noqa: E402
from clipcli.models.registry import architecture_hints, parameters  # noqa: E402
from clipcli.pipeline import load_model  # noqa: E402
from clipcli.preprocess import preprocess_for  # noqa: E402
from clipcli.train.loop import save_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (architecture, precisions) for the model-only table
MODEL_RUNS = (("RN50", ("fp16",)), ("ViT-B-32", ("fp32", "fp16", "bf16")), ("ViT-B-16", ("fp16",)),
              ("ViT-L-14", ("fp16", "bf16")), ("ViT-L-14-336", ("fp16",)), ("ViT-H-14", ("fp16",)),
              ("ViT-bigG-14", ("fp16",)))
PROMPTS = [f"a photo of a {word}, a type of animal." for word in ("cat", "dog", "horse", "tiger")] * 256


def _timed(run, count: int, budget: float) -> float:
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while True:
        run()
        done += count
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= budget and done >= 3 * count:
            return done / elapsed


def random_model(arch: str) -> torch.nn.Module:
    """CLIP's random initialisation, done on the GPU (a CPU initialisation of bigG takes minutes)."""
    torch.manual_seed(0)
    model = create_model(CLIPConfig(**architecture_hints(arch)), initialize=False).to("cuda")
    model.initialize_parameters()
    return model


def rates(model: torch.nn.Module, batch: int, budget: float) -> dict:
    dtype, size = next(model.parameters()).dtype, model.config.image_resolution
    images = torch.randn(batch, 3, size, size, device="cuda", dtype=dtype)
    tokens = clipcli.tokenize(PROMPTS).cuda()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        image_rate = _timed(lambda: model.encode_image(images), batch, budget)
        text_rate = _timed(lambda: model.encode_text(tokens), len(tokens), budget)
    return {"batch": batch, "images_per_s": image_rate, "prompts_per_s": text_rate,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9}


def model_only(arch: str, precisions: tuple[str, ...], budget: float) -> list[dict]:
    rows, model = [], random_model(arch)
    for precision in precisions:
        row = {"arch": arch, "precision": precision,
               **rates(model.to(DTYPES[precision]).eval(), 64 if parameters(arch) > 900e6 else 256, budget)}
        rows.append(row)
        print(f"  {arch:13s} {precision}: {row['images_per_s']:8.0f} images/s  {row['prompts_per_s']:8.0f} prompts/s",
              flush=True)
    return rows


class NullModel:
    """A :class:`clipcli.batching.Runnable` whose model returns zeros: the pipeline's cost alone."""

    class _Model:
        def encode_image(self, x):
            return torch.ones(len(x), 512)

    def __init__(self, arch: str):
        config = CLIPConfig(**architecture_hints(arch))
        self.model, self.preprocess = self._Model(), preprocess_for(config)
        self.device, self.dtype, self.input_resolution = torch.device("cpu"), torch.float32, config.image_resolution

    def ensure(self, tower: str) -> None:
        pass


def pipeline_rate(loaded, items, batch: int, workers: int, processes: bool) -> float:
    """Images/s through :func:`embed_images`, the workers' start included."""
    list(embed_images(loaded, items[:batch], batch_size=batch, workers=workers))  # warm-up (cuDNN, allocator)
    start = time.perf_counter()
    run = embed_images(loaded, items, batch_size=batch, workers=workers, processes=processes)
    failed = sum(not r.ok for r in run)
    elapsed = time.perf_counter() - start
    assert failed == 0, f"{failed} images failed"
    return len(items) / elapsed


def cli_rate(checkpoint: Path, folder: Path, count: int, extra: list[str]) -> float:
    out = folder.parent / "cli-out.npy"
    command = [sys.executable, "-m", "clipcli", "encode", str(folder), "-m", str(checkpoint), "-o", str(out),
               "--overwrite", "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"clipcli encode failed: {done.stderr[-2000:]}")
    return count / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipcli-gpu-bench"))
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--skip-models", action="store_true", help="Leave out the model-only table.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    props = torch.cuda.get_device_properties(0)
    report = {"environment": environment(), "gpu": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                                                    "memory_gb": props.total_memory / 1e9, "cuda": torch.version.cuda}}
    print(json.dumps(report["gpu"]), flush=True)

    print("model only (random inputs on the GPU):", flush=True)
    report["model_only"] = [] if args.skip_models else [row for arch, precisions in MODEL_RUNS
                                                        for row in model_only(arch, precisions, args.budget)]

    # 256 distinct JPEGs, copied up to --images files: the same decode work as distinct files
    distinct = build_image_set(args.work / "distinct", 256, 640, 480, 85, seed=0)
    folder = args.work / "images"
    if not folder.is_dir() or len(list(folder.iterdir())) != args.images:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(args.images):
            os.link(distinct[i % len(distinct)], folder / f"{i:06d}.jpg")
    items = expand_inputs([str(folder)])
    cores = os.cpu_count() or 1
    worker_counts = sorted({4, 8, min(16, cores), cores})

    print(f"pipeline, {len(items)} JPEGs near 640x480, batch 256:", flush=True)
    report["decode_only"] = []
    for kind, counts in (("threads", (8, cores)), ("processes", worker_counts)):
        for workers in counts:
            rate = pipeline_rate(NullModel("ViT-B-32"), items, 256, workers, kind == "processes")
            report["decode_only"].append({"workers": workers, "kind": kind, "images_per_s": rate})
            print(f"  decode only, {workers:2d} {kind}: {rate:7.0f} images/s", flush=True)

    report["end_to_end"] = []
    checkpoints = {}
    for arch in ("ViT-B-32", "ViT-L-14"):
        checkpoints[arch] = args.work / f"{arch}.safetensors"
        model = random_model(arch).float().cpu()
        save_checkpoint(model, checkpoints[arch], {METADATA_KEY: model.config})
        del model
        loaded = load_model(str(checkpoints[arch]), device="cuda", precision="fp16", towers=("image",))
        runs = [(cores, False), *((n, True) for n in worker_counts)] if arch == "ViT-B-32" else [(min(16, cores), True)]
        for workers, processes in runs:
            kind = "processes" if processes else "threads"
            rate = pipeline_rate(loaded, items, 256, workers, processes)
            report["end_to_end"].append({"arch": arch, "precision": "fp16", "workers": workers, "kind": kind,
                                         "images_per_s": rate})
            print(f"  {arch} fp16 end to end, {workers:2d} {kind}: {rate:7.0f} images/s", flush=True)
        del loaded

    print("whole process, clipcli encode (interpreter start and model load included):", flush=True)
    report["cli"] = []
    for arch, extra in (("ViT-B-32", []), ("ViT-B-32", ["--batch-size", "256"]), ("ViT-L-14", ["--batch-size", "256"])):
        rate = cli_rate(checkpoints[arch], folder, len(items), extra)
        report["cli"].append({"arch": arch, "options": " ".join(extra) or "(defaults)", "images_per_s": rate})
        print(f"  {arch} {' '.join(extra) or '(defaults)'}: {rate:7.0f} images/s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
