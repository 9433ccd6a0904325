"""Runs as library functions: what ``clipcli encode``, ``index`` and ``convert`` do, callable from Python.

:func:`encode` embeds images or texts with a loaded model and writes one of the output
layouts (``.npy`` + ``.jsonl`` manifest, ``.npz``, ``.jsonl``/``.json``/``.csv``), or hands
each record to a callback (the CLI's stdout). With ``.npy``/``.npz`` it journals its progress
batch by batch so that ``resume=True`` finishes an interrupted run (:mod:`clipcli.journal`),
and it holds the output's lock for the whole run so two runs never mix their rows. It
reports through callbacks (``on_result`` per input, ``on_record`` per record) and never prints.
:func:`update_index` brings a search index up to date; :func:`download_models` gets models
into the caches; :func:`convert_checkpoint` writes any model clipcli reads as one safetensors file
(or its towers as ONNX graphs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import InputError, OutputError, OutputExistsError
from .feedback import SILENT, Feedback
from .http import FetchOptions
from .images import DecodeOptions
from .items import Item

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .pipeline import LoadedModel

TARGETS = ("npy", "npz", "jsonl", "json", "csv")


@dataclass(frozen=True)
class RunOptions:
    """How a run feeds the model: batch size, decode workers, decoding and URL fetching."""

    batch_size: int | None = None  # None: clipcli.batching.default_batch_size (32; 256 on a GPU)
    workers: int | None = None  # None: clipcli.batching.default_workers (4 threads; one per core on a GPU)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    video_interval: float | None = None  # seconds between a video's frames; None: an index keeps each video's, else 5

    def for_device(self, device: "torch.device") -> "RunOptions":
        """These options with the device's defaults in place of None."""
        from .batching import sizes_for

        batch_size, workers = sizes_for(device, self.batch_size, self.workers)
        return replace(self, batch_size=batch_size, workers=workers)

    def pipeline_kwargs(self) -> dict:
        """The keyword arguments of :func:`clipcli.batching.embed_images`."""
        return dict(batch_size=self.batch_size, workers=self.workers, decode=self.decode, fetch=self.fetch)


def encode_target(output: str | os.PathLike | None) -> tuple[str, list[str]]:
    """What an output name asks for: ``stdout`` (None or ``-``), ``npy``, ``npz``, ``jsonl``,
    ``json`` or ``csv``, and the files it writes (``.npy`` has a ``.jsonl`` manifest beside it)."""
    if output is None or os.fspath(output) == "-":
        return "stdout", []
    output = os.fspath(output)
    suffix = os.path.splitext(output)[1].lower().lstrip(".")
    if suffix == "npy":
        return "npy", [output, os.path.splitext(output)[0] + ".jsonl"]
    if suffix in TARGETS:
        return suffix, [output]
    raise InputError(f"-o {output}: use a .npy, .npz, .jsonl, .json or .csv file name, or - for stdout")


def csv_view(record: dict) -> dict:
    """A record as a CSV row: the embedding spread over columns ``e0``, ``e1``, ..."""
    key = "image" if "image" in record else "text"
    row = {key: record[key], "status": record["status"], "error": record.get("error")}
    for i, value in enumerate(record.get("embedding") or []):
        row[f"e{i}"] = value
    return row


@dataclass
class EncodeResult:
    """What :func:`encode` did: its records in input order (an ``index`` into the matrix for
    ``.npy``/``.npz``), the files written, and how many inputs failed."""

    records: list[dict]
    outputs: list[str]
    failed: int
    resumed: int = 0  # inputs that came from the journal of an interrupted run


def check_outputs(output: str | os.PathLike | None, resume: bool, overwrite: bool) -> list[str]:
    """The files ``output`` writes, refused before any work when they cannot be: a finished run's
    outputs with ``resume`` (its files exist and no journal is left: nothing to resume), existing
    files without ``overwrite``, folders that are missing or not writable."""
    from .fsutil import ensure_writable
    from .journal import journal_path

    target, outputs = encode_target(output)
    if resume and target not in ("npy", "npz"):
        raise InputError("resuming needs an .npy or .npz output")
    if resume and not overwrite and all(os.path.isfile(path) for path in outputs) \
            and not os.path.exists(journal_path(output)):
        raise OutputExistsError(f"{outputs[0]} is already complete: no interrupted run to resume", fix="overwrite")
    ensure_writable(outputs, overwrite)
    return outputs


def encode(
    loaded: "LoadedModel",
    *,
    items: Sequence[Item] | None = None,
    texts: Sequence[str] | None = None,
    output: str | os.PathLike | None = None,
    normalize: bool = True,
    store: str = "float32",
    truncate: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    run: RunOptions = RunOptions(),
    on_result: Callable[[str, str | None], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
    locked: bool = False,
) -> EncodeResult:
    """Embed ``items`` (images) or ``texts`` and write ``output`` (see the module docstring).

    Without an output file, each record (with its ``embedding`` as a list) goes to
    ``on_record`` as soon as it is done. ``store`` is the stored number type (``float32`` or
    ``float16``). ``locked``: the caller already holds the output's lock (the CLI takes it
    before loading the model).
    """
    from .fsutil import exclusive_lock

    if (items is None) == (texts is None):
        raise InputError("encode needs either images or texts")
    target, outputs = encode_target(output)
    check_outputs(output, resume, overwrite)
    loaded.disable_packing()
    lock = exclusive_lock(output) if target != "stdout" and not locked else contextlib.nullcontext()
    with lock:
        return _encode(loaded, items, texts, target, output, outputs, normalize, store, truncate, resume, overwrite,
                       run, on_result or (lambda name, error: None), on_record)


def _identity(loaded: "LoadedModel", key: str, names: Sequence[str], normalize: bool, store: str, truncate: bool,
              run: RunOptions) -> dict:
    """Every option that can change a row (decoding ones only where images are decoded)."""
    from .journal import inputs_hash

    identity = {"sha256": loaded.sha256, "model": loaded.identity, "inputs": inputs_hash(names), "count": len(names),
                "key": key, "normalize": normalize, "dtype": store, "dim": loaded.embed_dim, "truncate": truncate,
                "precision": str(loaded.dtype).removeprefix("torch.")}
    if key == "image":
        identity.update(exact_decode=run.decode.exact, max_pixels=run.decode.max_pixels,
                        allow_truncated=run.decode.allow_truncated, allow_private=run.fetch.allow_private)
    return identity


def _encode(loaded, items, texts, target, output, outputs, normalize, store, truncate, resume, overwrite, run,
            on_result, on_record) -> EncodeResult:
    import numpy as np

    from .batching import embed_images, embed_texts
    from .journal import Journal, journal_path

    run = run.for_device(loaded.device)
    key = "text" if texts is not None else "image"
    names = list(texts) if texts is not None else [item.name for item in items]
    journal = None
    if target in ("npy", "npz"):
        identity = _identity(loaded, key, names, normalize, store, truncate, run)
        journal = Journal.open(journal_path(output), identity, resume=resume, overwrite=overwrite)
    records: list[dict] = list(journal.records) if journal is not None else []
    for record in records:
        on_result(record[key], record.get("error"))
    done = len(records)
    if texts is not None:
        results = embed_texts(loaded, texts[done:], batch_size=run.batch_size, normalize=normalize, truncate=truncate)
    else:
        results = embed_images(loaded, items[done:], normalize=normalize, **run.pipeline_kwargs())
    pending_records: list[dict] = []
    pending_rows: list = []
    failed = sum(1 for record in records if record["status"] != "ok")
    for result in results:
        on_result(result.name, result.error)
        failed += not result.ok
        record = {key: result.name, "status": "ok" if result.ok else "error"}
        if key == "text" and result.truncated:
            record["truncated"] = True
        if result.ok:
            row = result.embedding.astype(store)
            if journal is not None:
                record = {"index": journal.rows + len(pending_rows), **record}
                pending_rows.append(row)
            else:
                record["embedding"] = row.astype(np.float64).tolist()
        else:
            if journal is not None:
                record = {"index": None, **record}
            record["error"] = result.error
        if target == "stdout":
            if on_record is not None:
                on_record(record)
        elif journal is not None:
            pending_records.append(record)
            if len(pending_rows) >= run.batch_size:  # a model batch is done: make it durable
                journal.append(pending_records, pending_rows)
                pending_records, pending_rows = [], []
        else:
            records.append(record)
    if journal is not None:
        journal.append(pending_records, pending_rows)
        records = journal.records
    if target != "stdout":
        matrix = journal.matrix() if journal is not None else None  # only .npy/.npz have a matrix
        _write_outputs(target, output, outputs, matrix, records, key, loaded, overwrite, normalize)
        if journal is not None:
            journal.remove()
    return EncodeResult(records if target != "stdout" else [], outputs, failed, resumed=done)


def _write_outputs(target, output, outputs, matrix, records, key, loaded, overwrite, normalized) -> None:
    import numpy as np

    from .fsutil import atomic_write
    from .output import RecordWriter

    if target == "npy":
        with atomic_write(outputs[1], overwrite=overwrite, text=True) as f, RecordWriter(f, "jsonl") as writer:
            for record in records:
                writer.write(record)
        with atomic_write(output, overwrite=overwrite) as f:
            np.save(f, matrix, allow_pickle=False)
    elif target == "npz":
        names = [r[key] for r in records if r["status"] == "ok"]
        with atomic_write(output, overwrite=overwrite) as f:
            np.savez(f, embeddings=matrix, **{"paths" if key == "image" else "texts": np.array(names, dtype=str)},
                     model=np.array(loaded.name), sha256=np.array(loaded.sha256),
                     identity=np.array(loaded.identity), normalized=np.array(normalized))
    else:
        view = csv_view if target == "csv" else None
        with atomic_write(output, overwrite=overwrite, text=True) as f, RecordWriter(f, target, view=view) as writer:
            for record in records:
                writer.write(record)


# --------------------------------------------------------------------------- index

def update_index(index, inputs: Sequence[str], model: str, load: Callable[[], "LoadedModel"], *,
                 arch: str | None = None, cache_dir: str | os.PathLike | None = None, run: RunOptions = RunOptions(),
                 on_result: Callable[[str, str | None], None] | None = None, feedback: Feedback = SILENT,
                 raw_pairs: bool = True):
    """Bring ``index`` (:class:`clipcli.index.Index`) up to date for ``inputs`` with ``model``.

    The model is found in the index by its weights and hints, without loading it; ``load()``
    (which must load ``model``) runs only if some image must be embedded; ``raw_pairs`` leaves
    out a camera RAW file beside a JPEG (or HEIC, ...) of the same name. Returns the
    :class:`~clipcli.indexing.Summary`.
    """
    from .batching import embed_images
    from .indexing import update
    from .loading import resolve, source_key

    key = source_key(resolve(model, arch=arch, cache_dir=cache_dir, feedback=feedback))

    def embed(loaded, items):
        return embed_images(loaded, items, normalize=True, **run.for_device(loaded.device).pipeline_kwargs())

    return update(index, inputs, key, load, embed=embed, batch_size=run.batch_size, on_result=on_result,
                  raw_pairs=raw_pairs, video_interval=run.video_interval)


@dataclass(frozen=True)
class Converted:
    """What :func:`convert_checkpoint` wrote: the file, its tensor count, float types and size
    (of every file written: an ONNX export writes several)."""

    path: Path
    tensors: int
    dtypes: list[str]
    size: int
    note: str | None  # what loading assumed about a checkpoint that did not say
    tokenizer_files: list[str] = field(default_factory=list)  # the model's own tokenizer, copied beside it
    files: list[Path] = field(default_factory=list)  # what was written (not the tokenizer): [path], or the ONNX files


CONVERT_DTYPES = ("float16", "bfloat16", "float32")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                       arch: str | None = None, cache_dir: str | os.PathLike | None = None, overwrite: bool = False,
                       feedback: Feedback = SILENT) -> Converted:
    """Any model clipcli reads (name, hub repo, folder or file) as one safetensors file at
    ``dst``: OpenAI's key names, the full config in its metadata, floats as ``dtype`` (None:
    as stored), written atomically. The result loads with :func:`clipcli.load` and gives the
    same outputs. A ``dst`` ending in ``.onnx`` exports the two towers as float32 ONNX graphs
    and a JSON sidecar instead (:mod:`clipcli.models.onnx_export`; ``NAME.onnx`` ->
    ``NAME.visual.onnx``, ``NAME.text.onnx``, ``NAME.json``), which needs the ``onnx`` package."""
    from . import __version__
    from .checkpoint import write_safetensors
    from .fsutil import atomic_path, ensure_writable
    from .loading import load, resolve
    from .models.config import METADATA_KEY, config_to_json

    dst = Path(dst).expanduser()
    onnx = dst.suffix == ".onnx"
    if dst.suffix != ".safetensors" and not onnx:
        raise InputError(f"{dst} must end in .safetensors or .onnx", option="dst")
    if dtype is not None and dtype not in CONVERT_DTYPES:
        raise InputError(f"{dtype!r}: choose {', '.join(CONVERT_DTYPES)}", option="dtype")
    if onnx:  # refused before the model is loaded
        from .models.onnx_export import OnnxFiles, require_onnx

        if dtype not in (None, "float32"):
            raise InputError(f"{dtype!r}: an ONNX export is float32 only", option="dtype")
        require_onnx()
        files = OnnxFiles.of(dst)
        outputs = [*files.graphs.values(), files.sidecar]
    else:
        outputs = [dst]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder of {dst}: {error.strerror or error}") from None
    ensure_writable(outputs, overwrite)
    import torch

    model, note = load(resolve(src, arch=arch, cache_dir=cache_dir, feedback=feedback), "cpu",
                       torch.float32 if onnx else getattr(torch, dtype) if dtype else None)
    tokenizer, stale, note = _tokenizer_copies(model, dst.parent, note)
    ensure_writable([*tokenizer, *stale, *(files.data_files(model) if onnx else [])], overwrite)
    metadata = {"converted_by": f"clipcli {__version__}", "source": os.fspath(src)}
    if onnx:
        from .models.onnx_export import export_onnx
        from .text.tokenizers import TOKENIZER_FILES

        # The model's own tokenizer as it will lie beside the graphs: the copies, and its files already there.
        own = model.config.tokenizer != "clip"
        beside = {dst.parent / name for name in TOKENIZER_FILES} - set(stale) if own else set()
        tokenizer_files = sorted({path.name for path in tokenizer} | {path.name for path in beside if path.exists()})
        written = export_onnx(model, dst, overwrite=overwrite, tokenizer_files=tokenizer_files, metadata=metadata)
        tensors = model.state_dict()
    else:
        tensors = write_safetensors(model.state_dict(), dst, {
            "format": "pt", **metadata, METADATA_KEY: config_to_json(model.config)})
        written = [dst]
    for target, path in tokenizer.items():
        with atomic_path(target, overwrite) as temp:
            shutil.copyfile(path, temp)
    for path in stale:  # another model's tokenizer would be taken for this one's
        path.unlink()
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    return Converted(dst, len(tensors), dtypes, sum(path.stat().st_size for path in written), note,
                     sorted(target.name for target in tokenizer), written)


def _tokenizer_copies(model, folder: Path, note: str | None) -> tuple[dict[Path, Path], list[Path], str | None]:
    """A model with its own tokenizer (SigLIP, MetaCLIP 2) needs its files beside the weights,
    where loading looks for them (a hub tokenizer is fetched here): ``(target -> file to copy,
    other tokenizer files already in ``folder`` (to replace), note)``. A tokenizer that cannot
    be had is said in the note; the weights are converted all the same."""
    from .errors import ClipcliError
    from .text.tokenizers import TOKENIZER_FILES

    if getattr(model.config, "tokenizer", "clip") == "clip":
        return {}, [], note
    try:
        files, reason = dict(getattr(model.tokenizer, "files", None) or {}), "none was found with the model"
    except ClipcliError as error:
        files, reason = {}, str(error)
    if not files:
        why = f"its tokenizer was not copied beside it ({reason}); put its tokenizer files there to embed text"
        note = f"{note}; {why}" if note else why
    copies = {folder / name: Path(path) for name, path in files.items()
              if not (folder / name).exists() or not (folder / name).samefile(path)}
    stale = [folder / name for name in TOKENIZER_FILES if name not in files and (folder / name).exists()]
    return copies, stale, note


def download_models(names: Sequence[str], *, cache_dir: str | os.PathLike | None = None, force: bool = False,
                    verify: bool = False, feedback: Feedback = SILENT):
    """Each model name into its cache: ``(name, files)`` or ``(name, error)`` per name, in order.

    A released name goes to clipcli's cache (verified against the registry; ``verify``
    re-hashes a cached file, ``force`` downloads again); an OpenCLIP ``ARCH/TAG`` or
    ``hf-hub:ORG/REPO`` goes to the Hugging Face cache (its files re-hashed with ``verify``).
    One name failing does not stop the others."""
    from . import cache, hub
    from .download import fetch_model, unknown_model
    from .errors import ClipcliError
    from .loading import resolve
    from .models import registry
    from .tokenizer_files import fetch_tokenizer_files

    checked = " (sha256 verified)" if verify else ""
    for name in names:
        try:
            info = registry.find_model(name)
            if info is None:
                if registry.find_pretrained(name) is None and hub.parse_name(name) is None \
                        and registry.find_hub_alias(name) is None:
                    raise unknown_model(name)
                source = resolve(name, feedback=feedback)
                tokenizer = dict(source.tokenizer_files)
                if source.tokenizer_repos:  # a model's own tokenizer on the hub: fetched now, for offline runs
                    tokenizer = fetch_tokenizer_files(name, source.tokenizer_repos, feedback.shows_progress)
                files = (*source.files, *tokenizer.values())
                for path in files:
                    if verify:
                        hub.verify(path)
                    feedback.log(f"{name}: {path}{checked}")
                yield name, tuple(files)
                continue
            cached = None if force else cache.cached_model_file(info, cache_dir, verify=verify, feedback=feedback)
            if cached:
                feedback.log(f"{info.name}: cached at {cached}{checked}")
            yield name, (cached or fetch_model(info, cache_dir, force=force, feedback=feedback),)
        except ClipcliError as error:
            yield name, error
