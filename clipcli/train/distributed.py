"""Multi-process training under ``torchrun``: process group set-up and a differentiable all-gather.

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
"""

from __future__ import annotations

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


def all_sum(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)
