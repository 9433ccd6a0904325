"""A CLIP made of pretrained unimodal towers joined by projections: a torchvision image network
(ImageNet's weights, a state-dict file of it, or random) and a text tower (a CLIP checkpoint's, or
new at a preset's size), of which little more than the projections may train.

That is the recipe of the article clipcli's training started from: take an ImageNet ResNet and
a pretrained text encoder, lock both, and train the two projections into a joint space with
the contrastive loss; unlock the last blocks of the image network when there is data enough.

- :func:`backbone_model` builds the model (:class:`~clipcli.models.clip.CLIP` with an
  ``image_tower``, :mod:`clipcli.models.torchvision_tower`). Its config describes it whole, so a
  checkpoint saved with it loads in every command as any model does. The images are prepared as
  for torchvision's weights: ImageNet's mean and std, bilinear, at the ``image_size`` asked for
  (224 by default), by CLIP's resize and centre crop (torchvision's own evaluation resizes to
  256 or 232 first).
- ImageNet weights are torchvision's default weights for the network, read from the torch hub
  cache (``$TORCH_HOME/hub/checkpoints``), downloaded there by torch.hub when missing and
  online; offline, the error names the file to put there.
- :func:`lock_image_trunk` and :func:`lock_text_tower` freeze the towers as open_clip's
  ``lock_image_tower`` (LiT) and the recipe do; the projections and the temperature always train.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import ClipcliError, InputError
from ..feedback import SILENT, Feedback
from ..models.clip import CLIP
from ..models.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION,
    TORCHVISION_TOWERS,
    CLIPConfig,
    image_tower_fields,
    image_tower_problem,
    tower_of,
)

DEFAULT_IMAGE_SIZE = 224
# The fields of a CLIPConfig that describe its text tower (and its tokenizer): what a model made
# with another's text tower takes from it.
TEXT_FIELDS = ("context_length", "vocab_size", "transformer_width", "transformer_heads", "transformer_layers",
               "text_mixer", "text_mlp_width", "text_pool", "eos_id", "tokenizer", "text_clean")


def tower_name(image_tower: str) -> str:
    """``image_tower`` as a config names it (``torchvision:resnet50``; ``resnet50`` is taken too)."""
    name = image_tower if image_tower.startswith(TORCHVISION) else TORCHVISION + image_tower
    if name[len(TORCHVISION):] not in TORCHVISION_TOWERS:
        known = ", ".join(TORCHVISION + n for n in TORCHVISION_TOWERS)
        raise InputError(f"{image_tower!r} is not an image tower clipcli builds; choose one of {known}",
                         option="image_tower")
    return name


def _text_side(text_init: str | None, preset: str, feedback: Feedback) -> tuple[dict, CLIP | None, list[str], dict]:
    """``(text fields and embed_dim, the model whose text tower is taken or None, notes, tokenizer files)``."""
    from .model import load_for_training
    from .presets import PRESETS, preset_name

    if text_init is None:
        arch = preset_name(preset)
        if arch not in PRESETS:
            raise InputError(f"{preset!r} is not a preset; choose one of {', '.join(PRESETS)}", option="arch")
        fields = PRESETS[arch]
        if fields.get("family", "clip") != "clip":
            raise InputError(f"{preset!r} has a SigLIP text tower; a torchvision image tower goes with a CLIP one "
                             "(tiny, small, ViT-B/32, ...)", option="arch")
        text = {k: fields[k] for k in TEXT_FIELDS if k in fields}
        text.update(embed_dim=fields["embed_dim"], activation=fields.get("activation", "quick_gelu"))
        return text, None, [f"text tower: new, of preset {arch}'s size"], {}
    source, note, tokenizer_files = load_for_training(text_init, feedback)
    if source.config.family != "clip":
        raise InputError(f"{text_init!r} is a {source.config.family}: its text tower is not a CLIP's, which a "
                         "torchvision image tower goes with", option="text_init")
    text = {k: getattr(source.config, k) for k in TEXT_FIELDS}
    text.update(embed_dim=source.config.embed_dim, activation=source.config.text_act)
    return text, source, [note] if note else [], tokenizer_files


def backbone_config(image_tower: str, text: dict, image_size: int | None = None) -> CLIPConfig:
    """The config of a CLIP with ``image_tower`` (``torchvision:resnet50``) and a text tower of
    ``text`` (:data:`TEXT_FIELDS`, ``embed_dim``, ``activation``): torchvision's preprocessing at
    ``image_size`` (default 224)."""
    name = tower_name(image_tower)
    size, patch = image_size or DEFAULT_IMAGE_SIZE, TORCHVISION_TOWERS[name[len(TORCHVISION):]][2]
    if patch is not None and size % patch:
        raise InputError(f"{size} is not a multiple of {name}'s patch size {patch}", option="image_size")
    config = CLIPConfig(image_resolution=size, **image_tower_fields(name), **text,
                        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, interpolation="bilinear",
                        image_tower=name)
    problem = image_tower_problem(config)
    if problem:
        raise InputError(problem)
    return config


def backbone_model(image_tower: str, *, pretrained: str | os.PathLike | None, text_init: str | None,
                   preset: str = "ViT-B/32", embed_dim: int | None, image_size: int | None,
                   feedback: Feedback = SILENT) -> tuple[CLIP, list[str], dict]:
    """A CLIP whose image tower is torchvision's ``image_tower`` network (``torchvision:resnet50``),
    its classifier replaced by a projection to ``embed_dim``; ``(model, notes, tokenizer files)``.

    ``pretrained``: None (random), ``"imagenet"`` (torchvision's default weights for it, see the
    module docstring) or a ``.pth``/``.pt``/``.safetensors`` state dict of the torchvision network.
    ``text_init``: a CLIP name or checkpoint (anything clipcli loads) whose text tower (embeddings,
    Transformer, final norm, projection) and tokenizer are taken; else a new text tower of
    ``preset``'s size. ``embed_dim`` defaults to that model's (or preset's); a different one starts
    the text projection afresh. The tokenizer files are those to keep beside the checkpoint
    (:func:`clipcli.train.model.load_for_training`'s). The temperature starts as CLIP's."""
    from ..models.factory import create_model

    name = tower_name(image_tower)
    text, source, notes, tokenizer_files = _text_side(text_init, preset, feedback)
    if embed_dim is not None:
        if embed_dim < 1:
            raise InputError(f"{embed_dim} is not a positive embedding size", option="embed_dim")
        text["embed_dim"] = embed_dim
    config = backbone_config(name, text, image_size)
    model = create_model(config)
    if source is not None:
        notes += _take_text_tower(model, source, text_init)
    if pretrained is None:
        notes.append(f"image tower: torchvision {name[len(TORCHVISION):]}, randomly initialised")
    elif str(pretrained) == "imagenet":
        state, origin = imagenet_state_dict(name, feedback)
        load_trunk(model, state, origin)
        notes.append(f"image tower: torchvision {name[len(TORCHVISION):]} with ImageNet weights ({origin})")
    else:
        load_trunk(model, read_trunk_file(pretrained), str(pretrained))
        notes.append(f"image tower: torchvision {name[len(TORCHVISION):]} with the weights of {pretrained}")
    return model, notes, tokenizer_files


def _take_text_tower(model: CLIP, source: CLIP, text_init: str) -> list[str]:
    """Copy ``source``'s text tower into ``model`` (same text config); notes on what was not taken."""
    state = {k: v for k, v in source.state_dict().items() if tower_of(k) == "text"}
    notes = [f"text tower: {text_init}'s"]
    if state["text_projection"].shape != model.text_projection.shape:
        del state["text_projection"]
        notes.append(f"text projection: new (embed_dim {model.config.embed_dim}, {text_init} has "
                     f"{source.config.embed_dim})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if tower_of(k) == "text" and k != "text_projection"]
    if left or unexpected:  # pragma: no cover - the same text config gives the same keys
        raise ClipcliError(f"cannot take the text tower of {text_init} (missing {left}, unexpected {unexpected})")
    return notes


# --------------------------------------------------------------------------- image tower weights


def imagenet_state_dict(image_tower: str, feedback: Feedback = SILENT) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, where it came from)`` of torchvision's default ImageNet weights for
    ``image_tower``, from the torch hub cache or downloaded into it (torchvision's weights API).
    Offline (``CLIPCLI_OFFLINE``/``HF_HUB_OFFLINE``) or unreachable with no cached file: an
    :class:`InputError` naming the file to place in the cache and where to get it."""
    import torchvision

    from ..hub import offline

    name = tower_name(image_tower)[len(TORCHVISION):]
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    place = (f"download {weights.url} (torchvision's {name} {weights.name}) and put it at {path}, or give the "
             "weights as a state-dict file")
    if not path.is_file():
        if offline():
            raise InputError(f"imagenet: torchvision's weights for {name} are not in the torch hub cache and "
                             f"clipcli is offline; {place}", option="image_pretrained")
        feedback.log(f"downloading torchvision's {name} {weights.name} weights from {weights.url} to {path}")
        try:  # torch.hub's own fetch (a temporary file, the hash prefix in the name checked), without its prints
            path.parent.mkdir(parents=True, exist_ok=True)
            prefix = torch.hub.HASH_REGEX.search(path.name)
            torch.hub.download_url_to_file(weights.url, str(path), prefix.group(1) if prefix else None, progress=False)
        except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError; a bad hash a RuntimeError
            reason = " ".join(str(error).split())[:160] or type(error).__name__
            raise InputError(f"imagenet: cannot download torchvision's weights for {name} ({reason}); {place}",
                             option="image_pretrained") from None
    return read_trunk_file(path), str(path)


def read_trunk_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision network's state dict from a ``.pth``/``.pt`` (read with ``weights_only``) or
    ``.safetensors`` file, in float32."""
    from ..checkpoint import read_state_dict

    if not Path(path).is_file():
        raise InputError(f"{str(path)!r} is neither 'imagenet' nor a state-dict file (.pth, .pt, .safetensors)",
                         option="image_pretrained")
    return read_state_dict(path, dtype=torch.float32)


def load_trunk(model: CLIP, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a torchvision state dict of the model's image network into its trunk: the classifier's
    last layer is left out, a ViT's position embeddings are interpolated to the model's resolution
    (torchvision's ``interpolate_embeddings``), every other tensor must be there with its shape."""
    from ..models.torchvision_tower import CLASSIFIERS

    tower = _tower(model)
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIERS[tower.family])}
    expected = tower.trunk.state_dict()
    if tower.family == "vit" and "encoder.pos_embedding" in state \
            and state["encoder.pos_embedding"].shape != expected["encoder.pos_embedding"].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        patch = TORCHVISION_TOWERS[tower.name][2]
        state = dict(interpolate_embeddings(tower.input_resolution, patch, state))
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:4])}{' and more' if len(keys) > 4 else ''}"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong)) if keys]
        raise InputError(f"{source} is not a state dict of torchvision's {tower.name}: " + "; ".join(parts),
                         option="image_pretrained")
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)


# --------------------------------------------------------------------------- which parameters train


def _tower(model: torch.nn.Module):
    from ..models.torchvision_tower import TorchvisionTower

    tower = getattr(model, "visual", None)
    if not isinstance(tower, TorchvisionTower):
        raise InputError("this model's image tower is not a torchvision network (an image_tower such as "
                         "torchvision:resnet50); lock CLIP's own towers by freezing the image side")
    return tower


def lock_image_trunk(model: torch.nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
    """Freeze the torchvision trunk of ``model``'s image tower except its last ``unlocked_groups``
    parameter groups (open_clip's ``lock_image_tower`` on a timm tower: the stem, then one group per
    block, see :mod:`clipcli.models.torchvision_tower`); the projection always trains. With
    ``freeze_bn_stats``, the BatchNorm layers of the frozen groups stay in eval mode (their running
    statistics never change), also when the model is put in ``train()`` mode."""
    tower = _tower(model)
    groups = tower.groups()
    if not 0 <= unlocked_groups <= len(groups):
        raise InputError(f"{unlocked_groups}: the {tower.name} trunk has {len(groups)} groups (its stem, then each "
                         "block)", option="lock_image_unlocked_groups")
    locked = len(groups) - unlocked_groups
    for index, names in enumerate(groups):
        for name in names:
            tower.trunk.get_parameter(name).requires_grad_(index >= locked)
    tower.proj.weight.requires_grad_(True)
    if freeze_bn_stats:
        tower.freeze_norms(name for name, module in tower.trunk.named_modules()
                           if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                           and tower.group_of(name) is not None and tower.group_of(name) < locked)


def lock_text_tower(model: torch.nn.Module) -> None:
    """Freeze ``model``'s text tower but its projection (``text_projection``), as the recipe does;
    the temperature (and a logit bias) still train."""
    for name, parameter in model.named_parameters():
        if tower_of(name) == "text" and "text_projection" not in name:
            parameter.requires_grad_(False)


def trainable_summary(model: torch.nn.Module) -> str:
    """One line: how many of ``model``'s parameters train, by tower."""
    counts = {"image": [0, 0], "text": [0, 0], None: [0, 0]}
    for name, parameter in model.named_parameters():
        counts[tower_of(name)][0] += parameter.numel() if parameter.requires_grad else 0
        counts[tower_of(name)][1] += parameter.numel()
    return ", ".join(f"{tower or 'scores'} {trains:,} of {total:,} parameters train"
                     for tower, (trains, total) in counts.items() if total)

