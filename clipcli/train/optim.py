"""AdamW with CLIP's parameter groups, and linear warmup followed by cosine decay.

The recipe is open_clip_train's (``main.py`` and ``params.py``), which follows the CLIP paper:

- weight decay on every tensor of two or more dimensions, the token and position embeddings
  included; never on gains, biases, other vectors, or the temperature and bias of the logits. ``decay_embeddings=False``
  exempts the embeddings too (what clipcli did before, wrongly calling it CLIP's);
- Adam's betas and epsilon by architecture: (0.9, 0.98) and 1e-6 for ViT image towers (the
  paper's, for stability at large batch), PyTorch's (0.9, 0.999) and 1e-8 for the rest (ResNets,
  ConvNeXts, Mixers), as open_clip chooses them by model name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

VIT_ADAM = (0.9, 0.98, 1e-6)
OTHER_ADAM = (0.9, 0.999, 1e-8)


def default_adam(vit: bool) -> tuple[float, float, float]:
    """``(beta1, beta2, eps)`` for a model whose image tower is (or is not) a ViT."""
    return VIT_ADAM if vit else OTHER_ADAM


def exempt_from_weight_decay(name: str, parameter: torch.Tensor, decay_embeddings: bool = True) -> bool:
    """Tensors of fewer than two dimensions (gains, biases, CLIP's class embedding) and the
    logits' scale and bias are not decayed, as open_clip decides by ``ndim``; nor are the
    embeddings when ``decay_embeddings`` is False."""
    if parameter.ndim < 2 or name.endswith(("logit_scale", "logit_bias")):
        return True
    return not decay_embeddings and "embedding" in name


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=VIT_ADAM[:2], eps: float = VIT_ADAM[2],
                    decay_embeddings: bool = True) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            exempt = exempt_from_weight_decay(name, parameter, decay_embeddings)
            (no_decay if exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate multiplier of step ``step`` (0-based): linear from 1/warmup to 1, then a
    half cosine down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
