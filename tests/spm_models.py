"""Small SentencePiece vocabularies trained here, for the tokenizer tests (the real ones cannot be downloaded).

One per family clipcli reads, with that family's training settings:

- ``t5``: Unigram with ``nmt_nfkc`` normalization and T5's ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,
  no ``<s>``): SigLIP's vocabulary.
- ``gemma``: BPE with byte fallback, split digits, no dummy prefix, identity normalization and
  whitespace kept as pieces, Gemma's ids (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) and
  two user-defined symbols: SigLIP 2's.
- ``xlmv``: a larger Unigram with ``nmt_nfkc`` and SentencePiece's default ids (``<unk>`` 0,
  ``<s>`` 1, ``</s>`` 2), which XLM-R's tokenizer shifts to fairseq's: MetaCLIP 2's XLM-V.
- ``unigram_bytes``: Unigram with byte fallback, user-defined symbols and whitespace as a suffix,
  for the options the others leave out.

The corpus mixes scripts (CJK, kana, Hangul, Arabic, Devanagari, Cyrillic, Greek, Thai, Hebrew),
emoji and ZWJ sequences, combining marks, full-width forms, ligatures, whitespace runs, digits and
very long words. Models are trained once per process (and folders built once), in a temporary
directory removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

BASE = [
    "a photo of a cat", "A Photo Of The Dog!", "the quick brown fox jumps over the lazy dog",
    "東京タワーの写真", "一只猫坐在垫子上", "서울의 야경 사진", "صورة قطة على الأريكة",
    "मेरा नाम राम है और मैं दिल्ली में रहता हूँ", "émoji 😀 and 👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301", "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ １２３", "ﬁne ﬂowers ﬀ ligature ǅ ㎏ ①②③ ½",
    "tabs\tand\nnewlines  and   runs    of spaces", "numbers 1234567890 and 3.14159 and 2024-01-01",
    "supercalifragilisticexpialidocious" * 3, "Ελληνικά γράμματα", "русский текст и ещё", "ไทย ภาษา",
    "עברית טקסט", "Zürich Straße Øresund", "x" * 200, "mixed中文and English混合text", "under_score and-hyphen",
    "C'est l'été, n'est-ce pas?", "<start_of_turn>user hi<end_of_turn>",
]
SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzéèàüöäßç",
    "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与",
    "kana": "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコサシスセソ",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "deva": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशषसहािीुूेैोौं्",
    "cyr": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
}
# Texts the tests add to the corpus: empty, only spaces, unknown characters, very long words.
EDGE_CASES = [
    "", " ", "   ", "\t\n", "a", " a ", "a  b", "\x01", "\x01 a", "a\x00b", "x" * 3000, "ﬁ\u0301", "e\u0301\u0302",
    "①\u0301", "▁", "a▁", "▁▁a▁▁", " ¨x", "12345 67", "\r\n", "a\r\nb", "😀👨‍👩‍👧‍👦", "ｶﾞ", "㍿", "ǅ", "Ⅻ", "\u3000a\u3000",
    "a\u200bb", "\ufeffa", "⁇", "<unk>", "</s>", "<s>", "<pad>", "<0x41>", "한국어", "각", "﷽", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "ऋषि\u094d", "ΟΔΟΣ", "İstanbul", "\U000e0067\U000e0062", "\ud7ff\ue000\U0010ffff", "hello</s>world",
    "<start_of_turn>hi <end_of_turn>", "ａｂｃ　ｄｅｆ", "a" + "\u0301" * 20,
]
# Characters for random strings: every script above, the normalizer's special cases, specials.
ALPHABET = sorted(set("".join(SCRIPTS.values()) + "ab xyz XYZ 0123456789 \t\n\r_-.,!?'\"()&;#Σαé\u0301\u0308ﬁ①ＡＢ１"
                       "😀\u200d👍🏽\u3000\u00a0\x01\x7f\u2581각"))

SETTINGS = {
    "t5": dict(model_type="unigram", vocab_size=700, normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1,
               unk_id=2, bos_id=-1),
    "gemma": dict(model_type="bpe", vocab_size=900, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
                  normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                  pad_id=0, eos_id=1, bos_id=2, unk_id=3, bos_piece="<bos>", eos_piece="<eos>",
                  user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]),
    "xlmv": dict(model_type="unigram", vocab_size=2000, normalization_rule_name="nmt_nfkc"),
    "unigram_bytes": dict(model_type="unigram", vocab_size=900, byte_fallback=True, treat_whitespace_as_suffix=True,
                          normalization_rule_name="nfkc", user_defined_symbols=["<mask>", "ＮＹ"]),
}


def corpus(lines: int = 2500, seed: int = 0) -> list[str]:
    """Random "sentences" of pseudo-words in one script each, with the fixed examples first."""
    rng = random.Random(seed)
    out = list(BASE)
    names = sorted(SCRIPTS)
    for _ in range(lines):
        script = SCRIPTS[rng.choice(names)]
        words = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.05:
                words.append(str(rng.randint(0, 10 ** rng.randint(1, 8))))
            elif r < 0.1:
                words.append(rng.choice(BASE).split()[0])
            else:
                words.append("".join(rng.choice(script[: rng.randint(8, len(script))]) for _ in range(rng.randint(1, 8))))
        out.append(" ".join(words))
    return out


@functools.cache
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="clipcli-spm-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def model_file(kind: str) -> Path:
    """The trained ``.model`` of one family (trained once per process)."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buffer, character_coverage=0.9995, minloglevel=2,
        **SETTINGS[kind])
    path = workdir() / f"{kind}.model"
    path.write_bytes(buffer.getvalue())
    return path


HF_CLASSES = {  # transformers' class, the file name it reads, and the options the model's hub files give
    "t5": ("T5Tokenizer", "spiece.model", dict(extra_ids=0)),
    "gemma": ("GemmaTokenizer", "tokenizer.model", dict(add_bos_token=False, add_eos_token=True, padding_side="right")),
    "xlmv": ("XLMRobertaTokenizer", "sentencepiece.bpe.model", {}),
}


@functools.cache
def hf_folder(kind: str) -> Path:
    """A folder as the hub holds the family's tokenizer: transformers' ``save_pretrained`` of its
    tokenizer class built from the ``.model``, with ``tokenizer.json`` and ``tokenizer_config.json``."""
    import transformers

    name, file_name, options = HF_CLASSES[kind]
    source = workdir() / f"{kind}-source"
    source.mkdir(exist_ok=True)
    shutil.copy(model_file(kind), source / file_name)
    tokenizer = getattr(transformers, name).from_pretrained(str(source), **options)
    folder = workdir() / f"{kind}-hf"
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("vocab_file", None)
    config.update({k: v for k, v in options.items() if k in ("add_bos_token", "add_eos_token", "padding_side")})
    config_path.write_text(json.dumps(config))
    return folder


@functools.cache
def bare_folder(kind: str) -> Path:
    """The ``.model`` alone with a ``tokenizer_config.json`` naming its class (no ``tokenizer.json``)."""
    name, file_name, options = HF_CLASSES[kind]
    folder = workdir() / f"{kind}-bare"
    folder.mkdir(exist_ok=True)
    shutil.copy(model_file(kind), folder / file_name)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": name, **options}))
    return folder


def tokenizer_files(folder: Path) -> dict[str, Path]:
    from clipcli.text.tokenizers import TOKENIZER_FILES

    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).exists()}
