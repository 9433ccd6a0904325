"""Evaluation during training on every rank (CSV or shards, gathered) and the metrics reporter.

The val set is 13 readable shape images with captions, one undecodable image and (in the
shards) one sample without caption, as a CSV and as three shards of the same samples in the
same order. Pixel (0, 0) of image ``i`` is grey level ``10 + 15 i`` and its caption ends in
``pair i``, so that a fake model reading only those (``Matcher``) pairs every image with its
caption: any mix-up of rows between ranks or data workers shows as a recall below 1.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from shard_files import write_shard

from clipcli.errors import InputError
from clipcli.preprocess import preprocess_for
from clipcli.train import shapes
from clipcli.train.data import SkipReporter, caption_tokenizer
from clipcli.train.evaluate import evaluate, val_source
from clipcli.train.model import model_config, new_model
from clipcli.train.report import Reporter, check_report_to, scalars

PAIRS, BROKEN_AT = 13, 5  # the undecodable image is row 5 of the CSV


# ----------------------------------------------------------------------------- data and models


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> Path:
    """``val.csv``, ``shards/{0..2}.tar`` and ``zeroshot/<class>/`` (one broken image there too)."""
    import random

    root = tmp_path_factory.mktemp("val")
    rng = random.Random(0)
    samples = []  # (key, image bytes, caption or None)
    for i in range(PAIRS):
        colour, shape = rng.choice(list(shapes.COLOURS)), rng.choice(shapes.SHAPES)
        image = shapes.draw(colour, shape, rng.random() < 0.5, 32, rng)
        image.putpixel((0, 0), (10 + 15 * i,) * 3)
        samples.append((f"{i:03d}", _png(image), f"a {colour} {shape}, pair {i}"))
    samples.insert(BROKEN_AT, ("broken", b"not a png", "a broken image, pair 99"))
    (root / "images").mkdir()
    with open(root / "val.csv", "w", newline="") as file:
        rows = csv.writer(file)
        rows.writerow(["filepath", "title"])
        for key, data, caption in samples:
            (root / "images" / f"{key}.png").write_bytes(data)
            rows.writerow([f"images/{key}.png", caption])
    samples.insert(9, ("uncaptioned", samples[0][1], None))  # only in the shards
    (root / "shards").mkdir()
    for number, part in enumerate((samples[:6], samples[6:11], samples[11:])):
        write_shard(root / "shards" / f"{number}.tar", [
            member for key, data, caption in part
            for member in [(f"{key}.png", data)] + ([(f"{key}.txt", caption.encode())] if caption else [])])
    for k in range(12):
        colour, shape = list(shapes.COLOURS)[k % 4], shapes.SHAPES[(k // 4) % 3]
        folder = root / "zeroshot" / f"{colour}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        shapes.draw(colour, shape, rng.random() < 0.5, 32, rng).save(folder / f"{k:02d}.png")
    (root / "zeroshot" / "red_circle" / "zz.png").write_bytes(b"not a png either")
    return root


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return new_model(model_config("tiny", {}, None, None)).eval()


def grey_level(image) -> torch.Tensor:
    """The fake model's transform: pixel (0, 0) as a (1, 1, 1) tensor."""
    return torch.tensor(float(image.convert("L").getpixel((0, 0)))).view(1, 1, 1)


def pair_number(texts) -> torch.Tensor:
    """The fake model's tokenizer: the number that ends a caption."""
    return torch.tensor([[int(text.rsplit(" ", 1)[-1])] for text in texts])


class Matcher(torch.nn.Module):
    """Image ``i`` (its grey level) and caption ``pair i`` both encode to one-hot ``i``."""

    context_length = 1

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        number = ((images[:, 0, 0, 0] - 10) / 15).round().long()
        return torch.nn.functional.one_hot(number, 16).float()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens[:, 0], 16).float()


def run(clip, val: str | None, zeroshot: str | None = None, *, transform=None, tokenize=None, workers: int = 0,
        rank: int = 0, world_size: int = 1) -> tuple[dict, list[str]]:
    """``evaluate`` at batch 4, and what it reported as skipped."""
    messages: list[str] = []
    metrics = evaluate(clip, val_data=val, zeroshot_dir=zeroshot, templates=["a photo of a {}."],
                       transform=transform or preprocess_for(clip.config), tokenize=tokenize or caption_tokenizer(clip),
                       device=torch.device("cpu"), precision_ctx=None, batch_size=4, workers=workers,
                       skips=SkipReporter(messages.append), rank=rank, world_size=world_size)
    return metrics, messages


# ----------------------------------------------------------------------------- one process


def test_shards_and_the_csv_of_the_same_pairs_give_the_same_recall(val_data, tiny, one_thread):
    from_csv, csv_skips = run(tiny, str(val_data / "val.csv"))
    from_shards, shard_skips = run(tiny, str(val_data / "shards" / "{0..2}.tar"))
    assert from_csv["val/pairs"] == from_shards["val/pairs"] == PAIRS
    recalls = {f"val/{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert set(from_csv) == set(from_shards) == recalls | {"val/pairs"}
    assert from_shards == pytest.approx(from_csv, abs=1e-6)
    assert [m.split(":")[0] for m in csv_skips] == [f"skipping {val_data / 'images' / 'broken.png'}"]
    shards = str(val_data / "shards")
    assert sorted(m.split(": ")[0] for m in shard_skips) == [f"skipping {shards}/0.tar:broken",
                                                            f"skipping {shards}/1.tar:uncaptioned"]
    assert any("no caption" in m for m in shard_skips)


def test_matching_features_give_perfect_recall_whatever_the_split(val_data, one_thread):
    """The human-readable check: with features that pair exactly, every recall is 1, for the CSV
    and for shards read by two data workers (each reading whole shards, rows put back in order)."""
    for source, workers in (("val.csv", 0), ("shards/{0..2}.tar", 0), ("shards/{0..2}.tar", 2)):
        metrics, _ = run(Matcher(), str(val_data / source), transform=grey_level, tokenize=pair_number, workers=workers)
        assert metrics.pop("val/pairs") == PAIRS
        assert set(metrics.values()) == {1.0}, (source, workers, metrics)


def test_zero_shot_skips_a_bad_image_and_the_model_keeps_its_modes(val_data, tiny, one_thread):
    tiny.train()
    tiny.visual.eval()  # as a frozen tower may be kept
    metrics, skips = run(tiny, None, str(val_data / "zeroshot"))
    assert (metrics["zeroshot/images"], metrics["zeroshot/classes"]) == (12, 12)
    assert 0 <= metrics["zeroshot/top1"] <= metrics["zeroshot/top5"] <= 1
    assert len(skips) == 1 and skips[0].startswith(f"skipping {val_data / 'zeroshot' / 'red_circle' / 'zz.png'}: ")
    assert tiny.training and not tiny.visual.training and tiny.transformer.training
    tiny.eval()


def test_val_source_checks_before_training(val_data, tmp_path):
    assert len(val_source(str(val_data / "shards" / "{0..2}.tar"))) == 3
    assert len(val_source(str(val_data / "val.csv"))) == PAIRS + 1
    with pytest.raises(InputError, match="no shard matches"):
        val_source(str(tmp_path / "{0..1}.tar"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_that_cannot_be_read_stops_the_evaluation_in_one_line(val_data, tmp_path, workers):
    from clipcli.webdataset import ShardError

    (tmp_path / "1.tar").mkdir()  # listed, but not readable as a file
    for number in (0, 2):
        (tmp_path / f"{number}.tar").symlink_to(val_data / "shards" / f"{number}.tar")
    with pytest.raises(ShardError) as raised:
        run(Matcher(), str(tmp_path / "{0..2}.tar"), transform=grey_level, tokenize=pair_number, workers=workers)
    assert str(raised.value) == f"cannot read shard {tmp_path / '1.tar'}: Is a directory"


# ----------------------------------------------------------------------------- two processes


def _evaluate_on_rank(rank: int, world_size: int, store: str, out: str, jobs: list[dict]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = [run(rank=rank, world_size=world_size, **job) for job in jobs]
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_two_gloo_processes_give_the_metrics_of_one(val_data, tiny, tmp_path, one_thread):
    """Each rank encodes its share (7 and 6 pairs, the bad image in one share), features gathered
    and put back in order: the metrics of one process, to 1e-6; each bad image reported once."""
    jobs = [dict(clip=tiny, val=str(val_data / "val.csv"), zeroshot=str(val_data / "zeroshot")),
            dict(clip=tiny, val=str(val_data / "shards" / "{0..2}.tar")),
            dict(clip=Matcher(), val=str(val_data / "shards" / "{0..2}.tar"), transform=grey_level,
                 tokenize=pair_number)]
    torch.multiprocessing.spawn(_evaluate_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path), jobs), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for job, (zero, one) in zip(jobs, zip(*ranks)):
        alone, skips = run(**job)
        assert zero[0] == one[0]  # every rank returns the same
        assert zero[0] == pytest.approx(alone, abs=1e-6)
        assert sorted(zero[1] + one[1]) == sorted(skips) and not set(zero[1]) & set(one[1])
    assert set(ranks[0][2][0].values()) == {1.0, PAIRS}


# ----------------------------------------------------------------------------- the reporter


def _tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _train_record(step: int, loss: float) -> dict:
    return {"kind": "train", "epoch": 1, "step": step, "loss": loss, "grad_norm": 0.5, "lr": 1e-3,
            "logit_scale": 14.0, "samples_per_second": 100.0}


def test_a_record_lands_in_metrics_jsonl_and_in_tensorboard(tmp_path):
    evaluation = {"kind": "eval", "epoch": 1, "step": 2, "val/image_to_text_R@1": 0.25, "zeroshot/top1": 0.5,
                  "zeroshot/images": 12, "skipped_images": 1, "note": "text is not a scalar", "flag": True}
    with Reporter(tmp_path, enabled=True, report_to=["tensorboard"]) as reporter:
        for record in (_train_record(1, 2.0), _train_record(2, 1.5), evaluation):
            reporter.write(record)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [_train_record(1, 2.0), _train_record(2, 1.5), evaluation]
    scalars_written = _tensorboard(tmp_path)
    assert scalars_written["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert {"train/lr", "train/grad_norm", "train/logit_scale", "train/samples_per_second"} <= set(scalars_written)
    assert scalars_written["val/image_to_text_R@1"] == [(2, 0.25)] and scalars_written["zeroshot/top1"] == [(2, 0.5)]
    assert scalars_written["eval/skipped_images"] == [(2, 1.0)]
    assert set(scalars(evaluation)) == {"val/image_to_text_R@1", "zeroshot/top1", "zeroshot/images",
                                        "eval/skipped_images"}


def test_resume_at_drops_the_records_a_resumed_run_replays(tmp_path):
    with Reporter(tmp_path, enabled=True, report_to=["tensorboard"]) as reporter:
        for step in (1, 2, 3, 4):
            reporter.write(_train_record(step, 4.0 - step))
        reporter.write({"kind": "eval", "epoch": 1, "step": 2, "val/pairs": 13})
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"kind": "train", "ep')  # a line a killed run left half written
    with Reporter(tmp_path, enabled=True, report_to=["tensorboard"]) as reporter:
        reporter.resume_at(2)
        reporter.write(_train_record(3, 9.0))
    steps = [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("train", 1), ("train", 2), ("eval", 2), ("train", 3)]
    assert _tensorboard(tmp_path)["train/loss"] == [(1, 3.0), (2, 2.0), (3, 9.0)]


def test_only_an_enabled_reporter_writes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    reporter = Reporter(out, enabled=False, report_to=["tensorboard"])
    reporter.resume_at(0)
    reporter.write(_train_record(1, 1.0))
    reporter.close()
    assert list(out.iterdir()) == []


def test_report_targets_are_checked_before_training(monkeypatch):
    import importlib.util

    assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert check_report_to("none") == check_report_to(None) == []
    with pytest.raises(InputError, match="'wandb' is not a report target; choose from tensorboard"):
        check_report_to("tensorboard,wandb")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else find_spec(name, *rest))
    with pytest.raises(InputError, match="pip install tensorboard"):
        check_report_to(["tensorboard"])
