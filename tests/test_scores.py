"""Scores that mean what the model family means: softmax over the candidates for CLIP, each
pair's own sigmoid probability for a model with a logit bias (SigLIP), and the ``score_kind``
every record carries.

The sigmoid model is a tiny random CLIP built with a logit bias (scale 10, bias -0.5, so its
probabilities spread over (0, 1)), handed to the commands in memory; the CLIP is the same
model without the bias. Expected values come from the model's own ``forward``.
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipcli import zeroshot
from clipcli.api import tokenize
from clipcli.cli import app
from clipcli.models.config import CLIPConfig
from clipcli.models.factory import create_model
from clipcli.pipeline import LoadedModel
from clipcli.preprocess import preprocess_for

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
LABELS = ["red", "green", "blue"]
SCALE, BIAS = math.log(10.0), -0.5


def tiny_model(bias: bool) -> torch.nn.Module:
    config = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                        transformer_layers=2, logit_bias=bias)
    torch.manual_seed(3)
    model = create_model(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(SCALE)
        if bias:
            model.logit_bias.fill_(BIAS)
    return model


def in_memory(model: torch.nn.Module, name: str) -> LoadedModel:
    """A loaded model with no file behind it: its identity is given, not hashed."""
    loaded = LoadedModel(model, preprocess_for(model.config), name, None, torch.device("cpu"), torch.float32)
    loaded.__dict__.update(sha256="0" * 64, identity=f"identity-of-{name}")  # the cached properties' values
    return loaded


@pytest.fixture(scope="module")
def siglip_model():
    return tiny_model(bias=True)


@pytest.fixture(scope="module")
def clip_model():
    return tiny_model(bias=False)


@pytest.fixture
def models(monkeypatch, siglip_model, clip_model):
    """``-m siglip`` and ``-m clip`` load the in-memory models; the index keys them by name."""
    table = {"siglip": siglip_model, "clip": clip_model}
    monkeypatch.setattr("clipcli.pipeline.load_model", lambda name, *a, **k: in_memory(table[name], name))
    monkeypatch.setattr("clipcli.loading.resolve", lambda name, **kwargs: name)
    monkeypatch.setattr("clipcli.loading.source_key", lambda source: f"key-{source}")
    return table


@pytest.fixture
def squares(tmp_path, monkeypatch):
    folder = tmp_path / "sq"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(folder / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    return folder


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def search(*args) -> list[dict]:
    result = run("search", *args, "--db", "i.sqlite3", "-f", "jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    return jsonl(result.stdout)


def forward_logits(model, folder, names, texts) -> torch.Tensor:
    """``model(images, texts)[0]``: logits per image ``[images, texts]``."""
    preprocess = preprocess_for(model.config)
    images = torch.stack([preprocess(Image.open(folder / f"{n}.png").convert("RGB")) for n in names])
    with torch.no_grad():
        return model(images, tokenize(texts))[0]


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory, siglip_model):
    """The sigmoid model as a safetensors file with its config, as ``clipcli convert`` writes it."""
    from clipcli.checkpoint import write_safetensors
    from clipcli.models.config import METADATA_KEY, config_to_json

    path = tmp_path_factory.mktemp("checkpoints") / "tiny-siglip.safetensors"
    write_safetensors(siglip_model.state_dict(), path, {"format": "pt", METADATA_KEY: config_to_json(siglip_model.config)})
    return path


# ----------------------------------------------------------------------------- the pure functions


def test_sigmoid_probabilities_are_each_pairs_own():
    cosine = torch.tensor([[0.1, -0.2, 0.35], [0.0, 0.9, -1.0]])
    probs = zeroshot.sigmoid_probabilities(cosine, torch.tensor(SCALE), torch.tensor(BIAS))
    torch.testing.assert_close(probs, torch.sigmoid(10.0 * cosine + BIAS), rtol=0, atol=1e-7)
    assert not torch.allclose(probs.sum(-1), torch.ones(2))  # multi-label: no reason to sum to 1
    same = zeroshot.label_probabilities(cosine, torch.tensor(SCALE), torch.tensor(BIAS))
    assert torch.equal(same, probs) and zeroshot.score_kind(BIAS) == "sigmoid" and zeroshot.score_kind(None) == "softmax"
    torch.testing.assert_close(zeroshot.label_probabilities(cosine, SCALE), (10.0 * cosine).softmax(-1))


@pytest.mark.parametrize("scale", [0.0, 100.0, 1e6, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("bias", [0.0, -1e38, 1e38, math.inf, -math.inf, math.nan])
def test_sigmoid_probabilities_are_finite_for_any_scale_and_bias(scale, bias):
    cosine = torch.tensor([-1.0, -0.3, 0.0, 0.3, 1.0])
    probs = zeroshot.sigmoid_probabilities(cosine, torch.tensor(scale), torch.tensor(bias))
    assert torch.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()


def test_top_k_keeps_only_labels_at_least_min_prob():
    probs = torch.tensor([[0.9, 0.05, 0.6], [0.1, 0.2, 0.3]])
    assert zeroshot.top_k(probs, ["a", "b", "c"], 3, min_prob=0.5) == [
        [("a", pytest.approx(0.9)), ("c", pytest.approx(0.6))], []]
    assert zeroshot.top_k(probs, ["a", "b", "c"], 1, min_prob=0.0)[1] == [("c", pytest.approx(0.3))]


@pytest.mark.parametrize("value", [-0.01, 1.5, math.nan, math.inf, "x"])
def test_a_min_prob_that_is_no_probability_is_refused(value):
    with pytest.raises(zeroshot.InputError, match="a number from 0 to 1"):
        zeroshot.check_probability(value)
    for good in (None, 0, 0.0, 0.5, 1):
        zeroshot.check_probability(good)


# ----------------------------------------------------------------------------- classify


def test_classify_reports_each_labels_sigmoid_probability(squares, models, siglip_model):
    names = ["blue", "green", "grey", "red"]  # the folder's order
    result = run("classify", "sq", "-m", "siglip", "-l", ",".join(LABELS), "-k", "3", "-f", "jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    expected = torch.sigmoid(forward_logits(siglip_model, squares, names, [f"a photo of a {c}." for c in LABELS]))
    for record, row in zip(records, expected):
        assert record["score_kind"] == "sigmoid"
        got = {t["label"]: t["score"] for t in record["top"]}
        assert got == pytest.approx({label: float(p) for label, p in zip(LABELS, row)}, abs=1e-6)
        assert [t["score"] for t in record["top"]] == sorted(got.values(), reverse=True)  # top-k by probability
        assert record["label"] == record["top"][0]["label"] and record["score"] == record["top"][0]["score"]
    sums = [sum(t["score"] for t in r["top"]) for r in records]
    assert all(abs(total - 1) > 1e-3 for total in sums), sums  # each its own probability, not a softmax


def test_a_checkpoint_with_a_logit_bias_classifies_and_searches_by_probability(squares, siglip_checkpoint, siglip_model):
    """The same through the real loader: the file's logit bias is read, whichever towers load."""
    names = ["blue", "green", "grey", "red"]
    result = run("classify", "sq", "-m", siglip_checkpoint, "-l", ",".join(LABELS), "-k", "3", "-f", "jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    expected = torch.sigmoid(forward_logits(siglip_model, squares, names, [f"a photo of a {c}." for c in LABELS]))
    for record, row in zip(jsonl(result.stdout), expected):
        assert record["score_kind"] == "sigmoid"
        assert {t["label"]: t["score"] for t in record["top"]} == pytest.approx(dict(zip(LABELS, row.tolist())), abs=1e-6)
    assert run("index", "sq", "--db", "i.sqlite3", "-m", siglip_checkpoint, "-q").exit_code == 0
    everything = search("a red square", "-k", "4")
    floor = sorted(r["prob"] for r in everything)[2]
    assert search("a red square", "-k", "4", "--min-prob", floor) == [r for r in everything if r["prob"] >= floor]


def test_classify_min_prob_keeps_labels_at_least_that_probable_and_every_image(squares, models, siglip_model):
    everything = jsonl(run("classify", "sq", "-m", "siglip", "-l", ",".join(LABELS), "-k", "3", "-f", "jsonl",
                           "-q").stdout)
    scores = sorted(t["score"] for r in everything for t in r["top"])
    floor = scores[len(scores) // 2]  # about half the labels reach it
    result = run("classify", "sq", "-m", "siglip", "-l", ",".join(LABELS), "-k", "3", "--min-prob", floor,
                 "-f", "jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    kept = jsonl(result.stdout)
    assert [r["image"] for r in kept] == [r["image"] for r in everything]  # nothing lost silently
    for before, after in zip(everything, kept):
        assert after["top"] == [t for t in before["top"] if t["score"] >= floor]
    none = run("classify", "sq/red.png", "-m", "siglip", "-l", ",".join(LABELS), "--min-prob", 1, "-f", "json", "-q")
    assert json.loads(none.stdout) == [{"image": "sq/red.png", "status": "ok", "label": None, "score": None,
                                        "top": [], "score_kind": "sigmoid"}]


def test_classify_min_prob_filters_softmax_probabilities_for_a_clip(squares, models):
    everything = jsonl(run("classify", "sq", "-m", "clip", "-l", ",".join(LABELS), "-k", "3", "-f", "jsonl",
                           "-q").stdout)
    assert {r["score_kind"] for r in everything} == {"softmax"}
    assert [sum(t["score"] for t in r["top"]) for r in everything] == pytest.approx([1.0] * 4, abs=1e-5)
    kept = jsonl(run("classify", "sq", "-m", "clip", "-l", ",".join(LABELS), "-k", "3", "--min-prob", 0.34,
                     "-f", "jsonl", "-q").stdout)
    assert [r["top"] for r in kept] == [[t for t in r["top"] if t["score"] >= 0.34] for r in everything]


@pytest.mark.parametrize("value", ["1.5", "-0.2", "nan"])
def test_classify_min_prob_out_of_range_is_a_usage_error(squares, models, value):
    result = run("classify", "sq", "-m", "siglip", "-l", "red", "--min-prob", value)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: --min-prob {float(value)}: give a probability, a number from 0 to 1\n"


def test_classify_csv_says_the_score_kind(squares, models):
    result = run("classify", "sq/red.png", "-m", "siglip", "-l", "red,blue", "-f", "csv", "-q")
    header, row = result.stdout.splitlines()
    assert header == "image,status,label,score,top,error,score_kind" and row.endswith(",sigmoid")


# ----------------------------------------------------------------------------- similarity


def test_similarity_gives_sigmoid_probabilities_for_a_sigmoid_model(squares, models, siglip_model):
    texts = ["a red square", "a blue square"]
    result = run("similarity", "sq/red.png", "sq/blue.png", "--text", texts[0], "--text", texts[1], "-m", "siglip",
                 "-f", "json", "-q")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    logits_per_text = forward_logits(siglip_model, squares, ["red", "blue"], texts).T  # (texts, images)
    np.testing.assert_allclose(out["probs"], torch.sigmoid(logits_per_text).numpy(), atol=1e-6)
    cosine = (logits_per_text - BIAS) / 10.0
    np.testing.assert_allclose(out["cosine"], cosine.numpy(), atol=1e-6)
    assert out["score_kind"] == "sigmoid"
    lines = jsonl(run("similarity", "sq/red.png", "--text", texts[0], "-m", "siglip", "-f", "jsonl", "-q").stdout)
    assert lines[0]["score_kind"] == "sigmoid"
    assert lines[0]["scores"][0]["prob"] == pytest.approx(out["probs"][0][0], abs=1e-7)
    matrix = run("similarity", "sq/red.png", "sq/blue.png", "--text", texts[0], "-m", "siglip", "-f", "csv", "-q")
    header, row = matrix.stdout.splitlines()
    assert header == "text,sq/red.png,sq/blue.png,score_kind"
    values = row.split(",")
    assert values[0] == texts[0] and values[-1] == "sigmoid"
    assert [float(v) for v in values[1:3]] == pytest.approx(out["probs"][0], abs=1e-7)  # the matrix: probabilities


def test_similarity_of_a_clip_keeps_cosine_and_softmax(squares, models):
    out = json.loads(run("similarity", "sq/red.png", "sq/blue.png", "--text", "red", "-m", "clip", "-f", "json",
                         "-q").stdout)
    assert out["score_kind"] == "softmax" and sum(out["probs"][0]) == pytest.approx(1.0, abs=1e-6)
    matrix = run("similarity", "sq/red.png", "sq/blue.png", "--text", "red", "-m", "clip", "-f", "csv", "-q")
    row = matrix.stdout.splitlines()[1].split(",")
    assert [float(v) for v in row[1:3]] == pytest.approx(out["cosine"][0], abs=1e-7) and row[-1] == "cosine"


def drawn(svg: bytes) -> list[str]:
    return re.findall(r"<!-- (.*?) -->", svg.decode())  # every string matplotlib drew, in order


def test_the_heatmap_of_a_sigmoid_model_shows_probabilities(squares, models, tmp_path):
    args = ["similarity", "sq/red.png", "sq/blue.png", "--text", "a red square", "--text", "a blue square"]
    assert run(*args, "-m", "siglip", "-o", "p.svg", "-q").exit_code == 0
    assert run(*args, "-m", "clip", "-o", "c.svg", "-q").exit_code == 0
    probability, cosine = drawn((tmp_path / "p.svg").read_bytes()), drawn((tmp_path / "c.svg").read_bytes())
    assert "probability" in probability and "Probability that each text matches each image (sigmoid)" in probability
    assert {"0.0", "1.0"} <= set(probability)  # the colour scale spans 0 to 1
    assert "cosine similarity" in cosine and "Cosine similarity between text and image features" in cosine
    assert "probability" not in cosine


def test_heatmap_kinds():
    from clipcli import heatmap

    out = io.BytesIO()
    heatmap.render(np.array([[0.3, 0.6]]), ["a"], ["x", "y"], None, out, "svg", kind="sigmoid", title="mine")
    assert "mine" in drawn(out.getvalue()) and "probability" in drawn(out.getvalue())
    with pytest.raises(ValueError, match="kind"):
        heatmap.render(np.eye(2), ["a", "b"], ["x", "y"], None, io.BytesIO(), kind="softmax")


# ----------------------------------------------------------------------------- search


def test_search_min_prob_equals_filtering_by_probability(squares, models):
    assert run("index", "sq", "--db", "i.sqlite3", "-m", "siglip", "-q").exit_code == 0
    everything = search("a red square", "-k", "4")
    assert len(everything) == 4 and {r["score_kind"] for r in everything} == {"sigmoid"}
    for record in everything:
        assert record["prob"] == pytest.approx(1 / (1 + math.exp(-(10.0 * record["score"] + BIAS))), abs=1e-6)
    probs = sorted(r["prob"] for r in everything)
    for floor in (0.0, (probs[1] + probs[2]) / 2, probs[-1], 1.0):
        assert search("a red square", "-k", "4", "--min-prob", floor) == [r for r in everything if r["prob"] >= floor]
    both = search("a red square", "-k", "4", "--min-prob", probs[0], "--threshold", everything[1]["score"])
    assert both == everything[:2]
    within = search("a red square", "-k", "4", "--min-prob", probs[2], "--in", "sq")  # loaded once, before the update
    assert within == [r for r in everything if r["prob"] >= probs[2]]


def test_search_min_prob_with_a_clip_index_is_a_usage_error(squares, models):
    assert run("index", "sq", "--db", "i.sqlite3", "-m", "clip", "-q").exit_code == 0
    records = search("a red square", "-k", "2")
    assert [sorted(r) for r in records] == [["height", "image", "rank", "score", "score_kind", "taken", "taken_source", "width"]] * 2
    assert {r["score_kind"] for r in records} == {"cosine"}
    result = run("search", "a red square", "--db", "i.sqlite3", "--min-prob", "0.5")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("error: --min-prob 0.5: clip has no calibrated probabilities (a softmax model: its "
                             "probabilities only compare the candidates of one query); use --threshold S with a "
                             "cosine instead\n")
    assert run("search", "red", "--db", "i.sqlite3", "--min-prob", "2").stderr.startswith("error: --min-prob 2.0: give")


def test_search_from_python_carries_the_probability(squares, siglip_model, tmp_path):
    from clipcli.index import Index
    from clipcli.indexing import update
    from clipcli.search import Term
    from clipcli.search import search as run_search

    loaded = in_memory(siglip_model, "siglip")
    with Index(tmp_path / "py.sqlite3") as index:
        update(index, [str(squares)], "key", lambda: loaded)
        hits = run_search(index, loaded, [Term("a green square")], top_k=4)
        kept = run_search(index, loaded, [Term("a green square")], top_k=4, min_prob=hits[1].prob)
    assert [h.prob for h in hits] == pytest.approx(
        torch.sigmoid(10.0 * torch.tensor([h.score for h in hits], dtype=torch.float64) + BIAS).tolist(), abs=1e-6)
    assert kept == hits[:2] and [h.rank for h in kept] == [1, 2]


def test_the_contact_sheet_shows_the_probability_when_there_is_one(squares):
    from clipcli.index import Hit
    from clipcli.sheet import render

    hits = [Hit(1, str(squares / "red.png").encode(), 0.25), Hit(2, str(squares / "blue.png").encode(), 0.125)]
    plain, with_prob = io.BytesIO(), io.BytesIO()
    render(hits, plain)
    render([Hit(h.rank, h.path, h.score, prob=0.75) for h in hits], with_prob)
    assert Image.open(plain).size == Image.open(with_prob).size  # the same layout, one caption longer
    assert plain.getvalue() != with_prob.getvalue()
