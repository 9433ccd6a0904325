"""clipcli's SentencePiece readers give the references' ids.

The ``.model`` reader (:mod:`clipcli.text.sentencepiece`) is checked against ``sentencepiece``
itself, the ``tokenizer.json`` reader (:mod:`clipcli.text.tokenizer_json`) against the
``tokenizers`` library running the same file, on vocabularies trained here for each family
(:mod:`spm_models`): a multilingual corpus, edge cases, random strings, every model option, and
damaged files, which must give one CheckpointError naming the file. Ids are compared exactly.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spm_models import ALPHABET, BASE, EDGE_CASES, corpus, hf_folder, model_file, workdir

from clipcli.errors import CheckpointError
from clipcli.text.pieces import word_pattern
from clipcli.text.sentencepiece import SentencePiece
from clipcli.text.tokenizer_json import JsonTokenizer

sentencepiece = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
from sentencepiece import sentencepiece_model_pb2 as pb  # noqa: E402

KINDS = ("t5", "gemma", "xlmv", "unigram_bytes")
# Exact score ties (a run is "xx"+"xxxx" or "xxxx"+"xx"), settled by how the reference's sums round.
TIES = [c * n for c in "xaz한" for n in (7, 16, 33, 100)] + ["ha" * 20, "abab" * 9 + " " + "x" * 50, "a photo " + "x" * 64]
TEXTS = corpus(600, seed=1) + BASE + EDGE_CASES + TIES
RANDOM_TEXT = st.text(alphabet=st.sampled_from(ALPHABET), max_size=40)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models() -> dict:
    """Ours and sentencepiece's processor for each trained model."""
    return {kind: (SentencePiece.from_file(model_file(kind)),
                   sentencepiece.SentencePieceProcessor(model_file=str(model_file(kind)))) for kind in KINDS}


def _mismatches(encode, reference, texts) -> list:
    return [(text[:40], encode(text)[:12], reference(text)[:12]) for text in texts if encode(text) != reference(text)]


@pytest.mark.parametrize("kind", KINDS)
def test_reads_the_protobuf_as_sentencepiece_does(kind):
    proto = pb.ModelProto()
    proto.ParseFromString(model_file(kind).read_bytes())
    ours = SentencePiece.from_file(model_file(kind)).proto
    assert ours.pieces == [p.piece for p in proto.pieces]
    assert ours.scores == [p.score for p in proto.pieces]  # float32 values, read exactly
    assert ours.types == [p.type for p in proto.pieces]
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    for name in ("model_type", "byte_fallback", "split_digits", "treat_whitespace_as_suffix", "unk_id", "bos_id",
                 "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece", "pad_piece"):
        assert getattr(ours, name) == getattr(trainer, name), name
    assert (ours.normalizer_name, ours.precompiled_charsmap, ours.add_dummy_prefix, ours.remove_extra_whitespaces,
            ours.escape_whitespaces) == (normalizer.name, normalizer.precompiled_charsmap, normalizer.add_dummy_prefix,
                                         normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces)


@pytest.mark.parametrize("kind", KINDS)
def test_normalizes_and_encodes_as_sentencepiece(models, kind):
    ours, reference = models[kind]
    assert _mismatches(ours.normalize, reference.normalize, TEXTS) == []
    assert _mismatches(ours.encode, reference.encode, TEXTS) == []
    # The corpus reaches what it is meant to: unknown characters, byte pieces or merged <unk>s.
    ids = {i for text in TEXTS for i in ours.encode(text)}
    assert (ours.unk_id in ids) != ours.proto.byte_fallback
    assert ours.encode("") == [] and ours.encode("   ") == reference.encode("   ")


def test_settles_exact_ties_as_sentencepiece(models):
    """Runs of one letter tie exactly; the answer depends on float rounding at the run's offset."""
    ours, reference = models["xlmv"]
    texts = [f"{'word ' * k}{run}" for k in (0, 3, 40) for run in TIES]
    assert _mismatches(ours.encode, reference.encode, texts) == []


@FUZZ
@given(text=RANDOM_TEXT)
def test_random_text_as_sentencepiece(models, text):
    for kind, (ours, reference) in models.items():
        assert ours.normalize(text) == reference.normalize(text), kind
        assert ours.encode(text) == reference.encode(text), kind


def _edited(kind: str, edit) -> tuple[SentencePiece, object]:
    proto = pb.ModelProto()
    proto.ParseFromString(model_file(kind).read_bytes())
    edit(proto)
    path = workdir() / f"edited-{kind}-{edit.__name__}.model"
    path.write_bytes(proto.SerializeToString())
    return SentencePiece.from_file(path), sentencepiece.SentencePieceProcessor(model_file=str(path))


def _pieces(proto, count: int):
    """The longest normal pieces (those a segmentation uses most visibly)."""
    normal = [p for p in proto.pieces if p.type == 1 and len(p.piece) > 1]
    return sorted(normal, key=lambda p: -len(p.piece))[:count]


def no_dummy_prefix(proto):
    proto.normalizer_spec.add_dummy_prefix = False


def keep_whitespace(proto):
    proto.normalizer_spec.remove_extra_whitespaces = False


def no_escaping(proto):
    proto.normalizer_spec.escape_whitespaces = False


def whitespace_suffix(proto):
    proto.trainer_spec.treat_whitespace_as_suffix = True


def identity(proto):
    proto.normalizer_spec.precompiled_charsmap = b""


def user_defined(proto):
    for piece in _pieces(proto, 30)[::3]:
        piece.type = 4


def unused(proto):
    for piece in _pieces(proto, 60)[::2]:
        piece.type = 5


def spanning_piece(proto):  # a piece across a space: words can no longer be segmented apart
    _pieces(proto, 1)[0].piece = "s\u2581a"


@pytest.mark.parametrize("kind, edit", [
    ("t5", no_dummy_prefix), ("t5", keep_whitespace), ("t5", no_escaping), ("t5", whitespace_suffix),
    ("t5", identity), ("t5", user_defined), ("t5", unused), ("t5", spanning_piece), ("xlmv", keep_whitespace),
    ("gemma", unused), ("gemma", user_defined), ("gemma", spanning_piece), ("unigram_bytes", unused),
])
def test_every_model_option_as_sentencepiece(kind, edit):
    ours, reference = _edited(kind, edit)
    texts = TEXTS[:300] + BASE + EDGE_CASES + ["s a s a", " ⁇ x  y ", "  \t a"]
    assert _mismatches(ours.normalize, reference.normalize, texts) == []
    assert _mismatches(ours.encode, reference.encode, texts) == []
    if edit is spanning_piece:
        assert word_pattern(ours.pieces) is None


# --------------------------------------------------------------------------- tokenizer.json


@pytest.fixture(scope="module")
def json_tokenizers() -> dict:
    return {kind: (JsonTokenizer.from_file(hf_folder(kind) / "tokenizer.json"),
                   tokenizers.Tokenizer.from_file(str(hf_folder(kind) / "tokenizer.json"))) for kind in ("t5", "gemma", "xlmv")}


def _with_specials(ours: JsonTokenizer):
    return lambda text: ours.prefix + ours.encode(text) + ours.suffix


JSON_TEXTS = TEXTS + ["hello</s>world", "<s>a</s>", "x<start_of_turn>y <end_of_turn> z", "<pad><unk>", "<mask> a"]


@pytest.mark.parametrize("kind", ("t5", "gemma", "xlmv"))
def test_tokenizer_json_as_tokenizers(json_tokenizers, kind):
    ours, reference = json_tokenizers[kind]
    assert _mismatches(_with_specials(ours), lambda text: reference.encode(text).ids, JSON_TEXTS) == []
    assert ours.vocab_size == reference.get_vocab_size()


@FUZZ
@given(text=RANDOM_TEXT)
def test_random_text_as_tokenizers(json_tokenizers, text):
    for kind, (ours, reference) in json_tokenizers.items():
        assert _with_specials(ours)(text) == reference.encode(text).ids, kind


def _variants():
    from tokenizers import AddedToken, Regex, processors
    from tokenizers import normalizers as n
    from tokenizers import pre_tokenizers as p

    metaspace = dict(replacement="\u2581")
    return {  # name: (family, change to its tokenizer); each a component the families' files may hold
        "t5_transformers4": ("t5", lambda t: (
            setattr(t, "normalizer", n.Sequence([t.normalizer, n.Strip(left=False, right=True), n.Replace(Regex(" {2,}"), "\u2581")])),
            setattr(t, "pre_tokenizer", p.Metaspace(prepend_scheme="always", split=True, **metaspace)))),
        "metaspace_first_unsplit": ("xlmv", lambda t: setattr(t, "pre_tokenizer", p.Metaspace(prepend_scheme="first", split=False, **metaspace))),
        "strip_then_first": ("xlmv", lambda t: (
            setattr(t, "normalizer", n.Sequence([n.Strip(left=True, right=True), t.normalizer, n.Replace("x", "")])),
            setattr(t, "pre_tokenizer", p.Metaspace(prepend_scheme="first", split=True, **metaspace)))),
        "metaspace_never": ("xlmv", lambda t: setattr(t, "pre_tokenizer", p.Sequence([p.WhitespaceSplit(), p.Metaspace(prepend_scheme="never", **metaspace)]))),
        "llama_style": ("gemma", lambda t: (setattr(t, "normalizer", n.Sequence([n.Prepend("\u2581"), n.Replace(" ", "\u2581")])), setattr(t, "pre_tokenizer", None))),
        "nfkc_lower_digits": ("gemma", lambda t: (
            setattr(t, "normalizer", n.Sequence([n.NFKC(), n.Lowercase(), n.Replace(" ", "\u2581")])),
            setattr(t, "pre_tokenizer", p.Sequence([p.Digits(individual_digits=True), p.Split(Regex(r"[\p{P}]+"), behavior="isolated")])))),
        "split_behaviours": ("gemma", lambda t: (setattr(t, "normalizer", n.NFC()), setattr(t, "pre_tokenizer", p.Sequence([
            p.Split(" ", behavior="merged_with_next"), p.Split(Regex(r"\d+"), behavior="contiguous"),
            p.Split(Regex("[a-z]"), behavior="merged_with_previous", invert=True), p.Digits(individual_digits=False)])))),
        "whitespace_nfd": ("gemma", lambda t: (setattr(t, "normalizer", n.NFD()), setattr(t, "pre_tokenizer", p.Whitespace()))),
        "split_removed_nfkd": ("gemma", lambda t: (setattr(t, "normalizer", n.NFKD()), setattr(t, "pre_tokenizer", p.Split(Regex(r"\s+"), behavior="removed")))),
        "roberta_processing": ("xlmv", lambda t: setattr(t, "post_processor", processors.RobertaProcessing(("</s>", 2), ("<s>", 0)))),
        "added_token_options": ("xlmv", lambda t: (t.add_special_tokens([AddedToken("[MASK]", lstrip=True, rstrip=True)]),
                                                   t.add_tokens([AddedToken("xyz", single_word=True), AddedToken("éa", normalized=True)]))),
        "processor_sequence": ("t5", lambda t: setattr(t, "post_processor", processors.Sequence([processors.ByteLevel(), processors.TemplateProcessing(
            single="<pad> $A </s>", special_tokens=[("<pad>", 0), ("</s>", 1)])]))),
    }


@pytest.mark.parametrize("name", sorted(_variants()))
def test_tokenizer_json_components_as_tokenizers(name):
    kind, change = _variants()[name]
    reference = tokenizers.Tokenizer.from_file(str(hf_folder(kind) / "tokenizer.json"))
    change(reference)
    path = workdir() / f"variant-{name}.json"
    reference.save(str(path))
    ours = JsonTokenizer.from_file(path)
    texts = TEXTS[:300] + BASE + EDGE_CASES + ["  a  b ", "\t x", "ΟΔΟΣ Σ", "12abc345", "a--b__c", "MASK me [MASK]x",
                                               " [MASK] y", "xyz axyz xyz", "éa", "xa", "abc"]
    assert _mismatches(_with_specials(ours), lambda text: reference.encode(text).ids, texts) == []


# --------------------------------------------------------------------------- damaged and unsupported files


def test_damaged_model_files_raise_checkpoint_errors(tmp_path):
    data = model_file("t5").read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    proto.trainer_spec.model_type = 3  # WORD
    word = proto.SerializeToString()
    proto.ParseFromString(data)
    proto.normalizer_spec.precompiled_charsmap = b"\xff\xff\xff\x00" + b"\0" * 8
    charsmap = proto.SerializeToString()
    cases = {"empty": b"", "truncated": data[: len(data) // 2], "header": data[:3], "garbage": b"\xff" * 64,
             "text": b"not a model at all\n", "word-model": word, "bad-charsmap": charsmap}
    for name, content in cases.items():
        path = tmp_path / f"{name}.model"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=str(path)) as error:
            SentencePiece.from_file(path)
        assert name != "word-model" or "'word'" in str(error.value)
    with pytest.raises(CheckpointError, match="missing.model"):
        SentencePiece.from_file(tmp_path / "missing.model")


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_model_files_never_escape_as_other_errors(data):
    """Random truncations and byte flips: a model loads and encodes, or raises a CheckpointError."""
    original = bytearray(model_file(data.draw(st.sampled_from(["gemma", "t5"]))).read_bytes())  # t5: mostly charsmap
    if data.draw(st.booleans()):
        original = original[: data.draw(st.integers(0, len(original)))]
    for _ in range(data.draw(st.integers(1, 4))):
        if original:
            original[data.draw(st.integers(0, len(original) - 1))] = data.draw(st.integers(0, 255))
    path = workdir() / "fuzzed.model"
    path.write_bytes(bytes(original))
    try:
        model = SentencePiece.from_file(path)
        for text in ("a photo of a cat", "東京 x1 ﬁ\t", "", "e\u0301 ① 각", "x" * 300):
            model.encode(text)
    except CheckpointError:
        pass


def _json_case(tmp_path, name: str, change) -> str:
    spec = json.loads((hf_folder("t5") / "tokenizer.json").read_text())
    change(spec)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.mark.parametrize("name, change, words", [
    ("wordpiece", lambda s: s["model"].update(type="WordPiece"), "model 'WordPiece'"),
    ("bert-normalizer", lambda s: s.update(normalizer={"type": "BertNormalizer"}), "normalizer 'BertNormalizer'"),
    ("byte-level", lambda s: s.update(pre_tokenizer={"type": "ByteLevel"}), "pre-tokenizer 'ByteLevel'"),
    ("unk-id", lambda s: s["model"].update(unk_id=10 ** 6), "unk_id"),
    ("bad-vocab", lambda s: s["model"].update(vocab=[["a", "b"]]), "vocab"),
    ("no-model", lambda s: s.pop("model"), "no model"),
    ("charsmap", lambda s: s["normalizer"].update(precompiled_charsmap=base64.b64encode(b"\x00\x10\x00\x00ab").decode()), "charsmap"),
    ("template", lambda s: s["post_processor"].update(single=[{"SpecialToken": {"id": "</s>", "type_id": 0}}]), "without $A"),
    ("processor", lambda s: s.update(post_processor={"type": "Nonsense"}), "post-processor 'Nonsense'"),
])
def test_unsupported_tokenizer_json_raises_naming_the_component(tmp_path, name, change, words):
    path = _json_case(tmp_path, name, change)
    with pytest.raises(CheckpointError, match=f"{name}.json") as error:
        JsonTokenizer.from_file(path)
    assert words in str(error.value)


def test_bpe_json_errors(tmp_path):
    spec = json.loads((hf_folder("gemma") / "tokenizer.json").read_text())
    for name, change, words in [("dropout", dict(dropout=0.1), "dropout"), ("merge", dict(merges=["a zzzzqq"]), "not in the vocabulary"),
                                ("merge-shape", dict(merges=["a b c"]), "merge")]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**spec, "model": {**spec["model"], **change}}))
        with pytest.raises(CheckpointError, match=words):
            JsonTokenizer.from_file(path)
    for name, content in [("bad", "{not json"), ("list", "[1, 2]"), ("binary", b"\xff\xfe")]:
        path = tmp_path / f"{name}.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(CheckpointError, match=f"{name}.json"):
            JsonTokenizer.from_file(path)


@pytest.mark.parametrize("name, change, words", [
    ("added-id-2-63", lambda s: s["added_tokens"].append({"id": 2 ** 63, "content": "<x>", "special": True}), "an added token's id"),
    ("added-id-negative", lambda s: s["added_tokens"].append({"id": -1, "content": "<x>", "special": True}), "an added token's id"),
    ("template-id-2-64", lambda s: s["post_processor"]["special_tokens"]["</s>"].update(ids=[2 ** 64]), "special token '</s>'"),
    ("roberta-id", lambda s: s.update(post_processor={"type": "RobertaProcessing", "cls": ["<s>", 2 ** 40], "sep": ["</s>", 2]}),
     "cls id"),
    ("unk-id-bool", lambda s: s["model"].update(unk_id=True), "unk_id"),
    ("huge-score", lambda s: s["model"]["vocab"].append(["zz", 10 ** 400]), "float"),
    ("empty-piece", lambda s: s["model"]["vocab"].append(["", -5.0]), None),
])
def test_ids_out_of_range_and_odd_values_raise_checkpoint_errors(tmp_path, name, change, words):
    """Ids past 2**31 (numpy would overflow on them) and other damage: one line naming the file,
    or (an empty piece, which tokenizers skips too) a tokenizer that still works."""
    path = _json_case(tmp_path, name, change)
    if words is None:
        assert JsonTokenizer.from_file(path).encode("a cat")
        return
    with pytest.raises(CheckpointError, match=f"{name}.json") as error:
        JsonTokenizer.from_file(path)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_catastrophic_regex_stops_naming_the_file_and_pattern(tmp_path, monkeypatch):
    """``(a|aa)+$`` backtracks exponentially on a run of a's not at the end; each use of a file's
    regex has a time limit (lowered here so the test takes a moment, not a second)."""
    import time

    from clipcli.text import hf_stages

    monkeypatch.setattr(hf_stages, "REGEX_SECONDS", 0.05)
    split = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False}
    replace = {"type": "Replace", "pattern": {"Regex": "(a|aa)+$"}, "content": "b"}
    for name, change in [("split", lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [split, s["pre_tokenizer"]]})),
                         ("replace", lambda s: s.update(normalizer={"type": "Sequence", "normalizers": [replace, s["normalizer"]]}))]:
        ours = JsonTokenizer.from_file(_json_case(tmp_path, f"redos-{name}", change))
        assert ours.encode("a cat") and ours.encode("baaa")  # short runs: as written
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"redos-{name}\.json: regex '\(a\|aa\)\+\$' ran for over") as error:
            ours.encode("a" * 60 + "!")  # 2**60 ways to split the run
        assert time.perf_counter() - start < 2 and "\n" not in str(error.value)


def test_the_time_limit_keeps_the_regex_results(tmp_path):
    """A file's regex under the time limit gives what ``tokenizers`` gives (the rest of the
    Regex variants are in test_tokenizer_json_components_as_tokenizers)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as p

    reference = tokenizers.Tokenizer.from_file(str(hf_folder("gemma") / "tokenizer.json"))
    reference.pre_tokenizer = p.Split(Regex(r"(\p{L}+|\d)"), behavior="isolated")
    path = tmp_path / "timed.json"
    reference.save(str(path))
    ours = JsonTokenizer.from_file(path)
    texts = TEXTS[:200] + ["abc123 déf", "x" * 5000 + " 1"]
    assert _mismatches(ours.encode, lambda text: reference.encode(text, add_special_tokens=False).ids, texts) == []


def test_a_vocabulary_piece_past_the_bound_is_refused_and_long_pieces_stay_fast(tmp_path):
    """A 2,000-character piece would make Viterbi slice up to 2,000 candidates per character
    (19.6 s for a 20,000-character text): refused, naming the file; one at the bound is fast."""
    import time

    from clipcli.text.pieces import MAX_PIECE_CHARS

    long = lambda n: lambda s: s["model"]["vocab"].append(["\u2581" + "a" * (n - 1), -30.0])  # noqa: E731
    with pytest.raises(CheckpointError, match="too-long.json: .*2,000 characters long, over the 256"):
        JsonTokenizer.from_file(_json_case(tmp_path, "too-long", long(2000)))
    ours = JsonTokenizer.from_file(_json_case(tmp_path, "at-bound", long(MAX_PIECE_CHARS)))
    start = time.perf_counter()
    ours.encode("a" * 20000)
    assert time.perf_counter() - start < 2  # about 0.1 s here

    proto = pb.ModelProto()
    proto.ParseFromString(model_file("t5").read_bytes())
    proto.pieces.add(piece="\u2581" + "a" * 1999, score=-30.0, type=1)
    path = tmp_path / "too-long.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match="too-long.model: .*2,000 characters long"):
        SentencePiece.from_file(path)


def test_files_past_the_size_cap_are_refused_before_reading(tmp_path):
    """A tokenizer file over 512 MiB (XLM-V's are about 50 MB) is refused without being read
    (a sparse file: nothing is written to disk)."""
    from clipcli.text.sentencepiece import MAX_FILE_BYTES

    for name, load in (("huge.model", SentencePiece.from_file), ("tokenizer.json", JsonTokenizer.from_file)):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)
        with pytest.raises(CheckpointError, match=f"{name}: 536,870,913 bytes, more than the 512 MiB"):
            load(path)

