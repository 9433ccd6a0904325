"""Foreign model descriptions -> ours: pure functions, no I/O.

Two schemas besides OpenAI's own arrive here:

- **OpenCLIP** keeps OpenAI's key names; its ``open_clip_config.json`` (``model_cfg`` and
  ``preprocess_cfg``) says what the shapes cannot: ``quick_gelu``, ``vision_cfg.head_width``,
  ``text_cfg.heads``, mean/std, interpolation and resize mode. :func:`config_from_open_clip`
  turns it into :class:`~clipcli.model.CLIPConfig` fields.
- **Hugging Face transformers** ``CLIPModel`` has its own key names (separate q/k/v
  projections, ``layer_norm1/2``, ``fc1/fc2``, ``pre_layrnorm``, projections stored as
  ``nn.Linear`` weights, i.e. transposed) and a ``config.json``;
  :func:`state_dict_from_transformers` renames and packs its tensors, and
  :func:`config_from_transformers` reads heads, activation and sizes.

Both refuse families that are not plain CLIP (a ViT or ModifiedResNet image tower, a causal
text Transformer read out at the end-of-text token, OpenAI's BPE) with one line naming the
family, from their config fields: loading them as CLIP would be silently wrong.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .config import HEAD_WIDTH, tower_of
from .errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch
from .preprocess import INTERPOLATIONS, RESIZE_MODES

VOCAB_SIZE = 49408  # OpenAI's BPE: the only tokenizer clipcli has


def _refuse(source: str, family: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{source} is a {family} model ({why}); clipcli runs plain CLIP models only")


def _preprocess_fields(source: str, mean, std, interpolation, resize_mode) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in (("image_mean", mean), ("image_std", std)):
        if value is None:
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
            raise UnsupportedModelError(f"{source}: {name} {value!r} is not three numbers")
        fields[name] = tuple(float(v) for v in value)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise UnsupportedModelError(f"{source}: interpolation {interpolation!r} is not supported "
                                        f"(use one of {', '.join(INTERPOLATIONS)})")
        fields["interpolation"] = interpolation
    if resize_mode is not None:
        if resize_mode not in RESIZE_MODES:
            raise UnsupportedModelError(f"{source}: resize mode {resize_mode!r} is not supported "
                                        f"(use one of {', '.join(RESIZE_MODES)})")
        fields["resize_mode"] = resize_mode
    return fields


# --------------------------------------------------------------------------- OpenCLIP


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
    unusual = [f"{name}={value!r}" for name, value in odd.items() if value]
    if unusual:
        return "non-standard CLIP", ", ".join(unusual)
    return None


def config_from_open_clip(config: dict, source: str) -> dict[str, Any]:
    """:class:`CLIPConfig` fields that shapes cannot show, from an ``open_clip_config.json``
    (``{"model_cfg": ..., "preprocess_cfg": ...}``) or a bare ``model_cfg``."""
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{source}: the OpenCLIP config is not a JSON object")
    model_cfg = config.get("model_cfg", config)
    preprocess = config.get("preprocess_cfg") or {}
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict) \
            or not isinstance(model_cfg.get("text_cfg"), dict):
        raise UnsupportedModelError(f"{source}: the OpenCLIP config has no vision_cfg/text_cfg")
    family = open_clip_family(model_cfg)
    if family:
        raise _refuse(source, *family)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    fields: dict[str, Any] = {
        "activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "vision_head_width": int(vision.get("head_width", HEAD_WIDTH)),
    }
    fields["transformer_heads"] = int(text.get("heads", 8))  # open_clip's CLIPTextCfg default
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


def config_from_transformers(config: dict, source: str, preprocessor: dict | None = None) -> dict[str, Any]:
    """:class:`CLIPConfig` fields that shapes cannot show, from a ``CLIPModel`` ``config.json``
    (and its ``preprocessor_config.json``, when there is one)."""
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{source}: config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type != "clip":
        family = TRANSFORMERS_FAMILIES.get(model_type, f"{model_type!r}")
        raise _refuse(source, family, f"transformers model_type {model_type!r}")
    # transformers lets *_config_dict override *_config
    text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
    vision = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise UnsupportedModelError(f"{source}: activation {sorted(map(str, acts))} is not supported "
                                    "(quick_gelu or gelu, the same in both towers)")
    for tower in (text, vision):
        eps = float(tower.get("layer_norm_eps", 1e-5))
        if abs(eps - 1e-5) > 1e-12:
            raise UnsupportedModelError(f"{source}: layer_norm_eps {eps} is not supported (CLIP uses 1e-5)")
    vocab = int(text.get("vocab_size", VOCAB_SIZE))
    if vocab != VOCAB_SIZE:
        raise _refuse(source, "CLIP with another tokenizer", f"vocabulary of {vocab}, not OpenAI's {VOCAB_SIZE}")
    vision_width = int(vision.get("hidden_size", 768))
    text_width = int(text.get("hidden_size", 512))
    fields: dict[str, Any] = {
        "activation": acts.pop(),
        "vision_head_width": vision_width // int(vision.get("num_attention_heads", 12)),
        "transformer_heads": int(text.get("num_attention_heads", 8)),
    }
    if vision_width % int(vision.get("num_attention_heads", 12)) or text_width % fields["transformer_heads"]:
        raise UnsupportedModelError(f"{source}: hidden sizes do not split into the configured attention heads")
    if preprocessor:
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


def state_dict_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict with OpenAI's key names. Keys it does not know
    are kept as they are, so the strict load names them."""
    import torch

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue  # a buffer of arange(n), not a parameter
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t()  # nn.Linear stores (out, in); CLIP multiplies by (in, out)
        elif match := _LAYER.match(key):
            tower, index, rest = match.groups()
            prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest[len("self_attn.")] in "qkv" and "_proj." in rest:
                which, leaf = rest[len("self_attn.")], rest.rsplit(".", 1)[1]
                qkv.setdefault((prefix, leaf), {})[which] = (key, value)
                continue
            for theirs, ours in _LAYER_PARTS.items():
                if rest.startswith(theirs):
                    out[prefix + ours + rest[len(theirs):]] = value
                    break
            else:
                out[key] = value
        else:
            out[key] = value
    for (prefix, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:  # left as they are: the strict load names what is missing
            out.update(dict(parts.values()))
            continue
        out[f"{prefix}attn.in_proj_{leaf}"] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
    return out
