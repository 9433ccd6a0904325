"""The CUDA path: half precision against fp32, the pinned-memory batching pipeline, the
commands end to end, a training step under autocast, and torchrun with nccl.

Marked ``cuda``; every test skips without a GPU, so the default run on a CPU machine only
collects them. ``benchmarks/device_check.sh`` runs them, then the GPU benchmark.

The models are full-size ViT-B-32 and RN50 with CLIP's random initialisation, written as
self-describing safetensors: half-precision error grows with width and depth, so a tiny
model would hide it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DATA = Path(__file__).parent / "data"
ARCHS = ("ViT-B-32", "RN50")
TEXTS = ["a photo of a cat", "an astronaut in a space suit", "a rocket on a launch pad", "a diagram", "grace hopper"]
runner = CliRunner()


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> dict[str, Path]:
    """Random-weight ViT-B-32 and RN50 as safetensors that carry their architecture."""
    from clipcli.models.clip import CLIPConfig
    from clipcli.models.factory import METADATA_KEY, create_model
    from clipcli.models.registry import architecture_hints
    from clipcli.train.loop import save_checkpoint

    folder = tmp_path_factory.mktemp("cuda-models")
    paths = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = create_model(CLIPConfig(**architecture_hints(arch)))
        paths[arch] = folder / f"{arch}.safetensors"
        save_checkpoint(model, paths[arch], {METADATA_KEY: model.config})
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The sample photos plus crops and rotations of them: 40 images of varied sizes."""
    folder = tmp_path_factory.mktemp("photos")
    sources = sorted(p for p in DATA.iterdir() if p.suffix in (".png", ".jpg"))
    for i in range(40):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        w, h = image.size
        box = (i % 7 * w // 20, i % 5 * h // 20, w - i % 3 * w // 10, h - i % 4 * h // 12)
        image.crop(box).rotate(90 * (i % 4), expand=True).save(folder / f"{i:03d}.jpg", quality=90)
    return folder


def load(path: Path, device: str, precision: str):
    from clipcli.pipeline import load_model

    return load_model(str(path), device=device, precision=precision)


def image_matrix(loaded, folder: Path, **run) -> np.ndarray:
    from clipcli.batching import embed_images
    from clipcli.items import expand_inputs

    results = list(embed_images(loaded, expand_inputs([str(folder)]), **run))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return np.stack([r.embedding for r in results])


def text_matrix(loaded) -> np.ndarray:
    from clipcli.batching import embed_texts

    return np.stack([r.embedding for r in embed_texts(loaded, TEXTS)])


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fp32_equals_cpu_fp32(full_size, photos, arch):
    cpu, gpu = load(full_size[arch], "cpu", "fp32"), load(full_size[arch], "cuda", "fp32")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    images = row_cosines(image_matrix(cpu, photos), image_matrix(gpu, photos))
    texts = row_cosines(text_matrix(cpu), text_matrix(gpu))
    assert images.min() >= 0.9999 and texts.min() >= 0.9999, (images.min(), texts.min())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_embeddings_match_fp32(full_size, photos, arch, precision):
    reference, half = load(full_size[arch], "cuda", "fp32"), load(full_size[arch], "cuda", precision)
    assert next(half.model.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    images = row_cosines(image_matrix(reference, photos), image_matrix(half, photos))
    texts = row_cosines(text_matrix(reference), text_matrix(half))
    assert images.min() >= 0.999, images.min()
    assert texts.min() >= 0.999, texts.min()


def test_auto_device_is_cuda_in_fp16(full_size):
    loaded = load(full_size["ViT-B-32"], "auto", None)
    assert loaded.device == torch.device("cuda", 0) and loaded.dtype == torch.float16


# ----------------------------------------------------------------------------- batching


def test_pinned_non_blocking_batches_equal_synchronous_encoding(full_size, photos):
    """The pipeline copies each batch from page-locked memory without waiting; the rows must
    equal a plain synchronous forward pass of the same batches (a copy read before it landed,
    or a buffer reused too soon, would not)."""
    from clipcli.items import expand_inputs

    loaded = load(full_size["ViT-B-32"], "cuda", "fp16")
    pipelined = image_matrix(loaded, photos, batch_size=8, workers=4)
    tensors = [loaded.preprocess(Image.open(item.path).convert("RGB")) for item in expand_inputs([str(photos)])]
    rows = []
    with torch.inference_mode():
        for start in range(0, len(tensors), 8):
            x = torch.stack(tensors[start : start + 8]).to("cuda", torch.float16)
            y = loaded.model.encode_image(x).float()
            rows.append(torch.nn.functional.normalize(y, dim=-1).cpu().numpy())
    assert np.abs(pipelined - np.concatenate(rows)).max() < 2e-3


def test_normalising_on_the_gpu_gives_the_cpu_floats(photos):
    """Workers hand over uint8 pixels; the GPU normalises them to exactly the floats of the
    CPU transform (a plain-number divisor would be a reciprocal multiplication there)."""
    from clipcli.preprocess import Preprocess

    preprocess = Preprocess(224)
    images = [Image.open(path) for path in sorted(photos.iterdir())]
    pixels = torch.from_numpy(np.stack([preprocess.pixels(image) for image in images]))
    on_gpu = preprocess.normalize(pixels.cuda()).cpu()
    assert all(torch.equal(row, preprocess(image)) for row, image in zip(on_gpu, images))


def test_batch_size_does_not_change_embeddings(full_size, photos):
    loaded = load(full_size["ViT-B-32"], "cuda", "fp16")
    one, many = image_matrix(loaded, photos, batch_size=1, workers=2), image_matrix(loaded, photos, batch_size=32, workers=8)
    assert row_cosines(one, many).min() >= 0.9995


# ----------------------------------------------------------------------------- commands


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_on_cuda_matches_cpu(full_size, photos, tmp_path, arch):
    model = str(full_size[arch])
    cli("encode", str(photos), "-m", model, "--device", "cpu", "-o", str(tmp_path / "cpu.npy"), "-q")
    cli("encode", str(photos), "-m", model, "--batch-size", "16", "-o", str(tmp_path / "gpu.npy"), "-q")  # auto: cuda, fp16
    cpu, gpu = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "gpu.npy")
    assert cpu.shape == gpu.shape == (40, 1024 if arch == "RN50" else 512)
    assert row_cosines(cpu, gpu).min() >= 0.999
    manifest = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [r["status"] for r in manifest] == ["ok"] * 40


def test_classify_and_similarity_on_cuda_match_cpu(full_size, photos, tmp_path):
    model = str(full_size["ViT-B-32"])
    labels = "cat,astronaut,rocket,diagram,person"

    def classify(device: str) -> list[dict]:
        out = cli("classify", str(photos), "-m", model, "--labels", labels, "--device", device, "--format", "jsonl", "-q")
        return [json.loads(line) for line in out.splitlines()]

    cpu, gpu = classify("cpu"), classify("cuda")
    assert [r["image"] for r in gpu] == [r["image"] for r in cpu]
    for a, b in zip(cpu, gpu):
        scores_a = {t["label"]: t["score"] for t in a["top"]}
        scores_b = {t["label"]: t["score"] for t in b["top"]}
        assert scores_a.keys() == scores_b.keys()
        assert max(abs(scores_a[k] - scores_b[k]) for k in scores_a) < 0.02

    def similarity(device: str) -> dict:
        texts = [arg for text in TEXTS[:3] for arg in ("--text", text)]
        out = cli("similarity", str(photos), *texts, "-m", model, "--device", device, "--format", "json", "-q")
        return json.loads(out)

    cpu_sim, gpu_sim = similarity("cpu"), similarity("cuda:0")
    assert np.abs(np.array(cpu_sim["cosine"]) - np.array(gpu_sim["cosine"])).max() < 2e-3
    cli("similarity", str(photos), "-m", model, "--text", "a cat", "--text", "a rocket", "--device", "cuda", "-o",
        str(tmp_path / "heat.png"), "-q")
    assert Image.open(tmp_path / "heat.png").size[0] > 100


def test_a_missing_gpu_index_is_one_line(full_size, photos):
    result = runner.invoke(app, ["encode", str(photos), "-m", str(full_size["ViT-B-32"]), "--device",
                                 f"cuda:{torch.cuda.device_count()}", "-q"])
    assert result.exit_code != 0 and "CUDA device" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def shapes_csv(tmp_path_factory) -> Path:
    from clipcli.train import shapes

    return shapes.make_dataset(tmp_path_factory.mktemp("shapes"), train=64, test=16, seed=0) / "train.csv"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_under_autocast(shapes_csv, tmp_path, precision):
    out = tmp_path / precision
    checkpoint = cli("train", "--train-data", str(shapes_csv), "--arch", "tiny", "--epochs", "1", "--batch-size", "16",
                     "--warmup", "1", "--log-every", "1", "--workers", "0", "--device", "cuda", "--precision", precision,
                     "--out", str(out), "--quiet").strip()
    assert Path(checkpoint).is_file()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "train"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(checkpoint).values() if t.is_floating_point())


GATHER_CHECK = """
import torch, torch.distributed as dist
from clipcli.train.distributed import _GatherRows, all_sum, teardown
from clipcli.pipeline import resolve_device
device = resolve_device("cuda")
torch.cuda.set_device(device)
dist.init_process_group("nccl")
x = torch.arange(6.0, device=device).reshape(3, 2).requires_grad_()
y = _GatherRows.apply(x, [3])
(y * y).sum().backward()
assert torch.equal(y, x) and torch.equal(x.grad, 2 * x), (y, x.grad)
assert all_sum(2.5, device) == 2.5
teardown()
print("nccl ok on", device)
"""


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_torchrun_with_nccl_on_one_gpu(shapes_csv, tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_CHECK)
    done = torchrun(str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nccl ok on cuda:0" in done.stdout
    done = torchrun("-m", "clipcli", "train", "--train-data", str(shapes_csv), "--arch", "tiny", "--epochs", "1",
                    "--batch-size", "16", "--warmup", "1", "--workers", "0", "--device", "cuda", "--precision", "bf16",
                    "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(tmp_path / "run" / "last.safetensors")


def test_train_then_classify_on_cuda(shapes_csv, tmp_path):
    checkpoint = cli("train", "--train-data", str(shapes_csv), "--arch", "tiny", "--epochs", "1", "--batch-size", "16",
                     "--workers", "0", "--device", "cuda", "--out", str(tmp_path / "run"), "--quiet").strip()
    folder = shapes_csv.parent / "zeroshot"
    first = next(p for p in sorted(folder.rglob("*.png")))
    target = tmp_path / "one"
    target.mkdir()
    shutil.copy(first, target / first.name)
    out = cli("classify", str(target), "-m", checkpoint, "--labels", "red circle,blue square", "--format", "jsonl", "-q")
    assert json.loads(out)["status"] == "ok"


# ----------------------------------------------------------------------------- index and partitions


def test_index_and_search_on_cuda_match_the_cpu(full_size, photos, tmp_path):
    model = str(full_size["ViT-B-32"])
    found = {}
    for device in ("cpu", "cuda"):
        db = str(tmp_path / f"{device}.sqlite3")
        cli("index", str(photos), "--db", db, "-m", model, "--device", device, "-q")
        out = cli("search", "a photo of a cat", "--db", db, "-m", model, "--device", device, "-k", "40", "--format", "json")
        found[device] = {r["image"]: r["score"] for r in json.loads(out)}
    assert found["cpu"].keys() == found["cuda"].keys()
    assert max(abs(found["cpu"][k] - found["cuda"][k]) for k in found["cpu"]) < 2e-3


def test_partitioned_encode_on_cuda_matches_the_cpu_and_stays_on_its_gpu(full_size, photos, tmp_path):
    pytest.importorskip("pyarrow")
    model = str(full_size["ViT-B-32"])
    for device in ("cpu", "cuda"):
        cli("encode", str(photos), "-m", model, "--device", device, "-o", f"{tmp_path / device}/", "--partition-size",
            "16", "-q")
    cpu = np.concatenate([np.load(p) for p in sorted((tmp_path / "cpu" / "img_emb").glob("*.npy"))])
    gpu = np.concatenate([np.load(p) for p in sorted((tmp_path / "cuda" / "img_emb").glob("*.npy"))])
    assert cpu.shape == gpu.shape == (40, 512) and row_cosines(cpu, gpu).min() >= 0.999
    assert torch.cuda.current_device() == 0
