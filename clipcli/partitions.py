"""Encoding in share-nothing partitions, in clip-retrieval's output layout.

The inputs are split, in order, into partitions of ``partition_size`` items. Process
``rank`` of ``world`` takes the partitions ``i`` with ``i % world == rank``; no process
talks to another, so torchrun, SLURM, a shell loop, Ray or Spark can all start them
(:func:`share`). Each partition is written as

    OUTDIR/img_emb/img_emb_{i}.npy         (N, D) float32 or float16, one row per input that succeeded
    OUTDIR/text_emb/text_emb_{i}.npy       the same rows' captions (WebDataset with captions)
    OUTDIR/metadata/metadata_{i}.parquet   the same rows, aligned: image_path (+ caption, url, json)
    OUTDIR/failed/failed_{i}.parquet       the inputs that failed: image_path, error

with zero-padded numbers. Failed inputs never reach ``img_emb``: a zero row there would be
indexed (autofaiss, clip-retrieval) and rank first or last in every query. A partition in
which nothing succeeded has no ``img_emb``/``metadata`` pair at all (embedding-reader skips
an empty ``.npy`` but not its parquet). Every metadata file of a run has the same columns,
all strings, so the folder reads as one dataset (pandas, ``pyarrow.dataset``): a WebDataset
sample's ``.json`` is kept whole as text in ``json`` (its ``url`` also as a column), never
spread into columns that would differ from shard to shard.

Each file is written under a temporary name and renamed when complete, the failures last:
a partition is done when its ``failed`` file exists (with zero rows when nothing failed).
``OUTDIR/_manifest.json`` names the model identity, the options and the inputs; a rerun
with any world size skips finished partitions and refuses a manifest of another model, input
list or option. The process that finds every partition done writes ``_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .display import display
from .errors import InputError, OutputError, OutputExistsError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .items import Item
    from .pipeline import LoadedModel
    from .tasks import RunOptions

PARTITION_SIZE = 10_000
MANIFEST, SUMMARY = "_manifest.json", "_summary.json"
LAYOUT = 2  # 1: failed inputs were zero rows in img_emb, sidecar fields were columns
STORE_DTYPES = ("float32", "float16")


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
    """The first of ``names`` that is set (a malformed one is an error: see :func:`env_int`)."""
    from .topology import env_int

    return next((value for value in map(env_int, names) if value is not None), None)


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


def make_folder(outdir: str | os.PathLike) -> Path:
    """The output folder, made now (before a model is loaded): a file in its place, or a folder
    that cannot be made, is an :class:`OutputError` naming it."""
    from .fsutil import named

    path = Path(named(outdir, "the output folder"))
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write partitions into {display(os.fspath(outdir))}: it is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot make the folder {display(os.fspath(outdir))}: {error.strerror or error}") from None
    return path


def require_pyarrow() -> None:
    """Refuse early (before a model is loaded) when parquet cannot be written."""
    _pyarrow()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").partition(".")[0] == "pyarrow":
            raise InputError("partitioned output writes parquet, which needs pyarrow: pip install 'clipcli[scale]'") from None
        # Installed but broken (e.g. a pyarrow built for NumPy 2 beside NumPy 1): say what failed.
        raise InputError(f"partitioned output writes parquet, but pyarrow cannot be imported: {error}") from None
    return pyarrow


def _manifest(loaded: "LoadedModel", names: Sequence[str], partition_size: int | None, count: int, normalize: bool,
              run: "RunOptions", dtype: str, captions: bool = False) -> dict:
    from .journal import inputs_hash

    return {"format": "clip-retrieval", "layout": LAYOUT, "model": loaded.name, "identity": loaded.identity,
            "sha256": loaded.sha256, "dim": loaded.embed_dim, "precision": str(loaded.dtype).removeprefix("torch."),
            "dtype": dtype, "normalize": normalize, "inputs": inputs_hash(names), "count": len(names),
            "partition_size": partition_size, "partitions": count,
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
    if not isinstance(found, dict):
        raise OutputError(f"{path} is not a clipcli manifest; remove the folder to start again")
    differs = sorted(k for k in manifest if found.get(k) != manifest[k])
    if "layout" in differs:
        raise OutputError(f"{path.parent} was written by an older clipcli (failed inputs as zero rows); "
                          "use another folder, or remove this one to start again")
    if differs:
        raise OutputError(f"{path.parent} holds a run with other {', '.join(differs)}; "
                          "use another folder, or remove this one to start again")


def _failed_path(outdir: Path, number: str) -> Path:
    """Written last: a partition is done when this file exists."""
    return outdir / "failed" / f"failed_{number}.parquet"


class _Partition:
    """One partition written as its results come back, in bounded memory whatever a shard holds:
    at most :data:`ROWS` inputs are kept, then appended to temporary files (embeddings as raw
    rows, metadata and failures as parquet row groups); :meth:`finish` makes the partition's
    files from them (see the module docstring), :meth:`close` removes what is left."""

    ROWS = 1024

    def __init__(self, outdir: Path, number: str, dim: int, dtype: str, columns: Sequence[str] = (),
                 caption_rows: Callable[[list], "np.ndarray"] | None = None):
        self.outdir, self.number, self.dim, self.dtype = outdir, number, dim, dtype
        self.caption_rows = caption_rows  # captions -> their embeddings (--captions), row for row
        self.columns = ("image_path", *columns)
        self.ok = 0
        self._temps: dict[str, tuple[str, object]] = {}  # kind -> (temporary path, open file or parquet writer)
        self._reset()

    def _reset(self) -> None:
        self._rows: list = []
        self._metadata: dict[str, list] = {column: [] for column in self.columns}
        self._failed: dict[str, list] = {"image_path": [], "error": []}

    def add(self, name: str, result, **fields) -> None:
        if result.ok:
            self.ok += 1
            self._rows.append(result.embedding)
            for column, value in {"image_path": name, **fields}.items():
                self._metadata[column].append(value)
        else:
            self._failed["image_path"].append(name)
            self._failed["error"].append(result.error)
        if len(self._rows) + len(self._failed["error"]) >= self.ROWS:
            self._flush()

    def _final(self, kind: str) -> Path:
        return self.outdir / kind / f"{kind}_{self.number}.{'npy' if kind.endswith('_emb') else 'parquet'}"

    def _sink(self, kind: str, columns: Sequence[str] = ()):
        """The temporary file of ``kind`` (a parquet writer for tables), made on first use."""
        import tempfile

        if kind not in self._temps:
            (self.outdir / kind).mkdir(exist_ok=True)
            handle, path = tempfile.mkstemp(prefix=f".{kind}_{self.number}.", suffix=".part", dir=self.outdir / kind)
            sink = os.fdopen(handle, "wb")
            if columns:
                pa = _pyarrow()
                sink.close()
                sink = pa.parquet.ParquetWriter(path, pa.schema([(c, pa.string()) for c in columns]))
            self._temps[kind] = (path, sink)
        return self._temps[kind][1]

    def _flush(self) -> None:
        import numpy as np

        from .fsutil import WRITE_ERRNOS, write_error

        writes = []
        if self._rows:
            writes.append(("img_emb", np.stack(self._rows)))
            if self.caption_rows is not None:
                writes.append(("text_emb", self.caption_rows(self._metadata["caption"])))
            writes.append(("metadata", self._metadata))
        if self._failed["error"]:
            writes.append(("failed", self._failed))
        for kind, data in writes:
            try:
                if isinstance(data, dict):
                    self._sink(kind, list(data)).write_table(_table(data))
                else:
                    self._sink(kind).write(np.ascontiguousarray(data, dtype=self.dtype).tobytes())
            except OSError as error:
                if error.errno not in WRITE_ERRNOS:
                    raise
                raise write_error(error, self._final(kind)) from None  # a full disk: name the file
        self._reset()

    def finish(self) -> None:
        """The partition's files, each renamed into place when complete: the embeddings and
        metadata only when some input succeeded, the failures last, also when there are none."""
        import shutil

        import numpy as np

        from .fsutil import atomic_path, atomic_write

        self._flush()
        if "failed" not in self._temps:
            self._sink("failed", ("image_path", "error"))  # zero rows: still the done marker
        if not self.ok:  # an earlier run's pair, renamed before it was killed, is not this run's
            for kind in ("img_emb", "text_emb", "metadata"):
                with contextlib.suppress(FileNotFoundError):
                    self._final(kind).unlink()
        for kind in ("img_emb", "text_emb", "metadata", "failed"):
            if kind not in self._temps:
                continue
            temp, sink = self._temps[kind]
            sink.close()
            if kind == "failed" or self.ok:
                if kind.endswith("_emb"):
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)), "fortran_order": False,
                              "shape": (self.ok, self.dim)}
                    with atomic_write(self._final(kind), overwrite=True) as out, open(temp, "rb") as rows:
                        np.lib.format.write_array_header_1_0(out, header)
                        shutil.copyfileobj(rows, out, 1 << 20)
                else:
                    with atomic_path(self._final(kind), overwrite=True) as out:
                        shutil.copyfile(temp, out)

    def close(self) -> None:
        for path, sink in self._temps.values():
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - already closed, or failing while we clean up
                pass
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._temps.clear()

    def __enter__(self) -> "_Partition":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_dtype(dtype: str) -> None:
    if dtype not in STORE_DTYPES:
        raise InputError(f"{dtype!r}: partitions store {' or '.join(STORE_DTYPES)}", option="dtype")


def encode_partitions(loaded: "LoadedModel", items: Sequence["Item"], outdir: str | os.PathLike, *,
                      partition_size: int = PARTITION_SIZE, part: Share = Share(), normalize: bool = True,
                      dtype: str = "float32", run: "RunOptions | None" = None,
                      on_result: Callable[[str, str | None], None] | None = None) -> dict:
    """Encode this process's partitions of ``items`` into ``outdir`` (see the module docstring),
    storing ``dtype`` (``float32`` or ``float16``).

    Returns ``{"partitions", "done" (by this process), "skipped" (already there), "ok",
    "error", "summary" (the whole run's counts once every partition exists, else None)}``.
    """
    from .batching import embed_images
    from .tasks import RunOptions

    if partition_size < 1:
        raise InputError(f"partition size must be at least 1, not {partition_size}")
    _check_dtype(dtype)
    _pyarrow()
    loaded.disable_packing()
    run = (run or RunOptions()).for_device(loaded.device)
    report = on_result or (lambda name, error: None)
    outdir = make_folder(outdir)  # the partitions' folders: _Partition
    count = max(1, -(-len(items) // partition_size))
    numbers = _names(count)
    _claim_manifest(outdir / MANIFEST,
                    _manifest(loaded, [item.name for item in items], partition_size, count, normalize, run, dtype))
    outcome = {"partitions": count, "done": 0, "skipped": 0, "ok": 0, "error": 0, "summary": None}
    for i, number in enumerate(numbers):
        if not part.takes(i):
            continue
        if _failed_path(outdir, number).exists():
            outcome["skipped"] += 1
            continue
        chunk = items[i * partition_size : (i + 1) * partition_size]
        with _Partition(outdir, number, loaded.embed_dim, dtype) as partition:
            for item, result in zip(chunk, embed_images(loaded, chunk, normalize=normalize, **run.pipeline_kwargs())):
                partition.add(item.name, result)
                outcome["ok" if result.ok else "error"] += 1
                report(item.name, result.error)
            partition.finish()
        outcome["done"] += 1
    outcome["summary"] = _summarize(outdir, numbers)
    return outcome


def _table(columns: dict[str, list]):
    """Every column a string column (null where a value is missing): the same schema in every
    partition, also where a column is null throughout one."""
    pa = _pyarrow()
    return pa.Table.from_arrays([pa.array([None if v is None else display(str(v)) for v in values], type=pa.string())
                                 for values in columns.values()], names=list(columns))


def encode_shards(loaded: "LoadedModel", shards: Sequence[str], outdir: str | os.PathLike, *,
                  part: Share = Share(), normalize: bool = True, captions: bool = False, dtype: str = "float32",
                  run: "RunOptions | None" = None,
                  on_result: Callable[[str, str | None], None] | None = None) -> dict:
    """Encode WebDataset ``shards`` (:mod:`clipcli.webdataset`), one partition per shard, as
    :func:`encode_partitions` does files. The metadata holds each sample's key (as
    ``image_path``), caption, ``url`` and its ``.json`` as text; with ``captions`` the captions
    are also embedded into ``text_emb/text_emb_{N}.npy``, row for row with ``img_emb`` (zeros
    where a sample has no caption)."""
    import numpy as np

    from .batching import embed_images, embed_texts
    from .tasks import RunOptions
    from .webdataset import samples

    _check_dtype(dtype)
    _pyarrow()
    loaded.disable_packing()
    run = (run or RunOptions()).for_device(loaded.device)
    report = on_result or (lambda name, error: None)
    outdir = make_folder(outdir)
    numbers = _names(len(shards))
    _claim_manifest(outdir / MANIFEST,
                    _manifest(loaded, list(shards), None, len(shards), normalize, run, dtype, captions))
    outcome = {"partitions": len(shards), "done": 0, "skipped": 0, "ok": 0, "error": 0, "summary": None}
    for i, (shard, number) in enumerate(zip(shards, numbers)):
        if not part.takes(i):
            continue
        if _failed_path(outdir, number).exists():
            outcome["skipped"] += 1
            continue
        found: deque = deque()  # the samples read ahead, without their image bytes (those go to the decoder)

        def stream(shard=shard, found=found):
            for sample in samples(shard):
                found.append((sample.key, sample.caption, sample.url, sample.json))
                yield sample.item

        def caption_rows(texts: list) -> "np.ndarray":
            rows = np.zeros((len(texts), loaded.embed_dim), np.float32)  # zeros: no caption
            with_text = [j for j, text in enumerate(texts) if text]
            for j, result in zip(with_text, embed_texts(loaded, [texts[j] for j in with_text], normalize=normalize)):
                if result.ok:
                    rows[j] = result.embedding
            return rows

        with _Partition(outdir, number, loaded.embed_dim, dtype, ("caption", "url", "json"),
                        caption_rows if captions else None) as partition:
            for result in embed_images(loaded, stream(), normalize=normalize, **run.pipeline_kwargs()):
                key, caption, url, sidecar = found.popleft()  # read before its result came back
                partition.add(key, result, caption=caption, url=url, json=sidecar)
                outcome["ok" if result.ok else "error"] += 1
                report(f"{shard}:{key}", result.error)
            partition.finish()
        outcome["done"] += 1
    outcome["summary"] = _summarize(outdir, numbers)
    return outcome


def _summarize(outdir: Path, numbers: Sequence[str]) -> dict | None:
    """Counts over every partition (embedded, failed), written to ``_summary.json`` once all are done."""
    from .fsutil import atomic_write

    if not all(_failed_path(outdir, number).exists() for number in numbers):
        return None
    parquet = _pyarrow().parquet

    def rows(kind: str) -> int:
        files = [outdir / kind / f"{kind}_{number}.parquet" for number in numbers]
        return sum(parquet.ParquetFile(path).metadata.num_rows for path in files if path.exists())

    ok, failed = rows("metadata"), rows("failed")
    summary = {"partitions": len(numbers), "total": ok + failed, "ok": ok, "error": failed}
    with atomic_write(outdir / SUMMARY, overwrite=True, text=True) as file:
        file.write(json.dumps(summary, indent=2) + "\n")
    return summary
