"""Training batches from WebDataset shards: streamed, split over processes and data workers.

The shards (``shards/{00000..00999}.tar``, globs, several patterns joined by ``::`` as open_clip
takes them) are read by :func:`clipcli.webdataset.samples`, the reader ``encode`` uses: an image
and a caption (the ``.txt`` member, or another extension) per sample. Nothing is held but a
shuffle buffer of undecoded samples per reader.

How the reading is split, so that results do not depend on who reads what
--------------------------------------------------------------------------
There are ``S = processes x max(1, workers)`` reading *slots*; rank ``r`` owns slots
``r*K .. r*K+K-1`` (``K = max(1, workers)``), one per data worker. Each epoch the shard list is
shuffled (seeded by seed and epoch) and slot ``s`` reads shards ``s, s+S, s+2S, ...`` of it, in
a loop if the epoch takes more samples than they hold; with resampling, slot ``s`` instead draws
shards with replacement from a generator seeded by (seed, epoch, s). A slot passes its samples
through a seeded shuffle buffer of :data:`SHUFFLE_BUFFER` undecoded samples.

Global batch ``b`` is the concatenation, over slots ``s = 0 .. S-1``, of the slot's next ``n_s``
samples (``n_s = B // S``, one more for ``s < B % S``); a sample that cannot be used (no image,
no caption, undecodable) counts as read and is left out, reported in ``Batch.skipped``. Rank
``r``'s batch is its own slots' parts in slot order, so one process with two workers gives the
very batches of two processes with one worker each, and sample ``p`` of slot ``s`` is augmented
with a generator seeded by (seed, epoch, s, p) whoever decodes it. Resuming at batch ``start``
reads (without decoding) and drops ``start * n_s`` samples per slot, then goes on exactly as the
uninterrupted epoch did.

An epoch is ``samples // B`` batches (the rest is ``dropped_per_epoch``), where ``samples`` is
``num_samples`` (open_clip's ``--train-num-samples``) if given, else what ``sizes.json`` in the
shards' folder (open_clip's: ``{"00000.tar": 1000, ...}``) or img2dataset's ``00000_stats.json``
(its ``successes``) beside each shard says, else one pass over the shards' tar headers counts.
Resampling needs ``num_samples`` or the sizes files. A shard that cannot be read stops the run
(:class:`clipcli.webdataset.ShardError`); damage inside one is a skipped sample.
"""

from __future__ import annotations

import json
import random
import tarfile
import zlib
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..display import display
from ..errors import ClipcliError, InputError
from ..webdataset import SHARD, Sample, ShardError, _split, expand_shards, samples
from .data import Batch, CaptionTokenizer, generator_for, prepare_image, sample_seed

SHUFFLE_BUFFER = 1000  # undecoded samples per slot (open_clip's shard shuffle buffer is 5,000, per worker)
SIZES_FILE, STATS_SUFFIX = "sizes.json", "_stats.json"
_ORDER, _DRAWS, _BUFFER, _PIXELS = range(4)  # what a seed is for, so that the streams never coincide


# ----------------------------------------------------------------------------- shard names and sizes


def shard_list(patterns: str) -> list[str]:
    """The shard files ``patterns`` names: :func:`clipcli.webdataset.expand_shards` of each
    ``::``-separated pattern, in order, without repeats."""
    return expand_shards([pattern for pattern in patterns.split("::") if pattern.strip()])


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"cannot read {display(str(path))}: {error}; fix or delete it") from None


def _sizes_json(folder: Path, cache: dict) -> dict:
    if folder not in cache:
        path = folder / SIZES_FILE
        sizes = _read_json(path) if path.is_file() else {}
        if not (isinstance(sizes, dict) and all(isinstance(v, int) and v >= 0 for v in sizes.values())):
            raise InputError(f"{display(str(path))} must map shard names to sample counts, "
                             '{"00000.tar": 1000, ...}; fix or delete it')
        cache[folder] = sizes
    return cache[folder]


def _stats_json(shard: Path) -> int | None:
    path = shard.with_name(SHARD.sub("", shard.name) + STATS_SUFFIX)
    if not path.is_file():
        return None
    successes = _read_json(path)
    successes = successes.get("successes") if isinstance(successes, dict) else None
    if not (isinstance(successes, int) and successes >= 0):
        raise InputError(f"{display(str(path))} has no sample count (\"successes\"), as img2dataset writes it")
    return successes


def known_sizes(shards: list[str]) -> list[int | None]:
    """Each shard's number of samples as ``sizes.json`` in its folder or its img2dataset
    ``_stats.json`` says (the former first), None where neither does."""
    cache: dict = {}
    sizes = []
    for shard in map(Path, shards):
        size = _sizes_json(shard.parent, cache).get(shard.name)
        sizes.append(size if size is not None else _stats_json(shard))
    return sizes


def count_samples(shard: str) -> int:
    """How many samples :func:`clipcli.webdataset.samples` gives for ``shard``, from its tar
    headers alone (an uncompressed shard's data is skipped by seeking, never read)."""
    number, key = 0, None
    try:
        with tarfile.open(shard) as archive:
            for member in archive:
                if not member.isfile() or member.name.rpartition("/")[2].startswith("."):
                    continue
                member_key = _split(member.name)[0]
                if member_key != key:
                    number, key = number + 1, member_key
    except (tarfile.TarError, EOFError, zlib.error):
        number += 1  # samples() gives one error sample where the damage starts
    except OSError as error:
        raise ShardError(f"cannot read shard {display(shard)}: {error.strerror or error}") from None
    return number


# ----------------------------------------------------------------------------- one slot's stream


@dataclass(frozen=True)
class _Plan:
    """Everything a slot needs to read an epoch (sent to data workers)."""

    shards: tuple[str, ...]
    slots: int
    parts: tuple[int, ...]  # n_s: samples slot s gives to each global batch
    steps: int
    seed: int
    resampled: bool
    caption_key: str
    transform: Callable
    tokenize: CaptionTokenizer
    buffer: int


def epoch_order(shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shuffled shard order (indices), the same on every rank."""
    return torch.randperm(shards, generator=generator_for(seed, epoch, _ORDER)).tolist()


def slot_shards(plan: _Plan, epoch: int, slot: int) -> list[str]:
    """The shards ``slot`` reads in one pass of ``epoch`` (without resampling): ``slot, slot + S, ...``
    of the epoch's order. The slots' lists are disjoint and together hold every shard."""
    return [plan.shards[i] for i in epoch_order(len(plan.shards), plan.seed, epoch)[slot :: plan.slots]]


def _samples_of(shards: Iterable[str], caption_key: str, pool: set[str]) -> Iterator[tuple[str, Sample]]:
    """``(shard, sample)`` of each of ``shards`` in turn, undecoded. Reading every shard of ``pool``
    in a row without finding a sample is an error (else a slot would read forever)."""
    empty: set[str] = set()
    for shard in shards:
        found = False
        for sample in samples(shard, caption=caption_key):
            found = True
            yield shard, sample
        if found:
            empty.clear()
            continue
        empty.add(shard)
        if empty >= pool:
            names = ", ".join(display(name) for name in sorted(pool)[:3]) + (", ..." if len(pool) > 3 else "")
            raise InputError(f"the shards {names} hold no samples")


def _shuffled(stream: Iterable, size: int, rng: random.Random) -> Iterator:
    """``stream`` through a shuffle buffer of ``size`` items: each new item takes the place of a random one."""
    buffer: list = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def _slot_stream(plan: _Plan, epoch: int, slot: int) -> Iterator[tuple[str, Sample]]:
    """What ``slot`` reads in ``epoch``, endlessly, shuffled by its buffer: resampled, shards drawn with
    replacement; else passes over :func:`slot_shards`, each through the buffer and emptied at its end,
    so that a pass gives every sample of the slot's shards once."""
    rng = random.Random(sample_seed(plan.seed, epoch, slot, _BUFFER))
    if plan.resampled:
        generator = generator_for(plan.seed, epoch, slot, _DRAWS)
        draws = (plan.shards[int(torch.randint(len(plan.shards), (1,), generator=generator))] for _ in count())
        yield from _shuffled(_samples_of(draws, plan.caption_key, set(plan.shards)), plan.buffer, rng)
        return
    mine = slot_shards(plan, epoch, slot)
    while True:
        yield from _shuffled(_samples_of(mine, plan.caption_key, set(mine)), plan.buffer, rng)


def _sample_name(shard: str, sample: Sample) -> str:
    return sample.key if sample.key.startswith(shard) else f"{shard}:{sample.key}"


def _part(plan: _Plan, chunk: list[tuple[str, Sample]], epoch: int, slot: int, first: int) -> Batch:
    """One slot's part of a global batch: samples ``first, first + 1, ...`` of its stream, decoded."""
    images, captions, skipped = [], [], []
    for position, (shard, sample) in enumerate(chunk, start=first):
        name = _sample_name(shard, sample)
        if sample.item.error:
            skipped.append((name, str(sample.item.error)))
            continue
        if not sample.caption:
            skipped.append((name, f"no caption (a .{plan.caption_key} member) in this sample"))
            continue
        pixels, reason = prepare_image(sample.item, plan.transform,
                                       generator_for(plan.seed, epoch, slot, position, _PIXELS))
        if pixels is None:
            skipped.append((name, reason))
        else:
            images.append(pixels)
            captions.append(sample.caption)
    if not images:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack(images), plan.tokenize(captions), skipped)


def slot_batches(plan: _Plan, epoch: int, slot: int, start: int = 0) -> Iterator[Batch]:
    """``slot``'s parts of global batches ``start ..`` of ``epoch``: the first ``start`` parts'
    samples are read and dropped undecoded."""
    stream = _slot_stream(plan, epoch, slot)
    size = plan.parts[slot]
    for _ in islice(stream, start * size):
        pass
    for step in range(start, plan.steps):
        yield _part(plan, list(islice(stream, size)), epoch, slot, step * size)


def _join(parts: list[Batch]) -> Batch:
    """A rank's batch: its slots' parts, in slot order."""
    skipped = [entry for part in parts for entry in part.skipped]
    full = [part for part in parts if len(part.images)]
    if not full:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.cat([p.images for p in full]), torch.cat([p.texts for p in full]), skipped)


@dataclass
class WorkerFailure:
    """An error raised in a data worker, handed to the main process to raise there as itself
    (training's shard readers here, evaluation's in :mod:`clipcli.train.evaluate`)."""

    error: ClipcliError


class _SlotReader(torch.utils.data.IterableDataset):
    """Data worker ``k`` reads slot ``slots[k]``; the DataLoader hands the parts over round-robin."""

    def __init__(self, plan: _Plan, epoch: int, start: int, slots: tuple[int, ...]):
        super().__init__()
        self.plan, self.epoch, self.start, self.slots = plan, epoch, start, slots

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        slot = self.slots[worker.id if worker is not None else 0]
        try:
            yield from slot_batches(self.plan, self.epoch, slot, self.start)
        except ClipcliError as error:  # raised in the main process as it is, not as a worker's traceback
            yield WorkerFailure(error)


def _unchanged(part):
    return part


# ----------------------------------------------------------------------------- the source


class ShardSource:
    """Training batches from WebDataset shards (see the module docstring); the interface of
    :class:`clipcli.train.data.PairSource`."""

    def __init__(self, patterns: str, transform: Callable, tokenize: CaptionTokenizer | None, context_length: int,
                 batch_size: int, rank: int, world_size: int, seed: int, workers: int,
                 num_samples: int | None = None, resampled: bool = False, caption_key: str = "txt"):
        per_rank = max(1, workers)
        slots = world_size * per_rank
        if batch_size < slots:
            raise InputError(f"{batch_size} is smaller than the {slots} shard readers ({world_size} process(es) x "
                             f"{per_rank} data worker(s)), each of which gives every batch a sample; use fewer "
                             "data workers or a larger batch", option="batch_size")
        self.shards = shard_list(patterns)
        if not resampled and len(self.shards) < slots:
            raise InputError(f"{patterns} names {len(self.shards)} shard(s), fewer than the {slots} shard readers "
                             f"({world_size} process(es) x {per_rank} data worker(s)), each of which reads whole "
                             "shards; use fewer data workers or processes, more shards, or resampling", option="workers")
        if num_samples is not None and num_samples < 1:
            raise InputError(f"{num_samples}: give a positive number of samples per epoch", option="train_num_samples")
        self.notes: list[str] = []
        sizes = known_sizes(self.shards)
        if num_samples is None and None in sizes:
            if resampled:
                raise InputError(f"resampling {patterns} needs the number of samples per epoch (the shards have no "
                                 f"{SIZES_FILE} or {STATS_SUFFIX} files to sum)", option="train_num_samples")
            unknown = [i for i, size in enumerate(sizes) if size is None]
            for i in unknown:
                sizes[i] = count_samples(self.shards[i])
            self.notes.append(f"counted {sum(sizes[i] for i in unknown):,} samples in {len(unknown):,} shard(s) from "
                              f"their tar headers (no {SIZES_FILE} or *{STATS_SUFFIX} beside them)")
        self.samples_per_epoch = num_samples if num_samples is not None else sum(sizes)
        self.steps_per_epoch = self.samples_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            raise InputError(f"{batch_size} is more than the {self.samples_per_epoch:,} samples per epoch of "
                             f"{patterns}", option="batch_size")
        self.dropped_per_epoch = self.samples_per_epoch - self.steps_per_epoch * batch_size
        parts = tuple(batch_size // slots + (s < batch_size % slots) for s in range(slots))
        self._plan = _Plan(tuple(self.shards), slots, parts, self.steps_per_epoch, seed, resampled,
                           caption_key.lower().lstrip("."),
                           transform, tokenize or CaptionTokenizer(context_length), SHUFFLE_BUFFER)
        self.rank_slots = tuple(range(rank * per_rank, (rank + 1) * per_rank))
        self.workers = workers
        if not resampled and None not in sizes:
            self._note_rereading(sizes)

    def _note_rereading(self, sizes: list[int]) -> None:
        """A note when a slot's shards hold fewer samples than the first epoch takes from it."""
        plan = self._plan
        order = epoch_order(len(plan.shards), plan.seed, 0)
        short = [s for s in range(plan.slots)
                 if sum(sizes[i] for i in order[s :: plan.slots]) < plan.steps * plan.parts[s]]
        if short:
            why = ("the samples per epoch are more than the shards hold" if self.samples_per_epoch > sum(sizes)
                   else "the shards differ in size")
            self.notes.append(f"{len(short)} of {plan.slots} shard readers hold fewer samples than an epoch takes "
                              f"from each ({why}): they read their shards again within the epoch")

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's share of global batches ``start, start + 1, ...`` of ``epoch``."""
        if start >= self.steps_per_epoch:
            return
        if self.workers <= 0:
            streams = [slot_batches(self._plan, epoch, slot, start) for slot in self.rank_slots]
            for parts in zip(*streams):
                yield _join(list(parts))
            return
        reader = _SlotReader(self._plan, epoch, start, self.rank_slots)
        parts: list[Batch] = []
        for part in torch.utils.data.DataLoader(reader, batch_size=None, num_workers=self.workers,
                                                collate_fn=_unchanged):
            if isinstance(part, WorkerFailure):
                raise part.error
            parts.append(part)
            if len(parts) == len(self.rank_slots):
                yield _join(parts)
                parts = []
