"""Pack a folder of captioned images (cat.jpg + cat.txt) into WebDataset shards for `clipcli train`.

    python examples/make_shards.py FOLDER OUT_DIR [--per-shard 1000]

Writes OUT_DIR/00000.tar, 00001.tar, ...: each image with its caption under one key, members
sorted by key (WebDataset reads a shard as a stream and needs each sample's files side by
side), and OUT_DIR/sizes.json with each shard's sample count (what `--train-num-samples`
defaults to). Images without a same-named .txt are left out and counted. img2dataset writes
the same layout from a list of URLs.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

IMAGES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def pairs(folder: Path) -> tuple[list[tuple[Path, Path]], int]:
    found, missing = [], 0
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGES and p.is_file()):
        caption = image.with_suffix(".txt")
        if caption.is_file():
            found.append((image, caption))
        else:
            missing += 1
    return found, missing


def write_shards(folder: Path, out: Path, per_shard: int) -> dict[str, int]:
    found, missing = pairs(folder)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for number, start in enumerate(range(0, len(found), per_shard)):
        name = f"{number:05d}.tar"
        with tarfile.open(out / name, "w") as shard:
            for index, (image, caption) in enumerate(found[start : start + per_shard], start):
                key = f"{index:09d}"
                shard.add(image, arcname=key + image.suffix.lower())
                shard.add(caption, arcname=key + ".txt")
        sizes[name] = len(found[start : start + per_shard])
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    print(f"{len(found)} pairs in {len(sizes)} shards in {out}" + (f"; {missing} images without a caption left out" if missing else ""))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args()
    write_shards(args.folder, args.out, args.per_shard)


if __name__ == "__main__":
    main()
