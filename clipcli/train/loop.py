"""The training loop: build or load a model, read the data, optimise, evaluate, save, resume.

A run writes everything into ``out`` (``runs/NAME``):

- ``config.json``: the training options and the model architecture as the run started, and
  what each resume changed;
- ``metrics.jsonl``: one JSON object per logged step (``"kind": "train"``) and per evaluation
  (``"kind": "eval"``); with ``--report-to tensorboard`` the same numbers as TensorBoard events;
- checkpoints (:mod:`clipcli.train.checkpoints`): ``step_N.safetensors`` + ``step_N.state.pt``
  after each epoch and every ``save_every_n_steps`` steps, the newest also as
  ``last.safetensors`` + ``state.pt``. The model files load with every ``--model`` option; a run
  resumes from any checkpoint exactly, mid-epoch included: the data of an epoch is a function
  of (seed, epoch), so the position in it is a number of global batches.

A step takes ``accum_freq`` global batches of ``batch_size`` (:mod:`clipcli.train.step`): the
loss covers all of them, as one batch ``accum_freq`` times larger would.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InputError, OutputError, OutputExistsError
from ..feedback import SILENT, Feedback
from ..models.config import METADATA_KEY
from . import checkpoints, distributed, resume
from .config import TrainConfig
from .data import SkipReporter, caption_tokenizer
from .evaluate import val_source, zeroshot_classes
from .loss import PairModel, clamp_logit_scale
from .model import (
    apply_freeze,
    check_encoders,
    choose_loss,
    describe,
    is_vit,
    keep_tokenizer_files,
    load_for_training,
    model_config,
    new_model,
    save_checkpoint,
    with_logit_bias,
)
from .optim import build_optimizer, build_scheduler, default_adam
from .report import METRICS, TENSORBOARD, Reporter, check_report_to
from .sources import open_source

CHECKPOINT, STATE = checkpoints.LAST, checkpoints.STATE
DEFAULT_WARMUP = 100


# ----------------------------------------------------------------------------- set-up


def _prepare_out(cfg: TrainConfig, is_main: bool) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; it must be a folder (new or holding a run)", option="output")
    if is_main and not cfg.resume and (out / CHECKPOINT).exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out} already holds a run", fix="resume")
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
            for old in checkpoints.saved(out):
                old.model.unlink(missing_ok=True)
                old.state.unlink(missing_ok=True)
            shutil.rmtree(out / TENSORBOARD, ignore_errors=True)  # another run's events would mix with this one's
    return out


def _build_model(cfg: TrainConfig, resume_point, feedback: Feedback):
    """``(model, cfg with its loss, notes, tokenizer files)``: the run's checkpoint when resuming,
    a torchvision backbone model, a loaded checkpoint (``init``) or a new model of a preset."""
    notes, tokenizer_files = [], {}
    if resume_point is not None:
        clip, _, _ = load_for_training(str(resume_point.model))
        return clip, replace(cfg, loss=choose_loss(cfg.loss, clip.config, cfg.out, resumed=True)), notes, {}
    if cfg.image_tower:
        from .backbones import backbone_model

        size = cfg.overrides.get("image_resolution")
        clip, notes, tokenizer_files = backbone_model(
            cfg.image_tower, pretrained=cfg.image_pretrained, text_init=cfg.text_init, preset=cfg.arch or "ViT-B/32",
            embed_dim=cfg.overrides.get("embed_dim"), image_size=size, feedback=feedback)
        return clip, replace(cfg, loss=choose_loss(cfg.loss, clip.config, cfg.image_tower)), list(notes), tokenizer_files
    if cfg.init:
        clip, note, tokenizer_files = load_for_training(cfg.init, feedback)
        check_encoders(clip.config, cfg.image_encoder, cfg.text_encoder, cfg.init)
        return clip, replace(cfg, loss=choose_loss(cfg.loss, clip.config, cfg.init)), [note] if note else [], tokenizer_files
    config = model_config(cfg.arch, cfg.overrides, cfg.image_encoder, cfg.text_encoder)
    cfg = replace(cfg, loss=choose_loss(cfg.loss, config, f"preset {cfg.arch}"))
    return new_model(replace(config, logit_bias=cfg.loss == "sigmoid")), cfg, notes, tokenizer_files


def _freeze(clip, cfg: TrainConfig) -> None:
    if cfg.image_tower:
        from .backbones import lock_image_trunk, lock_text_tower

        if cfg.lock_image_unlocked_groups and cfg.freeze not in ("image", "both"):
            raise InputError(f"{cfg.lock_image_unlocked_groups}: stage groups are unlocked in an image tower kept fixed",
                             option="lock_image_unlocked_groups")

        if cfg.freeze in ("image", "both"):
            lock_image_trunk(clip, cfg.lock_image_unlocked_groups)
        if cfg.freeze in ("text", "both"):
            lock_text_tower(clip)
        return
    if cfg.lock_image_unlocked_groups:
        raise InputError(f"{cfg.lock_image_unlocked_groups}: only a torchvision image tower has stage groups to unlock",
                         option="lock_image_unlocked_groups")
    if cfg.freeze == "both":
        raise InputError("both towers can be kept fixed only with a torchvision image tower (its projection trains)",
                         option="freeze")
    apply_freeze(clip, cfg.freeze)


def _warmup(cfg: TrainConfig, total_steps: int, say) -> int:
    if cfg.warmup is not None:
        if cfg.warmup >= total_steps > 0:
            raise InputError(f"{cfg.warmup} is not shorter than the run's {total_steps} steps, so the learning rate "
                             f"would never decay (a tenth of the run is {max(1, total_steps // 10)})", option="warmup",
                             fix="warmup")
        return cfg.warmup
    if DEFAULT_WARMUP < total_steps:
        return DEFAULT_WARMUP
    warmup = max(1, total_steps // 10)
    say(f"note: the run has {total_steps} steps, no more than the default warmup of {DEFAULT_WARMUP}: "
        f"warming up over {warmup} steps instead (a tenth of the run)")
    return warmup


def train(cfg: TrainConfig, feedback: Feedback = SILENT, given: set[str] | None = None) -> Path:
    """Train as ``cfg`` says and return the path of ``last.safetensors``. A resumed run
    (``cfg.resume``) takes the options not in ``given`` from its ``config.json``."""
    topology, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, topology, device, feedback, given)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, topology: distributed.Topology, device: torch.device, feedback: Feedback,
           given: set[str] | None) -> Path:
    from ..preprocess import preprocess_for
    from .augment import train_transform
    from .step import train_step

    main = topology.is_main
    say = feedback.log if main else SILENT.log
    # Every input is checked before --out is touched (an --overwrite run would discard the old one).
    changed, resume_point, resume_notes = {}, None, []
    state = None
    if cfg.resume:
        resume_point = checkpoints.resume_point(Path(cfg.out), cfg.resume_from)
        cfg, changed, resume_notes = resume.resumed_config(cfg, given)
        state = torch.load(resume_point.state, map_location="cpu", weights_only=True)
    data = resume.data_signature(cfg, topology.world_size)  # what the order of an epoch's batches depends on
    if state is not None:
        resume.check_position(state, data)
    check_report_to(cfg.report_to)
    if cfg.accum_freq < 1:
        raise InputError(f"{cfg.accum_freq}: give 1 or more", option="accum_freq")
    if cfg.val_data:
        val_source(cfg.val_data, cfg.img_key, cfg.caption_key)  # a missing file or shard, no pairs: before --out
    if cfg.zeroshot_dir and not zeroshot_classes(cfg.zeroshot_dir):
        raise InputError(f"{cfg.zeroshot_dir} holds no class folders with images", option="zeroshot_dir")
    torch.manual_seed(cfg.seed)
    clip, cfg, notes, tokenizer_files = _build_model(cfg, resume_point, feedback if main else SILENT)
    tokenize = caption_tokenizer(clip)  # before the model may be rebuilt: loading may have given it its tokenizer
    if cfg.loss == "sigmoid" and not clip.config.logit_bias:
        clip = with_logit_bias(clip)
        notes.append(f"{cfg.init or cfg.image_tower} has no logit bias: the sigmoid loss adds one at -10 and restarts its scale at 10")
    config = clip.config
    transform = train_transform(config, cfg.aug_cfg)
    source = open_source(cfg.train_data, img_key=cfg.img_key, caption_key=cfg.caption_key, transform=transform,
                         tokenize=tokenize, context_length=config.context_length, batch_size=cfg.batch_size,
                         rank=topology.rank, world_size=topology.world_size, seed=cfg.seed, workers=cfg.workers,
                         num_samples=cfg.train_num_samples, resampled=cfg.dataset_resampled, drop_last=cfg.drop_last)
    steps_per_epoch = source.steps_per_epoch // cfg.accum_freq
    if steps_per_epoch == 0:
        raise InputError(f"{cfg.accum_freq}: an epoch holds {source.steps_per_epoch} batch(es) of {cfg.batch_size}, "
                         "fewer than a step accumulates", option="accum_freq", fix="accumulate")
    total_steps = steps_per_epoch * cfg.epochs
    cfg = replace(cfg, warmup=_warmup(cfg, total_steps, say))  # kept in config.json: a resumed run warms up alike
    out = _prepare_out(cfg, main)
    if main:
        keep_tokenizer_files(tokenizer_files, out)

    _freeze(clip, cfg)
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    clip = clip.to(device).train()
    network = PairModel(clip)
    if topology.distributed:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    adam = [value if value is not None else default
            for value, default in zip((cfg.beta1, cfg.beta2, cfg.eps), default_adam(is_vit(config)))]
    optimizer = build_optimizer(clip, cfg.lr, cfg.wd, adam[:2], adam[2], decay_embeddings=cfg.decay_embeddings)
    scheduler = build_scheduler(optimizer, cfg.warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    step, start_epoch, position = 0, 0, 0
    if state is not None:
        resume.restore(state, optimizer, scheduler, scaler, cfg, adam)
        step, start_epoch, position = int(state["step"]), int(state["epoch"]), int(state.get("position", 0))
        resume.set_rng_state(state["rng"])
        if main:
            for dropped in checkpoints.drop_after(out, step):
                notes.append(f"resumed at step {step}: removed the later checkpoint {dropped.name}")
            checkpoints.make_last(out, resume_point)

    if main:
        resume.write_config(out, cfg, config, topology.world_size, changed, step)
    reporter = Reporter(out, main, cfg.report_to)
    if cfg.resume:
        reporter.resume_at(step)
    skips = SkipReporter(feedback.log)
    for note in [*resume_notes, *notes, *source.notes]:
        say(f"note: {note}")
    if source.dropped_per_epoch:
        say(f"note: {source.dropped_per_epoch} sample(s) do not fill a last batch of {cfg.batch_size}: each epoch "
            "leaves them out (or trains on them in a smaller last batch when told not to drop it)")
    if source.steps_per_epoch % cfg.accum_freq:
        say(f"note: the last {source.steps_per_epoch % cfg.accum_freq} batch(es) of each epoch do not fill a step of "
            f"{cfg.accum_freq} accumulated batches: each epoch leaves them out")
    live = main and feedback.status is not None
    effective = f"{cfg.batch_size} x {cfg.accum_freq} accumulated" if cfg.accum_freq > 1 else str(cfg.batch_size)
    say(f"training {describe(config)} with the {cfg.loss} loss on {source.samples_per_epoch} samples per epoch, "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, global batch {effective} over {topology.world_size} "
        f"process(es) on {device}")

    def save(epoch: int, position: int) -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "epoch": epoch, "position": position, "rng": resume.rng_state(), "data": data}
        checkpoints.save(out, step, lambda path: save_checkpoint(clip, path, {METADATA_KEY: config}), state, cfg.keep)

    val_transform = preprocess_for(config)  # inference's: evaluation measures the model as it will be used
    for epoch in range(start_epoch, cfg.epochs):
        started, seen, group, skipped_before = time.perf_counter(), 0, [], skips.count
        in_epoch = position // cfg.accum_freq  # steps of this epoch already taken
        for batch in source.batches(epoch, start=position):
            skips(batch.skipped)
            if not len(batch.images):  # every image of this rank's share was unreadable
                resolution = config.image_resolution
                batch = replace(batch, images=torch.empty(0, 3, resolution, resolution),
                                texts=torch.empty(0, config.context_length, dtype=torch.long))
            images, texts = batch.images.to(device, non_blocking=True), batch.texts.to(device, non_blocking=True)
            sizes = distributed.gather_sizes(len(images), device) if topology.distributed else [len(images)]
            group.append((images, texts, sizes))
            if len(group) < cfg.accum_freq:
                continue
            lr = optimizer.param_groups[0]["lr"]  # this step's: the scheduler moves it after the step
            loss = grad_norm = None
            if any(sum(sizes) for *_, sizes in group):  # else every image of the step was unreadable: no update
                loss, grad_norm = train_step(network, clip, group, loss=cfg.loss, precision=cfg.precision, device=device,
                                             world_size=topology.world_size, optimizer=optimizer, scaler=scaler,
                                             grad_clip=cfg.grad_clip, local_loss=cfg.local_loss, step=step)
                clamp_logit_scale(clip)
            scheduler.step()
            seen += sum(sum(m[2]) for m in group)
            group = []
            step += 1
            in_epoch += 1
            logged = loss is not None and (step % cfg.log_every == 0 or step == total_steps)
            if loss is not None and (logged or live):
                rate = seen / (time.perf_counter() - started)
                line = (f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e} "
                        f"{rate:.0f} samples/s")
                if live:  # e.g. a terminal: one line, rewritten every step
                    feedback.status(line)
                elif logged:
                    say(line)
            if logged:
                entry = {"kind": "train", "epoch": epoch + 1, "step": step, "loss": loss, "grad_norm": grad_norm,
                         "lr": lr, "logit_scale": float(clip.logit_scale.detach().exp())}
                if clip.logit_bias is not None:
                    entry["logit_bias"] = float(clip.logit_bias.detach())
                reporter.write({**entry, "samples_per_second": rate})
            if in_epoch == steps_per_epoch:
                break  # batches left over that do not fill a step
            if main and cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
                save(epoch, in_epoch * cfg.accum_freq)
        position = 0
        elapsed = time.perf_counter() - started
        skipped = int(distributed.all_sum(skips.count - skipped_before, device))  # this epoch's training images
        last = epoch + 1 == cfg.epochs
        evaluation = {"kind": "eval", "epoch": epoch + 1, "step": step,
                      "samples_per_second": seen / elapsed if elapsed > 0 else 0.0, "skipped_images": skipped}
        if (epoch + 1) % cfg.val_frequency == 0 or last:
            evaluation.update(_evaluate(clip, cfg, tokenize, val_transform, device, skips, topology))
        if main:
            reporter.write(evaluation)
            say("epoch {} done: {}".format(epoch + 1, ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in evaluation.items()
                if k not in ("kind", "epoch"))))
            save(epoch + 1, 0)
    reporter.close()
    if main and cfg.resume and start_epoch >= cfg.epochs:
        say(f"{out} already finished {cfg.epochs} epochs; nothing to train (ask for more epochs to go on)")
    return out / CHECKPOINT


def _evaluate(clip, cfg: TrainConfig, tokenize, transform, device, skips, topology) -> dict:
    from .evaluate import evaluate
    from .step import autocast

    if not (cfg.val_data or cfg.zeroshot_dir):
        return {}
    return evaluate(clip, val_data=cfg.val_data, zeroshot_dir=cfg.zeroshot_dir, templates=cfg.zeroshot_templates,
                    transform=transform, tokenize=tokenize, device=device,
                    precision_ctx=lambda: autocast(cfg.precision, device), batch_size=cfg.batch_size,
                    workers=cfg.workers, img_key=cfg.img_key, caption_key=cfg.caption_key, skips=skips,
                    rank=topology.rank, world_size=topology.world_size)
