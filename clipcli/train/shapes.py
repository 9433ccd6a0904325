"""A synthetic image-caption set for checking that training learns: coloured shapes on noise.

Every image is one shape (circle, square or triangle) in one colour (red, green, blue or
yellow), small or big, at a random place on a noisy background; its caption says so in one of
a few phrasings ("a red circle", "a photo of a small blue square"). The zero-shot split has
one folder per colour-shape class ("red_circle"), as ``clipcli train --zeroshot-dir`` and
``clipcli classify`` expect.

    python -m clipcli.train.shapes DATA_DIR [--train 1200] [--test 240] [--size 32] [--txt]

``--txt`` also writes each caption beside its image (``train/00000.txt``): a folder of captioned
images, as ``clipcli train --train-data DIR`` and ``examples/make_shards.py`` read it.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
PHRASES = ("a {size}{colour} {shape}", "a photo of a {size}{colour} {shape}.", "a {size}{colour} {shape} on a noisy background")


def classes() -> list[str]:
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def draw(colour: str, shape: str, big: bool, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    image = noise.point(lambda v: 60 + v * 140 // 255)  # mid-grey noise, so every colour stands out
    radius = size * (rng.uniform(0.3, 0.4) if big else rng.uniform(0.16, 0.24))
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    pen = ImageDraw.Draw(image)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def caption(colour: str, shape: str, big: bool, rng: random.Random) -> str:
    size = rng.choice(["", "big " if big else "small "])
    return rng.choice(PHRASES).format(size=size, colour=colour, shape=shape)


def make_dataset(root: str | Path, train: int = 1200, test: int = 240, size: int = 32, seed: int = 0,
                 txt: bool = False) -> Path:
    """Write ``train.csv`` + ``val.csv`` (columns ``filepath``, ``title``) and ``zeroshot/<class>/``."""
    root = Path(root)
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["filepath", "title"])
            for i in range(count):
                colour, shape, big = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.random() < 0.5
                name = f"{split}/{i:05d}.png"
                draw(colour, shape, big, size, rng).save(root / name)
                text = caption(colour, shape, big, rng)
                writer.writerow([name, text])
                if txt:
                    (root / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    for k in range(test):
        colour, shape = list(COLOURS)[k % len(COLOURS)], SHAPES[(k // len(COLOURS)) % len(SHAPES)]
        folder = root / "zeroshot" / f"{colour}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        draw(colour, shape, rng.random() < 0.5, size, rng).save(folder / f"{k:05d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic coloured-shapes image-caption set.")
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--test", type=int, default=240)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--txt", action="store_true", help="also write each caption beside its image")
    args = parser.parse_args()
    make_dataset(args.root, args.train, args.test, args.size, args.seed, args.txt)


if __name__ == "__main__":
    main()
