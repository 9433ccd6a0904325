"""AdamW with CLIP's parameter groups, and linear warmup followed by cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def exempt_from_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Gains, biases, embeddings and the temperature are not decayed (as in CLIP)."""
    return parameter.ndim < 2 or "embedding" in name or name.endswith("logit_scale")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if exempt_from_weight_decay(name, parameter) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate multiplier: linear from 1/warmup to 1, then a half cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
