"""What ``clipcli models`` lists: every registry entry, its facts, and whether it is cached.

Cheap and read-only: no torch, no network. OpenAI's nine are looked for in clipcli's cache
(:func:`clipcli.cache.cache_listing`), OpenCLIP's and the transformers repositories of SigLIP,
SigLIP 2 and MetaCLIP 2 in the Hugging Face cache. Each record says whose weights they are
(``family``: ``OpenAI``, ``LAION-2B``, ``SigLIP``, ``SigLIP 2``, ``MetaCLIP 2``, ...), how the
model scores a pair (``score_kind``: ``softmax``, or ``sigmoid`` for SigLIP's probabilities)
and whether its text tower is ``multilingual``. :func:`cells` and :func:`fitting_columns` give
the short text of the table that ``clipcli models`` prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from . import hub
from .models import registry


def _architecture_facts(arch: str) -> dict:
    hints = registry.architecture_hints(arch) or {}
    return {"input_resolution": hints.get("image_resolution"), "embed_dim": hints.get("embed_dim"),
            "parameters": registry.parameters(arch), "score_kind": registry.score_kind(hints),
            "context_length": hints.get("context_length")}


def _hub_records() -> list[dict]:
    """The listed transformers repositories (SigLIP, SigLIP 2, MetaCLIP 2), cached when their
    weights are in the Hugging Face cache."""
    records = []
    for alias in registry.hub_aliases():
        path = hub.first_cached(alias.repo, registry.TRANSFORMERS_FILES)
        records.append({"name": alias.name, "released": True, **_architecture_facts(alias.arch),
                        "input_resolution": alias.image_resolution, "context_length": alias.context_length,
                        "parameters": alias.parameters, "size": None,
                        "cached": path is not None, "path": str(path) if path else None, "sha256": None,
                        "url": f"https://huggingface.co/{alias.repo}", "family": alias.family,
                        "license": alias.license, "imagenet_top1": alias.imagenet_top1,
                        "multilingual": alias.multilingual})
    return records


def catalog(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One record per registry entry (OpenAI's nine, OpenCLIP's, then the transformers
    repositories of SigLIP, SigLIP 2 and MetaCLIP 2), then one per other file downloaded with
    ``clipcli download URL``."""
    from .cache import cache_listing

    named, downloads = [], []
    for record in cache_listing(cache_dir):
        info = registry.find_model(record["name"]) if record["released"] else None
        if info is None:
            downloads.append({**record, "family": None, "parameters": None, "license": None, "imagenet_top1": None,
                              "score_kind": None, "multilingual": None, "context_length": None})
            continue
        facts = registry.openai_facts(info)
        arch = _architecture_facts(registry.openai_architecture(info))
        if not record["cached"]:  # the same weights as open_clip downloads them, in the HF cache
            path = hub.first_cached(info.hf_repo, registry.OPEN_CLIP_FILES)
            record = {**record, "cached": path is not None, "path": str(path) if path else None}
        named.append({**record, "family": "OpenAI", "parameters": arch["parameters"],
                      "license": facts.get("license"), "imagenet_top1": facts.get("imagenet_top1"),
                      "score_kind": "softmax", "multilingual": False, "context_length": arch["context_length"]})
    for entry in registry.pretrained():
        path = hub.first_cached(entry.hf_repo, entry.files)
        named.append({"name": entry.name, "released": True, **_architecture_facts(entry.arch), "size": None,
                      "cached": path is not None, "path": str(path) if path else None, "sha256": None,
                      "url": f"https://huggingface.co/{entry.hf_repo}", "family": entry.family,
                      "license": entry.license, "imagenet_top1": entry.imagenet_top1,
                      "score_kind": entry.score_kind, "multilingual": entry.multilingual})
    return named + _hub_records() + downloads


# --------------------------------------------------------------------------- the table's text

COLUMNS = ("name", "family", "score", "params", "res", "dim", "lang", "licence", "top-1", "cached")
# left out first to last on a narrow terminal
OPTIONAL = ("lang", "score", "dim", "res", "family", "params", "top-1", "licence")


def where_cached(path: str | None) -> str:
    """A short answer to "is it cached, and where": ``no``, ``HF`` (the Hugging Face cache) or
    ``clipcli`` (clipcli's cache). The full path is in the record (``--format json``)."""
    if path is None:
        return "no"
    return "HF" if Path(path).is_relative_to(hub.cache_dir()) else "clipcli"


def cells(record: dict) -> dict[str, str]:
    """One catalog record as the text of its table row, keyed by :data:`COLUMNS`; ``-`` where
    a fact is not known (a file downloaded by URL). ``score`` is ``softmax`` or ``sigmoid``,
    ``lang`` is ``multi`` for a multilingual text tower, else ``en``."""
    params, top1, multilingual = record["parameters"], record["imagenet_top1"], record.get("multilingual")
    return {"name": record["name"], "family": record["family"] or "-", "score": record.get("score_kind") or "-",
            "params": f"{params / 1e6:,.0f}M" if params else "-",
            "res": str(record["input_resolution"] or "-"), "dim": str(record["embed_dim"] or "-"),
            "lang": "-" if multilingual is None else ("multi" if multilingual else "en"),
            "licence": record["license"] or "-",
            "top-1": f"{top1:.1f}" if top1 else "-", "cached": where_cached(record["path"])}


def fitting_columns(rows: Sequence[dict[str, str]], width: int, *, per_column: int = 3, edges: int = 1) -> tuple[str, ...]:
    """The :data:`COLUMNS` whose widest cells (or headers) fit in ``width`` characters, leaving
    out :data:`OPTIONAL` ones in its order until they do; ``name`` and ``cached`` always stay,
    so names are never cut. Each column costs ``per_column`` more (a rich box: a rule and
    two spaces of padding), the table ``edges`` more (the closing rule)."""
    widest = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in COLUMNS}
    shown = list(COLUMNS)
    for column in OPTIONAL:
        if sum(widest[c] + per_column for c in shown) + edges <= width:
            break
        shown.remove(column)
    return tuple(shown)
