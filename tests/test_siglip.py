"""SigLIP's towers (clipcli.models.siglip) and loading them: parity with open_clip's timm-based
SigLIP on tiny random models saved as OpenCLIP hub folders (by folder and by ``hf-hub:`` from an
offline HF cache), the architecture read off shapes, one tower at a time, the preprocessing of
open_clip and transformers, where tokenizer files are found, and the refusal lines of families
clipcli does not run.

open_clip builds a SigLIP image tower from a timm model *name*: tiny trunks are registered in
timm beside its own (as timm registers its test-size models), and clipcli's table of timm trunks
(``convert_siglip.TIMM_TRUNKS``/``TIMM_SIZES``) learns them the same way for these tests.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from foreign import hf_cache_repo, randomize
from PIL import Image
from tiny_hub_repos import tiny_unigram_tokenizer

import clipcli
from clipcli.errors import ClipcliError, OfflineError, UnsupportedModelError

TOLERANCE = 1e-4  # float32, as the CLIP parity tests; measured differences are below 1e-5
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}

# Tiny timm trunks: name -> (timm kwargs, the (width, depth, heads, MLP width) clipcli's table holds)
TRUNKS = {
    # SigLIP 1: exact GELU, 32 px in 8 px patches, 32-wide heads
    "vit_tiny_patch8_siglip_32": (dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
                                  (64, 2, 2, 256)),
    # SigLIP 2's tanh GELU, SO400M's MLP ratio, and 36 px into a 4 x 4 grid of 8 (the last 4 px unused,
    # as SO400M/14 at 384 px)
    "vit_tinytanh_patch8_siglip_36": (dict(img_size=36, patch_size=8, embed_dim=72, depth=2, num_heads=3,
                                           mlp_ratio=3.7362, act_layer="gelu_tanh"), (72, 2, 3, 269)),
}


def _text_cfg(**changes) -> dict:
    cfg = dict(context_length=16, vocab_size=1000, hf_tokenizer_name="timm/tiny-siglip-tokenizer",
               tokenizer_kwargs={"clean": "canonicalize"}, width=64, heads=2, layers=2, no_causal_mask=True,
               proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6})
    return {**cfg, **changes}


def _vision_cfg(trunk: str) -> dict:
    size = TRUNKS[trunk][0]["img_size"]
    return dict(image_size=size, timm_model_name=trunk, timm_model_pretrained=False, timm_pool="map", timm_proj="none")


# open_clip model_cfgs, each with one trait of the released SigLIPs
MODELS = {
    "siglip": dict(embed_dim=64, init_logit_bias=-10, custom_text=True, vision_cfg=_vision_cfg("vit_tiny_patch8_siglip_32"),
                   text_cfg=_text_cfg()),
    # SigLIP 2: tanh GELU in both towers; a text tower narrower than the image one (as giant-opt's),
    # projected up to it, with 3 heads of 16 and a non-4 MLP ratio
    "siglip2-tanh": dict(embed_dim=72, init_logit_bias=-10, custom_text=True,
                         vision_cfg=_vision_cfg("vit_tinytanh_patch8_siglip_36"),
                         text_cfg=_text_cfg(context_length=12, vocab_size=1200, width=48, heads=3, mlp_ratio=3.7362,
                                            act_kwargs={"approximate": "tanh"})),
    # SO400M i18n: no text projection (the last position's LayerNorm output is the embedding)
    "no-text-projection": dict(embed_dim=64, init_logit_bias=-10, custom_text=True,
                               vision_cfg=_vision_cfg("vit_tiny_patch8_siglip_32"),
                               text_cfg=_text_cfg(heads=4, proj_type="none", proj_bias=False)),
}


def _register_trunks() -> None:
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    for name, (args, _) in TRUNKS.items():
        if timm.list_models(name):
            continue

        def build(pretrained: bool = False, _name=name, _args=args, **kwargs):
            return _create_vision_transformer(_name, pretrained=pretrained,
                                              **{**_args, "class_token": False, "global_pool": "map", **kwargs})

        build.__name__ = name
        register_model(build)


@pytest.fixture(scope="module", autouse=True)
def tiny_trunks():
    """The tiny trunks in timm's registry and in clipcli's table of the trunks it knows."""
    from clipcli.models import convert_siglip

    _register_trunks()
    with pytest.MonkeyPatch.context() as patch:
        for name, (args, sizes) in TRUNKS.items():
            size = name.split("_")[1]
            patch.setitem(convert_siglip.TIMM_SIZES, size, sizes)
            patch.setitem(convert_siglip.TIMM_TRUNKS, name, args.get("act_layer", "gelu"))
        yield


def open_clip_model(name: str, seed: int = 0) -> torch.nn.Module:
    from open_clip.model import CustomTextCLIP

    cfg = MODELS[name]
    text_cfg = {k: v for k, v in cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    model = CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], text_cfg, init_logit_bias=cfg["init_logit_bias"])
    model = randomize(model, seed)
    with torch.no_grad():
        model.logit_bias.fill_(-3.0 - seed)  # a bias that moves the probabilities (randomize leaves it near 0)
    return model


def save_open_clip(model: torch.nn.Module, name: str, folder: Path) -> Path:
    """``folder`` as an OpenCLIP hub repository holds the model (config + safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODELS[name], "preprocess_cfg": SIGLIP_PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


_SAVED: dict[str, tuple] = {}


def _saved(name: str, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    """(name, folder as the hub holds it, open_clip's model), made once per test session."""
    if name not in _SAVED:
        reference = open_clip_model(name, seed=len(name) % 5).eval()
        _SAVED[name] = name, save_open_clip(reference, name, tmp_path_factory.mktemp("siglip") / name), reference
    return _SAVED[name]


@pytest.fixture(scope="module", params=sorted(MODELS))
def repo(request, tmp_path_factory):
    """Each tiny SigLIP: (name, folder as the hub holds it, open_clip's model)."""
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def siglip_repo(tmp_path_factory):
    """The plain tiny SigLIP, for tests that need one."""
    return _saved("siglip", tmp_path_factory)


def _inputs(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    resolution, config = model.visual.input_resolution, model.config
    images = torch.randn(3, 3, resolution, resolution, generator=generator)
    tokens = torch.randint(0, config.vocab_size, (4, config.context_length), generator=generator)
    tokens[1, 5:] = 1  # a short row padded: the padding is attended and counts
    return images, tokens


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


# --------------------------------------------------------------------------- parity with open_clip


@pytest.mark.parametrize("how", ["folder", "hf-hub"])
def test_siglip_matches_open_clip(repo, how, hf_cache):
    name, folder, reference = repo
    target = folder
    if how == "hf-hub":
        hf_cache_repo(hf_cache, f"timm/{name}", folder)
        target = f"hf-hub:timm/{name}"
    model, _ = clipcli.load(target, device="cpu")
    images, tokens = _inputs(model)
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), reference.encode_image(images))
        text_diff = _max_diff(model.encode_text(tokens), reference.encode_text(tokens))
        logits, _ = model(images, tokens)
        out = reference(images, tokens)
        theirs = torch.sigmoid(out[2] * out[0] @ out[1].T + out[3])
        prob_diff = _max_diff(torch.sigmoid(logits), theirs)
    print(f"\n{name} ({how}) max |clipcli - open_clip|: encode_image {image_diff:.1e}, encode_text {text_diff:.1e}, "
          f"probabilities {prob_diff:.1e}")
    assert image_diff <= TOLERANCE and text_diff <= TOLERANCE and prob_diff <= TOLERANCE
    assert model.score_kind == "sigmoid" and model.config.family == "siglip"
    assert model.config.vision_heads == reference.visual.trunk.blocks[0].attn.num_heads
    assert model.config.transformer_heads == reference.text.transformer.resblocks[0].attn.num_heads
    assert 0.01 < theirs.mean() < 0.99  # the bias moved the probabilities: a check that can fail


@pytest.fixture(scope="module")
def transformers_repo(tmp_path_factory):
    """A tiny transformers ``SiglipModel`` (tanh GELU, 3 heads of 16, a text tower narrower than
    the image one) saved as its hub repository holds it, and the model."""
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=40, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=100, max_position_embeddings=16, projection_size=48),
        vision_config=dict(hidden_size=48, intermediate_size=72, num_attention_heads=3, num_hidden_layers=2,
                           image_size=32, patch_size=8))
    reference = randomize(SiglipModel(config), seed=5).eval()
    folder = tmp_path_factory.mktemp("siglip-transformers") / "m"
    reference.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "resample": 3, "size": {"height": 32, "width": 32}, "do_resize": True, "do_rescale": True,
         "do_normalize": True, "rescale_factor": 1 / 255}))
    return folder, reference


@pytest.mark.parametrize("how", ["folder", "file", "hf-hub"])
def test_transformers_siglip_matches_transformers(transformers_repo, how, hf_cache):
    folder, reference = transformers_repo
    target = {"folder": folder, "file": folder / "model.safetensors", "hf-hub": "hf-hub:google/tiny-siglip"}[how]
    if how == "hf-hub":
        hf_cache_repo(hf_cache, "google/tiny-siglip", folder)
    model, _ = clipcli.load(target, device="cpu")
    images, tokens = _inputs(model, seed=1)

    def features(output):  # transformers 5 returns an output object, older versions a tensor
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), features(reference.get_image_features(pixel_values=images)))
        text_diff = _max_diff(model.encode_text(tokens), features(reference.get_text_features(input_ids=tokens)))
        expected = torch.sigmoid(reference(pixel_values=images, input_ids=tokens).logits_per_image)
        prob_diff = _max_diff(torch.sigmoid(model(images, tokens)[0]), expected)
    print(f"\ntransformers SiglipModel ({how}) max |clipcli - transformers|: encode_image {image_diff:.1e}, "
          f"encode_text {text_diff:.1e}, probabilities {prob_diff:.1e}")
    assert image_diff <= TOLERANCE and text_diff <= TOLERANCE and prob_diff <= TOLERANCE
    assert model.config.activation == model.config.text_act == "gelu_tanh" and model.config.vision_heads == 3


def test_siglip_preprocessing_equals_open_clip_and_transformers(sample_images):
    """open_clip's SigLIP transform (squash, bicubic, 0.5s) exactly; transformers'
    SiglipImageProcessor exactly with its PIL backend, within 2 of 255 levels (2/255/0.5 after
    normalising) with its torchvision one (its own bicubic on tensors)."""
    from open_clip.transform import image_transform
    from transformers import SiglipImageProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from clipcli.models.factory import config_from_state_dict
    from clipcli.preprocess import preprocess_for, transform_for

    config = replace(config_from_state_dict(open_clip_model("siglip").state_dict()), image_resolution=224)
    ours, compose = preprocess_for(config), transform_for(config)
    theirs = image_transform(224, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash",
                             interpolation="bicubic")
    pil = SiglipImageProcessorPil(size={"height": 224, "width": 224})
    tensors = SiglipImageProcessor(size={"height": 224, "width": 224})
    worst = 0.0
    for path in sample_images:
        image = Image.open(path)
        expected = theirs(image)
        assert torch.equal(ours(image), expected) and torch.equal(compose(image), expected), path.name
        assert torch.equal(ours(image), pil(images=image, return_tensors="pt")["pixel_values"][0]), path.name
        worst = max(worst, _max_diff(ours(image), tensors(images=image, return_tensors="pt")["pixel_values"][0]))
    assert worst <= 2 / 255 / 0.5 + 1e-6
    assert (config.resize_mode, config.interpolation, config.image_mean) == ("squash", "bicubic", (0.5, 0.5, 0.5))


# --------------------------------------------------------------------------- shapes, towers, building


def test_the_architecture_is_read_off_the_shapes():
    from clipcli.models.factory import build_model, config_from_state_dict, parameter_count

    reference = open_clip_model("siglip2-tanh")
    state = reference.state_dict()
    config = config_from_state_dict(state)
    assert (config.family, config.vision_width, config.vision_layers, config.vision_patch_size) == ("siglip", 72, 2, 8)
    assert (config.image_resolution, config.vision_mlp_width, config.embed_dim) == (32, 269, 72)  # 4 x 8 px by shapes
    assert (config.transformer_width, config.transformer_layers, config.text_mlp_width) == (48, 2, 179)
    assert (config.context_length, config.vocab_size, config.logit_bias, config.text_pool) == (12, 1200, True, "last")
    assert parameter_count(config) == sum(p.numel() for p in reference.parameters())
    # heads come from hints; the image resolution may exceed patch x grid by less than a patch
    model = build_model(dict(state), {"vision_head_width": 24, "transformer_heads": 3, "image_resolution": 36,
                                      "activation": "gelu_tanh"})
    assert model.visual.input_resolution == 36 and model.config.vision_heads == 3
    with pytest.raises(ClipcliError, match="image_resolution 32 \\(the config says 40\\)"):
        build_model(dict(state), {"image_resolution": 40})
    with pytest.raises(ClipcliError, match="family 'siglip' \\(the config says 'clip'\\)"):
        build_model(dict(state), {"family": "clip"})
    with pytest.raises(ClipcliError, match="missing keys: visual.trunk.attn_pool.latent"):
        build_model({k: v for k, v in state.items() if k != "visual.trunk.attn_pool.latent"})


def test_a_bare_siglip_file_says_what_was_assumed(siglip_repo, tmp_path):
    """Without a config, SigLIP's released choices are assumed (tanh GELU, 64-wide heads, 0.5s,
    squash), with a note; the tiny model's 32-wide heads then give other embeddings."""
    from clipcli.loading import AssumedArchitectureWarning

    name, folder, reference = siglip_repo
    bare = tmp_path / "weights.safetensors"
    bare.write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    with pytest.warns(AssumedArchitectureWarning, match="no config: assuming a released SigLIP's 64-wide"):
        model, _ = clipcli.load(bare, device="cpu")
    config = model.config
    assert (config.family, config.activation, config.vision_heads, config.resize_mode) == ("siglip", "gelu_tanh", 1,
                                                                                         "squash")
    images, _ = _inputs(model)
    with torch.no_grad():
        assert _max_diff(model.encode_image(images), reference.encode_image(images)) > 1e-3


def test_one_tower_at_a_time(repo):
    from clipcli.loading import load, resolve

    name, folder, reference = repo
    image_only, _ = load(resolve(folder), towers=("image",))
    text_only, _ = load(resolve(folder), towers=("text",))
    assert image_only.towers == ("image",) and text_only.towers == ("text",)
    assert all(not p.is_meta for p in image_only.parameters())
    with pytest.raises(ClipcliError, match="without its text tower"):
        image_only.encode_text(torch.zeros(1, image_only.context_length, dtype=torch.long))
    image_only.adopt_tower(text_only, "text")
    images, tokens = _inputs(image_only)
    with torch.no_grad():
        assert _max_diff(image_only.encode_text(tokens), reference.encode_text(tokens)) <= TOLERANCE
    image_only.drop_tower("image")
    assert image_only.towers == ("text",)


def test_a_siglip_trained_from_scratch_starts_as_the_sigmoid_loss_says():
    from clipcli.models.config import CLIPConfig
    from clipcli.models.factory import create_model

    config = CLIPConfig(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                        context_length=16, vocab_size=100, transformer_width=64, transformer_heads=2,
                        transformer_layers=2, activation="gelu_tanh", family="siglip", text_pool="last",
                        logit_bias=True)
    torch.manual_seed(0)
    model = create_model(config).eval()
    assert math.isclose(model.logit_scale.item(), math.log(10), rel_tol=1e-6) and model.logit_bias.item() == -10
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}
    with torch.no_grad():
        logits, per_text = model(torch.randn(2, 3, 32, 32), torch.randint(0, 100, (3, 16)))
    assert logits.shape == (2, 3) and torch.equal(per_text, logits.t()) and torch.isfinite(logits).all()
    assert (torch.sigmoid(logits) < 0.01).all()  # bias -10: every pair starts unlikely


def test_state_dict_keys_belong_to_their_towers():
    from clipcli.models.config import tower_of
    from clipcli.models.factory import needed_keys

    state = open_clip_model("siglip").state_dict()
    assert {tower_of(k) for k in state if k.startswith("text.")} == {"text"}
    assert {tower_of(k) for k in state if k.startswith("visual.")} == {"image"}
    assert tower_of("logit_bias") is None and tower_of("logit_scale") is None
    needed = needed_keys({k: v.to("meta") for k, v in state.items()})
    assert all(needed(k) for k in state) and not needed("text.extra.weight")


# --------------------------------------------------------------------------- tokenizer files


def test_tokenizer_files_beside_the_weights_are_part_of_the_identity(siglip_repo, tmp_path):
    from clipcli.loading import resolve, source_key
    from clipcli.text.tokenizers import TOKENIZER_FILES

    name, folder, _ = siglip_repo
    bare = resolve(folder)
    assert dict(bare.tokenizer_files) == {}  # none beside it; the named repository is not cached
    copy = _copy(folder, tmp_path / "copy")
    first = TOKENIZER_FILES[0]
    (copy / first).write_text("one")
    one = resolve(copy)
    assert dict(one.tokenizer_files) == {first: copy / first}
    key = source_key(one)
    (copy / first).write_text("three")  # another content (and size: the hash is remembered by size and time)
    assert source_key(resolve(copy)) != key != source_key(bare)


def test_the_loaded_models_identity_covers_its_tokenizer(siglip_repo, tmp_path, tiny_vit_checkpoint):
    """Label embeddings and journals are keyed by LoadedModel.identity: other tokenizer files,
    other identity; a CLIP (the bundled BPE) keeps the identity it always had."""
    import hashlib

    from clipcli.models.config import config_to_json
    from clipcli.pipeline import load_model
    from clipcli.text.tokenizers import TOKENIZER_FILES

    _, folder, _ = siglip_repo
    copy = _copy(folder, tmp_path / "copy")
    (copy / TOKENIZER_FILES[0]).write_text("one")
    one = load_model(str(copy), device="cpu", towers=("image",)).identity
    (copy / TOKENIZER_FILES[0]).write_text("three")
    assert load_model(str(copy), device="cpu", towers=("image",)).identity != one
    clip = load_model(str(tiny_vit_checkpoint), device="cpu")
    assert clip.identity == hashlib.sha256(f"{clip.sha256}\0{config_to_json(clip.model.config)}".encode()).hexdigest()


def test_tokenizer_files_come_from_the_repository_the_config_names(siglip_repo, hf_cache, tmp_path):
    from clipcli.loading import resolve
    from clipcli.text.tokenizers import TOKENIZER_FILES

    name, folder, _ = siglip_repo
    files = tmp_path / "tok"
    files.mkdir()
    (files / TOKENIZER_FILES[0]).write_text("vocabulary")
    snapshot = hf_cache_repo(hf_cache, "timm/tiny-siglip-tokenizer", files)
    for target in (folder, folder / "open_clip_model.safetensors"):
        assert dict(resolve(target).tokenizer_files) == {TOKENIZER_FILES[0]: snapshot / TOKENIZER_FILES[0]}
    hf_cache_repo(hf_cache, f"timm/{name}", folder)
    assert resolve(f"hf-hub:timm/{name}").tokenizer_files[TOKENIZER_FILES[0]].read_text() == "vocabulary"


def test_registry_siglip_names_find_their_tokenizer_repository(hf_cache, tmp_path, monkeypatch):
    """A registry SigLIP resolves from the HF cache with its tokenizer files from its
    ``tokenizer_repo`` (resolving reads no weights: a stand-in file is enough)."""
    from clipcli.loading import resolve
    from clipcli.models import registry
    from clipcli.text.tokenizers import TOKENIZER_FILES

    weights, tokenizer = tmp_path / "w", tmp_path / "t"
    weights.mkdir(), tokenizer.mkdir()
    (weights / "open_clip_model.safetensors").write_bytes(b"stand-in")
    (tokenizer / TOKENIZER_FILES[0]).write_text("vocabulary")
    hf_cache_repo(hf_cache, "timm/Tiny-SigLIP", weights)
    hf_cache_repo(hf_cache, "timm/Tiny-SigLIP-tokenizer", tokenizer)
    entry = registry.Pretrained("Tiny-SigLIP", "webli", "timm/Tiny-SigLIP", registry.OPEN_CLIP_FILES,
                                {"family": "siglip", "logit_bias": True, "tokenizer": "sentencepiece"},
                                "SigLIP", "Apache-2.0", None, tokenizer_repo="timm/Tiny-SigLIP-tokenizer")
    monkeypatch.setattr(registry, "pretrained", lambda: (entry,))
    monkeypatch.setattr(registry, "find_pretrained", lambda name: entry if name == entry.name else None)
    source = resolve("Tiny-SigLIP/webli")
    assert source.hints["family"] == "siglip" and source.path.name == "open_clip_model.safetensors"
    assert source.tokenizer_files[TOKENIZER_FILES[0]].read_text() == "vocabulary"


def test_a_loaded_siglip_tokenizes_with_its_own_files(siglip_repo, tmp_path):

    name, folder, reference = siglip_repo
    bare, _ = clipcli.load(folder, device="cpu")  # its config names a hub tokenizer, not cached: fetched for text
    with pytest.raises(OfflineError, match="the tokenizer of .* no tokenizer.json, .* of timm/tiny-siglip-tokenizer"):
        clipcli.tokenize(["a cat"], model=bare)
    copy = _copy(folder, tmp_path / "with-tokenizer")
    tiny_unigram_tokenizer(copy)
    model, _ = clipcli.load(copy, device="cpu")
    tokens = clipcli.tokenize(["A cat!", "a"], model=model)  # canonicalized: lower case, no punctuation
    expected = torch.zeros(2, model.context_length, dtype=torch.long)
    expected[0, :3], expected[1, :2] = torch.tensor([30, 31, 1]), torch.tensor([30, 1])  # ▁a ▁cat </s>; ▁a </s>
    assert torch.equal(tokens, expected) and torch.equal(model.tokenizer(["A cat!", "a"]), expected)
    with torch.no_grad():
        assert _max_diff(model.encode_text(tokens), reference.encode_text(tokens)) <= TOLERANCE


@pytest.fixture
def tokenizer_hub(tmp_path, monkeypatch):
    """A hub on 127.0.0.1 serving ``timm/tiny-siglip-tokenizer`` (the repository the tiny SigLIP's
    config names): the tiny tokenizer.json and its config, and a stand-in ``spiece.model`` that
    must never be fetched (tokenizer.json is read when there is one). Online, an empty HF cache."""
    from download_server import start_server, stop_server

    server = start_server()
    files = tmp_path / "served"
    files.mkdir()
    tiny_unigram_tokenizer(files)
    (files / "spiece.model").write_bytes(b"never read")
    for file in files.iterdir():
        path = f"/timm/tiny-siglip-tokenizer/resolve/main/{file.name}"
        server.add(path, file.read_bytes())
        server.headers[path] = {"X-Repo-Commit": "d" * 40}
    missing = "/timm/tiny-siglip-tokenizer/resolve/main/special_tokens_map.json"  # as the hub says "no such file"
    server.headers[missing] = {"status": "404", "X-Error-Code": "EntryNotFound", "X-Repo-Commit": "d" * 40}
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv("CLIPCLI_OFFLINE")
    yield server
    stop_server(server)


def test_a_hub_tokenizer_is_fetched_for_the_first_text_and_the_identity_never_depends_on_it(
        siglip_repo, tokenizer_hub, monkeypatch):
    """A local SigLIP whose config names a hub tokenizer: resolving and image-only work ask the
    hub nothing; the first text fetches only the files that are read; the model's key is the
    same offline, online, before and after the fetch."""
    from clipcli.loading import load_model, resolve, source_key

    name, folder, reference = siglip_repo
    source = resolve(folder)
    assert source.tokenizer_repos == (("timm/tiny-siglip-tokenizer", None),) and dict(source.tokenizer_files) == {}
    key = source_key(source)
    monkeypatch.setenv("CLIPCLI_OFFLINE", "1")
    assert source_key(resolve(folder)) == key  # offline: the same identity
    monkeypatch.delenv("CLIPCLI_OFFLINE")
    image_only = load_model(folder, towers=("image",))
    images, _ = _inputs(image_only)
    with torch.no_grad():
        image_only.encode_image(images)
    assert tokenizer_hub.requests == []  # resolve, load and images: nothing asked of the hub

    model = load_model(folder)
    tokens = clipcli.tokenize(["A cat!"], model=model)
    assert tokens[0, :3].tolist() == [30, 31, 1]  # ▁a ▁cat </s>
    asked = {request.path.rsplit("/", 1)[-1] for request in tokenizer_hub.requests}
    assert asked == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}  # the last: none
    assert not tokenizer_hub.gets("/timm/tiny-siglip-tokenizer/resolve/main/special_tokens_map.json")
    cached = resolve(folder)  # now from the HF cache, still keyed by the repository
    assert cached.tokenizer_files["tokenizer.json"].read_bytes() == model.tokenizer.files["tokenizer.json"].read_bytes()
    assert source_key(cached) == key
    monkeypatch.setenv("CLIPCLI_OFFLINE", "1")
    offline = load_model(folder)
    assert torch.equal(clipcli.tokenize(["A cat!"], model=offline), tokens)


def test_download_fetches_a_hub_models_tokenizer_for_offline_runs(siglip_repo, tokenizer_hub, monkeypatch, tmp_path):
    """``clipcli download`` of a model whose tokenizer lives in another hub repository fetches
    that tokenizer too (loading fetches it only for the first text): offline runs then tokenize."""
    from clipcli.loading import load_model
    from clipcli.tasks import download_models
    from clipcli.text.tokenizers import TOKENIZER_FILES

    name, folder, _ = siglip_repo
    snapshot = hf_cache_repo(tmp_path / "hf-hub", f"timm/{name}", folder)  # the weights cached, no tokenizer
    for file in TOKENIZER_FILES:  # the model's own repository has none, as the hub says it
        tokenizer_hub.headers[f"/timm/{name}/resolve/main/{file}"] = {
            "status": "404", "X-Error-Code": "EntryNotFound", "X-Repo-Commit": snapshot.name}
    [(asked, files)] = list(download_models([f"hf-hub:timm/{name}"]))
    assert not isinstance(files, Exception), files
    assert {path.name for path in files} >= {"open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    monkeypatch.setenv("CLIPCLI_OFFLINE", "1")
    model = load_model(f"hf-hub:timm/{name}")
    assert clipcli.tokenize(["A cat!"], model=model)[0, :3].tolist() == [30, 31, 1]  # ▁a ▁cat </s>


def test_the_api_tokenizes_with_the_models_tokenizer(tiny_vit_checkpoint):
    model, _ = clipcli.load(tiny_vit_checkpoint, device="cpu")
    texts = ["a photo of a cat", "a dog"]
    assert torch.equal(clipcli.tokenize(texts, model=model), clipcli.tokenize(texts, model.context_length))
    assert clipcli.tokenize(texts).shape == (2, 77)  # OpenAI's default without a model
    assert model.tokenizer is not None


# --------------------------------------------------------------------------- families clipcli does not run

REFUSED = {
    "SigLIP 2 NaFlex": {"vision_cfg": {"timm_model_name": "naflexvit_base_patch16_siglip"}},
    "SigLIP with global average pooling": {"vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_gap_224"}},
    "CoCa": {"multimodal_cfg": {"width": 64}},
    "EVA": {"vision_cfg": {"eva_model_name": "eva02_large_patch14_clip_224"}},
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_clipcli_does_not_run_are_refused_in_one_line(siglip_repo, family, tmp_path):
    name, folder, _ = siglip_repo
    config = json.loads((folder / "open_clip_config.json").read_text())
    for key, value in REFUSED[family].items():
        config["model_cfg"].setdefault(key, {}).update(value)
    other = _copy(folder, tmp_path / "other")
    (other / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as error:
        clipcli.load(other, device="cpu")
    assert f"is a {family} model" in str(error.value) and "\n" not in str(error.value)


def test_transformers_5_processor_config_gives_the_image_settings(transformers_repo, tmp_path, sample_images):
    """transformers 5's save_pretrained writes processor_config.json, the image processor's
    settings nested under "image_processor", and no preprocessor_config.json: they are read from it."""
    from PIL import Image
    from transformers import SiglipImageProcessorPil

    folder = _copy(transformers_repo[0], tmp_path / "v5")
    (folder / "preprocessor_config.json").unlink()
    settings = {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.2, 0.3, 0.4],
                "image_std": [0.1, 0.2, 0.3], "resample": 2, "size": {"height": 32, "width": 32}, "do_resize": True,
                "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255}
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "SiglipProcessor",
                                                              "image_processor": settings}))
    model, preprocess = clipcli.load(folder, device="cpu")
    assert model.config.image_mean == (0.2, 0.3, 0.4) and model.config.interpolation == "bilinear"
    reference = SiglipImageProcessorPil(**{k: v for k, v in settings.items() if k != "image_processor_type"})
    image = Image.open(sample_images[0]).convert("RGB")
    expected = reference(images=image, return_tensors="pt")["pixel_values"][0]
    assert _max_diff(preprocess(image), expected) <= 2 / 255 / 0.1  # PIL resize rounding, one level
