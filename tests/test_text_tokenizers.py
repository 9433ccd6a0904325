"""The model-facing tokenizers (:mod:`clipcli.text.tokenizers`) and text cleaning (:mod:`clipcli.text.canonicalize`).

The references are open_clip's: its cleaning functions, and its ``HFTokenizer`` (transformers'
tokenizer for a folder, padded to the full context) over the hub-style folders of the families'
vocabularies trained in :mod:`spm_models`. Ids are compared exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from spm_models import BASE, EDGE_CASES, bare_folder, corpus, hf_folder, model_file, tokenizer_files, workdir

import clipcli
from clipcli.errors import CheckpointError, ContextLengthError
from clipcli.text import bpe
from clipcli.text.canonicalize import canonicalize_text, cleaner
from clipcli.text.tokenizers import TOKENIZER_FILES, ClipTokenizer, PieceTokenizer, tokenizer_for

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
sentencepiece = pytest.importorskip("sentencepiece")

CLEANING = ["A_photo of a Cat!", "&amp;lt;3 caf&eacute;", "schÃ¶n", "  spaced\tout\n ", "“quotes” — dash",
            "ﬁne", "C'est l'été", "under__score", "...", "&#x27;tis", "Ａ＿Ｂ", "a\u00a0b\u2003c", "\x00ctrl\x1bchars"]
TEXTS = corpus(300, seed=2) + BASE + EDGE_CASES + CLEANING
FAMILIES = [("t5", 64, "canonicalize"), ("gemma", 64, "canonicalize"), ("xlmv", 77, "whitespace"), ("xlmv", 77, "lower")]


@pytest.mark.parametrize("name", ["canonicalize", "whitespace", "lower"])
def test_cleaners_are_open_clips(name):
    ours, reference = cleaner(name), open_clip_tokenizer.get_clean_fn(name)
    assert [ours(text) for text in TEXTS] == [reference(text) for text in TEXTS]


def test_canonicalize_and_the_clip_cleaner():
    assert [canonicalize_text(t) for t in TEXTS] == [open_clip_tokenizer.canonicalize_text(t) for t in TEXTS]
    assert canonicalize_text("A_photo of a  Cat!") == "a photo of a cat"
    assert cleaner("clip") is bpe.clean_text
    with pytest.raises(CheckpointError, match="'shout'"):
        cleaner("shout")


def _reference(folder: Path, context_length: int, clean: str):
    return open_clip_tokenizer.HFTokenizer(str(folder), context_length=context_length, clean=clean)


@pytest.mark.parametrize("kind, context_length, clean", FAMILIES)
def test_piece_tokenizer_is_open_clips(kind, context_length, clean):
    folder = hf_folder(kind)
    ours = PieceTokenizer(tokenizer_files(folder), context_length, clean)
    expected = _reference(folder, context_length, clean)(TEXTS)
    assert torch.equal(ours(TEXTS, truncate=True), expected)
    # A readable check: SigLIP's row is the text, </s>, then padding to the full context.
    row = ours("a photo of a cat")[0].tolist()
    assert len(row) == context_length and row[-1] == ours.pad_id


def test_pad_token_from_the_config():
    """SigLIP's hub config pads with </s>: the last position must hold it, as transformers pads."""
    folder = workdir() / "t5-pad-eos"
    shutil.copytree(hf_folder("t5"), folder, dirs_exist_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "</s>"}))
    ours = PieceTokenizer(tokenizer_files(folder), 64, "canonicalize")
    assert torch.equal(ours(TEXTS, truncate=True), _reference(folder, 64, "canonicalize")(TEXTS))
    assert ours.pad_id == 1 and ours("a cat")[0, -1].item() == 1


@pytest.mark.parametrize("kind", ["t5", "gemma", "xlmv"])
def test_a_bare_model_file_is_sentencepiece_with_the_classes_special_tokens(kind):
    """Without tokenizer.json the ``.model`` is read as sentencepiece reads it, with the special
    tokens and ids transformers' class for it adds."""
    folder = bare_folder(kind)
    ours = PieceTokenizer(tokenizer_files(folder), 64, "whitespace")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file(kind)))
    clean = cleaner("whitespace")
    for text in TEXTS:
        if "<" in text:
            continue  # special tokens written in the text become their ids: checked against transformers below
        ids = processor.encode(clean(text))
        if kind == "xlmv":  # fairseq's layout: <s> ... </s>, every piece one up, <unk> 3, <pad> 1
            row, pad = [0, *[3 if i == 0 else i + 1 for i in ids][:62], 2], 1
        else:
            row, pad = ids[:63] + [1], 0  # T5 appends </s>; SigLIP 2's Gemma config asks for <eos>
        assert ours([text], truncate=True)[0].tolist() == row + [pad] * (64 - len(row)), text
    # transformers converts the .model into its own pipeline, which agrees except where exact score
    # ties (runs of one character) are settled by another rounding, and where it normalizes a whole
    # grapheme cluster at once ("①" and an accent become "1").
    reference = _reference(folder, 64, "whitespace")
    plain = [t for t in TEXTS if not any(c * 8 in t for c in set(t)) and not any(map(unicodedata.combining, t))]
    assert len(plain) > 300
    assert torch.equal(ours(plain, truncate=True), reference(plain))


def test_truncation_keeps_the_special_tokens():
    xlmr = PieceTokenizer(tokenizer_files(hf_folder("xlmv")), 16, "whitespace")
    t5 = PieceTokenizer(tokenizer_files(hf_folder("t5")), 16, "canonicalize")
    long = "a photo of a cat on a mat " * 10
    for tokenizer, first, last in ((xlmr, 0, 2), (t5, None, 1)):
        ids, cut = tokenizer.encode_texts(["a cat", long], truncate=True)
        assert cut == [False, True] and ids.shape == (2, 16)
        assert ids[1, -1].item() == last and (first is None or ids[1, 0].item() == first)
        assert tokenizer.pad_id not in ids[1].tolist()
        with pytest.raises(ContextLengthError, match="text 1 .* more than the context length 16") as error:
            tokenizer(["a cat", long])
        assert error.value.index == 1 and error.value.text == long and error.value.num_tokens > 16
    assert xlmr.encode_texts([])[0].shape == (0, 16)
    assert xlmr(["a cat"], context_length=8).shape == (1, 8)


def test_only_the_first_max_tokenized_characters_are_tokenized():
    tokenizer = PieceTokenizer(tokenizer_files(hf_folder("t5")), 64, "canonicalize")
    huge = "ab" * bpe.MAX_TOKENIZED_CHARS
    ids, cut = tokenizer.encode_texts([huge], truncate=True)
    assert cut == [True] and ids[0, -1].item() == 1
    with pytest.raises(ContextLengthError, match="characters, over the"):
        tokenizer([huge])


def test_nothing_is_read_before_the_first_text(tmp_path):
    missing = PieceTokenizer({"tokenizer.json": tmp_path / "tokenizer.json"}, 64, "canonicalize")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        missing("a cat")
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    files = {**tokenizer_files(hf_folder("t5")), "tokenizer_config.json": tmp_path / "tokenizer_config.json"}
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        PieceTokenizer(files, 64, "canonicalize")("a cat")
    code = ("import sys; from clipcli.text.tokenizers import PieceTokenizer; "
            f"PieceTokenizer({{'spiece.model': {str(model_file('t5'))!r}}}, 64, 'canonicalize'); "
            "print(sorted(m for m in ('torch', 'clipcli.text.sentencepiece', 'clipcli.text.tokenizer_json') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_tokenizer_for_a_config():
    clip = tokenizer_for(SimpleNamespace(tokenizer="clip", context_length=77, text_clean="clip"))
    assert isinstance(clip, ClipTokenizer)
    assert torch.equal(clip(["a photo of a cat"]), clipcli.tokenize(["a photo of a cat"]))
    assert clip.decode(clip("a photo of a cat")[0]) == "a photo of a cat"
    siglip = SimpleNamespace(tokenizer="sentencepiece", context_length=64, text_clean="canonicalize")
    with pytest.raises(CheckpointError, match="tokenizer.json, tokenizer_config.json, special_tokens_map.json, spiece.model"):
        tokenizer_for(siglip, {})
    tokenizer = tokenizer_for(siglip, tokenizer_files(hf_folder("t5")))
    assert isinstance(tokenizer, PieceTokenizer) and tokenizer.context_length == 64
    assert tokenizer.decode(tokenizer("A photo of a cat!")[0]) == "a photo of a cat"
    with pytest.raises(CheckpointError, match="'wordpiece'"):
        tokenizer_for(SimpleNamespace(tokenizer="wordpiece", context_length=64, text_clean="clip"))
    assert TOKENIZER_FILES == ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                               "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")


def test_decode_reads_the_ids_back():
    for kind, clean in (("xlmv", "whitespace"), ("gemma", "whitespace")):
        for files in (tokenizer_files(hf_folder(kind)), tokenizer_files(bare_folder(kind))):
            tokenizer = PieceTokenizer(files, 64, clean)
            for text in ("A photo of a cat", "東京タワー 123", "ﬁne  day"):
                expected = cleaner(clean)(text)
                if kind == "xlmv":
                    expected = expected.replace("ﬁ", "fi")  # its NFKC normalization
                assert tokenizer.decode(tokenizer(text)[0]) == expected


def test_concurrent_first_use_loads_once_and_agrees():
    tokenizer = PieceTokenizer(tokenizer_files(hf_folder("xlmv")), 77, "whitespace")
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(tokenizer(TEXTS[:50], truncate=True))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(torch.equal(r, results[0]) for r in results)


def test_ids_past_the_models_embeddings_are_refused_not_an_index_error():
    """Tokenizer files of another model (a larger vocabulary) would index past the embedding
    table: one CheckpointError naming the file, before the model runs."""
    files = tokenizer_files(hf_folder("xlmv"))
    full = PieceTokenizer(files, 77, "whitespace")
    ids = full(["一只猫 and a cat"])
    small = PieceTokenizer(files, 77, "whitespace", model_vocab=int(ids.max()))
    with pytest.raises(CheckpointError, match="token embeddings: the tokenizer files are not this model's"):
        small(["一只猫 and a cat"])
    assert torch.equal(PieceTokenizer(files, 77, "whitespace", model_vocab=int(ids.max()) + 1)(["一只猫 and a cat"]), ids)


# --------------------------------------------------------------------------- damaged files, one line each


def _changed(tmp_path: Path, kind: str, bare: bool, file: str = "tokenizer_config.json", **changes) -> dict[str, Path]:
    """The family's tokenizer files (hub layout, or the bare ``.model``) with ``file``'s JSON updated."""
    folder = tmp_path / f"{kind}-{'bare' if bare else 'hf'}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(bare_folder(kind) if bare else hf_folder(kind), folder)
    path = folder / file
    spec = json.loads(path.read_text()) if path.exists() else {}
    for key, value in changes.items():
        spec[key] = value(spec) if callable(value) else value
    path.write_text(json.dumps(spec))
    return tokenizer_files(folder)


def _one_line_error(files: dict[str, Path], *words: str) -> str:
    with pytest.raises(CheckpointError) as error:
        PieceTokenizer(files, 64, "whitespace")("a cat")
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message
    return message


@pytest.mark.parametrize("bare", [False, True], ids=["tokenizer.json", "model"])
@pytest.mark.parametrize("key", ["²", "١٢", "99999999999", "2147483648", "-1"])
def test_added_tokens_decoder_keys_that_are_not_ids_name_the_config(tmp_path, bare, key):
    """``"²".isdigit()`` is True but ``int("²")`` raises; ids past 2**31 overflow numpy's int64 later."""
    entry = {"content": "<extra>", "special": True}
    files = _changed(tmp_path, "xlmv", bare, added_tokens_decoder={key: entry})
    _one_line_error(files, "tokenizer_config.json", "added_tokens_decoder key", "is not a token id")


def test_special_token_ids_past_int64_in_tokenizer_json_name_the_file(tmp_path):
    for name, change in [("template", lambda s: {**s["post_processor"], "special_tokens": {
                              "</s>": {"id": "</s>", "ids": [2 ** 63], "tokens": ["</s>"]}}}),
                         ("added", lambda s: [*s["added_tokens"], {"id": 2 ** 64, "content": "<big>", "special": True}])]:
        key = "post_processor" if name == "template" else "added_tokens"
        files = _changed(tmp_path, "t5", False, "tokenizer.json", **{key: change})
        _one_line_error(files, str(files["tokenizer.json"]), "is not a token id")


@pytest.mark.parametrize("bare", [False, True], ids=["tokenizer.json", "model"])
def test_a_named_special_token_missing_from_the_vocabulary_is_an_error(tmp_path, bare):
    """transformers would add ``eos_token: "nope"`` as a new token, an id the model never trained."""
    files = _changed(tmp_path, "t5", bare, eos_token="nope")
    _one_line_error(files, str(files["tokenizer_config.json"]), "eos_token 'nope' is not in the vocabulary")
    files = _changed(tmp_path, "xlmv", bare, "special_tokens_map.json", pad_token={"content": "<nothing>"})
    config = json.loads(files["tokenizer_config.json"].read_text())
    files["tokenizer_config.json"].write_text(json.dumps({k: v for k, v in config.items() if k != "pad_token"}))
    _one_line_error(files, "special_tokens_map.json", "pad_token '<nothing>'")
    # A token the config's added_tokens_decoder gives an id (past the 700 pieces) is not missing:
    # it is matched in the text, as transformers matches it.
    files = _changed(tmp_path, "t5", bare, eos_token="<new>", added_tokens_decoder={"700": {"content": "<new>"}})
    ours = PieceTokenizer(files, 64, "whitespace")
    words = ours.encode_text("a cat")
    eos = 700 if bare else 1  # the .model's eos is the config's; tokenizer.json's template keeps </s>
    assert ours("a cat <new>")[0].tolist()[: len(words) + 2] == [*words, 700, eos] and ours.vocab_size == 701


def test_anything_a_damaged_file_raises_while_loading_becomes_one_checkpoint_error(monkeypatch):
    from clipcli.text import tokenizers

    files = tokenizer_files(bare_folder("t5"))
    for error in (KeyError("piece"), IndexError("list index out of range"), OverflowError("too\nbig"), TypeError("x")):
        def damaged(path, config, error=error):
            raise error
        monkeypatch.setattr(tokenizers, "_load_model_vocabulary", damaged)
        _one_line_error(files, str(files["spiece.model"]), type(error).__name__)


# --------------------------------------------------------------------------- one answer to "which tokenizer"


def test_files_from_a_provider_are_fetched_for_the_first_text_only():
    calls = []

    def fetch():
        calls.append(1)
        return tokenizer_files(hf_folder("xlmv"))

    lazy = PieceTokenizer(fetch, 77, "whitespace", origin="the tokenizer of hub repository x/y")
    assert calls == [] and lazy.source == "the tokenizer of hub repository x/y"
    threads = [threading.Thread(target=lambda: lazy(["a cat"])) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and lazy.source.name == "tokenizer.json"
    assert torch.equal(lazy(TEXTS[:20], truncate=True), PieceTokenizer(fetch(), 77, "whitespace")(TEXTS[:20], truncate=True))
    failing = PieceTokenizer(lambda: {}, 77, "whitespace")
    with pytest.raises(CheckpointError, match="no tokenizer file"):
        failing("a cat")
    siglip = SimpleNamespace(tokenizer="sentencepiece", context_length=64, text_clean="canonicalize")
    assert isinstance(tokenizer_for(siglip, {}, fetch=fetch), PieceTokenizer) and len(calls) == 2


def test_tokenizer_of_is_the_one_answer(monkeypatch):
    from clipcli import batching
    from clipcli.text.tokenizers import tokenizer_of
    from clipcli.train.data import caption_tokenizer

    assert batching.tokenizer_of is tokenizer_of
    siglip = SimpleNamespace(tokenizer="sentencepiece", context_length=16, text_clean="canonicalize", vocab_size=None)
    own = PieceTokenizer(tokenizer_files(hf_folder("t5")), 16, "canonicalize")
    with_files = SimpleNamespace(config=siglip, context_length=16, tokenizer=own)
    without = SimpleNamespace(config=siglip, context_length=16, tokenizer=None)
    clip = SimpleNamespace(config=SimpleNamespace(tokenizer="clip", context_length=77, text_clean="clip"), context_length=77)
    assert tokenizer_of(with_files) is own and caption_tokenizer(with_files).tokenizer is own
    assert torch.equal(clipcli.tokenize(["a cat"], model=with_files), own(["a cat"]))
    assert isinstance(tokenizer_of(clip), ClipTokenizer) and isinstance(tokenizer_of(SimpleNamespace()), ClipTokenizer)
    assert torch.equal(caption_tokenizer(clip)(["a photo of a cat"]), clipcli.tokenize(["a photo of a cat"]))
    for ask in (tokenizer_of, lambda m: clipcli.tokenize("a cat", model=m), caption_tokenizer):
        with pytest.raises(CheckpointError, match="tokenizer files were not found"):
            ask(without)


def test_google_siglip_layout_equals_transformers_siglip_tokenizer(tmp_path):
    """google/siglip-* repositories hold a bare spiece.model read by transformers' SiglipTokenizer,
    which canonicalizes the text itself (underscores removed, not spaced as open_clip does) and
    appends </s>: text_clean "siglip" gives its ids, padded to the context with its pad id."""
    transformers = pytest.importorskip("transformers")
    shutil.copy(model_file("t5"), tmp_path / "spiece.model")
    reference = transformers.SiglipTokenizer(vocab_file=str(tmp_path / "spiece.model"), model_max_length=64)
    reference.save_pretrained(str(tmp_path))
    files = {name: tmp_path / name for name in TOKENIZER_FILES if (tmp_path / name).exists()}
    ours = PieceTokenizer(files, 64, "siglip")
    texts = corpus(300)[:200] + ["A photo of a CAT!", "hello_world, it's 3:45 p.m.", "under_score", "", "  x  ",
                                 "ＦＵＬＬ－ＷＩＤＴＨ\u3000ｔｅｘｔ １２３"]
    expected = reference(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(texts, truncate=True), expected)


def test_lowercase_is_per_character_as_the_tokenizers_normalizer():
    """transformers' Siglip2Tokenizer lowercases with tokenizers' Lowercase, one character at a
    time: a word-final capital sigma becomes σ, where Python's str.lower gives ς."""
    from tokenizers.normalizers import Lowercase

    for text in ("ΟΔΟΣ ΚΑΛΟΣ", "A Photo of İstanbul", "ǅ ß ẞ"):
        assert cleaner("lowercase")(text) == Lowercase().normalize_str(text)


def test_no_texts_read_no_vocabulary():
    """Zero texts (a finished run resumed, a shard without captions) never load or fetch the tokenizer."""
    def provider():
        raise AssertionError("the tokenizer files were asked for")

    ids, cut = PieceTokenizer(provider, 64, "canonicalize").encode_texts([])
    assert ids.shape == (0, 64) and cut == []
