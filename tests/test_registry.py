"""The registry against the reference packages: OpenAI's ``clip`` and ``open_clip``."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from clipcli.models.registry import MODELS, ModelInfo, find_model


def openai_clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
    return clip


def open_clip_name(name: str) -> str:
    return name.replace("/", "-").replace("@336px", "-336")


def test_names_in_openai_order():
    assert [m.name for m in MODELS] == openai_clip().available_models()


def test_file_and_sha256_match_openai_urls():
    urls = openai_clip().clip._MODELS
    for info in MODELS:
        assert info.url == urls[info.name]
        assert info.url.split("/")[-2] == info.sha256 and info.url.split("/")[-1] == info.file


def test_resolution_embedding_and_hub_repo_match_open_clip():
    import open_clip

    for info in MODELS:
        config = open_clip.get_model_config(open_clip_name(info.name))
        assert info.input_resolution == config["vision_cfg"]["image_size"], info.name
        assert info.embed_dim == config["embed_dim"], info.name
        hub = open_clip.get_pretrained_cfg(open_clip_name(info.name), "openai")["hf_hub"]
        assert info.hf_repo == hub.rstrip("/"), info.name


def test_sizes_are_known_and_plausible():
    # Bytes of OpenAI's files; a readable check: ViT-B/32 is ~338 MiB, RN50x64 the largest.
    sizes = {m.name: m.size for m in MODELS}
    assert sizes["ViT-B/32"] == 353_976_522
    assert max(sizes, key=sizes.get) == "RN50x64"
    assert all(200 << 20 < size < 1400 << 20 for size in sizes.values())


@pytest.mark.parametrize("alias, name", [
    ("ViT-B/32", "ViT-B/32"), ("ViT-B-32", "ViT-B/32"), ("vit-b/32", "ViT-B/32"), ("vit_b_32", "ViT-B/32"),
    (" VIT-B-32 ", "ViT-B/32"), ("ViT-B-32.pt", "ViT-B/32"), ("rn50", "RN50"), ("RN50x4", "RN50x4"),
    ("rn50X64", "RN50x64"), ("ViT-L/14@336px", "ViT-L/14@336px"), ("ViT-L-14-336px", "ViT-L/14@336px"),
    ("ViT-L-14-336", "ViT-L/14@336px"), ("vit-l/14", "ViT-L/14"), ("ViT-B/16", "ViT-B/16"),
])
def test_aliases(alias, name):
    assert find_model(alias).name == name


@pytest.mark.parametrize("name", ["", "ViT-B/8", "RN50x5", "ViT-L/14@224px", "resnet50", "model.pt"])
def test_unknown_names(name):
    assert find_model(name) is None


def test_model_info_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS[0].size = 1  # type: ignore[misc]
    assert isinstance(MODELS, tuple) and all(isinstance(m, ModelInfo) for m in MODELS)


# --- OpenCLIP's weights, against open_clip's own tables ---------------------------------------

def _open_clip_pairs():
    import open_clip

    return open_clip.list_pretrained()


def _plain(config: dict) -> bool:
    from clipcli.models.convert import open_clip_family

    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    return (open_clip_family(config) is None and set(config) <= {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
            and set(vision) <= {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
            and set(text) <= {"context_length", "vocab_size", "width", "heads", "layers"})


def test_every_plain_open_clip_pair_is_in_the_registry():
    """Each (architecture, tag) open_clip lists whose architecture is plain CLIP has a name here."""
    import open_clip

    from clipcli.models.registry import find_model, find_pretrained

    missing = []
    for arch, tag in _open_clip_pairs():
        if not _plain(open_clip.get_model_config(arch)):
            continue
        if (arch, tag) == ("ViT-B-16-plus-240", "laion400m_e32"):  # open_clip points it at the e31 repository
            continue
        found = find_model(f"{arch}/{tag}") if tag == "openai" else find_pretrained(f"{arch}/{tag}")
        if found is None:
            missing.append(f"{arch}/{tag}")
    assert not missing


def test_registry_entries_match_open_clips_configs():
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from clipcli.models.registry import pretrained

    for entry in pretrained():
        config = open_clip.get_model_config(entry.arch)
        vision, text, hints = config["vision_cfg"], config["text_cfg"], entry.hints
        if "timm_model_name" in vision:  # SigLIP's timm towers: tests/test_registry_siglip.py
            continue
        assert hints["embed_dim"] == config["embed_dim"], entry.name
        assert hints["image_resolution"] == vision["image_size"], entry.name
        layers = vision["layers"]
        assert hints["vision_layers"] == (tuple(layers) if isinstance(layers, list) else layers), entry.name
        assert hints["vision_width"] == vision["width"] and hints["vision_patch_size"] == vision.get("patch_size")
        assert hints["vision_head_width"] == vision.get("head_width", 64), entry.name
        if vision.get("patch_size"):
            assert hints["vision_mlp_width"] == int(vision["width"] * vision.get("mlp_ratio", 4.0)), entry.name
        assert (hints["transformer_width"], hints["transformer_heads"], hints["transformer_layers"]) == (
            text["width"], text["heads"], text["layers"]), entry.name
        assert (hints["context_length"], hints["vocab_size"]) == (text["context_length"], text["vocab_size"])
        cfg = open_clip.get_pretrained_cfg(entry.arch, entry.tag)
        assert entry.hf_repo == cfg["hf_hub"].rstrip("/"), entry.name
        assert hints["activation"] == ("quick_gelu" if cfg.get("quick_gelu") else "gelu"), entry.name
        assert tuple(hints.get("image_mean", OPENAI_DATASET_MEAN)) == tuple(cfg.get("mean") or OPENAI_DATASET_MEAN)
        assert tuple(hints.get("image_std", OPENAI_DATASET_STD)) == tuple(cfg.get("std") or OPENAI_DATASET_STD)
        assert hints.get("resize_mode", "shortest") == (cfg.get("resize_mode") or "shortest"), entry.name
        assert hints.get("interpolation", "bicubic") == (cfg.get("interpolation") or "bicubic"), entry.name


def test_stored_parameter_counts_are_the_models():
    from clipcli.models.clip import CLIPConfig
    from clipcli.models.factory import parameter_count
    from clipcli.models.registry import architecture_hints, parameters, pretrained

    clip = {entry.arch for entry in pretrained() if entry.hints.get("family", "clip") == "clip"}
    assert "ViT-bigG-14-worldwide-378" in clip  # MetaCLIP 2's: CLIP towers, their own tokenizer
    for arch in clip | {"RN50", "ViT-L-14-336"}:
        assert parameters(arch) == parameter_count(CLIPConfig(**architecture_hints(arch))), arch
    assert round(parameters("ViT-B-32") / 1e6) == 151 and round(parameters("ViT-bigG-14") / 1e9, 2) == 2.54


@pytest.mark.parametrize("name, expected", [
    ("ViT-B-32/openai", "ViT-B/32"), ("vit-b-32-quickgelu/openai", "ViT-B/32"), ("RN50/openai", "RN50"),
    ("ViT-L-14-336/openai", "ViT-L/14@336px"),
])
def test_openai_weights_by_their_open_clip_names(name, expected):
    assert find_model(name).name == expected


def test_names_of_open_clip_weights():
    from clipcli.models.registry import find_pretrained

    laion = find_pretrained("ViT-B-32/laion2b_s34b_b79k")
    assert laion.hf_repo == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and laion.hints["activation"] == "gelu"
    assert laion.files[0] == "open_clip_model.safetensors" and laion.license == "MIT"
    assert find_pretrained("vit-b-32/LAION2B_S34B_B79K") is laion
    dfn = find_pretrained("ViT-H-14-378-quickgelu/dfn5b")
    assert dfn is find_pretrained("ViT-H-14-378/dfn5b")  # the weights' own activation, whichever name
    assert dfn.hints["activation"] == "quick_gelu" and dfn.hints["resize_mode"] == "squash"
    assert dfn.hints["vision_head_width"] == 80 and dfn.imagenet_top1 == 84.4
    assert find_pretrained("ViT-bigG-14/laion2b_s39b_b160k").hints["vision_mlp_width"] == 8192
    assert find_pretrained("ViT-L-14/laion2b_s32b_b82k").hints["image_mean"] == (0.5, 0.5, 0.5)
    assert find_pretrained("ViT-B-32-quickgelu/laion2b_s34b_b79k") is None  # GELU weights: no QuickGELU alias
    assert find_pretrained("ViT-B-32/nonsense") is None


LICENCES = {  # as the model cards state them; open_clip's own trainings are MIT like open_clip
    "LAION-400M": "MIT", "LAION-2B": "MIT", "DataComp": "MIT", "CommonPool": "MIT", "YFCC-15M": "MIT",
    "CC12M": "MIT", "DFN-2B": "apple-ascl", "DFN-5B": "apple-ascl", "MetaCLIP": "CC-BY-NC-4.0",
    "SigLIP": "Apache-2.0", "SigLIP 2": "Apache-2.0", "MetaCLIP 2": "CC-BY-NC-4.0",
}


def test_every_weights_entry_carries_its_model_cards_licence():
    from clipcli.models.registry import openai_facts, pretrained

    assert {entry.name: entry.license for entry in pretrained()} == {
        entry.name: LICENCES[entry.family] for entry in pretrained()}
    assert {openai_facts(info)["license"] for info in MODELS} == {"MIT"}
    assert pretrained()[0].name == "RN50/yfcc15m" and pretrained()[0].license == "MIT"
