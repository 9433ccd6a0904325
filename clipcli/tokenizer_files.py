"""Where a model's own tokenizer files come from (SigLIP's and MetaCLIP 2's SentencePiece; a
CLIP's BPE is bundled): beside its weights, else hub repositories.

Resolving a model (:mod:`clipcli.loading`) never downloads a tokenizer: :func:`find_tokenizer`
takes the files beside the weights, else a repository's files from the Hugging Face cache, and
otherwise only records the repositories; :func:`fetch_tokenizer_files` downloads what will be
read when the model's tokenizer meets its first text, so image-only work asks nothing of the
hub. :func:`tokenizer_fingerprint` is the tokenizer's part of the model's identity: the
repositories and revisions it comes from (cached or not, so an offline run and an online one
agree), or the contents of the files beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import hub
from .errors import CheckpointError, UnknownModelError

Repo = tuple[str, "str | None"]  # a hub repository and revision (None: main)


def named_tokenizer_repo(open_clip_config: Any) -> Repo | None:
    """The hub repository an OpenCLIP config names for its tokenizer (``text_cfg.hf_tokenizer_name``)."""
    model_cfg = open_clip_config.get("model_cfg", open_clip_config) if isinstance(open_clip_config, dict) else None
    text_cfg = model_cfg.get("text_cfg") if isinstance(model_cfg, dict) else None
    name = text_cfg.get("hf_tokenizer_name") if isinstance(text_cfg, dict) else None
    return (name, None) if isinstance(name, str) and name.count("/") == 1 else None


def _tokenizer_files(get: Callable[[str], Path | None]) -> dict[str, Path]:
    """The tokenizer files ``get`` finds, by name; none unless a vocabulary (tokenizer.json or a
    ``.model``) is among them: configs alone are no tokenizer."""
    from .text.tokenizers import MODEL_FILES, TOKENIZER_FILES

    files = {name: path for name in TOKENIZER_FILES if (path := get(name)) is not None}
    return files if any(name in files for name in ("tokenizer.json", *MODEL_FILES)) else {}


def _cached_tokenizer_files(repo: str, revision: str | None) -> dict[str, Path]:
    """Hub ``repo``'s tokenizer files in the HF cache (none for a name the hub would refuse)."""
    try:
        return _tokenizer_files(lambda name: hub.cached_file(repo, name, revision))
    except UnknownModelError:
        return {}


def find_tokenizer(beside: Callable[[str], Path | None] | None,
                   repos: Sequence[Repo | None] = ()) -> tuple[dict[str, Path], tuple[Repo, ...]]:
    """``(files, repositories)`` for a model's tokenizer: the files ``beside`` finds with the
    weights (no repositories), else hub ``repos`` with their cached files, if any repository's are
    cached (else none yet: they are fetched for the first text)."""
    files = _tokenizer_files(beside) if beside is not None else {}
    repos = tuple(dict.fromkeys(filter(None, repos)))
    if files or not repos:
        return files, ()
    # Every repository's cached files before any download: a model whose tokenizer lives in
    # another repository (SO400M's in ViT-B-16-SigLIP's), all cached, asks nothing of the hub.
    return next(filter(None, (_cached_tokenizer_files(*repo) for repo in repos)), {}), repos


def fetch_tokenizer_files(model: str, repos: Sequence[Repo], bars: bool = False) -> dict[str, Path]:
    """The tokenizer files of hub ``repos`` for ``model`` (its name, for messages): the first
    repository's in the HF cache, else downloaded now from the first that has a vocabulary, only
    the files that will be read: ``tokenizer.json`` when it has one (else its ``.model``), and the
    two configs beside it. Called by the model's tokenizer for its first text."""
    from .text.tokenizers import MODEL_FILES

    for repo, revision in repos:
        files = _cached_tokenizer_files(repo, revision)
        if files:
            return files
    wanted, whose = ("tokenizer.json", *MODEL_FILES), f"the tokenizer of {model}"
    names = [repo for repo, _ in repos]
    if hub.offline():
        raise hub.not_cached(" or ".join(names), wanted, None, name=whose)
    for repo, revision in repos:
        with hub.looking_for(whose, repo, wanted):
            try:
                vocabulary = hub.first_file(repo, wanted, revision, bars=bars)
            except UnknownModelError:  # no such repository (or a private one): the next
                continue
            if vocabulary is None:
                continue
            files = {vocabulary.name: vocabulary}
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (path := hub.optional_file(repo, name, revision, bars=bars)) is not None:
                    files[name] = path
            return files
    raise CheckpointError(f"{model}: the model's tokenizer files were not found (hub repository "
                          f"{' or '.join(names)} has none of {', '.join(wanted)})")


def tokenizer_fingerprint(files: Mapping[str, Path], repos: Sequence[Repo]) -> str | None:
    """Where a model's tokenizer comes from, as text for its identity: its hub ``repos`` and
    revisions, else the hashes of its ``files`` (None: neither, a CLIP's BPE)."""
    from .cache import remembered_sha256

    if repos:
        return json.dumps({"hub": [list(repo) for repo in repos]})
    if files:
        return json.dumps({name: hub.blob_sha256(path) or remembered_sha256(path) for name, path in files.items()},
                          sort_keys=True)
    return None
