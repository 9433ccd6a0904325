"""The tokenizer a model's text tower uses, behind one interface: :func:`tokenizer_for` (from a
config and files) and :func:`tokenizer_of` (for a model: the one place that answers which).

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
unless the config's ``padding_side`` is ``"left"``. A special token the config names that the
vocabulary lacks is an error (transformers would add it as a new id the model never trained).

A text longer than the context raises :class:`~clipcli.errors.ContextLengthError` naming it and
its index, unless truncation is asked for: then its ids are cut and the special tokens kept, as
transformers truncates. Only the first ``MAX_TOKENIZED_CHARS`` characters of a text are
tokenized (see :mod:`.bpe`). Nothing is read (or downloaded) until the first text is encoded.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import CheckpointError, ClipcliError, ContextLengthError
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


def _one_line(error: BaseException, width: int = 300) -> str:
    return " ".join(str(error).split())[:width] or type(error).__name__


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    from .sentencepiece import read_capped

    data = read_capped(path, "a tokenizer config")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: bad JSON, a 5,000-digit number
        raise CheckpointError(f"{path}: bad JSON ({_one_line(error)})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as a config writes it: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class _Config:
    """``special_tokens_map.json`` overlaid with ``tokenizer_config.json``, remembering which file said what."""

    def __init__(self, files: Mapping[str, Path]):
        self.values: dict = {}
        self.origin: dict[str, Path] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            values = _read_json(files.get(name))
            self.values.update(values)
            self.origin.update(dict.fromkeys(values, files.get(name)))

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def added_tokens(self) -> dict[str, int]:
        """``added_tokens_decoder``'s tokens and ids; a key that is not an id raises :class:`CheckpointError`."""
        from .hf_stages import Unsupported, parse_token_id

        decoder = self.values.get("added_tokens_decoder")
        added = {}
        for key, entry in (decoder if isinstance(decoder, dict) else {}).items():
            if _token_text(entry) is not None:
                try:
                    added[_token_text(entry)] = parse_token_id(key, "added_tokens_decoder key", digits=True)
                except Unsupported as error:
                    raise CheckpointError(f"{self.origin['added_tokens_decoder']}: {error}") from error
        return added

    def named_tokens(self) -> dict[str, str]:
        """The special tokens the config names (``eos_token``: ``"</s>"``), by key."""
        return {key: token for key in _NAMED_SPECIALS if (token := _token_text(self.values.get(key))) is not None}

    def missing(self, key: str, token: str, source: Path) -> CheckpointError:
        """The error for a named special token the vocabulary lacks: transformers would add it as a
        new token, whose id the model's embeddings were never trained with."""
        return CheckpointError(f"{self.origin[key]}: its {key} {_shorten(token, 40)!r} is not in the vocabulary "
                               f"({source.name}): the tokenizer files do not belong together")


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


def _load_json_vocabulary(path: Path, config: _Config) -> _Vocabulary:
    from .tokenizer_json import JsonTokenizer

    tokenizer = JsonTokenizer.from_file(path)
    added = config.added_tokens()
    ids = {}
    for key, token in config.named_tokens().items():
        found = tokenizer.token_to_id(token)
        ids[token] = found if found is not None else added.get(token)
        if ids[token] is None:
            raise config.missing(key, token, path)
    extra = {token: i for token, i in added.items() if tokenizer.token_to_id(token) is None}
    prefix, suffix = tokenizer.prefix, tokenizer.suffix
    if "add_bos_token" in config or "add_eos_token" in config:  # transformers rebuilds the template then
        bos, eos = (ids.get(_token_text(config.get(k)) or "") for k in ("bos_token", "eos_token"))
        prefix = [bos] if config.get("add_bos_token") and bos is not None else []
        suffix = [eos] if config.get("add_eos_token") and eos is not None else []
    pad = ids.get(_token_text(config.get("pad_token")) or "")
    if pad is None:
        pad = tokenizer.token_to_id("<pad>")
    specials = set(tokenizer.special_ids) | set(prefix) | set(suffix) | {pad or 0} | set(extra.values())
    return _Vocabulary(_with_specials(tokenizer.encode, extra), prefix, suffix, pad or 0,
                       lambda ids: tokenizer.decode([i for i in ids if i not in specials]),
                       max([tokenizer.vocab_size - 1, *extra.values()]) + 1)


def _load_model_vocabulary(path: Path, config: _Config) -> _Vocabulary:
    from .sentencepiece import SentencePiece, decode_pieces

    model = SentencePiece.from_file(path)
    kind = config.get("tokenizer_class")
    xlmr = kind in XLMR_CLASSES or (kind is None and path.name == "sentencepiece.bpe.model")
    if xlmr:
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
        pad = model.pad_id if model.pad_id >= 0 else named.get("<pad>", 0)
        vocab_size = model.vocab_size
    # Special tokens the config names are matched in the text, as transformers matches its added tokens.
    added = config.added_tokens()
    for key, token in config.named_tokens().items():
        if token in named or token in added:
            continue
        if model.piece_to_id(token) == model.unk_id:
            raise config.missing(key, token, path)
        added[token] = to_id(model.piece_to_id(token))
    specials = {**named, **added}
    if not xlmr:
        bos = specials.get(_token_text(config.get("bos_token")) or model.proto.bos_piece)
        eos = specials.get(_token_text(config.get("eos_token")) or model.proto.eos_piece)
        prefix = [bos] if add_bos and bos is not None else []
        suffix = [eos] if add_eos and eos is not None else []
    pad = specials.get(_token_text(config.get("pad_token")) or ("</s>" if kind in SIGLIP_CLASSES else ""), pad)
    drop = set(specials.values()) | {pad}
    encode = _with_specials(lambda text: [to_id(i) for i in model.encode(text)], specials)
    vocab_size = max([vocab_size - 1, *specials.values()]) + 1

    def decode(ids: list[int]) -> str:
        return decode_pieces((p for i in ids if i not in drop and (p := to_piece(i)) is not None),
                             strip_first=model.proto.add_dummy_prefix)

    return _Vocabulary(encode, prefix, suffix, pad, decode, vocab_size)


def _source_name(files: Mapping[str, Path]) -> str | None:
    """The file a tokenizer is read from: ``tokenizer.json`` when there is one, else the ``.model``."""
    return "tokenizer.json" if "tokenizer.json" in files else next((n for n in MODEL_FILES if n in files), None)


FilesProvider = Callable[[], Mapping[str, Path]]


class PieceTokenizer(TextTokenizer):
    """A SentencePiece vocabulary's ids, laid out as its model was trained on (the module docstring).

    ``files`` maps the names of :data:`TOKENIZER_FILES` found with the model to their paths, or
    is a function giving that mapping when first called (it may download them: a hub repository's
    tokenizer, fetched for the first text, never for image-only work); ``origin`` names where
    those files will come from until then. Constructing one reads nothing; the vocabulary is loaded
    on the first :meth:`encode_texts`. Whatever is wrong with the files raises a one-line
    :class:`CheckpointError` naming the file.
    """

    def __init__(self, files: Mapping[str, Path] | FilesProvider, context_length: int, clean: str,
                 model_vocab: int | None = None, origin: str = "the model's tokenizer"):
        self.context_length = context_length
        self.model_vocab = model_vocab  # the model's embedding rows: an id at or past it is refused
        self.clean = clean
        self._clean = cleaner(clean)
        self._vocabulary: _Vocabulary | None = None
        self._lock = threading.RLock()
        self._provider: FilesProvider | None = files if callable(files) else None
        self._files: dict[str, Path] | None = None
        self.source: Path | str = origin  # the file read, once known
        if self._provider is None:
            self._take(files)  # type: ignore[arg-type]

    def _take(self, files: Mapping[str, Path]) -> None:
        files = {name: Path(path) for name, path in files.items()}
        source = _source_name(files)
        if source is None:
            raise CheckpointError(f"no tokenizer file among {', '.join(sorted(files)) or 'the model files'}: "
                                  f"looked for tokenizer.json or {', '.join(MODEL_FILES)}")
        self.source, self._files = files[source], files

    @property
    def files(self) -> dict[str, Path]:
        """The tokenizer files by name; from a provider, fetched now (the first time)."""
        if self._files is None:
            with self._lock:
                if self._files is None:
                    self._take(self._provider())  # type: ignore[misc]
        return self._files  # type: ignore[return-value]

    def _load(self) -> _Vocabulary:
        if self._vocabulary is None:
            with self._lock:
                if self._vocabulary is None:
                    files = self.files
                    try:
                        config = _Config(files)
                        load = _load_json_vocabulary if self.source.name == "tokenizer.json" else _load_model_vocabulary
                        vocabulary = load(self.source, config)
                        vocabulary.pad_left = config.get("padding_side") == "left"
                    except ClipcliError:
                        raise
                    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                            RecursionError) as error:  # a damaged file, whatever the damage
                        raise CheckpointError(f"{self.source}: cannot be read as a tokenizer "
                                              f"({type(error).__name__}: {_one_line(error)})") from error
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
        if not texts:  # nothing to tokenize: the vocabulary is neither read nor fetched
            return torch.zeros((0, context_length), dtype=torch.long), []
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
            if long and self.clean != "lowercase":  # the cleaning collapses whitespace runs anyway:
                text = re.sub(r"\s+", " ", text)  # collapse them before cutting
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


def tokenizer_for(config: Any, files: Mapping[str, Path] | None = None, *, fetch: FilesProvider | None = None,
                  origin: str = "the model's tokenizer") -> TextTokenizer:
    """The tokenizer ``config.tokenizer`` names: ``"clip"`` (CLIP's BPE) or ``"sentencepiece"``
    (the model's own ``files``, keyed by the names of :data:`TOKENIZER_FILES`; without them,
    those ``fetch`` gives when the first text is tokenized, coming from ``origin``)."""
    kind = getattr(config, "tokenizer", "clip")
    if kind == "clip":
        return ClipTokenizer(config.context_length)
    if kind == "sentencepiece":
        files = {name: Path(path) for name, path in (files or {}).items()}
        clean, vocab = getattr(config, "text_clean", "whitespace"), getattr(config, "vocab_size", None)
        if _source_name(files) is None and fetch is not None:
            return PieceTokenizer(fetch, config.context_length, clean, model_vocab=vocab, origin=origin)
        if _source_name(files) is None:
            raise CheckpointError(f"the model's tokenizer files were not found (looked for {', '.join(TOKENIZER_FILES)})")
        return PieceTokenizer(files, config.context_length, clean, model_vocab=vocab)
    raise CheckpointError(f"tokenizer {kind!r} is not one of clip, sentencepiece")


def tokenizer_of(model: Any) -> TextTokenizer:
    """Which tokenizer ``model`` uses, the one answer to that question: the one loading gave it
    (``model.tokenizer``: CLIP's BPE, or its own files, found with the weights or fetched for
    the first text), else the one its config names (a model that needs its own files and has
    none raises :class:`CheckpointError` saying so), else, for a model without a config, CLIP's BPE."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    config = getattr(model, "config", None)
    if config is None or getattr(config, "tokenizer", "clip") == "clip":
        return ClipTokenizer(getattr(model, "context_length", None) or getattr(config, "context_length", 77))
    return tokenizer_for(config)
