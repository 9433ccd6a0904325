"""Where the time goes: torch.profiler tables for clipcli's image and text towers.

    python benchmarks/profile_towers.py CHECKPOINT [--batch 32] [--dtype fp32|bf16] [--text]

Prints the operators by self CPU time for a few forward passes on random inputs (images) or
on the benchmark's short prompts (``--text``), plus the share of time spent in matrix products.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--text", action="store_true", help="profile encode_text on short prompts")
    parser.add_argument("--reference", action="store_true", help="profile OpenAI's clip instead")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.reference and args.dtype == "bf16")
    if args.reference:
        import clip

        model, _ = clip.load(args.checkpoint, device="cpu", jit=False)
        tokenize, to = clip.tokenize, torch.float32
    else:
        import clipcli

        model, _ = clipcli.load(args.checkpoint, device="cpu", dtype=dtype)
        tokenize, to = clipcli.tokenize, dtype
    if args.text:
        from run import build_prompts

        prompts = build_prompts(200)[: args.batch]
        tokens = tokenize(prompts)

        def step():
            return model.encode_text(tokens)
    else:
        res = model.visual.input_resolution
        images = torch.randn(args.batch, 3, res, res).to(to)

        def step():
            return model.encode_image(images)

    with torch.inference_mode(), autocast:
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in averages)
    matmul = sum(e.self_cpu_time_total for e in averages if e.key in ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
                                                                      "aten::_scaled_dot_product_flash_attention_for_cpu",
                                                                      "aten::mkldnn_convolution", "aten::matmul", "aten::linear"))
    print(f"matrix products: {100 * matmul / total:.0f}% of {total / 1e3 / args.steps:.0f} ms per step")


if __name__ == "__main__":
    main()
