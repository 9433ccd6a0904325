"""Decode throughput per photo format on this machine, one thread (issue 24's benchmark).

One picture (a crop of the sample photos, resized to ``--size``, mild noise for realistic
entropy) is written in each format by its own library: JPEG (quality 90), PNG, WebP (90),
AVIF and HEIC (pillow-heif / Pillow, quality 80), 16-bit TIFF, and a DNG (through the tests'
writer: a Bayer mosaic plus an embedded JPEG preview). Each is decoded as clipcli decodes it
for a 224-pixel model (``DecodeOptions(draft_size=448)``: a JPEG decoded at a reduced scale,
a RAW from its preview) and for the full image (``exact``: no reduced decode, a RAW
demosaiced), on one thread, best of ``--rounds`` timed loops of at least ``--budget`` seconds.
Videos: 10 s of 1080p H.264 at 30 frames a second (the picture panning), with a keyframe every
second (as phones record) and every 250 frames (x264's default); a frame is read as clipcli
reads one (:func:`clipcli.video.read_frame`: open, seek to the keyframe before, decode up to the
time), at 1-second steps; the rate is frames read per second (a frame decodes at full size for
both columns: there is no reduced decode of video).
Prints a Markdown table and writes ``--out`` (JSON with the machine's description).

    python benchmarks/formats.py [--size 4000x3000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from run import environment  # noqa: E402


def picture(width: int, height: int) -> Image.Image:
    source = Image.open(ROOT.parent / "tests" / "data" / "astronaut.png").convert("RGB")
    image = source.resize((width, height), Image.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def files(image: Image.Image) -> dict[str, bytes]:
    import pillow_heif
    from test_photo_formats import dng_bytes, mosaic

    out = {}
    for name, fmt, options in (("JPEG", "JPEG", {"quality": 90}), ("PNG", "PNG", {}), ("WebP", "WEBP", {"quality": 90}),
                               ("AVIF", "AVIF", {"quality": 80})):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out[name] = buffer.getvalue()
    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, format="HEIF", quality=80)
    out["HEIC"] = buffer.getvalue()
    buffer = io.BytesIO()
    wide = (np.asarray(image).astype(np.uint16) * 257)
    import tifffile

    tifffile.imwrite(buffer, wide, photometric="rgb")
    out["TIFF 16-bit"] = buffer.getvalue()
    preview = io.BytesIO()
    image.save(preview, "JPEG", quality=90)
    out["DNG"] = dng_bytes(mosaic(image.height, image.width), preview.getvalue())
    return out


def videos(image: Image.Image, folder: Path, seconds: int = 10, fps: int = 30) -> dict[str, Path]:
    """1080p H.264 MP4s of ``image`` panning, one per keyframe interval."""
    import av

    wide = np.asarray(image.resize((2400, 1350), Image.BICUBIC))
    out = {}
    for label, gop in (("H.264 1080p, keyframe 1 s", fps), ("H.264 1080p, keyframe 250", 250)):
        path = folder / f"pan-{gop}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt, stream.gop_size = 1920, 1080, "yuv420p", gop
            for i in range(seconds * fps):
                left = int(i * (2400 - 1920) / (seconds * fps))
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(wide[135:1215, left : left + 1920]), "rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        out[label] = path
    return out


def video_rate(path: Path, options, budget: float, rounds: int) -> float:
    from clipcli.video import frame_times, probe, read_frame

    times = frame_times(probe(str(path)).duration, 1.0)
    best = 0.0
    for _ in range(rounds):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget or done < 2:
            read_frame(str(path), times[done % len(times)], options)
            done += 1
        best = max(best, done / (time.perf_counter() - start))
    return best


def rate(data: bytes, name: str, options, budget: float, rounds: int) -> float:
    from clipcli.images import decode_image, pillow_limits

    best = 0.0
    with pillow_limits(options):
        decode_image(io.BytesIO(data), options, name=name)  # warm: imports, openers
        for _ in range(rounds):
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < budget or done < 2:
                decode_image(io.BytesIO(data), options, name=name)
                done += 1
            best = max(best, done / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/formats.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from clipcli.images import DecodeOptions

    width, height = map(int, args.size.split("x"))
    made = files(picture(width, height))
    rows = {}
    for fmt, data in made.items():
        name = "shot.dng" if fmt == "DNG" else f"shot.{fmt.split()[0].lower()}"
        rows[fmt] = {"bytes": len(data),
                     "model_per_s": rate(data, name, DecodeOptions(draft_size=448), args.budget, args.rounds),
                     "full_per_s": rate(data, name, DecodeOptions(exact=True), args.budget, args.rounds)}
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for label, path in videos(picture(width, height), Path(folder)).items():
            per_s = video_rate(path, DecodeOptions(draft_size=448), args.budget, args.rounds)
            rows[label] = {"bytes": path.stat().st_size, "model_per_s": per_s, "full_per_s": per_s}  # one decode
    result = {"environment": environment(), "size": args.size, "formats": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    jpeg = rows["JPEG"]
    print(f"| format ({args.size}) | size | for a 224 px model | vs JPEG | full image | vs JPEG |\n|---|---|---|---|---|---|")
    for fmt, row in rows.items():
        print(f"| {fmt} | {row['bytes'] / 2**20:.1f} MB | {row['model_per_s']:.2f}/s | "
              f"{row['model_per_s'] / jpeg['model_per_s']:.2f}x | {row['full_per_s']:.2f}/s | "
              f"{row['full_per_s'] / jpeg['full_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
