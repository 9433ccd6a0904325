"""From a config, or a state dict with OpenAI's key names, to a :class:`~clipcli.models.clip.CLIP`.

Shapes show most of an architecture: widths, depths, patch size, resolution, context,
vocabulary, MLP widths (off ``c_fc``). They cannot show the activation (QuickGELU or GELU),
the attention head width (OpenCLIP's ViT-H/g/bigG use 80/88/104-wide heads, and an attention
weight's shape does not depend on the head count) or how images are prepared. Those come
from the model's config (a registry entry, an ``open_clip_config.json``, a transformers
``config.json``, or the config clipcli stores in the safetensors files it writes);
:func:`config_from_state_dict` alone assumes OpenAI's choices, and :func:`assumption_note`
says when that assumption is doubtful.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError, Reason
from . import convert
from .clip import CLIP
from .config import (  # noqa: F401 (config_to_json, config_from_json, METADATA_KEY re-exported)
    ACTIVATIONS,
    HEAD_WIDTH,
    METADATA_KEY,
    TOWERS,
    CLIPConfig,
    config_from_json,
    config_to_json,
    normalized,
)

# Entries of the released TorchScript files that are metadata, not parameters.
EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# The safetensors metadata key holding the config of a checkpoint clipcli wrote.
# Fields shapes determine; a config given for a checkpoint must agree with them.
SHAPE_FIELDS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                "context_length", "vocab_size", "transformer_width", "transformer_layers", "vision_mixer",
                "text_mixer", "vision_mlp_width", "text_mlp_width")
# Widths of OpenAI's nine models: ViT vision widths, ResNet stem widths, text widths.
_OPENAI_WIDTHS = {"vit": {768, 1024}, "resnet": {64, 80, 96, 128}, "text": {512, 640, 768, 1024}}


def create_model(config: CLIPConfig, initialize: bool = True) -> CLIP:
    """A CLIP of ``config``, with Mixer blocks where the config asks for them."""
    model = CLIP(config, initialize=False)
    if config.vision_mixer or config.text_mixer:
        from .mixer import Mixer

        if config.vision_mixer:
            if config.vision_patch_size is None:
                raise ValueError("the Mixer image encoder replaces a ViT's blocks; it needs a patch size")
            tokens = model.visual.positional_embedding.shape[0]
            model.visual.transformer = Mixer(config.vision_width, int(config.vision_layers), tokens,
                                             mlp_width=config.vision_mlp_width, activation=config.activation)
        if config.text_mixer:
            model.transformer = Mixer(config.transformer_width, config.transformer_layers, config.context_length,
                                      causal=True, mlp_width=config.text_mlp_width, activation=config.activation)
    if initialize:
        model.initialize_parameters()
    return model


# --------------------------------------------------------------------------- from shapes


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _mlp_width(state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
    weight = state_dict.get(f"{prefix}0.mlp.c_fc.weight")
    return None if weight is None else int(weight.shape[0])


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
    """Read the architecture off the shapes of a CLIP state dict (OpenAI key names).

    What shapes cannot show is OpenAI's choice: QuickGELU, 64-wide heads, OpenAI's image
    statistics and transform.
    """
    sd = state_dict
    if "visual.class_embedding" in sd or "visual.proj" in sd:  # ViT (a missing key is named by the strict load)
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_layers: int | tuple[int, ...] = _count_blocks(sd, "visual.transformer.resblocks.")
        resolution, patch_size = patch * grid, patch
    else:  # ModifiedResNet
        vision_layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        output_grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        resolution, patch_size = output_grid * 32, None
    transformer_width = sd["ln_final.weight"].shape[0]
    config = CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=resolution,
        vision_layers=vision_layers,
        vision_width=width,
        vision_patch_size=patch_size,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=max(1, transformer_width // HEAD_WIDTH),
        transformer_layers=_count_blocks(sd, "transformer.resblocks."),
        vision_mixer="visual.transformer.resblocks.0.token_mix.fc1.weight" in sd,
        text_mixer="transformer.resblocks.0.token_mix.fc1.weight" in sd,
        vision_mlp_width=_mlp_width(sd, "visual.transformer.resblocks.") if patch_size else None,
        text_mlp_width=_mlp_width(sd, "transformer.resblocks."),
    )
    return normalized(config)


def assumption_note(config: CLIPConfig, source: str) -> str | None:
    """A one-line note when ``config`` was read off shapes alone and its widths are not one of
    OpenAI's models' (so OpenAI's head width and activation are a guess), else None."""
    kind = "resnet" if config.vision_patch_size is None else "vit"
    if config.vision_width in _OPENAI_WIDTHS[kind] and config.transformer_width in _OPENAI_WIDTHS["text"]:
        return None
    return Reason(f"{source} has no config and its widths (vision {config.vision_width}, text "
                  f"{config.transformer_width}) are not one of OpenAI's models: assuming 64-wide attention heads "
                  "and QuickGELU as OpenAI's; if it is an OpenCLIP model, give its architecture (arch, e.g. "
                  "ViT-H-14/laion2b_s32b_b79k) or put its open_clip_config.json beside it",
                  fix="arch")


# --------------------------------------------------------------------------- config <-> metadata


# --------------------------------------------------------------------------- building


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_choices(config: CLIPConfig, source: str) -> None:
    from ..preprocess import INTERPOLATIONS, RESIZE_MODES

    for name, value, allowed in (("activation", config.activation, ACTIVATIONS),
                                 ("interpolation", config.interpolation, INTERPOLATIONS),
                                 ("resize_mode", config.resize_mode, RESIZE_MODES)):
        if value not in allowed:
            raise CheckpointError(f"{source}: {name} {value!r} is not one of {', '.join(allowed)}")
    if len(config.image_mean) != 3 or len(config.image_std) != 3 or not all(config.image_std):
        raise CheckpointError(f"{source}: image_mean and image_std must be three numbers (std not 0)")


def _check_agrees(config: CLIPConfig, shapes: CLIPConfig, source: str, head_width_given: bool = True) -> None:
    wrong = [f"{name} {getattr(shapes, name)!r} (the config says {getattr(config, name)!r})"
             for name in SHAPE_FIELDS if getattr(config, name) != getattr(shapes, name)]
    if wrong:
        raise CheckpointError(f"{source}: the weights do not match the architecture given for them: "
                              + _describe(wrong, 3))
    vision_width = config.vision_width * (32 if config.vision_patch_size is None else 1)
    if config.vision_head_width < 1 or (head_width_given and not config.vision_mixer
                                        and vision_width % config.vision_head_width):  # else heads would round
        raise CheckpointError(f"{source}: vision width {vision_width} does not split into "
                              f"{config.vision_head_width}-wide attention heads")
    for what, width, heads in (("vision", vision_width, config.vision_heads),
                               ("text", config.transformer_width, config.transformer_heads)):
        if heads < 1 or width % heads:
            raise CheckpointError(f"{source}: {what} width {width} does not split into {heads} attention heads")


def build_model(state_dict: dict[str, torch.Tensor], hints: CLIPConfig | Mapping[str, Any] | None = None,
                source: str = "checkpoint", towers: tuple[str, ...] = TOWERS) -> CLIP:
    """Build a CLIP from a state dict with OpenAI's key names and load it strictly.

    ``hints`` (a config, or some of its fields) give what shapes cannot show; without them
    OpenAI's choices are assumed. Fields that shapes do show must agree with them. The
    model takes the state dict's tensors as they are (no copy, same dtype). Towers not in
    ``towers`` are dropped; their entries may be ``meta`` tensors (only their shapes are read).

    Raises :class:`CheckpointError` naming ``source`` and the offending keys when the state
    dict is not a CLIP we can build (missing, unexpected or wrongly shaped entries, or weights
    that disagree with ``config``).
    """
    sd = {k: v for k, v in state_dict.items() if k not in EXTRA_KEYS and not k.endswith("attn_mask")}
    try:
        shapes = config_from_state_dict(sd)
    except (KeyError, IndexError, ValueError, TypeError) as error:
        raise CheckpointError(f"{source} is not a CLIP checkpoint: cannot read its architecture ({error!r})") from None
    if isinstance(hints, CLIPConfig):
        hints = asdict(hints)
    try:
        config = normalized(replace(shapes, **hints)) if hints else shapes
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: the architecture given for it is not valid ({error})") from None
    _check_choices(config, source)
    _check_agrees(config, shapes, source, head_width_given="vision_head_width" in (hints or {}))
    with torch.device("meta"):
        model = create_model(config, initialize=False)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        raise CheckpointError(f"{source} does not match a CLIP architecture; " + "; ".join(parts))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source} has tensors of the wrong shape: {_describe(wrong)}")
    model.load_state_dict(sd, strict=False, assign=True)
    for tower in TOWERS:
        if tower not in towers:
            model.drop_tower(tower)
    for name, buffer in model.named_buffers():  # anything the file lacked (num_batches_tracked)
        if buffer.is_meta:
            _set_buffer(model, name, torch.zeros((), dtype=torch.long))
    return model


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner).register_buffer(leaf, value)


def parameter_count(config: CLIPConfig) -> int:
    """Parameters of a model of ``config`` (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = create_model(config, initialize=False)
    return sum(p.numel() for p in model.parameters())


def needed_keys(shapes: dict[str, torch.Tensor]) -> Callable[[str], bool]:
    """Which keys of a checkpoint a CLIP needs, from ``shapes`` (every key, as ``meta`` tensors or
    unread): those a CLIP of these shapes has, held with the shape it expects (in transformers'
    names, those that become them). When the shapes are not a whole CLIP (one shard of it, or
    something else) the keys named as a CLIP's. A reader reads no other key (junk, or a CLIP key
    of the wrong shape): the strict load names it."""
    transformers = convert.is_transformers_state_dict(shapes)
    meta = {k: v if v.is_meta else torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in shapes.items()}
    try:
        ours = convert.state_dict_from_transformers(meta) if transformers else meta
        config = config_from_state_dict({k: v for k, v in ours.items()
                                         if k not in EXTRA_KEYS and not k.endswith("attn_mask")})
        with torch.device("meta"):
            expected = create_model(config, initialize=False).state_dict()
    except Exception:  # noqa: BLE001 - no whole CLIP: what is named as one (build_model says what is wrong)
        return lambda key: key in EXTRA_KEYS or key == "logit_scale" or convert.tower_of_key(key) is not None
    fits = {k for k, v in expected.items() if k in ours and ours[k].shape == v.shape}
    fits.update(k for k in EXTRA_KEYS if k in shapes and shapes[k].numel() <= 1)
    return (lambda key: convert.openai_key(key) in fits) if transformers else fits.__contains__
