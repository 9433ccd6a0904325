"""CLIP's byte-level BPE tokenizer, giving the same ids as OpenAI's ``clip.tokenize``.

How a caption becomes ids
-------------------------
1. Clean the text. ``ftfy.fix_text`` repairs mojibake ("schÃ¶n" -> "schön") and other damage,
   then HTML entities are unescaped twice ("&amp;lt;" -> "<"), runs of whitespace collapse
   to one space, the ends are stripped, and everything is lower-cased. Plain ASCII text with no
   ``&`` and no control characters is exactly what ftfy and ``html.unescape`` return unchanged,
   so it skips those two (slow) steps.

2. Split the text into pre-tokens with one regular expression: the literal special tokens
   ``<|startoftext|>`` and ``<|endoftext|>``, the contractions 's 't 're 've 'm 'll 'd, runs of
   letters, single digits (so "2024" is four pre-tokens), and runs of anything else that is not
   whitespace (punctuation, emoji). Spaces never reach the BPE step: a pre-token ends a word.
   (ASCII text goes through an equivalent pattern spelled in ASCII, which the standard
   library's ``re`` runs a few times faster than ``regex`` runs the Unicode one.)

3. Turn each pre-token into a string over a 256-symbol alphabet, one symbol per UTF-8 byte.
   Byte-level BPE needs a symbol for every byte, but the merges file is text, so
   :func:`bytes_to_unicode` gives every byte a printable character: the printable Latin-1 bytes
   stand for themselves and the other 68 (control characters, space, soft hyphen...) borrow
   characters from U+0100 upwards. Any string can now be tokenized; nothing is "unknown".

4. Run byte-pair encoding on that string. Start from single symbols, the last one carrying the
   end-of-word marker ``</w>`` ("cat" -> ``c a t</w>``). The merges file lists 48,894 pairs in
   the order they were learned (OpenAI keeps the first 49152 - 256 - 2 lines after the header);
   a pair's line number is its rank. Repeatedly find the adjacent pair with the lowest rank and
   merge every non-overlapping occurrence of it, left to right, until no adjacent pair has a
   rank (``c a t</w>`` -> ``c at</w>`` -> ``cat</w>``). Common words end as one symbol, rare
   ones as a few pieces, and anything at all as single bytes at worst.

5. Look each symbol up in the vocabulary, whose order fixes the ids: the 256 byte symbols
   (0-255), the same with ``</w>`` (256-511), one symbol per merge in rank order (512-49405),
   then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

6. For the model, wrap the ids in start and end tokens and pad with zeros to the context length
   (77). The text model reads its output at the end token, so a text that is too long either
   raises :class:`~clipcli.errors.ContextLengthError` or, with truncation, is cut and its last
   kept id replaced by the end token.

Nothing happens at import time: the merges file is read and the tables built when the first
text is encoded. Pre-tokens repeat a lot (a prompt template over a thousand class names), so
the ids of each pre-token are cached in a bounded LRU cache.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import ContextLengthError

if TYPE_CHECKING:  # pragma: no cover
    import regex
    import torch

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # merges OpenAI's vocabulary uses; the file has a few more
WORD_CACHE_SIZE = 1 << 16  # pre-tokens whose ids are remembered
PRETOKEN_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same pattern for cleaned ASCII text, where letters are [a-z] and digits [0-9], run by the
# standard library's faster engine.
ASCII_PRETOKEN_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\sa-zA-Z0-9]+"""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The printable character standing for each byte value (see step 3 above)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    borrowed = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(borrowed))]
    return dict(zip(printable + borrowed, chars))


def needs_repair(text: str) -> bool:
    """False when ftfy and ``html.unescape`` would return ``text`` unchanged.

    That holds for ASCII without ``&`` (no entity to unescape) and without control characters
    other than tab and newline (ftfy removes or rewrites those); the rest of ftfy only touches
    non-ASCII characters.
    """
    if not text.isascii() or "&" in text:
        return True
    return not (text.isprintable() or text.replace("\t", "").replace("\n", "").isprintable())


def clean_text(text: str) -> str:
    """Step 1: the text as the tokenizer sees it (repaired, unescaped, whitespace collapsed, lower case)."""
    if needs_repair(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def read_merges(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The first :data:`NUM_MERGES` merge rules from a gzipped merges file (default: the packaged one)."""
    if path is None:
        from importlib import resources

        data = resources.files("clipcli").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]  # line 0 is a header
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]


class Tokenizer:
    """CLIP's byte-level BPE tokenizer over a list of merges (steps 1-5 of the module docstring)."""

    def __init__(self, merges: Sequence[tuple[str, str]] | None = None, cache_size: int = WORD_CACHE_SIZE):
        import regex

        if merges is None:
            merges = read_merges()
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        # Byte (de)coding as str.translate over bytes read as Latin-1: one C call, not a loop.
        self._unbyte_table = {ord(char): byte for byte, char in self.byte_encoder.items()}

        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [SOT, EOT]
        self.decoder: list[str] = vocab
        self.encoder: dict[str, int] = {symbol: i for i, symbol in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, str], int] = {tuple(pair): rank for rank, pair in enumerate(merges)}  # type: ignore[misc]
        self.sot_token: int = self.encoder[SOT]
        self.eot_token: int = self.encoder[EOT]
        self.vocab_size: int = len(vocab)
        self.pattern: regex.Pattern[str] = regex.compile(PRETOKEN_PATTERN, regex.IGNORECASE)
        self._ascii_pattern = re.compile(ASCII_PRETOKEN_PATTERN, re.IGNORECASE | re.ASCII)
        self._special = {SOT: (self.sot_token,), EOT: (self.eot_token,)}
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._encode_word)

    def bpe(self, word: str) -> list[str]:
        """Step 4: merge the byte symbols of one byte-encoded pre-token, lowest rank first."""
        symbols = list(word)
        symbols[-1] += "</w>"
        ranks = self.bpe_ranks
        not_a_merge = len(ranks)
        while len(symbols) > 1:
            rank, i = min((ranks.get(pair, not_a_merge), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if rank == not_a_merge:
                break
            first, second = symbols[i], symbols[i + 1]
            merged = symbols[:i]
            n = len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_word(self, pretoken: str) -> tuple[int, ...]:
        special = self._special.get(pretoken)
        if special is not None:
            return special
        word = pretoken.encode("utf-8").decode("latin-1").translate(self.byte_encoder)
        return tuple(self.encoder[symbol] for symbol in self.bpe(word))

    def pretokenize(self, text: str) -> list[str]:
        """Step 2: split cleaned text into the pieces BPE runs on ("a cat's" -> ["a", "cat", "'s"])."""
        pattern = self._ascii_pattern if text.isascii() else self.pattern
        return pattern.findall(text)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without start and end tokens."""
        ids: list[int] = []
        for pretoken in self.pretokenize(clean_text(text)):
            ids.extend(self._word_ids(pretoken))
        return ids

    def decode(self, ids: Iterable[int] | Any) -> str:
        """The text for ``ids`` (a list or a 1-D tensor): each ``</w>`` becomes a space, like OpenAI's decode.

        Special tokens decode to their strings and padding zeros to "!", as in OpenAI's decoder;
        bytes that do not form valid UTF-8 become U+FFFD.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        pieces = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0 to {self.vocab_size - 1})")
            pieces.append(self.decoder[i])
        data = "".join(pieces).translate(self._unbyte_table).encode("latin-1")
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


_default: Tokenizer | None = None
_default_lock = threading.Lock()


def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged merges, built on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Tokenizer()
    return _default


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# Only this much of a text is tokenized: its first tokens are all a context takes (a 60 MiB
# caption took 4 GB to tokenize whole). 851 characters a token for a 77-token context: only a
# text of long whitespace runs could tokenize differently from the reference, which cuts after.
MAX_TOKENIZED_CHARS = 1 << 16


def encode_texts(
    texts: str | Sequence[str], context_length: int = 77, truncate: bool = True
) -> tuple[torch.LongTensor, list[bool]]:
    """Token ids ``[N, context_length]`` and, per text, whether it was cut to fit.

    Each row is start token, the text's ids, end token, then zeros. A text that does not fit
    raises :class:`ContextLengthError` naming it and its index, unless ``truncate`` is true:
    then it keeps its first ``context_length`` ids with the last one replaced by the end token.
    Only the first :data:`MAX_TOKENIZED_CHARS` characters of a text are tokenized; a longer
    text counts as cut.
    """
    import numpy as np
    import torch

    if isinstance(texts, str):
        texts = [texts]
    if context_length < 1:
        raise ValueError(f"context_length must be at least 1, got {context_length}")
    tokenizer = default_tokenizer()
    sot, eot = tokenizer.sot_token, tokenizer.eot_token
    rows: list[list[int]] = []  # unpadded
    truncated: list[bool] = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} is a {type(text).__name__}, not a str")
        long = len(text) > MAX_TOKENIZED_CHARS
        if long:  # runs of whitespace are one space to the tokenizer: collapse them before cutting
            text = re.sub(r"\s+", " ", text)
            long = len(text) > MAX_TOKENIZED_CHARS
        ids = [sot, *tokenizer.encode(text[:MAX_TOKENIZED_CHARS] if long else text), eot]
        cut = long or len(ids) > context_length
        if cut:
            if not truncate and long:
                error = ContextLengthError(
                    f"text {index} ({_shorten(text)!r}) is {len(text):,} characters, over the "
                    f"{MAX_TOKENIZED_CHARS:,} a text may have; shorten it or enable truncation"
                )
                error.index, error.text, error.num_tokens = index, text, len(ids)
                raise error
            if not truncate:
                error = ContextLengthError(
                    f"text {index} ({_shorten(text)!r}) is {len(ids)} tokens with start and end tokens, "
                    f"more than the context length {context_length}; shorten it or enable truncation"
                )
                error.index, error.text, error.num_tokens = index, text, len(ids)
                raise error
            ids = ids[:context_length]
            ids[-1] = eot
        rows.append(ids)
        truncated.append(cut)
    result = np.zeros((len(rows), context_length), dtype=np.int64)  # (N, context_length)
    for i, ids in enumerate(rows):
        result[i, : len(ids)] = ids
    return torch.from_numpy(result), truncated


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """Token ids ``[N, context_length]``, identical to OpenAI's ``clip.tokenize``.

    A text longer than the context raises :class:`ContextLengthError` (a ``ValueError``) naming
    it and its index, unless ``truncate=True``; then it is cut and its last kept id is the end token.
    """
    return encode_texts(texts, context_length=context_length, truncate=truncate)[0]
