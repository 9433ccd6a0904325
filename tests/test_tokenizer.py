"""The tokenizer gives OpenAI's ids (checked against ``clip`` and ``open_clip``), decodes, and loads lazily."""

from __future__ import annotations

import html
import subprocess
import sys
import warnings

import pytest
import regex
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clipcli.errors import ContextLengthError
from clipcli.text import bpe as tok
from clipcli.text.bpe import clean_text, default_tokenizer, encode_texts, tokenize

SOT, EOT = 49406, 49407

SHORT_CORPUS = [
    "a photo of a cat.",
    "A Photo Of A DOG!!!",
    "Hello, world... (really?) [yes] {no} <maybe> -- ok;",
    "mail someone@example.com at path/to/file_name.txt #tag $5 100% ~x^2 `code` |pipe| \\ back",
    # HTML entities, once and twice escaped, and markup (which turns off ftfy's own unescaping)
    "Tom &amp; Jerry",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;lt;double&amp;gt; &amp;amp;",
    "&eacute;t&eacute; &#39;quoted&#39; &#x263A; &nbsp;x",
    "<b>markup</b> &amp; more",
    # mojibake that ftfy repairs
    "schÃ¶n",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "cafÃ© au lait",
    # emoji, CJK and other scripts
    "😀 grinning",
    "👨‍👩‍👧‍👦 family",
    "🇫🇷 flag ❤️‍🔥",
    "猫の写真",
    "一只猫的照片",
    "고양이 사진",
    "Ελληνικά Русский עברית العربية हिन्दी ไทย",
    # accents, ligatures, width, quotes, case oddities
    "café naïve résumé Ångström Straße ÉCOLE",
    "ﬁne ligature ＦＵＬＬＷＩＤＴＨ",
    "“curly quotes” and ‘single’",
    "Ünïcödé ǅ İstanbul \u0301combining",
    "ſ long s 'ſ and K kelvin",
    # numbers
    "2024 3.14159 1,000,000 ½ ² ٣ 四 ⅷ",
    # contractions
    "it's they're we've I'm you'll he'd don't IT'S",
    "''s 'sx rock'n'roll",
    # whitespace and control characters
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n and\u00a0nbsp\u2028line sep\u3000ideographic",
    "\x00control\x1b[31mred\x1b[0m\x7f",
    "",
    "   ",
    "\n",
]
LONG_CORPUS = [
    "word " * 100,
    "a" * 400,
    "a photo of " + "very " * 80 + "big cat",
    "😀" * 200,
]
CORPUS = SHORT_CORPUS + LONG_CORPUS


@pytest.fixture(scope="module")
def clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # openai-clip imports pkg_resources
        return pytest.importorskip("clip")


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


# Parity with the reference implementations


@pytest.mark.parametrize("context_length", [77, 100, 16, 3, 1])
def test_matches_openai_clip_with_truncation(clip, context_length):
    ours = tokenize(CORPUS, context_length=context_length, truncate=True)
    theirs = clip.tokenize(CORPUS, context_length=context_length, truncate=True)
    assert ours.dtype == torch.long
    assert ours.shape == (len(CORPUS), context_length)
    assert torch.equal(ours, theirs.long())


@pytest.mark.parametrize("context_length", [77, 100])
def test_matches_openai_clip_without_truncation(clip, context_length):
    assert torch.equal(tokenize(SHORT_CORPUS, context_length), clip.tokenize(SHORT_CORPUS, context_length).long())


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_openai_clip(clip, text):
    assert default_tokenizer().encode(text) == clip.clip._tokenizer.encode(text)


@pytest.mark.parametrize("context_length", [77, 16])
def test_matches_open_clip(open_clip, context_length):
    # open_clip always truncates, and spells its special tokens differently (not in this corpus).
    ours = tokenize(CORPUS, context_length=context_length, truncate=True)
    assert torch.equal(ours, open_clip.tokenize(CORPUS, context_length=context_length))


def test_special_token_strings_in_text_match_openai_clip(clip):
    texts = ["a <|endoftext|> b", "<|startoftext|>x", "<|EndOfText|>", "<|endoftext", "<|endoftext|><|endoftext|>"]
    assert torch.equal(tokenize(texts), clip.tokenize(texts).long())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=120), min_size=1, max_size=3))
def test_matches_openai_clip_on_any_unicode(clip, texts):
    assert torch.equal(tokenize(texts, truncate=True), clip.tokenize(texts, truncate=True).long())


# Shapes, truncation and errors


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_any_unicode_fits_with_truncation(texts):
    # A text spelling out "<|endoftext|>" encodes to the EOT id, as in OpenAI's tokenizer.
    assume(not any("endoftext" in t.lower() for t in texts))
    tokens, truncated = encode_texts(texts, truncate=True)
    assert tokens.shape == (len(texts), 77)
    for text, row, cut in zip(texts, tokens.tolist(), truncated):
        assert row[0] == SOT
        assert row.count(EOT) == 1
        end = row.index(EOT)
        assert set(row[end + 1 :]) <= {0}
        assert cut == (len(default_tokenizer().encode(text)) + 2 > 77)


def test_sot_first_one_eot_and_zero_padding():
    (row,) = tokenize("a photo of a cat.").tolist()
    assert row[:7] == [SOT, 320, 1125, 539, 320, 2368, 269]
    assert row[7] == EOT and set(row[8:]) == {0} and len(row) == 77


def test_single_string_and_empty_list():
    assert tokenize("a cat").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)
    assert tokenize([""]).tolist()[0][:3] == [SOT, EOT, 0]


def test_too_long_raises_naming_text_and_index():
    texts = ["a short one", "word " * 100]
    with pytest.raises(ContextLengthError, match=r"text 1 \('word word .*\.\.\.'\) is 102 tokens") as info:
        tokenize(texts)
    assert isinstance(info.value, ValueError)
    assert len(str(info.value)) < 200
    assert info.value.index == 1 and info.value.num_tokens == 102


def test_exactly_full_context_is_not_truncated():
    text = "word " * 75  # 75 ids + SOT + EOT = 77
    tokens, truncated = encode_texts([text], truncate=False)
    assert truncated == [False]
    assert tokens[0, -1].item() == EOT


def test_truncation_keeps_eot_last_and_reports_it():
    tokens, truncated = encode_texts(["a cat", "word " * 100, "a dog"])
    assert truncated == [False, True, False]
    assert tokens[1, 0].item() == SOT and tokens[1, -1].item() == EOT
    assert (tokens[1, 1:-1] == default_tokenizer().encode("word")[0]).all()


def test_bad_arguments():
    with pytest.raises(TypeError, match="text 1 is a int"):
        tokenize(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a cat", context_length=0)


# Tokenizer object: encode, decode, bpe


def test_tokenizer_constants():
    t = default_tokenizer()
    assert (t.sot_token, t.eot_token, t.vocab_size) == (SOT, EOT, 49408)
    assert t.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert t.bpe("cat") == ["cat</w>"]
    assert t.bpe("tokenization") == ["token", "ization</w>"]


def test_decode_reads_like_the_text():
    t = default_tokenizer()
    assert t.decode(t.encode("A photo of a CAT, isn't it?")) == "a photo of a cat , isn 't it ? "
    row = tokenize("schÃ¶n")[0]
    assert t.decode(row[: int((row == EOT).nonzero()) + 1]) == "<|startoftext|>schön <|endoftext|>"


def test_decode_matches_openai_clip(clip):
    t = default_tokenizer()
    for ids in [[SOT, 320, 2368, EOT, 0, 0], list(range(0, 49408, 97)), [256, 511, 512, 49405], []]:
        assert t.decode(ids) == clip.clip._tokenizer.decode(ids)
    with pytest.raises(ValueError, match="49408"):
        t.decode([49408])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_decode_inverts_encode(text):
    t = default_tokenizer()
    pieces = t.pretokenize(clean_text(text))
    expected = "".join(p if p in (tok.SOT, tok.EOT) else p + " " for p in pieces)
    assert t.decode(t.encode(text)) == expected
    assert "".join(expected.split()) == "".join(clean_text(text).split())


# The fast paths agree with the slow ones


def reference_clean(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_ascii_shortcuts_agree_with_full_pipeline(text):
    cleaned = clean_text(text)
    assert cleaned == reference_clean(text)
    unicode_pattern = regex.compile(tok.PRETOKEN_PATTERN, regex.IGNORECASE)
    assert default_tokenizer().pretokenize(cleaned) == unicode_pattern.findall(cleaned)


# Laziness and caching


def test_import_does_no_work():
    code = (
        "import sys, clipcli.text.bpe as t\n"
        "print(t._default is None, [m for m in ('torch', 'numpy', 'ftfy', 'regex') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "True []"


def test_vocabulary_loads_once_on_first_use(monkeypatch):
    calls = []
    real_read_merges = tok.read_merges

    def counting_read_merges(path=None):
        calls.append(path)
        return real_read_merges(path)

    monkeypatch.setattr(tok, "_default", None)
    monkeypatch.setattr(tok, "read_merges", counting_read_merges)
    assert calls == []
    first = tokenize(["a cat", "a dog"])
    second = tokenize("a bird")
    assert calls == [None]
    assert first.shape == (2, 77) and second.shape == (1, 77)


def test_word_cache_is_bounded_and_used():
    t = default_tokenizer()
    assert t._word_ids.cache_info().maxsize == tok.WORD_CACHE_SIZE
    t.encode("zebra zebra")
    before = t._word_ids.cache_info().hits
    t.encode("zebra")
    assert t._word_ids.cache_info().hits == before + 1
