"""Queries against an index: text or images, weighted, added and subtracted (rclip's semantics).

A query term is an image when it names an existing file or is an http(s) URL, and text
otherwise. ``W:TERM`` weighs a term by the number ``W`` (default 1; ``1:3:2 ratio`` searches
the text ``3:2 ratio``); a term given with ``minus`` is subtracted. Every term is embedded,
made unit length, multiplied by its weight; the sum is made unit length again and scored
by cosine against the index (:func:`clipcli.vectors.search`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .display import display
from .errors import InputError, NoVectorsError
from .http import FetchOptions, url_scheme
from .items import Item
from .vectors import check_threshold
from .vectors import search as nearest

if TYPE_CHECKING:  # pragma: no cover
    from .index import Hit, Index
    from .pipeline import LoadedModel

_WEIGHT = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)):(.+)$", re.DOTALL)


@dataclass(frozen=True)
class Term:
    text: str
    weight: float = 1.0

    @property
    def is_image(self) -> bool:
        return url_scheme(self.text) in ("http", "https") or os.path.isfile(self.text)


def parse_terms(queries: Sequence[str], minus: Sequence[str] = ()) -> list[Term]:
    """``W:TERM`` -> ``Term(TERM, W)``; every ``minus`` term with its weight negated."""
    terms = []
    for sign, group in ((1.0, queries), (-1.0, minus)):
        for query in group:
            match = _WEIGHT.match(query)
            weight, text = (float(match[1]), match[2]) if match and not os.path.exists(query) else (1.0, query)
            if not text.strip():
                raise InputError(f"empty query term {display(query)!r}")
            if not math.isfinite(weight):  # 400 digits are inf as a float
                shown = match[1] if len(match[1]) <= 24 else f"{match[1][:12]}...({len(match[1])} characters)"
                raise InputError(f"the weight {shown} of query term {display(text)[:80]!r} is too large "
                                 "to compute with; give a weight such as 0.5 or 3")
            terms.append(Term(text, sign * weight))
    if not terms:
        raise InputError("give a query: text, an image file or an image URL")
    return terms


def query_vector(loaded: "LoadedModel", terms: Sequence[Term], fetch: FetchOptions = FetchOptions()) -> np.ndarray:
    """The unit vector of the weighted sum of the terms' unit embeddings."""
    from .batching import embed_images, embed_texts

    if not all(math.isfinite(t.weight) for t in terms):
        raise InputError("every query weight must be a finite number")
    if not terms:
        raise InputError("give a query: text, an image file or an image URL")
    scale = max(abs(t.weight) for t in terms)  # weights are divided by it: large ones never overflow
    if not scale:
        raise InputError("the query terms cancel out (every weight is zero)")
    terms = [Term(t.text, t.weight / scale) for t in terms]
    texts = [t for t in terms if not t.is_image]
    images = [t for t in terms if t.is_image]
    total = np.zeros(loaded.embed_dim, np.float64)
    if texts:
        for term, result in zip(texts, embed_texts(loaded, [t.text for t in texts])):
            total += term.weight * result.embedding.astype(np.float64)
    if images:
        items = [Item(name=t.text, url=t.text) if url_scheme(t.text) else Item(name=t.text, path=t.text) for t in images]
        for term, result in zip(images, embed_images(loaded, items, workers=0, fetch=fetch)):
            if not result.ok:
                raise InputError(f"query image {display(term.text)}: {result.error}")
            total += term.weight * result.embedding.astype(np.float64)
    norm = np.linalg.norm(total)
    if not np.isfinite(norm):
        raise InputError(f"the query's vector is not finite ({norm}): {loaded.name} gave NaN or inf for a term")
    if norm < 1e-6:
        raise InputError("the query terms cancel out (their weighted sum is zero)")
    return (total / norm).astype(np.float32)


def search(index: "Index", loaded: "LoadedModel", terms: Sequence[Term], *, top_k: int = 10,
           threshold: float | None = None, under: Sequence[str] = (), fetch: FetchOptions = FetchOptions()) -> list["Hit"]:
    """The best ``top_k`` files of ``index`` for ``terms`` with ``loaded``'s vectors."""
    check_threshold(threshold)
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, not {top_k}")
    model = index.model_id(identity=loaded.identity)
    with index.guard():
        held = model is not None and index.db.execute(
            "SELECT 1 FROM vectors WHERE model_id = ? LIMIT 1", (model,)).fetchone()
    if not held:
        raise NoVectorsError(f"{index.path} holds no vectors of {loaded.name}")
    return nearest(index, model, query_vector(loaded, terms, fetch), top_k=top_k, threshold=threshold, under=under)
