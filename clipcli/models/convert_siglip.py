"""SigLIP's descriptions -> ours: pure functions, no I/O.

SigLIP (and SigLIP 2 at a fixed resolution, the same architecture with Gemma's tokenizer)
arrives in two layouts, both turned into :class:`~clipcli.models.config.CLIPConfig` fields with
``family="siglip"`` (the towers of :mod:`clipcli.models.siglip`):

- **OpenCLIP** (``timm/ViT-B-16-SigLIP`` and the like): the image tower is a timm ViT named in
  ``vision_cfg.timm_model_name``, read out by attention pooling (``timm_pool "map"``) with no
  projection after it (``timm_proj "none"``); the text tower is bidirectional
  (``no_causal_mask``), read out at its last position (``pool_type "last"``) through a biased
  projection. Its keys are ours already (clipcli's SigLIP keeps open_clip's names). The trunk's
  name says what its config does not: heads and activation, as timm defines that name
  (:data:`TIMM_TRUNKS`; timm builds its SigLIP 2 trunks with the tanh GELU and the older ones
  with the exact one). Its resolution is the name's too, and it can be more than patch x grid
  (``so400m_patch14_siglip_384``: 384 px into 27 x 27 patches of 14, the last 6 px unused).
- **transformers** ``SiglipModel`` (``google/siglip-*``, and ``google/siglip2-*`` at a fixed
  resolution, which use it too): its ``config.json`` and ``preprocessor_config.json``
  (:func:`config_from_transformers`) and its key names (:func:`state_dict_from_transformers`:
  q/k/v packed, the pooling head's in-projection split into query and key-value, the position
  embedding given a batch axis, the scalars made 0-d as open_clip holds them).

Every field read is checked first (:func:`clipcli.models.config.check_fields`): a value of the
wrong type is one :class:`~clipcli.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError
from .config import check_fields, shown
from .convert_base import pack_qkv, preprocess_fields, refuse, tokenizer_fields

if TYPE_CHECKING:  # pragma: no cover
    import torch

SIGLIP_EPS = 1e-6  # every LayerNorm of SigLIP's towers (timm's and transformers' alike)
# The preprocessing of every SigLIP: 0.5 statistics, a bicubic squash to the square (open_clip's
# SigLIP defaults, SiglipImageProcessor's); a config may say otherwise.
SIGLIP_PREPROCESS = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                     "resize_mode": "squash"}


# --------------------------------------------------------------------------- timm's SigLIP trunks


@dataclass(frozen=True)
class TimmTrunk:
    """A timm SigLIP ViT as its registered name defines it."""

    width: int
    depth: int
    heads: int
    mlp_width: int
    patch: int
    resolution: int
    activation: str  # of every MLP, the pooling head's included: "gelu" (exact) or "gelu_tanh"


# size -> (width, depth, heads, MLP width), as timm's vision_transformer.py builds them
TIMM_SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096), "so400m": (1152, 27, 16, 4304),
              "giantopt": (1536, 40, 16, 6144)}
# timm's SigLIP ViTs with attention pooling, and the GELU each is built with
TIMM_TRUNKS = {
    "vit_base_patch16_siglip_224": "gelu", "vit_base_patch16_siglip_256": "gelu",
    "vit_base_patch16_siglip_384": "gelu", "vit_base_patch16_siglip_512": "gelu",
    "vit_base_patch32_siglip_256": "gelu_tanh",
    "vit_large_patch16_siglip_256": "gelu", "vit_large_patch16_siglip_384": "gelu",
    "vit_large_patch16_siglip_512": "gelu_tanh",
    "vit_so400m_patch14_siglip_224": "gelu", "vit_so400m_patch14_siglip_378": "gelu",
    "vit_so400m_patch14_siglip_384": "gelu",
    "vit_so400m_patch16_siglip_256": "gelu_tanh", "vit_so400m_patch16_siglip_384": "gelu_tanh",
    "vit_so400m_patch16_siglip_512": "gelu_tanh",
    "vit_giantopt_patch16_siglip_256": "gelu_tanh", "vit_giantopt_patch16_siglip_384": "gelu_tanh",
}
_TRUNK_NAME = re.compile(r"vit_([a-z0-9]+)_patch(\d+)_siglip_(\d+)")
SIGLIP_TRUNK = re.compile(r"^(naflex)?vit_\w*siglip")  # a timm_model_name of SigLIP's family


def timm_trunk(name: str) -> TimmTrunk | None:
    """The trunk timm registers as ``name``; None for a name not in :data:`TIMM_TRUNKS`."""
    match = _TRUNK_NAME.fullmatch(name)
    if name not in TIMM_TRUNKS or match is None or match[1] not in TIMM_SIZES:
        return None
    width, depth, heads, mlp_width = TIMM_SIZES[match[1]]
    return TimmTrunk(width, depth, heads, mlp_width, int(match[2]), int(match[3]), TIMM_TRUNKS[name])


def siglip_trunk(vision: dict) -> str | None:
    """The timm trunk name of an OpenCLIP ``vision_cfg`` of SigLIP's family, else None."""
    name = vision.get("timm_model_name")
    return name if isinstance(name, str) and SIGLIP_TRUNK.match(name) else None


def trunk_refusal(full_name: str) -> tuple[str, str, str | None] | None:
    """``(family, why, what to use instead)`` for a SigLIP-like timm trunk clipcli cannot run."""
    name = full_name[:100]  # as messages show it
    if name.startswith("naflex"):
        return "SigLIP 2 NaFlex", f"image tower {name}, variable resolution", "use a fixed-resolution SigLIP 2"
    if "_gap" in name:
        return ("SigLIP with global average pooling", f"image tower {name}",
                "clipcli's SigLIP reads images out by attention pooling (timm_pool \"map\")")
    if timm_trunk(full_name) is None:
        return "timm image tower", f"image tower {name} is not one of timm's SigLIP ViTs clipcli knows", None
    return None


# --------------------------------------------------------------------------- OpenCLIP

_OPEN_CLIP_VISION = {"image_size": "size", "timm_model_name": "text", "timm_pool": "text?", "timm_proj": "text?"}
_OPEN_CLIP_TEXT = {"context_length": "count", "vocab_size": "count", "width": "count", "heads": "count",
                   "layers": "count", "mlp_ratio": "positive", "no_causal_mask": "flag?", "proj_bias": "flag?",
                   "pool_type": "text?", "proj_type": "text?", "norm_kwargs": "object?", "act_kwargs": "object?"}
_OPEN_CLIP_TEXT_FLAGS = ("embed_cls", "ls_init_value", "final_ln_after_pool", "qk_norm", "scaled_cosine_attn",
                         "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _open_clip_oddities(model_cfg: dict, trunk: TimmTrunk, where: str, at: str) -> list[str]:
    """What in a SigLIP ``model_cfg`` clipcli's SigLIP does not compute, as ``field=value``
    (absent fields as open_clip's defaults)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    norm = check_fields(where, text.get("norm_kwargs") or {}, {"eps": "positive"}, f"{at}text_cfg.norm_kwargs.")
    act = check_fields(where, text.get("act_kwargs") or {}, {"approximate": "text"}, f"{at}text_cfg.act_kwargs.")
    pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
    size, embed_dim = vision.get("image_size", 224), model_cfg.get("embed_dim")
    text_pool, eps, block = text.get("pool_type", "argmax"), norm.get("eps", 1e-5), text.get("block_type")
    checks = [
        ("vision_cfg.timm_pool", pool, pool != "map"),
        ("vision_cfg.timm_proj", proj, proj != "none"),
        ("vision_cfg.image_size", size, size not in (trunk.resolution, [trunk.resolution] * 2)),
        ("embed_dim", embed_dim, embed_dim != trunk.width),  # no projection after the trunk
        ("text_cfg.no_causal_mask", text.get("no_causal_mask", False), text.get("no_causal_mask") is not True),
        ("text_cfg.pool_type", text_pool, text_pool != "last"),
        ("text_cfg.proj_type", text.get("proj_type"), text.get("proj_type") not in (None, "linear", "none")),
        ("text_cfg.proj_bias", text.get("proj_bias", False),  # else a bare (in, out) matrix, not a Linear
         text.get("proj_type") != "none" and text.get("proj_bias") is not True),
        ("text_cfg.norm_kwargs.eps", eps, abs(eps - SIGLIP_EPS) > 1e-12),
        ("text_cfg.norm_kwargs", norm, bool(set(norm) - {"eps"})),
        ("text_cfg.act_kwargs", act, bool(set(act) - {"approximate"}) or act.get("approximate", "none") not in
         ("none", "tanh") or bool(act and model_cfg.get("quick_gelu"))),
        ("text_cfg.block_type", block, block not in (None, "default")),
        *((f"text_cfg.{name}", text.get(name), bool(text.get(name))) for name in _OPEN_CLIP_TEXT_FLAGS),
    ]
    return [f"{name}={shown(value)}" for name, value, wrong in checks if wrong]


def fields_from_open_clip(model_cfg: dict, source: str, where: str, at: str) -> dict[str, Any]:
    """:class:`CLIPConfig` fields of an OpenCLIP SigLIP ``model_cfg`` (one whose
    ``vision_cfg.timm_model_name`` is a trunk of :data:`TIMM_TRUNKS`; the family check ran
    first), every field read checked first; preprocessing is the caller's."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    check_fields(where, vision, _OPEN_CLIP_VISION, f"{at}vision_cfg.")
    check_fields(where, text, _OPEN_CLIP_TEXT, f"{at}text_cfg.")
    trunk = timm_trunk(vision["timm_model_name"])
    if trunk is None:  # pragma: no cover - the family check refuses it first
        raise refuse(source, "timm image tower", f"image tower {shown(vision['timm_model_name'])}")
    unusual = _open_clip_oddities(model_cfg, trunk, where, at)
    if unusual:
        raise refuse(source, "non-standard SigLIP", ", ".join(unusual))
    approximate = (text.get("act_kwargs") or {}).get("approximate")
    text_act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu_tanh" if approximate == "tanh" else "gelu"
    return {
        "family": "siglip",
        "activation": trunk.activation,
        "text_activation": None if text_act == trunk.activation else text_act,
        "vision_head_width": trunk.width // trunk.heads,
        "transformer_heads": text.get("heads", 8),  # open_clip's CLIPTextCfg default
        "text_pool": "last",
        "logit_bias": model_cfg.get("init_logit_bias") is not None,
        "image_resolution": trunk.resolution,
        "text_projection": text.get("proj_type") != "none",  # open_clip's SO400M i18n has none
        **tokenizer_fields(text, source, where, f"{at}text_cfg."),
    }


# --------------------------------------------------------------------------- transformers config

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_TOWER = {"hidden_act": "text", "layer_norm_eps": "positive", "hidden_size": "count", "intermediate_size": "count",
          "num_attention_heads": "count", "num_hidden_layers": "count"}
_TOWERS = {
    "text": {**_TOWER, "vocab_size": "count", "max_position_embeddings": "count", "projection_size": "count?"},
    "vision": {**_TOWER, "image_size": "count", "patch_size": "count", "num_channels": "count",
               "vision_use_head": "flag?"},
}
# SiglipTextConfig's and SiglipVisionConfig's defaults, for fields a config.json leaves out
_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": SIGLIP_EPS, "hidden_size": 768,
             "num_attention_heads": 12, "vocab_size": 32000, "image_size": 224, "patch_size": 16, "num_channels": 3}
# SigLIP 2's tokenizer (Gemma's vocabulary): transformers' Siglip2Tokenizer only lowercases the text, as
# SigLIP 2 was trained (open_clip's SigLIP 2 configs canonicalize instead: each layout as its reference)
GEMMA_VOCAB = 256000
_PREPROCESSOR = {"do_resize": "flag?", "size": "object?", "resample": "index?", "do_rescale": "flag?",
                 "rescale_factor": "positive?", "do_normalize": "flag?", "image_mean": "mean?", "image_std": "std?",
                 "do_center_crop": "flag?"}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json stores them


def _preprocessing(preprocessor: Any, resolution: int, source: str) -> dict[str, Any]:
    """Preprocessing fields from a ``SiglipImageProcessor``'s ``preprocessor_config.json``: a
    resize to ``size`` (height x width, no crop: our ``squash``), /255, then mean and std."""
    where = f"{source}: preprocessor_config.json"
    check_fields(where, preprocessor, _PREPROCESSOR)
    size = check_fields(where, preprocessor.get("size") or {}, {"height": "count", "width": "count"}, "size.")
    get = preprocessor.get
    problems = {
        "do_resize": get("do_resize") is False and "false",
        "size": ((set(size) - {"height", "width"}) or size.get("height", resolution) != resolution
                 or size.get("width", resolution) != resolution) and shown(size),
        "do_rescale": get("do_rescale") is False and "false",
        "do_center_crop": get("do_center_crop") is True and "true",
        "rescale_factor": abs((get("rescale_factor") or 1 / 255) - 1 / 255) > 1e-9 and shown(get("rescale_factor")),
    }
    unusual = [f"{name} {value}" for name, value in problems.items() if value]
    if unusual:
        raise UnsupportedModelError(f"{source}: preprocessing with {', '.join(unusual)} is not supported (a resize "
                                    f"to {shown(resolution)} px square, /255, then mean and std)")
    resample = get("resample")
    if get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = get("image_mean"), get("image_std")
    return preprocess_fields(source, mean, std, _RESAMPLE.get(resample, resample) if resample is not None else None,
                             None)


def config_from_transformers(config: dict, source: str, preprocessor: Any = None) -> dict[str, Any]:
    """:class:`CLIPConfig` fields from a ``SiglipModel`` ``config.json`` (``model_type``
    ``"siglip"``, checked by the caller) and its ``preprocessor_config.json`` when there is one,
    every field read checked first."""
    where = f"{source}: config.json"
    check_fields(where, config, {"text_config": "object?", "vision_config": "object?"})
    towers = {}
    for tower, schema in _TOWERS.items():
        data = check_fields(where, config.get(f"{tower}_config") or {}, schema, f"{tower}_config.")
        towers[tower] = {**_DEFAULTS, **data}
    text, vision = towers["text"], towers["vision"]
    acts = {tower: _ACTIVATIONS.get(data["hidden_act"]) for tower, data in towers.items()}
    for tower, data in towers.items():
        if acts[tower] is None:
            raise UnsupportedModelError(f"{source}: {tower}_config.hidden_act {shown(data['hidden_act'])} is not "
                                        f"supported (one of {', '.join(_ACTIVATIONS)})")
        if abs(data["layer_norm_eps"] - SIGLIP_EPS) > 1e-12:
            raise UnsupportedModelError(f"{source}: {tower}_config.layer_norm_eps {shown(data['layer_norm_eps'])} is not "
                                        f"supported (SigLIP uses {SIGLIP_EPS})")
        if data["hidden_size"] % data["num_attention_heads"]:
            raise UnsupportedModelError(f"{source}: {tower}_config.hidden_size {shown(data['hidden_size'])} does not "
                                        f"split into {shown(data['num_attention_heads'])} attention heads")
    if vision["num_channels"] != 3:
        raise UnsupportedModelError(f"{source}: vision_config.num_channels {shown(vision['num_channels'])} is not "
                                    "supported (RGB: 3)")
    if vision.get("vision_use_head") is False:
        raise refuse(source, "SigLIP image encoder without its pooling head", "vision_config.vision_use_head false")
    projection = text.get("projection_size") or text["hidden_size"]  # transformers' default
    if projection != vision["hidden_size"]:
        raise UnsupportedModelError(f"{source}: text_config.projection_size {shown(projection)} is not the image "
                                    f"embedding's width ({shown(vision['hidden_size'])})")
    fields: dict[str, Any] = {
        "family": "siglip",
        "activation": acts["vision"],
        "text_activation": None if acts["text"] == acts["vision"] else acts["text"],
        "vision_head_width": vision["hidden_size"] // vision["num_attention_heads"],
        "transformer_heads": text["num_attention_heads"],
        "text_pool": "last",
        "logit_bias": True,
        "tokenizer": "sentencepiece",
        "text_clean": "lowercase" if text["vocab_size"] == GEMMA_VOCAB else "siglip",
        "image_resolution": vision["image_size"],
        **SIGLIP_PREPROCESS,
    }
    if preprocessor is not None:
        fields.update(_preprocessing(preprocessor, vision["image_size"], source))
    return fields


# --------------------------------------------------------------------------- transformers keys

_LAYER = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PREFIX = {"vision": "visual.trunk.blocks.{}.", "text": "text.transformer.resblocks.{}."}
_LAYER_PARTS = {  # transformers' block names -> timm's (image) and open_clip's (text)
    "vision": {"layer_norm1.": "norm1.", "self_attn.out_proj.": "attn.proj.", "layer_norm2.": "norm2.",
               "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."},
    "text": {"layer_norm1.": "ln_1.", "self_attn.out_proj.": "attn.out_proj.", "layer_norm2.": "ln_2.",
             "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."},
}
_PACKED = {"vision": "attn.qkv.{}", "text": "attn.in_proj_{}"}  # where q/k/v weight or bias go, packed
_RENAMES = {
    "vision_model.embeddings.patch_embedding.weight": "visual.trunk.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual.trunk.patch_embed.proj.bias",
    "vision_model.embeddings.position_embedding.weight": "visual.trunk.pos_embed",
    "vision_model.post_layernorm.weight": "visual.trunk.norm.weight",
    "vision_model.post_layernorm.bias": "visual.trunk.norm.bias",
    "vision_model.head.probe": "visual.trunk.attn_pool.latent",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "text_model.head.weight": "text.text_projection.weight",
    "text_model.head.bias": "text.text_projection.bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
_HEAD_PARTS = {"attention.out_proj.": "proj.", "layernorm.": "norm.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
# the pooling head's nn.MultiheadAttention in-projection (3C, ...) = our query (C, ...) + key-value (2C, ...)
_SPLIT = {f"vision_model.head.attention.in_proj_{p}": (f"visual.trunk.attn_pool.q.{p}", f"visual.trunk.attn_pool.kv.{p}")
          for p in ("weight", "bias")}


def our_key(key: str) -> tuple[str | None, str | None]:
    """``(our name, part)`` of a ``SiglipModel`` key: ``part`` is ``q``/``k``/``v`` for a third
    of a block's attention projection (packed into one), ``split`` for the pooling head's
    in-projection (named here by its query part); ``our name`` is None for what is dropped
    (``position_ids``) and the key itself for keys we do not know."""
    if key.endswith("position_ids"):
        return None, None  # a buffer of arange(n), not a parameter
    if key in _RENAMES:
        return _RENAMES[key], None
    if key in _SPLIT:
        return _SPLIT[key][0], "split"
    if key.startswith("vision_model.head."):
        rest = key[len("vision_model.head."):]
        for theirs, ours in _HEAD_PARTS.items():
            if rest.startswith(theirs):
                return "visual.trunk.attn_pool." + ours + rest[len(theirs):], None
        return key, None
    match = _LAYER.match(key)
    if match is None:
        return key, None
    tower, index, rest = match.groups()
    prefix = _LAYER_PREFIX[tower].format(index)
    which = rest[len("self_attn."):len("self_attn.") + 1]
    if rest.startswith("self_attn.") and which in ("q", "k", "v") and "_proj." in rest:
        return prefix + _PACKED[tower].format(rest.rsplit(".", 1)[1]), which
    for theirs, ours in _LAYER_PARTS[tower].items():
        if rest.startswith(theirs):
            return prefix + ours + rest[len(theirs):], None
    return key, None


def state_dict_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``SiglipModel`` state dict in our (open_clip's) names and shapes. Keys it
    does not know, and tensors that cannot be packed or split, are kept as they are, so the
    strict load names them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        ours, part = our_key(key)
        if ours is None:
            continue
        if part == "split":
            if value.ndim and value.shape[0] % 3 == 0:
                third = value.shape[0] // 3
                query, key_value = _SPLIT[key]
                out[query], out[key_value] = value[:third].clone(), value[third:].clone()  # (C, ...), (2C, ...)
            else:
                out[key] = value
        elif part is not None:
            qkv.setdefault(ours, {})[part] = (key, value)
        elif ours == "visual.trunk.pos_embed" and value.ndim == 2:
            out[ours] = value.unsqueeze(0)  # (N, C) -> (1, N, C), as timm holds it
        elif ours in ("logit_scale", "logit_bias") and value.numel() == 1:
            out[ours] = value.reshape(())  # (1,) -> (), as open_clip holds them
        else:
            out[ours] = value
    pack_qkv(out, qkv)
    return out
