"""The training loop: build or load a model, read the data, optimise, evaluate, save, resume.

A run writes everything into ``out`` (``runs/NAME``):

- ``config.json``: the training options and the model architecture;
- ``metrics.jsonl``: one JSON object per logged step (``"kind": "train"``) and per epoch
  (``"kind": "eval"``);
- ``last.safetensors``: the model after the last finished epoch, with its family's key names
  (OpenAI's for a CLIP) and its config, loadable by ``clipcli.load`` and every ``--model`` option;
- ``state.pt``: optimiser, scheduler, gradient scaler, step, epoch and RNG, for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import ClipcliError, InputError, OutputError, OutputExistsError
from ..feedback import SILENT, Feedback
from ..models.config import METADATA_KEY
from . import distributed
from .data import CaptionTokenizer, GlobalBatches, PairDataset, SkipReporter, caption_tokenizer, loader, read_pairs
from .evaluate import zeroshot_classes
from .loss import PairModel, clamp_logit_scale, contrastive_loss, sigmoid_loss_part
from .model import (
    apply_freeze,
    check_encoders,
    choose_loss,
    describe,
    keep_tokenizer_files,
    load_for_training,
    model_config,
    new_model,
    save_checkpoint,  # noqa: F401 (re-exported: benchmarks and tests write checkpoints with it)
    with_logit_bias,
)
from .optim import build_optimizer, build_scheduler

CHECKPOINT, STATE, METRICS, CONFIG = "last.safetensors", "state.pt", "metrics.jsonl", "config.json"


@dataclass
class TrainConfig:
    train_data: str
    out: str
    val_data: str | None = None
    zeroshot_dir: str | None = None
    zeroshot_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    img_key: str = "filepath"
    caption_key: str = "title"
    arch: str | None = "tiny"
    init: str | None = None
    image_encoder: str | None = None  # vit | resnet | mixer; None: what the arch or checkpoint has
    text_encoder: str | None = None  # transformer | mixer
    overrides: dict = field(default_factory=dict)  # CLIPConfig fields replacing the preset's
    loss: str | None = None  # contrastive | sigmoid; None: the model's own (sigmoid when it has a logit bias)
    freeze: str | None = None  # image | text
    epochs: int = 10
    batch_size: int = 64  # the global batch, over all processes
    lr: float = 5e-4
    wd: float = 0.2
    warmup: int = 100
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "cpu"
    workers: int = 2
    seed: int = 0
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False


# ----------------------------------------------------------------------------- the loop


def _save_state(state: dict, path: Path) -> None:
    """The optimizer and scheduler state for ``--resume``, written atomically."""
    from ..fsutil import atomic_path, write_error

    try:
        with atomic_path(path, overwrite=True) as temp:
            torch.save(state, temp)
    except RuntimeError as error:  # torch.save's wrapper around an I/O error
        raise write_error(OSError(None, str(error)), path) from None


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


def _autocast(precision: str, device: torch.device):
    """Mixed precision by inference's table (:data:`clipcli.pipeline.PRECISIONS`); fp32: off."""
    from ..pipeline import resolve_dtype

    dtype = resolve_dtype(precision, device)
    return torch.autocast(device.type, enabled=False) if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def _prepare_out(cfg: TrainConfig, is_main: bool) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; it must be a folder (new or holding a run)", option="out")
    if is_main and not cfg.resume and (out / CHECKPOINT).exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out} already holds a run", fix="resume")
    if cfg.resume and not (out / STATE).exists():
        raise InputError(f"nothing to resume: {out} has no {STATE}")
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create {out}: {error.strerror or error}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write in {out}: it is not writable")
        if not cfg.resume:
            for name in (METRICS, CHECKPOINT, STATE):
                (out / name).unlink(missing_ok=True)
    return out


def train(cfg: TrainConfig, feedback: Feedback = SILENT) -> Path:
    """Train as ``cfg`` says and return the path of ``last.safetensors``."""
    topology, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, topology, device, feedback)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, topology: distributed.Topology, device: torch.device, feedback: Feedback) -> Path:
    from ..preprocess import preprocess_for

    main = topology.is_main
    # Every input is checked before --out is touched (an --overwrite run would discard the old one).
    fresh_config = None
    if not (cfg.resume or cfg.init):
        fresh_config = model_config(cfg.arch, cfg.overrides, cfg.image_encoder, cfg.text_encoder)
        cfg = replace(cfg, loss=choose_loss(cfg.loss, fresh_config, f"preset {cfg.arch}"))
        fresh_config = replace(fresh_config, logit_bias=cfg.loss == "sigmoid")
    if cfg.zeroshot_dir and not zeroshot_classes(cfg.zeroshot_dir):
        raise InputError(f"{cfg.zeroshot_dir} holds no class folders with images", option="zeroshot_dir")
    train_pairs = read_pairs(cfg.train_data, cfg.img_key, cfg.caption_key)
    val_pairs = read_pairs(cfg.val_data, cfg.img_key, cfg.caption_key) if cfg.val_data else None
    if len(train_pairs) < cfg.batch_size:
        raise InputError(f"{cfg.batch_size} is more than the {len(train_pairs)} pairs in {cfg.train_data}",
                         option="batch_size")
    notes, tokenizer_files = [], {}
    if cfg.init and not cfg.resume:
        clip, note, tokenizer_files = load_for_training(cfg.init, feedback if main else SILENT)
        notes += [note] if note else []
        check_encoders(clip.config, cfg.image_encoder, cfg.text_encoder, cfg.init)
        cfg = replace(cfg, loss=choose_loss(cfg.loss, clip.config, cfg.init))
    out = _prepare_out(cfg, main)
    if main:
        keep_tokenizer_files(tokenizer_files, out)
    torch.manual_seed(cfg.seed)

    state = None
    if cfg.resume:
        state = torch.load(out / STATE, map_location="cpu", weights_only=True)
        clip, _, _ = load_for_training(str(out / CHECKPOINT))
        cfg = replace(cfg, loss=choose_loss(cfg.loss, clip.config, str(out), resumed=True))
    elif not cfg.init:
        clip = new_model(fresh_config)
    tokenize = caption_tokenizer(clip)  # before the model may be rebuilt: loading may have given it its tokenizer
    if cfg.loss == "sigmoid" and not clip.config.logit_bias:
        clip = with_logit_bias(clip)
        notes.append(f"{cfg.init} has no logit bias: the sigmoid loss adds one at -10 and restarts its scale at 10")
    apply_freeze(clip, cfg.freeze)
    clip = clip.to(device).train()
    config = clip.config

    transform = preprocess_for(config)  # inference's transform, bit for bit, without torchvision
    train_set = PairDataset(train_pairs, transform, config.context_length, tokenize)
    val_set = PairDataset(val_pairs, transform, config.context_length, tokenize) if val_pairs else None
    sampler = GlobalBatches(len(train_set), cfg.batch_size, topology.rank, topology.world_size, cfg.seed)
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * cfg.epochs

    network = PairModel(clip)
    if topology.distributed:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(clip, cfg.lr, cfg.wd)
    scheduler = build_scheduler(optimizer, min(cfg.warmup, total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    step, start_epoch = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, start_epoch = int(state["step"]), int(state["epoch"])
        torch.set_rng_state(state["rng"])

    record = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(config), "world_size": topology.world_size}
    if main:
        (out / CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    metrics = MetricsLog(out / METRICS, main)
    skips = SkipReporter(feedback.log)
    batches = loader(train_set, sampler, cfg.workers)
    say = feedback.log if main else SILENT.log
    for note in notes:
        say(f"note: {note}")
    live = main and feedback.status is not None
    say(f"training {describe(config)} with the {cfg.loss} loss on {len(train_set)} pairs, {steps_per_epoch} steps/epoch "
        f"x {cfg.epochs} epochs, global batch {cfg.batch_size} over {topology.world_size} process(es) on {device}")

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        started, seen = time.perf_counter(), 0
        for batch in batches:
            skips(batch.skipped)
            if not len(batch.images):  # every image of this rank's share was unreadable
                resolution = config.image_resolution
                batch = replace(batch, images=torch.empty(0, 3, resolution, resolution),
                                texts=torch.empty(0, config.context_length, dtype=torch.long))
            images, texts = batch.images.to(device, non_blocking=True), batch.texts.to(device, non_blocking=True)
            sizes = distributed.gather_sizes(len(images), device) if topology.distributed else [len(images)]
            if sum(sizes) == 0:  # the whole global batch: no step (its images are counted as skipped)
                continue
            with _autocast(cfg.precision, device):
                features = network(images, texts)
            objective, loss = _objective(cfg.loss, *features, sizes, topology.world_size, device)
            if not math.isfinite(loss):
                raise ClipcliError(f"the loss became {loss} at step {step}", fix="lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(clip.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            clamp_logit_scale(clip)
            step += 1
            seen += sum(sizes)
            logged = step % cfg.log_every == 0 or step == total_steps
            if logged or live:
                rate = seen / (time.perf_counter() - started)
                lr = optimizer.param_groups[0]["lr"]
                line = f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e} {rate:.0f} samples/s"
                if live:  # e.g. a terminal: one line, rewritten every step
                    feedback.status(line)
                elif logged:
                    say(line)
            if logged:
                entry = {"kind": "train", "epoch": epoch + 1, "step": step, "loss": loss, "grad_norm": grad_norm.item(),
                         "lr": lr, "logit_scale": float(clip.logit_scale.detach().exp())}
                if clip.logit_bias is not None:
                    entry["logit_bias"] = float(clip.logit_bias.detach())
                metrics.write({**entry, "samples_per_second": rate})
        elapsed = time.perf_counter() - started
        skipped = int(distributed.all_sum(skips.count, device))
        if main:
            evaluation = {"kind": "eval", "epoch": epoch + 1, "step": step, "samples_per_second": seen / elapsed,
                          "skipped_images": skipped}
            evaluation.update(_evaluate(clip, cfg, val_set, transform, tokenize, device, skips))
            clip.train()
            metrics.write(evaluation)
            say("epoch {} done: {}".format(epoch + 1, ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in evaluation.items() if k not in ("kind", "epoch"))))
            save_checkpoint(clip, out / CHECKPOINT, {METADATA_KEY: config})
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "epoch": epoch + 1, "rng": torch.get_rng_state()}
            _save_state(state, out / STATE)
    if main and cfg.resume and start_epoch >= cfg.epochs:
        say(f"{out} already finished {cfg.epochs} epochs; nothing to train (ask for more epochs to go on)")
    return out / CHECKPOINT


def _objective(loss: str, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None, sizes: list[int], world_size: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """``(what this rank back-propagates, the loss of the global batch)`` from this rank's features.

    contrastive: every rank gathers every rank's features and computes the same global loss
    (see :mod:`clipcli.train.distributed` for why its gradient comes out right). sigmoid: each
    rank computes its own part, its images against every rank's captions; DistributedDataParallel
    averages the ranks' gradients, so each part counts ``world_size`` times to make their sum."""
    image_features, text_features = image_features.float(), text_features.float()
    if loss == "sigmoid":
        part = sigmoid_loss_part(image_features, text_features, scale.float(), bias.float(), sizes)
        return part * world_size, distributed.all_sum(part.item(), device)
    image_features = distributed.gather_rows(image_features, sizes)
    text_features = distributed.gather_rows(text_features, sizes)
    objective = contrastive_loss(image_features, text_features, scale.float())
    return objective, objective.item()


def _evaluate(clip, cfg: TrainConfig, val_set, transform, tokenize: CaptionTokenizer, device, skips) -> dict:
    from .evaluate import encode_pairs, recall_at_k, zeroshot_accuracy

    clip.eval()
    results = {}
    with _autocast(cfg.precision, device):
        if val_set is not None:
            images, texts = encode_pairs(clip, val_set, cfg.batch_size, device, cfg.workers, skips)
            if len(images):
                results.update({f"val/{k}": v for k, v in recall_at_k(images, texts).items()})
        if cfg.zeroshot_dir:
            accuracy = zeroshot_accuracy(clip, cfg.zeroshot_dir, transform, cfg.zeroshot_templates, device,
                                         cfg.batch_size, cfg.workers, skips, tokenize)
            results.update({f"zeroshot/{k}": v for k, v in accuracy.items()})
    return results
