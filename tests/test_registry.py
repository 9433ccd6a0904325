"""The registry against the reference packages: OpenAI's ``clip`` and ``open_clip``."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from clipcli.registry import MODELS, ModelInfo, find_model


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
