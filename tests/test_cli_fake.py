"""The commands' exact output with a fake encoder, in the llm style: every format, every input source.

The fake embeds an image as its mean colour (so a red square is [1, 0, 0]) and a prompt by
a table, and ``clipcli.pipeline.load_model`` hands it to every command. With embeddings this
simple the scores are known in advance, so each test asserts the whole of stdout, and the
exit code, for classify, similarity and encode; no checkpoint is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.tokenizer import tokenize

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
BASIS = {name: [float(i == k) for k in range(3)] for i, name in enumerate(COLOURS)}


class FakeModel:
    """Images: mean colour; texts: the vector of the colour they name (by their tokens)."""

    context_length = 77
    config = SimpleNamespace(embed_dim=3)

    def __init__(self, texts: dict[str, list[float]]):
        self.logit_scale = torch.tensor(math.log(100.0))
        self.tokens = tokenize(list(texts))
        self.vectors = torch.tensor(list(texts.values()))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3)
        return x.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, 77) -> (B, 3)
        match = (tokens[:, None, :] == self.tokens[None]).all(dim=-1)  # (B, known)
        return match.float() @ self.vectors + 1e-3 * (~match.any(dim=1, keepdim=True)).float()


class FakeLoaded:
    """What the commands need of a loaded model, and nothing read from disk."""

    name, identity, sha256, input_resolution, embed_dim = "fake", "fake-identity", "0" * 64, 8, 3
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, texts: dict[str, list[float]]):
        self.model, self.notes = FakeModel(texts), []

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

    def ensure(self, tower: str) -> None:
        pass


PROMPTS = {f"a photo of a {name}.": vector for name, vector in BASIS.items()} | BASIS


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    monkeypatch.setattr("clipcli.pipeline.load_model", lambda *args, **kwargs: FakeLoaded(PROMPTS))


@pytest.fixture
def squares(tmp_path, monkeypatch) -> Path:
    """red.png, green.png, blue.png and a broken.png, in a folder; the cwd is its parent."""
    folder = tmp_path / "sq"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (16, 16), rgb).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    monkeypatch.chdir(tmp_path)
    return folder


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def prob(winner: bool) -> float:
    """softmax over three labels at logit scale 100 with cosines 1, 0, 0."""
    return float(torch.softmax(torch.tensor([100.0, 0.0, 0.0]), 0)[0 if winner else 1])


BROKEN = {"image": "sq/broken.png", "status": "error",
          "error": "not an image: a text file"}


def classify_record(name: str) -> dict:
    top = [{"label": name, "score": round(prob(True), 6)}] + [
        {"label": other, "score": round(prob(False), 6)} for other in COLOURS if other != name]
    return {"image": f"sq/{name}.png", "status": "ok", "label": name, "score": round(prob(True), 6), "top": top}


def rounded(records):
    for record in records:
        if "score" in record:
            record["score"] = round(record["score"], 6)
            for entry in record["top"]:
                entry["score"] = round(entry["score"], 6)
    return records


def test_classify_jsonl_from_a_folder(squares):
    result = run("classify", "sq", "-l", "red,green,blue", "-f", "jsonl")
    assert result.exit_code == 1  # one input failed
    records = rounded([json.loads(line) for line in result.stdout.splitlines()])
    assert records == [classify_record("blue"), BROKEN, classify_record("green"), classify_record("red")]
    assert result.stderr.splitlines()[0] == f"skipping sq/broken.png: {BROKEN['error']}"
    assert result.stderr.splitlines()[-1].startswith("classified 3 images in ") and "1 of 4 failed" in result.stderr


@pytest.mark.parametrize("source", ["files", "list file", "stdin"])
def test_classify_json_from_every_input_source(squares, tmp_path, source):
    names = ["sq/red.png", "sq/blue.png"]
    if source == "files":
        result = run("classify", *names, "-l", "red,green,blue", "-f", "json")
    elif source == "list file":
        (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
        result = run("classify", "list.txt", "-l", "red,green,blue", "-f", "json")
    else:
        result = run("classify", "-", "-l", "red,green,blue", "-f", "json", input="\n".join(names) + "\n")
    assert result.exit_code == 0, result.stderr
    assert rounded(json.loads(result.stdout)) == [classify_record("red"), classify_record("blue")]


def test_classify_csv_and_table(squares):
    csv = run("classify", "sq/red.png", "sq/broken.png", "-l", "red,green,blue", "-f", "csv")
    assert csv.exit_code == 1
    assert csv.stdout == ("image,status,label,score,top,error\n"
                          'sq/red.png,ok,red,1.0,"red (1.000), green (0.000), blue (0.000)",\n'
                          f"sq/broken.png,error,,,,{BROKEN['error']}\n")
    table = run("classify", "sq/red.png", "sq/broken.png", "-l", "red,green,blue", "-f", "table")
    assert table.exit_code == 1
    rows = [line for line in table.stdout.splitlines() if line.startswith("│")]
    assert rows[0].split("│")[1:5] == [" red.png    ", " ok     ", " red   ", " 1.0000 "]
    assert "paths relative to sq" in table.stdout


def test_similarity_json_and_jsonl(squares):
    result = run("similarity", "sq/red.png", "sq/green.png", "--text", "red", "--text", "blue", "-f", "json")
    assert result.exit_code == 0, result.stderr
    half = float(torch.softmax(torch.tensor([100.0, 0.0]), 0)[0])
    assert json.loads(result.stdout) == {
        "images": ["sq/red.png", "sq/green.png"], "texts": ["red", "blue"],
        "cosine": [[1.0, 0.0], [0.0, 0.0]], "probs": [[pytest.approx(half), pytest.approx(1 - half)], [0.5, 0.5]],
    }
    lines = run("similarity", "sq/red.png", "sq/broken.png", "--text", "red", "-f", "jsonl")
    assert lines.exit_code == 1
    assert [json.loads(line) for line in lines.stdout.splitlines()] == [
        {"image": "sq/red.png", "status": "ok", "scores": [{"text": "red", "cosine": 1.0, "prob": 1.0}]},
        BROKEN,
    ]


def test_similarity_csv_is_the_matrix(squares):
    result = run("similarity", "sq/red.png", "sq/blue.png", "--text", "red", "--text", "blue", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["text,sq/red.png,sq/blue.png", "red,1.0,0.0", "blue,0.0,1.0"]


def test_encode_jsonl_and_npy(squares, tmp_path):
    lines = run("encode", "sq", "-f", "jsonl")
    assert lines.exit_code == 1
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [(r["image"], r["status"], r.get("embedding")) for r in records] == [
        ("sq/blue.png", "ok", [0.0, 0.0, 1.0]), ("sq/broken.png", "error", None),
        ("sq/green.png", "ok", [0.0, 1.0, 0.0]), ("sq/red.png", "ok", [1.0, 0.0, 0.0])]
    npy = run("encode", "sq", "-o", "emb.npy", "-q")
    assert npy.exit_code == 1 and npy.stdout == "" and npy.stderr == ""
    assert np.load(tmp_path / "emb.npy").tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]  # rows of the ok inputs
    manifest = [json.loads(line) for line in (tmp_path / "emb.jsonl").read_text().splitlines()]
    assert [(m["image"], m["status"]) for m in manifest] == [
        ("sq/blue.png", "ok"), ("sq/broken.png", "error"), ("sq/green.png", "ok"), ("sq/red.png", "ok")]


@pytest.mark.parametrize("args, code, message", [
    (["classify", "sq", "-l", "red,red"], 2, "error: label 'red' is given twice\n"),
    (["classify", "nowhere", "-l", "red"], 2, "error: no such file or folder: nowhere\n"),
    (["encode", "sq", "-o", "out.txt"], 2, None),
    (["similarity", "sq/red.png"], 2, None),
])
def test_usage_errors_are_one_line_and_exit_2(squares, args, code, message):
    result = run(*args)
    assert result.exit_code == code and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    if message:
        assert result.stderr == message
