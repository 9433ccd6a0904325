"""One optimizer step: forward, loss, backward, clipping and the update, over one batch or over
K micro-batches accumulated into one (``--accum-freq``).

**The objective** (:func:`objective`). Each rank holds the features of its rows. The contrastive
loss is either computed whole on every rank, from every rank's features gathered, or, with
``local_loss``, in parts: each rank its own rows against every rank's columns, logits ``n x N``
instead of ``N x N`` (open_clip's ``--local-loss --gather-with-grad``). The sigmoid loss is
always computed in parts (each rank's images against every caption passed round the ring), so
``local_loss`` changes nothing there. A part is back-propagated times the world size: the
parts' gradients, averaged over the ranks by DistributedDataParallel, are the one-process
gradient (see :mod:`clipcli.train.distributed`).

**Accumulation** (open_clip's ``--accum-freq``). A contrastive or sigmoid loss does not split
into a sum over micro-batches: every row is a negative for every other row of the batch. So,
to take the step of one batch K times larger while keeping only one micro-batch's activations:

1. every micro-batch runs forward without gradients and only its features are kept (``(n, D)``
   each; BatchNorm's running statistics are put back, so that each micro-batch moves them once);
2. then, for each micro-batch ``j``: forward again with gradients, its fresh features put in
   place of its kept ones, the loss of the *whole* accumulated batch, backward. Only micro-batch
   ``j``'s features carry gradients, so pass ``j`` back-propagates ``dL/dF_j``; summed over the
   passes that is ``dL/dtheta`` of the whole batch, for every encoder weight.

The temperature and the bias enter the loss directly, in every pass: they keep their gradient
in the last pass only (detached in the others), so it is counted once. open_clip keeps it in
every pass, which makes their gradients K times too large (``train.py``'s ``train_one_epoch``;
Adam's update hides most of that, gradient clipping does not). Under DistributedDataParallel
the passes before the last run in ``no_sync``: gradients add up locally and are averaged once.

The price: one more forward pass per micro-batch without gradients (about a third more compute
than K plain steps) and the features of the whole batch. One exception to the exactness: a
BatchNorm (ResNet image towers) normalises each micro-batch by its own statistics, as in open_clip,
so a ResNet's accumulated step is close to, not equal to, the K-times batch's. With K = 1 the
step is the plain one: one forward, one backward.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..errors import ClipcliError
from ..models.checkpointing import buffers_kept
from . import distributed
from .loss import contrastive_loss, contrastive_loss_part, sigmoid_loss_part

MicroBatch = tuple[torch.Tensor, torch.Tensor, list[int]]  # images, token ids, every rank's rows of it


def autocast(precision: str, device: torch.device):
    """Mixed precision by inference's table (:data:`clipcli.precision.PRECISIONS`); fp32: off."""
    from ..precision import resolve_dtype

    dtype = resolve_dtype(precision, device)
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _at_least_float(x: torch.Tensor) -> torch.Tensor:
    """The loss in float32 at least: autocast's half-precision features are widened, float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def objective(loss: str, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, sizes: list[int], world_size: int, device: torch.device, *,
              local_loss: bool = False, measure: bool = True) -> tuple[torch.Tensor, float | None]:
    """``(what this rank back-propagates, the loss of the global batch)`` from this rank's
    normalised features (``sizes``: every rank's rows). ``measure=False`` skips the loss's value
    (None; no synchronisation). contrastive: every rank computes the same global loss from the
    gathered features, or with ``local_loss`` its own part; sigmoid: always its own part
    (``local_loss`` is a no-op). A part counts ``world_size`` times: DistributedDataParallel
    averages the ranks' gradients, and the parts' gradients must add up."""
    image_features, text_features, scale = map(_at_least_float, (image_features, text_features, scale))
    if loss == "sigmoid" or local_loss:
        if loss == "sigmoid":
            part = sigmoid_loss_part(image_features, text_features, scale, _at_least_float(bias), sizes)
        else:
            part = contrastive_loss_part(image_features, text_features, scale, sizes)
        return part * world_size, distributed.all_sum(part.item(), device) if measure else None
    image_features = distributed.gather_rows(image_features, sizes)
    text_features = distributed.gather_rows(text_features, sizes)
    whole = contrastive_loss(image_features, text_features, scale)
    return whole, whole.item() if measure else None


def _no_sync(network: torch.nn.Module):
    """DistributedDataParallel's ``no_sync`` (gradients add up locally); nothing for a plain module."""
    return network.no_sync() if hasattr(network, "no_sync") else nullcontext()


def _check_finite(value: float, step: int | None) -> None:
    if not math.isfinite(value):
        where = f" at step {step}" if step is not None else ""
        raise ClipcliError(f"the loss became {value}{where}", fix="lr")


def _backward(network, micro_batches: list[MicroBatch], loss: str, precision: str, device: torch.device,
              world_size: int, scaler, local_loss: bool, step: int | None) -> float:
    """Forward and backward over the micro-batches (accumulated as the module docstring says);
    the loss of the whole batch."""
    if len(micro_batches) == 1:  # the plain step: nothing cached, nothing recomputed
        images, texts, sizes = micro_batches[0]
        with autocast(precision, device):
            features = network(images, texts)
        loss_tensor, value = objective(loss, *features, sizes, world_size, device, local_loss=local_loss)
        _check_finite(value, step)
        scaler.scale(loss_tensor).backward()
        return value

    pair = getattr(network, "module", network)  # the cached pass needs no DistributedDataParallel hooks
    cached_images, cached_texts = [], []
    with torch.no_grad(), autocast(precision, device), buffers_kept(pair):
        for images, texts, _ in micro_batches:
            image_features, text_features, _, _ = pair(images, texts)
            cached_images.append(_at_least_float(image_features))
            cached_texts.append(_at_least_float(text_features))
    totals = [sum(batch[2][r] for batch in micro_batches) for r in range(len(micro_batches[0][2]))]
    last = len(micro_batches) - 1
    for j, (images, texts, _) in enumerate(micro_batches):
        with nullcontext() if j == last else _no_sync(network):
            with autocast(precision, device):
                image_features, text_features, scale, bias = network(images, texts)
            if j != last:  # the temperature and bias: their gradient once, in the last pass
                scale, bias = scale.detach(), None if bias is None else bias.detach()
            image_features = torch.cat(cached_images[:j] + [_at_least_float(image_features)] + cached_images[j + 1:])
            text_features = torch.cat(cached_texts[:j] + [_at_least_float(text_features)] + cached_texts[j + 1:])
            loss_tensor, measured = objective(loss, image_features, text_features, scale, bias, totals, world_size,
                                              device, local_loss=local_loss, measure=j == 0)
            if j == 0:
                value = measured
                _check_finite(value, step)
            scaler.scale(loss_tensor).backward()
    return value


def train_step(network: torch.nn.Module, clip: torch.nn.Module, micro_batches: list[MicroBatch], *, loss: str,
               precision: str, device: torch.device, world_size: int, optimizer, scaler, grad_clip: float,
               local_loss: bool = False, step: int | None = None) -> tuple[float, float]:
    """One optimizer step over ``K = len(micro_batches)`` micro-batches (images, token ids, and
    every rank's row count of that micro-batch, from :func:`clipcli.train.distributed.gather_sizes`):
    zero the gradients, forward and backward (K > 1: accumulated so that the step is the one of
    the K-times batch, see the module docstring), unscale, clip the gradient norm at ``grad_clip``
    (0: no clipping), the optimizer's and the gradient scaler's step. ``network`` is
    :class:`~clipcli.train.loss.PairModel` of ``clip``, or DistributedDataParallel of it.
    ``local_loss``: each rank computes its own rows' part of the contrastive loss (no effect on
    the sigmoid loss, computed in parts anyway). Micro-batches with no rows on any rank are left
    out; at least one must have rows. Returns the loss of the whole global batch and the gradient
    norm before clipping. A loss that is not finite raises :class:`~clipcli.errors.ClipcliError`
    (naming ``step`` when given) before any gradient is computed."""
    micro_batches = [batch for batch in micro_batches if sum(batch[2])]
    if not micro_batches:
        raise ValueError("train_step needs rows: every micro-batch is empty on every rank")
    rank = distributed.rank()
    for images, _, sizes in micro_batches:
        if len(sizes) != world_size or sizes[rank] != len(images):
            raise ValueError(f"a micro-batch of {len(images)} rows on rank {rank} with sizes {sizes}")
    optimizer.zero_grad(set_to_none=True)
    value = _backward(network, micro_batches, loss, precision, device, world_size, scaler, local_loss, step)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(clip.parameters(), grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    return value, float(grad_norm)
