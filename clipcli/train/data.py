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

Training reads through a *source*, :class:`PairSource` for these pairs and
:class:`clipcli.train.shards.ShardSource` for WebDataset shards (:func:`clipcli.train.sources.open_source` picks), with
one interface: ``steps_per_epoch``, ``samples_per_epoch``, ``dropped_per_epoch``, ``notes`` and
``batches(epoch, start)``, this rank's share of global batches ``start, start + 1, ...``. A
training transform is ``transform(image, generator)`` (:mod:`clipcli.train.augment`), and each
sample's generator is seeded by :func:`sample_seed` from the seed, the epoch and the sample's
position in the epoch, never from global state: the batches do not depend on the number of data
workers, and an epoch resumed at batch ``start`` gives exactly what the uninterrupted epoch gave.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import InputError

_MASK = (1 << 64) - 1


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, position, ...): splitmix64 over them, so that
    neighbouring positions get unrelated generators."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & _MASK)) & _MASK
        state = (state + 0x9E3779B97F4A7C15) & _MASK
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK
        state ^= state >> 31
    return state >> 1


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded by :func:`sample_seed` of ``parts``."""
    return torch.Generator().manual_seed(sample_seed(*parts))


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


def prepare_image(item, transform: Callable, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor | None, str | None]:
    """``(pixels, None)`` for an :class:`~clipcli.items.Item`'s image through ``transform``
    (called with ``generator`` when one is given), or ``(None, reason)`` when it cannot be read.

    The guarded decoding inference uses (no FIFOs, the pixel cap, EXIF orientation), at full
    size and in the file's own mode, converted after the crop as open_clip's training does."""
    from ..errors import ItemError
    from ..images import DecodeOptions, read_image

    try:
        image = read_image(item, DecodeOptions(exact=True))
        return (transform(image) if generator is None else transform(image, generator)), None
    except ItemError as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - one bad image must never end the training
        return None, f"cannot prepare image ({type(error).__name__}): {error}"


class PairDataset(torch.utils.data.Dataset):
    """``(image tensor, token ids)`` per pair, or ``(None, path, reason)`` for an unreadable image.

    An ``int`` key calls ``transform(image)``; an ``(index, seed)`` key (what :class:`SeededBatches`
    yields) calls a training transform, ``transform(image, generator)``, with a generator of that seed."""

    def __init__(self, pairs: Sequence[Pair], transform: Callable, context_length: int,
                 tokenize: CaptionTokenizer | None = None):
        self.pairs, self.transform, self.context_length = list(pairs), transform, context_length
        self.tokenize = tokenize or CaptionTokenizer(context_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]):
        from ..items import Item

        index, seed = key if isinstance(key, tuple) else (key, None)
        pair = self.pairs[index]
        path = str(pair.image)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        pixels, reason = prepare_image(Item(name=path, path=path), self.transform, generator)
        if pixels is None:
            return None, path, reason
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
    """This rank's slice of each shuffled global batch; the same order on every rank. ``start``
    (set before iterating) skips the epoch's first global batches, for a resumed epoch."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if batch_size % world_size:
            raise InputError(f"{batch_size} is the global batch; it must divide by the {world_size} processes",
                             option="batch_size")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.epoch, self.start = seed, shuffle, drop_last, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps(self) -> int:
        """Global batches in a whole epoch."""
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def shares(self) -> Iterator[list[tuple[int, int]]]:
        """This rank's ``[(position in the epoch's order, pair index)]`` of each global batch from ``start``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        local = self.batch_size // self.world_size
        for b in range(self.start, self.steps):
            first = b * self.batch_size
            batch = order[first : first + self.batch_size]
            share = -(-len(batch) // self.world_size) if len(batch) < self.batch_size else local
            begin = self.rank * share
            yield [(first + begin + j, index) for j, index in enumerate(batch[begin : begin + share])]

    def __iter__(self) -> Iterator[list[int]]:
        for share in self.shares():
            yield [index for _, index in share]


class SeededBatches(GlobalBatches):
    """:class:`GlobalBatches` whose keys carry each sample's transform seed: ``(pair index,
    sample_seed(seed, epoch, position))``, the same on any rank and with any number of workers."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for share in self.shares():
            yield [(index, sample_seed(self.seed, self.epoch, position)) for position, index in share]


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


# ----------------------------------------------------------------------------- sources


class PairSource:
    """Training batches from pairs (a CSV/TSV file or a folder): this rank's slice of each shuffled
    global batch (:class:`SeededBatches`), decoded by ``workers`` DataLoader processes (kept from
    epoch to epoch). With ``drop_last`` the pairs that do not fill a last global batch are left out
    of the epoch (others next epoch: the order is shuffled again); without it the last batch is smaller."""

    def __init__(self, pairs: Sequence[Pair], transform: Callable, tokenize: CaptionTokenizer | None,
                 context_length: int, batch_size: int, rank: int, world_size: int, seed: int, workers: int,
                 drop_last: bool = True):
        if len(pairs) < batch_size:
            raise InputError(f"{batch_size} is more than the {len(pairs)} pairs to train on", option="batch_size")
        self.dataset = PairDataset(pairs, transform, context_length, tokenize)
        self.sampler = SeededBatches(len(pairs), batch_size, rank, world_size, seed, drop_last=drop_last)
        self.workers = workers
        self.steps_per_epoch = self.sampler.steps
        self.dropped_per_epoch = len(pairs) % batch_size if drop_last else 0
        self.samples_per_epoch = len(pairs) - self.dropped_per_epoch
        self.notes: list[str] = []
        self._loader: torch.utils.data.DataLoader | None = None

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's share of global batches ``start, start + 1, ...`` of ``epoch``."""
        if self._loader is None:
            self._loader = loader(self.dataset, self.sampler, self.workers)
        self.sampler.start = start
        self.sampler.set_epoch(epoch)
        yield from self._loader
