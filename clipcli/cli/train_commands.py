"""`clipcli train`: contrastive or sigmoid pre-training and fine-tuning (single process or under torchrun)."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Optional

import typer

from .app import command
from .options import DeviceOpt, QuietOpt, precision_name


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


@command("train")
def train(
    train_data: Annotated[str, typer.Option("--train-data", help="CSV/TSV of image paths and captions, or a folder of images with same-named .txt captions.", rich_help_panel=DATA)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", show_default=False, help="Run folder: config.json, metrics.jsonl, last.safetensors, state.pt.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", hidden=True, help="The old name of --output.")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="Held-out pairs for recall@1/5/10 after each epoch.", rich_help_panel=DATA)] = None,
    zeroshot_dir: Annotated[Optional[str], typer.Option("--zeroshot-dir", help="One sub-folder of images per class, for zero-shot accuracy after each epoch.", rich_help_panel=DATA)] = None,
    template: Annotated[list[str], typer.Option("--template", "-t", help="Zero-shot prompt with {} for the class name (repeatable).", rich_help_panel=DATA)] = [],
    zeroshot_template: Annotated[list[str], typer.Option("--zeroshot-template", hidden=True, help="The old name of --template.")] = [],
    img_key: Annotated[str, typer.Option("--img-key", help="Image-path column of the CSV/TSV.", rich_help_panel=DATA)] = "filepath",
    caption_key: Annotated[str, typer.Option("--caption-key", help="Caption column of the CSV/TSV.", rich_help_panel=DATA)] = "title",
    arch: Annotated[str, typer.Option("--arch", help="Preset to train from scratch: tiny, small, RN50, RN101, ViT-B/32, ViT-B/16, ViT-L/14 (also spelled as open_clip does: ViT-B-32), or a SigLIP: siglip-tiny, siglip-small (CLIP's BPE tokenizer, context 64).", rich_help_panel=ARCH)] = "tiny",
    init: Annotated[Optional[str], typer.Option("--init", help="Fine-tune from a released model name or a checkpoint file (replaces --arch).", rich_help_panel=ARCH)] = None,
    image_encoder: Annotated[Optional[ImageEncoder], typer.Option("--image-encoder", help="vit, resnet (needs an RN preset) or mixer (MLP-Mixer on ViT patches).", rich_help_panel=ARCH)] = None,
    text_encoder: Annotated[Optional[TextEncoder], typer.Option("--text-encoder", help="transformer or mixer (causal MLP-Mixer).", rich_help_panel=ARCH)] = None,
    embed_dim: Annotated[Optional[int], typer.Option("--embed-dim", min=1, help="Override the preset's joint embedding size.", rich_help_panel=ARCH)] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Override the input resolution.", rich_help_panel=ARCH)] = None,
    patch_size: Annotated[Optional[int], typer.Option("--patch-size", min=1, help="Override the ViT patch size.", rich_help_panel=ARCH)] = None,
    vision_width: Annotated[Optional[int], typer.Option("--vision-width", min=1, help="Override the image encoder width.", rich_help_panel=ARCH)] = None,
    vision_layers: Annotated[Optional[int], typer.Option("--vision-layers", min=1, help="Override the ViT/Mixer depth.", rich_help_panel=ARCH)] = None,
    text_width: Annotated[Optional[int], typer.Option("--text-width", min=1, help="Override the text encoder width (heads = width/64).", rich_help_panel=ARCH)] = None,
    text_layers: Annotated[Optional[int], typer.Option("--text-layers", min=1, help="Override the text encoder depth.", rich_help_panel=ARCH)] = None,
    freeze: Annotated[Optional[Side], typer.Option("--freeze", help="Keep one tower's weights fixed.", rich_help_panel=ARCH)] = None,
    lock_image: Annotated[bool, typer.Option("--lock-image", help="Train only the text side (same as --freeze image).", rich_help_panel=ARCH)] = False,
    loss: Annotated[Optional[Loss], typer.Option("--loss", show_default=False, help="contrastive: CLIP's softmax over the batch; sigmoid: SigLIP's loss on every image-caption pair, with a learned bias (added at -10, the scale restarted at 10, for a model without one). Default: sigmoid for SigLIP presets and models with a logit bias, else contrastive.", rich_help_panel=OPT)] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, rich_help_panel=OPT)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Global batch: the batch the loss sees, over all processes.", rich_help_panel=OPT)] = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate of AdamW.", rich_help_panel=OPT)] = 5e-4,
    wd: Annotated[float, typer.Option("--wd", min=0.0, help="Weight decay (never on gains, biases, embeddings, temperature).", rich_help_panel=OPT)] = 0.2,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Linear warmup steps before the cosine decay.", rich_help_panel=OPT)] = 100,
    grad_clip: Annotated[float, typer.Option("--grad-clip", min=0.0, help="Clip the gradient norm (0: off).", rich_help_panel=OPT)] = 1.0,
    precision: Annotated[str, typer.Option("--precision", parser=precision_name, metavar="fp32|fp16|bf16", help="fp32, bf16 autocast, or fp16 autocast with a gradient scaler.", rich_help_panel=OPT)] = "fp32",
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=OPT)] = 0,
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Processes decoding images for each rank (0: in the training process). Processes, not the threads of the other commands: each holds a copy of the data set's list.")] = 2,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps between progress lines and metrics records.")] = 10,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last finished epoch.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in an --output that already holds a run.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a CLIP or a SigLIP, from scratch (--arch) or from a checkpoint (--init).

    The contrastive loss is CLIP's symmetric cross-entropy over the batch's image-caption
    similarities with a learned temperature; the sigmoid loss (--loss sigmoid, SigLIP's) scores
    every image-caption pair on its own with a learned temperature and bias. AdamW with warmup
    and cosine decay. Under torchrun every process takes its share of each global batch and
    meets every other process's captions (gathered, or passed round the ring for the sigmoid
    loss), so the batch is --batch-size whatever the number of processes.

    Example: clipcli train --train-data train.csv --val-data val.csv --arch tiny --epochs 10 -o runs/tiny

    Example: torchrun --nproc-per-node 2 -m clipcli train --train-data train.csv -o runs/ddp

    Example: clipcli train --init ViT-B/32 --lock-image --train-data pets.csv --lr 1e-5 -o runs/pets

    Example: clipcli train --train-data train.csv --arch siglip-tiny -o runs/siglip
    """
    from ..errors import InputError
    from ..train.loop import TrainConfig
    from ..train.loop import train as run_training
    from .render import StderrLines

    if output and out and output != out:
        raise InputError("give the run folder once: -o/--output (--out is its old name)")
    output = output or out
    if not output:
        raise InputError("-o/--output DIR is required: the run folder")
    if lock_image and freeze == Side.text:
        raise InputError("--lock-image freezes the image side; it cannot be combined with --freeze text")
    overrides = {key: value for key, value in dict(
        embed_dim=embed_dim, image_resolution=image_size, vision_patch_size=patch_size, vision_width=vision_width,
        vision_layers=vision_layers, transformer_width=text_width, transformer_layers=text_layers).items() if value is not None}
    if init and overrides:
        raise InputError("--init takes the architecture from the checkpoint; drop the size options")
    from ..train.presets import preset_name

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = TrainConfig(
        train_data=train_data, out=output, val_data=val_data, zeroshot_dir=zeroshot_dir,
        zeroshot_templates=[*template, *zeroshot_template] or ["a photo of a {}."], img_key=img_key,
        caption_key=caption_key, arch=arch if init else preset_name(arch), init=init, image_encoder=image_encoder.value if image_encoder else None,
        text_encoder=text_encoder.value if text_encoder else None, overrides=overrides, loss=loss.value if loss else None,
        freeze="image" if lock_image else (freeze.value if freeze else None), epochs=epochs, batch_size=batch_size,
        lr=lr, wd=wd, warmup=warmup, grad_clip=grad_clip, precision=precision, device=device,
        workers=workers,
        seed=seed, log_every=log_every, resume=resume, overwrite=overwrite,
    )
    for template in config.zeroshot_templates:
        if template.count("{}") != 1:
            raise InputError(f"--template {template!r} must contain exactly one {{}} for the class name")
    lines = StderrLines()
    try:
        checkpoint = run_training(config, lines.feedback(quiet))
    finally:
        lines.close()
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(checkpoint))
