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
from clipcli.text.bpe import tokenize

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

    def disable_packing(self) -> None:
        pass

    def warm_up(self) -> None:
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
    return {"image": f"sq/{name}.png", "status": "ok", "label": name, "score": round(prob(True), 6), "top": top,
            "score_kind": "softmax"}


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
    assert csv.stdout == ("image,status,label,score,top,error,score_kind\n"
                          'sq/red.png,ok,red,1.0,"red (1.000), green (0.000), blue (0.000)",,softmax\n'
                          f"sq/broken.png,error,,,,{BROKEN['error']},\n")
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
        "score_kind": "softmax",
    }
    lines = run("similarity", "sq/red.png", "sq/broken.png", "--text", "red", "-f", "jsonl")
    assert lines.exit_code == 1
    assert [json.loads(line) for line in lines.stdout.splitlines()] == [
        {"image": "sq/red.png", "status": "ok", "scores": [{"text": "red", "cosine": 1.0, "prob": 1.0}],
         "score_kind": "softmax"},
        BROKEN,
    ]


def test_similarity_csv_is_the_matrix(squares):
    result = run("similarity", "sq/red.png", "sq/blue.png", "--text", "red", "--text", "blue", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["text,sq/red.png,sq/blue.png,score_kind", "red,1.0,0.0,cosine",
                                          "blue,0.0,1.0,cosine"]


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


# ----------------------------------------------------------------------------- one vocabulary


COMMANDS = ["classify", "similarity", "encode", "index", "search", "train", "models", "download", "convert"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_h_and_its_usage_line_reads_plainly(command):
    result = run(command, "-h")
    assert result.exit_code == 0 and "Usage: " in result.stdout
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert "{" not in usage and "......" not in usage


def test_the_top_level_help_names_every_command():
    result = run("-h")
    summary = result.stdout.split("Usage:")[1].split("Options")[0]
    assert result.exit_code == 0 and all(name in summary for name in COMMANDS)


@pytest.mark.parametrize("args, message", [
    (["classify"], "error: Missing argument 'INPUTS'; see clipcli classify --help\n"),
    (["encode", "sq", "--bogus"], "error: No such option: --bogus; see clipcli encode --help\n"),
    (["nope"], "error: No such command 'nope'; see clipcli --help\n"),
    (["encode", "sq", "--precision", "fp64"], None),
    (["encode", "sq", "--dtype", "bf16", "-o", "x.npy"], None),
    (["index", "sq", "--format", "yaml"], None),
])
def test_typer_usage_errors_are_one_line_too(squares, args, message):
    result = run(*args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    if message:
        assert result.stderr == message


def test_text_is_a_caption_and_text_file_a_file_in_encode_and_similarity(squares, tmp_path):
    (tmp_path / "captions.txt").write_text("red\nblue\n")
    literal = run("encode", "--text", "red", "--text", "blue", "-f", "jsonl", "-q")
    from_file = run("encode", "--text-file", "captions.txt", "-f", "jsonl", "-q")
    assert literal.exit_code == from_file.exit_code == 0 and literal.stdout == from_file.stdout
    assert [json.loads(line)["text"] for line in literal.stdout.splitlines()] == ["red", "blue"]
    similar = run("similarity", "sq/red.png", "--text-file", "captions.txt", "-f", "json")
    assert json.loads(similar.stdout)["texts"] == ["red", "blue"]
    # For one release, --text naming an existing file reads it, and says to use --text-file.
    old = run("encode", "--text", "captions.txt", "-f", "jsonl")
    assert old.stdout == literal.stdout and "use --text-file captions.txt" in old.stderr


def test_number_types_take_either_spelling(squares, tmp_path):
    for precision in ("fp32", "float32", "FP32"):
        assert run("encode", "sq/red.png", "--precision", precision, "-f", "jsonl", "-q").exit_code == 0
    for dtype in ("float16", "fp16"):
        result = run("encode", "sq/red.png", "--dtype", dtype, "-o", f"{dtype}.npy", "-q", "-j", "0")
        assert result.exit_code == 0 and np.load(tmp_path / f"{dtype}.npy").dtype == np.float16


def test_classify_writes_its_records_to_output(squares, tmp_path):
    result = run("classify", "sq/red.png", "-l", "red,green,blue", "-o", "labels.csv", "-q")
    assert result.exit_code == 0 and result.stdout == ""
    assert (tmp_path / "labels.csv").read_text().splitlines()[0] == "image,status,label,score,top,error,score_kind"
    again = run("classify", "sq/red.png", "-l", "red,green,blue", "-o", "labels.csv")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    jsonl = run("classify", "sq/red.png", "-l", "red,green,blue", "-o", "labels.jsonl", "-q")
    assert jsonl.exit_code == 0 and json.loads((tmp_path / "labels.jsonl").read_text())["label"] == "red"
    bad = run("classify", "sq/red.png", "-l", "red", "-o", "labels.txt")
    assert bad.exit_code == 2 and "--output" in bad.stderr


def test_the_encode_table_heads_its_path_column_image(squares):
    table = run("encode", "sq/red.png", "-f", "table")
    header = next(line for line in table.stdout.splitlines() if "status" in line)
    assert table.exit_code == 0 and header.split("┃")[1].strip() == "image", table.stdout


def test_resume_of_a_finished_run_says_so_and_a_resumed_run_counts_the_journal(squares, tmp_path, monkeypatch):
    assert run("encode", "sq/red.png", "sq/blue.png", "-o", "emb.npy", "-q").exit_code == 0
    done = run("encode", "sq/red.png", "sq/blue.png", "-o", "emb.npy", "--resume")
    assert done.exit_code == 2 and done.stderr == (
        "error: emb.npy is already complete: no interrupted run to resume; pass --overwrite to replace it\n")

    from clipcli.journal import Journal

    real = Journal.append
    calls = {"n": 0}

    def append_then_stop(self, records, rows):  # one batch reaches the journal, then an interruption
        real(self, records, rows)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "append", append_then_stop)
    stopped = run("encode", "sq", "-o", "two.npy", "--batch-size", "1", "-j", "0", "-q")
    assert stopped.exit_code == 130
    monkeypatch.setattr(Journal, "append", real)
    resumed = run("encode", "sq", "-o", "two.npy", "--batch-size", "1", "-j", "0", "--resume")
    assert resumed.exit_code == 1 and "resumed: 1 of 4 inputs came from the journal" in resumed.stderr


@pytest.fixture
def named_models(monkeypatch) -> list[str]:
    """Models found by name without a file (the index keys them by name); the names loaded."""
    used: list[str] = []

    def load(name, *args, **kwargs):
        used.append(name)
        loaded = FakeLoaded(PROMPTS)
        loaded.name = name  # as the real one: the name it was loaded by, which the index records
        return loaded

    monkeypatch.setattr("clipcli.pipeline.load_model", load)
    monkeypatch.setattr("clipcli.loading.resolve", lambda name, **kwargs: name)
    monkeypatch.setattr("clipcli.loading.source_key", lambda source: f"key-{source}")
    return used


def test_index_format_table_json_and_the_old_text(squares, named_models):
    for fmt, on_stdout in [("table", False), ("text", False), ("json", True)]:
        result = run("index", "sq", "--db", "i.sqlite3", "--format", fmt)
        assert result.exit_code in (0, 1) and bool(result.stdout) == on_stdout and "indexed:" in result.stderr


def test_search_and_index_default_to_the_model_the_index_holds(squares, named_models):
    assert run("index", "sq", "--db", "i.sqlite3", "-m", "my-model", "-q").exit_code == 1
    result = run("search", "red", "--db", "i.sqlite3", "-f", "jsonl", "-q")
    assert result.exit_code == 0 and named_models == ["my-model", "my-model"]
    assert json.loads(result.stdout.splitlines()[0])["image"].endswith("red.png")


def test_train_spells_arch_as_the_other_commands_do():
    from clipcli.train.presets import preset_name

    assert [preset_name(a) for a in ("ViT-B/32", "ViT-B-32", "vit-b-32", "ViT-B-32/openai", "RN50/openai", "tiny")] == [
        "ViT-B/32", "ViT-B/32", "ViT-B/32", "ViT-B/32", "RN50", "tiny"]
    assert preset_name("ViT-H-14") == "ViT-H-14"  # not a preset: the error names it


def test_old_spellings_still_work_for_a_release(squares, tmp_path):
    models = run("models", "--json")
    assert models.exit_code == 0 and isinstance(json.loads(models.stdout), list)
    result = run("train", "--train-data", "nowhere.csv", "--out", "run", "--zeroshot-template", "a {}.")
    assert result.exit_code == 2 and "nowhere.csv" in result.stderr  # --out and --zeroshot-template were taken


def test_search_print0_separates_paths_by_nul_and_paths_skips_a_name_with_a_line_break(squares, named_models):
    from PIL import Image

    Image.new("RGB", (16, 16), (250, 0, 0)).save(squares / "x\ny.png")
    assert run("index", "sq", "--db", "i.sqlite3", "-m", "my-model", "-q").exit_code == 1  # broken.png
    nul = CliRunner().invoke(app, ["search", "red", "--db", "i.sqlite3", "-0", "-k", "5"], catch_exceptions=False)
    paths = nul.stdout_bytes.split(b"\0")
    assert nul.exit_code == 0 and paths[-1] == b"" and any(p.endswith(b"x\ny.png") for p in paths)
    lines = run("search", "red", "--db", "i.sqlite3", "-f", "paths", "-k", "5")
    assert lines.exit_code == 1 and "x\ny.png" not in lines.stdout and "holds a line break; use --print0" in lines.stderr
    mixed = run("search", "red", "--db", "i.sqlite3", "-0", "-f", "json")
    assert mixed.exit_code == 2 and "--print0" in mixed.stderr
