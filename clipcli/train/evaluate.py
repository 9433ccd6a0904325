"""Evaluation during training: retrieval recall@K on held-out pairs and zero-shot accuracy.

Retrieval: image ``i`` and caption ``i`` form a pair. Image-to-text recall@K is the fraction of
images whose own caption is among the K most similar captions; text-to-image the converse.
Zero-shot: a folder with one sub-folder per class ("red_circle" reads "red circle"); each class
name goes into the prompt templates and every image is assigned the most similar class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import InputError
from .data import CaptionTokenizer, GlobalBatches, Pair, PairDataset, SkipReporter, folder_images, loader

RECALL_AT = (1, 5, 10)


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """``image_to_text_R@K`` and ``text_to_image_R@K`` for paired rows of normalised features."""
    similarity = image_features @ text_features.t()  # (N, N)
    truth = torch.arange(similarity.shape[0])
    metrics = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        rank = (scores > scores[truth, truth][:, None]).sum(dim=1)  # how many beat the true pair
        for k in ks:
            metrics[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return metrics


@torch.no_grad()
def encode_pairs(clip, dataset: PairDataset, batch_size: int, device: torch.device, workers: int = 0,
                 skips: SkipReporter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = [], []
    batches = GlobalBatches(len(dataset), batch_size, shuffle=False, drop_last=False)
    for batch in loader(dataset, batches, workers):
        if skips is not None:
            skips(batch.skipped)
        if len(batch.images):
            images.append(clip.encode_image(batch.images.to(device), normalize=True).float().cpu())
            texts.append(clip.encode_text(batch.texts.to(device), normalize=True).float().cpu())
    if not images:  # every image was unreadable
        return torch.empty(0), torch.empty(0)
    return torch.cat(images), torch.cat(texts)


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


@torch.no_grad()
def zeroshot_accuracy(clip, folder: str | Path, transform: Callable, templates: Sequence[str], device: torch.device,
                      batch_size: int = 64, workers: int = 0, skips: SkipReporter | None = None,
                      tokenize: CaptionTokenizer | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy of ``clip`` on the class folders under ``folder`` (``tokenize``:
    the model's tokenizer, CLIP's BPE when not given). With a sigmoid model the ranking is the
    same: its scale is positive and its bias the same for every class."""
    from ..zeroshot import build_classifier, prompts

    classes = zeroshot_classes(folder)
    if not classes:
        return {}
    names = [name for name, _ in classes]
    tokenize = tokenize or CaptionTokenizer(clip.context_length)
    tokens = tokenize(prompts(names, templates))
    text = clip.encode_text(tokens.to(device), normalize=True).float().cpu()  # (C*T, D)
    classifier = build_classifier(text, len(templates))  # (C, D): the same classifier `classify` builds
    pairs = [Pair(path, name) for name, paths in classes for path in paths]
    truth = torch.tensor([i for i, (_, paths) in enumerate(classes) for _ in paths])
    dataset = PairDataset(pairs, transform, clip.context_length, tokenize)
    kept, features = [], []
    batches = GlobalBatches(len(dataset), batch_size, shuffle=False, drop_last=False)
    for start, batch in zip(range(0, len(dataset), batch_size), loader(dataset, batches, workers)):
        if skips is not None:
            skips(batch.skipped)
        bad = {path for path, _ in batch.skipped}
        kept += [i for i in range(start, min(start + batch_size, len(dataset))) if str(pairs[i].image) not in bad]
        if len(batch.images):
            features.append(clip.encode_image(batch.images.to(device), normalize=True).float().cpu())
    if not features:
        return {}
    scores = torch.cat(features) @ classifier.t()  # (N, C)
    truth = truth[kept]
    top = scores.topk(min(5, len(names)), dim=1).indices
    return {
        "top1": float((top[:, 0] == truth).float().mean()),
        "top5": float((top == truth[:, None]).any(dim=1).float().mean()),
        "images": len(truth),
        "classes": len(names),
    }
