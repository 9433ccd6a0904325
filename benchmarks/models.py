"""Speed of each registry architecture on this machine, with random weights (README's
"Choosing a model" table).

For every architecture: build it from the registry's config with CLIP's random
initialisation, then time ``encode_image`` (random inputs at the architecture's resolution,
batch 8, or 2 for those over 900M parameters) and ``encode_text`` (77-token context, batch 64 prompts of CLIP-template length)
for at least ``--budget`` seconds each after one warm-up batch (a SigLIP's text: 64 rows of its
whole context, which it always runs; ``--arch siglip`` names its architectures). Speeds do not depend on the
weights' values. Writes ``benchmarks/results/models-<label>.json`` and prints a Markdown table.

    python benchmarks/models.py --threads 2 [--precision fp32|bf16] [--arch ViT-B-32 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import environment  # noqa: E402  (the shared machine description)

import clipcli  # noqa: E402
from clipcli.models.clip import CLIPConfig  # noqa: E402
from clipcli.models.factory import create_model  # noqa: E402
from clipcli.models.registry import architecture_hints, parameters  # noqa: E402

ARCHITECTURES = ("RN50", "RN50x4", "ViT-B-32", "ViT-B-32-256", "ViT-B-16", "ViT-L-14", "ViT-L-14-336",
                 "ViT-H-14", "ViT-H-14-378", "ViT-g-14", "ViT-bigG-14")
SIGLIP_ARCHITECTURES = ("ViT-B-32-SigLIP2-256", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP-i18n-256",
                        "ViT-L-16-SigLIP-256", "ViT-SO400M-14-SigLIP", "ViT-SO400M-14-SigLIP-384",
                        "ViT-SO400M-16-SigLIP2-256")
PROMPTS = [f"a photo of a {word}, a type of animal." for word in ("cat", "dog", "horse", "tiger")] * 16


def rate(run, count: int, budget: float) -> float:
    run()  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        run()
        done += count
        elapsed = time.perf_counter() - start
        if elapsed >= budget and done >= 2 * count:
            return done / elapsed


def measure(arch: str, dtype: torch.dtype, budget: float) -> dict:
    config = CLIPConfig(**architecture_hints(arch))
    torch.manual_seed(0)
    start = time.perf_counter()
    model = create_model(config).to(dtype).eval()
    built = time.perf_counter() - start
    batch = 2 if parameters(arch) > 900e6 else 8
    images = torch.randn(batch, 3, config.image_resolution, config.image_resolution, dtype=dtype)
    if config.tokenizer == "clip" and config.context_length == 77:
        tokens = clipcli.tokenize(PROMPTS)
    else:  # a SigLIP runs its whole context whatever the text: ids of the full length, as padded
        tokens = torch.randint(1, config.vocab_size, (len(PROMPTS), config.context_length))
    with torch.inference_mode():
        image_rate = rate(lambda: model.encode_image(images), batch, budget)
        text_rate = rate(lambda: model.encode_text(tokens), len(tokens), budget)
    return {"arch": arch, "parameters": parameters(arch), "resolution": config.image_resolution,
            "image_batch": batch, "images_per_s": round(image_rate, 3), "prompts_per_s": round(text_rate, 2),
            "build_s": round(built, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--label", default="cpu")
    args = parser.parse_args()
    if args.arch == ["siglip"]:
        args.arch = list(SIGLIP_ARCHITECTURES)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    report = {"environment": environment(), "precision": args.precision, "rows": []}
    for arch in args.arch:
        row = measure(arch, dtype, args.budget)
        gc.collect()  # the model of the last architecture is gone before the next is built
        report["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = Path(__file__).parent / "results" / f"models-{args.label}-{args.precision}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("| architecture | parameters | resolution | images/s | prompts/s |")
    print("|---|---:|---:|---:|---:|")
    for row in report["rows"]:
        print(f"| {row['arch']} | {row['parameters'] / 1e6:,.0f}M | {row['resolution']} | "
              f"{row['images_per_s']:.2f} | {row['prompts_per_s']:.1f} |")


if __name__ == "__main__":
    main()
