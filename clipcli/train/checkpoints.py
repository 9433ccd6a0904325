"""A run's checkpoints: where they are, how they are written and kept, which one a resume reads.

A checkpoint is two files in the run folder, beside the tokenizer files a model may need:

- ``step_00000120.safetensors``: the model, loadable by every ``--model`` option;
- ``step_00000120.state.pt``: what training needs to go on from there exactly: optimiser,
  scheduler, gradient scaler, the step, the epoch, the position in the epoch's data (in global
  batches) and the random number generators.

One is written after each epoch and every ``--save-every-n-steps`` steps; the last ``--keep``
are kept (0: all). ``last.safetensors`` and ``state.pt`` are the newest one, linked (or copied
where the file system has no hard links), so a run reads as it always did. Every file is
written to a temporary name and renamed: a run killed while saving keeps its previous
checkpoint whole.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

LAST, STATE = "last.safetensors", "state.pt"
_NAME = re.compile(r"^step_(\d+)\.safetensors$")


@dataclass(frozen=True)
class Checkpoint:
    model: Path
    state: Path

    @property
    def step(self) -> int:
        return int(_NAME.match(self.model.name)[1])


def checkpoint_at(out: Path, step: int) -> Checkpoint:
    stem = out / f"step_{step:08d}"
    return Checkpoint(stem.with_suffix(".safetensors"), stem.with_suffix(".state.pt"))


def saved(out: Path) -> list[Checkpoint]:
    """The run's complete checkpoints (both files), oldest first."""
    found = []
    for path in out.glob("step_*.safetensors"):
        if _NAME.match(path.name):
            checkpoint = checkpoint_at(out, int(_NAME.match(path.name)[1]))
            if checkpoint.state.exists():
                found.append(checkpoint)
    return sorted(found, key=lambda c: c.step)


def _save_state(state: dict, path: Path) -> None:
    from ..fsutil import atomic_path, write_error

    try:
        with atomic_path(path, overwrite=True) as temp:
            torch.save(state, temp)
    except RuntimeError as error:  # torch.save's wrapper around an I/O error
        raise write_error(OSError(None, str(error)), path) from None


def _link(source: Path, target: Path) -> None:
    """``target`` becomes ``source`` (a hard link, else a copy), replaced atomically."""
    temp = target.with_name(f".{target.name}.link")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        shutil.copyfile(source, temp)
    os.replace(temp, target)


def make_last(out: Path, checkpoint: Checkpoint) -> None:
    """``last.safetensors`` and ``state.pt`` become ``checkpoint``'s."""
    if checkpoint.model != out / LAST:
        _link(checkpoint.model, out / LAST)
        _link(checkpoint.state, out / STATE)


def save(out: Path, step: int, write_model, state: dict, keep: int) -> Checkpoint:
    """Write the checkpoint of ``step`` (``write_model(path)`` writes the model), make it the
    run's last, and delete all but the newest ``keep`` (0 keeps every one)."""
    checkpoint = checkpoint_at(out, step)
    write_model(checkpoint.model)
    _save_state(state, checkpoint.state)
    make_last(out, checkpoint)
    if keep:
        for old in saved(out)[:-keep]:
            old.state.unlink(missing_ok=True)
            old.model.unlink(missing_ok=True)
    return checkpoint


def resume_point(out: Path, resume_from: str | None) -> Checkpoint:
    """The checkpoint a resumed run reads: ``resume_from`` (a ``step_*.safetensors`` file, its
    ``.state.pt``, or ``last``), else the run's last one."""
    if resume_from in (None, "last", "latest"):
        found = saved(out)  # the newest whole pair: a kill between linking last's two files cannot mix steps
        if found:
            return found[-1]
        if (out / STATE).exists() and (out / LAST).exists():  # a run from before step checkpoints
            return Checkpoint(out / LAST, out / STATE)
        raise InputError(f"nothing to resume: {out} has no {STATE}")
    path = Path(resume_from)
    if not path.is_absolute() and path.parent == Path(".") and not path.exists():
        path = out / path  # a checkpoint's bare name: the run's
    name = path.name.removesuffix(".state.pt").removesuffix(".safetensors")
    if not re.fullmatch(r"step_\d+", name):
        raise InputError(f"{resume_from} is not a checkpoint of a run (step_NNNNNNNN.safetensors)", option="resume_from")
    checkpoint = Checkpoint(path.with_name(name + ".safetensors"), path.with_name(name + ".state.pt"))
    if path.parent.resolve() != out.resolve():
        raise InputError(f"{resume_from} is not in the run folder {out}: a run resumes in its own folder",
                         option="resume_from")
    for file in (checkpoint.model, checkpoint.state):
        if not file.exists():
            raise InputError(f"{resume_from}: {file} is missing", option="resume_from")
    return checkpoint


def drop_after(out: Path, step: int) -> list[Path]:
    """Delete the checkpoints newer than ``step`` (a run resumed from an older one replaces
    their future); the deleted model files."""
    dropped = []
    for checkpoint in saved(out):
        if checkpoint.step > step:
            checkpoint.state.unlink(missing_ok=True)
            checkpoint.model.unlink(missing_ok=True)
            dropped.append(checkpoint.model)
    return dropped
