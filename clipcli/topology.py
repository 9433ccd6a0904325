"""Where this process stands among several: rank, world size and local rank.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for each process it starts; a
process started any other way is rank 0 of 1. Training (:mod:`clipcli.train.distributed`)
joins a process group from it, and device choice (:func:`clipcli.pipeline.resolve_device`)
puts each local rank on its own GPU, ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


def from_environment() -> Topology:
    """This process's place under ``torchrun`` (rank 0 of 1 outside it)."""
    world_size = _int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Topology()
    return Topology(_int("RANK", 0), world_size, _int("LOCAL_RANK", 0))


def slurm_local_id() -> int | None:
    """This task's index on its node under SLURM (``SLURM_LOCALID``) when a job step runs
    several tasks, else None: tasks that share a node's GPUs pick theirs by it."""
    if _int("SLURM_STEP_NUM_TASKS", 1) <= 1 or not os.environ.get("SLURM_LOCALID", "").strip().isdigit():
        return None
    return _int("SLURM_LOCALID", 0)
