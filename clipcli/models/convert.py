"""Foreign model descriptions -> ours: pure functions, no I/O.

- **OpenCLIP** keeps OpenAI's key names (timm's and its own for SigLIP); its
  ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) says what shapes cannot: the
  activation, head widths, text heads, tokenizer, mean/std, interpolation and resize mode.
  :func:`config_from_open_clip` turns it into :class:`~clipcli.models.config.CLIPConfig` fields.
- **Hugging Face transformers** ``CLIPModel`` (and ``MetaClip2Model``, the same towers) has its
  own key names (separate q/k/v projections, ``layer_norm1/2``, ``fc1/fc2``, ``pre_layrnorm``,
  projections stored as ``nn.Linear`` weights, i.e. transposed) and a ``config.json``:
  :func:`state_dict_from_transformers` renames and packs, :func:`config_from_transformers` reads.

Three families run: plain CLIP (a ViT or ModifiedResNet image tower, a causal text Transformer
read out at the end-of-text token, OpenAI's BPE), CLIP with its own tokenizer read out at the
first ``eos_id`` (MetaCLIP 2 "worldwide": XLM-V or mT5), and SigLIP (SigLIP 2 at a fixed
resolution included: :mod:`clipcli.models.convert_siglip`). Any other is refused with one line
naming its family: loading it as one of these would be silently wrong. Every field read is
checked first (:func:`clipcli.models.config.check_fields`): a value of the wrong type or range is
one :class:`~clipcli.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsupportedModelError
from . import convert_siglip
from .config import HEAD_WIDTH, check_fields, shown, tower_of
from .convert_base import RUNS, VOCAB_SIZE, pack_qkv, preprocess_fields, refuse, tokenizer_fields  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    import torch

# --------------------------------------------------------------------------- OpenCLIP

OPEN_CLIP_CONFIG = "open_clip_config.json"
# Fields of an open_clip_config.json and their kinds (clipcli.models.config.check_fields): the names the
# family check reads first, then what a plain CLIP's config holds.
_OPEN_CLIP_NAMES = {
    "vision_cfg": {"timm_model_name": "text?", "eva_model_name": "text?", "pos_embed_type": "text?",
                   "pool_type": "text?"},
    "text_cfg": {"hf_tokenizer_name": "text?", "hf_model_name": "text?", "pool_type": "text?", "proj_type": "text?"},
}
_OPEN_CLIP_MODEL = {"embed_dim": "count", "quick_gelu": "flag?", "init_logit_scale": "number?",
                    "init_logit_bias": "number?"}
_OPEN_CLIP_VISION = {"image_size": "size", "layers": "layers", "width": "count", "head_width": "count",
                     "patch_size": "count?", "mlp_ratio": "positive"}
_OPEN_CLIP_TEXT = {"context_length": "count", "vocab_size": "count", "width": "count", "heads": "count",
                   "layers": "count", "mlp_ratio": "positive", "eos_id": "index?"}
_OPEN_CLIP_PREPROCESS = {"mean": "mean?", "std": "std?", "interpolation": "text?", "resize_mode": "text?", "size": "size?"}


def open_clip_family(model_cfg: dict) -> tuple[str, str] | tuple[str, str, str | None] | None:
    """``(family, why[, instead])`` when clipcli cannot run an OpenCLIP ``model_cfg``, else None
    (plain CLIP, CLIP with a hub tokenizer read out at ``eos_id`` such as MetaCLIP 2, SigLIP)."""

    vision = model_cfg.get("vision_cfg") or {}
    text = model_cfg.get("text_cfg") or {}
    timm = str(vision.get("timm_model_name") or "")[:100]  # as messages show them
    tokenizer, hf_model = str(text.get("hf_tokenizer_name") or "")[:100], str(text.get("hf_model_name") or "")[:100]
    siglip = convert_siglip.siglip_trunk(vision)
    checks = [
        (model_cfg.get("multimodal_cfg"), "CoCa", "it has a multimodal text decoder"),
        ("nllb" in hf_model.lower(), "NLLB-SigLIP" if model_cfg.get("init_logit_bias") is not None else "NLLB-CLIP",
         f"text tower {hf_model}"),
        (vision.get("eva_model_name") or timm.startswith("eva"), "EVA",
         f"image tower {str(vision.get('eva_model_name'))[:100] if vision.get('eva_model_name') else timm}"),
        ("convnext" in timm, "ConvNeXt", f"image tower {timm}"),
        ("vitamin" in timm, "ViTamin", f"image tower {timm}"),
        ("fastvit" in timm or "mobileclip" in timm or "mci" in timm, "MobileCLIP", f"image tower {timm}"),
        ("pe_" in timm or "perception" in timm or vision.get("pos_embed_type") not in (None, "learnable"),
         "Perception Encoder (PE)", f"image tower {timm or str(vision.get('pos_embed_type'))[:100]}"),
        (timm and not siglip, "timm image tower", f"image tower {timm}"),
        (hf_model, "Hugging Face text tower", f"text tower {hf_model}"),
        (not siglip and tokenizer and (text.get("pool_type") == "last" or text.get("no_causal_mask")), "CLIPA",
         f"tokenizer {tokenizer}, text read out at the last token"),
        (not siglip and (vision.get("attentional_pool") or model_cfg.get("custom_text")),
         "custom-text/attentional-pool", "its towers are not CLIP's"),
    ]
    for condition, family, why in checks:
        if condition:
            return family, why
    if siglip:
        return convert_siglip.trunk_refusal(siglip)  # the text tower is checked with the rest of a SigLIP's config
    text_pools = ("argmax", "eos") if tokenizer else ("argmax",)
    odd = {
        "vision_cfg.no_ln_pre": vision.get("no_ln_pre"),
        "vision_cfg.final_ln_after_pool": vision.get("final_ln_after_pool"),
        "vision_cfg.global_average_pool": vision.get("global_average_pool"),
        "vision_cfg.ls_init_value": vision.get("ls_init_value"),
        "vision_cfg.act_kwargs": vision.get("act_kwargs"),
        "vision_cfg.norm_kwargs": vision.get("norm_kwargs"),
        "vision_cfg.output_tokens": vision.get("output_tokens"),
        "vision_cfg.pool_type": vision.get("pool_type") not in (None, "tok") and vision.get("pool_type"),
        "text_cfg.pool_type": text.get("pool_type") not in (None, *text_pools) and text.get("pool_type"),
        "text_cfg.proj_bias": text.get("proj_bias"),
        "text_cfg.proj_type": text.get("proj_type") not in (None, "linear") and text.get("proj_type"),
        "text_cfg.embed_cls": text.get("embed_cls"),
        "text_cfg.ls_init_value": text.get("ls_init_value"),
        "text_cfg.act_kwargs": text.get("act_kwargs"),
        "text_cfg.norm_kwargs": text.get("norm_kwargs"),
        "text_cfg.pad_id": text.get("pad_id") not in (None, 0) and text.get("pad_id"),
        "text_cfg.vocab_size": not tokenizer and text.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE
        and text.get("vocab_size"),
        **{f"{tower}.{name}": cfg.get(name) for tower, cfg in (("vision_cfg", vision), ("text_cfg", text))
           for name in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")},
    }
    unusual = [f"{name}={shown(value)}" for name, value in odd.items() if value]
    if unusual:
        return "non-standard CLIP", ", ".join(unusual)
    return None


def _model_cfg(config: Any, where: str) -> tuple[dict, str]:
    """``(model_cfg, prefix of its fields in messages)`` of an ``open_clip_config.json`` or a bare ``model_cfg``."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is {shown(config)}, not a JSON object")
    wrapped = "model_cfg" in config
    model_cfg = check_fields(where, config["model_cfg"], {}, "model_cfg.") if wrapped else config
    at = "model_cfg." if wrapped else ""
    if not isinstance(model_cfg.get("vision_cfg"), dict) or not isinstance(model_cfg.get("text_cfg"), dict):
        missing = "vision_cfg" if not isinstance(model_cfg.get("vision_cfg"), dict) else "text_cfg"
        raise CheckpointError(f"{where}: {at}{missing} is {shown(model_cfg.get(missing))}, not a JSON object "
                              "(the OpenCLIP config has no vision_cfg/text_cfg)")
    for tower in ("vision_cfg", "text_cfg"):
        check_fields(where, model_cfg[tower], _OPEN_CLIP_NAMES[tower], f"{at}{tower}.")
    return model_cfg, at


def open_clip_tokenizer_repo(config: Any, source: str = "model") -> str | None:
    """The hub repository an OpenCLIP config names for its tokenizer (``text_cfg.hf_tokenizer_name``;
    open_clip prefers a hub model's own tokenizer files), None for OpenAI's BPE."""
    model_cfg, _ = _model_cfg(config, f"{source}: {OPEN_CLIP_CONFIG}")
    return model_cfg["text_cfg"].get("hf_tokenizer_name") or None


def _clip_fields(model_cfg: dict, source: str, where: str, at: str) -> dict[str, Any]:
    """:class:`CLIPConfig` fields of a CLIP ``model_cfg`` (the family check ran first)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    check_fields(where, vision, _OPEN_CLIP_VISION, f"{at}vision_cfg.")
    check_fields(where, text, _OPEN_CLIP_TEXT, f"{at}text_cfg.")
    fields: dict[str, Any] = {
        "activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "vision_head_width": vision.get("head_width", HEAD_WIDTH),
        "transformer_heads": text.get("heads", 8),  # open_clip's CLIPTextCfg default
        **tokenizer_fields(text, source, where, f"{at}text_cfg."),
    }
    if text.get("pool_type") == "eos":
        eos_id = 2 if text.get("eos_id") is None else text["eos_id"]  # open_clip's CLIPTextCfg default
        if eos_id >= text.get("vocab_size", VOCAB_SIZE):
            raise CheckpointError(f"{where}: {at}text_cfg.eos_id is {shown(eos_id)}, outside the vocabulary of "
                                  f"{shown(text.get('vocab_size', VOCAB_SIZE))}")
        fields.update(text_pool="eos", eos_id=eos_id)
    return fields


def config_from_open_clip(config: Any, source: str) -> dict[str, Any]:
    """:class:`CLIPConfig` fields that shapes cannot show, from an ``open_clip_config.json``
    (``{"model_cfg": ..., "preprocess_cfg": ...}``) or a bare ``model_cfg``, every field it
    reads checked first. A SigLIP's preprocessing defaults to SigLIP's (0.5 statistics, bicubic
    squash), anything else's to OpenAI's, for what ``preprocess_cfg`` does not say."""
    where = f"{source}: {OPEN_CLIP_CONFIG}"
    model_cfg, at = _model_cfg(config, where)
    preprocess = config.get("preprocess_cfg") if at else None
    preprocess = {} if preprocess is None else check_fields(where, preprocess, _OPEN_CLIP_PREPROCESS, "preprocess_cfg.")
    family = open_clip_family(model_cfg)
    if family:
        raise refuse(source, *family)
    check_fields(where, model_cfg, _OPEN_CLIP_MODEL, at)
    if convert_siglip.siglip_trunk(model_cfg["vision_cfg"]):
        fields = {**convert_siglip.fields_from_open_clip(model_cfg, source, where, at),
                  **convert_siglip.SIGLIP_PREPROCESS}
    else:
        fields = _clip_fields(model_cfg, source, where, at)
        if model_cfg.get("init_logit_bias") is not None:  # a CLIP trained with the sigmoid loss
            fields["logit_bias"] = True
    fields.update(preprocess_fields(source, preprocess.get("mean"), preprocess.get("std"),
                                    preprocess.get("interpolation"), preprocess.get("resize_mode")))
    return fields


# --------------------------------------------------------------------------- transformers

# model_type values of CLIP-like families that clipcli does not run.
TRANSFORMERS_FAMILIES = {
    "chinese_clip": "Chinese-CLIP", "altclip": "AltCLIP", "clipseg": "CLIPSeg", "x_clip": "X-CLIP", "owlvit": "OWL-ViT",
    "owlv2": "OWLv2", "clip_vision_model": "CLIP vision-only", "clip_text_model": "CLIP text-only",
    "siglip_vision_model": "SigLIP vision-only", "siglip_text_model": "SigLIP text-only", "blip": "BLIP",
    "groupvit": "GroupViT", "flava": "FLAVA", "align": "ALIGN", "git": "GIT"}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor_config.json stores them
# MetaCLIP 2's tokenizers by vocabulary: XLM-V's text is only whitespace-cleaned (open_clip's
# HFTokenizer default), mT5's canonicalized (open_clip's ViT-*-worldwide configs).
METACLIP_2_CLEAN = {901629: "whitespace", 250100: "canonicalize"}
TRANSFORMERS_CONFIG, TRANSFORMERS_PREPROCESSOR = "config.json", "preprocessor_config.json"
# Fields of a CLIPModel config.json and its preprocessor_config.json, and their kinds.
_TRANSFORMERS_TOP = {"model_type": "text", "text_config": "object?", "vision_config": "object?",
                     "text_config_dict": "object?", "vision_config_dict": "object?", "projection_dim": "count",
                     "logit_scale_init_value": "number"}
_TRANSFORMERS_TOWER = {"hidden_act": "text", "layer_norm_eps": "positive", "hidden_size": "count",
                       "intermediate_size": "count", "num_attention_heads": "count", "num_hidden_layers": "count",
                       "projection_dim": "count"}
_TRANSFORMERS_TOWERS = {
    "text": {**_TRANSFORMERS_TOWER, "vocab_size": "count", "max_position_embeddings": "count",
             "eos_token_id": "index?"},
    "vision": {**_TRANSFORMERS_TOWER, "image_size": "count", "patch_size": "count", "num_channels": "count"},
}
_TRANSFORMERS_PREPROCESSING = {"image_mean": "mean?", "image_std": "std?", "resample": "index?"}


def _model_type(config: Any, source: str) -> str:
    """The ``model_type`` of a transformers ``config.json``, refused unless clipcli runs it."""
    where = f"{source}: {TRANSFORMERS_CONFIG}"
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is {shown(config)}, not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{where}: model_type is {shown(model_type)}, not a string")
    quoted = repr(model_type if len(model_type) <= 40 else model_type[:37] + "...")
    if model_type == "siglip2":
        raise refuse(source, "SigLIP 2 NaFlex", "transformers model_type 'siglip2', variable resolution",
                     "use a fixed-resolution SigLIP 2 such as google/siglip2-base-patch16-224 (model_type 'siglip')")
    if model_type not in ("clip", "metaclip_2", "siglip"):
        raise refuse(source, TRANSFORMERS_FAMILIES.get(model_type, quoted), f"transformers model_type {quoted}")
    return model_type


def config_from_transformers(config: Any, source: str, preprocessor: Any = None) -> dict[str, Any]:
    """:class:`CLIPConfig` fields that shapes cannot show, from a ``CLIPModel``, ``MetaClip2Model``
    or ``SiglipModel`` ``config.json`` (and its ``preprocessor_config.json``, when there is one),
    every field it reads checked first."""
    where = f"{source}: {TRANSFORMERS_CONFIG}"
    model_type = _model_type(config, source)
    if model_type == "siglip":
            return convert_siglip.config_from_transformers(config, source, preprocessor)
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
            raise UnsupportedModelError(f"{source}: layer_norm_eps {shown(eps)} is not supported (CLIP uses 1e-5)")
    vocab = text.get("vocab_size", VOCAB_SIZE)
    if vocab != VOCAB_SIZE and model_type == "clip":
        raise refuse(source, "CLIP with another tokenizer", f"vocabulary of {shown(vocab)}, not OpenAI's {VOCAB_SIZE}")
    vision_width, vision_heads = vision.get("hidden_size", 768), vision.get("num_attention_heads", 12)
    text_width, text_heads = text.get("hidden_size", 512), text.get("num_attention_heads", 8)
    if vision_width % vision_heads or text_width % text_heads:
        raise UnsupportedModelError(f"{source}: hidden sizes do not split into the configured attention heads "
                                    f"(vision {shown(vision_width)} into {shown(vision_heads)}, text "
                                    f"{shown(text_width)} into {shown(text_heads)})")
    fields: dict[str, Any] = {
        "activation": acts.pop(),
        "vision_head_width": vision_width // vision_heads,
        "transformer_heads": text_heads,
    }
    if model_type == "metaclip_2":  # CLIP's towers, its own tokenizer, read out at the first end token
        # MetaClip2TextConfig's default is CLIP's 49407 (the released configs all say 2)
        eos_id = 49407 if text.get("eos_token_id") is None else text["eos_token_id"]
        if eos_id >= vocab:
            raise CheckpointError(f"{where}: text_config.eos_token_id is {shown(eos_id)}, outside the vocabulary "
                                  f"of {shown(vocab)}")
        fields.update(tokenizer="sentencepiece", text_clean=METACLIP_2_CLEAN.get(vocab, "whitespace"),
                      text_pool="eos", eos_id=eos_id)
    if preprocessor is not None:
        check_fields(f"{source}: {TRANSFORMERS_PREPROCESSOR}", preprocessor, _TRANSFORMERS_PREPROCESSING)
        resample = preprocessor.get("resample")
        fields.update(preprocess_fields(source, preprocessor.get("image_mean"), preprocessor.get("image_std"),
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


def is_transformers_state_dict(state_dict) -> bool:
    """Whether a state dict's keys are transformers' (``CLIPModel``, ``MetaClip2Model`` or ``SiglipModel``)."""
    return any(key.startswith(("text_model.", "vision_model.")) for key in state_dict)


def is_transformers_siglip(state_dict) -> bool:
    """Whether a state dict in transformers' names is a ``SiglipModel``'s (its towers' heads)."""
    return any(key.startswith(("vision_model.head.", "text_model.head.")) for key in state_dict)


def tower_of_key(key: str) -> str | None:
    """``image``, ``text`` or None (``logit_scale``, ``logit_bias``, metadata) for a key in
    OpenAI's, open_clip's SigLIP or transformers' names."""
    if key.startswith(("vision_model.", "visual_projection")):
        return "image"
    if key.startswith(("text_model.", "text.")):
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


def openai_key(key: str, siglip: bool = False) -> str | None:
    """The key in our names that a transformers key becomes (a ``CLIPModel``'s, or with ``siglip`` a
    ``SiglipModel``'s: :func:`is_transformers_siglip` of the whole state dict, since one key cannot say;
    the pooling head's in-projection, split in two, gives its query part); None for one that is dropped."""
    if siglip:
        return convert_siglip.our_key(key)[0]
    return _ours(key)[0]


def state_dict_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel``/``MetaClip2Model`` state dict with OpenAI's key names, or a
    ``SiglipModel``'s with ours (open_clip's; :mod:`clipcli.models.convert_siglip`). Keys it does
    not know (and q/k/v projections that cannot be packed) are kept as they are, so the strict
    load names them."""
    if is_transformers_siglip(state_dict):
        return convert_siglip.state_dict_from_transformers(state_dict)
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
    pack_qkv(out, qkv)
    return out
