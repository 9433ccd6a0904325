"""Foreign model descriptions -> ours: pure functions, no I/O.

Two schemas besides OpenAI's own arrive here:

- **OpenCLIP** keeps OpenAI's key names; its ``open_clip_config.json`` (``model_cfg`` and
  ``preprocess_cfg``) says what the shapes cannot: ``quick_gelu``, ``vision_cfg.head_width``,
  ``text_cfg.heads``, mean/std, interpolation and resize mode. :func:`config_from_open_clip`
  turns it into :class:`~clipcli.models.clip.CLIPConfig` fields.
- **Hugging Face transformers** ``CLIPModel`` has its own key names (separate q/k/v
  projections, ``layer_norm1/2``, ``fc1/fc2``, ``pre_layrnorm``, projections stored as
  ``nn.Linear`` weights, i.e. transposed) and a ``config.json``;
  :func:`state_dict_from_transformers` renames and packs its tensors, and
  :func:`config_from_transformers` reads heads, activation and sizes.

Both refuse families that are not plain CLIP (a ViT or ModifiedResNet image tower, a causal
text Transformer read out at the end-of-text token, OpenAI's BPE) with one line naming the
family, from their config fields: loading them as CLIP would be silently wrong. Every field
they read is checked first (:func:`clipcli.models.config.check_fields`): a value of the wrong type or
range is one :class:`~clipcli.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsupportedModelError
from .config import HEAD_WIDTH, check_fields, shown, tower_of, triple

if TYPE_CHECKING:  # pragma: no cover
    import torch
from ..preprocess import INTERPOLATIONS, RESIZE_MODES

VOCAB_SIZE = 49408  # OpenAI's BPE: the only tokenizer clipcli has


def _refuse(source: str, family: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{source} is a {family} model ({why}); clipcli runs plain CLIP models only")


def _preprocess_fields(source: str, mean, std, interpolation, resize_mode) -> dict[str, Any]:
    """Preprocessing fields from values :func:`check_fields` has checked."""
    fields: dict[str, Any] = {}
    for name, value in (("image_mean", mean), ("image_std", std)):
        if value is not None:
            fields[name] = triple(value)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise UnsupportedModelError(f"{source}: interpolation {shown(interpolation)} is not supported "
                                        f"(use one of {', '.join(INTERPOLATIONS)})")
        fields["interpolation"] = interpolation
    if resize_mode is not None:
        if resize_mode not in RESIZE_MODES:
            raise UnsupportedModelError(f"{source}: resize mode {shown(resize_mode)} is not supported "
                                        f"(use one of {', '.join(RESIZE_MODES)})")
        fields["resize_mode"] = resize_mode
    return fields


# --------------------------------------------------------------------------- OpenCLIP


OPEN_CLIP_CONFIG = "open_clip_config.json"
# Fields of an open_clip_config.json and their kinds (clipcli.models.config.check_fields): the names the
# family check reads first, then what a plain CLIP's config holds.
_OPEN_CLIP_NAMES = {
    "vision_cfg": {"timm_model_name": "text?", "eva_model_name": "text?", "pos_embed_type": "text?",
                   "pool_type": "text?"},
    "text_cfg": {"hf_tokenizer_name": "text?", "hf_model_name": "text?", "pool_type": "text?", "proj_type": "text?"},
}
_OPEN_CLIP_MODEL = {"embed_dim": "count", "quick_gelu": "flag?", "init_logit_scale": "number?"}
_OPEN_CLIP_VISION = {"image_size": "size", "layers": "layers", "width": "count", "head_width": "count",
                     "patch_size": "count?", "mlp_ratio": "positive"}
_OPEN_CLIP_TEXT = {"context_length": "count", "vocab_size": "count", "width": "count", "heads": "count",
                   "layers": "count", "mlp_ratio": "positive"}
_OPEN_CLIP_PREPROCESS = {"mean": "mean?", "std": "std?", "interpolation": "text?", "resize_mode": "text?",
                         "size": "size?"}


def open_clip_family(model_cfg: dict) -> tuple[str, str] | None:
    """``(family, why)`` when an OpenCLIP ``model_cfg`` is not plain CLIP, else None."""
    vision = model_cfg.get("vision_cfg") or {}
    text = model_cfg.get("text_cfg") or {}
    timm = str(vision.get("timm_model_name") or "")
    tokenizer = str(text.get("hf_tokenizer_name") or "")
    checks = [
        (model_cfg.get("multimodal_cfg"), "CoCa", "it has a multimodal text decoder"),
        (model_cfg.get("init_logit_bias") is not None, "SigLIP", "it has a logit bias (sigmoid loss)"),
        ("xlm-v" in tokenizer.lower(), "MetaCLIP 2 (worldwide)", f"it uses the {tokenizer} tokenizer"),
        (vision.get("eva_model_name"), "EVA", f"image tower {vision.get('eva_model_name')}"),
        ("convnext" in timm, "ConvNeXt", f"image tower {timm}"),
        ("vitamin" in timm, "ViTamin", f"image tower {timm}"),
        ("fastvit" in timm or "mobileclip" in timm or "mci" in timm, "MobileCLIP", f"image tower {timm}"),
        ("pe_" in timm or "perception" in timm or vision.get("pos_embed_type") not in (None, "learnable"),
         "Perception Encoder (PE)", f"image tower {timm or vision.get('pos_embed_type')}"),
        (timm, "timm image tower", f"image tower {timm}"),
        (text.get("hf_model_name"), "Hugging Face text tower", f"text tower {text.get('hf_model_name')}"),
        (tokenizer or text.get("pool_type") == "last" or text.get("no_causal_mask"), "CLIPA",
         f"tokenizer {tokenizer or '?'}, text read out at the last token"),
        (vision.get("attentional_pool") or model_cfg.get("custom_text"), "custom-text/attentional-pool",
         "its towers are not CLIP's"),
    ]
    for condition, family, why in checks:
        if condition:
            return family, why
    odd = {
        "vision_cfg.no_ln_pre": vision.get("no_ln_pre"),
        "vision_cfg.final_ln_after_pool": vision.get("final_ln_after_pool"),
        "vision_cfg.global_average_pool": vision.get("global_average_pool"),
        "vision_cfg.ls_init_value": vision.get("ls_init_value"),
        "vision_cfg.act_kwargs": vision.get("act_kwargs"),
        "vision_cfg.norm_kwargs": vision.get("norm_kwargs"),
        "vision_cfg.output_tokens": vision.get("output_tokens"),
        "vision_cfg.pool_type": vision.get("pool_type") not in (None, "tok") and vision.get("pool_type"),
        "text_cfg.pool_type": text.get("pool_type") not in (None, "argmax") and text.get("pool_type"),
        "text_cfg.proj_bias": text.get("proj_bias"),
        "text_cfg.proj_type": text.get("proj_type") not in (None, "linear") and text.get("proj_type"),
        "text_cfg.embed_cls": text.get("embed_cls"),
        "text_cfg.ls_init_value": text.get("ls_init_value"),
        "text_cfg.act_kwargs": text.get("act_kwargs"),
        "text_cfg.norm_kwargs": text.get("norm_kwargs"),
        "text_cfg.pad_id": text.get("pad_id") not in (None, 0) and text.get("pad_id"),
        "text_cfg.vocab_size": text.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE and text.get("vocab_size"),
    }
    unusual = [f"{name}={shown(value)}" for name, value in odd.items() if value]
    if unusual:
        return "non-standard CLIP", ", ".join(unusual)
    return None


def config_from_open_clip(config: Any, source: str) -> dict[str, Any]:
    """:class:`CLIPConfig` fields that shapes cannot show, from an ``open_clip_config.json``
    (``{"model_cfg": ..., "preprocess_cfg": ...}``) or a bare ``model_cfg``, every field it
    reads checked first."""
    where = f"{source}: {OPEN_CLIP_CONFIG}"
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is {shown(config)}, not a JSON object")
    wrapped = "model_cfg" in config
    model_cfg = check_fields(where, config["model_cfg"], {}, "model_cfg.") if wrapped else config
    preprocess = config.get("preprocess_cfg")
    preprocess = {} if preprocess is None else check_fields(where, preprocess, _OPEN_CLIP_PREPROCESS, "preprocess_cfg.")
    at = "model_cfg." if wrapped else ""
    if not isinstance(model_cfg.get("vision_cfg"), dict) or not isinstance(model_cfg.get("text_cfg"), dict):
        missing = "vision_cfg" if not isinstance(model_cfg.get("vision_cfg"), dict) else "text_cfg"
        raise CheckpointError(f"{where}: {at}{missing} is {shown(model_cfg.get(missing))}, not a JSON object "
                              "(the OpenCLIP config has no vision_cfg/text_cfg)")
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    for tower, data in (("vision_cfg", vision), ("text_cfg", text)):
        check_fields(where, data, _OPEN_CLIP_NAMES[tower], f"{at}{tower}.")
    family = open_clip_family(model_cfg)
    if family:
        raise _refuse(source, *family)
    check_fields(where, model_cfg, _OPEN_CLIP_MODEL, at)
    check_fields(where, vision, _OPEN_CLIP_VISION, f"{at}vision_cfg.")
    check_fields(where, text, _OPEN_CLIP_TEXT, f"{at}text_cfg.")
    fields: dict[str, Any] = {
        "activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "vision_head_width": vision.get("head_width", HEAD_WIDTH),
        "transformer_heads": text.get("heads", 8),  # open_clip's CLIPTextCfg default
    }
    fields.update(_preprocess_fields(source, preprocess.get("mean"), preprocess.get("std"),
                                     preprocess.get("interpolation"), preprocess.get("resize_mode")))
    return fields


# --------------------------------------------------------------------------- transformers

# model_type values of CLIP-like families that are not CLIP (or not CLIPModel).
TRANSFORMERS_FAMILIES = {
    "siglip": "SigLIP", "siglip2": "SigLIP 2", "chinese_clip": "Chinese-CLIP", "altclip": "AltCLIP",
    "clipseg": "CLIPSeg", "x_clip": "X-CLIP", "owlvit": "OWL-ViT", "owlv2": "OWLv2", "metaclip_2": "MetaCLIP 2",
    "clip_vision_model": "CLIP vision-only", "clip_text_model": "CLIP text-only", "blip": "BLIP",
    "groupvit": "GroupViT", "flava": "FLAVA", "align": "ALIGN", "git": "GIT",
}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json stores them


TRANSFORMERS_CONFIG, TRANSFORMERS_PREPROCESSOR = "config.json", "preprocessor_config.json"
# Fields of a CLIPModel config.json and its preprocessor_config.json, and their kinds.
_TRANSFORMERS_TOP = {"model_type": "text", "text_config": "object?", "vision_config": "object?",
                     "text_config_dict": "object?", "vision_config_dict": "object?", "projection_dim": "count",
                     "logit_scale_init_value": "number"}
_TRANSFORMERS_TOWER = {"hidden_act": "text", "layer_norm_eps": "positive", "hidden_size": "count",
                       "intermediate_size": "count", "num_attention_heads": "count", "num_hidden_layers": "count",
                       "projection_dim": "count"}
_TRANSFORMERS_TOWERS = {
    "text": {**_TRANSFORMERS_TOWER, "vocab_size": "count", "max_position_embeddings": "count"},
    "vision": {**_TRANSFORMERS_TOWER, "image_size": "count", "patch_size": "count", "num_channels": "count"},
}
_TRANSFORMERS_PREPROCESSING = {"image_mean": "mean?", "image_std": "std?", "resample": "index?"}


def config_from_transformers(config: Any, source: str, preprocessor: Any = None) -> dict[str, Any]:
    """:class:`CLIPConfig` fields that shapes cannot show, from a ``CLIPModel`` ``config.json``
    (and its ``preprocessor_config.json``, when there is one), every field it reads checked first."""
    where = f"{source}: {TRANSFORMERS_CONFIG}"
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is {shown(config)}, not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{where}: model_type is {shown(model_type)}, not a string")
    if model_type != "clip":
        quoted = repr(model_type if len(model_type) <= 40 else model_type[:37] + "...")
        raise _refuse(source, TRANSFORMERS_FAMILIES.get(model_type, quoted), f"transformers model_type {quoted}")
    check_fields(where, config, _TRANSFORMERS_TOP)
    towers = {}
    for tower, schema in _TRANSFORMERS_TOWERS.items():  # transformers lets *_config_dict override *_config
        for name in (f"{tower}_config", f"{tower}_config_dict"):
            check_fields(where, config.get(name) or {}, schema, f"{name}.")
        towers[tower] = {**(config.get(f"{tower}_config") or {}), **(config.get(f"{tower}_config_dict") or {})}
    text, vision = towers["text"], towers["vision"]
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise UnsupportedModelError(f"{source}: activation {', '.join(sorted(map(shown, acts)))} is not supported "
                                    "(quick_gelu or gelu, the same in both towers)")
    for tower in (text, vision):
        eps = tower.get("layer_norm_eps", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise UnsupportedModelError(f"{source}: layer_norm_eps {eps} is not supported (CLIP uses 1e-5)")
    vocab = text.get("vocab_size", VOCAB_SIZE)
    if vocab != VOCAB_SIZE:
        raise _refuse(source, "CLIP with another tokenizer", f"vocabulary of {vocab}, not OpenAI's {VOCAB_SIZE}")
    vision_width, vision_heads = vision.get("hidden_size", 768), vision.get("num_attention_heads", 12)
    text_width, text_heads = text.get("hidden_size", 512), text.get("num_attention_heads", 8)
    if vision_width % vision_heads or text_width % text_heads:
        raise UnsupportedModelError(f"{source}: hidden sizes do not split into the configured attention heads "
                                    f"(vision {vision_width} into {vision_heads}, text {text_width} into {text_heads})")
    fields: dict[str, Any] = {
        "activation": acts.pop(),
        "vision_head_width": vision_width // vision_heads,
        "transformer_heads": text_heads,
    }
    if preprocessor is not None:
        check_fields(f"{source}: {TRANSFORMERS_PREPROCESSOR}", preprocessor, _TRANSFORMERS_PREPROCESSING)
        resample = preprocessor.get("resample")
        fields.update(_preprocess_fields(source, preprocessor.get("image_mean"), preprocessor.get("image_std"),
                                         _RESAMPLE.get(resample, resample) if resample is not None else None, None))
    return fields


_LAYER = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}


def is_transformers_state_dict(state_dict: dict) -> bool:
    return any(key.startswith(("text_model.", "vision_model.")) for key in state_dict)


def tower_of_key(key: str) -> str | None:
    """``image``, ``text`` or None (``logit_scale``, metadata) for a key in OpenAI's or
    transformers' names."""
    if key.startswith(("vision_model.", "visual_projection")):
        return "image"
    if key.startswith("text_model."):
        return "text"
    return tower_of(key)  # OpenAI's names; "text_projection" (either schema) included


def _ours(key: str) -> tuple[str | None, str | None]:
    """``(our name, which of q/k/v)`` of a transformers ``CLIPModel`` key: ``which`` is set for a
    third of an attention in-projection (packed into our one ``in_proj``); ``our name`` is None
    for what is dropped (``position_ids``) and the key itself for keys we do not know."""
    if key.endswith("position_ids"):
        return None, None  # a buffer of arange(n), not a parameter
    if key in _RENAMES:
        return _RENAMES[key], None
    if key in _TRANSPOSED:
        return _TRANSPOSED[key], None
    match = _LAYER.match(key)
    if match is None:
        return key, None
    tower, index, rest = match.groups()
    prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{index}."
    which = rest[len("self_attn."):len("self_attn.") + 1]
    if rest.startswith("self_attn.") and which in ("q", "k", "v") and "_proj." in rest:
        return f"{prefix}attn.in_proj_{rest.rsplit('.', 1)[1]}", which
    for theirs, ours in _LAYER_PARTS.items():
        if rest.startswith(theirs):
            return prefix + ours + rest[len(theirs):], None
    return key, None


def openai_key(key: str) -> str | None:
    """The key (in OpenAI's names) that a transformers ``CLIPModel`` key becomes; None for one
    that is dropped."""
    return _ours(key)[0]


def state_dict_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict with OpenAI's key names. Keys it does not know
    (and q/k/v projections that cannot be packed) are kept as they are, so the strict load names them."""
    import torch

    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        ours, which = _ours(key)
        if ours is None:
            continue
        if which is not None:
            qkv.setdefault(ours, {})[which] = (key, value)
        elif key in _TRANSPOSED and value.ndim == 2:
            out[ours] = value.t()  # nn.Linear stores (out, in); CLIP multiplies by (in, out)
        else:
            out[ours] = value
    for ours, parts in qkv.items():
        values = [value for _, value in parts.values()]
        if set(parts) != {"q", "k", "v"} or not all(v.ndim for v in values) \
                or len({(v.shape[1:], v.dtype, v.device) for v in values}) != 1:
            out.update(dict(parts.values()))  # left as they are: the strict load names what is wrong
            continue
        out[ours] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
    return out
