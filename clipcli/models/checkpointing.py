"""Gradient checkpointing: a block's activations are not kept for the backward pass, which runs
the block again (``torch.utils.checkpoint``): about a third more compute for much less memory.

The towers' block loops (CLIP's and SigLIP's Transformers, ModifiedResNet's stages, Mixers,
torchvision trunks) carry a ``grad_checkpointing`` flag that
:meth:`~clipcli.models.clip.DualEncoder.set_grad_checkpointing` switches; :func:`recomputes`
says whether a loop checkpoints now and :func:`checkpointed` runs one block that way.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def recomputes(blocks: nn.Module) -> bool:
    """Whether a block loop (a module with ``grad_checkpointing``, switched on by
    :meth:`DualEncoder.set_grad_checkpointing`) recomputes its blocks: only while training with
    gradients, so inference runs exactly as without."""
    return blocks.grad_checkpointing and blocks.training and torch.is_grad_enabled()


@contextmanager
def buffers_kept(module: nn.Module):
    """Put every buffer of ``module`` back as it was (BatchNorm's running mean and variance)."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


def checkpointed(block: nn.Module, *args):
    """``block(*args)`` keeping none of its activations: the backward pass runs the block again
    (``torch.utils.checkpoint``, non-reentrant), trading one more forward for the memory. The
    buffers the second run would move again (BatchNorm's running statistics) are put back, so
    they move once per step as without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(block, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), buffers_kept(block)))
