"""The registry's SigLIP, SigLIP 2 and MetaCLIP 2 entries against open_clip, timm and transformers.

open_clip's configs and pretrained table say which weights exist and the text tower; timm's
``vit_*_siglip_*`` models (which open_clip builds for SigLIP's image tower) say the rest. Models
are built on the meta device (nothing allocated): a handful here, every one under ``-m slow``.
"""

from __future__ import annotations

import warnings
from functools import cache

import pytest

from clipcli.models import registry
from clipcli.models.config import CLIPConfig, config_from_json, config_to_json, normalized

SIGLIP = [
    "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256", "ViT-B-16-SigLIP-384", "ViT-B-16-SigLIP-512", "ViT-B-16-SigLIP-i18n-256",
    "ViT-L-16-SigLIP-256", "ViT-L-16-SigLIP-384", "ViT-SO400M-14-SigLIP", "ViT-SO400M-14-SigLIP-378",
    "ViT-SO400M-14-SigLIP-384", "ViT-SO400M-16-SigLIP-i18n-256",
]
SIGLIP2 = [
    "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-256", "ViT-B-16-SigLIP2-384", "ViT-B-16-SigLIP2-512", "ViT-B-32-SigLIP2-256",
    "ViT-L-16-SigLIP2-256", "ViT-L-16-SigLIP2-384", "ViT-L-16-SigLIP2-512", "ViT-SO400M-14-SigLIP2",
    "ViT-SO400M-14-SigLIP2-378", "ViT-SO400M-16-SigLIP2-256", "ViT-SO400M-16-SigLIP2-384", "ViT-SO400M-16-SigLIP2-512",
    "ViT-gopt-16-SigLIP2-256", "ViT-gopt-16-SigLIP2-384",
]
WORLDWIDE = [
    "ViT-H-14-worldwide", "ViT-H-14-worldwide-378", "ViT-H-14-worldwide-quickgelu", "ViT-L-14-worldwide",
    "ViT-L-14-worldwide-quickgelu", "ViT-bigG-14-worldwide", "ViT-bigG-14-worldwide-378",
]
ARCHS = SIGLIP + SIGLIP2 + WORLDWIDE
# One of each kind of tower: exact and tanh GELU, 14- and 16-pixel patches, no text projection,
# timm's giant-opt, MetaCLIP 2's QuickGELU; the rest under -m slow.
FEW = {"ViT-B-16-SigLIP", "ViT-SO400M-16-SigLIP-i18n-256", "ViT-B-32-SigLIP2-256", "ViT-SO400M-14-SigLIP2-378",
       "ViT-gopt-16-SigLIP2-256", "ViT-H-14-worldwide-quickgelu"}


def some(names):
    return [name if name in FEW else pytest.param(name, marks=pytest.mark.slow) for name in names]


def open_clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import open_clip
    return open_clip


@cache
def built(arch: str):
    """open_clip's model of ``arch`` on the meta device (built there too: nothing initialised)."""
    import logging

    import torch

    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": none asked for
    with torch.device("meta"):
        return open_clip().create_model(arch, device="meta")


def activation_of(module) -> str:
    """Our name of an activation module: torch's GELU (exact or ``approximate="tanh"``), timm's
    GELUTanh, open_clip's QuickGELU."""
    kind = type(module).__name__
    if kind == "QuickGELU":
        return "quick_gelu"
    assert kind in ("GELU", "GELUTanh"), kind
    return "gelu_tanh" if kind == "GELUTanh" or module.approximate == "tanh" else "gelu"


# --- architectures ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_builds_a_valid_config(arch):
    hints = registry.architecture_hints(arch)
    config = CLIPConfig(**hints)
    assert config_from_json(config_to_json(config)) == normalized(config)  # every field checked, none unknown
    assert config.vision_width % config.vision_head_width == 0 and config.transformer_width % config.transformer_heads == 0
    assert registry.parameters(arch) > 100_000_000
    if arch in WORLDWIDE:
        assert (config.family, config.logit_bias, config.tokenizer, config.text_pool) == (
            "clip", False, "sentencepiece", "eos")
        assert config.activation == ("quick_gelu" if arch.endswith("-quickgelu") else "gelu")
    else:
        assert (config.family, config.logit_bias, config.tokenizer, config.text_pool, config.text_clean) == (
            "siglip", True, "sentencepiece", "last", "canonicalize")
        assert (config.image_mean, config.image_std, config.interpolation, config.resize_mode) == (
            (0.5,) * 3, (0.5,) * 3, "bicubic", "squash")
        assert config.text_act == ("gelu_tanh" if arch in SIGLIP2 else "gelu")  # SigLIP 2's text: tanh GELU


@pytest.mark.parametrize("arch", ARCHS)
def test_hints_match_open_clips_config(arch):
    config = open_clip().get_model_config(arch)
    vision, text, hints = config["vision_cfg"], config["text_cfg"], registry.architecture_hints(arch)
    assert (hints["embed_dim"], hints["image_resolution"]) == (config["embed_dim"], vision["image_size"])
    assert (hints["transformer_width"], hints["transformer_heads"], hints["transformer_layers"]) == (
        text["width"], text["heads"], text["layers"])
    assert (hints["context_length"], hints["vocab_size"]) == (text["context_length"], text["vocab_size"])
    assert hints.get("text_mlp_width", 4 * text["width"]) == int(text["width"] * text.get("mlp_ratio", 4.0))
    assert hints["text_pool"] == text["pool_type"] and hints.get("eos_id") == text.get("eos_id")
    assert hints["text_clean"] == text.get("tokenizer_kwargs", {}).get("clean", "whitespace")  # HFTokenizer's default
    assert hints.get("text_projection", True) == (text.get("proj_type") != "none")
    assert registry.tokenizer_repo(arch) == text["hf_tokenizer_name"]
    if "timm_model_name" not in vision:
        assert (hints["vision_layers"], hints["vision_width"], hints["vision_patch_size"]) == (
            vision["layers"], vision["width"], vision["patch_size"])
        assert hints["vision_head_width"] == vision.get("head_width", 64)


@pytest.mark.parametrize("arch", some(ARCHS))
def test_hints_and_parameters_match_the_model_open_clip_builds(arch):
    """Widths, depths, heads, MLP widths and activations of the towers open_clip builds (timm's
    for SigLIP's image tower), and the parameter count stored."""
    model, hints = built(arch), registry.architecture_hints(arch)
    assert registry.parameters(arch) == sum(p.numel() for p in model.parameters())
    text = model.text if hasattr(model, "text") else model
    block = text.transformer.resblocks[0]
    assert block.mlp.c_fc.out_features == hints.get("text_mlp_width", 4 * hints["transformer_width"])
    assert activation_of(block.mlp.gelu) == (hints.get("text_activation") or hints["activation"])
    assert (len(text.transformer.resblocks), block.attn.num_heads) == (hints["transformer_layers"],
                                                                       hints["transformer_heads"])
    if hasattr(model.visual, "trunk"):  # timm's ViT
        trunk = model.visual.trunk
        first = trunk.blocks[0]
        assert (trunk.embed_dim, len(trunk.blocks), trunk.patch_embed.patch_size[0]) == (
            hints["vision_width"], hints["vision_layers"], hints["vision_patch_size"])
        assert trunk.embed_dim // first.attn.num_heads == hints["vision_head_width"]
        assert first.mlp.fc1.out_features == hints["vision_mlp_width"] == trunk.attn_pool.mlp.fc1.out_features
        assert activation_of(first.mlp.act) == hints["activation"]
    else:
        first = model.visual.transformer.resblocks[0]
        assert first.mlp.c_fc.out_features == hints["vision_mlp_width"]
        assert activation_of(first.mlp.gelu) == hints["activation"]


def test_readable_facts():
    # the vision tower's activation follows timm's definition, not the family: exact GELU for
    # SigLIP 2's B/16, tanh GELU for its B/32, So400m/16 and giant-opt
    assert registry.architecture_hints("ViT-B-16-SigLIP2")["activation"] == "gelu"
    assert registry.architecture_hints("ViT-SO400M-16-SigLIP2-256")["activation"] == "gelu_tanh"
    so400m = registry.architecture_hints("ViT-SO400M-14-SigLIP")
    assert (so400m["vision_head_width"], so400m["vision_mlp_width"], so400m["context_length"]) == (72, 4304, 16)
    assert registry.architecture_hints("ViT-gopt-16-SigLIP2-384")["vision_head_width"] == 96
    assert round(registry.parameters("ViT-B-16-SigLIP") / 1e6, 2) == 203.16  # open_clip's results table: 203.16
    assert registry.architecture_hints("ViT-B-16-SigLIP-quickgelu") is None  # QuickGELU names are CLIP's only
    assert registry.tokenizer_repo("ViT-B-32") is None


# --- weights ---------------------------------------------------------------------------------

def _pairs():
    return [(arch, tag) for arch, tag in open_clip().list_pretrained() if arch.removesuffix("-quickgelu") in ARCHS]


def test_every_siglip_and_worldwide_pair_is_in_the_registry():
    pairs = _pairs()
    assert len(pairs) == len(SIGLIP) + len(SIGLIP2) + 5  # four worldwide weights, one also as -quickgelu
    for arch, tag in pairs:
        entry = registry.find_pretrained(f"{arch}/{tag}")
        cfg = open_clip().get_pretrained_cfg(arch, tag)
        assert entry is not None and entry.hf_repo == cfg["hf_hub"].rstrip("/"), (arch, tag)
        config = CLIPConfig(**entry.hints)  # the defaults are OpenAI's preprocessing
        assert (config.activation == "quick_gelu") == bool(cfg.get("quick_gelu")), entry.name
        assert (config.image_mean, config.image_std) == (tuple(cfg["mean"]), tuple(cfg["std"])), entry.name
        assert (config.interpolation, config.resize_mode) == (cfg["interpolation"], cfg["resize_mode"]), entry.name
        tokenizer = open_clip().get_model_config(arch)["text_cfg"]["hf_tokenizer_name"]
        assert entry.tokenizer_repo == (None if tokenizer == entry.hf_repo else tokenizer), entry.name


def test_families_licences_and_scores():
    entries = {e.name: e for e in registry.pretrained() if e.arch in ARCHS}
    assert len(entries) == len(SIGLIP) + len(SIGLIP2) + 4
    for name, entry in entries.items():
        family = "MetaCLIP 2" if entry.arch in WORLDWIDE else "SigLIP 2" if "SigLIP2" in entry.arch else "SigLIP"
        assert (entry.family, entry.license) == (family, "CC-BY-NC-4.0" if family == "MetaCLIP 2" else "Apache-2.0")
        assert entry.score_kind == ("softmax" if family == "MetaCLIP 2" else "sigmoid"), name
        assert entry.multilingual == (family != "SigLIP" or "i18n" in entry.arch), name
    assert registry.find_pretrained("ViT-B-32/openai") is None and registry.find_pretrained(
        "ViT-B-32/laion2b_s34b_b79k").score_kind == "softmax"


def test_names_and_facts_of_siglip_weights():
    b16 = registry.find_pretrained("vit-b-16-siglip/WEBLI")
    assert b16.hf_repo == "timm/ViT-B-16-SigLIP" and b16.tokenizer_repo is None and b16.imagenet_top1 == 76.0
    so400m = registry.find_pretrained("ViT-SO400M-14-SigLIP-378/webli")  # open_clip: the 384 weights at 378
    assert so400m.hf_repo == "timm/ViT-SO400M-14-SigLIP-384" and so400m.tokenizer_repo == "timm/ViT-B-16-SigLIP"
    assert so400m.imagenet_top1 is None and registry.find_pretrained("ViT-SO400M-14-SigLIP-384/webli").imagenet_top1 == 83.1
    assert registry.find_pretrained("ViT-gopt-16-SigLIP2-384/webli").imagenet_top1 == 85.0  # big_vision's README
    assert registry.find_pretrained("ViT-B-16-SigLIP-quickgelu/webli") is None
    huge = registry.find_pretrained("ViT-H-14-worldwide-quickgelu/metaclip2_worldwide")
    assert huge is registry.find_pretrained("ViT-H-14-worldwide/metaclip2_worldwide")
    assert huge.hints["activation"] == "quick_gelu" and huge.tokenizer_repo == "facebook/xlm-v-base"
    assert (huge.hints["vocab_size"], huge.hints["eos_id"], huge.hints["text_clean"]) == (901629, 2, "whitespace")
    assert registry.find_pretrained("ViT-bigG-14-worldwide-378/metaclip2_worldwide").hints["activation"] == "gelu"


# --- transformers repositories ---------------------------------------------------------------

@pytest.mark.parametrize("typed, expected", [
    ("google/siglip-base-patch16-224", "hf-hub:google/siglip-base-patch16-224"),
    ("  Google/SigLIP-Base-Patch16-224 ", "hf-hub:google/siglip-base-patch16-224"),
    ("siglip2-base-patch16-256", "hf-hub:google/siglip2-base-patch16-256"),
    ("google/siglip-base-patch16-256-multilingual", "hf-hub:google/siglip-base-patch16-256-multilingual"),
    ("siglip2-giant-opt-patch16-384", "hf-hub:google/siglip2-giant-opt-patch16-384"),
    ("facebook/metaclip-2-worldwide-huge-quickgelu", "hf-hub:facebook/metaclip-2-worldwide-huge-quickgelu"),
    ("hf-hub:google/siglip-so400m-patch14-384", "hf-hub:google/siglip-so400m-patch14-384"),
    ("google/siglip2-base-patch16-naflex", None), ("google/siglip2-so400m-patch16-naflex", None),
    ("google/siglip-base-patch16", None), ("openai/clip-vit-base-patch32", None), ("ViT-B-16-SigLIP/webli", None),
    ("other/siglip-base-patch16-224-extra", None), ("", None),
])
def test_find_hub_alias(typed, expected):
    assert registry.find_hub_alias(typed) == expected


def test_hub_aliases_match_their_architectures():
    aliases = registry.hub_aliases()
    assert len(aliases) == 10 + 15 + 4
    assert len({a.repo.split("/")[1].lower() for a in aliases}) == len(aliases)  # a bare name names one
    assert not [a.repo for a in aliases if "naflex" in a.repo]
    for alias in aliases:
        hints = registry.architecture_hints(alias.arch)
        assert alias.context_length == hints["context_length"], alias.repo
        weights = next(e for e in registry.pretrained() if e.arch == alias.arch.removesuffix("-quickgelu"))
        assert (alias.family, alias.license, alias.multilingual) == (weights.family, weights.license,
                                                                     weights.multilingual), alias.repo
        if alias.repo != "google/siglip2-so400m-patch14-384":  # 384 px in transformers, 378 in open_clip
            assert alias.image_resolution == hints["image_resolution"], alias.repo
        if alias.repo != "google/siglip-so400m-patch16-256-i18n":  # transformers' text tower has a head
            assert alias.parameters == registry.parameters(alias.arch), alias.repo
    by_repo = {a.repo: a for a in aliases}
    assert by_repo["google/siglip-so400m-patch14-224"].context_length == 16
    assert by_repo["google/siglip2-so400m-patch14-384"].image_resolution == 384
    assert by_repo["google/siglip-base-patch16-224"].imagenet_top1 == 76.0
    assert by_repo["facebook/metaclip-2-worldwide-huge-quickgelu"].score_kind == "softmax"
    assert by_repo["google/siglip2-base-patch16-224"].score_kind == "sigmoid"


def _transformers_parameters(alias) -> int:
    """Parameters of transformers' model of ``alias``, its config made from the architecture's sizes."""
    import torch
    from transformers import MetaClip2Config, MetaClip2Model, SiglipConfig, SiglipModel

    h = registry.architecture_hints(alias.arch)
    text = dict(hidden_size=h["transformer_width"], num_hidden_layers=h["transformer_layers"],
                num_attention_heads=h["transformer_heads"], intermediate_size=h.get("text_mlp_width") or
                4 * h["transformer_width"], vocab_size=h["vocab_size"], max_position_embeddings=h["context_length"])
    vision = dict(hidden_size=h["vision_width"], num_hidden_layers=h["vision_layers"],
                  num_attention_heads=h["vision_width"] // h["vision_head_width"],
                  intermediate_size=h["vision_mlp_width"], image_size=alias.image_resolution,
                  patch_size=h["vision_patch_size"])
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        if alias.family == "MetaCLIP 2":
            model = MetaClip2Model(MetaClip2Config(text_config=text, vision_config=vision, projection_dim=h["embed_dim"]))
        else:
            model = SiglipModel(SiglipConfig(text_config={**text, "projection_size": h["embed_dim"]},
                                             vision_config=vision))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("repo", [
    "google/siglip-so400m-patch16-256-i18n", "google/siglip-base-patch16-224",
    *(pytest.param(repo, marks=pytest.mark.slow) for repo in (
        "google/siglip2-so400m-patch14-384", "google/siglip2-giant-opt-patch16-384",
        "facebook/metaclip-2-worldwide-huge-quickgelu", "facebook/metaclip-2-worldwide-giant-378")),
])
def test_hub_alias_parameters_are_transformers(repo):
    """The stored count is transformers' model's, one more Linear than open_clip's for the
    So400m i18n text tower (open_clip's config has no projection there)."""
    alias = next(a for a in registry.hub_aliases() if a.repo == repo)
    assert alias.parameters == _transformers_parameters(alias)


# --- clipcli models --------------------------------------------------------------------------

def test_catalog_lists_the_families_apart():
    from clipcli import catalog

    records = catalog.catalog()
    assert len(records) == 9 + len(registry.pretrained()) + len(registry.hub_aliases())
    kinds = {(r["family"], r["score_kind"]) for r in records}
    assert {("SigLIP", "sigmoid"), ("SigLIP 2", "sigmoid"), ("MetaCLIP 2", "softmax"), ("OpenAI", "softmax")} <= kinds
    by_name = {r["name"]: r for r in records}
    assert catalog.cells(by_name["ViT-SO400M-14-SigLIP-384/webli"]) == {
        "name": "ViT-SO400M-14-SigLIP-384/webli", "family": "SigLIP", "score": "sigmoid", "params": "878M",
        "res": "384", "dim": "1152", "lang": "en", "licence": "Apache-2.0", "top-1": "83.1", "cached": "no"}
    hub = by_name["hf-hub:google/siglip2-base-patch16-256"]
    assert (hub["family"], hub["score_kind"], hub["multilingual"], hub["url"]) == (
        "SigLIP 2", "sigmoid", True, "https://huggingface.co/google/siglip2-base-patch16-256")
    assert catalog.cells(by_name["ViT-H-14-worldwide/metaclip2_worldwide"])["lang"] == "multi"
    assert catalog.cells(by_name["ViT-B/32"])["score"] == "softmax"
