"""Parity of clipcli's model with OpenAI's and open_clip's on released-format random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import (
    CONFIGS,
    openai_clip,
    random_reference_model,
    released_state_dict,
    save_released,
    save_safetensors,
    save_state_dict,
)

import clipcli
from clipcli.models.clip import CLIPConfig
from clipcli.models.factory import build_model, config_from_state_dict

TEXTS = ["a photo of a cat", "a diagram", "", "an astronaut riding a horse on the moon, digital art " * 3]
TOLERANCE = 1e-4


def _inputs(resolution: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, resolution, resolution, generator=generator)
    return images, clipcli.tokenize(TEXTS, truncate=True)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn", pytest.param("ViT-B/32", marks=pytest.mark.slow),
                                        pytest.param("RN50", marks=pytest.mark.slow)])
def released(request, tmp_path_factory):
    """(architecture, path of a released-format file, OpenAI's model loaded from it)."""
    name = request.param
    path = tmp_path_factory.mktemp("released") / (name.replace("/", "-") + ".pt")
    save_released(random_reference_model(name, seed=len(name)), path)
    reference, _ = openai_clip().load(str(path), device="cpu", jit=False)
    return name, path, reference.eval()


def test_encoders_and_logits_match_openai(released):
    name, path, reference = released
    model, _ = clipcli.load(path, device="cpu")
    images, tokens = _inputs(model.visual.input_resolution)
    with torch.no_grad():
        diffs = {
            "encode_image": _max_diff(model.encode_image(images), reference.encode_image(images)),
            "encode_text": _max_diff(model.encode_text(tokens), reference.encode_text(tokens)),
        }
        ours, theirs = model(images, tokens), reference(images, tokens)
        diffs["logits_per_image"] = _max_diff(ours[0], theirs[0])
        diffs["logits_per_text"] = _max_diff(ours[1], theirs[1])
    print(f"\n{name} max |clipcli - openai|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(v <= TOLERANCE for v in diffs.values()), diffs
    assert model.dtype == torch.float32


def test_matches_open_clip(released):

    name, path, _ = released
    from open_clip.openai import load_openai_model

    reference = load_openai_model(str(path), precision="fp32", device="cpu").eval()
    model, _ = clipcli.load(path, device="cpu")
    images, tokens = _inputs(model.visual.input_resolution, seed=1)
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), reference.encode_image(images))
        text_diff = _max_diff(model.encode_text(tokens), reference.encode_text(tokens))
    print(f"\n{name} max |clipcli - open_clip|: encode_image {image_diff:.2e}, encode_text {text_diff:.2e}")
    assert image_diff <= TOLERANCE and text_diff <= TOLERANCE


@pytest.mark.parametrize("fmt", ["state_dict", "wrapped", "safetensors"])
def test_other_formats_give_the_same_model(released, fmt, tmp_path):
    name, path, _ = released
    if name not in ("tiny-vit", "tiny-rn"):
        pytest.skip("formats are exercised on the tiny sizes")
    state = {k: v.float() for k, v in released_state_dict(path).items()}
    target = tmp_path / ("model.safetensors" if fmt == "safetensors" else "model.bin")
    if fmt == "safetensors":
        save_safetensors(state, target)
    else:
        save_state_dict(state, target, wrap=fmt == "wrapped")
    model_a, _ = clipcli.load(path, device="cpu")
    model_b, _ = clipcli.load(target, device="cpu")
    images, tokens = _inputs(model_a.visual.input_resolution)
    with torch.no_grad():
        assert torch.equal(model_a.encode_image(images), model_b.encode_image(images))
        assert torch.equal(model_a.encode_text(tokens), model_b.encode_text(tokens))


def test_hyperparameters_are_read_from_shapes(released):
    name, path, reference = released
    config = config_from_state_dict(released_state_dict(path))
    expected = CONFIGS[name]
    assert config.embed_dim == expected["embed_dim"]
    assert config.image_resolution == expected["image_resolution"]
    assert config.vision_width == expected["vision_width"]
    assert config.vision_patch_size == expected["vision_patch_size"]
    layers = expected["vision_layers"]
    assert config.vision_layers == (tuple(layers) if isinstance(layers, tuple) else layers)
    assert (config.transformer_width, config.transformer_layers, config.transformer_heads) == (
        expected["transformer_width"], expected["transformer_layers"], expected["transformer_heads"])
    model, _ = clipcli.load(path, device="cpu")
    assert model.visual.input_resolution == expected["image_resolution"]
    assert model.context_length == 77 and model.vocab_size == 49408


def test_text_runs_only_to_the_last_end_of_text_token():
    """Cutting the causal text tower at the batch's longest text changes nothing."""
    model = build_model(random_reference_model("tiny-vit", seed=3).state_dict())
    tokens = clipcli.tokenize(["a cat", "a much longer caption about a dog in the park"])
    full = model.transformer(model.token_embedding(tokens) + model.positional_embedding)
    full = model.ln_final(full)[torch.arange(2), tokens.argmax(-1)] @ model.text_projection
    with torch.no_grad():
        assert _max_diff(model.encode_text(tokens), full) < 1e-5


def test_state_dict_round_trips_strictly():
    reference = random_reference_model("tiny-rn", seed=4)
    model = build_model(reference.state_dict())
    theirs = reference.state_dict()
    ours = model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_from_scratch_model_has_the_released_layout():
    config = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                        transformer_layers=2)
    from clipcli.models.clip import CLIP

    model = CLIP(config)
    assert config_from_state_dict(model.state_dict()) == config
    assert torch.isfinite(model.encode_text(clipcli.tokenize(["x"]))).all()


@pytest.mark.parametrize("fmt", ["released", "state_dict", "safetensors"])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_one_tower_loads_alone_and_gives_the_same_embeddings(fmt, tower, tiny_vit_checkpoint, tmp_path):
    from clipcli.checkpoint import read_state_dict
    from clipcli.errors import ClipcliError
    from clipcli.loading import load_model as load_weights
    from clipcli.models.clip import tower_of

    path = tiny_vit_checkpoint
    if fmt != "released":
        state = {k: v.float() for k, v in released_state_dict(path).items()}
        path = (save_safetensors if fmt == "safetensors" else save_state_dict)(state, tmp_path / f"m.{fmt}")
    other = "text" if tower == "image" else "image"
    sd = read_state_dict(path, dtype=torch.float32, keep=lambda key: tower_of(key) != other)
    assert all(v.is_meta == (tower_of(k) == other) for k, v in sd.items())
    assert all(v.dtype == torch.float32 for k, v in sd.items() if v.is_floating_point())

    full = load_weights(path, torch.device("cpu"), torch.float32)
    alone = load_weights(path, torch.device("cpu"), torch.float32, towers=(tower,))
    assert alone.towers == (tower,) and full.towers == ("image", "text")
    assert all(tower_of(k) != other for k in alone.state_dict())
    assert not any(p.is_meta for p in alone.parameters())
    images, tokens = _inputs(full.config.image_resolution)
    with torch.no_grad():
        if tower == "image":
            assert torch.equal(alone.encode_image(images), full.encode_image(images))
            with pytest.raises(ClipcliError, match="without its text tower"):
                alone.encode_text(tokens)
        else:
            assert torch.equal(alone.encode_text(tokens), full.encode_text(tokens))
            with pytest.raises(ClipcliError, match="without its image tower"):
                alone.encode_image(images)


def test_tower_choices_are_checked(tiny_vit_checkpoint):
    from clipcli.errors import ClipcliError
    from clipcli.loading import load_model as load_weights

    for towers in ((), ("audio",)):
        with pytest.raises(ClipcliError, match="towers must be some of"):
            load_weights(tiny_vit_checkpoint, torch.device("cpu"), torch.float32, towers=towers)


def test_a_missing_tower_is_loaded_when_first_needed(tiny_vit_checkpoint, tmp_path):
    from PIL import Image

    from clipcli.batching import embed_images, embed_texts
    from clipcli.items import Item
    from clipcli.pipeline import load_model

    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(image)
    full = load_model(str(tiny_vit_checkpoint), device="cpu")
    text_only = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("text",))
    image_only = load_model(str(tiny_vit_checkpoint), device="cpu", towers=("image",))
    assert text_only.preprocess is None and text_only.model.towers == ("text",)
    item = [Item(name=str(image), path=str(image))]
    assert np.array_equal(next(embed_images(text_only, item)).embedding, next(embed_images(full, item)).embedding)
    assert text_only.model.towers == ("image", "text") and text_only.preprocess is not None
    texts = ["a red square", "a cat"]
    assert all(np.array_equal(a.embedding, b.embedding)
               for a, b in zip(embed_texts(image_only, texts), embed_texts(full, texts)))
    assert image_only.model.towers == ("image", "text")
