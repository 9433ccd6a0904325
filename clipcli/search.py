"""Queries against an index: text or images, weighted, added and subtracted (rclip's semantics).

A query term is an image when it names an existing file or is an http(s) URL, and text
otherwise. ``W:TERM`` weighs a term by the number ``W`` (default 1; ``1:3:2 ratio`` searches
the text ``3:2 ratio``); a term given with ``minus`` is subtracted. Every term is embedded,
made unit length, multiplied by its weight; the sum is made unit length again and scored
by cosine against the index (:func:`clipcli.vectors.search`).

With a model that has a logit bias (SigLIP), each result also carries its probability
``sigmoid(exp(logit_scale) * cosine + logit_bias)``, the model's calibrated answer to "does
this text match this image" (for image terms it is the same function of the cosine, which
the model was not calibrated for), and ``min_prob`` keeps the results at least that
probable. The probability grows with the cosine, so this is a cosine threshold in other
units. A CLIP has no calibrated probabilities: its softmax only compares the candidates of
one query, so ``min_prob`` is refused for it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .display import display
from .errors import InputError, NoVectorsError
from .http import FetchOptions, url_scheme
from .items import Item, local_item, url_item
from .vectors import check_threshold
from .vectors import search as nearest
from .video import split_frame

if TYPE_CHECKING:  # pragma: no cover
    from .index import Hit, Index
    from .pipeline import LoadedModel

_WEIGHT = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)):(.+)$", re.DOTALL)


@dataclass(frozen=True)
class Term:
    """One query term. ``kind`` "text" or "image" says what it is; None (the CLI's terms): an
    image when it names an existing file or is an http(s) URL. ``data``: an image's bytes (an
    upload), read from nowhere else."""

    text: str
    weight: float = 1.0
    kind: str | None = None
    data: bytes | None = field(default=None, repr=False)

    @property
    def is_image(self) -> bool:
        if self.kind is not None:
            return self.kind == "image"
        return url_scheme(self.text) in ("http", "https") or os.path.isfile(split_frame(self.text)[0])


def parse_terms(queries: Sequence[str], minus: Sequence[str] = (), *, paths: bool = True) -> list[Term]:
    """``W:TERM`` -> ``Term(TERM, W)``; every ``minus`` term with its weight negated.

    ``paths`` False (terms from a request, which must never reach the filesystem): a term is
    an image only as an http(s) URL, and text otherwise, whatever files exist."""
    terms = []
    for sign, group in ((1.0, queries), (-1.0, minus)):
        for query in group:
            match = _WEIGHT.match(query)
            weighted = match and not (paths and os.path.exists(split_frame(query)[0]))
            weight, text = (float(match[1]), match[2]) if weighted else (1.0, query)
            if not text.strip():
                raise InputError(f"empty query term {display(query)!r}")
            if not math.isfinite(weight):  # 400 digits are inf as a float
                shown = match[1] if len(match[1]) <= 24 else f"{match[1][:12]}...({len(match[1])} characters)"
                raise InputError(f"the weight {shown} of query term {display(text)[:80]!r} is too large "
                                 "to compute with; give a weight such as 0.5 or 3")
            kind = None if paths else ("image" if url_scheme(text) in ("http", "https") else "text")
            terms.append(Term(text, sign * weight, kind))
    if not terms:
        raise InputError("give a query: text, an image file or an image URL")
    return terms


def scaled(terms: Sequence[Term]) -> list[Term]:
    """The terms checked, their weights divided by the largest (large ones never overflow)."""
    if not all(math.isfinite(t.weight) for t in terms):
        raise InputError("every query weight must be a finite number")
    if not terms:
        raise InputError("give a query: text, an image file or an image URL")
    scale = max(abs(t.weight) for t in terms)
    if not scale:
        raise InputError("the query terms cancel out (every weight is zero)")
    return [replace(t, weight=t.weight / scale) for t in terms]


def image_item(term: Term) -> Item:
    """What an image term is read from: its bytes, its URL or its file."""
    if term.data is not None:
        return Item(name=term.text, data=term.data)
    if url_scheme(term.text) in ("http", "https"):
        return url_item(term.text)
    return local_item(term.text)  # a file, or a video's frame: clip.mp4#t=12 (a video alone: its first frame)


def combine(terms: Sequence[Term], embedded: Sequence, dim: int, model_name: str) -> np.ndarray:
    """The unit vector of the weighted sum of the terms' unit embeddings (``embedded``: one
    :class:`~clipcli.batching.Embedding` per term, in order)."""
    total = np.zeros(dim, np.float64)
    for term, result in zip(terms, embedded):
        if not result.ok:
            raise InputError(f"query {'image' if term.is_image else 'text'} {display(term.text)}: {result.error}")
        total += term.weight * result.embedding.astype(np.float64)
    norm = np.linalg.norm(total)
    if not np.isfinite(norm):
        raise InputError(f"the query's vector is not finite ({norm}): {model_name} gave NaN or inf for a term")
    if norm < 1e-6:
        raise InputError("the query terms cancel out (their weighted sum is zero)")
    return (total / norm).astype(np.float32)


def query_vector(loaded: "LoadedModel", terms: Sequence[Term], fetch: FetchOptions = FetchOptions()) -> np.ndarray:
    """The unit vector of the weighted sum of the terms' unit embeddings."""
    from .batching import embed_images, embed_texts

    terms = scaled(terms)
    texts = [t for t in terms if not t.is_image]
    images = [t for t in terms if t.is_image]
    embedded = embed_texts(loaded, [t.text for t in texts]) if texts else []
    if images:
        embedded += list(embed_images(loaded, [image_item(t) for t in images], workers=0, fetch=fetch))
    return combine(texts + images, embedded, loaded.embed_dim, loaded.name)


def score_kind(model) -> str:
    """What a search result's scores are: ``"cosine"`` (its ``score`` only), or ``"sigmoid"``
    for a model with a logit bias (its ``prob`` as well)."""
    from .zeroshot import logit_parameters

    return "cosine" if logit_parameters(model)[1] is None else "sigmoid"


def check_min_prob(loaded: "LoadedModel", min_prob: float | None) -> None:
    """Refuse a minimum probability that is not one, or that ``loaded`` cannot give (no logit bias)."""
    from .zeroshot import check_probability

    check_probability(min_prob)
    if min_prob is not None and score_kind(loaded.model) != "sigmoid":
        raise InputError(f"{min_prob}: {loaded.name} has no calibrated probabilities (a softmax model: its "
                         "probabilities only compare the candidates of one query)", option="min_prob",
                         fix="threshold")


def with_probabilities(hits: Sequence["Hit"], model, min_prob: float | None = None) -> list["Hit"]:
    """``hits`` with their ``prob`` for a model with a logit bias (unchanged without one), only
    those at least ``min_prob`` probable, ranked again."""
    import torch

    from .zeroshot import logit_parameters, sigmoid_probabilities

    scale, bias = logit_parameters(model)
    if bias is None or not hits:
        return list(hits)
    probs = sigmoid_probabilities(torch.tensor([hit.score for hit in hits], dtype=torch.float64), scale, bias)
    kept = [replace(hit, prob=prob) for hit, prob in zip(hits, probs.tolist())
            if min_prob is None or prob >= min_prob]
    return [replace(hit, rank=rank) for rank, hit in enumerate(kept, start=1)]


def record(hit: "Hit", kind: str) -> dict:
    """A result as the commands write it: ``{"rank", "image", "score", ["prob",] "score_kind",
    "taken", "taken_source", "width", "height"}`` (``taken``: the capture time in ISO 8601, UTC
    but for an ``exif-local`` one, the camera's clock; None when the index does not know it)."""
    from .metadata import iso

    out = {"rank": hit.rank, "image": hit.name, "score": hit.score}
    if hit.prob is not None:
        out["prob"] = hit.prob
    return {**out, "score_kind": kind, "taken": iso(hit.taken, hit.taken_source), "taken_source": hit.taken_source,
            "width": hit.width, "height": hit.height}


SORTS = ("score", "date")


def check_sort(by: str) -> None:
    if by not in SORTS:
        raise InputError(f"{by!r}: choose {' or '.join(SORTS)}", option="sort")


def ordered(hits: Sequence["Hit"], by: str = "score") -> list["Hit"]:
    """``hits`` best first (``score``), or the same hits newest first (``date``; undated last),
    each keeping its rank by score."""
    check_sort(by)
    if by == "score":
        return list(hits)
    return sorted(hits, key=lambda hit: (hit.taken is None, -(hit.taken or 0.0), hit.rank))


def search(index: "Index", loaded: "LoadedModel", terms: Sequence[Term], *, top_k: int = 10,
           threshold: float | None = None, min_prob: float | None = None, under: Sequence[str] = (),
           after: float | None = None, before: float | None = None,
           fetch: FetchOptions = FetchOptions()) -> list["Hit"]:
    """The best ``top_k`` files of ``index`` for ``terms`` with ``loaded``'s vectors, at least
    ``threshold`` (a cosine) and ``min_prob`` (a probability: models with a logit bias only)
    apart, taken in ``[after, before)`` (Unix seconds) when given; with a logit bias each hit
    carries its probability."""
    check_threshold(threshold)
    check_min_prob(loaded, min_prob)
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, not {top_k}")
    model = _model_of(index, loaded)
    return rank(index, loaded, query_vector(loaded, terms, fetch), top_k=top_k, threshold=threshold,
                min_prob=min_prob, under=under, after=after, before=before, model=model)


def _model_of(index: "Index", loaded: "LoadedModel") -> int:
    model = index.model_id(identity=loaded.identity)
    with index.guard():
        held = model is not None and index.db.execute(
            "SELECT 1 FROM vectors WHERE model_id = ? LIMIT 1", (model,)).fetchone()
    if not held:
        raise NoVectorsError(f"{index.path} holds no vectors of {loaded.name}")
    return model


def rank(index: "Index", loaded: "LoadedModel", query: np.ndarray, *, top_k: int = 10,
         threshold: float | None = None, min_prob: float | None = None, under: Sequence[str] = (),
         after: float | None = None, before: float | None = None, model: int | None = None) -> list["Hit"]:
    """:func:`search` for a query vector already made (:func:`query_vector`, or :func:`combine`
    of embeddings made elsewhere)."""
    check_threshold(threshold)
    check_min_prob(loaded, min_prob)
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, not {top_k}")
    model = model if model is not None else _model_of(index, loaded)
    if after is not None and before is not None and after >= before:
        from .metadata import iso

        raise InputError(f"no time is after {iso(after)} and before {iso(before)}: the range is empty")
    hits = nearest(index, model, query, top_k=top_k, threshold=threshold, under=under, after=after, before=before)
    return with_probabilities(hits, loaded.model, min_prob)
