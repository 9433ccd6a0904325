"""Model-only speed of clipcli's towers against onnxruntime running clipcli's own ONNX export.

    python benchmarks/onnx_vs_torch.py [--batches 1 8 32] [--threads 2] [--rounds 3] [--towers image text]

ViT-B/32 with random weights (no download), float32 on the CPU, the same inputs for both, the
rounds interleaved (torch, onnxruntime, torch, ...) so that a noisy neighbour hurts both alike;
the best round of each is kept. Images are random pixels; texts are short prompts tokenized
to the full context (clipcli runs the text tower up to the batch's last end token, the ONNX
graph over the whole context: that is part of what is measured). Prints a Markdown table,
with the largest difference between the two outputs of each row.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
PROMPTS = ["a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}."]
LABELS = ["cat", "dog", "golden retriever", "fire truck", "espresso", "mountain bike", "lighthouse", "harbour seal"]


def best_time(step, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--towers", nargs="+", choices=("image", "text"), default=["image", "text"])
    args = parser.parse_args()

    import onnxruntime

    import clipcli
    from clipcli.models.config import CLIPConfig
    from clipcli.models.factory import create_model
    from clipcli.models.onnx_export import OPSET, OnnxFiles, export_onnx

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(CLIPConfig(**VIT_B_32)).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        export_onnx(model, Path(folder) / "vit-b-32.onnx")
        exported = time.perf_counter() - started
        files = OnnxFiles.of(Path(folder) / "vit-b-32.onnx")
        sessions = {tower: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for tower, path in (("image", files.visual), ("text", files.text))}

    print(f"ViT-B/32 random weights, float32, {args.threads} threads, best of {args.rounds} interleaved rounds; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, opset {OPSET}; "
          f"{platform.processor() or platform.machine()}; export took {exported:.1f} s\n")
    print("| tower | batch | clipcli (torch) /s | onnxruntime /s | onnxruntime / clipcli | max diff |")
    print("|---|---:|---:|---:|---:|---:|")
    prompts = [p.format(label) for label in LABELS for p in PROMPTS]
    generator = torch.Generator().manual_seed(0)
    for tower in args.towers:
        for batch in args.batches:
            if tower == "image":
                x = torch.randn(batch, 3, 224, 224, generator=generator)
                feed = {"pixels": x.numpy()}

                def ours(x=x):
                    return model.encode_image(x, normalize=True)
            else:
                x = clipcli.tokenize([prompts[i % len(prompts)] for i in range(batch)])
                feed = {"input_ids": x.numpy()}

                def ours(x=x):
                    return model.encode_text(x, normalize=True)
            session = sessions[tower]

            def theirs(session=session, feed=feed):
                return session.run(None, feed)[0]

            with torch.inference_mode():
                diff = float(np.abs(ours().numpy() - theirs()).max())  # also the warm-up
                torch_times, ort_times = [], []
                for _ in range(args.rounds):
                    torch_times += best_time(ours, 1)
                    ort_times += best_time(theirs, 1)
            a, b = batch / min(torch_times), batch / min(ort_times)
            print(f"| {tower} | {batch} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
