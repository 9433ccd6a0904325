"""Issue 22's "Done when", tried as a new user would: a Hugging Face cache holding a tiny SigLIP 2
(transformers layout, Gemma-style tokenizer trained here), a tiny OpenCLIP SigLIP (timm trunk)
and a tiny MetaCLIP 2 "worldwide" (XLM-V-style tokenizer), then the real CLI on a folder of
photos: ``classify`` prints each label's own sigmoid probability (``--min-prob`` filters),
``index`` + ``search --min-prob`` work, a Chinese query and French labels are answered by the
multilingual models, ``clipcli models`` lists the families, and ``clipcli.load`` /
``clipcli.tokenize`` give what the reference gives.

Every number is checked against the reference implementation run the way its users run it,
on the same photos: transformers (``SiglipModel``/``MetaClip2Model``, the repository's own
tokenizer through ``AutoTokenizer``, its PIL image processor) and open_clip
(``create_model_from_pretrained``/``get_tokenizer`` on ``hf-hub:`` names reading the same
cache). Labels go through ``classify``'s default template, "a photo of a {}.". SigLIP's text
is padded to the full context and read without an attention mask, as it was trained (and as
open_clip and big_vision run it).

Tolerance: 1e-4 on probabilities and cosines (float32), as the other parity tests; measured
differences are printed (``pytest -s``). The photos are PNGs, so clipcli's default decoding is
the reference's; a JPEG is checked with ``--exact-decode`` (by default a large JPEG decodes at a
reduced scale, which is documented to differ).

The tiny OpenCLIP SigLIP's timm trunk is registered in timm and in clipcli's table of trunks it
knows (as tests/test_siglip.py does): released SigLIPs use timm's own names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny_hub_repos as repos
import torch
from foreign import features, hf_cache_repo
from PIL import Image
from typer.testing import CliRunner

import clipcli
from clipcli.cli import app

TOLERANCE = 1e-4
TEMPLATE = "a photo of a {}."  # classify's default template (its --help says so)
DATA = Path(__file__).parent / "data"
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png")  # camera.png is greyscale: converted to RGB
JPEG = "rocket.jpg"
REPOS = {"siglip2": "tiny/siglip2", "open_clip": "tiny/open-clip-siglip", "metaclip2": "tiny/metaclip2"}


@dataclass
class Hub:
    root: Path  # the working folder: photos/ is in it
    cache: Path  # HF_HUB_CACHE
    snapshots: dict[str, Path]
    references: dict[str, torch.nn.Module]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Hub:
    """The three tiny repositories in a fake HF cache, and a folder of photos."""
    root = tmp_path_factory.mktemp("siglip-e2e")
    cache, built = root / "hf-home" / "hub", root / "built"  # $HF_HOME/hub, the default layout
    made = {"siglip2": repos.siglip2_transformers(built / "siglip2"),
            "open_clip": repos.siglip_open_clip(built / "open_clip", REPOS["open_clip"]),
            "metaclip2": repos.metaclip2_transformers(built / "metaclip2")}
    snapshots = {key: hf_cache_repo(cache, REPOS[key], folder) for key, (folder, _) in made.items()}
    # An OpenCLIP repository has no config.json; a cache that downloaded it online recorded that
    # (transformers' AutoTokenizer asks for one), as huggingface_hub does: .no_exist/<commit>/NAME.
    snapshot = snapshots["open_clip"]
    (snapshot.parents[1] / ".no_exist" / snapshot.name).mkdir(parents=True)
    (snapshot.parents[1] / ".no_exist" / snapshot.name / "config.json").touch()
    (root / "photos").mkdir()
    for name in PHOTOS:
        shutil.copy(DATA / name, root / "photos" / name)
    (root / "jpeg").mkdir()
    shutil.copy(DATA / JPEG, root / "jpeg" / JPEG)
    return Hub(root, cache, snapshots, {key: model for key, (_, model) in made.items()})


@pytest.fixture(autouse=True)
def fake_hf_cache(hub, isolated_home, monkeypatch):
    """HF_HUB_CACHE is the fake cache (after conftest's isolated_home cleared it), offline;
    the working directory holds photos/; the tiny trunk is one clipcli knows."""
    from clipcli.models import convert_siglip

    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import by huggingface_hub
    monkeypatch.setitem(convert_siglip.TIMM_SIZES, repos.TINY_TRUNK.split("_")[1], repos.SIGLIP_TRUNK_SIZES)
    monkeypatch.setitem(convert_siglip.TIMM_TRUNKS, repos.TINY_TRUNK, "gelu_tanh")
    monkeypatch.chdir(hub.root)


def run(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return result.stdout


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def by_image(records: list[dict]) -> dict[str, dict]:
    return {Path(r["image"]).name: r for r in records}


def photos(names=PHOTOS, folder: str = "photos") -> list[Image.Image]:
    return [Image.open(Path(folder) / name).convert("RGB") for name in names]


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


# ----------------------------------------------------------------------------- the references


def transformers_ids(hub: Hub, key: str, texts: list[str], context: int) -> torch.Tensor:
    """The repository's tokenizer as transformers loads it, padded to the full context. SigLIP 2
    was trained on lower-cased text (transformers' Siglip2Tokenizer lower-cases; the model card
    asks users to), so its texts are lower-cased first."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hub.snapshots[key]))
    if key == "siglip2":
        assert type(tokenizer).__name__ == "GemmaTokenizer"
        texts = [t.lower() for t in texts]
    return tokenizer(texts, padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids


def transformers_pixels(hub: Hub, key: str, images: list[Image.Image]) -> torch.Tensor:
    """The repository's image processor (PIL backend: the one that decodes as Pillow does)."""
    if key == "siglip2":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as Processor
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    return Processor.from_pretrained(str(hub.snapshots[key]))(images=images, return_tensors="pt").pixel_values


def siglip2_probs(hub: Hub, texts: list[str], images: list[Image.Image]) -> torch.Tensor:
    """``sigmoid(SiglipModel(...).logits_per_image)``: [images, texts]."""
    ids = transformers_ids(hub, "siglip2", texts, repos.SIGLIP2_CONTEXT)
    with torch.no_grad():
        logits = hub.references["siglip2"](pixel_values=transformers_pixels(hub, "siglip2", images),
                                           input_ids=ids).logits_per_image
    return torch.sigmoid(logits)


@pytest.fixture(scope="module")
def open_clip_reference(hub):
    """open_clip's model, preprocess and tokenizer for ``hf-hub:tiny/open-clip-siglip``, read from
    the fake cache."""
    import open_clip

    name = "hf-hub:" + REPOS["open_clip"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        model, preprocess = open_clip.create_model_from_pretrained(name, device="cpu", cache_dir=str(hub.cache))
        tokenizer = open_clip.get_tokenizer(name, cache_dir=str(hub.cache))
    return model.eval(), preprocess, tokenizer


def open_clip_probs(reference, texts: list[str], images: list[Image.Image]) -> torch.Tensor:
    model, preprocess, tokenizer = reference
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text = model.encode_text(tokenizer(texts), normalize=True)
        return torch.sigmoid(model.logit_scale.exp() * image @ text.T + model.logit_bias)


def metaclip2_logits(hub: Hub, texts: list[str], images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """``MetaClip2Model``'s ``logits_per_image`` and the cosines under them: [images, texts]."""
    model = hub.references["metaclip2"]
    ids = transformers_ids(hub, "metaclip2", texts, model.config.text_config.max_position_embeddings)
    with torch.no_grad():
        out = model(pixel_values=transformers_pixels(hub, "metaclip2", images), input_ids=ids)
    return out.logits_per_image, out.logits_per_image / model.logit_scale.exp()


def classify(model: str, labels: str, *more) -> dict[str, dict]:
    return by_image(jsonl(run("classify", "photos", "--labels", labels, "-m", model, "--format", "jsonl", "-q",
                              *more)))


def scores(record: dict) -> dict[str, float]:
    return {t["label"]: t["score"] for t in record["top"]}


def check_sigmoid_records(records: dict[str, dict], expected: torch.Tensor, labels: list[str], what: str) -> None:
    assert sorted(records) == sorted(PHOTOS)
    worst = max(max_diff([scores(records[name])[label] for label in labels], row)
                for name, row in zip(PHOTOS, expected))
    print(f"\n{what}: max |clipcli - reference| probability {worst:.1e}")
    assert worst <= TOLERANCE
    for record in records.values():
        assert record["score_kind"] == "sigmoid" and record["status"] == "ok"
        assert [t["score"] for t in record["top"]] == sorted(scores(record).values(), reverse=True)
    sums = [sum(scores(r).values()) for r in records.values()]
    assert all(abs(total - 1) > 1e-3 for total in sums), sums  # each label its own probability
    spread = expected.flatten()
    assert ((spread > 0.02) & (spread < 0.98)).sum() >= len(spread) // 2, spread  # not saturated: a real check


# ----------------------------------------------------------------------------- classify


def test_classify_with_the_transformers_siglip2_repo_prints_each_labels_probability(hub):
    labels = ["cat", "dog"]
    records = classify("hf-hub:" + REPOS["siglip2"], ",".join(labels))
    expected = siglip2_probs(hub, [TEMPLATE.format(label) for label in labels], photos())
    check_sigmoid_records(records, expected, labels, "classify hf-hub:tiny/siglip2")


@pytest.mark.slow  # a whole installed process: run in `pytest -m slow`
def test_the_installed_command_reads_hf_home(hub, tmp_path):
    """``python -m clipcli`` in its own process, the cache found through ``$HF_HOME`` as a user
    sets it (``$HF_HOME/hub``), no HF_HUB_CACHE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hub.cache.parent), HF_HUB_OFFLINE="1")
    labels = ["cat", "dog"]
    done = subprocess.run([sys.executable, "-m", "clipcli", "classify", "photos/", "--labels", ",".join(labels), "-m",
                           "hf-hub:" + REPOS["siglip2"], "--format", "jsonl"], capture_output=True, text=True, env=env,
                          cwd=hub.root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("classified 3 images")  # the summary on stderr, the records alone on stdout
    expected = siglip2_probs(hub, [TEMPLATE.format(label) for label in labels], photos())
    check_sigmoid_records(by_image(jsonl(done.stdout)), expected, labels, "python -m clipcli classify")


def test_a_converted_siglip_keeps_its_tokenizer_beside_it(hub, tmp_path):
    """``clipcli convert`` writes one safetensors file and copies the model's own tokenizer files
    beside it, where loading finds them: the converted file classifies as the repository does."""
    out = tmp_path / "converted" / "siglip2.safetensors"
    run("convert", "hf-hub:" + REPOS["siglip2"], str(out))
    assert sorted(p.name for p in out.parent.iterdir()) == ["siglip2.safetensors", "special_tokens_map.json",
                                                            "tokenizer.json", "tokenizer_config.json"]
    labels = ["cat", "dog"]
    records = classify(str(out), ",".join(labels))
    expected = siglip2_probs(hub, [TEMPLATE.format(label) for label in labels], photos())
    check_sigmoid_records(records, expected, labels, "classify converted siglip2")


def test_convert_replaces_another_models_tokenizer_only_when_told(hub, tmp_path):
    """A folder already holding another tokenizer's files: converting into it is refused without
    --overwrite (loading would take those files for this model's), and with it they go."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "spiece.model").write_bytes(b"another model's vocabulary")
    result = CliRunner().invoke(app, ["convert", "hf-hub:" + REPOS["siglip2"], str(out / "m.safetensors")])
    assert result.exit_code != 0 and "spiece.model already exists" in result.stderr
    assert not (out / "m.safetensors").exists()
    run("convert", "hf-hub:" + REPOS["siglip2"], str(out / "m.safetensors"), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["m.safetensors", "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]


def test_convert_without_a_tokenizer_converts_the_weights_and_says_so(hub, tmp_path):
    """A SigLIP folder without its tokenizer files still converts (its images embed); the summary
    says the tokenizer was not copied."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(hub.snapshots["siglip2"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    result = CliRunner().invoke(app, ["convert", str(folder), str(tmp_path / "c" / "m.safetensors")])
    assert result.exit_code == 0, result.stderr
    assert "its tokenizer was not copied beside it" in result.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["m.safetensors"]


def test_classify_min_prob_keeps_the_labels_that_probable_and_every_image(hub):
    model = "hf-hub:" + REPOS["siglip2"]
    everything = classify(model, "cat,dog")
    values = sorted(t["score"] for r in everything.values() for t in r["top"])
    floor = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2  # about half the labels reach it
    kept = classify(model, "cat,dog", "--min-prob", floor)
    assert sorted(kept) == sorted(everything)  # no image dropped
    for name, record in kept.items():
        assert record["top"] == [t for t in everything[name]["top"] if t["score"] >= floor]
        assert record["label"] == (record["top"][0]["label"] if record["top"] else None)
    assert 0 < sum(len(r["top"]) for r in kept.values()) < len(values)  # the floor did filter


def test_classify_with_the_open_clip_siglip_repo_matches_open_clip(hub, open_clip_reference):
    labels = ["cat", "dog"]
    records = classify("hf-hub:" + REPOS["open_clip"], ",".join(labels))
    expected = open_clip_probs(open_clip_reference, [TEMPLATE.format(label) for label in labels], photos())
    check_sigmoid_records(records, expected, labels, "classify hf-hub:tiny/open-clip-siglip")


def test_a_jpeg_decoded_exactly_matches_the_reference(hub):
    labels = ["cat", "dog"]
    out = jsonl(run("classify", f"jpeg/{JPEG}", "-l", ",".join(labels), "-m", "hf-hub:" + REPOS["siglip2"],
                    "--exact-decode", "-f", "jsonl", "-q"))
    expected = siglip2_probs(hub, [TEMPLATE.format(label) for label in labels], photos([JPEG], "jpeg"))[0]
    diff = max_diff([scores(out[0])[label] for label in labels], expected)
    print(f"\nclassify --exact-decode {JPEG}: max |clipcli - reference| probability {diff:.1e}")
    assert diff <= TOLERANCE


# ----------------------------------------------------------------------------- index + search


def search(query: str, db: Path, *more) -> list[dict]:
    return json.loads(run("search", query, "--db", db, "--format", "json", "-q", *more))


def test_index_then_search_min_prob_with_siglip2(hub, tmp_path):
    db = tmp_path / "x.db"
    run("index", "photos/", "--db", db, "-m", "hf-hub:" + REPOS["siglip2"], "-q")
    everything = search("a cat", db, "-k", "10")
    assert sorted(Path(r["image"]).name for r in everything) == sorted(PHOTOS)
    assert {r["score_kind"] for r in everything} == {"sigmoid"}
    expected = siglip2_probs(hub, ["a cat"], photos())[:, 0]
    got = by_image(everything)
    diff = max_diff([got[name]["prob"] for name in PHOTOS], expected)
    print(f"\nsearch 'a cat' (hf-hub:tiny/siglip2): max |clipcli - reference| probability {diff:.1e}")
    assert diff <= TOLERANCE
    probs = sorted(r["prob"] for r in everything)
    for floor in (0.0, (probs[0] + probs[1]) / 2, (probs[1] + probs[2]) / 2, 1.0):
        assert search("a cat", db, "-k", "10", "--min-prob", floor) == [r for r in everything if r["prob"] >= floor]


def test_a_chinese_query_is_answered_by_siglip2_and_metaclip2(hub, tmp_path):
    """SigLIP 2's Gemma vocabulary and MetaCLIP 2's XLM-V one are multilingual: ``一只猫`` is
    real pieces (no unknown token), and the scores are the reference's."""
    query = "一只猫"
    for key, unk in (("siglip2", 3), ("metaclip2", 3)):  # Gemma's <unk> 3, XLM-R's fairseq <unk> 3
        ids = transformers_ids(hub, key, [query], 16)[0]
        assert unk not in ids.tolist() and len([i for i in ids.tolist() if i > 4]) >= 2, (key, ids)
    run("index", "photos", "--db", tmp_path / "s.db", "-m", "hf-hub:" + REPOS["siglip2"], "-q")
    got = by_image(search(query, tmp_path / "s.db", "-k", "10"))
    expected = siglip2_probs(hub, [query], photos())[:, 0]
    siglip_diff = max_diff([got[name]["prob"] for name in PHOTOS], expected)
    low, high = sorted(expected.tolist())[:2]
    floor = (low + high) / 2  # between two probabilities: the lowest photo is left out
    kept = search(query, tmp_path / "s.db", "-k", "10", "--min-prob", floor)
    assert sorted(Path(r["image"]).name for r in kept) == sorted(n for n, p in zip(PHOTOS, expected) if p >= floor)

    run("index", "photos", "--db", tmp_path / "m.db", "-m", "hf-hub:" + REPOS["metaclip2"], "-q")
    results = search(query, tmp_path / "m.db", "-k", "10")
    assert {r["score_kind"] for r in results} == {"cosine"} and all("prob" not in r for r in results)
    _, cosine = metaclip2_logits(hub, [query], photos())
    got = by_image(results)
    metaclip_diff = max_diff([got[name]["score"] for name in PHOTOS], cosine[:, 0])
    print(f"\nsearch {query!r}: max |clipcli - reference| SigLIP 2 probability {siglip_diff:.1e}, "
          f"MetaCLIP 2 cosine {metaclip_diff:.1e}")
    assert siglip_diff <= TOLERANCE and metaclip_diff <= TOLERANCE
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def test_classify_with_french_labels_on_the_multilingual_models(hub, open_clip_reference):
    labels = ["chat", "chien"]
    prompts = [TEMPLATE.format(label) for label in labels]
    records = classify("hf-hub:" + REPOS["metaclip2"], ",".join(labels))
    logits, _ = metaclip2_logits(hub, prompts, photos())
    expected = logits.softmax(dim=-1)
    diff = max_diff([[scores(records[name])[label] for label in labels] for name in PHOTOS], expected)
    print(f"\nclassify chat,chien (hf-hub:tiny/metaclip2, softmax): max |clipcli - reference| {diff:.1e}")
    assert diff <= TOLERANCE
    assert {r["score_kind"] for r in records.values()} == {"softmax"}
    assert all(abs(sum(scores(r).values()) - 1) < 1e-5 for r in records.values())
    check_sigmoid_records(classify("hf-hub:" + REPOS["siglip2"], ",".join(labels)), siglip2_probs(hub, prompts, photos()),
                          labels, "classify chat,chien (hf-hub:tiny/siglip2)")


# ----------------------------------------------------------------------------- clipcli models


def test_models_lists_siglip_siglip2_and_metaclip2(hub):
    records = json.loads(run("models", "-f", "json"))
    by_family: dict[str, list[dict]] = {}
    for record in records:
        by_family.setdefault(record["family"], []).append(record)
    names = {family: {r["name"] for r in by_family.get(family, [])} for family in ("SigLIP", "SigLIP 2", "MetaCLIP 2")}
    assert {"ViT-B-16-SigLIP/webli", "hf-hub:google/siglip-base-patch16-224",
            "hf-hub:google/siglip-base-patch16-256-multilingual"} <= names["SigLIP"]
    assert {"ViT-B-16-SigLIP2/webli", "hf-hub:google/siglip2-base-patch16-224",
            "hf-hub:google/siglip2-so400m-patch16-384"} <= names["SigLIP 2"]
    assert {"ViT-H-14-worldwide/metaclip2_worldwide", "hf-hub:facebook/metaclip-2-worldwide-huge-quickgelu"} \
        <= names["MetaCLIP 2"]
    for family, kind in (("SigLIP", "sigmoid"), ("SigLIP 2", "sigmoid"), ("MetaCLIP 2", "softmax")):
        for record in by_family[family]:
            assert record["score_kind"] == kind and record["parameters"] > 0 and record["input_resolution"] > 0
            assert record["license"] and record["cached"] is False, record
    siglip2 = next(r for r in records if r["name"] == "hf-hub:google/siglip2-base-patch16-224")
    assert (siglip2["input_resolution"], siglip2["imagenet_top1"], siglip2["license"]) == (224, 78.2, "Apache-2.0")
    assert all(r["multilingual"] for r in by_family["SigLIP 2"] + by_family["MetaCLIP 2"])
    table = run("models", "-f", "table")
    assert all(name in table for name in ("ViT-B-16-SigLIP2/webli", "google/siglip2-base-patch16-224",
                                          "ViT-H-14-worldwide/metaclip2_worldwide"))


# ----------------------------------------------------------------------------- Python API


def test_load_and_tokenize_from_python_match_transformers(hub):
    reference = hub.references["siglip2"]
    model, preprocess = clipcli.load("hf-hub:" + REPOS["siglip2"], device="cpu")
    assert model.score_kind == "sigmoid" and model.context_length == repos.SIGLIP2_CONTEXT
    assert model.config.vocab_size == repos.GEMMA_VOCAB
    images = photos()
    pixels = torch.stack([preprocess(image) for image in images])
    reference_pixels = transformers_pixels(hub, "siglip2", images)
    # lower-cased and nothing else, as transformers' Siglip2Tokenizer: full-width forms, ligatures
    # and whitespace runs stay as they are (open_clip's cleanings would change them)
    texts = ["a photo of a cat.", "A Dog", "一只猫", "two cats and 3 dogs", "ＦＵＬＬ width ﬁne", "  spaces   here  "]
    tokens = clipcli.tokenize(texts, model=model)
    expected_ids = transformers_ids(hub, "siglip2", texts, repos.SIGLIP2_CONTEXT)
    assert tokens.shape == (len(texts), repos.SIGLIP2_CONTEXT) and torch.equal(tokens, expected_ids)
    assert (tokens[:, -1] == 0).all()  # padded with <pad> (0) to the full context, read at the last position
    with torch.no_grad():
        pixel_diff = max_diff(pixels, reference_pixels)
        image_diff = max_diff(model.encode_image(pixels), features(reference.get_image_features(pixel_values=pixels)))
        text_diff = max_diff(model.encode_text(tokens), features(reference.get_text_features(input_ids=tokens)))
        probs = torch.sigmoid(model(pixels, tokens)[0])
        expected = torch.sigmoid(reference(pixel_values=reference_pixels, input_ids=expected_ids).logits_per_image)
    prob_diff = max_diff(probs, expected)
    print(f"\nclipcli.load(hf-hub:tiny/siglip2): max |clipcli - transformers| preprocess {pixel_diff:.1e}, "
          f"encode_image {image_diff:.1e}, encode_text {text_diff:.1e}, probabilities {prob_diff:.1e}")
    assert pixel_diff <= 1e-6 and max(image_diff, text_diff, prob_diff) <= TOLERANCE


def test_load_and_tokenize_the_open_clip_repo_match_open_clip(hub, open_clip_reference):
    model, preprocess = clipcli.load("hf-hub:" + REPOS["open_clip"], device="cpu")
    reference, reference_preprocess, reference_tokenizer = open_clip_reference
    texts = ["A photo of a Cat!", "a_dog", "one  two   three"]
    tokens = clipcli.tokenize(texts, model=model)
    assert tokens.shape == (len(texts), repos.OPEN_CLIP_CONTEXT) and torch.equal(tokens, reference_tokenizer(texts))
    images = photos()
    pixels = torch.stack([preprocess(i) for i in images])
    assert max_diff(pixels, torch.stack([reference_preprocess(i) for i in images])) <= 1e-6
    with torch.no_grad():
        diff = max_diff(torch.sigmoid(model(pixels, tokens)[0]), open_clip_probs(open_clip_reference, texts, images))
    print(f"\nclipcli.load(hf-hub:tiny/open-clip-siglip): max |clipcli - open_clip| probabilities {diff:.1e}")
    assert diff <= TOLERANCE


# ----------------------------------------------------------------------------- serve


def test_serve_answers_a_siglip2_index_with_its_probabilities(hub, tmp_path):
    """``clipcli serve``'s search and classify on SigLIP 2 equal the commands', probabilities included."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from clipcli.serve.app import create_app
    from clipcli.serve.service import Service, Settings

    db = tmp_path / "x.db"
    model = "hf-hub:" + REPOS["siglip2"]
    run("index", "photos/", "--db", db, "-m", model, "-q")
    expected = search("a cat", db, "-k", "10")
    probs = sorted(r["prob"] for r in expected)
    # A floor midway in the widest gap: a warm server's later queries run on packed weights
    # (clipcli.models.packed), equal to about 1e-6, so a floor on a result could go either way.
    gap = max(range(len(probs) - 1), key=lambda i: probs[i + 1] - probs[i])
    floor = (probs[gap] + probs[gap + 1]) / 2
    service = Service(Settings(model, db=str(db), load=dict(device="cpu")))
    with TestClient(create_app(service), base_url="http://127.0.0.1") as client:
        assert service.wait(60) and service.status == "ok", service.error
        assert client.get("/health").json()["score"] == "sigmoid"
        got = client.get("/api/search", params={"q": "a cat", "k": 10}).json()
        assert got["score_kind"] == "sigmoid" and [r["image"] for r in got["results"]] == [r["image"] for r in expected]
        assert max_diff([r["prob"] for r in got["results"]], [r["prob"] for r in expected]) <= 1e-5
        kept = client.get("/api/search", params={"q": "a cat", "k": 10, "min_prob": floor}).json()["results"]
        assert [r["image"] for r in kept] == [r["image"] for r in expected if r["prob"] >= floor]
        files = [("image", (name, (hub.root / "photos" / name).read_bytes(), "image/png")) for name in PHOTOS]
        answer = client.post("/api/classify", files=files, data={"labels": "cat,rocket,woman"}).json()["results"]
    commands = by_image(jsonl(run("classify", *[f"photos/{n}" for n in PHOTOS], "-l", "cat,rocket,woman", "-f", "jsonl",
                                  "-m", model, "-q")))
    for record in answer:
        theirs = commands[record["image"]]
        assert record["score_kind"] == "sigmoid" and record["label"] == theirs["label"]
        assert max_diff([t["score"] for t in record["top"]], [t["score"] for t in theirs["top"]]) <= 1e-5
