"""OpenCLIP and transformers CLIP checkpoints: parity with the reference packages, the HF cache,
refused families, and the notes for checkpoints that do not describe themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from foreign import (
    OPEN_CLIP_CONFIGS,
    TRANSFORMERS_CONFIGS,
    features,
    hf_cache_repo,
    open_clip_model,
    open_clip_transform,
    save_open_clip,
    save_transformers,
    transformers_model,
)
from PIL import Image
from typer.testing import CliRunner

import clipcli
from clipcli.cli import app

TOLERANCE = 1e-4
TEXTS = ["a photo of a cat", "", "a diagram of the moon landing, drawn in pencil " * 2]


def run(*args, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def _inputs(resolution: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, resolution, resolution, generator=generator), clipcli.tokenize(TEXTS, truncate=True)


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _target(how: str, folder, repo: str, hf_cache):
    """The name to load a saved model by: its folder, or ``hf-hub:REPO`` after laying the
    folder out in the HF cache."""
    if how == "folder":
        return folder
    hf_cache_repo(hf_cache, repo, folder)
    return f"hf-hub:{repo}"


# --------------------------------------------------------------------------- OpenCLIP


@pytest.fixture(scope="module", params=sorted(OPEN_CLIP_CONFIGS))
def open_clip_repo(request, tmp_path_factory):
    """(name, folder as the hub holds it, open_clip's model)."""
    name = request.param
    reference = open_clip_model(name, seed=len(name))
    folder = save_open_clip(reference, name, tmp_path_factory.mktemp("open_clip") / name)
    return name, folder, reference


@pytest.mark.parametrize("how", ["folder", "hf-hub"])
def test_open_clip_models_match_open_clip(open_clip_repo, how, hf_cache):
    name, folder, reference = open_clip_repo
    model, preprocess = clipcli.load(_target(how, folder, f"laion/{name}", hf_cache), device="cpu")
    images, tokens = _inputs(model.visual.input_resolution)
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), reference.encode_image(images))
        text_diff = _max_diff(model.encode_text(tokens), reference.encode_text(tokens))
    print(f"\n{name} ({how}) max |clipcli - open_clip|: encode_image {image_diff:.2e}, encode_text {text_diff:.2e}")
    assert image_diff <= TOLERANCE and text_diff <= TOLERANCE
    if hasattr(reference.visual, "transformer"):  # a ViT: the head count the shapes could not show
        assert model.config.vision_heads == reference.visual.transformer.resblocks[0].attn.num_heads


def test_open_clip_preprocessing_equals_open_clips_transform(open_clip_repo, sample_images):
    from clipcli.pipeline import load_model

    name, folder, _ = open_clip_repo
    model, compose = clipcli.load(folder, device="cpu")
    ours = load_model(str(folder), device="cpu").preprocess  # the batch path, without torchvision
    theirs = open_clip_transform(name)
    odd = [Image.new("RGB", (45, 17), (10, 200, 30)), Image.new("L", (13, 50), 90)]
    for image in [Image.open(path) for path in sample_images] + odd:
        expected = theirs(image)
        assert torch.equal(compose(image), expected), name
        assert torch.equal(ours(image), expected), name


def test_gelu_and_head_width_are_not_guessed_from_shapes(tmp_path):
    """The same weights without their config load as OpenAI's architecture: measurably wrong,
    with a note on stderr that says so and how to fix it."""
    from clipcli.loading import load, resolve

    name = "gelu-head80"
    reference = open_clip_model(name, seed=1)
    folder = save_open_clip(reference, name, tmp_path / "m")
    bare = tmp_path / "bare.safetensors"
    (folder / "open_clip_model.safetensors").rename(bare)
    model, note = load(resolve(bare))
    assert note and "has no config" in note and "open_clip_config.json" in note and "\n" not in note
    assert "give its architecture (arch, e.g." in note and note.fix == "arch"  # the CLI spells --arch
    images, tokens = _inputs(32)
    with torch.no_grad():
        assert _max_diff(model.encode_image(images), reference.encode_image(images)) > 1e-3
    # a config beside the file describes it
    (tmp_path / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    described, note = load(resolve(bare))
    assert note is None
    with torch.no_grad():
        assert _max_diff(described.encode_image(images), reference.encode_image(images)) <= TOLERANCE


def test_open_clip_bin_weights_and_converted_safetensors(tmp_path):
    name = "quickgelu"
    reference = open_clip_model(name, seed=5)
    folder = save_open_clip(reference, name, tmp_path / "bin", weights="open_clip_pytorch_model.bin")
    out = tmp_path / "converted.safetensors"
    result = run("convert", folder, out)
    assert result.exit_code == 0, result.stderr
    original, _ = clipcli.load(folder, device="cpu")
    converted, _ = clipcli.load(out, device="cpu")
    assert converted.config == original.config and converted.config.resize_mode == "squash"
    images, tokens = _inputs(32)
    with torch.no_grad():
        assert torch.equal(converted.encode_image(images), original.encode_image(images))
        assert torch.equal(converted.encode_text(tokens), original.encode_text(tokens))
        assert _max_diff(converted.encode_image(images), reference.encode_image(images)) <= TOLERANCE


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module", params=sorted(TRANSFORMERS_CONFIGS))
def transformers_repo(request, tmp_path_factory):
    name = request.param
    reference = transformers_model(name, seed=len(name))
    folder = save_transformers(reference, tmp_path_factory.mktemp("hf") / name, safetensors=name.startswith("gelu"))
    return name, folder, reference


@pytest.mark.parametrize("how", ["folder", "hf-hub"])
def test_transformers_models_match_transformers(transformers_repo, how, hf_cache):
    name, folder, reference = transformers_repo
    model, _ = clipcli.load(_target(how, folder, f"openai/{name}", hf_cache), device="cpu")
    images, tokens = _inputs(32, seed=2)
    with torch.no_grad():
        image_diff = _max_diff(model.encode_image(images), features(reference.get_image_features(pixel_values=images)))
        text_diff = _max_diff(model.encode_text(tokens), features(reference.get_text_features(input_ids=tokens)))
        logits = reference(input_ids=tokens, pixel_values=images).logits_per_image
        logit_diff = _max_diff(model(images, tokens)[0], logits)
    print(f"\n{name} ({how}) max |clipcli - transformers|: image {image_diff:.2e}, text {text_diff:.2e}, "
          f"logits {logit_diff:.2e}")
    assert max(image_diff, text_diff, logit_diff) <= TOLERANCE
    assert model.config.activation == TRANSFORMERS_CONFIGS[name]["hidden_act"]


def test_transformers_preprocessor_config_sets_the_statistics(tmp_path):
    folder = save_transformers(transformers_model("gelu-eos49407"), tmp_path / "m", mean=[0.5, 0.25, 0.125])
    model, _ = clipcli.load(folder, device="cpu")
    assert model.config.image_mean == (0.5, 0.25, 0.125) and model.config.image_std == (0.25, 0.25, 0.25)


def test_transformers_keys_convert_to_ours():
    from clipcli.models.convert import state_dict_from_transformers

    reference = transformers_model("gelu-eos49407")
    state = dict(reference.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older checkpoints carry it
    ours = state_dict_from_transformers(state)
    assert "text_model.embeddings.position_ids" not in ours
    assert torch.equal(ours["visual.proj"], state["visual_projection.weight"].t())
    q, k, v = (state[f"vision_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(ours["visual.transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert not any(key.startswith(("text_model.", "vision_model.")) for key in ours)


# --------------------------------------------------------------------------- the CLI, offline


def test_classify_with_hub_models_from_the_hf_cache_offline(hf_cache, tmp_path, sample_images, monkeypatch):
    """Done-when of the models issue: a fake HF cache with a tiny OpenCLIP repo and a tiny
    transformers repo; `clipcli classify photos/ --labels cat,dog --model hf-hub:ORG/NAME` works offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_cache_repo(hf_cache, "laion/tiny", save_open_clip(open_clip_model("gelu-head80"), "gelu-head80", tmp_path / "oc"))
    hf_cache_repo(hf_cache, "openai/tiny", save_transformers(transformers_model("quick_gelu-eos2"), tmp_path / "tf"))
    photos = sample_images[0].parent
    for repo in ("laion/tiny", "openai/tiny"):
        result = run("classify", photos, "--labels", "cat,dog", "--model", f"hf-hub:{repo}", "-f", "jsonl")
        assert result.exit_code == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(records) == len(sample_images) and all(r["status"] == "ok" for r in records)
        assert all(abs(sum(t["score"] for t in r["top"]) - 1) < 1e-5 for r in records)
    missing = run("classify", photos, "--labels", "cat", "--model", "hf-hub:laion/absent")
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "laion/absent" in missing.stderr


def test_label_cache_and_identity_know_the_architecture(tmp_path):
    """Same weights file, two activations: two model identities, never one cache entry."""
    from clipcli.pipeline import load_model

    folder = save_open_clip(open_clip_model("quickgelu"), "quickgelu", tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    (other / "open_clip_model.safetensors").symlink_to(folder / "open_clip_model.safetensors")
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["quick_gelu"] = False
    (other / "open_clip_config.json").write_text(json.dumps(config))
    a, b = load_model(str(folder), device="cpu"), load_model(str(other), device="cpu")
    assert a.sha256 == b.sha256 and a.identity != b.identity


# --------------------------------------------------------------------------- refused families

REFUSED = {
    "SigLIP with global average pooling": {"init_logit_bias": -10,
                                           "vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_gap_224"}},
    "NLLB-SigLIP": {"init_logit_bias": -10, "text_cfg": {"hf_model_name": "facebook/nllb-200-distilled-600M"}},
    "CoCa": {"multimodal_cfg": {"width": 64}},
    "EVA": {"vision_cfg": {"eva_model_name": "eva02_large_patch14_clip_224"}},
    "ConvNeXt": {"vision_cfg": {"timm_model_name": "convnext_base"}},
    "ViTamin": {"vision_cfg": {"timm_model_name": "vitamin_large_224"}},
    "MobileCLIP": {"vision_cfg": {"timm_model_name": "fastvit_mci2"}},
    "Hugging Face text tower": {"text_cfg": {"hf_model_name": "xlm-roberta-large"}},
    "CLIPA": {"text_cfg": {"hf_tokenizer_name": "bert-base-uncased", "pool_type": "last", "no_causal_mask": True}},
    "non-standard CLIP": {"vision_cfg": {"final_ln_after_pool": True}},
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_open_clip_families_that_are_not_clip_are_refused(family, tmp_path, sample_images):
    name = "quickgelu"
    model_cfg = json.loads(json.dumps(OPEN_CLIP_CONFIGS[name]))
    for key, value in REFUSED[family].items():
        if isinstance(value, dict):
            model_cfg.setdefault(key, {}).update(value)
        else:
            model_cfg[key] = value
    folder = save_open_clip(open_clip_model(name), name, tmp_path / "m", model_cfg=model_cfg)
    result = run("classify", sample_images[0], "--labels", "cat", "--model", folder)
    assert result.exit_code == 2, result.stdout
    assert result.stderr.count("\n") == 1 and f"is a {family} model" in result.stderr


@pytest.mark.parametrize("model_type, family", [("siglip2", "SigLIP 2 NaFlex"), ("chinese_clip", "Chinese-CLIP"),
                                                ("owlv2", "OWLv2"), ("blip_2", "'blip_2'")])
def test_transformers_families_that_are_not_clip_are_refused(model_type, family, tmp_path, sample_images):
    folder = save_transformers(transformers_model("gelu-eos49407"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    result = run("encode", sample_images[0], "--model", folder)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"is a {family} model" in result.stderr


def test_a_folder_without_a_model_is_one_line(tmp_path, sample_images):
    (tmp_path / "empty").mkdir()
    result = run("encode", sample_images[0], "--model", tmp_path / "empty")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "open_clip_config.json" in result.stderr


def test_a_bare_file_with_unusual_widths_gets_a_note_on_stderr(tmp_path, sample_images):
    reference = open_clip_model("gelu-head80")
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)
    result = run("encode", sample_images[0], "--model", path)
    assert result.exit_code == 0, result.stderr
    assert "note:" in result.stderr and "no config" in result.stderr and "--arch" in result.stderr
    unknown = run("encode", sample_images[0], "--model", path, "--arch", "ViT-Q-99")
    assert unknown.exit_code == 2 and "architecture 'ViT-Q-99' is not" in unknown.stderr


def test_arch_must_agree_with_the_weights(tmp_path, sample_images):
    path = tmp_path / "weights.pt"
    torch.save(open_clip_model("gelu-head80").state_dict(), path)
    result = run("encode", sample_images[0], "--model", path, "--arch", "ViT-H-14/laion2b_s32b_b79k")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "do not match the architecture" in result.stderr and "image_resolution 32 (the config says 224)" in result.stderr


def test_embeddings_of_a_hub_model_equal_the_api(hf_cache, tmp_path, sample_images):
    name = "head104-mlp4.9231-40px"
    reference = open_clip_model(name, seed=3)
    hf_cache_repo(hf_cache, "dfn/tiny", save_open_clip(reference, name, tmp_path / "m"))
    out = tmp_path / "emb.npy"
    result = run("encode", *sample_images, "--model", "hf-hub:dfn/tiny", "-o", out, "--exact-decode")
    assert result.exit_code == 0, result.stderr
    rows = np.load(out)
    transform = open_clip_transform(name)
    with torch.no_grad():
        expected = reference.encode_image(torch.stack([transform(Image.open(p)) for p in sample_images]),
                                          normalize=True)
    assert np.abs(rows - expected.numpy()).max() <= TOLERANCE


# --------------------------------------------------------------------------- hub downloads


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub on 127.0.0.1 serving a tiny OpenCLIP repository ``laion/tiny`` as the hub does:
    ``resolve/main/FILE`` with the commit and, for weights, the LFS sha256 and size."""
    import hashlib

    from download_server import start_server, stop_server

    server = start_server()
    folder = save_open_clip(open_clip_model("gelu-head80", seed=9), "gelu-head80", tmp_path / "served")
    commit = "c" * 40
    for file in folder.iterdir():
        path = f"/laion/tiny/resolve/main/{file.name}"
        data = file.read_bytes()
        server.add(path, data)
        server.headers[path] = {"X-Repo-Commit": commit}
        if file.suffix == ".safetensors":
            server.headers[path].update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                         "X-Linked-Size": str(len(data))})
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv("CLIPCLI_OFFLINE")
    yield server, folder
    stop_server(server)


def test_download_from_the_hub_then_use_it_offline(fake_hub, tmp_path, sample_images, monkeypatch):
    server, folder = fake_hub
    result = run("download", "hf-hub:laion/tiny")
    assert result.exit_code == 0, result.stderr
    path = result.stdout.strip()
    assert path.endswith("snapshots/" + "c" * 40 + "/open_clip_model.safetensors")
    assert open(path, "rb").read() == (folder / "open_clip_model.safetensors").read_bytes()
    assert run("download", "hf-hub:laion/tiny", "--verify").exit_code == 0
    monkeypatch.setenv("CLIPCLI_OFFLINE", "1")
    gets = len(server.gets())
    offline = run("encode", sample_images[0], "--model", "hf-hub:laion/tiny")
    assert offline.exit_code == 0, offline.stderr
    assert len(server.gets()) == gets  # no network


def test_a_hub_download_that_does_not_match_its_sha256_is_deleted(fake_hub, tmp_path, sample_images):
    server, _ = fake_hub
    path = "/laion/tiny/resolve/main/open_clip_model.safetensors"
    data = server.files[path]
    server.files[path] = data[:-1] + bytes([data[-1] ^ 0xFF])  # the hub's sha256 is still the good file's
    result = run("encode", sample_images[0], "--model", "hf-hub:laion/tiny")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "does not match the hub's sha256" in result.stderr
    blobs = list((tmp_path / "hf-hub").glob("models--laion--tiny/blobs/*"))
    assert all(blob.stat().st_size < 1000 for blob in blobs)  # only the small config is kept


def test_registry_names_download_from_their_hub_repository(fake_hub, monkeypatch, sample_images):
    from clipcli.models import registry

    entry = registry.Pretrained("Tiny-1", "laion_test", "laion/tiny", registry.OPEN_CLIP_FILES,
                                {"activation": "gelu", "vision_head_width": 80, "transformer_heads": 2,
                                 "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
                                "LAION-2B", "MIT", None)
    monkeypatch.setattr(registry, "pretrained", lambda: (entry,))
    result = run("classify", sample_images[0], "--model", "Tiny-1/laion_test", "-l", "cat,dog")
    assert result.exit_code == 0, result.stderr
    listed = [json.loads(line) for line in run("models").stdout.splitlines()]
    assert next(r for r in listed if r["name"] == "Tiny-1/laion_test")["cached"] is True


def test_openai_names_use_open_clips_download_in_the_hf_cache(hf_cache, tmp_path, tiny_vit_checkpoint, monkeypatch):
    from checkpoints import released_state_dict, save_safetensors

    from clipcli.models import registry

    info = registry.ModelInfo("Fake/1", "Fake-1.pt", "0" * 64, 1, 32, 32, "timm/fake_clip.openai")
    monkeypatch.setattr(registry, "MODELS", (info,))
    folder = tmp_path / "timm"
    folder.mkdir()
    save_safetensors({k: v.float() for k, v in released_state_dict(tiny_vit_checkpoint).items()},
                     folder / registry.HF_FILE)
    hf_cache_repo(hf_cache, "timm/fake_clip.openai", folder)
    model, _ = clipcli.load("Fake/1", device="cpu")  # offline, and not in clipcli's cache
    reference, _ = clipcli.load(tiny_vit_checkpoint, device="cpu")
    images, tokens = _inputs(32)
    with torch.no_grad():
        assert _max_diff(model.encode_image(images), reference.encode_image(images)) == 0


def test_a_cached_hub_model_is_used_without_any_request(fake_hub, tmp_path, sample_images):
    """Online, a repository whose whole transformers layout is cached never reaches the hub
    (not even to ask for an OpenCLIP config it does not have)."""
    server, _ = fake_hub
    hf_cache_repo(tmp_path / "hf-hub", "openai/cached", save_transformers(transformers_model("gelu-eos49407"),
                                                                        tmp_path / "tf"))
    result = run("encode", sample_images[0], "--model", "hf-hub:openai/cached")
    assert result.exit_code == 0, result.stderr
    assert not [r for r in server.requests if "openai/cached" in r.path]


def test_sharded_transformers_checkpoints(tmp_path):
    reference = transformers_model("gelu-eos49407", seed=4)
    folder = tmp_path / "sharded"
    reference.save_pretrained(str(folder), max_shard_size="200KB")
    index = folder / "model.safetensors.index.json"
    assert index.is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    images, tokens = _inputs(32, seed=6)
    for target in (folder, index):
        model, _ = clipcli.load(target, device="cpu")
        with torch.no_grad():
            assert _max_diff(model.encode_image(images),
                             features(reference.get_image_features(pixel_values=images))) <= TOLERANCE
    next(folder.glob("model-*.safetensors")).unlink()
    result = run("encode", "--text-file", "-", "--model", folder, input="a cat\n")
    assert result.exit_code == 2 and "shards that are missing" in result.stderr


def test_transformers_config_dicts_override_the_configs(tmp_path):
    folder = save_transformers(transformers_model("quick_gelu-eos2"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text_config_dict"] = {"hidden_act": "gelu"}
    config["vision_config_dict"] = {"hidden_act": "gelu"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = clipcli.load(folder, device="cpu")
    assert model.config.activation == "gelu"


def test_names_and_folders(tmp_path, monkeypatch, sample_images):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RN50").mkdir()  # an output folder named like a model does not hide the model
    result = run("encode", sample_images[0], "--model", "RN50")
    assert result.exit_code == 2 and "not in the cache" in result.stderr  # offline: it looked for the model
    arch = run("encode", sample_images[0], "--model", "RN50", "--arch", "ViT-B-32")
    assert arch.exit_code == 2 and "for a checkpoint file only" in arch.stderr


def test_a_bad_stored_config_is_one_line(tmp_path, sample_images):
    from safetensors.torch import save_file

    reference = open_clip_model("quickgelu")
    from clipcli.models.factory import config_to_json

    model, _ = clipcli.load(save_open_clip(reference, "quickgelu", tmp_path / "m"), device="cpu")
    config = json.loads(config_to_json(model.config))
    config["resize_mode"] = "stretch"
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path),
              metadata={"clipcli_config": json.dumps(config)})
    result = run("encode", sample_images[0], "--model", path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "resize_mode 'stretch'" in result.stderr
