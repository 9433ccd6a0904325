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


def env_int(name: str) -> int | None:
    """``$NAME`` as a whole number of 0 or more, None when unset or empty; anything else (``abc``,
    ``-1``, ``²``) is an :class:`~clipcli.errors.InputError` naming it, never silently ignored."""
    from .errors import InputError

    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise InputError(f"{name}={value!r} is not a whole number of 0 or more")
    return int(value)


def _int(name: str, default: int) -> int:
    found = env_int(name)
    return default if found is None else found


def from_environment() -> Topology:
    """This process's place under ``torchrun`` (rank 0 of 1 outside it)."""
    world_size = _int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Topology()
    return Topology(_int("RANK", 0), world_size, _int("LOCAL_RANK", 0))


def slurm_local_id() -> int | None:
    """This task's index on its node under SLURM (``SLURM_LOCALID``) when a job step runs
    several tasks, else None: tasks that share a node's GPUs pick theirs by it."""
    if _int("SLURM_STEP_NUM_TASKS", 1) <= 1 or env_int("SLURM_LOCALID") is None:
        return None
    return _int("SLURM_LOCALID", 0)
