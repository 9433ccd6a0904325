"""Evaluation during training: retrieval recall@K on held-out pairs and zero-shot accuracy, on
every rank's share of the data, gathered.

Retrieval: image ``i`` and caption ``i`` form a pair. Image-to-text recall@K is the fraction of
images whose own caption is among the K most similar captions; text-to-image the converse.
The pairs come from a CSV/TSV file or a folder (:func:`clipcli.train.data.read_pairs`) or from
WebDataset shards (an image and its ``.txt`` caption per sample, :mod:`clipcli.webdataset`).
Zero-shot: a folder with one sub-folder per class ("red_circle" reads "red circle"); each class
name goes into the prompt templates and every image is assigned the most similar class.

Every rank encodes its own share and the features are gathered, so that the metrics cover the
whole set and equal a one-process evaluation:

- a table or folder of N pairs: rank ``r`` of ``W`` takes pairs ``r, r + W, r + 2W, ...``;
- shards: every rank reads every shard in order (reading is cheap, decoding is not), sample
  ``p`` of shard ``s`` belongs to rank ``(s + p) % W``; a rank's data workers take whole shards.

Each row carries its index in the data (``s << 32 | p`` for a shard's sample), so after the
gather the rows are sorted back into the data's order, whatever the split: the gathered
features are those of one process, up to the float rounding of other batch compositions.
An image that cannot be decoded (or a shard sample without caption) is skipped and reported by
the rank whose share it is; a shard that cannot be read at all stops the evaluation
(:class:`clipcli.webdataset.ShardError`), as it stops ``encode``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from ..errors import InputError
from .data import CaptionTokenizer, Pair, SkipReporter, folder_images, prepare_image, read_pairs
from .shards import WorkerFailure

RECALL_AT = (1, 5, 10)
_SHARD_BITS = 32  # a shard sample's index: shard number << 32 | position in the shard


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor,
                ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """``image_to_text_R@K`` and ``text_to_image_R@K`` for paired rows of normalised features."""
    similarity = image_features @ text_features.t()  # (N, N)
    truth = torch.arange(similarity.shape[0])
    metrics = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        rank = (scores > scores[truth, truth][:, None]).sum(dim=1)  # how many beat the true pair
        for k in ks:
            metrics[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return metrics


def zeroshot_classes(folder: str | Path) -> list[tuple[str, list[Path]]]:
    """``[(class name, its images)]`` from one sub-folder per class, sorted by folder name."""
    classes = []
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: no such folder (expected one sub-folder of images per class)")
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        images = folder_images(sub)
        if images:
            classes.append((sub.name.replace("_", " "), images))
    return classes


def val_source(val_data: str, img_key: str = "filepath", caption_key: str = "title") -> list[Pair] | list[str]:
    """What ``val_data`` names: the shard files of a shard pattern (``val/{00000..00003}.tar``),
    else the pairs of a CSV/TSV file or folder. Raises :class:`InputError` for a missing shard,
    table or folder, or one without pairs: call it before training starts."""
    from ..webdataset import expand_shards, is_shards

    if is_shards([val_data]):
        return expand_shards([val_data])
    return read_pairs(val_data, img_key, caption_key)


# ----------------------------------------------------------------------------- what a rank reads


def _prepared(index: int, item, transform: Callable, payload, name: str) -> tuple:
    """``(index, pixels, payload, name, None)``, or ``(index, None, payload, name, reason)``."""
    pixels, reason = prepare_image(item, transform)  # the decoding training uses, on inference's transform
    return index, pixels, payload, name, reason


class _Files(torch.utils.data.Dataset):
    """Image files with their payloads (a caption or a class number) and their indices in the data."""

    def __init__(self, entries: Sequence[tuple[int, Path, object]], transform: Callable):
        self.entries, self.transform = list(entries), transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple:
        from ..items import Item

        index, path, payload = self.entries[i]
        return _prepared(index, Item(name=str(path), path=str(path)), self.transform, payload, str(path))


class _ShardPairs(torch.utils.data.IterableDataset):
    """This rank's samples of ``shards`` (see the module docstring), as (image, caption) pairs."""

    def __init__(self, shards: Sequence[str], transform: Callable, rank: int, world_size: int):
        self.shards, self.transform, self.rank, self.world_size = list(shards), transform, rank, world_size

    def __iter__(self) -> Iterator:
        from ..webdataset import ShardError, samples

        worker = torch.utils.data.get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for number in range(first, len(self.shards), step):
            shard = self.shards[number]
            try:
                for position, sample in enumerate(samples(shard)):
                    if (number + position) % self.world_size != self.rank:
                        continue
                    index, name = number << _SHARD_BITS | position, f"{shard}:{sample.key}"
                    if sample.item.error is None and not sample.caption:
                        yield index, None, None, name, "no caption in this sample (a .txt member)"
                    else:
                        yield _prepared(index, sample.item, self.transform, sample.caption, name)
            except ShardError as error:  # raised in the main process, as itself (see _batches)
                yield WorkerFailure(error)
                return


@dataclass
class _Batch:
    indices: list[int]
    images: torch.Tensor  # (B, 3, H, W) of the readable images only
    payloads: list
    skipped: list[tuple[str, str]]


def _collate(items: list) -> _Batch | WorkerFailure:
    fatal = next((item for item in items if isinstance(item, WorkerFailure)), None)
    if fatal is not None:
        return fatal
    good = [item for item in items if item[1] is not None]
    skipped = [(item[3], item[4]) for item in items if item[1] is None]
    images = torch.stack([item[1] for item in good]) if good else torch.empty(0)
    return _Batch([item[0] for item in good], images, [item[2] for item in good], skipped)


def _batches(dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
             skips: SkipReporter | None) -> Iterator[_Batch]:
    """The readable part of each batch; the skipped images go to ``skips``."""
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate):
        if isinstance(batch, WorkerFailure):
            raise batch.error
        if skips is not None:
            skips(batch.skipped)
        if batch.indices:
            yield batch


# ----------------------------------------------------------------------------- gathering


def _spread(world_size: int) -> bool:
    """Whether the ranks' shares must be gathered (several ranks, in a process group)."""
    import torch.distributed as dist

    if world_size <= 1:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"evaluating on {world_size} ranks needs torch.distributed initialised")
    return True


def _in_data_order(indices: list[torch.Tensor], features: list[list[torch.Tensor]], device: torch.device,
                   world_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every rank's rows: their ``indices`` and each of ``features`` (float ``(rows, D)`` blocks),
    gathered and sorted by index, on the CPU. A rank without rows still joins the gathers."""
    from .distributed import gather_rows, gather_sizes

    index = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)
    parts = [torch.cat(blocks) if blocks else None for blocks in features]
    if _spread(world_size):
        sizes = gather_sizes(len(index), device)
        widths = [max(gather_sizes(part.shape[1] if part is not None else 0, device)) for part in parts]
        parts = [part if part is not None else torch.zeros(0, width, device=device)  # the width, from the others
                 for part, width in zip(parts, widths)]
        if sum(sizes):
            index = gather_rows(index.to(device), sizes)
            parts = [gather_rows(part, sizes) for part in parts]
    parts = [part if part is not None else torch.empty(0) for part in parts]
    order = index.cpu().argsort()
    return index.cpu()[order], [part.cpu()[order] for part in parts]


# ----------------------------------------------------------------------------- the metrics


def _no_autocast() -> ContextManager:
    return contextlib.nullcontext()


@torch.no_grad()
def retrieval_recall(clip, source: Sequence[Pair] | Sequence[str], transform: Callable, tokenize: CaptionTokenizer,
                     device: torch.device, *, batch_size: int = 64, workers: int = 0,
                     skips: SkipReporter | None = None, precision_ctx: Callable[[], ContextManager] = _no_autocast,
                     rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Recall@1/5/10 both ways (:func:`recall_at_k`) and ``pairs`` (how many were readable) over
    ``source`` (:func:`val_source`: pairs, or shard files), every rank encoding its share;
    ``{}`` when no image could be read. A collective: every rank calls it."""
    if source and isinstance(source[0], Pair):
        share = [(i, pair.image, pair.caption) for i, pair in enumerate(source) if i % world_size == rank]
        dataset = _Files(share, transform)
    else:
        dataset = _ShardPairs(source, transform, rank, world_size)
    indices, images, texts = [], [], []
    for batch in _batches(dataset, batch_size, workers, skips):
        with precision_ctx():
            images.append(clip.encode_image(batch.images.to(device), normalize=True).float())
            texts.append(clip.encode_text(tokenize(batch.payloads).to(device), normalize=True).float())
        indices.append(torch.tensor(batch.indices, dtype=torch.long))
    _, (images, texts) = _in_data_order(indices, [images, texts], device, world_size)
    if not len(images):  # every image was unreadable
        return {}
    return {**recall_at_k(images, texts), "pairs": len(images)}


@torch.no_grad()
def zeroshot_accuracy(clip, folder: str | Path, transform: Callable, templates: Sequence[str], device: torch.device,
                      batch_size: int = 64, workers: int = 0, skips: SkipReporter | None = None,
                      tokenize: CaptionTokenizer | None = None, *,
                      precision_ctx: Callable[[], ContextManager] = _no_autocast, rank: int = 0,
                      world_size: int = 1) -> dict[str, float]:
    """Top-1/top-5 accuracy of ``clip`` on the class folders under ``folder`` (``tokenize``:
    the model's tokenizer, CLIP's BPE when not given), every rank classifying its share of the
    images; a collective. With a sigmoid model the ranking is the same: its scale is positive
    and its bias the same for every class."""
    from ..zeroshot import build_classifier, prompts

    classes = zeroshot_classes(folder)
    if not classes:
        return {}
    names = [name for name, _ in classes]
    tokenize = tokenize or CaptionTokenizer(clip.context_length)
    with precision_ctx():  # every rank builds the whole classifier: C * T prompts are few
        text = clip.encode_text(tokenize(prompts(names, templates)).to(device), normalize=True).float().cpu()
    classifier = build_classifier(text, len(templates))  # (C, D): the same classifier `classify` builds
    images = [(path, label) for label, (_, paths) in enumerate(classes) for path in paths]
    share = [(i, path, label) for i, (path, label) in enumerate(images) if i % world_size == rank]
    indices, features = [], []
    for batch in _batches(_Files(share, transform), batch_size, workers, skips):
        with precision_ctx():
            features.append(clip.encode_image(batch.images.to(device), normalize=True).float())
        indices.append(torch.tensor(batch.indices, dtype=torch.long))
    index, (features,) = _in_data_order(indices, [features], device, world_size)
    if not len(features):
        return {}
    truth = torch.tensor([images[i][1] for i in index.tolist()])
    scores = features @ classifier.t()  # (N, C)
    top = scores.topk(min(5, len(names)), dim=1).indices
    return {
        "top1": float((top[:, 0] == truth).float().mean()),
        "top5": float((top == truth[:, None]).any(dim=1).float().mean()),
        "images": len(truth),
        "classes": len(names),
    }


def evaluate(clip, *, val_data: str | None, zeroshot_dir: str | None, templates: Sequence[str], transform: Callable,
             tokenize: CaptionTokenizer, device: torch.device, precision_ctx: Callable[[], ContextManager] | None,
             batch_size: int, workers: int, img_key: str = "filepath", caption_key: str = "title",
             skips: SkipReporter | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Recall@1/5/10 both ways on ``val_data`` (``val/image_to_text_R@1`` ... and ``val/pairs``)
    and zero-shot accuracy on ``zeroshot_dir`` (``zeroshot/top1``, ``top5``, ``images``,
    ``classes``), each rank encoding its share, ``batch_size`` images at a time.

    ``transform``: ``PIL image -> tensor``, inference's (:func:`clipcli.preprocess.preprocess_for`);
    ``precision_ctx``: a callable giving the autocast context to encode in (None: the model's
    own precision). Called on every rank (a collective); returns the same dict on every rank.
    The model is put in eval mode and every module's mode restored afterwards."""
    precision_ctx = precision_ctx or _no_autocast
    common = dict(batch_size=batch_size, workers=workers, skips=skips, precision_ctx=precision_ctx, rank=rank,
                  world_size=world_size)
    modes = [(module, module.training) for module in clip.modules()]  # a frozen tower may be kept in eval mode
    clip.eval()
    results = {}
    try:
        if val_data:
            source = val_source(val_data, img_key, caption_key)
            recall = retrieval_recall(clip, source, transform, tokenize, device, **common)
            results.update({f"val/{k}": v for k, v in recall.items()})
        if zeroshot_dir:
            accuracy = zeroshot_accuracy(clip, zeroshot_dir, transform, templates, device, tokenize=tokenize, **common)
            results.update({f"zeroshot/{k}": v for k, v in accuracy.items()})
    finally:
        for module, training in modes:
            module.training = training
    return results
