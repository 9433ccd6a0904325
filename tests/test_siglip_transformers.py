"""transformers ``SiglipModel`` checkpoints into ours: key names and shapes (against open_clip's
timm-based SigLIP, whose names ours keep), hints from ``config.json`` and
``preprocessor_config.json``, numerical parity, the NaFlex refusal and malformed configs."""

from __future__ import annotations

import json

import pytest
import torch
from foreign import features
from foreign_siglip import open_clip_siglip, save_transformers, siglip_model

from clipcli.errors import CheckpointError, UnsupportedModelError
from clipcli.models import convert

TOLERANCE = 1e-4


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def reference():
    return siglip_model(seed=3)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    ids = torch.randint(0, 100, (4, 16), generator=generator)
    return images, ids


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
    folder = save_transformers(reference, tmp_path_factory.mktemp("siglip") / "tiny")
    config = json.loads((folder / "config.json").read_text())
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    return config, preprocessor


# --------------------------------------------------------------------------- keys


def test_keys_and_shapes_are_open_clips_and_load_into_it(reference, inputs):
    """The converted state dict has exactly the keys and shapes of open_clip's timm SigLIP, loads
    into it strictly, and open_clip then computes what transformers does."""
    ours = convert.state_dict_from_transformers(reference.state_dict())
    theirs = open_clip_siglip().state_dict()
    assert set(ours) == set(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    model = open_clip_siglip()
    model.load_state_dict(ours, strict=True)
    images, ids = inputs
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), features(reference.get_image_features(pixel_values=images)))
        text_diff = _max_diff(model.encode_text(ids), features(reference.get_text_features(input_ids=ids)))
    assert max(image_diff, text_diff) <= TOLERANCE


def test_each_tensor_goes_where_it_belongs(reference):
    state = dict(reference.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # older checkpoints carry it
    ours = convert.state_dict_from_transformers(state)
    width = 48
    q, k, v = (state[f"vision_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(ours["visual.trunk.blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))
    q, k, v = (state[f"text_model.encoder.layers.0.self_attn.{p}_proj.bias"] for p in "qkv")
    assert torch.equal(ours["text.transformer.resblocks.0.attn.in_proj_bias"], torch.cat([q, k, v]))
    in_proj = state["vision_model.head.attention.in_proj_weight"]
    assert torch.equal(ours["visual.trunk.attn_pool.q.weight"], in_proj[:width])
    assert torch.equal(ours["visual.trunk.attn_pool.kv.weight"], in_proj[width:])
    assert torch.equal(ours["visual.trunk.attn_pool.latent"], state["vision_model.head.probe"])
    assert torch.equal(ours["visual.trunk.pos_embed"][0], state["vision_model.embeddings.position_embedding.weight"])
    assert torch.equal(ours["text.text_projection.weight"], state["text_model.head.weight"])  # a Linear: not transposed
    assert ours["logit_bias"].shape == () and ours["logit_bias"] == state["logit_bias"][0]
    assert not any(key.startswith(("text_model.", "vision_model.")) or "position_ids" in key for key in ours)


def test_siglip_keys_name_their_towers_and_our_names():
    state = siglip_model().state_dict()
    assert convert.is_transformers_state_dict(state) and convert.is_transformers_siglip(state)
    ours = convert.state_dict_from_transformers(state)
    assert {convert.openai_key(key, siglip=True) for key in state} <= set(ours)
    assert convert.openai_key("vision_model.encoder.layers.0.self_attn.k_proj.weight", siglip=True) \
        == "visual.trunk.blocks.0.attn.qkv.weight"
    assert convert.openai_key("text_model.embeddings.position_ids", siglip=True) is None
    towers = {key: convert.tower_of_key(key) for key in (*state, *ours)}
    assert {k for k, t in towers.items() if t is None} == {"logit_scale", "logit_bias"}
    assert all(t == "image" for k, t in towers.items() if k.startswith(("vision_model.", "visual.")))
    assert all(t == "text" for k, t in towers.items() if k.startswith(("text_model.", "text.")))
    assert not convert.is_transformers_siglip(convert.state_dict_from_transformers(state))


def test_parts_that_cannot_be_packed_or_split_are_left_for_the_strict_load_to_name(reference):
    state = dict(reference.state_dict())
    del state["vision_model.encoder.layers.0.self_attn.k_proj.weight"]
    state["vision_model.head.attention.in_proj_bias"] = torch.zeros(7)
    ours = convert.state_dict_from_transformers(state)
    assert "visual.trunk.blocks.0.attn.qkv.weight" not in ours
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in ours
    assert "vision_model.head.attention.in_proj_bias" in ours and "visual.trunk.attn_pool.q.bias" not in ours


# --------------------------------------------------------------------------- configs


def test_hints_from_config_and_preprocessor_config(saved):
    config, preprocessor = saved
    hints = convert.config_from_transformers(config, "tiny", preprocessor)
    assert hints == {
        "family": "siglip", "activation": "gelu_tanh", "text_activation": None, "vision_head_width": 16,
        "transformer_heads": 2, "text_pool": "last", "logit_bias": True, "tokenizer": "sentencepiece",
        "text_clean": "siglip", "image_resolution": 32, "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "squash",
    }
    gemma = json.loads(json.dumps(config))
    gemma["text_config"].update(vocab_size=256000, hidden_act="gelu")  # SigLIP 2's tokenizer; another activation
    preprocessor = {**preprocessor, "resample": 2, "image_mean": [0.1, 0.2, 0.3], "do_normalize": True}
    hints = convert.config_from_transformers(gemma, "tiny", preprocessor)
    assert hints["text_clean"] == "lowercase" and hints["text_activation"] == "gelu"
    assert hints["interpolation"] == "bilinear" and hints["image_mean"] == (0.1, 0.2, 0.3)
    unnormalized = convert.config_from_transformers(config, "tiny", {"do_normalize": False})
    assert unnormalized["image_mean"] == (0.0, 0.0, 0.0) and unnormalized["image_std"] == (1.0, 1.0, 1.0)


def test_so400m_at_384_px_keeps_its_resolution():
    """27 x 27 patches of 14 px from a 384 px image (timm and transformers drop the last 6 px):
    the resolution is the config's, not patch x grid."""
    config = {"model_type": "siglip", "vision_config": {"image_size": 384, "patch_size": 14, "hidden_size": 1152,
                                                        "num_attention_heads": 16},
              "text_config": {"hidden_size": 1152, "num_attention_heads": 16, "projection_size": 1152}}
    hints = convert.config_from_transformers(config, "so400m", {"size": {"height": 384, "width": 384}})
    assert hints["image_resolution"] == 384 and hints["vision_head_width"] == 72


def test_naflex_siglip2_is_refused_naming_the_fixed_resolution_alternative():
    with pytest.raises(UnsupportedModelError) as error:
        convert.config_from_transformers({"model_type": "siglip2", "text_config": {}, "vision_config": {}}, "naflex")
    message = str(error.value)
    assert "\n" not in message and "is a SigLIP 2 NaFlex model" in message
    assert "google/siglip2-base-patch16-224" in message


@pytest.mark.parametrize("change, field", [
    ({"vision_config": {"hidden_size": -3}}, "vision_config.hidden_size"),
    ({"vision_config": {"image_size": "224"}}, "vision_config.image_size"),
    ({"text_config": {"layer_norm_eps": "tiny"}}, "text_config.layer_norm_eps"),
    ({"text_config": {"vocab_size": 1.5}}, "text_config.vocab_size"),
    ({"text_config": {"projection_size": True}}, "text_config.projection_size"),
    ({"vision_config": {"vision_use_head": "yes"}}, "vision_config.vision_use_head"),
    ({"text_config": [1, 2]}, "text_config"),
])
def test_malformed_config_values_are_one_checkpoint_error_naming_the_field(saved, change, field):
    config = json.loads(json.dumps(saved[0]))
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(CheckpointError) as error:
        convert.config_from_transformers(config, "tiny")
    message = str(error.value)
    assert not isinstance(error.value, UnsupportedModelError)
    assert "\n" not in message and message.startswith("tiny: config.json") and field in message


@pytest.mark.parametrize("preprocessor, field", [
    ({"size": {"height": -1, "width": 32}}, "size.height"),
    ({"size": [32, 32]}, "size"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"resample": "bicubic"}, "resample"),
    ({"rescale_factor": -1}, "rescale_factor"),
    ({"do_resize": 1}, "do_resize"),
])
def test_malformed_preprocessor_values_name_the_file_and_field(saved, preprocessor, field):
    with pytest.raises(CheckpointError) as error:
        convert.config_from_transformers(saved[0], "tiny", preprocessor)
    message = str(error.value)
    assert "\n" not in message and "preprocessor_config.json" in message and field in message


@pytest.mark.parametrize("change, preprocessor, words", [
    ({"vision_config": {"layer_norm_eps": 1e-5}}, None, "layer_norm_eps 1e-05 is not supported"),
    ({"text_config": {"hidden_act": "relu"}}, None, "text_config.hidden_act \"relu\" is not supported"),
    ({"vision_config": {"vision_use_head": False}}, None, "without its pooling head"),
    ({"text_config": {"projection_size": 40}}, None, "projection_size 40 is not the image embedding's width"),
    ({"vision_config": {"num_channels": 1}}, None, "num_channels 1"),
    ({}, {"do_resize": False}, "do_resize false"),
    ({}, {"size": {"height": 32, "width": 48}}, "size {"),
    ({}, {"do_center_crop": True, "size": {"height": 32, "width": 32}}, "do_center_crop true"),
    ({}, {"resample": 0}, "interpolation 0 is not supported"),
])
def test_what_clipcli_does_not_compute_is_refused_in_one_line(saved, change, preprocessor, words):
    config = json.loads(json.dumps(saved[0]))
    for key, value in change.items():
        config[key] = {**config[key], **value}
    with pytest.raises(UnsupportedModelError) as error:
        convert.config_from_transformers(config, "tiny", preprocessor)
    assert "\n" not in str(error.value) and words in str(error.value)


# --------------------------------------------------------------------------- parity with our SigLIP


def test_our_siglip_matches_transformers(reference, saved, inputs):
    pytest.importorskip("clipcli.models.siglip")
    from clipcli.models.factory import build_model

    hints = convert.config_from_transformers(saved[0], "tiny", saved[1])
    model = build_model(convert.state_dict_from_transformers(reference.state_dict()), hints, source="tiny").eval()
    images, ids = inputs
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), features(reference.get_image_features(pixel_values=images)))
        text_diff = _max_diff(model.encode_text(ids), features(reference.get_text_features(input_ids=ids)))
        expected = reference(input_ids=ids, pixel_values=images)
        logits_per_image, logits_per_text = model(images, ids)
    logit_diff = _max_diff(logits_per_image, expected.logits_per_image)
    probability_diff = _max_diff(logits_per_image.sigmoid(), expected.logits_per_image.sigmoid())
    print(f"\nSigLIP max |clipcli - transformers|: image {image_diff:.2e}, text {text_diff:.2e}, "
          f"logits {logit_diff:.2e}, sigmoid {probability_diff:.2e}")
    assert max(image_diff, text_diff, probability_diff) <= TOLERANCE
    assert logit_diff <= TOLERANCE * 10  # logits are scaled by exp(logit_scale) (about 100 here)
    assert torch.equal(logits_per_text, logits_per_image.t())
    assert model.score_kind == "sigmoid" and model.config.family == "siglip"
