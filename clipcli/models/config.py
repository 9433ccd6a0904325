"""A CLIP's configuration and how files describe it, without torch.

:class:`CLIPConfig` is everything needed to build a model and feed it images. It lives
apart from the modules (:mod:`clipcli.models.clip`) so that finding a model and reading what its
files say about it (:mod:`clipcli.loading`) never imports torch: a search index that finds
nothing changed answers in a fraction of the 2.6 s that importing torch costs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError

HEAD_WIDTH = 64  # OpenAI's CLIPs use 64-wide heads; OpenCLIP's ViT-H/g/bigG use 80/88/104
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
FAMILIES = ("clip", "siglip")  # which towers: CLIP's (clipcli.models.clip) or SigLIP's (clipcli.models.siglip)
TEXT_POOLS = ("argmax", "eos", "last")  # where the text tower is read out
TOKENIZERS = ("clip", "sentencepiece")  # the bundled OpenAI BPE, or the model's own files
TEXT_CLEANS = ("clip", "canonicalize", "whitespace", "lower", "lowercase", "siglip")
METADATA_KEY = "clipcli_config"  # the safetensors metadata entry clipcli writes its config in
# CLIP's training statistics (OpenCLIP models may use others: image_mean/image_std)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's statistics, which torchvision's weights were trained with (an image_tower's default)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Image towers taken from torchvision (clipcli.models.torchvision_tower): the classifier without its
# last layer, then a linear projection. A config names one in image_tower ("torchvision:resnet50")
# and carries what it is in the vision fields: name -> (stage depths, or a ViT's blocks; the width
# of the pooled features; the ViT's patch size, None for a convolutional network).
TORCHVISION = "torchvision:"
TORCHVISION_TOWERS: dict[str, tuple[int | tuple[int, ...], int, int | None]] = {
    "resnet18": ((2, 2, 2, 2), 512, None), "resnet34": ((3, 4, 6, 3), 512, None),
    "resnet50": ((3, 4, 6, 3), 2048, None), "resnet101": ((3, 4, 23, 3), 2048, None),
    "resnet152": ((3, 8, 36, 3), 2048, None),
    "convnext_tiny": ((3, 3, 9, 3), 768, None), "convnext_small": ((3, 3, 27, 3), 768, None),
    "convnext_base": ((3, 3, 27, 3), 1024, None), "convnext_large": ((3, 3, 27, 3), 1536, None),
    "vit_b_16": (12, 768, 16), "vit_b_32": (12, 768, 32), "vit_l_16": (24, 1024, 16),
}


@dataclass(frozen=True)
class CLIPConfig:
    """Everything needed to build a CLIP and feed it images; :mod:`clipcli.models.factory` reads the
    shape fields off a checkpoint and the rest (activation, head width, preprocessing) off the
    model's config or registry entry, since tensor shapes cannot show them."""

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, ...]  # an int for ViT, four stage depths for ResNet
    vision_width: int
    vision_patch_size: int | None  # None for ResNet
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    vision_mixer: bool = False  # MLP-Mixer blocks in the ViT (see clipcli.models.mixer)
    text_mixer: bool = False  # causal MLP-Mixer blocks in the text tower
    activation: str = "quick_gelu"  # of every MLP (the text tower's too unless text_activation): ACTIVATIONS
    vision_head_width: int = HEAD_WIDTH
    vision_mlp_width: int | None = None  # None: 4 x vision_width
    text_mlp_width: int | None = None  # None: 4 x transformer_width
    # How images are prepared for this model (clipcli.preprocess), part of its identity.
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # or "bilinear"
    resize_mode: str = "shortest"  # "shortest" + centre crop, "squash" or "longest" (padded)
    # Other families and tokenizers (SigLIP, MetaCLIP 2); the defaults are OpenAI's CLIP.
    family: str = "clip"  # "clip" or "siglip"
    text_activation: str | None = None  # None: the same as activation
    text_pool: str = "argmax"  # "argmax" (the end token, the largest id), "eos" (the first eos_id), "last"
    eos_id: int | None = None  # the end token text_pool "eos" reads out at
    logit_bias: bool = False  # a learned logit bias: scores are sigmoid probabilities, one per pair
    tokenizer: str = "clip"  # "clip" (the bundled BPE) or "sentencepiece" (the model's own files)
    text_clean: str = "clip"  # "clip" (the BPE's own), "canonicalize" (SigLIP), "whitespace", "lower" (open_clip's),
    # "lowercase" (transformers' SigLIP 2: str.lower only), "siglip" (transformers' SigLIP: canonicalize, "_" removed)
    text_projection: bool = True  # False: a SigLIP text tower without its Linear head (open_clip's SO400M i18n)
    image_tower: str | None = None  # "torchvision:NAME" (TORCHVISION_TOWERS): that trunk and a projection, not CLIP's own

    @property
    def vision_heads(self) -> int:
        width = self.vision_width * 32 if self.vision_patch_size is None else self.vision_width
        return max(1, width // self.vision_head_width)

    @property
    def text_act(self) -> str:
        """The text tower's activation."""
        return self.text_activation or self.activation


def image_tower_fields(image_tower: str) -> dict[str, Any]:
    """The vision fields (``vision_layers``, ``vision_width``, ``vision_patch_size``) of a model whose
    image tower is ``image_tower`` (``"torchvision:resnet50"``); ValueError naming the known towers."""
    name = image_tower[len(TORCHVISION):] if isinstance(image_tower, str) and image_tower.startswith(TORCHVISION) else None
    if name not in TORCHVISION_TOWERS:
        known = ", ".join(TORCHVISION + n for n in TORCHVISION_TOWERS)
        raise ValueError(f"{shown(image_tower)} is not an image tower clipcli builds; choose one of {known}")
    layers, width, patch = TORCHVISION_TOWERS[name]
    return {"vision_layers": layers, "vision_width": width, "vision_patch_size": patch}


def image_tower_problem(config: CLIPConfig) -> str | None:
    """What is wrong with ``config``'s ``image_tower`` (an unknown name, vision fields that are not
    that tower's, a resolution a ViT cannot take, a family or Mixer that does not go with it), or None."""
    if config.image_tower is None:
        return None
    try:
        expected = image_tower_fields(config.image_tower)
    except ValueError as error:
        return f"image_tower {error}"
    wrong = [f"{k} {shown(getattr(config, k))} (a {config.image_tower} has {shown(v)})" for k, v in expected.items()
             if getattr(normalized(config), k) != v]
    if wrong:
        return "the vision fields do not describe its image_tower: " + ", ".join(wrong)
    if config.family != "clip" or config.vision_mixer:
        return f"an image_tower ({config.image_tower}) goes with a CLIP's text tower, not a {config.family} or Mixer one"
    patch = expected["vision_patch_size"]
    if patch is not None and config.image_resolution % patch:
        return f"image_resolution {config.image_resolution} is not a multiple of {config.image_tower}'s patch size {patch}"
    return None


TOWERS = ("image", "text")
# CLIP's text tower lies at the top level (OpenAI's names); SigLIP's under "text." (open_clip's).
_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
SIGLIP_TEXT_PREFIX = "text."


def tower_of(key: str) -> str | None:
    """Which tower a state-dict key belongs to: ``image``, ``text``, or None (``logit_scale``,
    ``logit_bias``, metadata), in CLIP's or SigLIP's names."""
    if key.startswith("visual."):
        return "image"
    return "text" if key.startswith((*_TEXT_PREFIXES, SIGLIP_TEXT_PREFIX)) else None


def normalized(config: CLIPConfig) -> CLIPConfig:
    """``config`` with every field in one canonical form (4x MLP widths as None, tuples for
    lists), so two descriptions of the same architecture compare equal."""
    vision_layers = config.vision_layers
    if isinstance(vision_layers, (list, tuple)):
        vision_layers = tuple(int(n) for n in vision_layers)
    vision_mlp = None if config.vision_mlp_width in (None, 4 * config.vision_width) else config.vision_mlp_width
    text_mlp = None if config.text_mlp_width in (None, 4 * config.transformer_width) else config.text_mlp_width
    return replace(config, vision_layers=vision_layers, vision_mlp_width=vision_mlp, text_mlp_width=text_mlp,
                   image_mean=tuple(float(v) for v in config.image_mean),
                   image_std=tuple(float(v) for v in config.image_std))


# --------------------------------------------------------------------------- checking what files say
#
# Every config a file carries (clipcli's own, an OpenCLIP or a transformers one) is checked field by
# field where it is read, before any value is used: a hostile or damaged file gives one line naming
# the file and the field, never a traceback, and never a silently different model (heads of -3
# becoming one head).


def shown(value: Any, limit: int = 40) -> str:
    """``value`` as a message shows it: its JSON, cut short (a hostile value may be huge or deep)."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:  # and within a float's range: 10**400 is no layer_norm_eps
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        return False


def _stats(value: Any, test) -> bool:  # one number or three (open_clip and transformers take both)
    return test(value) or (isinstance(value, (list, tuple)) and len(value) == 3 and all(map(test, value)))


# kind -> (test, what a good value is)
_KINDS = {
    "count": (lambda v: _whole(v) and v >= 1, "a positive whole number"),
    "index": (lambda v: _whole(v) and v >= 0, "a whole number of at least 0"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "number": (_finite, "a finite number"),
    "positive": (lambda v: _finite(v) and v > 0, "a positive finite number"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "layers": (lambda v: (_whole(v) and v >= 1) or (isinstance(v, (list, tuple)) and len(v) == 4
                                                   and all(_whole(n) and n >= 1 for n in v)),
               "a positive whole number (or four, a ResNet's stage depths)"),
    "size": (lambda v: (_whole(v) and v >= 1) or (isinstance(v, (list, tuple)) and len(v) == 2
                                                 and all(_whole(n) and n >= 1 for n in v)),
             "a positive whole number (or two)"),
    "mean": (lambda v: _stats(v, _finite), "three finite numbers"),
    "std": (lambda v: _stats(v, lambda x: _finite(x) and x > 0), "three positive finite numbers"),
}


def check_fields(where: str, data: Any, schema: Mapping[str, str], prefix: str = "") -> dict:
    """``data`` when it is a JSON object whose fields named in ``schema`` have the kinds it gives
    (``"count"``, ``"text"``, ...; a trailing ``?`` allows null); fields it does not name pass.
    Else :class:`CheckpointError` naming ``where`` (the file) and the field."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}{': ' + prefix.rstrip('.') if prefix else ''} is {shown(data)}, not a JSON object")
    for name, kind in schema.items():
        value = data.get(name)
        if name not in data or (value is None and kind.endswith("?")):
            continue
        test, what = _KINDS[kind.rstrip("?")]
        if not test(value):
            null = " (or null)" if kind.endswith("?") else ""
            raise CheckpointError(f"{where}: {prefix}{name} is {shown(value)}, not {what}{null}")
    return data


def triple(value: Any) -> tuple[float, float, float]:
    """A checked ``"mean"``/``"std"`` value as three floats (one number stands for all three)."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


# clipcli's own config, as config_to_json writes it: every CLIPConfig field
_STORED = {
    "embed_dim": "count", "image_resolution": "count", "vision_layers": "layers", "vision_width": "count",
    "vision_patch_size": "count?", "context_length": "count", "vocab_size": "count", "transformer_width": "count",
    "transformer_heads": "count", "transformer_layers": "count", "vision_mixer": "flag", "text_mixer": "flag",
    "activation": "text", "vision_head_width": "count", "vision_mlp_width": "count?", "text_mlp_width": "count?",
    "image_mean": "mean", "image_std": "std", "interpolation": "text", "resize_mode": "text",
    "family": "text", "text_activation": "text?", "text_pool": "text", "eos_id": "index?", "logit_bias": "flag",
    "tokenizer": "text", "text_clean": "text", "text_projection": "flag", "image_tower": "text?",
}


# Fields added with SigLIP: written only when not CLIP's default, so a CLIP's stored config (and
# the identity of indexes built with it) stays what it was.
_LATER_FIELDS = ("family", "text_activation", "text_pool", "eos_id", "logit_bias", "tokenizer", "text_clean",
                 "text_projection", "image_tower")


def config_to_json(config: CLIPConfig) -> str:
    data = asdict(normalized(config))
    defaults = {f.name: f.default for f in fields(CLIPConfig) if f.name in _LATER_FIELDS}
    return json.dumps({k: v for k, v in data.items() if k not in defaults or v != defaults[k]}, sort_keys=True)


def config_from_json(text: str, source: str | Path | None = None) -> CLIPConfig:
    """The config :func:`config_to_json` wrote (``source``: the file it was stored in, for
    messages); unknown fields are refused, missing ones default, every field is checked."""
    where = f"{source}: its {METADATA_KEY} metadata" if source is not None else f"the stored {METADATA_KEY}"
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError) as error:
        raise CheckpointError(f"{where} is not valid JSON ({' '.join(str(error).split())[:100]})") from None
    check_fields(where, data, _STORED)
    unknown = set(data) - {f.name for f in fields(CLIPConfig)}
    if unknown:
        raise CheckpointError(f"{where} has unknown fields: {', '.join(shown(k) for k in sorted(unknown)[:5])}")
    for name, allowed in (("activation", ACTIVATIONS), ("text_activation", ACTIVATIONS), ("family", FAMILIES),
                          ("text_pool", TEXT_POOLS), ("tokenizer", TOKENIZERS), ("text_clean", TEXT_CLEANS)):
        if data.get(name) is not None and data[name] not in allowed:
            raise CheckpointError(f"{where}: {name} is {shown(data[name])}, not one of {', '.join(allowed)}")
    data = {k: triple(v) if k in ("image_mean", "image_std") else v for k, v in data.items()}
    try:
        config = normalized(CLIPConfig(**data))
    except TypeError as error:  # a required field missing
        raise CheckpointError(f"{where} is not a whole config ({error})") from None
    problem = image_tower_problem(config)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    return config


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's ``__metadata__``); empty
    for any other file or one that cannot be read (the reader names what is wrong). A config
    clipcli stored there (``clipcli_config``) is checked here, where the file is known:
    :class:`CheckpointError` naming the file and the field when it is not valid."""
    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= 100_000_000:
                return {}
            header = json.loads(file.read(size))
        metadata = header.get("__metadata__") or {}
        metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}
    if METADATA_KEY in metadata:
        config_from_json(metadata[METADATA_KEY], path)
    return metadata

