"""`clipcli encode`, `classify`, `similarity` end to end: every format and exit code through
Typer's CliRunner, results checked against the Python API on the same checkpoint, and real
subprocess pipelines."""

from __future__ import annotations

import csv
import io
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

import clipcli
from clipcli.cli import app

DATA = Path(__file__).parent / "data"
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "grace_hopper.jpg", "rocket.jpg"]
LABELS = ["cat", "astronaut", "rocket"]
CAPTIONS = ["a photo of a cat", "an astronaut in a space suit", "a rocket on a launch pad"]


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(DATA / name, folder / name)
    return folder


@pytest.fixture
def corrupt(photos) -> Path:
    """The photo folder plus one file that is not an image, sorted between the others."""
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG stops here")
    return photos


@pytest.fixture
def ckpt(tiny_vit_checkpoint) -> str:
    return str(tiny_vit_checkpoint)


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def run_exact(*args, input=None):
    """A command on the reference-exact decoding path, for comparisons with the Python API."""
    return run(*args, "--exact-decode", input=input)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------- the Python API as oracle


@pytest.fixture
def api(ckpt):
    model, preprocess = clipcli.load(ckpt, device="cpu")

    class API:
        @staticmethod
        def images(paths, normalize=True):
            x = torch.stack([preprocess(Image.open(p)) for p in paths])
            with torch.no_grad():
                features = model.encode_image(x)
            return features / features.norm(dim=-1, keepdim=True) if normalize else features

        @staticmethod
        def texts(texts, normalize=True):
            with torch.no_grad():
                features = model.encode_text(clipcli.tokenize(texts))
            return features / features.norm(dim=-1, keepdim=True) if normalize else features

        @staticmethod
        def classify(paths, labels, templates=("a photo of a {}.",)):
            weights = []
            for label in labels:
                rows = API.texts([t.format(label) for t in templates])
                mean = rows.mean(0)
                weights.append(mean / mean.norm())
            logits = model.logit_scale.exp() * API.images(paths) @ torch.stack(weights).T
            return logits.softmax(dim=-1)

        logit_scale = model.logit_scale.detach()

    return API


# --------------------------------------------------------------------------- classify


def test_classify_jsonl_equals_the_python_api(photos, ckpt, api):
    result = run_exact("classify", photos, "-m", ckpt, "--labels", ",".join(LABELS))
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["image"] for r in records] == [str(photos / p) for p in PHOTOS]
    probs = api.classify([photos / p for p in PHOTOS], LABELS)
    for record, row in zip(records, probs):
        assert record["status"] == "ok"
        order = row.argsort(descending=True).tolist()
        assert [t["label"] for t in record["top"]] == [LABELS[i] for i in order]
        assert [t["score"] for t in record["top"]] == pytest.approx(row[order].tolist(), abs=1e-5)
        assert record["label"] == LABELS[order[0]] and record["score"] == record["top"][0]["score"]
        assert record["score_kind"] == "softmax"  # a CLIP: the softmax over the labels
    assert "classified 5 images" in result.stderr


def test_classify_templates_match_the_paper_recipe(photos, ckpt, api):
    from clipcli.zeroshot import load_templates

    result = run_exact("classify", photos / "chelsea.png", "-m", ckpt, "-l", "cat,dog", "--templates", "imagenet7", "-k", "1")
    [record] = jsonl(result.stdout)
    expected = api.classify([photos / "chelsea.png"], ["cat", "dog"], load_templates("imagenet7"))[0]
    assert record["score"] == pytest.approx(expected.max().item(), abs=1e-5)
    assert len(record["top"]) == 1


def test_a_corrupt_image_is_reported_and_the_rest_scored(corrupt, ckpt):
    result = run("classify", corrupt, "-m", ckpt, "-l", "cat,dog")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert len(records) == 6 and [r["status"] for r in records].count("ok") == 5
    broken = records[1]
    assert broken == {"image": str(corrupt / "broken.jpg"), "status": "error", "error": broken["error"]}
    assert broken["error"].startswith("truncated image") or broken["error"].startswith("cannot decode")
    hint = "; pass --allow-truncated to score what can be decoded" if broken["error"].startswith("truncated") else ""
    assert f"skipping {corrupt / 'broken.jpg'}: {broken['error']}{hint}" in result.stderr.splitlines()
    assert "1 of 6 failed" in result.stderr


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_classify_formats(corrupt, ckpt, fmt):
    result = run("classify", corrupt, "-m", ckpt, "-l", "cat,dog", "--format", fmt)
    assert result.exit_code == 1
    if fmt == "json":
        records = json.loads(result.stdout)
        assert len(records) == 6 and records[1]["status"] == "error"
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert list(rows[0]) == ["image", "status", "label", "score", "top", "error", "score_kind"]
        assert len(rows) == 6 and rows[1]["status"] == "error" and rows[0]["label"] in ("cat", "dog")
        assert float(rows[0]["score"]) > 0.5
    else:
        assert "broken.jpg" in result.stdout and "astronaut.png" in result.stdout


def test_classify_inputs_from_stdin_and_labels_file(photos, ckpt, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\ndog\n")  # blank lines skipped; every other line is a label (# too)
    listing = f"{photos / 'chelsea.png'}\n# skip me\n\n{photos / 'rocket.jpg'}\n"
    result = run("classify", "-", "-m", ckpt, "--labels-file", labels, input=listing)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["image"] for r in records] == [str(photos / "chelsea.png"), str(photos / "rocket.jpg")]
    assert {t["label"] for t in records[0]["top"]} == {"cat", "dog"}


def test_label_embeddings_are_cached(photos, ckpt, monkeypatch):
    first = run("classify", photos / "chelsea.png", "-m", ckpt, "-l", "cat,dog")
    cached = list((Path(os.environ["CLIPCLI_CACHE_DIR"]) / "labels").glob("*.npy"))
    assert len(cached) == 1

    from clipcli import pipeline

    def no_text(*args, **kwargs):
        raise AssertionError("label texts were encoded again")

    monkeypatch.setattr(pipeline, "embed_texts", no_text)
    second = run("classify", photos / "chelsea.png", "-m", ckpt, "-l", "cat,dog")
    assert second.exit_code == 0
    assert jsonl(second.stdout)[0]["score"] == pytest.approx(jsonl(first.stdout)[0]["score"], abs=1e-6)
    with pytest.raises(AssertionError, match="encoded again"):  # other labels: a new entry
        run("classify", photos / "chelsea.png", "-m", ckpt, "-l", "cat,cow")


def test_model_from_the_environment(photos, ckpt, monkeypatch):
    monkeypatch.setenv("CLIPCLI_MODEL", ckpt)
    result = run("classify", photos / "chelsea.png", "-l", "cat,dog")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify", "{photos}", "-m", "{ckpt}"], "error: no labels"),
        (["classify", "{photos}/nope.png", "-m", "{ckpt}", "-l", "a,b"], "error: no such file or folder"),
        (["classify", "{photos}", "-m", "no-such-model", "-l", "a,b"], "error: "),
        (["classify", "{photos}", "-m", "{garbage}", "-l", "a,b"], "error: "),
        (["classify", "{photos}", "-m", "{ckpt}", "-l", "a,a"], "error: label 'a' is given twice"),
        (["classify", "{photos}", "-m", "{ckpt}", "-l", "a,b", "--template", "no slot"], "exactly one {}"),
        (["classify", "{photos}", "-m", "{ckpt}", "-l", "a,b", "--device", "tpu"], "error: "),
        (["classify", "{photos}", "-m", "{ckpt}", "-l", "a,b", "--no-such-option"], "No such option"),
        (["classify", "{photos}", "-m", "{ckpt}", "-l", "a,b", "--format", "xml"], "Invalid value"),
        (["similarity", "{photos}", "-m", "{ckpt}"], "error: give the images and then a captions file"),
        (["similarity", "{photos}", "--text", "a", "-o", "{photos}/out.jpg"], "must end in .png, .svg or .pdf"),
        (["encode", "-m", "{ckpt}"], "error: nothing to encode"),
        (["encode", "{photos}", "-m", "{ckpt}", "-o", "{photos}/emb.txt"], "use a .npy, .npz"),
    ],
)
def test_usage_errors_exit_2_with_one_line(photos, ckpt, tmp_path, args, message):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    args = [a.format(photos=photos, ckpt=ckpt, garbage=garbage) for a in args]
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert message in result.stderr
    if message.startswith("error: "):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- similarity


def test_similarity_json_equals_the_python_api(photos, ckpt, api, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    result = run_exact("similarity", photos, captions, "-m", ckpt, "--format", "json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["images"] == [str(photos / p) for p in PHOTOS] and out["texts"] == CAPTIONS
    expected = api.texts(CAPTIONS) @ api.images([photos / p for p in PHOTOS]).T  # rows: texts
    np.testing.assert_allclose(out["cosine"], expected.numpy(), atol=1e-5)
    probs = (api.logit_scale.exp() * expected).softmax(dim=-1)
    np.testing.assert_allclose(out["probs"], probs.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.sum(out["probs"], axis=1), 1.0, atol=1e-5)
    assert out["score_kind"] == "softmax"


def test_similarity_heatmap_and_failures(corrupt, ckpt, tmp_path):
    heatmap = tmp_path / "heatmap.png"
    args = ["similarity", corrupt, "--text", "a cat", "--text", "a rocket", "-m", ckpt, "-o", heatmap]
    result = run(*args)
    assert result.exit_code == 1
    assert result.stdout == ""  # with -o and no --format, stdout stays empty
    assert Image.open(heatmap).format == "PNG"
    assert f"wrote {heatmap} (2 captions x 5 images)" in result.stderr
    again = run(*args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert run(*args, "--overwrite").exit_code == 1


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "table"])
def test_similarity_formats(corrupt, ckpt, fmt):
    result = run("similarity", corrupt, "--text", "a cat", "--text", "a rocket", "-m", ckpt, "-f", fmt)
    assert result.exit_code == 1
    if fmt == "json":
        out = json.loads(result.stdout)
        assert np.array(out["cosine"]).shape == (2, 5)
        assert out["errors"][0]["image"] == str(corrupt / "broken.jpg")
    elif fmt == "jsonl":
        records = jsonl(result.stdout)
        assert [r["status"] for r in records] == ["ok", "error", "ok", "ok", "ok", "ok"]
        assert [s["text"] for s in records[0]["scores"]] == ["a cat", "a rocket"]
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(result.stdout)))
        assert rows[0] == ["text"] + [str(corrupt / p) for p in PHOTOS] + ["score_kind"]
        assert [r[0] for r in rows[1:]] == ["a cat", "a rocket"] and {r[-1] for r in rows[1:]} == {"cosine"}
    else:
        assert "a rocket" in result.stdout


def test_similarity_long_captions(photos, ckpt):
    long = "a photo of " + "a very " * 100 + "long caption"
    result = run("similarity", photos / "chelsea.png", "--text", long, "--text", "short", "-m", ckpt, "-f", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["truncated"] == [True, False]
    strict = run("similarity", photos / "chelsea.png", "--text", long, "--text", "short", "-m", ckpt, "-f", "json",
                 "--no-truncate")
    assert strict.exit_code == 1 and json.loads(strict.stdout)["texts"] == ["short"]
    assert "skipping caption" in strict.stderr


# --------------------------------------------------------------------------- encode


def test_encode_npy_and_manifest(corrupt, ckpt, api, tmp_path):
    out = tmp_path / "emb.npy"
    result = run_exact("encode", corrupt, "-m", ckpt, "-o", out)
    assert result.exit_code == 1
    matrix = np.load(out, allow_pickle=False)
    assert matrix.dtype == np.float32 and matrix.shape == (5, 32)
    np.testing.assert_allclose(matrix, api.images([corrupt / p for p in PHOTOS]).numpy(), atol=1e-5)
    manifest = jsonl((tmp_path / "emb.jsonl").read_text())
    assert [m["index"] for m in manifest] == [0, None, 1, 2, 3, 4]
    assert manifest[1]["status"] == "error" and manifest[0] == {"index": 0, "image": str(corrupt / "astronaut.png"), "status": "ok"}
    assert run_exact("encode", corrupt, "-m", ckpt, "-o", out).exit_code == 2  # no overwrite
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary files left


def test_encode_npz_float16_unnormalised(photos, ckpt, api, tmp_path):
    out = tmp_path / "emb.npz"
    result = run_exact("encode", photos, "-m", ckpt, "-o", out, "--no-normalize", "--dtype", "float16")
    assert result.exit_code == 0, result.stderr
    with np.load(out, allow_pickle=False) as data:
        assert data["embeddings"].dtype == np.float16
        assert list(data["paths"]) == [str(photos / p) for p in PHOTOS]
        assert str(data["model"]) == ckpt and len(str(data["sha256"])) == 64 and not bool(data["normalized"])
        raw = api.images([photos / p for p in PHOTOS], normalize=False).numpy()
        np.testing.assert_allclose(data["embeddings"].astype(np.float32), raw, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "table"])
def test_encode_stdout_formats(corrupt, ckpt, api, fmt):
    result = run_exact("encode", corrupt, "-m", ckpt, "-f", fmt)
    assert result.exit_code == 1
    if fmt in ("jsonl", "json"):
        records = jsonl(result.stdout) if fmt == "jsonl" else json.loads(result.stdout)
        assert records[1] == {"image": str(corrupt / "broken.jpg"), "status": "error", "error": records[1]["error"]}
        got = np.array([r["embedding"] for r in records if r["status"] == "ok"])
        np.testing.assert_allclose(got, api.images([corrupt / p for p in PHOTOS]).numpy(), atol=1e-5)
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert len(rows) == 6 and float(rows[0]["e0"]) != 0 and "e31" in rows[0]
    else:
        assert "astronaut.png" in result.stdout and "broken.jpg" in result.stdout


def test_encode_captions(ckpt, api, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_bytes(("\ufeff" + "\r\n".join(CAPTIONS) + "\r\n").encode())
    result = run_exact("encode", "--text-file", captions, "-m", ckpt)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["text"] for r in records] == CAPTIONS
    np.testing.assert_allclose([r["embedding"] for r in records], api.texts(CAPTIONS).numpy(), atol=1e-5)
    out = tmp_path / "captions.npz"
    assert run_exact("encode", "--text-file", captions, "-m", ckpt, "-o", out).exit_code == 0
    with np.load(out) as data:
        assert list(data["texts"]) == CAPTIONS


def test_encode_json_file_output(photos, ckpt, tmp_path):
    out = tmp_path / "emb.json"
    assert run("encode", photos / "chelsea.png", "-m", ckpt, "-o", out).exit_code == 0
    assert json.loads(out.read_text())[0]["image"] == str(photos / "chelsea.png")


# --------------------------------------------------------------------------- real processes


def clipcli_cmd() -> str:
    return f"{sys.executable} -m clipcli"


def test_classify_pipeline_through_a_real_pipe(corrupt, ckpt):
    check = (
        "import json, sys; records = [json.loads(l) for l in sys.stdin]; "
        "assert len(records) == 6, records; "
        "assert sum(r['status'] == 'ok' for r in records) == 5; "
        "print(sorted({r['label'] for r in records if r['status'] == 'ok'} - {'cat', 'dog'}) == [])"
    )
    command = f"set -o pipefail; {clipcli_cmd()} classify {corrupt} -m {ckpt} -l cat,dog | {sys.executable} -c \"{check}\""
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 1  # the corrupt image, passed through the pipe
    assert done.stdout.strip() == "True"
    assert "skipping" in done.stderr and "Traceback" not in done.stderr


def test_head_closes_the_pipe_quietly(photos, ckpt):
    command = f"{clipcli_cmd()} encode {photos} {photos} {photos} -m {ckpt} --batch-size 1 | head -n 1"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=os.environ.copy())
    assert len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_help_imports_nothing_heavy():
    code = "import sys; from clipcli.cli import app; bad = {'torch', 'PIL', 'matplotlib', 'numpy'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
    done = subprocess.run([sys.executable, "-m", "clipcli", "classify", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "clipcli classify photos/" in done.stdout


@pytest.mark.parametrize("sig", ["SIGTERM"])  # SIGINT takes the same path (KeyboardInterrupt)
def test_interrupt_keeps_what_is_done_and_exits_130(photos, ckpt, sig):
    import signal

    # 3,000 inputs: far more than a loaded machine can finish between the first line and the
    # signal (with 300 it once finished first under load 3.5), while the run is stopped early.
    process = subprocess.Popen(
        [sys.executable, "-m", "clipcli", "encode", *[str(photos)] * 600, "-m", ckpt, "--batch-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    first = process.stdout.readline()
    process.send_signal(getattr(signal, sig))
    rest, errors = process.communicate(timeout=60)
    assert process.returncode == 130, errors
    assert "error: interrupted" in errors and "Traceback" not in errors
    lines = [first, *rest.splitlines()]
    assert all(json.loads(line)["status"] == "ok" for line in lines)  # every line written is whole
    assert len(lines) < 3000


def test_heatmap_inside_the_input_folder_is_not_read_back(photos, ckpt):
    heatmap = photos / "heatmap.png"
    first = run("similarity", photos, "--text", "a cat", "-m", ckpt, "-o", heatmap, "-f", "json")
    second = run("similarity", photos, "--text", "a cat", "-m", ckpt, "-o", heatmap, "-f", "json", "--overwrite")
    assert first.exit_code == second.exit_code == 0
    assert json.loads(second.stdout)["images"] == json.loads(first.stdout)["images"]
    assert str(heatmap) not in json.loads(second.stdout)["images"]


def test_decoding_options(photos, ckpt):
    data = (photos / "rocket.jpg").read_bytes()
    (photos / "rocket.jpg").write_bytes(data[: len(data) // 2])
    strict = jsonl(run("encode", photos / "rocket.jpg", "-m", ckpt).stdout)[0]
    assert strict["status"] == "error" and strict["error"].startswith("truncated image")
    lenient = run("encode", photos / "rocket.jpg", "-m", ckpt, "--allow-truncated")
    assert lenient.exit_code == 0 and jsonl(lenient.stdout)[0]["status"] == "ok"
    capped = run("encode", photos / "chelsea.png", "-m", ckpt, "--max-pixels", "1000")
    assert jsonl(capped.stdout)[0]["error"] == "image too large: 451x300 = 135300 pixels exceeds the limit of 1000"
    assert (f"skipping {photos / 'chelsea.png'}: image too large: 451x300 = 135300 pixels exceeds the limit of 1000; "
            "raise --max-pixels to allow it") in capped.stderr.splitlines()


def test_reduced_jpeg_decoding_agrees_with_the_exact_path(tmp_path, ckpt, api):
    """Large JPEGs decode at a reduced DCT scale by default; embeddings stay at cosine >= 0.999."""
    folder = tmp_path / "camera"
    folder.mkdir()
    big = Image.open(DATA / "grace_hopper.jpg").convert("RGB").resize((2048, 2400), Image.Resampling.BICUBIC)
    big.save(folder / "big.jpg", quality=90)
    fast = jsonl(run("encode", folder, "-m", ckpt, "-f", "jsonl").stdout)[0]["embedding"]
    exact = jsonl(run("encode", folder, "-m", ckpt, "-f", "jsonl", "--exact-decode").stdout)[0]["embedding"]
    reference = api.images([folder / "big.jpg"])[0]
    assert np.allclose(exact, reference.numpy(), atol=1e-5)
    cosine = float(np.dot(fast, reference.numpy()) / np.linalg.norm(fast))
    assert 0.999 <= cosine and fast != exact


def test_the_default_pixel_cap_is_the_input_layers():
    from clipcli.cli.scoring_commands import MAX_PIXELS
    from clipcli.images import DEFAULT_MAX_PIXELS

    assert MAX_PIXELS == DEFAULT_MAX_PIXELS


def test_the_flags_defaults_spelled_out_for_help_are_the_librarys():
    from clipcli.cli import options
    from clipcli.images import DECODE_TIMEOUT
    from clipcli.video import DEFAULT_INTERVAL

    assert (options.VIDEO_INTERVAL, options.DECODE_TIMEOUT) == (DEFAULT_INTERVAL, DECODE_TIMEOUT)


def test_threads_and_the_emulated_precision_note(photos, ckpt):
    before = torch.get_num_threads()
    try:
        result = run("encode", photos / "rocket.jpg", "-m", ckpt, "--threads", "1", "--precision", "bf16")
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == 1
        emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert ("note: this CPU has no native bf16" in result.stderr) == emulated
        quiet = run("encode", photos / "rocket.jpg", "-m", ckpt, "--precision", "bf16", "-q")
        assert "note:" not in quiet.stderr
        assert run("encode", photos / "rocket.jpg", "-m", ckpt, "--threads", "0").exit_code == 2
    finally:
        torch.set_num_threads(before)


def test_cached_labels_mean_the_text_tower_is_never_read(photos, ckpt, monkeypatch):
    from clipcli import loading

    read: list[tuple[str, ...]] = []
    load = loading.load

    def recording(source, device, dtype, towers=("image", "text")):
        read.append(tuple(towers))
        return load(source, device, dtype, towers)

    monkeypatch.setattr(loading, "load", recording)
    first = run("classify", photos / "chelsea.png", "-m", ckpt, "-l", "cat,dog")
    assert first.exit_code == 0 and read == [("image",), ("text",)]  # a cache miss loads the text tower then
    read.clear()
    second = run("classify", photos / "chelsea.png", "-m", ckpt, "-l", "cat,dog")
    assert second.exit_code == 0 and read == [("image",)]
    assert jsonl(second.stdout) == jsonl(first.stdout)
