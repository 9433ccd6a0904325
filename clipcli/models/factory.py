"""From a config, or a state dict in our key names, to a model: a :class:`~clipcli.models.clip.CLIP`
(OpenAI's key names) or a :class:`~clipcli.models.siglip.SigLIP` (open_clip's, ``visual.trunk.`` and
``text.``), told apart by their keys.

Shapes show most of an architecture: widths, depths, patch size, resolution, context,
vocabulary, MLP widths (off ``c_fc``/``fc1``), a logit bias. They cannot show the activation
(QuickGELU, GELU or its tanh approximation), the attention head width (OpenCLIP's ViT-H/g/bigG
use 80/88/104-wide heads, SigLIP's SO400M 72-wide ones, and an attention weight's shape does not
depend on the head count) or how images are prepared. Those come from the model's config (a
registry entry, an ``open_clip_config.json``, a transformers ``config.json``, or the config
clipcli stores in the safetensors files it writes); :func:`config_from_state_dict` alone assumes
OpenAI's choices for a CLIP and SigLIP's released ones for a SigLIP, and :func:`assumption_note`
says when that assumption is doubtful.

A CLIP whose image tower is a torchvision network (``image_tower``, :mod:`clipcli.models.torchvision_tower`)
is built from its config alone: clipcli writes that config into the checkpoints it saves, and its
``visual.trunk.``/``visual.proj.`` tensors are checked against the model it describes.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError, Reason
from . import convert
from .clip import CLIP, DualEncoder
from .config import (  # noqa: F401 (config_to_json, config_from_json, METADATA_KEY re-exported)
    ACTIVATIONS,
    FAMILIES,
    HEAD_WIDTH,
    METADATA_KEY,
    TEXT_POOLS,
    TOWERS,
    CLIPConfig,
    config_from_json,
    config_to_json,
    image_tower_problem,
    normalized,
)

# Entries of the released TorchScript files that are metadata, not parameters.
EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Fields shapes determine; a config given for a checkpoint must agree with them.
SHAPE_FIELDS = ("family", "embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                "context_length", "vocab_size", "transformer_width", "transformer_layers", "vision_mixer",
                "text_mixer", "vision_mlp_width", "text_mlp_width", "logit_bias", "text_projection")
# Widths of OpenAI's nine models: ViT vision widths, ResNet stem widths, text widths.
_OPENAI_WIDTHS = {"vit": {768, 1024}, "resnet": {64, 80, 96, 128}, "text": {512, 640, 768, 1024}}
# SigLIP's head widths by tower width (timm's and open_clip's configs: SO400M 1152 / 16 heads,
# giant-opt 1536 / 16); every other released width (B 768, L 1024) has 64-wide heads.
SIGLIP_HEAD_WIDTHS = {1152: 72, 1536: 96}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def siglip_head_width(width: int) -> int:
    """The attention head width of a released SigLIP tower of ``width`` (used only when no
    config gives the heads)."""
    return SIGLIP_HEAD_WIDTHS.get(width, HEAD_WIDTH)


def create_model(config: CLIPConfig, initialize: bool = True) -> DualEncoder:
    """A model of ``config``: a SigLIP for ``family`` "siglip", else a CLIP, with Mixer blocks
    where the config asks for them."""
    if config.family == "siglip":
        from .siglip import SigLIP

        return SigLIP(config, initialize=initialize)
    if config.family != "clip":
        raise ValueError(f"unknown model family {config.family!r}; use one of {FAMILIES}")
    if not config.text_projection:
        raise ValueError("a CLIP's text tower always has its projection (text_projection=False is SigLIP's)")
    if image_tower_problem(config):
        raise ValueError(image_tower_problem(config))
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


def is_siglip_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys are a SigLIP's (open_clip's names: a timm trunk, a ``text.`` tower)."""
    return any(key.startswith(("visual.trunk.", "text.")) for key in state_dict)


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
    """Read the architecture off the shapes of a CLIP state dict (OpenAI key names) or a
    SigLIP one (open_clip's).

    What shapes cannot show is OpenAI's choice for a CLIP: QuickGELU, 64-wide heads, OpenAI's
    image statistics and transform; for a SigLIP, the released models' (:func:`_siglip_config`).
    """
    sd = state_dict
    if is_siglip_state_dict(sd):
        return _siglip_config(sd)
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
        logit_bias="logit_bias" in sd,
    )
    return normalized(config)


def _siglip_config(sd: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """A SigLIP's architecture off its shapes; what they cannot show is the released models'
    choice: tanh-approximated GELU, :data:`SIGLIP_HEAD_WIDTHS`, the last-position readout, the
    0.5 image statistics and a bicubic squash resize, its own SentencePiece tokenizer on
    canonicalized text."""
    patch = sd["visual.trunk.patch_embed.proj.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = round(sd["visual.trunk.pos_embed"].shape[-2] ** 0.5)
    text_width = sd["text.ln_final.weight"].shape[0]
    fc1 = sd.get("visual.trunk.blocks.0.mlp.fc1.weight")
    projection = sd.get("text.text_projection.weight")  # absent: the text tower's output is the embedding
    config = CLIPConfig(
        embed_dim=text_width if projection is None else projection.shape[0],
        image_resolution=grid * patch_size,
        vision_layers=_count_blocks(sd, "visual.trunk.blocks."),
        vision_width=width,
        vision_patch_size=patch_size,
        context_length=sd["text.positional_embedding"].shape[0],
        vocab_size=sd["text.token_embedding.weight"].shape[0],
        transformer_width=text_width,
        transformer_heads=max(1, text_width // siglip_head_width(text_width)),
        transformer_layers=_count_blocks(sd, "text.transformer.resblocks."),
        activation="gelu_tanh",
        vision_head_width=siglip_head_width(width),
        vision_mlp_width=None if fc1 is None else int(fc1.shape[0]),
        text_mlp_width=_mlp_width(sd, "text.transformer.resblocks."),
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        resize_mode="squash",
        family="siglip",
        text_pool="last",
        logit_bias="logit_bias" in sd,
        tokenizer="sentencepiece",
        text_clean="canonicalize",
        text_projection=projection is not None,
    )
    return normalized(config)


def assumption_note(config: CLIPConfig, source: str) -> str | None:
    """A one-line note when ``config`` was read off shapes alone and its widths are not one of
    OpenAI's models' (so OpenAI's head width and activation are a guess), or it is a SigLIP
    (whose heads, activation and preprocessing no shape shows), else None."""
    if config.family == "siglip":
        return Reason(f"{source} has no config: assuming a released SigLIP's {config.vision_head_width}-wide "
                      "attention heads, tanh-approximated GELU and 0.5 image statistics; put its "
                      "open_clip_config.json (or transformers config.json) beside it, or give its architecture (arch)",
                      fix="arch")
    kind = "resnet" if config.vision_patch_size is None else "vit"
    if config.vision_width in _OPENAI_WIDTHS[kind] and config.transformer_width in _OPENAI_WIDTHS["text"]:
        return None
    return Reason(f"{source} has no config and its widths (vision {config.vision_width}, text "
                  f"{config.transformer_width}) are not one of OpenAI's models: assuming 64-wide attention heads "
                  "and QuickGELU as OpenAI's; if it is an OpenCLIP model, give its architecture (arch, e.g. "
                  "ViT-H-14/laion2b_s32b_b79k) or put its open_clip_config.json beside it",
                  fix="arch")


# --------------------------------------------------------------------------- building


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_choices(config: CLIPConfig, source: str) -> None:
    from ..preprocess import INTERPOLATIONS, RESIZE_MODES

    for name, value, allowed in (("activation", config.activation, ACTIVATIONS),
                                 ("text_activation", config.text_act, ACTIVATIONS),
                                 ("family", config.family, FAMILIES),
                                 ("text_pool", config.text_pool, TEXT_POOLS),
                                 ("interpolation", config.interpolation, INTERPOLATIONS),
                                 ("resize_mode", config.resize_mode, RESIZE_MODES)):
        if value not in allowed:
            raise CheckpointError(f"{source}: {name} {value!r} is not one of {', '.join(allowed)}")
    if len(config.image_mean) != 3 or len(config.image_std) != 3 or not all(config.image_std):
        raise CheckpointError(f"{source}: image_mean and image_std must be three numbers (std not 0)")
    problem = image_tower_problem(config)
    if problem:
        raise CheckpointError(f"{source}: {problem}")


def _image_tower_config(hints: Mapping[str, Any], source: str) -> CLIPConfig:
    """The config of a checkpoint whose image tower is torchvision's: its shapes show no CLIP
    tower, so the config it names (clipcli stores it) describes it whole; the strict load checks
    every tensor against it."""
    try:
        config = normalized(CLIPConfig(**hints))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: a model with a torchvision image tower ({hints['image_tower']}) needs its "
                              f"whole config, as clipcli stores it in the safetensors files it writes ({error})") from None
    _check_choices(config, source)
    if config.transformer_heads < 1 or config.transformer_width % config.transformer_heads:
        raise CheckpointError(f"{source}: text width {config.transformer_width} does not split into "
                              f"{config.transformer_heads} attention heads")
    return config


def _same_grid(config: CLIPConfig, shapes: CLIPConfig) -> bool:
    """Whether a SigLIP's resolution gives the patch grid its weights have: timm's patch embedding
    drops a remainder (SO400M/14 runs 384 px images on a 27 x 27 grid: 378 px by shapes)."""
    patch = shapes.vision_patch_size
    return config.family == shapes.family == "siglip" and config.vision_patch_size == patch \
        and config.image_resolution // patch == shapes.image_resolution // patch


def _check_agrees(config: CLIPConfig, shapes: CLIPConfig, source: str, head_width_given: bool = True) -> None:
    wrong = [f"{name} {getattr(shapes, name)!r} (the config says {getattr(config, name)!r})"
             for name in SHAPE_FIELDS if getattr(config, name) != getattr(shapes, name)
             and not (name == "image_resolution" and _same_grid(config, shapes))]
    if wrong:
        raise CheckpointError(f"{source}: the weights do not match the architecture given for them: "
                              + _describe(wrong, 3))
    if config.family == "siglip" and config.embed_dim != config.vision_width:  # no image projection
        raise CheckpointError(f"{source}: the text embedding ({config.embed_dim}) is not as wide as the image "
                              f"embedding (the vision width, {config.vision_width})")
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
                source: str = "checkpoint", towers: tuple[str, ...] = TOWERS) -> DualEncoder:
    """Build a CLIP (OpenAI's key names) or a SigLIP (open_clip's) from a state dict and load it strictly.

    ``hints`` (a config, or some of its fields) give what shapes cannot show; without them
    OpenAI's choices are assumed. Fields that shapes do show must agree with them. The
    model takes the state dict's tensors as they are (no copy, same dtype). Towers not in
    ``towers`` are dropped; their entries may be ``meta`` tensors (only their shapes are read).

    Raises :class:`CheckpointError` naming ``source`` and the offending keys when the state
    dict is not a model we can build (missing, unexpected or wrongly shaped entries, or weights
    that disagree with ``config``).
    """
    sd = {k: v for k, v in state_dict.items() if k not in EXTRA_KEYS and not k.endswith("attn_mask")}
    if isinstance(hints, CLIPConfig):
        hints = asdict(hints)
    if hints and hints.get("image_tower") is not None:
        config = _image_tower_config(hints, source)
    else:
        try:
            shapes = config_from_state_dict(sd)
        except (KeyError, IndexError, ValueError, TypeError) as error:
            raise CheckpointError(f"{source} is not a CLIP checkpoint (nor a SigLIP one): cannot read its "
                                  f"architecture ({error!r})") from None
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
        what = "SigLIP" if config.family == "siglip" else "CLIP"
        raise CheckpointError(f"{source} does not match a {what} architecture; " + "; ".join(parts))
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


_SCORE_KEYS = ("logit_scale", "logit_bias")


def needed_keys(shapes: dict[str, torch.Tensor]) -> Callable[[str], bool]:
    """Which keys of a checkpoint a model needs, from ``shapes`` (every key, as ``meta`` tensors or
    unread): those a CLIP or SigLIP of these shapes has, held with the shape it expects (in
    transformers' names, those that become them). When the shapes are not a whole model (one
    shard of it, or something else) the keys named as a model's. A reader reads no other key
    (junk, or a model key of the wrong shape): the strict load names it."""
    transformers = convert.is_transformers_state_dict(shapes)
    meta = {k: v if v.is_meta else torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in shapes.items()}
    try:
        ours = convert.state_dict_from_transformers(meta) if transformers else meta
        config = config_from_state_dict({k: v for k, v in ours.items()
                                         if k not in EXTRA_KEYS and not k.endswith("attn_mask")})
        with torch.device("meta"):
            expected = create_model(config, initialize=False).state_dict()
    except Exception:  # noqa: BLE001 - no whole CLIP: what is named as one (build_model says what is wrong)
        return lambda key: key in EXTRA_KEYS or key in _SCORE_KEYS or convert.tower_of_key(key) is not None
    fits = {k for k, v in expected.items() if k in ours and ours[k].shape == v.shape}
    fits.update(k for k in EXTRA_KEYS if k in shapes and shapes[k].numel() <= 1)
    if not transformers:
        return fits.__contains__
    siglip = convert.is_transformers_siglip(shapes)  # one key cannot say which schema it is in
    return lambda key: convert.openai_key(key, siglip) in fits
