"""Training: the loss, optimiser groups, schedule, data, Mixer encoders, and a run that learns.

The demonstration trains the tiny preset on synthetic coloured shapes for well under a minute
per encoder type on CPU and then classifies held-out shapes zero-shot through ``clipcli
classify`` on the saved checkpoint: accuracy must be at least three times chance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.models.clip import CLIP, CLIPConfig
from clipcli.models.factory import build_model, create_model
from clipcli.train import shapes
from clipcli.train.data import GlobalBatches, read_pairs
from clipcli.train.evaluate import recall_at_k
from clipcli.train.loss import contrastive_loss
from clipcli.train.optim import build_optimizer, warmup_cosine

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
runner = CliRunner()


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return shapes.make_dataset(tmp_path_factory.mktemp("shapes"), train=960, test=240, seed=0)


def small_csv(shapes_data: Path, folder: Path, rows: int) -> Path:
    """The first ``rows`` training pairs of the shapes set, as a CSV in another folder."""
    lines = (shapes_data / "train.csv").read_text().splitlines()[: rows + 1]
    path = folder / "small.csv"
    path.write_text("\n".join(lines).replace("train/", str(shapes_data / "train") + "/") + "\n")
    return path


def train_cli(*args: str) -> str:
    result = runner.invoke(app, ["train", "--workers", "0", "--quiet", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout.strip()


# ----------------------------------------------------------------------------- pieces


def test_loss_is_symmetric_cross_entropy_and_small_for_matching_pairs():
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(1 / 0.07)
    logits = scale * features @ features.t()
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(8)) * 2) / 2
    assert torch.allclose(contrastive_loss(features, features, scale), expected)
    shuffled = features[torch.randperm(8)]
    assert contrastive_loss(features, features, scale) < contrastive_loss(features, shuffled, scale)
    assert math.isclose(CLIP(CLIPConfig(**TINY)).logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)


def test_weight_decay_as_open_clip_applies_it_embeddings_included():
    model = CLIP(CLIPConfig(**TINY))
    names = {id(p): n for n, p in model.named_parameters()}

    def split(optimizer):
        decay, no_decay = optimizer.param_groups
        assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.2
        return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}

    decayed, exempt = split(build_optimizer(model, 1e-3, 0.2))
    # open_clip_train's rule (main.py): exclude p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in the name
    open_clip_exempt = {n for n, p in model.named_parameters()
                        if p.ndim < 2 or any(part in n for part in ("bn", "ln", "bias", "logit_scale"))}
    assert exempt == open_clip_exempt and decayed == set(names.values()) - open_clip_exempt
    assert {"token_embedding.weight", "positional_embedding", "visual.positional_embedding", "text_projection",
            "visual.proj", "visual.conv1.weight"} <= decayed
    assert {"logit_scale", "visual.class_embedding", "ln_final.weight", "ln_final.bias"} <= exempt
    decayed, exempt = split(build_optimizer(model, 1e-3, 0.2, decay_embeddings=False))  # the old exemption, kept as an option
    assert {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"} <= exempt
    assert all("embedding" not in n for n in decayed)


def test_adam_betas_and_eps_by_architecture_as_open_clip():
    from clipcli.train.model import is_vit, model_config
    from clipcli.train.optim import default_adam

    assert default_adam(is_vit(model_config("ViT-B/32", {}, None, None))) == (0.9, 0.98, 1e-6)
    assert default_adam(is_vit(model_config("siglip-tiny", {}, None, None))) == (0.9, 0.98, 1e-6)
    assert default_adam(is_vit(model_config("RN50", {}, None, None))) == (0.9, 0.999, 1e-8)
    assert default_adam(is_vit(model_config("tiny", {}, "mixer", None))) == (0.9, 0.999, 1e-8)


def test_warmup_then_cosine():
    factor = warmup_cosine(10, 110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)


def test_recall_at_k():
    images = torch.eye(4)
    texts = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.6, 0.8], [0, 0, 0.8, 0.6]])  # 2 and 3 swapped-ish
    metrics = recall_at_k(images, texts, ks=(1, 2))
    assert metrics == {"image_to_text_R@1": 0.5, "image_to_text_R@2": 1.0, "text_to_image_R@1": 0.5, "text_to_image_R@2": 1.0}


def test_global_batches_give_each_rank_a_slice_of_the_same_batch():
    one = list(GlobalBatches(10, 4, seed=3))
    ranks = [list(GlobalBatches(10, 4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(one) == 2 and all(len(b) == 4 for b in one)
    assert [a + b for a, b in zip(*ranks)] == one


def test_pairs_from_tsv_and_from_a_folder(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("a black square\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "no-caption.png")
    (tmp_path / "data.tsv").write_text("path\ttext\nimgs/a.png\ta dark image\n")
    [pair] = read_pairs(tmp_path / "data.tsv", "path", "text")
    assert pair.image == tmp_path / "imgs" / "a.png" and pair.caption == "a dark image"
    [pair] = read_pairs(tmp_path / "imgs")
    assert pair.caption == "a black square"
    result = runner.invoke(app, ["train", "--train-data", str(tmp_path / "data.tsv"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no column 'filepath'" in result.stderr and "--img-key" in result.stderr


def test_mixer_text_encoder_is_causal_and_checkpoints_describe_themselves():
    torch.manual_seed(0)
    model = create_model(CLIPConfig(**TINY, vision_mixer=True, text_mixer=True)).eval()
    text = torch.zeros(2, 77, dtype=torch.long)
    text[0, :3] = torch.tensor([49406, 320, 49407])
    text[1, :3] = torch.tensor([49406, 320, 49407])
    text[1, 3:6] = torch.tensor([1000, 1001, 1002])  # tokens after EOT must not matter
    text[1, 2] = 49407
    features = model.encode_text(text)
    assert torch.allclose(features[0], features[1], atol=1e-5)
    assert torch.allclose(model.encode_text(text[:1])[0], features[0], atol=1e-5)
    rebuilt = build_model(dict(model.state_dict()))
    assert rebuilt.config == model.config
    image = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt.encode_image(image), model.encode_image(image))


# ----------------------------------------------------------------------------- runs


def zeroshot_accuracy_via_cli(checkpoint: Path, zeroshot: Path) -> float:
    labels = shapes.classes()
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    if "classify" not in commands:  # pragma: no cover - the classify command lands separately
        import clipcli
        from clipcli.train.evaluate import zeroshot_accuracy

        model, preprocess = clipcli.load(checkpoint, device="cpu")
        return zeroshot_accuracy(model, zeroshot, preprocess, ["a photo of a {}."], torch.device("cpu"))["top1"]
    result = runner.invoke(app, ["classify", str(zeroshot), "--model", str(checkpoint), "--labels", ",".join(labels),
                                 "--device", "cpu", "--format", "jsonl", "--quiet", "--workers", "0"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 240
    right = [Path(r["image"]).parent.name.replace("_", " ") == r["label"] for r in records]
    return sum(right) / len(right)


@pytest.mark.parametrize("encoders", [pytest.param([], marks=pytest.mark.slow), pytest.param(["--image-encoder", "mixer", "--text-encoder", "mixer"],
                                                        marks=pytest.mark.slow)], ids=["transformer", "mixer"])
def test_training_learns_shapes_and_the_checkpoint_classifies_zero_shot(shapes_data, tmp_path, encoders, one_thread):
    out = tmp_path / "run"
    checkpoint = train_cli("--train-data", str(shapes_data / "train.csv"), "--val-data", str(shapes_data / "val.csv"),
                           "--zeroshot-dir", str(shapes_data / "zeroshot"), "--arch", "tiny", *encoders,
                           "--epochs", "6", "--batch-size", "64", "--lr", "1e-3", "--warmup", "10", "--out", str(out))
    assert Path(checkpoint) == out / "last.safetensors"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 6 and losses[-1] < losses[0]
    assert {"val/image_to_text_R@1", "val/text_to_image_R@10", "zeroshot/top1"} <= set(evals[-1])
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vision_mixer"] == bool(encoders) == config["model"]["text_mixer"]
    chance = 1 / len(shapes.classes())
    accuracy = zeroshot_accuracy_via_cli(out / "last.safetensors", shapes_data / "zeroshot")
    print(f"zero-shot accuracy {accuracy:.3f} (chance {chance:.3f})")
    assert accuracy >= 3 * chance


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["contrastive", "sigmoid"])
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(shapes_data, tmp_path, one_thread, loss):
    """torchrun with 2 CPU processes (gloo, DDP; features gathered with gradients for the
    contrastive loss, captions passed round the ring for the sigmoid one) takes the same steps
    as one process: same losses and the same parameters after 4 steps."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    small = small_csv(shapes_data, tmp_path, 32)
    common = ["--train-data", str(small), "--arch", "tiny", "--vision-layers", "1", "--text-layers", "1", "--epochs", "2",
              "--batch-size", "16", "--lr", "1e-4", "--warmup", "2", "--log-every", "1", "--loss", loss,
              "--workers", "0", "--quiet", "--device", "cpu"]
    train_cli(*common[:-2], "--out", str(tmp_path / "one"))  # --workers/--quiet are added by train_cli
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "clipcli", "train"]
    done = subprocess.run(torchrun + common + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(tmp_path / "two" / "last.safetensors")  # printed once, by rank 0

    def logged(run: str, key: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r[key] for r in map(json.loads, lines) if r["kind"] == "train"]

    assert len(logged("one", "loss")) == 4
    assert logged("two", "loss") == pytest.approx(logged("one", "loss"), abs=1e-5)
    # AdamW would hide a gradient off by a constant factor; the gradient norm does not.
    assert logged("two", "grad_norm") == pytest.approx(logged("one", "grad_norm"), rel=1e-4)
    if loss == "sigmoid":
        assert logged("two", "logit_bias") == pytest.approx(logged("one", "logit_bias"), abs=1e-6)
    one, two = (load_file(str(tmp_path / run / "last.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- fine-tuning, resuming, bad data


def test_fine_tune_a_released_checkpoint_with_a_locked_image_tower(tiny_vit_checkpoint, shapes_data, tmp_path, one_thread):
    import clipcli
    from clipcli.checkpoint import read_state_dict

    data = small_csv(shapes_data, tmp_path, 16)
    checkpoint = train_cli("--train-data", str(data), "--init", str(tiny_vit_checkpoint), "--lock-image", "--epochs", "1",
                           "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--out", str(tmp_path / "ft"))
    before = read_state_dict(tiny_vit_checkpoint, dtype=torch.float32)
    model, preprocess = clipcli.load(checkpoint, device="cpu")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("visual."))
    assert not torch.equal(before["text_projection"], after["text_projection"])
    assert model.config == build_model(before).config
    result = runner.invoke(app, ["train", "--train-data", str(data), "--init", str(tiny_vit_checkpoint),
                                 "--text-encoder", "mixer", "--batch-size", "8", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "cannot change a loaded model" in result.stderr


def test_resume_continues_an_interrupted_run_exactly(shapes_data, tmp_path, monkeypatch, one_thread):
    from clipcli.train import data as train_data

    csv_path = small_csv(shapes_data, tmp_path, 16)
    args = ["--train-data", str(csv_path), "--vision-layers", "1", "--text-layers", "1", "--epochs", "2",
            "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--log-every", "1"]
    train_cli(*args, "--out", str(tmp_path / "straight"))

    set_epoch = train_data.GlobalBatches.set_epoch

    def interrupt_at_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        set_epoch(self, epoch)

    monkeypatch.setattr(train_data.GlobalBatches, "set_epoch", interrupt_at_second_epoch)
    result = runner.invoke(app, ["train", "--workers", "0", "--quiet", *args, "--out", str(tmp_path / "resumed")])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    monkeypatch.setattr(train_data.GlobalBatches, "set_epoch", set_epoch)
    again = runner.invoke(app, ["train", "--workers", "0", "--quiet", *args, "--out", str(tmp_path / "resumed")])
    assert again.exit_code == 2 and "--resume" in again.stderr  # never silently overwrites a run
    train_cli(*args, "--out", str(tmp_path / "resumed"), "--resume")

    from safetensors.torch import load_file

    straight, resumed = (load_file(str(tmp_path / run / "last.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_bad_images_are_skipped_and_counted(shapes_data, tmp_path, one_thread):
    csv_path = small_csv(shapes_data, tmp_path, 16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with open(csv_path, "a") as file:
        file.write("broken.png,a broken image\nmissing.png,a missing image\n")
    result = runner.invoke(app, ["train", "--workers", "0", "--train-data", str(csv_path), "--val-data", str(csv_path),
                                 "--vision-layers", "1", "--text-layers", "1", "--epochs", "1", "--batch-size", "9",
                                 "--log-every", "100", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    assert f"skipping {tmp_path / 'broken.png'}:" in result.stderr and f"skipping {tmp_path / 'missing.png'}:" in result.stderr
    [evaluation] = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert evaluation["skipped_images"] == 2


@pytest.mark.parametrize("args, message", [
    (["--arch", "ViT-H/99"], "--arch 'ViT-H/99' is not a preset"),
    (["--arch", "RN50", "--image-encoder", "mixer"], "--image-encoder mixer needs a ViT-shaped arch"),
    (["--image-size", "30"], "image size 30 is not a multiple of the patch size 8"),
    (["--batch-size", "64"], "--batch-size 64 is more than the 16 pairs in"),
    (["--resume"], "nothing to resume: "),
])
def test_user_mistakes_are_one_line_errors(shapes_data, tmp_path, args, message):
    csv_path = small_csv(shapes_data, tmp_path, 16)
    result = runner.invoke(app, ["train", "--train-data", str(csv_path), "--batch-size", "8", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.stderr
