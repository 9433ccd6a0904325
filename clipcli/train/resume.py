"""Resuming a run: its options (the run's own but those given again), the data position a
checkpoint part-way through an epoch needs unchanged, and the optimiser, schedule, scaler and
random number generators restored. Which checkpoint is read is :mod:`clipcli.train.checkpoints`'s.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from ..errors import InputError
from .config import DATA_FIELDS, RUN_FIELDS, TrainConfig

CONFIG = "config.json"


def as_json(value):
    return json.loads(json.dumps(value))  # tuples as lists, as config.json holds them


def resumed_config(cfg: TrainConfig, given: set[str] | None) -> tuple[TrainConfig, dict, list[str]]:
    """A resumed run's options: the run's own (its ``config.json``, with what earlier resumes
    changed) but those the command line gave (``given``: TrainConfig field names; None: all of
    ``cfg``); the options it changes; notes on options given that the run keeps its own of (the
    model, the seed, which parameters train)."""
    path = Path(cfg.out) / CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        saved = dict(record["train"])
        for resume in record.get("resumes", []):
            saved.update({name: change["now"] for name, change in resume.get("changed", {}).items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return cfg, {}, []  # a run from before config.json kept everything: the command line's
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = dataclasses.asdict(cfg)
    changed, notes = {}, []
    for name, value in saved.items():
        if name not in names or name in ("out", "resume", "resume_from", "overwrite"):
            continue
        now = as_json(merged[name])
        if name in RUN_FIELDS and given is not None and name in given and now != value:
            notes.append(f"the run keeps its own {name} ({json.dumps(value)}), not {json.dumps(now)}")
        if name in RUN_FIELDS or (given is not None and name not in given):
            merged[name] = value
        elif now != value:
            changed[name] = {"was": value, "now": now}
    return TrainConfig(**merged), changed, notes


def write_config(out: Path, cfg: TrainConfig, config, world_size: int, changed: dict, step: int) -> None:
    path = out / CONFIG
    if cfg.resume and path.exists():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            record = {}
        record.setdefault("resumes", []).append({"step": step, "changed": changed, "world_size": world_size})
    else:
        record = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(config), "world_size": world_size}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def data_signature(cfg: TrainConfig, world_size: int) -> dict:
    """What the order of an epoch's batches depends on (shards: the number of readers too)."""
    from ..webdataset import is_shards

    signature = {name: as_json(getattr(cfg, name)) for name in DATA_FIELDS}
    if is_shards([cfg.train_data]):
        signature["readers"] = world_size * max(1, cfg.workers)
    return signature


def check_position(state: dict, now: dict) -> None:
    """A checkpoint part-way through an epoch resumes only on the same data, read the same way."""
    saved = state.get("data")
    if not int(state.get("position", 0)) or saved is None or saved == now:
        return
    name = next(k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
    option = "workers" if name == "readers" else name
    raise InputError(f"{now.get(name)!r}: the checkpoint is {state['position']} batches into epoch {state['epoch'] + 1}, "
                     f"read with {saved.get(name)!r}; that epoch's data cannot change part-way (resume with the same, "
                     "or from a checkpoint at an epoch's end)", option=option)


def restore(state: dict, optimizer, scheduler, scaler, cfg: TrainConfig, adam: list[float]) -> None:
    """The optimiser, schedule and scaler as the checkpoint left them, with the learning rate,
    weight decay and Adam settings of this run (a resume may change them)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(betas=tuple(adam[:2]), eps=adam[2], initial_lr=cfg.lr, lr=cfg.lr * factor(scheduler.last_epoch),
                     weight_decay=cfg.wd if group.get("name", "decay" if group["weight_decay"] else "") == "decay" else 0.0)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | torch.Tensor) -> None:
    """The generators as :func:`rng_state` saved them (a run from before saved torch's alone)."""
    if isinstance(state, torch.Tensor):
        state = {"torch": state}
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
