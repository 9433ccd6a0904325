"""The training loop: build or load a CLIP, read the data, optimise, evaluate, save, resume.

A run writes everything into ``out`` (``runs/NAME``):

- ``config.json``: the training options and the model architecture;
- ``metrics.jsonl``: one JSON object per logged step (``"kind": "train"``) and per epoch
  (``"kind": "eval"``);
- ``last.safetensors``: the model after the last finished epoch, with OpenAI's key names,
  loadable by ``clipcli.load`` and every ``--model`` option;
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
from ..models.clip import CLIP, CLIPConfig
from ..models.factory import METADATA_KEY, config_to_json, create_model
from . import distributed
from .data import GlobalBatches, PairDataset, SkipReporter, loader, read_pairs
from .evaluate import zeroshot_classes
from .loss import ContrastiveModel, clamp_logit_scale, contrastive_loss
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


# ----------------------------------------------------------------------------- the model


def model_config(cfg: TrainConfig) -> CLIPConfig:
    from .presets import PRESETS

    if cfg.arch not in PRESETS:
        raise InputError(f"{cfg.arch!r} is not a preset; choose one of {', '.join(PRESETS)}", option="arch")
    fields = dict(PRESETS[cfg.arch])
    fields.update(cfg.overrides)
    if "transformer_width" in cfg.overrides and "transformer_heads" not in cfg.overrides:
        fields["transformer_heads"] = max(1, fields["transformer_width"] // 64)
    is_resnet = fields["vision_patch_size"] is None
    if cfg.image_encoder == "mixer":
        if is_resnet:
            raise InputError(f"mixer needs a ViT-shaped arch (a patch size), not {cfg.arch}", option="image_encoder")
        fields["vision_mixer"] = True
    elif cfg.image_encoder == "resnet" and not is_resnet:
        raise InputError(f"resnet needs a ResNet arch such as RN50, not {cfg.arch}", option="image_encoder")
    elif cfg.image_encoder == "vit" and is_resnet:
        raise InputError(f"vit needs a ViT arch, not {cfg.arch}", option="image_encoder")
    fields["text_mixer"] = cfg.text_encoder == "mixer"
    config = CLIPConfig(**fields)
    if not is_resnet and config.image_resolution % config.vision_patch_size:
        raise InputError(f"image size {config.image_resolution} is not a multiple of the patch size {config.vision_patch_size}")
    return config


def _check_encoders(cfg: TrainConfig, config: CLIPConfig, source: str) -> None:
    image = "mixer" if config.vision_mixer else ("resnet" if config.vision_patch_size is None else "vit")
    text = "mixer" if config.text_mixer else "transformer"
    if cfg.image_encoder not in (None, image) or cfg.text_encoder not in (None, text):
        raise InputError(f"{source} has a {image} image encoder and a {text} text encoder; "
                         "the image and text encoder choices cannot change a loaded model")


def load_clip(path_or_name: str, feedback: Feedback = SILENT) -> tuple[CLIP, str | None]:
    """Any model clipcli can load (a name, hub repo, folder or file), in float32, to train,
    and the note on what was assumed about a checkpoint that does not describe itself."""
    from ..loading import load, resolve

    model, note = load(resolve(path_or_name, feedback=feedback), "cpu", torch.float32)
    for parameter in model.parameters():  # own the memory: a memory-mapped file may back the tensors
        parameter.data = parameter.data.clone()
    return model, note


def save_checkpoint(clip: CLIP, path: Path, metadata: dict | None = None) -> None:
    """The model as safetensors with OpenAI's key names (written atomically)."""
    from ..checkpoint import write_safetensors

    state = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in clip.state_dict().items()}
    metadata = {k: config_to_json(v) if isinstance(v, CLIPConfig) else json.dumps(v) for k, v in (metadata or {}).items()}
    write_safetensors(state, path, metadata)


def _save_state(state: dict, path: Path) -> None:
    """The optimizer and scheduler state for ``--resume``, written atomically."""
    from ..fsutil import atomic_path, write_error

    try:
        with atomic_path(path, overwrite=True) as temp:
            torch.save(state, temp)
    except RuntimeError as error:  # torch.save's wrapper around an I/O error
        raise write_error(OSError(None, str(error)), path) from None


def apply_freeze(clip: CLIP, freeze: str | None) -> None:
    """``image``: only the text side trains (LiT's locked image tower); ``text``: the converse."""
    if freeze is None:
        return
    if freeze not in ("image", "text"):
        raise InputError(f"{freeze!r}: choose image or text", option="freeze")
    for name, parameter in clip.named_parameters():
        on_image_side = name.startswith("visual.")
        if on_image_side == (freeze == "image") and name != "logit_scale":
            parameter.requires_grad_(False)


# ----------------------------------------------------------------------------- the loop


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
    fresh_config = model_config(cfg) if not (cfg.resume or cfg.init) else None  # check options before touching --out
    # Every input is checked before --out is touched (an --overwrite run would discard the old one).
    if cfg.zeroshot_dir and not zeroshot_classes(cfg.zeroshot_dir):
        raise InputError(f"{cfg.zeroshot_dir} holds no class folders with images", option="zeroshot_dir")
    train_pairs = read_pairs(cfg.train_data, cfg.img_key, cfg.caption_key)
    val_pairs = read_pairs(cfg.val_data, cfg.img_key, cfg.caption_key) if cfg.val_data else None
    if len(train_pairs) < cfg.batch_size:
        raise InputError(f"{cfg.batch_size} is more than the {len(train_pairs)} pairs in {cfg.train_data}",
                         option="batch_size")
    note = None
    if cfg.init and not cfg.resume:
        clip, note = load_clip(cfg.init, feedback if main else SILENT)
        _check_encoders(cfg, clip.config, cfg.init)
    out = _prepare_out(cfg, main)
    torch.manual_seed(cfg.seed)

    state = None
    if cfg.resume:
        state = torch.load(out / STATE, map_location="cpu", weights_only=True)
        clip, _ = load_clip(str(out / CHECKPOINT))
    elif not cfg.init:
        clip = create_model(fresh_config)
    apply_freeze(clip, cfg.freeze)
    clip = clip.to(device).train()
    config = clip.config

    transform = preprocess_for(config)  # inference's transform, bit for bit, without torchvision
    train_set = PairDataset(train_pairs, transform, config.context_length)
    val_set = PairDataset(val_pairs, transform, config.context_length) if val_pairs else None
    sampler = GlobalBatches(len(train_set), cfg.batch_size, topology.rank, topology.world_size, cfg.seed)
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * cfg.epochs

    network = ContrastiveModel(clip)
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
    if note:
        say(f"note: {note}")
    live = main and feedback.status is not None
    say(f"training {_describe(config)} on {len(train_set)} pairs, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
        f"global batch {cfg.batch_size} over {topology.world_size} process(es) on {device}")

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
                image_features, text_features, scale = network(images, texts)
            image_features = distributed.gather_rows(image_features.float(), sizes)
            text_features = distributed.gather_rows(text_features.float(), sizes)
            loss = contrastive_loss(image_features, text_features, scale.float())
            if not math.isfinite(loss.item()):
                raise ClipcliError(f"the loss became {loss.item()} at step {step}", fix="lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
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
                line = f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} loss {loss.item():.4f} lr {lr:.2e} {rate:.0f} samples/s"
                if live:  # e.g. a terminal: one line, rewritten every step
                    feedback.status(line)
                elif logged:
                    say(line)
            if logged:
                metrics.write({"kind": "train", "epoch": epoch + 1, "step": step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                               "lr": lr, "logit_scale": float(clip.logit_scale.detach().exp()), "samples_per_second": rate})
        elapsed = time.perf_counter() - started
        skipped = int(distributed.all_sum(skips.count, device))
        if main:
            evaluation = {"kind": "eval", "epoch": epoch + 1, "step": step, "samples_per_second": seen / elapsed,
                          "skipped_images": skipped}
            evaluation.update(_evaluate(clip, cfg, val_set, transform, device, skips))
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


def _evaluate(clip: CLIP, cfg: TrainConfig, val_set, transform, device, skips) -> dict:
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
                                         cfg.batch_size, cfg.workers, skips)
            results.update({f"zeroshot/{k}": v for k, v in accuracy.items()})
    return results


def _describe(config: CLIPConfig) -> str:
    image = "Mixer" if config.vision_mixer else ("ResNet" if config.vision_patch_size is None else "ViT")
    text = "Mixer" if config.text_mixer else "Transformer"
    return f"CLIP ({image} image encoder, {text} text encoder, {config.image_resolution} px, embed {config.embed_dim})"
