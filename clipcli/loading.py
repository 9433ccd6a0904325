"""The one loading path: a name or a file -> a :class:`ModelSource` -> a ready model.

Names a user may type, tried in this order:

- ``hf-hub:ORG/REPO[@REVISION]``: any hub repository holding an OpenCLIP model
  (``open_clip_config.json`` + weights: a CLIP, or a SigLIP with its timm image tower) or a
  transformers ``CLIPModel`` or ``SiglipModel`` (``config.json`` with its ``model_type`` +
  weights), read through the Hugging Face cache (:mod:`clipcli.hub`);
- a folder holding either layout;
- a checkpoint file (OpenAI TorchScript, a state dict or safetensors, in OpenAI's, OpenCLIP's or
  transformers' key names). Its architecture comes from ``arch=``, else the config clipcli
  stores in the safetensors files it writes, else an ``open_clip_config.json`` or transformers
  ``config.json`` beside it, else OpenAI's choices (with a note when those are doubtful);
- one of OpenAI's nine names (``ViT-B/32``, also ``ViT-B-32/openai``): the same weights already
  in the Hugging Face cache (``timm/*.openai``, as open_clip downloads them), else clipcli's
  cache, downloading as before;
- a registry name ``ARCH/TAG`` (``ViT-B-32/laion2b_s34b_b79k``, see ``clipcli models``), from
  its hub repository.

A :class:`ModelSource` knows where the weights are, their key schema, the config fields their
shapes cannot show and, for a model with its own tokenizer (SigLIP's SentencePiece), where its
tokenizer files are: beside the weights, else in hub repositories (the model's own, then the one
its OpenCLIP config names in ``text_cfg.hf_tokenizer_name`` or its registry entry names in
``tokenizer_repo``). Resolving never downloads a tokenizer: it takes a repository's files from the
Hugging Face cache when they are there and otherwise only records the repository, whose files
are fetched when the first text is tokenized (image-only work fetches nothing). :func:`load`
reads only the towers asked for, builds the model and gives it its tokenizer (``model.tokenizer``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from . import hub
from .errors import CheckpointError, ClipcliError, UnknownModelError
from .feedback import SILENT, Feedback
from .models import convert, registry
from .models.config import METADATA_KEY, TOWERS, config_from_json
from .tokenizer_files import Repo, fetch_tokenizer_files, find_tokenizer, named_tokenizer_repo, tokenizer_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models.clip import DualEncoder

OPEN_CLIP_CONFIG = "open_clip_config.json"
TRANSFORMERS_CONFIG, TRANSFORMERS_PREPROCESSOR = "config.json", "preprocessor_config.json"
TRANSFORMERS_PROCESSOR = "processor_config.json"  # transformers 5: the image processor's settings nested
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")


class AssumedArchitectureWarning(UserWarning):
    """A checkpoint without a config whose widths are not OpenAI's: the head width and
    activation were assumed."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are and what the shapes cannot say about them."""

    name: str  # as the user gave it
    files: tuple[Path, ...]  # the weights: one file, or the shards of a sharded checkpoint
    hints: Mapping[str, Any] = field(default_factory=dict)  # CLIPConfig fields; empty: OpenAI's choices
    described: bool = False  # whether a config (registry, file, metadata) described the model
    # The model's own tokenizer files by name (clipcli.text.tokenizers.TOKENIZER_FILES); empty for
    # a model with the bundled BPE, when none were found (its tokenizer says so when used), or
    # when they are still to be fetched from tokenizer_repos.
    tokenizer_files: Mapping[str, Path] = field(default_factory=dict)
    # The hub repositories its tokenizer comes from, in order, when it is not beside the weights:
    # tokenizer_files are their cached copies, else they are fetched for the first text.
    tokenizer_repos: tuple[Repo, ...] = ()
    bars: bool = field(default=False, compare=False, repr=False)  # whether that fetch draws progress bars

    @property
    def path(self) -> Path:
        return self.files[0]


# --------------------------------------------------------------------------- configs


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: cannot read the {what} ({' '.join(str(error).split())[:200]})") from None


def _transformers_hints(config_path: Path, get: Callable[[str], Path | None], source: str) -> dict | None:
    """Config fields from a transformers ``config.json`` and its image processor's settings
    (``preprocessor_config.json``, or the ``image_processor`` entry of the ``processor_config.json``
    that transformers 5 writes instead), each found with ``get``; None when the file is not one
    (a training run's config.json)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict) or "model_type" not in config:
        return None
    preprocessor_config = None
    preprocessor_path = get(TRANSFORMERS_PREPROCESSOR)
    if preprocessor_path is not None:
        preprocessor_config = _read_json(preprocessor_path, "preprocessor config")
    elif (processor_path := get(TRANSFORMERS_PROCESSOR)) is not None:
        processor = _read_json(processor_path, "processor config")
        preprocessor_config = processor.get("image_processor") if isinstance(processor, dict) else processor
        if preprocessor_config is None:  # a processor config without image settings: the defaults
            preprocessor_config = {}
    return convert.config_from_transformers(config, source, preprocessor_config)


def _stored_config(path: Path) -> dict | None:
    """The config clipcli wrote into a safetensors file's metadata, if any."""
    from dataclasses import asdict

    from .models.config import safetensors_metadata

    text = safetensors_metadata(path).get(METADATA_KEY)
    return asdict(config_from_json(text)) if text else None


def _with_tokenizer(source: ModelSource, beside: Callable[[str], Path | None] | None,
                   repos: Sequence[Repo | None] = (), bars: bool = False) -> ModelSource:
    """``source`` with where its tokenizer comes from (:func:`~clipcli.tokenizer_files.find_tokenizer`):
    only for a model whose config names its own (a CLIP's BPE is bundled: nothing is looked for)."""
    if source.hints.get("tokenizer", "clip") == "clip":
        return source
    files, repos = find_tokenizer(beside, repos)
    return replace(source, tokenizer_files=files, tokenizer_repos=repos, bars=bars)


# --------------------------------------------------------------------------- resolving


def _layout_source(name: str, get: Callable[[str], Path | None],
                   first: Callable[[Sequence[str]], Path | None], repo: Repo | None = None,
                   bars: bool = False) -> ModelSource | None:
    """An OpenCLIP or transformers model from a place holding files (a folder, the HF cache,
    the hub ``repo``): ``get`` one file or None, ``first`` of several or None. Configs are read
    (and families refused) before any weights are looked for. None when neither layout is whole.
    A hub repository's own tokenizer files are found as any repository's (cached, else fetched
    for the first text), never downloaded here."""
    beside = get if repo is None else None
    open_clip_config = get(OPEN_CLIP_CONFIG)
    if open_clip_config is not None:
        data = _read_json(open_clip_config, "OpenCLIP config")
        hints = convert.config_from_open_clip(data, name)
        weights = first(registry.OPEN_CLIP_FILES)
        if weights is not None:
            return _with_tokenizer(ModelSource(name, (weights,), hints, described=True), beside,
                                   (repo, named_tokenizer_repo(data)), bars)
    config = get(TRANSFORMERS_CONFIG)
    hints = _transformers_hints(config, get, name) if config is not None else None
    if hints is not None:
        weights = first(TRANSFORMERS_WEIGHTS)
        if weights is not None:
            files = _shards(weights, get) if weights.name.endswith(".index.json") else (weights,)
            return _with_tokenizer(ModelSource(name, files, hints, described=True), beside, (repo,), bars)
    return None


_SHARD_NAME = re.compile(r"[^/\\\x00]+")  # one path component


def _shards(index: Path, get: Callable[[str], Path | None]) -> tuple[Path, ...]:
    """The shard files a ``*.index.json`` names, each found with ``get``."""
    data = _read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: its weight_map must map tensor names to shard file names")
    names = sorted(set(weight_map.values()))
    if not names:
        raise CheckpointError(f"{index} names no shard files")
    outside = [shard for shard in names if not _SHARD_NAME.fullmatch(shard) or shard.strip(".") == ""]
    if outside:  # a shard is a file beside the index: never ../x or /tmp/x
        raise CheckpointError(f"{index} names shards that are not plain file names beside it: "
                              f"{', '.join(map(repr, outside[:3]))}")
    shards = tuple(get(shard) for shard in names)
    missing = [shard for shard, path in zip(names, shards) if path is None]
    if missing:
        raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
    return shards


def _in_folder(folder: Path) -> Callable[[str], Path | None]:
    return lambda filename: (folder / filename) if (folder / filename).is_file() else None


def _first_of(get: Callable[[str], Path | None]) -> Callable[[Sequence[str]], Path | None]:
    return lambda candidates: next(filter(None, map(get, candidates)), None)


def _folder_source(folder: Path, name: str, bars: bool = False) -> ModelSource:
    """An OpenCLIP or transformers model saved in ``folder`` (as the hub holds them)."""
    get = _in_folder(folder)
    source = _layout_source(name, get, _first_of(get), bars=bars)
    if source is None:
        raise CheckpointError(
            f"{folder} holds no model clipcli can read: it needs {OPEN_CLIP_CONFIG} with one of "
            f"{', '.join(registry.OPEN_CLIP_FILES)} (OpenCLIP), or a transformers {TRANSFORMERS_CONFIG} with "
            f"{' or '.join(TRANSFORMERS_WEIGHTS[::2])}"
        )
    return source


def _hub_source(name: str, repo: str, revision: str | None, bars: bool) -> ModelSource:
    """A hub repository in either layout: whole in the HF cache (no network), else from the hub.
    The files the cache lacks are what an offline or unreachable hub's error names (for a
    transformers repository, both configs: not just the OpenCLIP one asked for first)."""
    missing: list[str] = []

    def cached(filename: str) -> Path | None:
        path = hub.cached_file(repo, filename, revision)
        if path is None:
            missing.append(filename)
        return path

    source = _layout_source(name, cached, _first_of(cached), (repo, revision), bars)
    if source is not None:
        return source
    if hub.offline():
        raise hub.not_cached(repo, missing or (OPEN_CLIP_CONFIG, TRANSFORMERS_CONFIG), None, name=name)
    with hub.looking_for(name, repo, missing):
        source = _layout_source(name, lambda f: hub.optional_file(repo, f, revision, bars=bars),
                                lambda files: hub.first_file(repo, files, revision, bars=bars), (repo, revision), bars)
    if source is None:
        raise CheckpointError(
            f"{name}: neither the hub nor the Hugging Face cache ({hub.cache_dir()}) holds an OpenCLIP "
            f"({OPEN_CLIP_CONFIG} + weights) or transformers ({TRANSFORMERS_CONFIG} + weights) model in this repository"
        )
    return source


def _file_source(path: Path, name: str, arch: str | None, bars: bool = False) -> ModelSource:
    """A checkpoint file; its config from ``arch``, its own metadata, or a config beside it, and
    its tokenizer files (for a model with its own) from beside it, else where that config says."""
    beside = _in_folder(path.parent)
    files = _shards(path, beside) if path.name.endswith(".index.json") else (path,)
    if arch is not None:
        tokenizer_repo = registry.tokenizer_repo(arch)
        return _with_tokenizer(ModelSource(name, files, _arch_hints(arch), described=True), beside,
                               ((tokenizer_repo, None) if tokenizer_repo else None,), bars)
    stored = _stored_config(files[0])
    if stored is not None:
        return _with_tokenizer(ModelSource(name, files, stored, described=True), beside)
    open_clip_config = beside(OPEN_CLIP_CONFIG)
    if open_clip_config is not None:
        data = _read_json(open_clip_config, "OpenCLIP config")
        return _with_tokenizer(ModelSource(name, files, convert.config_from_open_clip(data, name), described=True),
                               beside, (named_tokenizer_repo(data),), bars)
    hints = _transformers_hints(path.parent / TRANSFORMERS_CONFIG, beside, name)
    if hints is None:
        return ModelSource(name, files)
    return _with_tokenizer(ModelSource(name, files, hints, described=True), beside)


def _arch_hints(arch: str) -> dict:
    hints = registry.architecture_hints(arch)
    if hints is None:
        raise UnknownModelError(f"architecture {arch!r} is not a registry name or architecture (see `clipcli models`)")
    return hints


def resolve(name: str | os.PathLike, *, arch: str | None = None, cache_dir: str | os.PathLike | None = None,
            feedback: Feedback = SILENT) -> ModelSource:
    """Find (downloading if needed) the model called ``name``; see the module docstring.
    Downloads report to ``feedback`` (hub downloads draw huggingface_hub's own bars when it
    shows progress)."""
    text = os.fspath(name)
    bars = feedback.shows_progress
    path = Path(text).expanduser()
    if arch is not None and not path.is_file():
        raise ClipcliError(f"an architecture ({arch}) can be given for a checkpoint file only, which {text} "
                           "is not (names, folders and hub repositories say their own)")
    parsed = hub.parse_name(text)
    if parsed is not None:
        return _hub_source(text, *parsed, bars=bars)
    if path.is_file():
        return _file_source(path, text, arch, bars)
    info = registry.find_model(text)
    pretrained = registry.find_pretrained(text) if info is None else None
    if path.is_dir() and not (info or pretrained):  # a model name beats a folder of that name
        return _folder_source(path, text, bars)
    if info is not None:  # the same weights in the HF cache (open_clip's download), else clipcli's cache
        from .download import model_file

        cached = hub.first_cached(info.hf_repo, registry.OPEN_CLIP_FILES)
        path = cached or model_file(info.name, cache_dir=cache_dir, feedback=feedback)
        return ModelSource(text, (path,), registry.openai_hints(info), described=True)
    if pretrained is not None:
        with hub.looking_for(text, pretrained.hf_repo, pretrained.files):
            weights = hub.first_file(pretrained.hf_repo, pretrained.files, bars=bars)
        if weights is None:
            raise CheckpointError(f"{text}: hub repository {pretrained.hf_repo} has none of "
                                  f"{', '.join(pretrained.files)}")
        source = ModelSource(text, (weights,), pretrained.hints, described=True)
        tokenizer_repo = pretrained.tokenizer_repo  # None: its own repository's files
        return _with_tokenizer(source, None,
                               ((pretrained.hf_repo, None), (tokenizer_repo, None) if tokenizer_repo else None), bars)
    alias = registry.find_hub_alias(text)  # google/siglip-base-patch16-224 names its hub repository
    if alias is not None:
        return _hub_source(text, *hub.parse_name(alias), bars=bars)
    raise UnknownModelError(
        f"{text!r} is not a model name (`clipcli models` lists them: OpenAI's as ViT-B/32, others as "
        "ARCH/TAG), an hf-hub:ORG/REPO name, a model folder or an existing checkpoint file"
    )


# --------------------------------------------------------------------------- reading


def read_weights(source: ModelSource, dtype: torch.dtype | None = None,
                 towers: Sequence[str] = TOWERS) -> dict[str, torch.Tensor]:
    """The state dict of ``source`` with OpenAI's key names; keys of towers not asked for are
    ``meta`` tensors (never read)."""
    from .checkpoint import read_checkpoint
    from .models.factory import needed_keys

    keep = None if tuple(towers) == TOWERS else (lambda key: convert.tower_of_key(key) in (*towers, None))
    state = read_checkpoint(source.files, dtype=dtype, keep=keep,  # all shards' shapes first
                            needed=needed_keys)
    if convert.is_transformers_state_dict(state):
        state = convert.state_dict_from_transformers(state)
    return state


def _checked_towers(towers: Sequence[str]) -> tuple[str, ...]:
    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ClipcliError(f"towers must be some of {TOWERS}, not {tuple(towers)}")
    return tuple(t for t in TOWERS if t in towers)


def load(source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype | None | str = "float32",
         towers: Sequence[str] = TOWERS) -> tuple[DualEncoder, str | None]:
    """``(model in eval mode, note)``: only ``towers`` are read (``dtype`` None: as stored;
    a name such as ``"float32"`` is torch's dtype of that name); ``note`` says what was
    assumed about an undescribed checkpoint (None when nothing was). ``model.tokenizer`` is
    the tokenizer that fits it (:func:`clipcli.text.tokenizers.tokenizer_for`: the bundled BPE
    for a CLIP, the model's own files for a SigLIP, read when first used), or None when those
    files were not found: the model still embeds images, and tokenizing for it says what is missing.
    A tokenizer from a hub repository not in the cache is downloaded for the first text."""
    import torch

    from .models.factory import assumption_note, build_model, config_from_state_dict

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    towers = _checked_towers(towers)
    state = read_weights(source, dtype, towers)
    note = None
    if not source.described:
        try:
            note = assumption_note(config_from_state_dict(state), str(source.path))
        except (KeyError, IndexError, ValueError, TypeError):
            note = None  # build_model names what is wrong
    model = build_model(state, source.hints, source=source.name, towers=towers)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    from .text.tokenizers import tokenizer_for

    repos = source.tokenizer_repos
    fetch = (lambda: fetch_tokenizer_files(source.name, repos, source.bars)) if repos else None
    origin = f"the tokenizer of hub repository {source.tokenizer_repos[0][0]}" if source.tokenizer_repos else ""
    try:
        model.tokenizer = tokenizer_for(model.config, source.tokenizer_files, fetch=fetch, origin=origin)
    except CheckpointError:  # its files were not found: images need none; text raises when tokenized
        model.tokenizer = None
    return model.eval(), note


def load_model(name: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | str = "float32",
               towers: Sequence[str] = TOWERS, *, arch: str | None = None,
               cache_dir: str | os.PathLike | None = None, feedback: Feedback = SILENT) -> DualEncoder:
    """:func:`resolve` then :func:`load`; a note becomes an :class:`AssumedArchitectureWarning`."""
    model, note = load(resolve(name, arch=arch, cache_dir=cache_dir, feedback=feedback), device, dtype, towers)
    if note:
        warnings.warn(note, AssumedArchitectureWarning, stacklevel=2)
    return model


# --------------------------------------------------------------------------- identity before loading


def weights_sha256(source: ModelSource) -> str:
    """sha256 of a model's weights (of the shard hashes, for a sharded checkpoint), without
    loading them: from the HF cache's blob names, or remembered by path, size and mtime."""
    from .cache import remembered_sha256
    from .hub import blob_sha256

    hashes = [blob_sha256(file) or remembered_sha256(file) for file in source.files]
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()


def source_key(source: ModelSource) -> str:
    """What decides a model's identity before it is loaded: its weights, the hints that the
    shapes cannot give and, for a model with its own tokenizer, where that comes from: the hub
    repositories (and revisions) it is taken from, cached or not, or else its files' contents.
    The key is the same whether or not the hub could be reached (the search index finds its
    vectors by it without loading)."""
    hints = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in dict(source.hints).items()},
                       sort_keys=True, default=str)
    key = f"{weights_sha256(source)}\0{hints}"
    tokenizer = tokenizer_fingerprint(source.tokenizer_files, source.tokenizer_repos)
    if tokenizer is not None:  # none for a CLIP: its identity stays what it was
        key += "\0" + tokenizer
    return hashlib.sha256(key.encode()).hexdigest()
