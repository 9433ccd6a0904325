"""Image-caption pairs from a CSV/TSV file or a folder, and the global-batch sampler.

Sources
-------
- A CSV or TSV file (tab-separated when the name ends in ``.tsv``/``.tab`` or the header
  holds a tab) with an image-path column and a caption column; relative paths are relative to
  the file's folder.
- A folder of images, each with a caption in a same-named ``.txt`` file beside it
  (``cat.jpg`` + ``cat.txt``), searched recursively.

An image that cannot be read is skipped and counted: :func:`collate` drops it from its batch
and reports it once on stderr (``skipping PATH: reason``); it is never fatal.

Batches are *global*: every rank draws the same shuffled order (seeded by seed and epoch) and
takes its own contiguous slice of each global batch, so N processes see exactly the batch one
process would.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


def _read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a BOM allowed), or one line saying what is wrong with it."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: the {what} is not UTF-8 (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None


def _table_pairs(path: Path, img_key: str, caption_key: str) -> list[Pair]:
    text = _read_text(path, "table")
    header = text.split("\n", 1)[0]
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in header else ","
    rows = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = rows.fieldnames or []
    missing = [key for key in (img_key, caption_key) if key not in columns]
    if missing:
        raise InputError(
            f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(columns) or 'none'})",
            fix="keys",
        )
    pairs = []
    for row in rows:
        image, caption = (row.get(img_key) or "").strip(), (row.get(caption_key) or "").strip()
        if image and caption:
            pairs.append(Pair(path.parent / image, caption))
    return pairs


def folder_images(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` as inference finds them (:func:`clipcli.items.walk_folder`:
    sorted, hidden entries skipped, symlink loops cut); unreadable entries left out."""
    from ..items import walk_folder
    from ..video import is_video

    return [Path(item.path) for item in walk_folder(str(folder))
            if item.error is None and item.path and not is_video(item.path)]  # videos are no captioned images


def _folder_pairs(folder: Path) -> list[Pair]:
    pairs = []
    for image in folder_images(folder):
        caption = image.with_suffix(".txt")
        if caption.is_file():
            pairs.append(Pair(image, _read_text(caption, "caption").strip()))
    return pairs


def read_pairs(source: str | Path, img_key: str = "filepath", caption_key: str = "title") -> list[Pair]:
    """Every (image path, caption) pair listed by a CSV/TSV file or found in a folder."""
    path = Path(source)
    if path.is_dir():
        pairs = _folder_pairs(path)
        hint = "images with same-named .txt captions"
    elif path.is_file() or (path.exists() and not path.is_dir()):  # a pipe (<(...)) is read as a table
        pairs = _table_pairs(path, img_key, caption_key)
        hint = f"rows with both {img_key!r} and {caption_key!r}"
    else:
        raise InputError(f"{path}: no such file or folder")
    if not pairs:
        raise InputError(f"{path} holds no image-caption pairs ({hint})")
    return pairs


class CaptionTokenizer:
    """Texts -> ``(N, context_length)`` token ids as the model reads them, long texts cut: the
    bundled CLIP BPE, or ``tokenizer``, the model's own (an object with ``encode_texts``, as
    :func:`clipcli.text.tokenizers.tokenizer_of` gives)."""

    def __init__(self, context_length: int, tokenizer=None):
        self.context_length, self.tokenizer = context_length, tokenizer

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            from ..text.bpe import tokenize

            return tokenize(list(texts), self.context_length, truncate=True)
        ids, _ = self.tokenizer.encode_texts(list(texts), context_length=self.context_length, truncate=True)
        return ids


def caption_tokenizer(model) -> CaptionTokenizer:
    """The tokenizer ``model`` was trained with (:func:`clipcli.text.tokenizers.tokenizer_of`)."""
    from ..text.tokenizers import tokenizer_of

    return CaptionTokenizer(model.context_length, tokenizer_of(model))


class PairDataset(torch.utils.data.Dataset):
    """``(image tensor, token ids)`` per pair, or ``(None, path, reason)`` for an unreadable image."""

    def __init__(self, pairs: Sequence[Pair], transform: Callable, context_length: int,
                 tokenize: CaptionTokenizer | None = None):
        self.pairs, self.transform, self.context_length = list(pairs), transform, context_length
        self.tokenize = tokenize or CaptionTokenizer(context_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from ..errors import ItemError
        from ..images import DecodeOptions, read_image
        from ..items import Item

        pair = self.pairs[index]
        path = str(pair.image)
        # The guarded decoding inference uses (no FIFOs, the pixel cap, EXIF orientation), at full
        # size and in the file's own mode, converted after the crop as open_clip's training does.
        try:
            pixels = self.transform(read_image(Item(name=path, path=path), DecodeOptions(exact=True)))
        except ItemError as error:
            return None, path, str(error)
        except Exception as error:  # noqa: BLE001 - one bad image must never end the training
            return None, path, f"cannot prepare image ({type(error).__name__}): {error}"
        return pixels, self.tokenize([pair.caption])[0]


@dataclass
class Batch:
    images: torch.Tensor
    texts: torch.Tensor
    skipped: list[tuple[str, str]]


def collate(items: list) -> Batch:
    good = [item for item in items if item[0] is not None]
    skipped = [(item[1], item[2]) for item in items if item[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), skipped)


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's slice of each shuffled global batch; the same order on every rank."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if batch_size % world_size:
            raise InputError(f"{batch_size} is the global batch; it must divide by the {world_size} processes",
                             option="batch_size")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.epoch = seed, shuffle, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        local = self.batch_size // self.world_size
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            share = -(-len(batch) // self.world_size) if len(batch) < self.batch_size else local
            yield batch[self.rank * share : (self.rank + 1) * share]


class SkipReporter:
    """Reports ``skipping PATH: reason`` once per image to ``log`` and counts the skipped images."""

    def __init__(self, log: Callable[[str], None] = lambda message: None):
        self.seen: set[str] = set()
        self.log = log

    def __call__(self, skipped: list[tuple[str, str]]) -> None:
        for path, reason in skipped:
            if path not in self.seen:
                self.seen.add(path)
                self.log(f"skipping {path}: {reason}")

    @property
    def count(self) -> int:
        return len(self.seen)


def loader(dataset: PairDataset, sampler: GlobalBatches, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                       persistent_workers=workers > 0)
