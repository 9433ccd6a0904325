"""Whole training runs through the CLI: shards in, checkpoints every N steps kept and resumed
from (mid-epoch included) exactly, the run's options kept on resume, the recipe's stated
adjustments, TensorBoard, a torchvision backbone trained and classified with, and two gloo
processes on shards equal to one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.train import shapes

runner = CliRunner()
SMALL = ["--arch", "tiny", "--vision-layers", "1", "--text-layers", "1", "--lr", "1e-3", "--log-every", "1"]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return shapes.make_dataset(tmp_path_factory.mktemp("shapes"), train=96, test=24, seed=0, txt=True)


@pytest.fixture(scope="module")
def shards(shapes_data) -> str:
    """The 96 training pairs as 4 shards of 24 (examples/make_shards.py), with sizes.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from make_shards import write_shards

    write_shards(shapes_data / "train", shapes_data / "shards", 24)
    return str(shapes_data / "shards" / "{00000..00003}.tar")


def train(*args: str, ok: bool = True):
    result = runner.invoke(app, ["train", "--workers", "0", "--device", "cpu", *args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resume_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(shards, shapes_data, tmp_path, one_thread):
    run = tmp_path / "run"
    # 96 samples, batch 16 x 2 accumulated: 3 steps per epoch; a checkpoint every 2 steps lands mid-epoch
    train("--train-data", shards, "--val-data", str(shapes_data / "val.csv"), *SMALL, "--epochs", "2",
          "--batch-size", "16", "--accum-freq", "2", "--save-every-n-steps", "2", "--warmup", "1", "-o", str(run))
    names = sorted(p.name for p in run.glob("step_*.safetensors"))
    assert names == [f"step_{s:08d}.safetensors" for s in (2, 3, 4, 6)]  # every 2 steps and each epoch's end
    assert worst(weights(run / "last.safetensors"), weights(run / "step_00000006.safetensors")) == 0
    final, metrics = weights(run / "last.safetensors"), records(run)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]

    again = tmp_path / "again"
    shutil.copytree(run, again)
    refused = train("--resume-from", "step_00000002.safetensors", "--batch-size", "8", "-o", str(again), ok=False)
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --batch-size 8: the checkpoint is 4 batches into")
    # step 2 is mid-epoch 1 (batches 0-3 of 6 read); --resume-from needs nothing but the run folder
    result = train("--resume-from", str(again / "step_00000002.safetensors"), "-o", str(again))
    assert "removed the later checkpoint step_00000003.safetensors" in result.stderr
    assert worst(weights(again / "last.safetensors"), final) < 1e-6
    assert [r["step"] for r in records(again)] == [1, 2, 3, 4, 5, 6]  # the replayed steps once, not twice
    assert [r["loss"] for r in records(again)] == pytest.approx([r["loss"] for r in metrics], abs=1e-6)
    assert [r["val/image_to_text_R@1"] for r in records(again, "eval")] == pytest.approx(
        [r["val/image_to_text_R@1"] for r in records(run, "eval")], abs=1e-6)  # the original --val-data, kept
    config = json.loads((again / "config.json").read_text())
    assert config["train"]["val_data"] == str(shapes_data / "val.csv") and config["resumes"][0]["step"] == 2


def test_resume_keeps_the_runs_options_and_records_what_changed(shapes_data, tmp_path, one_thread):
    run = tmp_path / "run"
    csv = str(shapes_data / "train.csv")
    train("--train-data", csv, "--val-data", str(shapes_data / "val.csv"), *SMALL, "--epochs", "1", "--batch-size", "32",
          "--keep", "1", "-o", str(run))
    original = json.loads((run / "config.json").read_text())["train"]
    train("--resume", "--epochs", "2", "-o", str(run))  # no --train-data, --val-data or --batch-size: the run's own
    config = json.loads((run / "config.json").read_text())
    assert config["train"] == original
    assert config["resumes"] == [{"step": 3, "changed": {"epochs": {"was": 1, "now": 2}}, "world_size": 1}]
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    assert len(records(run, "eval")) == 2 and "val/image_to_text_R@1" in records(run, "eval")[-1]
    assert [p.name for p in run.glob("step_*.safetensors")] == ["step_00000006.safetensors"]  # --keep 1
    again = train("--resume", "-o", str(run))  # the first resume's --epochs 2 is the run's now
    assert "already finished 2 epochs" in again.stderr and len(records(run)) == 6
    noted = train("--resume", "--epochs", "3", "--seed", "7", "-o", str(run))
    assert "the run keeps its own seed (0), not 7" in noted.stderr and len(records(run)) == 9


def test_the_recipe_says_what_it_adjusts_and_logs_each_steps_own_rate(shapes_data, tmp_path, one_thread):
    csv = str(shapes_data / "train.csv")
    # 96 pairs at batch 40: 2 steps per epoch, 16 pairs left out, and said; the default warmup is cut to a tenth
    result = train("--train-data", csv, *SMALL, "--epochs", "2", "--batch-size", "40", "-o", str(tmp_path / "a"))
    assert "16 sample(s) do not fill a last batch of 40" in result.stderr
    assert "warming up over 1 steps instead" in result.stderr
    # each step's own rate (1 warmup step, then cosine over 3), not the next step's: 1, 0.75, 0.25, 0 would be
    assert [r["lr"] for r in records(tmp_path / "a")] == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3])
    train("--train-data", csv, *SMALL, "--epochs", "1", "--batch-size", "40", "--no-drop-last", "-o", str(tmp_path / "b"))
    assert len(records(tmp_path / "b")) == 3  # 40 + 40 + 16
    refused = train("--train-data", csv, *SMALL, "--epochs", "2", "--batch-size", "40", "--warmup", "4",
                    "-o", str(tmp_path / "c"), ok=False)
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --warmup 4 is not shorter than the run's 4 steps")
    assert not (tmp_path / "c").exists()


def test_tensorboard_gets_the_same_numbers_as_metrics_jsonl(shards, tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train("--train-data", shards, *SMALL, "--epochs", "1", "--batch-size", "32", "--warmup", "1",
          "--report-to", "tensorboard", "-o", str(run))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records(run)]


def test_a_torchvision_backbone_trains_its_projections_and_classifies(shapes_data, tmp_path, one_thread):
    import torchvision

    trunk = torchvision.models.resnet18(weights=None)
    torch.save(trunk.state_dict(), tmp_path / "resnet18.pth")
    run = tmp_path / "run"
    checkpoint = train("--train-data", str(shapes_data / "train"), "--image-tower", "torchvision:resnet18",
                       "--image-pretrained", str(tmp_path / "resnet18.pth"), "--image-size", "32", "--embed-dim", "32",
                       *SMALL, "--epochs", "2", "--batch-size", "32", "--lock-image", "--lock-text",
                       "-o", str(run)).stdout.strip()
    saved = weights(Path(checkpoint))
    original = trunk.state_dict()
    kept = [name for name in original if not name.startswith("fc.")]  # the classifier is left out
    for name in kept:  # the frozen trunk, BatchNorm statistics included, is the file's
        assert torch.equal(saved[f"visual.trunk.{name}"], original[name]), name
    first = weights(run / "step_00000003.safetensors")  # after epoch 1 of 2: only the projections (and the scale) moved
    moved = {k for k in saved if not torch.equal(saved[k], first[k])}
    assert moved == {"visual.proj.weight", "text_projection", "logit_scale"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["image_tower"] == "torchvision:resnet18"
    result = runner.invoke(app, ["classify", str(shapes_data / "zeroshot"), "-m", checkpoint, "--labels",
                                 "red circle,blue square", "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 24 and all(row["label"] in ("red circle", "blue square") for row in rows)


@pytest.mark.slow
def test_two_gloo_processes_on_shards_equal_one_process_with_two_readers(shards, tmp_path):
    """Reading is split over processes x workers; 2 processes x 1 worker read and train exactly as
    1 process x 2 workers."""
    import os

    common = ["--train-data", shards, *SMALL, "--epochs", "2", "--batch-size", "16", "--warmup", "1", "--quiet",
              "--device", "cpu", "--save-every-n-steps", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "clipcli", "train", *common, "--workers", "2", "-o", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "clipcli"]
    two = subprocess.run([*torchrun, "train", *common, "--workers", "1", "-o", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert [r["loss"] for r in records(tmp_path / "two")] == pytest.approx(
        [r["loss"] for r in records(tmp_path / "one")], abs=1e-5)
    assert worst(weights(tmp_path / "one" / "last.safetensors"), weights(tmp_path / "two" / "last.safetensors")) < 1e-5
