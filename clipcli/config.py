"""A CLIP's configuration and how files describe it, without torch.

:class:`CLIPConfig` is everything needed to build a model and feed it images. It lives
apart from the modules (:mod:`clipcli.model`) so that finding a model and reading what its
files say about it (:mod:`clipcli.loading`) never imports torch: a search index that finds
nothing changed answers in a fraction of the 2.6 s that importing torch costs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import CheckpointError

HEAD_WIDTH = 64  # OpenAI's CLIPs use 64-wide heads; OpenCLIP's ViT-H/g/bigG use 80/88/104
ACTIVATIONS = ("quick_gelu", "gelu")
METADATA_KEY = "clipcli_config"  # the safetensors metadata entry clipcli writes its config in
# CLIP's training statistics (OpenCLIP models may use others: image_mean/image_std)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPConfig:
    """Everything needed to build a CLIP and feed it images; :mod:`clipcli.factory` reads the
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
    vision_mixer: bool = False  # MLP-Mixer blocks in the ViT (see clipcli.mixer)
    text_mixer: bool = False  # causal MLP-Mixer blocks in the text tower
    activation: str = "quick_gelu"  # of every MLP: "quick_gelu" or "gelu"
    vision_head_width: int = HEAD_WIDTH
    vision_mlp_width: int | None = None  # None: 4 x vision_width
    text_mlp_width: int | None = None  # None: 4 x transformer_width
    # How images are prepared for this model (clipcli.preprocess), part of its identity.
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # or "bilinear"
    resize_mode: str = "shortest"  # "shortest" + centre crop, "squash" or "longest" (padded)

    @property
    def vision_heads(self) -> int:
        width = self.vision_width * 32 if self.vision_patch_size is None else self.vision_width
        return max(1, width // self.vision_head_width)


TOWERS = ("image", "text")
_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")


def tower_of(key: str) -> str | None:
    """Which tower a state-dict key belongs to: ``image``, ``text``, or None (``logit_scale``, metadata)."""
    if key.startswith("visual."):
        return "image"
    return "text" if key.startswith(_TEXT_PREFIXES) else None


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


def config_to_json(config: CLIPConfig) -> str:
    return json.dumps(asdict(normalized(config)), sort_keys=True)


def config_from_json(text: str) -> CLIPConfig:
    """The config :func:`config_to_json` wrote; unknown fields are refused, missing ones default."""
    try:
        data = json.loads(text)
        known = {f.name for f in fields(CLIPConfig)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        return normalized(CLIPConfig(**data))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the stored clipcli config is not valid ({error})") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's ``__metadata__``); empty
    for any other file or one that cannot be read (the reader names what is wrong)."""
    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= 100_000_000:
                return {}
            header = json.loads(file.read(size))
        metadata = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}
