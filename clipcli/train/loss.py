"""The two training objectives over a batch's L2-normalised image and text features ``(N, D)``.

``contrastive`` (CLIP): symmetric cross-entropy over the N x N logits
``scale * image_features @ text_features.T``. Row ``i`` should pick column ``i`` (image -> its
caption) and column ``i`` should pick row ``i`` (caption -> its image); the loss is the mean
of the two cross-entropies. ``scale = exp(logit_scale)`` is learned and starts at 1/0.07.

``sigmoid`` (SigLIP, Zhai et al. 2023): every image-caption pair of the batch is its own
binary question, "do these two belong together?", with no softmax over the batch. With
``logits = scale * image_features @ text_features.T + bias`` and labels +1 on the diagonal
and -1 elsewhere, the loss is ``-sum(logsigmoid(labels * logits)) / N`` (open_clip's
``SigLipLoss``). The learned bias starts at -10 and the scale at 10 (:data:`SIGMOID_START`):
the N^2 - N negative pairs then start near probability 0 and do not swamp the N positives.
Since no pair's term depends on another's, the sum splits into blocks, one per pair of
ranks (:func:`sigmoid_loss_part`), and no rank needs every feature at once.

Under ``torchrun`` the contrastive loss is computed either whole on every rank (the N x N
logits of the gathered features) or, with ``local_loss``, in parts: each rank its own rows
against every rank's columns (:func:`contrastive_loss_part`, n x N logits), as the sigmoid loss
always is.

Both clamp the scale at 100 after every step (:data:`MAX_LOGIT_SCALE`), as open_clip does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("contrastive", "sigmoid")
MAX_LOGIT_SCALE = math.log(100.0)
SIGMOID_START = {"logit_scale": math.log(10.0), "logit_bias": -10.0}  # SigLIP's initialisation


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; features ``(N, D)`` are L2-normalised."""
    logits = scale * image_features @ text_features.t()  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def contrastive_loss_part(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                          sizes: list[int]) -> torch.Tensor:
    """This rank's part of :func:`contrastive_loss` of the global batch (``sizes``: every rank's
    rows): the cross-entropies of its own rows only, its images against every rank's captions and
    its captions against every rank's images (logits ``(n, N)``, not ``(N, N)``), summed over
    ``2 N``. The parts of all ranks sum to the loss of the whole batch; the gathered features
    carry gradients back to their ranks (open_clip's ``--local-loss --gather-with-grad``). In one
    process this is :func:`contrastive_loss`."""
    from .distributed import gather_rows, rank

    all_images, all_texts = gather_rows(image_features, sizes), gather_rows(text_features, sizes)  # (N, D)
    start = sum(sizes[: rank()])
    labels = torch.arange(start, start + image_features.shape[0], device=image_features.device)
    per_image = F.cross_entropy(scale * image_features @ all_texts.t(), labels, reduction="sum")  # (n, N) logits
    per_text = F.cross_entropy(scale * text_features @ all_images.t(), labels, reduction="sum")  # (n, N) logits
    return (per_image + per_text) / (2 * sum(sizes))


def sigmoid_pair_sum(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor, positives: bool = True) -> torch.Tensor:
    """``-sum(logsigmoid(labels * logits))`` over one block of pairs, images ``(N, D)`` against
    texts ``(M, D)``. ``positives``: pair ``i`` of the block's diagonal matches (label +1
    there); else every pair is a negative (another rank's captions)."""
    logits = scale * image_features @ text_features.t() + bias  # (N, M)
    labels = -torch.ones_like(logits)
    if positives:
        labels = labels + 2 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum()


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss on one batch: every pair's negative log-likelihood, summed, over ``N``."""
    return sigmoid_pair_sum(image_features, text_features, scale, bias) / image_features.shape[0]


def sigmoid_loss_part(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """This rank's part of the sigmoid loss of the global batch (``sizes``: every rank's rows):
    its images against its own captions (the positives on the diagonal) and against every
    other rank's captions, passed round the ring of ranks one neighbour at a time (all
    negatives; :func:`clipcli.train.distributed.rows_round_the_ring`). The parts of all ranks
    sum to :func:`sigmoid_loss` of one process on the whole batch; gradients reach each
    caption's own rank back round the ring. In one process this is :func:`sigmoid_loss`."""
    from .distributed import rows_round_the_ring

    total = sigmoid_pair_sum(image_features, text_features, scale, bias)
    for others in rows_round_the_ring(text_features, sizes):
        total = total + sigmoid_pair_sum(image_features, others, scale, bias, positives=False)
    return total / sum(sizes)


class PairModel(nn.Module):
    """The model behind one ``forward`` (what DistributedDataParallel hooks): normalised
    features, the scale and the bias (None for a model without one). It uses only the surface
    every model family shares (``encode_image``, ``encode_text``, ``logit_scale``, ``logit_bias``)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        image_features = self.clip.encode_image(images, normalize=True)
        text_features = self.clip.encode_text(texts, normalize=True)
        return image_features, text_features, self.clip.logit_scale.exp(), self.clip.logit_bias


@torch.no_grad()
def clamp_logit_scale(clip: nn.Module) -> None:
    clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
