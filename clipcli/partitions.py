"""Encoding in share-nothing partitions, in clip-retrieval's output layout.

The inputs are split, in order, into partitions of ``partition_size`` items. Process
``rank`` of ``world`` takes the partitions ``i`` with ``i % world == rank``; no process
talks to another, so torchrun, SLURM, a shell loop, Ray or Spark can all start them
(:func:`share`). Each partition is written as

    OUTDIR/img_emb/img_emb_{i}.npy         float32 (N, D), one row per input (zeros where it failed)
    OUTDIR/metadata/metadata_{i}.parquet   one row per input: image_path, status, error

with zero-padded numbers, under temporary names renamed when complete (the metadata
last: a partition is done when its metadata file exists). ``OUTDIR/_manifest.json`` names
the model identity, the options and the inputs; a rerun with any world size skips finished
partitions and refuses a manifest of another model, input list or option. The process
that finds every partition done writes ``_summary.json`` (counts per status).
Rows align by position, as embedding-reader and autofaiss read them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import InputError, OutputError, OutputExistsError
from .text import display

if TYPE_CHECKING:  # pragma: no cover
    from .items import Item
    from .pipeline import LoadedModel
    from .tasks import RunOptions

PARTITION_SIZE = 10_000
MANIFEST, SUMMARY = "_manifest.json", "_summary.json"


@dataclass(frozen=True)
class Share:
    """Which partitions this process takes: ``i % world == rank``."""

    rank: int = 0
    world: int = 1

    def takes(self, partition: int) -> bool:
        return partition % self.world == self.rank

    def count(self, items: int, partition_size: int) -> int:
        """How many of ``items`` fall in this share's partitions."""
        return sum(min(partition_size, items - start) for start in range(0, items, partition_size)
                   if self.takes(start // partition_size))


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def share(rank: int | None = None, world: int | None = None) -> Share:
    """This process's share: ``rank``/``world`` as given, else torchrun's ``RANK``/``WORLD_SIZE``,
    else SLURM's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS`` (set inside an ``srun`` step; the
    batch script itself is one process), else 0 of 1."""
    if (rank is None) != (world is None):
        raise InputError("give both rank and world, or neither")
    if rank is None:
        world = _env_int("WORLD_SIZE", "SLURM_STEP_NUM_TASKS") or 1  # inside `srun`, not the batch shell
        rank = _env_int("RANK", "SLURM_PROCID") or 0
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank {rank} of world {world}: rank must be in 0..world-1")
    return Share(rank, world)


def is_folder_output(output: str | os.PathLike | None) -> bool:
    """Whether ``output`` asks for partitions: a name ending in ``/``, or an existing folder
    whose name is not that of an output file (``-o emb.npy`` that is a folder is an error)."""
    if output is None:
        return False
    name = os.fspath(output)
    suffix = os.path.splitext(name.rstrip("/"))[1].lower()
    return name.endswith("/") or (os.path.isdir(name) and suffix not in (".npy", ".npz", ".jsonl", ".json", ".csv"))


def _names(count: int) -> list[str]:
    width = len(str(max(count - 1, 0)))
    return [f"{i:0{width}d}" for i in range(count)]


def require_pyarrow() -> None:
    """Refuse early (before a model is loaded) when parquet cannot be written."""
    _pyarrow()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError("partitioned output writes parquet, which needs pyarrow: pip install 'clipcli[scale]'") from None
    return pyarrow


def _manifest(loaded: "LoadedModel", names: Sequence[str], partition_size: int | None, count: int, normalize: bool,
              run: "RunOptions", captions: bool = False) -> dict:
    from .journal import inputs_hash

    return {"format": "clip-retrieval", "model": loaded.name, "identity": loaded.identity, "sha256": loaded.sha256,
            "dim": loaded.embed_dim, "precision": str(loaded.dtype).removeprefix("torch."), "normalize": normalize,
            "inputs": inputs_hash(names), "count": len(names), "partition_size": partition_size, "partitions": count,
            "source": "webdataset" if partition_size is None else "files", "captions": captions,
            "exact_decode": run.decode.exact, "max_pixels": run.decode.max_pixels,
            "allow_truncated": run.decode.allow_truncated, "allow_private": run.fetch.allow_private}


def _claim_manifest(path: Path, manifest: dict) -> None:
    """Write the manifest, or check the one there (written by another process or an earlier run)."""
    from .fsutil import atomic_write

    try:
        with atomic_write(path, overwrite=False, text=True) as file:
            file.write(json.dumps(manifest, indent=2) + "\n")
        return
    except OutputExistsError:
        pass  # written by another process or an earlier run
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputError(f"{path} cannot be read ({error}); remove the folder to start again") from None
    differs = sorted(k for k in manifest if found.get(k) != manifest[k])
    if differs:
        raise OutputError(f"{path.parent} holds a run with other {', '.join(differs)}; "
                          "use another folder, or remove this one to start again")


def encode_partitions(loaded: "LoadedModel", items: Sequence["Item"], outdir: str | os.PathLike, *,
                      partition_size: int = PARTITION_SIZE, part: Share = Share(), normalize: bool = True,
                      run: "RunOptions | None" = None,
                      on_result: Callable[[str, str | None], None] | None = None) -> dict:
    """Encode this process's partitions of ``items`` into ``outdir`` (see the module docstring).

    Returns ``{"partitions", "done" (by this process), "skipped" (already there), "ok",
    "error", "summary" (the whole run's counts once every partition exists, else None)}``.
    """
    import numpy as np

    from .batching import embed_images
    from .tasks import RunOptions

    if partition_size < 1:
        raise InputError(f"partition size must be at least 1, not {partition_size}")
    _pyarrow()
    run = (run or RunOptions()).for_device(loaded.device)
    report = on_result or (lambda name, error: None)
    outdir = Path(outdir)
    count = max(1, -(-len(items) // partition_size))
    numbers = _names(count)
    (outdir / "metadata").mkdir(parents=True, exist_ok=True)  # the other folders: _write
    _claim_manifest(outdir / MANIFEST,
                    _manifest(loaded, [item.name for item in items], partition_size, count, normalize, run))
    outcome = {"partitions": count, "done": 0, "skipped": 0, "ok": 0, "error": 0, "summary": None}
    for i, number in enumerate(numbers):
        metadata = outdir / "metadata" / f"metadata_{number}.parquet"
        if not part.takes(i):
            continue
        if metadata.exists():
            outcome["skipped"] += 1
            continue
        chunk = items[i * partition_size : (i + 1) * partition_size]
        rows = np.zeros((len(chunk), loaded.embed_dim), np.float32)
        status, errors = [], []
        results = embed_images(loaded, chunk, normalize=normalize, **run.pipeline_kwargs())
        for row, (item, result) in enumerate(zip(chunk, results)):
            if result.ok:
                rows[row] = result.embedding
            status.append("ok" if result.ok else "error")
            errors.append(result.error)
            outcome["ok" if result.ok else "error"] += 1
            report(item.name, result.error)
        _write(outdir, number, rows, {"image_path": [item.name for item in chunk], "status": status, "error": errors})
        outcome["done"] += 1
    outcome["summary"] = _summarize(outdir, numbers)
    return outcome


def _write(outdir: Path, number: str, rows, columns: dict[str, list], text_rows=None) -> None:
    """One partition's files, each under a temporary name until complete; the metadata last
    (a partition is done when its metadata file exists)."""
    import numpy as np

    from .fsutil import atomic_path, atomic_write

    pa = _pyarrow()
    text = {"image_path", "status", "error", "caption"}  # always strings, also when all are null
    arrays, names = [], []
    for name, values in columns.items():
        if name in text:
            values = [None if v is None else display(str(v)) for v in values]
            arrays.append(pa.array(values, type=pa.string()))
        else:
            try:
                arrays.append(pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # a sidecar field of mixed types: as text
                arrays.append(pa.array([None if v is None else str(v) for v in values], type=pa.string()))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    outputs = [("img_emb", rows)] + ([("text_emb", text_rows)] if text_rows is not None else [])
    for kind, matrix in outputs:
        (outdir / kind).mkdir(exist_ok=True)
        with atomic_write(outdir / kind / f"{kind}_{number}.npy", overwrite=True) as file:
            np.save(file, matrix, allow_pickle=False)
    with atomic_path(outdir / "metadata" / f"metadata_{number}.parquet", overwrite=True) as temp:
        pa.parquet.write_table(table, str(temp))


def encode_shards(loaded: "LoadedModel", shards: Sequence[str], outdir: str | os.PathLike, *,
                  part: Share = Share(), normalize: bool = True, captions: bool = False,
                  run: "RunOptions | None" = None,
                  on_result: Callable[[str, str | None], None] | None = None) -> dict:
    """Encode WebDataset ``shards`` (:mod:`clipcli.webdataset`), one partition per shard, as
    :func:`encode_partitions` does files. The metadata holds each sample's key, status,
    error, caption and the fields of its ``.json``; with ``captions`` the captions are also
    embedded into ``text_emb/text_emb_{N}.npy`` (zeros where a sample has none)."""
    import numpy as np

    from .batching import embed_images, embed_texts
    from .tasks import RunOptions
    from .webdataset import samples

    _pyarrow()
    run = (run or RunOptions()).for_device(loaded.device)
    report = on_result or (lambda name, error: None)
    outdir = Path(outdir)
    numbers = _names(len(shards))
    (outdir / "metadata").mkdir(parents=True, exist_ok=True)
    _claim_manifest(outdir / MANIFEST, _manifest(loaded, list(shards), None, len(shards), normalize, run, captions))
    outcome = {"partitions": len(shards), "done": 0, "skipped": 0, "ok": 0, "error": 0, "summary": None}
    for i, (shard, number) in enumerate(zip(shards, numbers)):
        if not part.takes(i):
            continue
        if (outdir / "metadata" / f"metadata_{number}.parquet").exists():
            outcome["skipped"] += 1
            continue
        found = []  # (key, caption, meta) per sample: the image bytes go to the decoder and no further

        def stream(shard=shard, found=found):
            for sample in samples(shard):
                found.append((sample.key, sample.caption, sample.meta))
                yield sample.item

        rows, status, errors = [], [], []
        results = embed_images(loaded, stream(), normalize=normalize, **run.pipeline_kwargs())
        for k, result in enumerate(results):  # found[k] was read before its result came back
            rows.append(result.embedding if result.ok else np.zeros(loaded.embed_dim, np.float32))
            status.append("ok" if result.ok else "error")
            errors.append(result.error)
            outcome["ok" if result.ok else "error"] += 1
            report(f"{shard}:{found[k][0]}", result.error)
        matrix = np.stack(rows) if rows else np.zeros((0, loaded.embed_dim), np.float32)
        text_rows = None
        if captions:
            text_rows = np.zeros_like(matrix)
            with_text = [j for j, (_, caption, _) in enumerate(found) if caption]
            for j, result in zip(with_text, embed_texts(loaded, [found[j][1] for j in with_text], normalize=normalize)):
                if result.ok:
                    text_rows[j] = result.embedding
        columns = {"image_path": [key for key, _, _ in found], "status": status, "error": errors,
                   "caption": [caption for _, caption, _ in found]}
        for field_name in dict.fromkeys(k for _, _, meta in found for k in meta):
            if field_name not in columns:  # the sidecar's fields, never over ours
                columns[field_name] = [_cell(meta.get(field_name)) for _, _, meta in found]
        _write(outdir, number, matrix, columns, text_rows)
        outcome["done"] += 1
    outcome["summary"] = _summarize(outdir, numbers)
    return outcome


def _cell(value):
    """A sidecar value as parquet takes it: scalars as they are, lists and objects as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _summarize(outdir: Path, numbers: Sequence[str]) -> dict | None:
    """Counts per status over every partition, written to ``_summary.json`` once all exist."""
    from collections import Counter

    from .fsutil import atomic_write

    files = [outdir / "metadata" / f"metadata_{number}.parquet" for number in numbers]
    if not all(path.exists() for path in files):
        return None
    parquet = _pyarrow().parquet
    counts = Counter()
    for path in files:
        counts.update(parquet.read_table(path, columns=["status"]).column("status").to_pylist())
    summary = {"partitions": len(files), "total": sum(counts.values()), **dict(sorted(counts.items()))}
    with atomic_write(outdir / SUMMARY, overwrite=True, text=True) as file:
        file.write(json.dumps(summary, indent=2) + "\n")
    return summary
