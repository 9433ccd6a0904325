"""The benchmark harness works: it builds its data, every measurement runs and writes its
result, and the summary lines clipcli up against the reference. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_builders(bench, tmp_path):
    from PIL import Image

    files = bench.build_image_set(tmp_path / "web", 3, 96, 72, 85, seed=0)
    assert [f.name for f in files] == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert all(Image.open(f).size == (96, 72) and Image.open(f).format == "JPEG" for f in files)
    assert bench.build_image_set(tmp_path / "web", 3, 96, 72, 85, seed=0) == files  # reused, not rebuilt

    prompts = bench.build_prompts(4)
    assert len(prompts) == 4 * 7 and prompts == bench.build_prompts(4)
    assert prompts[0].startswith("itap of a ") and "{}" not in "".join(prompts)


@pytest.mark.slow
def test_harness_end_to_end(bench, tmp_path, tiny_vit_checkpoint):
    images = tmp_path / "web"
    bench.build_image_set(images, 3, 96, 72, 85, seed=0)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(bench.build_prompts(3)))
    emb = tmp_path / "emb"
    emb.mkdir()
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nrocket\n")

    plan = {
        "model-reference": dict(task="model", impl="reference", batches="1,2"),
        "model-clipcli": dict(task="model", impl="clipcli", batches="1,2"),
        "model-open_clip": dict(task="model", impl="open_clip", batches="1,2"),
        "model-onnxruntime": dict(task="model", impl="onnxruntime", batches="1,2"),
        "text-reference": dict(task="text", impl="reference", prompts=prompts, text_batch=8),
        "text-clipcli": dict(task="text", impl="clipcli", prompts=prompts, text_batch=8),
        "e2e-web-reference": dict(task="e2e", impl="reference", images=images),
        "e2e-web-clipcli-fp32": dict(task="e2e", impl="clipcli", dtype="fp32", images=images),
        "e2e-web-clipcli-bf16": dict(task="e2e", impl="clipcli", dtype="bf16", images=images),
        "cli-web-fp32": dict(task="cli", dtype="fp32", images=images),
        "decode-web": dict(task="decode", images=images),
        "classify": dict(task="classify", images=images, labels=labels),
    }
    measurements = {}
    for label, options in plan.items():
        argv = ["--checkpoint", str(tiny_vit_checkpoint), "--emb", str(emb), "--name", label, "--budget", "0",
                "--result", str(tmp_path / f"{label}.json")]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        bench.child_main(argv)  # in this process: the harness logic, without process start-up costs
        result = json.loads((tmp_path / f"{label}.json").read_text())
        assert "failed" not in result, (label, result)
        result.update(process_wall_s=result["wall_in_process_s"], load_average_before=[0.0, 0.0, 0.0])
        measurements[label] = result

    assert measurements["cli-web-fp32"]["embeddings_read"] == 3
    summary = bench.summarize(measurements, emb, {"web": (3, 96, 72, 85)})
    assert set(summary["model_only"]) >= {"fp32/b1", "fp32/b2", "bf16/b1", "bf16/b2", "fp32/text-b32"}
    assert all(summary["model_only"]["fp32/b2"][impl] > 0 for impl in bench.MODEL_IMPLS)
    assert summary["model_only"]["bf16/b2"]["onnxruntime"] is None  # no bfloat16 on its CPU provider
    assert summary["text"]["ratio"] > 0
    agreement = summary["agreement"]
    # clipcli runs the reference's exact preprocessing and maths: fp32 agrees to rounding.
    assert summary["text"]["pipeline_ratio"] > 0
    assert summary["classify"]["same_labels"] and summary["classify"]["labels"] == 3
    assert summary["classify"]["images"] == 3 and summary["classify"]["cached_s"] > 0
    towers = [f"model-only {tower}-tower {impl} fp32 vs reference fp32" for tower in ("image", "text")
              for impl in ("clipcli", "open_clip", "onnxruntime")]
    for key in ("text clipcli vs reference", "text clipcli pipeline vs reference", *towers,
                "e2e-web-clipcli-fp32 vs reference", "cli-web-fp32 vs reference"):
        assert agreement[key]["min"] > 0.99999, key
        assert agreement[key]["n"] >= 3, key
    assert agreement["e2e-web-clipcli-bf16 vs reference"]["min"] > 0.99
    assert summary["e2e"]["web"]["decode one thread"]["draft_cosine_min"] > 0.99

    report = {"started": "now", "smoke": True, "architecture": "tiny-vit", "rounds": 1, "summary": summary,
              "measurements": measurements, "environment": bench.environment()}
    table = bench.markdown(report)
    assert "| text, short prompts (prompts/s) |" in table
    assert "| model-only (images or texts /s) | reference | clipcli | open_clip | onnxruntime | clipcli / reference |" in table
    assert "| text, short prompts, `pipeline.embed_texts` (length-sorted batches) (prompts/s) |" in table
    assert "| web end to end, `clipcli encode` fp32, whole process (images/s) |" in table
    assert "| cli-web-fp32 |" in table  # its peak RSS row
    assert "| `clipcli classify`, 3 labels x 7 templates, 3 images: first run vs label cache" in table


@pytest.mark.slow
def test_train_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/train.py --smoke: both tools train the same shapes on the same shards for the
    same steps, each run's samples/s comes from its own log, and the table lines them up."""
    import tarfile

    import open_clip

    from clipcli.models.config import CLIPConfig
    from clipcli.models.factory import create_model
    from clipcli.train.presets import PRESETS

    spec = importlib.util.spec_from_file_location("benchmarks_train", ROOT / "benchmarks" / "train.py")
    train = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, train)  # its dataclass looks its module up
    spec.loader.exec_module(train)

    # ViT-B/32 is open_clip's own ViT-B-32-quickgelu; the tiny preset has the same shapes in both.
    assert train.open_clip_config(PRESETS["ViT-B/32"]) == open_clip.get_model_config("ViT-B-32-quickgelu")
    (tmp_path / "bench-tiny.json").write_text(json.dumps(train.open_clip_config(PRESETS["tiny"])))
    open_clip.add_model_config(tmp_path / "bench-tiny.json")
    shapes = [sorted(tuple(p.shape) for p in model.parameters())
              for model in (create_model(CLIPConfig(**PRESETS["tiny"])), open_clip.create_model("bench-tiny"))]
    assert shapes[0] == shapes[1]

    out = tmp_path / "bench"
    report = train.main(["--smoke", "--out", str(out), "--batches", "4", "--modes", "plain,accum2"])
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        names = tar.getnames()
    assert names == sorted(names) and names[:2] == ["000000000.jpg", "000000000.txt"]
    assert 0 < report["data"]["caption_tokens"]["mean"] <= 77
    for label, per_step in (("b4 plain", 4), ("b4 accum2", 8)):
        row = report["summary"][label]
        assert row["ratio"] > 0, row
        runs = report["measurements"][label]
        assert runs["clipcli"]["steps_run"] == runs["open_clip"]["steps_run"] >= 3  # 1 warmup + 2 timed, even
        for tool in train.TOOLS:
            run = runs[tool]
            assert run["torch_threads"] == 2 and run["returncode"] == 0, (tool, run)
            assert len(run["step_seconds"]) == run["steps_run"] and run["samples_per_second"] > 0
            assert run["peak_rss_mb"] > 100 and run["peak_tree_pss_mb"] > 100
        assert f"| {label} | {per_step} |" in train.markdown(report)
    assert json.loads((out / "results.json").read_text())["summary"] == report["summary"]
