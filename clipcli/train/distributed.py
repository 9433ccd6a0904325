"""Multi-process training under ``torchrun``: process group set-up, a differentiable all-gather
and a differentiable pass round the ring of ranks.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` reads them and
joins the group (gloo on CPU, nccl on CUDA). Each rank encodes its shard of the global batch,
then :func:`gather_rows` concatenates every rank's features so that the contrastive loss
sees the whole global batch, as in the CLIP paper.

Why the backward is an all-reduce: every rank computes the same global loss ``L``, so each
rank's gradient of the gathered features is the same ``dL/dF``; rank ``r`` keeps the rows of
its own shard. DistributedDataParallel then *averages* parameter gradients over the ``W``
ranks, so we sum (not average) the feature gradients across ranks first; the average of
``W * dL/dF_r`` back-propagated through each rank's encoder is exactly the one-process
gradient. The temperature's direct gradient is identical on every rank and averages to itself.

With ``local_loss`` each rank computes only its own part of the contrastive loss, its rows
against every rank's columns (:func:`clipcli.train.loss.contrastive_loss_part`); the parts sum
to ``L``. The backward is the same sum over ranks: rank ``r``'s features get the sum of every
part's gradient, and this rank's part, scaled by ``W``, is averaged by DistributedDataParallel
into the one-process gradient.

The sigmoid loss needs no gathering: :func:`rows_round_the_ring` passes each rank's caption
features to its right-hand neighbour ``W - 1`` times (open_clip's "neighbour exchange"), so
every rank meets every caption while holding only two ranks' rows, and the gradient of a
passed block travels back to the left. Each rank's loss is then its own part of the global
loss (its images against every caption); scaled by ``W``, DistributedDataParallel's average
of the parts' gradients is the one-process gradient again.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from ..topology import Topology, from_environment


def setup(device: str) -> tuple[Topology, torch.device]:
    """Join the torchrun process group when there is one; the device this rank computes on."""
    from ..pipeline import resolve_device

    topology = from_environment()
    resolved = resolve_device(device)  # cuda:LOCAL_RANK under torchrun
    if not topology.distributed:
        return topology, resolved
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return topology, resolved


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 may still be evaluating and saving
        dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        padded = x.new_zeros((max(sizes),) + x.shape[1:])  # ranks may hold fewer rows (skipped images)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])  # (sum(sizes), ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks; see the module docstring
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def rank() -> int:
    """This process's rank; 0 in one process."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    size = torch.tensor([rows], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's rows of ``x`` in rank order, with gradients flowing back to each rank's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    return _GatherRows.apply(x, sizes)


def _exchange(x: torch.Tensor, to: int, source: int) -> torch.Tensor:
    """Send ``x`` to rank ``to`` while receiving a tensor of the same shape from ``source``."""
    received = torch.empty_like(x)
    operations = [dist.P2POp(dist.isend, x.contiguous(), to), dist.P2POp(dist.irecv, received, source)]
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


class _PassRight(torch.autograd.Function):
    """To the next rank, from the previous one; the gradient goes the other way round."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        ctx.previous, ctx.next = (rank - 1) % world, (rank + 1) % world
        return _exchange(x, to=ctx.next, source=ctx.previous)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _exchange(grad, to=ctx.previous, source=ctx.next)


def rows_round_the_ring(x: torch.Tensor, sizes: list[int]) -> Iterator[torch.Tensor]:
    """Every other rank's rows of ``x``, one rank after another: after ``k`` passes to the right
    this rank holds rank ``rank - k``'s rows (``sizes[rank - k]`` of them). Nothing in one
    process. Blocks travel padded to the largest share, so a rank whose images were all
    unreadable still takes part (every rank must make the same exchanges, forward and back)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    passed = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0],) + x.shape[1:])])  # (max(sizes), D)
    for step in range(1, world):
        passed = _PassRight.apply(passed)
        yield passed[: sizes[(rank - step) % world]]


def all_sum(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)
