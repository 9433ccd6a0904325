"""The tokenizer a model's text tower uses, behind one interface: :func:`tokenizer_for`.

Every tokenizer turns texts into a ``[N, context_length]`` tensor of ids laid out as its model
was trained on, and the layout matters as much as the ids:

- :class:`ClipTokenizer`: CLIP's BPE (:mod:`clipcli.text.bpe`): start token, ids, end token,
  zeros; the tower reads the end token (the largest id).
- :class:`PieceTokenizer`: a SentencePiece vocabulary from the files found with the model
  (SigLIP's T5 vocabulary, SigLIP 2's Gemma one, MetaCLIP 2's XLM-V one). The text is cleaned
  as the model's ``text_clean`` says (:mod:`.canonicalize`), split at literal special tokens,
  segmented (:mod:`.tokenizer_json` for a ``tokenizer.json``, else :mod:`.sentencepiece` for
  the ``.model``), wrapped in the special tokens the reference adds for that tokenizer, and
  padded to the *full* context with the pad id: SigLIP reads its text at the last position, so
  a shorter row or another pad id gives other embeddings.

Special tokens, as transformers adds them. With a ``tokenizer.json``: its post-processor's
template, unless ``tokenizer_config.json`` sets ``add_bos_token`` or ``add_eos_token``, which then
decide. With only a ``.model``: by the tokenizer class ``tokenizer_config.json`` names (else the
file's name): T5 and SigLIP append ``</s>``; Gemma and Llama prepend ``<bos>`` unless told
otherwise; XLM-R writes ``<s> ... </s>`` in fairseq's ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
``<unk>`` 3, every other piece one above its SentencePiece id, ``<mask>`` last). The pad id is
the config's ``pad_token``, else the tokenizer's own ``<pad>``, else 0; padding goes after the ids
unless the config's ``padding_side`` is ``"left"``.

A text longer than the context raises :class:`~clipcli.errors.ContextLengthError` naming it and
its index, unless truncation is asked for: then its ids are cut and the special tokens kept, as
transformers truncates. Only the first ``MAX_TOKENIZED_CHARS`` characters of a text are
tokenized (see :mod:`.bpe`). Nothing is read until the first text is encoded.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import CheckpointError, ContextLengthError
from . import bpe
from .canonicalize import cleaner

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODEL_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", *MODEL_FILES)
SIGLIP_CLASSES = ("SiglipTokenizer", "SiglipTokenizerFast")  # T5's, padded with </s> unless told otherwise
T5_CLASSES = ("T5Tokenizer", "T5TokenizerFast", *SIGLIP_CLASSES)
BOS_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast")
XLMR_CLASSES = ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast")
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


class TextTokenizer:
    """Texts to a ``[N, context_length]`` LongTensor of ids (and back, roughly, with :meth:`decode`)."""

    context_length: int

    def encode_texts(self, texts: str | Sequence[str], context_length: int | None = None,
                     truncate: bool = True) -> tuple[torch.LongTensor, list[bool]]:
        """Ids ``[N, context_length]`` and, per text, whether it was cut to fit."""
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.LongTensor:
        """Ids ``[N, context_length]``; a text that does not fit raises :class:`ContextLengthError` unless ``truncate``."""
        return self.encode_texts(texts, context_length=context_length, truncate=truncate)[0]

    def decode(self, ids: Any) -> str:
        """The text of one row of ids, special tokens and padding left out."""
        raise NotImplementedError


class ClipTokenizer(TextTokenizer):
    """CLIP's BPE (:mod:`clipcli.text.bpe`), the same ids as OpenAI's ``clip.tokenize``."""

    def __init__(self, context_length: int = 77):
        self.context_length = context_length

    def encode_texts(self, texts, context_length=None, truncate=True):
        return bpe.encode_texts(texts, context_length=context_length or self.context_length, truncate=truncate)

    def decode(self, ids: Any) -> str:
        tokenizer = bpe.default_tokenizer()
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if tokenizer.eot_token in ids:
            ids = ids[: ids.index(tokenizer.eot_token)]
        return tokenizer.decode([i for i in ids if i != tokenizer.sot_token]).strip()


# --------------------------------------------------------------------------- SentencePiece vocabularies


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror or error})") from error
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: bad JSON ({error})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as a config writes it: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class _Vocabulary:
    """What :class:`PieceTokenizer` loads: a text's ids, the special ids around them, the pad id."""

    def __init__(self, encode: Callable[[str], list[int]], prefix: list[int], suffix: list[int], pad_id: int,
                 decode: Callable[[list[int]], str], vocab_size: int):
        self.encode, self.prefix, self.suffix, self.pad_id = encode, prefix, suffix, pad_id
        self.decode, self.vocab_size = decode, vocab_size
        self.pad_left = False


def _with_specials(encode: Callable[[str], list[int]], specials: Mapping[str, int]) -> Callable[[str], list[int]]:
    """``encode`` applied between literal special tokens (leftmost, longest), which become their ids."""
    if not specials:
        return encode
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def split_encode(text: str) -> list[int]:
        ids: list[int] = []
        done = 0
        for match in pattern.finditer(text):
            if done < match.start():
                ids += encode(text[done : match.start()])
            ids.append(specials[match.group()])
            done = match.end()
        return ids + encode(text[done:]) if done < len(text) else ids

    return split_encode


def _load_json_vocabulary(path: Path, config: dict) -> _Vocabulary:
    from .tokenizer_json import JsonTokenizer

    tokenizer = JsonTokenizer.from_file(path)
    prefix, suffix = tokenizer.prefix, tokenizer.suffix
    if "add_bos_token" in config or "add_eos_token" in config:  # transformers rebuilds the template then
        bos, eos = (tokenizer.token_to_id(_token_text(config.get(k)) or "") for k in ("bos_token", "eos_token"))
        prefix = [bos] if config.get("add_bos_token") and bos is not None else []
        suffix = [eos] if config.get("add_eos_token") and eos is not None else []
    pad = tokenizer.token_to_id(_token_text(config.get("pad_token")) or "")
    if pad is None:
        pad = tokenizer.token_to_id("<pad>")
    specials = set(tokenizer.special_ids) | set(prefix) | set(suffix) | {pad or 0}
    return _Vocabulary(tokenizer.encode, prefix, suffix, pad or 0,
                       lambda ids: tokenizer.decode([i for i in ids if i not in specials]), tokenizer.vocab_size)


def _load_model_vocabulary(path: Path, config: dict) -> _Vocabulary:
    from .sentencepiece import SentencePiece, decode_pieces

    model = SentencePiece.from_file(path)
    kind = config.get("tokenizer_class")
    if kind in XLMR_CLASSES or (kind is None and path.name == "sentencepiece.bpe.model"):
        unk, size = model.unk_id, model.vocab_size
        named = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": size + 1}

        def to_id(index: int) -> int:  # fairseq's layout
            return 3 if index == unk else index + 1

        def to_piece(index: int) -> str | None:  # the pieces after fairseq's four, shifted by one
            return model.pieces[index - 1] if 4 <= index <= size else None

        prefix, suffix, pad, vocab_size = [0], [2], 1, size + 2
    else:
        named = {p: i for i, p in enumerate(model.pieces) if model.is_special(i)}

        def to_id(index: int) -> int:
            return index

        def to_piece(index: int) -> str | None:
            return model.pieces[index] if 0 <= index < model.vocab_size and not model.is_special(index) else None

        t5 = kind in T5_CLASSES or (kind is None and path.name == "spiece.model")
        bos_first = kind in BOS_CLASSES or (kind is None and path.name == "tokenizer.model")
        add_bos = config.get("add_bos_token", bos_first and not t5)
        add_eos = config.get("add_eos_token", t5)
        bos = named.get(_token_text(config.get("bos_token")) or model.proto.bos_piece)
        eos = named.get(_token_text(config.get("eos_token")) or model.proto.eos_piece)
        prefix = [bos] if add_bos and bos is not None else []
        suffix = [eos] if add_eos and eos is not None else []
        pad = model.pad_id if model.pad_id >= 0 else named.get("<pad>", 0)
        vocab_size = model.vocab_size
    # Special tokens the config names are matched in the text, as transformers matches its added tokens.
    decoder = config.get("added_tokens_decoder")
    added = {_token_text(entry): int(i) for i, entry in (decoder if isinstance(decoder, dict) else {}).items()
             if _token_text(entry) and str(i).isdigit()}
    for key in _NAMED_SPECIALS:
        token = _token_text(config.get(key))
        if token is not None and token not in named and model.piece_to_id(token) != model.unk_id:
            added[token] = to_id(model.piece_to_id(token))
    specials = {**named, **added}
    pad = specials.get(_token_text(config.get("pad_token")) or ("</s>" if kind in SIGLIP_CLASSES else ""), pad)
    drop = set(specials.values()) | {pad}
    encode = _with_specials(lambda text: [to_id(i) for i in model.encode(text)], specials)
    vocab_size = max([vocab_size - 1, *specials.values()]) + 1

    def decode(ids: list[int]) -> str:
        return decode_pieces((p for i in ids if i not in drop and (p := to_piece(i)) is not None),
                             strip_first=model.proto.add_dummy_prefix)

    return _Vocabulary(encode, prefix, suffix, pad, decode, vocab_size)


class PieceTokenizer(TextTokenizer):
    """A SentencePiece vocabulary's ids, laid out as its model was trained on (the module docstring).

    ``files`` maps the names of :data:`TOKENIZER_FILES` found with the model to their paths.
    Constructing one reads nothing; the vocabulary is loaded on the first :meth:`encode_texts`.
    """

    def __init__(self, files: Mapping[str, Path], context_length: int, clean: str, model_vocab: int | None = None):
        self.files = {name: Path(path) for name, path in files.items()}
        self.context_length = context_length
        self.model_vocab = model_vocab  # the model's embedding rows: an id at or past it is refused
        self.clean = clean
        self._clean = cleaner(clean)
        self._vocabulary: _Vocabulary | None = None
        self._lock = threading.Lock()
        source = "tokenizer.json" if "tokenizer.json" in self.files else next((n for n in MODEL_FILES if n in self.files), None)
        if source is None:
            raise CheckpointError(f"no tokenizer file among {', '.join(sorted(self.files)) or 'the model files'}: "
                                  f"looked for tokenizer.json or {', '.join(MODEL_FILES)}")
        self.source = self.files[source]

    def _load(self) -> _Vocabulary:
        if self._vocabulary is None:
            with self._lock:
                if self._vocabulary is None:
                    config = _read_json(self.files.get("special_tokens_map.json"))
                    config.update(_read_json(self.files.get("tokenizer_config.json")))
                    load = _load_json_vocabulary if self.source.name == "tokenizer.json" else _load_model_vocabulary
                    vocabulary = load(self.source, config)
                    vocabulary.pad_left = config.get("padding_side") == "left"
                    self._vocabulary = vocabulary
        return self._vocabulary

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can give (loads the vocabulary)."""
        return self._load().vocab_size

    @property
    def pad_id(self) -> int:
        return self._load().pad_id

    def encode_text(self, text: str) -> list[int]:
        """The ids of one text after cleaning, without special tokens, uncut (the first MAX_TOKENIZED_CHARS characters)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: each of their bytes becomes U+FFFD, as in sentencepiece
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        try:
            return self._load().encode(self._clean(text))
        except ValueError as error:  # a vocabulary without <unk> meeting an unknown character
            raise CheckpointError(f"{self.source}: {error}") from error

    def encode_texts(self, texts, context_length=None, truncate=True):
        import numpy as np
        import torch

        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        vocabulary = self._load()
        prefix, suffix = vocabulary.prefix, vocabulary.suffix
        room = context_length - len(prefix) - len(suffix)
        if room < 0:
            raise ValueError(f"context_length {context_length} leaves no room for the special tokens")
        rows: list[list[int]] = []
        cut: list[bool] = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {index} is a {type(text).__name__}, not a str")
            long = len(text) > bpe.MAX_TOKENIZED_CHARS
            if long:  # cleaning collapses whitespace runs anyway: collapse them before cutting
                text = re.sub(r"\s+", " ", text)
                long = len(text) > bpe.MAX_TOKENIZED_CHARS
            ids = self.encode_text(text[: bpe.MAX_TOKENIZED_CHARS] if long else text)
            if (long or len(ids) > room) and not truncate:
                size = f"{len(text):,} characters, over the {bpe.MAX_TOKENIZED_CHARS:,} a text may have" if long else \
                    f"{len(ids) + len(prefix) + len(suffix)} tokens with special tokens, more than the context length {context_length}"
                error = ContextLengthError(f"text {index} ({_shorten(text)!r}) is {size}; shorten it or enable truncation")
                error.index, error.text, error.num_tokens = index, text, len(ids) + len(prefix) + len(suffix)
                raise error
            rows.append(prefix + ids[:room] + suffix)
            cut.append(long or len(ids) > room)
        result = np.full((len(rows), context_length), vocabulary.pad_id, dtype=np.int64)  # (N, context_length)
        for i, ids in enumerate(rows):
            if vocabulary.pad_left:
                result[i, context_length - len(ids) :] = ids
            else:
                result[i, : len(ids)] = ids
        if self.model_vocab is not None and result.size and int(result.max()) >= self.model_vocab:
            raise CheckpointError(f"{self.source}: gives token id {int(result.max())}, but the model's text tower has "
                                  f"{self.model_vocab:,} token embeddings: the tokenizer files are not this model's")
        return torch.from_numpy(result), cut

    def decode(self, ids: Any) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._load().decode(ids)


def tokenizer_for(config: Any, files: Mapping[str, Path] | None = None) -> TextTokenizer:
    """The tokenizer ``config.tokenizer`` names: ``"clip"`` (CLIP's BPE) or ``"sentencepiece"``
    (the model's own ``files``, keyed by the names of :data:`TOKENIZER_FILES`)."""
    kind = getattr(config, "tokenizer", "clip")
    if kind == "clip":
        return ClipTokenizer(config.context_length)
    if kind == "sentencepiece":
        files = {name: Path(path) for name, path in (files or {}).items()}
        if not any(name in files for name in ("tokenizer.json", *MODEL_FILES)):
            raise CheckpointError(f"the model's tokenizer files were not found (looked for {', '.join(TOKENIZER_FILES)})")
        return PieceTokenizer(files, config.context_length, getattr(config, "text_clean", "whitespace"),
                              model_vocab=getattr(config, "vocab_size", None))
    raise CheckpointError(f"tokenizer {kind!r} is not one of clip, sentencepiece")
