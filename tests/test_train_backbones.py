"""A CLIP with a torchvision image tower (the seed article's recipe): built, locked as open_clip
locks a timm tower, given pretrained weights (a state-dict file, torchvision's ImageNet weights from
the torch hub cache, or a clear error offline), trained one step, saved and classified through the CLI.

Tiny throughout: resnet18 at 32 px with the ``tiny`` preset's text tower; the larger networks are
built on the ``meta`` device only.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.errors import CheckpointError, InputError
from clipcli.models.config import IMAGENET_MEAN, METADATA_KEY, TORCHVISION_TOWERS, config_from_json, config_to_json
from clipcli.models.factory import build_model
from clipcli.train.backbones import backbone_model, lock_image_trunk, lock_text_tower, trainable_summary
from clipcli.train.loss import contrastive_loss
from clipcli.train.model import save_checkpoint

runner = CliRunner()
BATCHNORM = torch.nn.modules.batchnorm._BatchNorm


def tiny(tower: str = "torchvision:resnet18", seed: int = 0, **options):
    torch.manual_seed(seed)
    options = {"pretrained": None, "text_init": None, "preset": "tiny", "embed_dim": 32, "image_size": 32, **options}
    return backbone_model(tower, **options)


def random_resnet18_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict (classifier included) with running statistics that are not the defaults."""
    import torchvision

    torch.manual_seed(seed)
    network = torchvision.models.resnet18(weights=None)
    state = network.state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
    return state


def tokens(rows: int) -> torch.Tensor:
    """Random token ids, each row ending in CLIP's end token (the largest id: where it is read out)."""
    text = torch.randint(1, 49000, (rows, 8))
    text[:, -1] = 49407
    return text


def test_the_model_has_torchvision_keys_a_projection_and_imagenet_preprocessing():
    model, notes, files = tiny()
    keys = model.state_dict().keys()
    assert "visual.trunk.layer4.1.bn2.running_var" in keys and "visual.proj.weight" in keys
    assert not [k for k in keys if k.startswith("visual.trunk.fc")] and "visual.proj.bias" not in keys
    assert model.visual.proj.weight.shape == (32, 512) and model.text_projection.shape == (64, 32)
    config = model.config
    assert config.image_tower == "torchvision:resnet18" and config.image_resolution == 32
    assert (config.vision_layers, config.vision_width, config.vision_patch_size) == ((2, 2, 2, 2), 512, None)
    assert config.image_mean == IMAGENET_MEAN and config.interpolation == "bilinear"
    assert config_from_json(config_to_json(config)) == config
    assert files == {} and any("random" in note for note in notes) and any("tiny" in note for note in notes)
    with torch.no_grad():
        assert model.eval().encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert backbone_model("resnet18", pretrained=None, text_init=None, preset="tiny", embed_dim=None,
                          image_size=None)[0].config.image_resolution == 224  # torchvision's size by default


@pytest.mark.parametrize("tower", sorted(TORCHVISION_TOWERS))
def test_every_tower_builds_and_its_config_describes_it(tower):
    from clipcli.models.factory import create_model
    from clipcli.train.backbones import backbone_config

    config = backbone_config(tower, dict(embed_dim=16, context_length=77, vocab_size=49408, transformer_width=64,
                                         transformer_heads=1, transformer_layers=1))
    with torch.device("meta"):
        model = create_model(config, initialize=False)
    assert model.visual.proj.weight.shape == (16, config.vision_width)
    assert not [k for k in model.state_dict() if k.startswith(("visual.trunk.fc.", "visual.trunk.heads.",
                                                                "visual.trunk.classifier.2."))]


def test_unknown_towers_and_configs_that_do_not_describe_theirs_are_refused():
    with pytest.raises(InputError, match="'torchvision:alexnet' is not an image tower.*torchvision:resnet50"):
        tiny("torchvision:alexnet")
    with pytest.raises(InputError, match="^image_size 40 is not a multiple of torchvision:vit_b_16's patch size 16"):
        tiny("vit_b_16", image_size=40)
    stored = json.loads(config_to_json(tiny()[0].config))
    for change, message in (({"image_tower": "torchvision:resnet9"}, "is not an image tower clipcli builds"),
                            ({"vision_width": 2048}, "vision_width 2048 \\(a torchvision:resnet18 has 512\\)"),
                            ({"image_tower": 7}, "image_tower is 7, not a string")):
        with pytest.raises(CheckpointError, match=message):
            config_from_json(json.dumps({**stored, **change}), "run/last.safetensors")


def test_parameter_groups_are_those_open_clip_locks_on_the_timm_network():
    """open_clip's TimmModel.lock groups a trunk with timm's fine-grained group_matcher: the same
    groups, parameter for parameter on ResNet (the same names), size for size on ConvNeXt and ViT."""
    timm = pytest.importorskip("timm")
    from timm.models import group_parameters

    from clipcli.models.torchvision_tower import TorchvisionTower

    for ours, theirs in (("resnet50", "resnet50"), ("convnext_tiny", "convnext_tiny"),
                         ("vit_b_16", "vit_base_patch16_224")):
        with torch.device("meta"):
            tower = TorchvisionTower(ours, 8, 224)
            network = timm.create_model(theirs, pretrained=False, num_classes=0)
        groups = group_parameters(network, network.group_matcher())
        expected = [groups[i] for i in sorted(groups)]
        sizes = [sum(network.get_parameter(n).numel() for n in names) for names in expected]
        assert [sum(tower.trunk.get_parameter(n).numel() for n in names) for names in tower.groups()] == sizes, ours
        if ours == "resnet50":
            assert tower.groups() == expected


def test_a_training_step_changes_only_the_unlocked_parameters_and_frozen_batchnorm_stays_put(one_thread):
    model, _, _ = tiny()
    lock_image_trunk(model, unlocked_groups=1)  # resnet18: the stem and 8 blocks; layer4.1 trains
    lock_text_tower(model)
    model.train()
    trunk = model.visual.trunk
    assert not trunk.bn1.training and not trunk.layer4[0].bn1.training and trunk.layer4[1].bn1.training
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {f"visual.trunk.{n}" for n, _ in trunk.layer4[1].named_parameters(prefix="layer4.1")} \
        | {"visual.proj.weight", "text_projection", "logit_scale"}
    assert trainable_summary(model).startswith("image 4,737,024 of 11,192,896 parameters train, text 2,048 of")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    loss = contrastive_loss(model.encode_image(torch.randn(4, 3, 32, 32), normalize=True),
                            model.encode_text(tokens(4), normalize=True), model.logit_scale.exp())
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    statistics = {k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed - statistics == trains
    assert statistics and all(k.startswith("visual.trunk.layer4.1.") for k in statistics)  # the unlocked block's only


def test_a_whole_locked_trunk_keeps_its_statistics_in_train_mode_unless_asked_not_to(one_thread):
    images = torch.randn(4, 3, 32, 32)
    for freeze_bn_stats in (True, False):
        model, _, _ = tiny()
        lock_image_trunk(model, freeze_bn_stats=freeze_bn_stats)
        assert [n for n, p in model.visual.named_parameters() if p.requires_grad] == ["proj.weight"]
        model.eval().train()  # train() again: a frozen layer stays in eval mode
        before = {k: v.clone() for k, v in model.visual.state_dict().items()}
        with torch.no_grad():
            model.encode_image(images)
        moved = [k for k, v in model.visual.state_dict().items() if not torch.equal(before[k], v)]
        norms = [m for m in model.visual.trunk.modules() if isinstance(m, BATCHNORM)]
        if freeze_bn_stats:
            assert moved == [] and not any(m.training for m in norms) and model.visual.proj.training
        else:
            assert len(moved) == 3 * len(norms) and all(m.training for m in norms)
    with pytest.raises(InputError, match="10: the resnet18 trunk has 9 groups"):
        lock_image_trunk(model, unlocked_groups=10)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_state_dict_file_are_loaded_as_they_are(tmp_path, suffix):
    from safetensors.torch import save_file

    state = random_resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model, notes, _ = tiny(pretrained=path)
    trunk = model.visual.trunk.state_dict()
    assert trunk.keys() == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(trunk[k], state[k]) for k in trunk) and any(str(path) in note for note in notes)
    with pytest.raises(InputError, match="is not a state dict of torchvision's resnet18: missing keys: layer1.0"):
        tiny("resnet18", pretrained=_without(state, "layer1.0.", tmp_path))
    with pytest.raises(InputError, match="neither 'imagenet' nor a state-dict file"):
        tiny(pretrained=tmp_path / "missing.pth")


def _without(state: dict, prefix: str, folder: Path) -> Path:
    path = folder / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith(prefix)}, path)
    return path


def test_imagenet_weights_come_from_the_torch_hub_cache_and_offline_the_error_names_the_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tries = []

    def unreachable(url, dst, *args, **kwargs):
        tries.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    with pytest.raises(InputError) as offline:  # conftest sets CLIPCLI_OFFLINE: nothing is tried
        tiny(pretrained="imagenet")
    assert "offline" in str(offline.value) and url in str(offline.value) and str(cached) in str(offline.value)
    assert tries == []
    monkeypatch.delenv("CLIPCLI_OFFLINE")
    with pytest.raises(InputError, match="cannot download torchvision's weights for resnet18 .*no network in tests"):
        tiny(pretrained="imagenet")
    assert tries == [url]
    cached.parent.mkdir(parents=True, exist_ok=True)
    state = random_resnet18_state(seed=3)
    torch.save(state, cached)
    model, notes, _ = tiny(pretrained="imagenet")
    assert torch.equal(model.visual.trunk.conv1.weight, state["conv1.weight"]) and tries == [url]
    assert any("ImageNet" in note and str(cached) in note for note in notes)


def test_the_text_tower_and_embedding_size_come_from_a_clip_checkpoint(tiny_vit_checkpoint):
    import clipcli

    source = clipcli.load(tiny_vit_checkpoint, device="cpu")[0]
    model, notes, files = tiny(text_init=str(tiny_vit_checkpoint), embed_dim=None)
    assert model.config.embed_dim == source.config.embed_dim and files == {}
    text = {k: v for k, v in source.state_dict().items() if not k.startswith("visual.") and k != "logit_scale"}
    assert text and all(torch.equal(model.state_dict()[k], v) for k, v in text.items())
    assert model.config.transformer_layers == source.config.transformer_layers
    other, notes, _ = tiny(text_init=str(tiny_vit_checkpoint), embed_dim=source.config.embed_dim + 8)
    assert other.text_projection.shape[1] == source.config.embed_dim + 8 and any("projection: new" in n for n in notes)
    assert torch.equal(other.token_embedding.weight, source.token_embedding.weight)


def test_a_saved_run_loads_with_the_same_outputs_and_classifies_through_the_cli(tmp_path, sample_images):
    import clipcli
    from clipcli.loading import load_model

    model, _, _ = tiny(pretrained=None)
    model.eval()
    path = tmp_path / "run" / "last.safetensors"
    path.parent.mkdir()
    save_checkpoint(model, path, {METADATA_KEY: model.config})
    loaded = load_model(path)
    assert loaded.config == model.config
    images, text = torch.randn(3, 3, 32, 32), tokens(3)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-6)
        assert torch.allclose(loaded.encode_text(text), model.encode_text(text), atol=1e-6)
    _, preprocess = clipcli.load(path, device="cpu")
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == IMAGENET_MEAN and preprocess.transforms[0].size == 32
    folder = sample_images[0].parent
    result = runner.invoke(app, ["classify", str(folder), "--model", str(path), "--labels", "a cat,a rocket",
                                 "--device", "cpu", "--format", "jsonl", "--quiet", "--workers", "0"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(sample_images) and {r["label"] for r in records} <= {"a cat", "a rocket"}
    state = {k: v for k, v in loaded.state_dict().items()}
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):  # without its config the shapes say nothing
        build_model(state)


@pytest.mark.slow
def test_a_vit_at_another_resolution_takes_224_px_weights_with_its_position_embeddings_interpolated(tmp_path):
    """torchvision's ViT weights are for 224 px; at 32 px the 14 x 14 grid of position embeddings
    becomes 2 x 2 (torchvision's interpolate_embeddings), every other tensor is taken as it is."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.vit_b_32(weights=None).state_dict()
    path = tmp_path / "vit_b_32.pth"
    torch.save(state, path)
    del state
    state = torch.load(path, weights_only=True)
    model, _, _ = tiny("vit_b_32", pretrained=path, image_size=64)
    trunk = model.visual.trunk.state_dict()
    assert trunk["encoder.pos_embedding"].shape == (1, 5, 768) and state["encoder.pos_embedding"].shape == (1, 50, 768)
    assert all(torch.equal(trunk[k], state[k]) for k in trunk if k != "encoder.pos_embedding")
    assert torch.equal(trunk["encoder.pos_embedding"][:, 0], state["encoder.pos_embedding"][:, 0])  # the class token's
    with torch.no_grad():
        assert model.eval().encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 32)


@pytest.mark.parametrize("tower", ["resnet18", pytest.param("convnext_tiny", marks=pytest.mark.slow),
                                   pytest.param("vit_b_16", marks=pytest.mark.slow)])
def test_gradient_checkpointing_gives_the_same_features_gradients_and_statistics(tower, one_thread):
    """Recomputing each stage (ViT block) in the backward pass changes nothing but memory: the
    trunk's forward done step by step equals torchvision's, BatchNorm statistics move once."""
    images = torch.randn(4, 3, 32, 32)
    runs = []
    for checkpointing in (False, True):
        model, _, _ = tiny(tower)
        lock_image_trunk(model, unlocked_groups=2)
        model.train()
        model.set_grad_checkpointing(checkpointing)
        features = model.encode_image(images)
        features.square().sum().backward()
        grads = {n: p.grad for n, p in model.visual.named_parameters() if p.requires_grad}
        runs.append((features.detach(), grads, model.visual.state_dict()))
    (plain, plain_grads, plain_state), (again, grads, state) = runs
    assert torch.allclose(again, plain, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and len(grads) > 1
    assert all(torch.allclose(grads[n], plain_grads[n], atol=1e-5, rtol=1e-4) for n in grads)
    assert all(torch.allclose(state[k].float(), plain_state[k].float(), atol=1e-6) for k in state)
