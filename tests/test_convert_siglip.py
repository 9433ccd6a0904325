"""OpenCLIP configs of SigLIP (and every other family open_clip ships) into ours: timm's trunk
table against timm, the fields each config gives, one-line refusals, malformed values, and
parity of a tiny open_clip SigLIP read through its config."""

from __future__ import annotations

import json

import pytest
import torch
from foreign_siglip import OPEN_CLIP_SIGLIP, TINY_TRUNK, open_clip_siglip

from clipcli.errors import CheckpointError, UnsupportedModelError
from clipcli.models import convert, convert_siglip

TOLERANCE = 1e-4


def _open_clip_configs() -> dict[str, dict]:
    import open_clip

    return {name: open_clip.get_model_config(name) for name in open_clip.list_models()}


def _siglip(**changes) -> dict:
    """open_clip's ViT-B-16-SigLIP config with ``changes`` (``"text_cfg.width": 1`` style keys)."""
    import open_clip

    config = json.loads(json.dumps(open_clip.get_model_config("ViT-B-16-SigLIP")))
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        place = config
        for parent in parents:
            place = place[parent]
        place[leaf] = value
    return config


# --------------------------------------------------------------------------- timm's trunks


@pytest.mark.slow  # builds every trunk timm names: an oracle table, run in `pytest -m slow`
def test_trunk_table_is_timms():
    """Every SigLIP ViT timm registers with attention pooling is in the table, with timm's own
    width, depth, heads, MLP width, patch, resolution and activation (timm builds its SigLIP 2
    trunks with the tanh GELU, the older ones with the exact one)."""
    import timm

    names = {n for n in timm.list_models("vit_*_siglip_*", module="vision_transformer") if "_gap" not in n}
    assert names == set(convert_siglip.TIMM_TRUNKS)
    for name in sorted(names):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        block, trunk = model.blocks[0], convert_siglip.timm_trunk(name)
        act = block.mlp.act
        activation = "gelu_tanh" if type(act).__name__ == "GELUTanh" or getattr(act, "approximate", "") == "tanh" \
            else "gelu"
        assert (trunk.width, trunk.depth, trunk.heads, trunk.mlp_width, trunk.patch, trunk.resolution,
                trunk.activation) == (model.embed_dim, len(model.blocks), block.attn.num_heads,
                                      block.mlp.fc1.out_features, model.patch_embed.patch_size[0],
                                      model.patch_embed.img_size[0], activation), name
        assert model.global_pool == "map" and model.cls_token is None and model.norm.eps == 1e-6, name
    assert convert_siglip.timm_trunk("vit_huge_patch14_siglip_224") is None


# --------------------------------------------------------------------------- open_clip's configs


def test_every_open_clip_config_is_read_or_refused_in_one_line():
    accepted, refused = {}, {}
    for name, config in _open_clip_configs().items():
        try:
            accepted[name] = convert.config_from_open_clip({"model_cfg": config, "preprocess_cfg": {}}, name)
        except UnsupportedModelError as error:
            assert "\n" not in str(error) and str(error).startswith(f"{name} is a"), str(error)
            refused[name] = str(error)
    siglip = {name for name in accepted if accepted[name].get("family") == "siglip"}
    assert siglip == {name for name in _open_clip_configs() if "SigLIP" in name and not name.startswith("nllb")}
    assert {name for name in accepted if "worldwide" in name} == {n for n in _open_clip_configs() if "worldwide" in n}
    for words in ("CoCa", "EVA", "ConvNeXt", "NLLB-SigLIP", "NLLB-CLIP", "CLIPA", "MobileCLIP", "ViTamin",
                  "Perception Encoder"):
        assert any(f"is a {words}" in message for message in refused.values()), words


@pytest.mark.parametrize("name, expected", [
    ("ViT-SO400M-14-SigLIP-384", dict(activation="gelu", text_activation=None, vision_head_width=72,
                                      image_resolution=384, transformer_heads=16, text_projection=True)),
    ("ViT-B-16-SigLIP2", dict(activation="gelu", text_activation="gelu_tanh", vision_head_width=64,
                              image_resolution=224, transformer_heads=12)),
    ("ViT-gopt-16-SigLIP2-384", dict(activation="gelu_tanh", text_activation=None, vision_head_width=96,
                                     image_resolution=384)),
    ("ViT-SO400M-16-SigLIP-i18n-256", dict(activation="gelu_tanh", text_activation="gelu", text_projection=False)),
])
def test_siglip_fields(name, expected):
    hints = convert.config_from_open_clip({"model_cfg": _open_clip_configs()[name]}, name)
    common = dict(family="siglip", logit_bias=True, tokenizer="sentencepiece", text_clean="canonicalize",
                  text_pool="last", image_mean=(0.5,) * 3, image_std=(0.5,) * 3, interpolation="bicubic",
                  resize_mode="squash")
    assert {k: hints[k] for k in {**common, **expected}} == {**common, **expected}


@pytest.mark.parametrize("name, eos_id, clean, activation", [
    ("ViT-H-14-worldwide", 2, "whitespace", "gelu"),  # XLM-V
    ("ViT-H-14-worldwide-quickgelu", 2, "whitespace", "quick_gelu"),
    ("ViT-L-14-worldwide", 1, "canonicalize", "gelu"),  # mT5
])
def test_metaclip_2_fields(name, eos_id, clean, activation):
    hints = convert.config_from_open_clip(_open_clip_configs()[name], name)
    assert hints == {"activation": activation, "vision_head_width": 80 if "H-14" in name else 64,
                     "transformer_heads": 16 if "H-14" in name else 12, "tokenizer": "sentencepiece",
                     "text_clean": clean, "text_pool": "eos", "eos_id": eos_id}


def test_tokenizer_repository_and_preprocessing():
    config = {"model_cfg": _siglip(), "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "interpolation": "bilinear"}}
    assert convert.open_clip_tokenizer_repo(config) == "timm/ViT-B-16-SigLIP"
    assert convert.open_clip_tokenizer_repo(_open_clip_configs()["ViT-B-32"]) is None
    hints = convert.config_from_open_clip(config, "m")
    assert hints["image_mean"] == (0.1, 0.2, 0.3) and hints["image_std"] == (0.5,) * 3
    assert hints["interpolation"] == "bilinear" and hints["resize_mode"] == "squash"
    with pytest.raises(CheckpointError, match="text_cfg.hf_tokenizer_name is 5"):
        convert.open_clip_tokenizer_repo(_siglip(**{"text_cfg.hf_tokenizer_name": 5}), "m")


def test_a_clip_with_a_logit_bias_is_read_as_one():
    config = {**_open_clip_configs()["ViT-B-32"], "init_logit_bias": -10}
    assert convert.config_from_open_clip(config, "m")["logit_bias"] is True


REFUSALS = {
    "gap": ({"vision_cfg.timm_model_name": "vit_base_patch16_siglip_gap_224"}, "is a SigLIP with global average pooling"),
    "naflex": ({"vision_cfg.timm_model_name": "naflexvit_base_patch16_siglip"}, "is a SigLIP 2 NaFlex model"),
    "unknown trunk": ({"vision_cfg.timm_model_name": "vit_huge_patch14_siglip_224"},
                      "vit_huge_patch14_siglip_224 is not one of timm's SigLIP ViTs"),
    "causal text": ({"text_cfg.no_causal_mask": False}, "text_cfg.no_causal_mask=false"),
    "argmax": ({"text_cfg.pool_type": "argmax"}, 'text_cfg.pool_type="argmax"'),
    "eps": ({"text_cfg.norm_kwargs": None}, "text_cfg.norm_kwargs.eps=1e-05"),
    "bare projection": ({"text_cfg.proj_bias": False}, "text_cfg.proj_bias=false"),
    "avg pool": ({"vision_cfg.timm_pool": "avg"}, 'vision_cfg.timm_pool="avg"'),
    "projected": ({"vision_cfg.timm_proj": "linear"}, 'vision_cfg.timm_proj="linear"'),
    "resolution": ({"vision_cfg.image_size": 256}, "vision_cfg.image_size=256"),
    "embed_dim": ({"embed_dim": 512}, "embed_dim=512"),
    "activation": ({"text_cfg.act_kwargs": {"approximate": "sigmoid"}}, "text_cfg.act_kwargs="),
    "qk norm": ({"text_cfg.qk_norm": True}, "text_cfg.qk_norm=true"),
    "clean": ({"text_cfg.tokenizer_kwargs": {"clean": "shout"}}, "is a non-standard tokenizer model"),
    "nllb": ({"text_cfg.hf_model_name": "facebook/nllb-200-distilled-600M"}, "is a NLLB-SigLIP model"),
    "coca": ({"multimodal_cfg": {"width": 8}}, "is a CoCa model"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_siglip_configs_clipcli_does_not_compute_are_refused_in_one_line(case):
    changes, words = REFUSALS[case]
    with pytest.raises(UnsupportedModelError) as error:
        convert.config_from_open_clip({"model_cfg": _siglip(**changes)}, "m")
    assert "\n" not in str(error.value) and str(error.value).startswith("m is a") and words in str(error.value)


@pytest.mark.parametrize("changes, field", [
    ({"text_cfg.heads": "12"}, "model_cfg.text_cfg.heads"),
    ({"text_cfg.norm_kwargs": {"eps": -1}}, "model_cfg.text_cfg.norm_kwargs.eps"),
    ({"text_cfg.norm_kwargs": "1e-6"}, "model_cfg.text_cfg.norm_kwargs"),
    ({"text_cfg.act_kwargs": {"approximate": 1}}, "model_cfg.text_cfg.act_kwargs.approximate"),
    ({"text_cfg.tokenizer_kwargs": {"clean": 3}}, "model_cfg.text_cfg.tokenizer_kwargs.clean"),
    ({"vision_cfg.image_size": 0}, "model_cfg.vision_cfg.image_size"),
    ({"vision_cfg.timm_model_name": ["vit"]}, "model_cfg.vision_cfg.timm_model_name"),
    ({"init_logit_bias": "-10"}, "model_cfg.init_logit_bias"),
    ({"text_cfg.no_causal_mask": "yes"}, "model_cfg.text_cfg.no_causal_mask"),
])
def test_malformed_siglip_values_are_one_checkpoint_error_naming_the_field(changes, field):
    with pytest.raises(CheckpointError) as error:
        convert.config_from_open_clip({"model_cfg": _siglip(**changes)}, "m")
    message = str(error.value)
    assert not isinstance(error.value, UnsupportedModelError), message
    assert "\n" not in message and message.startswith("m: open_clip_config.json") and field in message


@pytest.mark.parametrize("eos_id, words", [(-1, "eos_id is -1, not a whole number"), ("2", "eos_id is \"2\""),
                                           (901629, "eos_id is 901629, outside the vocabulary of 901629")])
def test_malformed_eos_id(eos_id, words):
    config = json.loads(json.dumps(_open_clip_configs()["ViT-H-14-worldwide"]))
    config["text_cfg"]["eos_id"] = eos_id
    with pytest.raises(CheckpointError, match=words):
        convert.config_from_open_clip(config, "m")


# --------------------------------------------------------------------------- parity


@pytest.fixture
def tiny_trunk(monkeypatch):
    """The tiny test trunk in clipcli's table, as timm registers it (see foreign_siglip)."""
    monkeypatch.setitem(convert_siglip.TIMM_SIZES, "test", (48, 2, 3, 72))
    monkeypatch.setitem(convert_siglip.TIMM_TRUNKS, TINY_TRUNK, "gelu_tanh")


def test_open_clip_siglip_read_through_its_config_matches_open_clip(tiny_trunk):
    pytest.importorskip("clipcli.models.siglip")
    from clipcli.models.factory import build_model

    reference = open_clip_siglip(seed=4)
    hints = convert.config_from_open_clip({"model_cfg": OPEN_CLIP_SIGLIP, "preprocess_cfg": {}}, "tiny")
    assert hints["activation"] == "gelu_tanh" and hints["text_activation"] is None
    model = build_model(dict(reference.state_dict()), hints, source="tiny").eval()
    generator = torch.Generator().manual_seed(1)
    images, ids = torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 100, (3, 16), generator=generator)
    with torch.no_grad():
        image_diff = (model.encode_image(images) - reference.encode_image(images)).abs().max().item()
        text_diff = (model.encode_text(ids) - reference.encode_text(ids)).abs().max().item()
    print(f"\ntiny open_clip SigLIP max |clipcli - open_clip|: image {image_diff:.2e}, text {text_diff:.2e}")
    assert max(image_diff, text_diff) <= TOLERANCE


# --------------------------------------------------------------------------- hostile values

HOSTILE = [None, -1, 0, 1.5, 10**400, float("nan"), "x", "", [], [1, 2], {}, {"a": 1}, True, [[[[[]]]]]]
TRANSFORMERS_SIGLIP = {
    "model_type": "siglip",
    "text_config": {"hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "vocab_size": 100, "max_position_embeddings": 16, "projection_size": 48,
                    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    "vision_config": {"hidden_size": 48, "intermediate_size": 72, "num_attention_heads": 3, "num_hidden_layers": 2,
                      "image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
                      "layer_norm_eps": 1e-6, "vision_use_head": True},
}
PREPROCESSOR = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def _fields(config: dict, prefix: str = ""):
    """Every field path of a nested config (lists are values)."""
    for key, value in config.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _fields(value, f"{prefix}{key}.")


def _with(config: dict, path: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, leaf = path.split(".")
    place = config
    for parent in parents:
        place = place[parent]
    place[leaf] = value
    return config


def _only_checkpoint_errors(read, config: dict, skip: tuple[str, ...] = ()) -> int:
    """Set each field of ``config`` to each hostile value: ``read`` answers or raises one
    :class:`CheckpointError` of one line, never anything else. How many were refused."""
    refused = 0
    for path in _fields(config):
        if path in skip:
            continue
        for value in HOSTILE:
            try:
                read(_with(config, path, value))
            except CheckpointError as error:
                assert "\n" not in str(error) and len(str(error)) < 400, (path, value, str(error))
                refused += 1
    return refused


def test_hostile_values_in_every_field_are_one_checkpoint_error():
    assert convert.config_from_transformers(TRANSFORMERS_SIGLIP, "m", PREPROCESSOR)["family"] == "siglip"
    refused = _only_checkpoint_errors(lambda c: convert.config_from_transformers(c, "m", PREPROCESSOR),
                                      TRANSFORMERS_SIGLIP)
    refused += _only_checkpoint_errors(lambda p: convert.config_from_transformers(TRANSFORMERS_SIGLIP, "m", p),
                                       PREPROCESSOR)
    configs = _open_clip_configs()
    for name in ("ViT-SO400M-16-SigLIP-i18n-256", "ViT-gopt-16-SigLIP2-384", "ViT-bigG-14-worldwide-378"):
        wrapped = {"model_cfg": configs[name], "preprocess_cfg": {"mean": [0.5] * 3, "resize_mode": "squash"}}
        refused += _only_checkpoint_errors(lambda c: convert.config_from_open_clip(c, "m"), wrapped)
    metaclip = {"model_type": "metaclip_2", "projection_dim": 40,
                "text_config": {"hidden_size": 64, "num_attention_heads": 2, "vocab_size": 901629, "eos_token_id": 2,
                                "hidden_act": "gelu"},
                "vision_config": {"hidden_size": 96, "num_attention_heads": 3, "hidden_act": "gelu"}}
    refused += _only_checkpoint_errors(lambda c: convert.config_from_transformers(c, "m"), metaclip)
    assert refused > 500


def test_null_stands_for_the_default_where_a_field_may_be_null():
    text = {**TRANSFORMERS_SIGLIP["text_config"], "projection_size": None}
    config = {**TRANSFORMERS_SIGLIP, "text_config": {**text, "hidden_size": 48, "num_attention_heads": 3}}
    hints = convert.config_from_transformers(config, "m", {**PREPROCESSOR, "rescale_factor": None})
    assert hints["family"] == "siglip" and hints["image_resolution"] == 32
    worldwide = _with(_open_clip_configs()["ViT-H-14-worldwide"], "text_cfg.eos_id", None)
    assert convert.config_from_open_clip(worldwide, "m")["eos_id"] == 2
