"""`clipcli train`: contrastive or sigmoid pre-training and fine-tuning (single process or under torchrun)."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Optional

import typer

from .app import command
from .options import DeviceOpt, QuietOpt, fixed_precision_name


class ImageEncoder(str, Enum):
    vit = "vit"
    resnet = "resnet"
    mixer = "mixer"


class TextEncoder(str, Enum):
    transformer = "transformer"
    mixer = "mixer"


class Loss(str, Enum):
    contrastive = "contrastive"
    sigmoid = "sigmoid"


class Side(str, Enum):
    image = "image"
    text = "text"


ARCH = "Architecture"
DATA = "Data"
OPT = "Optimisation"
RUN = "Checkpoints and logs"

# Parameters whose TrainConfig field has another name (the rest share it): what a resumed run was given.
FIELDS = {"output": "out", "template": "zeroshot_templates", "zeroshot_template": "zeroshot_templates",
          "lock_image": "freeze", "lock_text": "freeze", "no_augment": "aug_cfg",
          "embed_dim": "overrides", "image_size": "overrides", "patch_size": "overrides", "vision_width": "overrides",
          "vision_layers": "overrides", "text_width": "overrides", "text_layers": "overrides",
          "wd_embeddings": "decay_embeddings", "no_drop_last": "drop_last"}


@command("train")
def train(
    ctx: typer.Context,
    train_data: Annotated[Optional[str], typer.Option("--train-data", show_default=False, help="CSV/TSV of image paths and captions, a folder of images with same-named .txt captions, or WebDataset shards (\"shards/{00000..00099}.tar\": image + .txt per sample). A resumed run reads its own.", rich_help_panel=DATA)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", show_default=False, help="Run folder: config.json, metrics.jsonl, step_N checkpoints, last.safetensors, state.pt.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", hidden=True, help="The old name of --output.")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="Held-out pairs (CSV/TSV, folder or shards) for recall@1/5/10.", rich_help_panel=DATA)] = None,
    zeroshot_dir: Annotated[Optional[str], typer.Option("--zeroshot-dir", help="One sub-folder of images per class, for zero-shot accuracy.", rich_help_panel=DATA)] = None,
    template: Annotated[list[str], typer.Option("--template", "-t", help="Zero-shot prompt with {} for the class name (repeatable).", rich_help_panel=DATA)] = [],
    zeroshot_template: Annotated[list[str], typer.Option("--zeroshot-template", hidden=True, help="The old name of --template.")] = [],
    img_key: Annotated[str, typer.Option("--img-key", help="Image-path column of the CSV/TSV.", rich_help_panel=DATA)] = "filepath",
    caption_key: Annotated[str, typer.Option("--caption-key", help="Caption column of the CSV/TSV.", rich_help_panel=DATA)] = "title",
    train_num_samples: Annotated[Optional[int], typer.Option("--train-num-samples", min=1, show_default=False, help="Samples per epoch of shards (default: sizes.json or img2dataset's _stats.json, else counted).", rich_help_panel=DATA)] = None,
    dataset_resampled: Annotated[bool, typer.Option("--dataset-resampled", help="Draw shards with replacement (open_clip's); needs --train-num-samples or sizes.", rich_help_panel=DATA)] = False,
    aug_cfg: Annotated[list[str], typer.Option("--aug-cfg", help="Training augmentation as open_clip names it, KEY=VALUE (repeatable): scale='(0.9,1.0)', ratio, color_jitter=0.4, color_jitter_prob, gray_scale_prob. Default: a RandomResizedCrop of scale 0.9-1.", rich_help_panel=DATA)] = [],
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Train on inference's preprocessing (resize and centre crop).", rich_help_panel=DATA)] = False,
    no_drop_last: Annotated[bool, typer.Option("--no-drop-last", help="Train on a last batch that does not fill (default: left out, and said).", rich_help_panel=DATA)] = False,
    arch: Annotated[str, typer.Option("--arch", help="Preset to train from scratch: tiny, small, RN50, RN101, ViT-B/32, ViT-B/16, ViT-L/14 (also spelled as open_clip does: ViT-B-32), or a SigLIP: siglip-tiny, siglip-small (CLIP's BPE tokenizer, context 64). With --image-tower: the text tower's size.", rich_help_panel=ARCH)] = "tiny",
    init: Annotated[Optional[str], typer.Option("--init", help="Fine-tune from a released model name or a checkpoint file (replaces --arch).", rich_help_panel=ARCH)] = None,
    image_encoder: Annotated[Optional[ImageEncoder], typer.Option("--image-encoder", help="vit, resnet (needs an RN preset) or mixer (MLP-Mixer on ViT patches).", rich_help_panel=ARCH)] = None,
    text_encoder: Annotated[Optional[TextEncoder], typer.Option("--text-encoder", help="transformer or mixer (causal MLP-Mixer).", rich_help_panel=ARCH)] = None,
    image_tower: Annotated[Optional[str], typer.Option("--image-tower", show_default=False, help="A torchvision backbone as the image tower, with a projection to the joint space: torchvision:resnet50 (resnet18/34/50/101, convnext_tiny/small/base, vit_b_16).", rich_help_panel=ARCH)] = None,
    image_pretrained: Annotated[Optional[str], typer.Option("--image-pretrained", show_default=False, help="The --image-tower's weights: imagenet (torchvision's, from its cache or downloaded) or a state-dict file.", rich_help_panel=ARCH)] = None,
    text_init: Annotated[Optional[str], typer.Option("--text-init", show_default=False, help="With --image-tower: the text tower and tokenizer of this CLIP (a name or checkpoint).", rich_help_panel=ARCH)] = None,
    embed_dim: Annotated[Optional[int], typer.Option("--embed-dim", min=1, help="Override the preset's joint embedding size.", rich_help_panel=ARCH)] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Override the input resolution.", rich_help_panel=ARCH)] = None,
    patch_size: Annotated[Optional[int], typer.Option("--patch-size", min=1, help="Override the ViT patch size.", rich_help_panel=ARCH)] = None,
    vision_width: Annotated[Optional[int], typer.Option("--vision-width", min=1, help="Override the image encoder width.", rich_help_panel=ARCH)] = None,
    vision_layers: Annotated[Optional[int], typer.Option("--vision-layers", min=1, help="Override the ViT/Mixer depth.", rich_help_panel=ARCH)] = None,
    text_width: Annotated[Optional[int], typer.Option("--text-width", min=1, help="Override the text encoder width (heads = width/64).", rich_help_panel=ARCH)] = None,
    text_layers: Annotated[Optional[int], typer.Option("--text-layers", min=1, help="Override the text encoder depth.", rich_help_panel=ARCH)] = None,
    freeze: Annotated[Optional[Side], typer.Option("--freeze", help="Keep one tower's weights fixed (an --image-tower's projection still trains).", rich_help_panel=ARCH)] = None,
    lock_image: Annotated[bool, typer.Option("--lock-image", help="Train only the text side (same as --freeze image); with --image-tower, its projection too.", rich_help_panel=ARCH)] = False,
    lock_image_unlocked_groups: Annotated[int, typer.Option("--lock-image-unlocked-groups", min=0, help="With --lock-image and --image-tower: the last N stage groups still train.", rich_help_panel=ARCH)] = 0,
    lock_text: Annotated[bool, typer.Option("--lock-text", help="Keep the text tower fixed (same as --freeze text).", rich_help_panel=ARCH)] = False,
    loss: Annotated[Optional[Loss], typer.Option("--loss", show_default=False, help="contrastive: CLIP's softmax over the batch; sigmoid: SigLIP's loss on every image-caption pair, with a learned bias (added at -10, the scale restarted at 10, for a model without one). Default: sigmoid for SigLIP presets and models with a logit bias, else contrastive.", rich_help_panel=OPT)] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, rich_help_panel=OPT)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Global batch of one forward pass, over all processes.", rich_help_panel=OPT)] = 64,
    accum_freq: Annotated[int, typer.Option("--accum-freq", min=1, help="Batches per optimizer step: the loss covers all of them, as one batch K times larger would (features cached, as open_clip does).", rich_help_panel=OPT)] = 1,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute each block's activations in the backward pass: less memory, about a third more compute.", rich_help_panel=OPT)] = False,
    local_loss: Annotated[bool, typer.Option("--local-loss", help="Under torchrun: each process scores its own images and captions against all (logits N/W x N, not N x N); the same gradients.", rich_help_panel=OPT)] = False,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate of AdamW.", rich_help_panel=OPT)] = 5e-4,
    wd: Annotated[float, typer.Option("--wd", min=0.0, help="Weight decay: on every matrix, embeddings included, as in CLIP and open_clip; never on gains, biases, temperature.", rich_help_panel=OPT)] = 0.2,
    wd_embeddings: Annotated[bool, typer.Option("--wd-embeddings/--no-wd-embeddings", help="--no-wd-embeddings exempts the token and position embeddings from weight decay.", rich_help_panel=OPT)] = True,
    beta1: Annotated[Optional[float], typer.Option("--beta1", min=0.0, max=1.0, show_default=False, help="Adam beta1 (default 0.9).", rich_help_panel=OPT)] = None,
    beta2: Annotated[Optional[float], typer.Option("--beta2", min=0.0, max=1.0, show_default=False, help="Adam beta2 (default 0.98 for a ViT image tower, else 0.999, as open_clip).", rich_help_panel=OPT)] = None,
    eps: Annotated[Optional[float], typer.Option("--eps", min=0.0, show_default=False, help="Adam epsilon (default 1e-6 for a ViT image tower, else 1e-8).", rich_help_panel=OPT)] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, show_default=False, help="Linear warmup steps before the cosine decay (default 100; a tenth of a shorter run, said).", rich_help_panel=OPT)] = None,
    grad_clip: Annotated[float, typer.Option("--grad-clip", min=0.0, help="Clip the gradient norm (0: off).", rich_help_panel=OPT)] = 1.0,
    precision: Annotated[str, typer.Option("--precision", parser=fixed_precision_name, metavar="fp32|fp16|bf16", help="fp32, bf16 autocast, or fp16 autocast with a gradient scaler.", rich_help_panel=OPT)] = "fp32",
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=OPT)] = 0,
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Processes decoding images for each rank (0: in the training process). Processes, not the threads of the other commands.")] = 2,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps between progress lines and metrics records.", rich_help_panel=RUN)] = 10,
    val_frequency: Annotated[int, typer.Option("--val-frequency", min=1, help="Epochs between evaluations (the last is always evaluated).", rich_help_panel=RUN)] = 1,
    save_every_n_steps: Annotated[int, typer.Option("--save-every-n-steps", min=0, help="A checkpoint every N steps too (0: after each epoch only).", rich_help_panel=RUN)] = 0,
    keep: Annotated[int, typer.Option("--keep", min=0, help="Checkpoints kept, the newest (0: all).", rich_help_panel=RUN)] = 0,
    report_to: Annotated[list[str], typer.Option("--report-to", help="Also log to: tensorboard (events in RUN/tensorboard; needs the tensorboard package).", rich_help_panel=RUN)] = [],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint, with its own options but those given again.", rich_help_panel=RUN)] = False,
    resume_from: Annotated[Optional[str], typer.Option("--resume-from", show_default=False, help="Continue the run from this checkpoint of it (RUN/step_N.safetensors); implies --resume.", rich_help_panel=RUN)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in an --output that already holds a run.", rich_help_panel=RUN)] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a CLIP or a SigLIP, from scratch (--arch), from a checkpoint (--init), or from a
    torchvision backbone and a text tower (--image-tower).

    The contrastive loss is CLIP's symmetric cross-entropy over the batch's image-caption
    similarities with a learned temperature; the sigmoid loss (--loss sigmoid, SigLIP's) scores
    every image-caption pair on its own with a learned temperature and bias. AdamW with warmup
    and cosine decay, open_clip's recipe. Under torchrun every process takes its share of each
    global batch and meets every other process's captions (gathered, or passed round the ring
    for the sigmoid loss), so the batch is --batch-size whatever the number of processes.
    A checkpoint is written after each epoch (and every --save-every-n-steps); a killed run
    goes on exactly where its last one was with --resume.

    Example: clipcli train --train-data train.csv --val-data val.csv --arch tiny --epochs 10 -o runs/tiny

    Example: clipcli train --train-data "shards/{00000..00009}.tar" --accum-freq 2 --report-to tensorboard -o runs/wds

    Example: torchrun --nproc-per-node 2 -m clipcli train --train-data train.csv -o runs/ddp

    Example: clipcli train --init ViT-B/32 --lock-image --train-data pets.csv --lr 1e-5 -o runs/pets

    Example: clipcli train --image-tower torchvision:resnet50 --image-pretrained imagenet --text-init ViT-B/32 --lock-image --lock-text --train-data pets.csv -o runs/seed
    """
    from ..errors import InputError
    from ..train.augment import parse_aug_cfg
    from ..train.loop import TrainConfig
    from ..train.loop import train as run_training
    from ..train.presets import preset_name
    from .render import StderrLines

    if output and out and output != out:
        raise InputError("give the run folder once: -o/--output (--out is its old name)")
    output = output or out
    if not output:
        raise InputError("-o/--output DIR is required: the run folder")
    resume = resume or resume_from is not None
    if not (train_data or resume):
        raise InputError("--train-data is required: the image-caption pairs to train on")
    sides = {"image" for flag in (lock_image,) if flag} | {"text" for flag in (lock_text,) if flag}
    if freeze is not None:
        sides.add(freeze.value)
    if len(sides) > 1 and not image_tower:
        raise InputError("only one tower can be kept fixed (both, with --image-tower: its projection and the text "
                         "projection train): --lock-image/--freeze image or --lock-text/--freeze text")
    if no_augment and aug_cfg:
        raise InputError("--no-augment and --aug-cfg contradict each other; give one")
    overrides = {key: value for key, value in dict(
        embed_dim=embed_dim, image_resolution=image_size, vision_patch_size=patch_size, vision_width=vision_width,
        vision_layers=vision_layers, transformer_width=text_width, transformer_layers=text_layers).items() if value is not None}
    if init and overrides:
        raise InputError("--init takes the architecture from the checkpoint; drop the size options")
    if image_tower and (init or image_encoder):
        raise InputError("--image-tower builds the image side itself; drop --init/--image-encoder (--text-init gives the text tower)")
    if (image_pretrained or text_init) and not image_tower:
        raise InputError("--image-pretrained and --text-init go with --image-tower")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = TrainConfig(
        train_data=train_data or "", out=output, val_data=val_data, zeroshot_dir=zeroshot_dir,
        zeroshot_templates=[*template, *zeroshot_template] or ["a photo of a {}."], img_key=img_key,
        caption_key=caption_key, train_num_samples=train_num_samples, dataset_resampled=dataset_resampled,
        aug_cfg=None if no_augment else parse_aug_cfg(aug_cfg), drop_last=not no_drop_last,
        arch=arch if init else preset_name(arch), init=init, image_encoder=image_encoder.value if image_encoder else None,
        text_encoder=text_encoder.value if text_encoder else None, overrides=overrides, image_tower=image_tower,
        image_pretrained=image_pretrained, text_init=text_init, lock_image_unlocked_groups=lock_image_unlocked_groups,
        loss=loss.value if loss else None, freeze="both" if len(sides) > 1 else next(iter(sides), None), epochs=epochs, batch_size=batch_size,
        accum_freq=accum_freq, grad_checkpointing=grad_checkpointing, local_loss=local_loss, lr=lr, wd=wd,
        decay_embeddings=wd_embeddings, beta1=beta1, beta2=beta2,
        eps=eps, warmup=warmup, grad_clip=grad_clip, precision=precision, device=device, workers=workers, seed=seed,
        log_every=log_every, val_frequency=val_frequency, save_every_n_steps=save_every_n_steps, keep=keep,
        report_to=[name for value in report_to for name in value.split(",") if name], resume=resume,
        resume_from=resume_from, overwrite=overwrite,
    )
    for template in config.zeroshot_templates:
        if template.count("{}") != 1:
            raise InputError(f"--template {template!r} must contain exactly one {{}} for the class name")
    given = {FIELDS.get(param.name, param.name) for param in ctx.command.params  # typer may vendor its own click
             if getattr(ctx.get_parameter_source(param.name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}
    lines = StderrLines()
    try:
        checkpoint = run_training(config, lines.feedback(quiet), given=given)
    finally:
        lines.close()
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(checkpoint))
