"""The CLIP objective: symmetric cross-entropy over the N x N cosine-similarity logits.

Row ``i`` of ``logits = scale * image_features @ text_features.T`` should pick column ``i``
(image -> its caption) and column ``i`` should pick row ``i`` (caption -> its image); the loss
is the mean of the two cross-entropies. ``scale = exp(logit_scale)`` is learned, starts at
1/0.07 and is clamped at 100 after every step (:data:`MAX_LOGIT_SCALE`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; features ``(N, D)`` are L2-normalised."""
    logits = scale * image_features @ text_features.t()  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class ContrastiveModel(nn.Module):
    """CLIP behind one ``forward`` (what DistributedDataParallel hooks): normalised features and scale."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = self.clip.encode_image(images, normalize=True)
        text_features = self.clip.encode_text(texts, normalize=True)
        return image_features, text_features, self.clip.logit_scale.exp()


@torch.no_grad()
def clamp_logit_scale(clip: nn.Module) -> None:
    clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
