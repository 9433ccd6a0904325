"""Segmenting normalized text into vocabulary pieces: Unigram (Viterbi) and BPE, two flavours each.

Both libraries whose files we read run the same two algorithms with small differences, and the
ids only match when each difference is kept, so every class takes the flavour as data.

Unigram
-------
Every piece has a score (a log probability). The best segmentation of a string is the path
through the lattice of all pieces found in it whose scores sum highest, found by Viterbi left to
right: ``best[j] = max(best[i] + score(text[i:j]))`` over pieces ending at ``j``, candidates taken
in order of increasing length and only a strictly better score replacing the one held. A
character that starts no one-character piece gets an "unknown" node scored ``min score - 10``.
SentencePiece turns each unknown node into the ``<0xXX>`` pieces of its UTF-8 bytes (with byte
fallback) or into ``<unk>``, and merges runs of ``<unk>`` into one; ``tokenizers`` first fuses
runs of unknown nodes into one string, then looks that string up, then tries its bytes (all of
them or none), then ``<unk>``. SentencePiece's user-defined symbols get a bonus score so that
they win; its lattice holds normal and user-defined pieces, where ``tokenizers`` puts its whole
vocabulary (specials and byte pieces too).

BPE
---
Start from single characters (SentencePiece keeps a user-defined symbol whole and frozen), then
repeatedly merge the adjacent pair with the best priority, ties to the leftmost, until no pair
can merge. SentencePiece's priority is the score of the piece the two make (any vocabulary
piece: its merges are implicit), and a merge into an *unused* piece is undone at the end by
splitting it back into the two it came from. ``tokenizers`` merges only the listed pairs, by
their rank in the merges list, and maps a character missing from the vocabulary to its byte
pieces or to ``<unk>`` (runs fused into one) before merging.

Piece lengths
-------------
Viterbi looks up, at each position, each length some piece starting with that character has: the
work grows with the longest piece, so a lattice piece over :data:`MAX_PIECE_CHARS` characters is
refused. Real ones stay far below: SentencePiece's trainer caps a piece at 16 characters by default
(T5, XLM-R, XLM-V), Gemma's longest are runs of 31 spaces and markup of about that length. 256 is
eight times that, and bounds the worst vocabulary to seconds on the longest text tokenized.

Words
-----
When no piece contains U+2581 ``▁`` after another character (every piece is ``▁*x`` with no ``▁``
in ``x``), no piece can span the point before a ``▁`` that follows something else, so the text
can be cut there into words that are segmented independently and cached: prompts repeat their
words. (A run of unknowns fused across a cut is the one case where the words are not
independent; that text is then segmented whole.)
"""

from __future__ import annotations

import functools
import heapq
import re
from array import array
from typing import Iterable, Mapping, Sequence

SPACE = "\u2581"  # ▁, how SentencePiece writes a space
UNK_PENALTY = 10.0
WORD_CACHE_SIZE = 1 << 16
LONGEST_CACHED_WORD = 256  # characters; longer words are segmented every time
MAX_PIECE_CHARS = 256  # the longest lattice piece a Unigram vocabulary may have (see "Piece lengths")


def byte_piece(byte: int) -> str:
    return f"<0x{byte:02X}>"


def word_pattern(pieces: Iterable[str], suffix: bool = False) -> re.Pattern | None:
    """The pattern that finds the independent words of a text, or None when some piece would span a cut."""
    strip = str.rstrip if suffix else str.lstrip
    if any(SPACE in strip(p, SPACE) for p in pieces if SPACE in p):
        return None
    return re.compile(f"[^{SPACE}]+{SPACE}*|{SPACE}+" if suffix else f"{SPACE}*[^{SPACE}]+|{SPACE}+")


def merge_unknown(ids: list[int], unk_id: int) -> list[int]:
    """SentencePiece's output: each run of ``<unk>`` ids becomes one."""
    if ids.count(unk_id) < 2:
        return ids
    return [i for n, i in enumerate(ids) if i != unk_id or n == 0 or ids[n - 1] != unk_id]


class _Words:
    """Segmentation by cached words (see "Words" above); subclasses define ``segment(text) -> list[int]``."""

    fuses_unknown = False  # whether unknowns fuse across words (then a fused run means "segment whole")
    unk_id: int | None = None

    def __init__(self, words: re.Pattern | None, cache_size: int = WORD_CACHE_SIZE):
        self._words = words
        self._cached = functools.lru_cache(maxsize=cache_size)(lambda word: tuple(self.segment(word)))

    def segment(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _word(self, word: str) -> Sequence[int]:
        return self._cached(word) if len(word) <= LONGEST_CACHED_WORD else self.segment(word)

    def encode(self, text: str) -> list[int]:
        """The ids of a normalized text."""
        if not text:
            return []
        if self._words is None:
            return list(self._word(text))
        ids: list[int] = []
        unk = self.unk_id
        for word in self._words.findall(text):
            part = self._word(word)
            if self.fuses_unknown and ids and part and ids[-1] == unk and part[0] == unk:
                return self.segment(text)
            ids.extend(part)
        return ids


_F32 = array("f", [0.0])


def round32(value: float) -> float:
    """``value`` rounded to single precision (sentencepiece adds its scores in C ``float``)."""
    _F32[0] = value
    return _F32[0]


class Unigram(_Words):
    """Viterbi segmentation over scored pieces, in SentencePiece's or ``tokenizers``' flavour.

    ``lattice`` maps each piece the lattice may use to its id, ``scores`` gives each id's score
    (user-defined symbols already given their bonus). With ``fuse_unknown``
    (``tokenizers``) a run of unknowns is one token looked up in ``token_ids``; otherwise each is
    its own. ``byte_ids`` maps byte values to byte-piece ids, for byte fallback. ``unk_score`` is
    the score of an unknown node: the lowest score less :data:`UNK_PENALTY`.

    Precision. sentencepiece sums scores in ``float`` over the whole text and ``tokenizers`` in
    ``double`` over each pre-token, and exact ties are common ("xxxx" is "xx"+"xxxx" or
    "xxxx"+"xx"), settled by how the running sum rounds. So each word is first segmented in
    double precision from zero, cached, with the smallest gap between two compared paths; when
    that gap is under what rounding at the word's real offset could move (or the word is not
    where the reference starts its sums), the word is segmented again with the reference's
    exact arithmetic, starting from the exact running sum of the path so far.
    """

    def __init__(self, lattice: Mapping[str, int], scores: Sequence[float], unk_id: int | None, *,
                 unk_score: float, fuse_unknown: bool, single_precision: bool,
                 token_ids: Mapping[str, int] | None = None, byte_ids: Mapping[int, int] | None = None,
                 words: re.Pattern | None = None):
        super().__init__(words)
        self._lattice = lattice
        self._scores = scores
        self.unk_id = unk_id
        self._unk_score = unk_score
        self.fuses_unknown = fuse_unknown
        self._round = round32 if single_precision else None
        self._mantissa = 23 if single_precision else 52
        self._token_ids = token_ids if token_ids is not None else lattice
        self._byte_ids = byte_ids
        lengths: dict[str, set[int]] = {}  # by first character: the lengths of the pieces starting with it
        for piece in lattice:
            if piece:
                lengths.setdefault(piece[0], set()).add(len(piece))
        longest = max((max(found) for found in lengths.values()), default=0)
        if longest > MAX_PIECE_CHARS:
            piece = next(p for p in lattice if len(p) == longest)
            raise ValueError(f"piece {lattice[piece]} is {longest:,} characters long, over the {MAX_PIECE_CHARS} "
                             f"a vocabulary piece may have ({piece[:20]!r}...)")
        self._lengths = {first: tuple(sorted(found)) for first, found in lengths.items()}
        self._worst = max(abs(unk_score), abs(min(scores)), abs(max(scores)))  # bounds every score used
        self._cached_word = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(lambda word: self._word_result(word))

    def _viterbi(self, text: str, base: float = 0.0, exact: bool = False) -> tuple[list[tuple[int, int, int, float]], float]:
        """The best path as ``(start, end, id, score)`` nodes (id -1: unknown), and the smallest gap compared."""
        n = len(text)
        best = [base] * (n + 1)
        start = [-1] * (n + 1)
        ids = [0] * (n + 1)
        lattice, scores, lengths = self._lattice.get, self._scores, self._lengths
        rnd = self._round if exact else None
        gap = float("inf")
        for i in range(n):
            here = best[i]
            single = False
            for length in lengths.get(text[i], ()):
                j = i + length
                if j > n:
                    break
                piece_id = lattice(text[i:j])
                if piece_id is None:
                    continue
                score = here + scores[piece_id]
                if rnd is not None:
                    score = rnd(score)
                if start[j] < 0:
                    best[j], start[j], ids[j] = score if rnd is None else rnd(score), i, piece_id
                else:
                    if -gap < score - best[j] < gap:
                        gap = abs(score - best[j])
                    if score > best[j]:
                        best[j], start[j], ids[j] = score if rnd is None else rnd(score), i, piece_id
                if j == i + 1:
                    single = True
            if not single:
                score = here + self._unk_score
                if rnd is not None:
                    score = rnd(score)  # a float sum in sentencepiece
                j = i + 1
                if start[j] >= 0 and -gap < score - best[j] < gap:
                    gap = abs(score - best[j])
                if start[j] < 0 or score > best[j]:
                    best[j], start[j], ids[j] = score, i, -1
        path = []
        end = n
        while end > 0:
            node_id = ids[end]
            path.append((start[end], end, node_id, self._unk_score if node_id < 0 else scores[node_id]))
            end = start[end]
        path.reverse()
        return path, gap

    def _bytes(self, surface: str) -> list[int] | None:
        if self._byte_ids is None:
            return None
        try:
            return [self._byte_ids[b] for b in surface.encode("utf-8", "surrogatepass")]
        except KeyError:
            return None

    def _ids(self, text: str, path: list[tuple[int, int, int, float]]) -> list[int]:
        if self.unk_id is None and any(node[2] < 0 for node in path):
            raise ValueError(f"the vocabulary has no <unk> for {text!r}")
        out: list[int] = []
        if not self.fuses_unknown:  # SentencePiece
            for begin, end, node_id, _ in path:
                if node_id >= 0:
                    out.append(node_id)
                else:
                    out.extend(self._bytes(text[begin:end]) or [self.unk_id])  # type: ignore[list-item]
            return out
        surfaces: list[str] = []  # tokenizers: runs of <unk> fused, then every surface looked up
        previous_unknown = False
        for begin, end, node_id, _ in path:
            unknown = node_id < 0 or node_id == self.unk_id
            if unknown and previous_unknown:
                surfaces[-1] += text[begin:end]
            else:
                surfaces.append(text[begin:end])
            previous_unknown = unknown
        for surface in surfaces:
            token_id = self._token_ids.get(surface)
            if token_id is not None:
                out.append(token_id)
            else:
                out.extend(self._bytes(surface) or [self.unk_id])  # type: ignore[list-item]
        return out

    def _word_result(self, word: str) -> tuple[tuple[int, ...], tuple[float, ...], float, float]:
        """A word segmented from zero in double precision: ids, node scores, their sum, and the
        largest running sum before it at which rounding cannot change its segmentation."""
        path, gap = self._viterbi(word)
        scores = tuple(node[3] for node in path)
        # Each of up to len+1 additions on either of two compared paths rounds by half an ulp of
        # at most |offset| + len x worst score; an ulp of x is at most x / 2**(mantissa - 1).
        tolerance = gap / (2 * (len(word) + 1)) * 2.0 ** (self._mantissa - 1) - len(word) * self._worst
        return tuple(self._ids(word, path)), scores, sum(scores), tolerance

    def segment(self, text: str) -> list[int]:
        """The reference's ids for ``text`` as one piece of work (its sums starting from zero)."""
        path, _ = self._viterbi(text, 0.0, exact=True)
        return self._ids(text, path)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        words = [text] if self._words is None else self._words.findall(text)
        ids: list[int] = []
        done: list[tuple[float, ...]] = []  # node scores of the words so far, to rebuild the exact running sum
        total = 0.0
        for word in words:
            part, scores, word_total, tolerance = (
                self._cached_word(word) if len(word) <= LONGEST_CACHED_WORD else self._word_result(word))
            if not abs(total) < tolerance and (done or self._round is not None):
                base = 0.0
                for score in (score for word_scores in done for score in word_scores):
                    base = base + score if self._round is None else self._round(base + score)
                path, _ = self._viterbi(word, base, exact=True)
                part, scores = self._ids(word, path), tuple(node[3] for node in path)
                word_total = sum(scores)
            if self.fuses_unknown and ids and part and ids[-1] == self.unk_id and part[0] == self.unk_id:
                return self.segment(text)
            ids += part
            done.append(scores)
            total += word_total
        return ids


class ScoreBpe(_Words):
    """SentencePiece's BPE: merge the adjacent pair making the highest-scoring piece, leftmost first."""

    def __init__(self, mergeable: Mapping[str, int], scores: Sequence[float], piece_ids: Mapping[str, int],
                 unk_id: int, *, unused: frozenset[int] = frozenset(), user_symbols: Iterable[str] = (),
                 byte_ids: Mapping[int, int] | None = None, words: re.Pattern | None = None):
        super().__init__(words)
        self._mergeable = mergeable  # normal, user-defined and unused pieces
        self._scores = scores
        self._piece_ids = piece_ids  # every piece, reserved ones first, as PieceToId looks them up
        self.unk_id = unk_id
        self._unused = unused
        self._byte_ids = byte_ids
        self._user = sorted(user_symbols, key=len, reverse=True)
        self._user_first = {s[0] for s in self._user}

    def _symbols(self, text: str) -> tuple[list[str], list[bool]]:
        symbols, frozen = [], []
        i = 0
        while i < len(text):
            match = ""
            if text[i] in self._user_first:
                match = next((s for s in self._user if text.startswith(s, i)), "")
            symbols.append(match or text[i])
            frozen.append(bool(match))
            i += len(match) or 1
        return symbols, frozen

    def segment(self, text: str) -> list[int]:
        symbols, frozen = self._symbols(text)
        n = len(symbols)
        following = list(range(1, n)) + [-1]
        preceding = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []
        undo: dict[str, tuple[str, str]] = {}

        def consider(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            piece = symbols[left] + symbols[right]
            piece_id = self._mergeable.get(piece)
            if piece_id is None:
                return
            heapq.heappush(heap, (-self._scores[piece_id], left, right, len(piece)))
            if piece_id in self._unused:
                undo[piece] = (symbols[left], symbols[right])

        for i in range(n - 1):
            consider(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
                continue  # a stale pair: one side has merged since
            symbols[left] += symbols[right]
            symbols[right] = ""
            following[left] = following[right]
            if following[right] >= 0:
                preceding[following[right]] = left
            consider(preceding[left], left)
            consider(left, following[left])

        out: list[int] = []

        def emit(piece: str) -> None:
            piece_id = self._piece_ids.get(piece, self.unk_id)
            if piece_id in self._unused and piece in undo:
                emit(undo[piece][0])
                emit(undo[piece][1])
            elif piece_id == self.unk_id and self._byte_ids is not None:
                out.extend(self._byte_ids[b] for b in piece.encode("utf-8", "surrogatepass"))
            else:
                out.append(piece_id)

        index = 0 if n else -1
        while index >= 0:
            emit(symbols[index])
            index = following[index]
        return out


class RankBpe(_Words):
    """``tokenizers``' BPE: merge the listed pair of lowest rank, leftmost first."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *, unk_token: str | None,
                 fuse_unk: bool, byte_fallback: bool, prefix: str | None = None, suffix: str | None = None,
                 ignore_merges: bool = False, words: re.Pattern | None = None):
        super().__init__(words)
        self._vocab = vocab
        self.unk_id = vocab.get(unk_token) if unk_token is not None else None
        self._missing_unk = unk_token if unk_token is not None and self.unk_id is None else None
        self.fuses_unknown = fuse_unk
        self._byte_fallback = byte_fallback
        self._prefix, self._suffix = prefix or "", suffix or ""
        self._ignore_merges = ignore_merges
        ranks: dict[tuple[int, int], tuple[int, int]] = {}
        cut = len(self._prefix)
        for rank, (a, b) in enumerate(merges):
            if a not in vocab or b not in vocab or a + b[cut:] not in vocab:
                raise ValueError(f"merge {a!r} {b!r} uses a token that is not in the vocabulary")
            ranks[vocab[a], vocab[b]] = (rank, vocab[a + b[cut:]])
        self._ranks = ranks

    def _initial(self, word: str) -> list[int]:
        ids: list[int] = []
        pending = False  # an <unk> not yet written: tokenizers writes it at the next known character
        last = len(word) - 1
        for i, char in enumerate(word):
            token = (self._prefix if i else "") + char + (self._suffix if i == last else "")
            token_id = self._vocab.get(token)
            if token_id is not None:
                if pending:
                    ids.append(self.unk_id)  # type: ignore[arg-type]
                    pending = False
                ids.append(token_id)
                continue
            if self._byte_fallback:
                pieces = [self._vocab.get(byte_piece(b)) for b in token.encode("utf-8", "surrogatepass")]
                if None not in pieces:
                    ids.extend(pieces)  # type: ignore[arg-type]
                    continue
            if self._missing_unk is not None:
                raise ValueError(f"the unknown token {self._missing_unk!r} is not in the vocabulary ({char!r})")
            if self.unk_id is None:
                continue  # no <unk>: tokenizers drops the character
            if pending and not self.fuses_unknown:
                ids.append(self.unk_id)
            pending = True
        if pending:
            ids.append(self.unk_id)  # type: ignore[arg-type]
        return ids

    def segment(self, text: str) -> list[int]:
        if self._ignore_merges and text in self._vocab:
            return [self._vocab[text]]
        ids = self._initial(text)
        n = len(ids)
        alive = [True] * n
        following = list(range(1, n)) + [-1]
        preceding = list(range(-1, n - 1))
        ranks = self._ranks
        heap = [(ranks[pair][0], i, ranks[pair][1]) for i, pair in enumerate(zip(ids, ids[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, pos, new = heapq.heappop(heap)
            right = following[pos]
            if not alive[pos] or right < 0 or ranks.get((ids[pos], ids[right]), (0, -1))[1] != new:
                continue
            ids[pos] = new
            alive[right] = False
            following[pos] = following[right]
            if following[right] >= 0:
                preceding[following[right]] = pos
            for left, nxt in ((preceding[pos], pos), (pos, following[pos])):
                if left >= 0 and nxt >= 0 and (ids[left], ids[nxt]) in ranks:
                    r, made = ranks[ids[left], ids[nxt]]
                    heapq.heappush(heap, (r, left, made))
        return [token_id for token_id, keep in zip(ids, alive) if keep]
