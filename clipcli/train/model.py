"""The model a run trains: from a preset, a checkpoint or the run itself; the loss it takes;
which of its parameters train; how it is saved.

Everything here uses the surface every model family shares (``config``, ``encode_image``,
``encode_text``, ``logit_scale``, ``logit_bias``, ``state_dict``), so a SigLIP
(:mod:`clipcli.models.siglip`) trains as a CLIP does. Its parameters are named by tower:
``visual.`` for the image side, everything else but the temperature and bias for the text side
(CLIP's ``transformer.``/``token_embedding``/..., SigLIP's ``text.``).

The loss and the logit bias go together: the sigmoid loss needs a bias (a model without one,
a CLIP preset or checkpoint, gains one, started as SigLIP starts it); a model with a bias
scores each pair by a sigmoid, which the contrastive loss does not train, so that pairing is
refused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InputError, UnsupportedModelError
from ..feedback import SILENT, Feedback
from ..models.config import CLIPConfig, config_to_json
from .loss import LOSSES, SIGMOID_START

FROZEN_NEVER = ("logit_scale", "logit_bias")  # shared by both towers: train whatever is frozen


def model_config(arch: str, overrides: dict, image_encoder: str | None, text_encoder: str | None) -> CLIPConfig:
    """The config of preset ``arch`` with ``overrides`` (CLIPConfig fields) and the encoders asked for."""
    from .presets import PRESETS

    if arch not in PRESETS:
        raise InputError(f"{arch!r} is not a preset; choose one of {', '.join(PRESETS)}", option="arch")
    fields = dict(PRESETS[arch])
    fields.update(overrides)
    if "transformer_width" in overrides and "transformer_heads" not in overrides:
        fields["transformer_heads"] = max(1, fields["transformer_width"] // 64)
    if fields.get("family", "clip") == "siglip":
        return _siglip_config(arch, fields, overrides, image_encoder, text_encoder)
    is_resnet = fields["vision_patch_size"] is None
    if image_encoder == "mixer":
        if is_resnet:
            raise InputError(f"mixer needs a ViT-shaped arch (a patch size), not {arch}", option="image_encoder")
        fields["vision_mixer"] = True
    elif image_encoder == "resnet" and not is_resnet:
        raise InputError(f"resnet needs a ResNet arch such as RN50, not {arch}", option="image_encoder")
    elif image_encoder == "vit" and is_resnet:
        raise InputError(f"vit needs a ViT arch, not {arch}", option="image_encoder")
    fields["text_mixer"] = text_encoder == "mixer"
    config = CLIPConfig(**fields)
    if not is_resnet and config.image_resolution % config.vision_patch_size:
        raise InputError(f"image size {config.image_resolution} is not a multiple of the patch size {config.vision_patch_size}")
    return config


def _siglip_config(arch: str, fields: dict, overrides: dict, image_encoder: str | None,
                   text_encoder: str | None) -> CLIPConfig:
    if image_encoder not in (None, "vit"):
        raise InputError(f"{image_encoder} is not a SigLIP image encoder ({arch} has a ViT)", option="image_encoder")
    if text_encoder not in (None, "transformer"):
        raise InputError(f"{text_encoder} is not a SigLIP text encoder ({arch} has a Transformer)", option="text_encoder")
    if "embed_dim" not in overrides:  # a SigLIP's image embedding is its ViT's output: no projection
        fields["embed_dim"] = fields["vision_width"]
    elif overrides["embed_dim"] != fields["vision_width"]:
        raise InputError(f"{overrides['embed_dim']} differs from the vision width {fields['vision_width']}: a SigLIP's "
                         "image embedding is its ViT's output, with no projection", option="embed_dim")
    config = CLIPConfig(**fields)
    if config.image_resolution % config.vision_patch_size:
        raise InputError(f"image size {config.image_resolution} is not a multiple of the patch size {config.vision_patch_size}")
    return config


def check_encoders(config: CLIPConfig, image_encoder: str | None, text_encoder: str | None, source: str) -> None:
    """Refuse encoder choices that differ from what a loaded model has."""
    image = "mixer" if config.vision_mixer else ("resnet" if config.vision_patch_size is None else "vit")
    text = "mixer" if config.text_mixer else "transformer"
    if image_encoder not in (None, image) or text_encoder not in (None, text):
        raise InputError(f"{source} has a {image} image encoder and a {text} text encoder; "
                         "the image and text encoder choices cannot change a loaded model")


def choose_loss(requested: str | None, config: CLIPConfig, source: str, resumed: bool = False) -> str:
    """The loss a model of ``config`` (from ``source``) trains with: ``requested``, or the
    model's own (sigmoid when it has a logit bias, else contrastive). A bias model is never
    trained contrastively, and a resumed run keeps the loss it started with."""
    if requested is not None and requested not in LOSSES:
        raise InputError(f"{requested!r}: choose {' or '.join(LOSSES)}", option="loss")
    own = "sigmoid" if config.logit_bias else "contrastive"
    if requested == "contrastive" and config.logit_bias:
        raise InputError(f"'contrastive' cannot train {source}: it has a logit bias (it scores each pair by a "
                         "sigmoid, as SigLIP does); train it with the sigmoid loss", option="loss")
    if resumed and requested not in (None, own):
        raise InputError(f"{requested!r}: the run in {source} trains with the {own} loss, which a resumed run keeps",
                         option="loss")
    return requested or own


def new_model(config: CLIPConfig) -> torch.nn.Module:
    """A freshly initialised model of ``config``, of its family (the factory knows which)."""
    from ..models.factory import create_model

    return create_model(config)


def with_logit_bias(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a learned logit bias added for the sigmoid loss, bias and scale started
    as SigLIP starts them (-10 and 10), every other weight kept. The scale restarts too: a
    CLIP's learned 100 with a bias of -10 would open with huge losses on the negatives (open_clip
    keeps the scale and starts the bias at 0)."""
    from ..models.factory import create_model

    grown = create_model(replace(model.config, logit_bias=True), initialize=False)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False, assign=True)
    if missing != ["logit_bias"] or unexpected:  # pragma: no cover - the same architecture but the bias
        raise UnsupportedModelError(f"cannot add a logit bias to this model (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        grown.logit_bias.fill_(SIGMOID_START["logit_bias"])
        grown.logit_scale.fill_(SIGMOID_START["logit_scale"])
    return grown


def load_for_training(path_or_name: str, feedback: Feedback = SILENT) -> tuple[torch.nn.Module, str | None, dict]:
    """Any model clipcli can load (a name, hub repo, folder or file), in float32, to train;
    the note on what was assumed about a checkpoint that does not describe itself; and the
    model's own tokenizer files by name (none for the bundled BPE), which a run keeps beside
    its checkpoint so that it loads with them."""
    from ..loading import load, resolve

    source = resolve(path_or_name, feedback=feedback)
    model, note = load(source, "cpu", torch.float32)
    for parameter in model.parameters():  # own the memory: a memory-mapped file may back the tensors
        parameter.data = parameter.data.clone()
    # the files the tokenizer reads (a hub tokenizer's are fetched here), else those found with the weights
    return model, note, dict(getattr(model.tokenizer, "files", None) or source.tokenizer_files)


def keep_tokenizer_files(files: dict, out: Path) -> None:
    """Copy a model's own tokenizer files (name -> path) into the run folder ``out``, beside
    ``last.safetensors``, where loading looks for them; a previous run's are replaced."""
    import shutil

    if not files:
        return
    from ..text.tokenizers import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    for name, path in files.items():
        shutil.copyfile(path, out / name)


def apply_freeze(model: torch.nn.Module, freeze: str | None) -> None:
    """``image``: only the text side trains (LiT's locked image tower); ``text``: the converse.
    The temperature and the bias always train."""
    if freeze is None:
        return
    if freeze not in ("image", "text"):
        raise InputError(f"{freeze!r}: choose image or text", option="freeze")
    for name, parameter in model.named_parameters():
        on_image_side = name.startswith("visual.")
        if on_image_side == (freeze == "image") and name not in FROZEN_NEVER:
            parameter.requires_grad_(False)


def save_checkpoint(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    """The model as safetensors with its own key names (OpenAI's for a CLIP, open_clip's for a
    SigLIP), ``metadata`` beside them (a config as its JSON), written atomically."""
    from ..checkpoint import write_safetensors

    state = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    metadata = {k: config_to_json(v) if isinstance(v, CLIPConfig) else json.dumps(v) for k, v in (metadata or {}).items()}
    write_safetensors(state, path, metadata)


def is_vit(config: CLIPConfig) -> bool:
    """Whether the image tower is a Vision Transformer (it decides Adam's betas: :mod:`clipcli.train.optim`)."""
    tower = getattr(config, "image_tower", None)
    if tower:
        return "vit" in tower.lower()
    return config.vision_patch_size is not None and not config.vision_mixer


def describe(config: CLIPConfig) -> str:
    image = "Mixer" if config.vision_mixer else ("ResNet" if config.vision_patch_size is None else "ViT")
    if getattr(config, "image_tower", None):
        image = config.image_tower
    text = "Mixer" if config.text_mixer else "Transformer"
    family = {"clip": "CLIP", "siglip": "SigLIP"}.get(config.family, config.family)
    return f"{family} ({image} image encoder, {text} text encoder, {config.image_resolution} px, embed {config.embed_dim})"

