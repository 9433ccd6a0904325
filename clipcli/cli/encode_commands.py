"""`clipcli encode`: embeddings to a file, stdout, or partitions for many processes.

Thin: parse options, call :func:`clipcli.tasks.encode` or, for a folder output,
:mod:`clipcli.partitions` (files, or WebDataset shards), and report on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, Optional

import typer

from ..errors import InputError
from .app import command
from .options import (
    DECODE_TIMEOUT,
    DEFAULT_MODEL,
    MAX_PIXELS,
    VIDEO_INTERVAL,
    ArchOpt,
    BatchOpt,
    CacheDirOpt,
    DecodeTimeoutOpt,
    DeviceOpt,
    ExactOpt,
    FormatOpt,
    MaxPixelsOpt,
    ModelOpt,
    OverwriteOpt,
    PrecisionOpt,
    PrivateOpt,
    QuietOpt,
    TextFileOpt,
    TextOpt,
    ThreadsOpt,
    TruncatedOpt,
    VideoIntervalOpt,
    WorkersOpt,
    dtype_option,
    load,
    output_format,
    read_captions,
    run_options,
)


def _encode_view(record: dict) -> dict:
    key = "image" if "image" in record else "text"
    row = {key: record[key], "status": record["status"], "error": record.get("error")}
    embedding = record.get("embedding")
    if embedding is not None:
        row["dim"] = len(embedding)
        row["embedding"] = "[" + ", ".join(f"{v:.4f}" for v in embedding[:4]) + (", …]" if len(embedding) > 4 else "]")
    return row


@command("encode")
def encode(
    inputs: Annotated[Optional[list[str]], typer.Argument(metavar="INPUTS", show_default=False,
                                                          help="Images, folders, list files of paths/URLs, URLs, or -.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="emb.npy (+ emb.jsonl manifest), emb.npz, "
                                                  "a .jsonl/.json/.csv file, or - for stdout.")] = None,
    text: TextOpt = [],
    text_file: TextFileOpt = [],
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Keep raw embeddings (default: unit length).")] = False,
    dtype: Annotated[str, dtype_option(("float32", "float16"), "Number type stored in .npy/.npz and partitions "
                                                                "(and JSON values). Default: float32.")] = "float32",
    no_truncate: Annotated[bool, typer.Option("--no-truncate", help="Report captions longer than the context instead of cutting them.")] = False,
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted .npy/.npz run from its journal.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    arch: ArchOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    fmt: FormatOpt = None,
    quiet: QuietOpt = False,
    max_pixels: MaxPixelsOpt = MAX_PIXELS,
    allow_truncated: TruncatedOpt = False,
    allow_private: PrivateOpt = False,
    exact_decode: ExactOpt = False,
    video_interval: VideoIntervalOpt = VIDEO_INTERVAL,
    decode_timeout: DecodeTimeoutOpt = DECODE_TIMEOUT,
    partition_size: Annotated[int, typer.Option("--partition-size", min=1, help="With -o DIR/: inputs per partition.")] = 10_000,
    rank: Annotated[Optional[int], typer.Option("--rank", min=0, show_default=False, help="With -o DIR/: this process's rank (default: torchrun's RANK, SLURM's SLURM_PROCID, or 0).")] = None,
    world: Annotated[Optional[int], typer.Option("--world", min=1, show_default=False, help="With -o DIR/: how many processes share the work (default: WORLD_SIZE, SLURM_STEP_NUM_TASKS inside srun, or 1).")] = None,
    captions: Annotated[bool, typer.Option("--captions", help="With -o DIR/ and WebDataset shards: also embed each sample's .txt (DIR/text_emb/).")] = False,
) -> None:
    """Embed images (or captions: --text, --text-file) with CLIP, L2-normalised unless --no-normalize.

    .npy: [N, D] float32 (float16 with --dtype float16), one row per input that succeeded, and a manifest emb.jsonl with one
    record per input ({"index": row or null, "image", "status"}). .npz: embeddings, paths,
    model and sha256 in one file. No -o (or -o -): JSON Lines on stdout.

    With .npy/.npz, progress is journaled batch by batch in OUTPUT.journal/; after an
    interruption (Ctrl-C, kill, crash) rerun the same command with --resume to finish it.

    With -o DIR/ (or an existing folder) the work is split into partitions written in
    clip-retrieval's layout (DIR/img_emb/img_emb_N.npy, DIR/metadata/metadata_N.parquet row
    for row, and the inputs that failed in DIR/failed/failed_N.parquet);
    processes started by torchrun, SLURM or --rank/--world share them, and a rerun skips
    finished partitions. WebDataset tar shards (files, globs, {00000..00099} ranges) make one
    partition each; --captions also embeds their captions.

    Example: clipcli encode photos/ -o emb.npy

    Example: clipcli encode --text-file captions.txt -o captions.npz

    Example: torchrun --nproc-per-node 8 -m clipcli encode urls.txt -o embeddings/
    """
    from ..fsutil import exclusive_lock
    from ..items import expand_inputs
    from ..output import RecordWriter
    from ..tasks import check_outputs, csv_view, encode_target
    from ..tasks import encode as run_encode
    from .render import Reporter

    texts_given = bool(text or text_file)
    if texts_given and inputs:
        raise InputError("give either images or captions (--text, --text-file), not both")
    from ..partitions import is_folder_output

    if is_folder_output(output):
        check_options(texts_given, resume, inputs)
        if not inputs:
            raise InputError("nothing to encode: give images, folders or list files")
        encode_partitioned(inputs, output, lambda text=False: load(model, arch, device, precision, threads, quiet,
                                                                    towers=("image", "text") if text else ("image",),
                                                                    cache_dir=cache_dir),
                           run_options(batch_size, workers, max_pixels, allow_truncated, allow_private, exact_decode, video_interval,
                                       decode_timeout),
                           normalize=not no_normalize, dtype=dtype, partition_size=partition_size, rank=rank,
                           world=world, captions=captions, quiet=quiet)
    if not texts_given and not inputs:
        raise InputError("nothing to encode: give images, folders or list files, or captions (--text, --text-file)")
    from ..webdataset import SHARD

    if inputs and any(SHARD.search(arg) for arg in inputs):
        raise InputError("WebDataset shards are encoded into a folder: -o DIR/")
    target, outputs = encode_target(output)
    if resume and target not in ("npy", "npz"):
        raise InputError("--resume needs -o FILE.npy or FILE.npz")
    check_outputs(output, resume, overwrite)  # before the model loads
    # One run at a time writes these outputs and their journal (two would mix their rows);
    # the lock is taken before any work, so a second run is refused at once.
    with exclusive_lock(output) if target != "stdout" else contextlib.nullcontext():
        texts = read_captions(text, text_file, quiet, old_file_flag=True) if texts_given else None
        items = expand_inputs(inputs, exclude=outputs, video_interval=video_interval) if inputs else None
        loaded = load(model, arch, device, precision, threads, quiet,
                      towers=("text",) if texts is not None else ("image",), cache_dir=cache_dir)
        stream_writer = None
        if target == "stdout":
            fmt_name = output_format(fmt)
            stream_writer = RecordWriter(sys.stdout, fmt_name, view=_encode_view if fmt_name == "table" else csv_view,
                                         paths_column=None if texts is not None else "image")
        total = len(texts) if texts is not None else len(items)
        with Reporter(total, "captions" if texts is not None else "images", quiet) as report:
            done = run_encode(loaded, items=items, texts=texts, output=None if target == "stdout" else output,
                       normalize=not no_normalize, store=dtype, truncate=not no_truncate, resume=resume,
                       overwrite=overwrite,
                       run=run_options(batch_size, workers, max_pixels, allow_truncated, allow_private, exact_decode, video_interval,
                                       decode_timeout),
                       on_result=report.done, on_record=stream_writer.write if stream_writer else None, locked=True)
        if done.resumed:
            report.message(f"resumed: {done.resumed} of {total} inputs came from the journal of the interrupted run")
        if stream_writer is not None:
            stream_writer.close()  # after the progress bar has gone
        else:
            report.message(f"wrote {', '.join(outputs)}")
        report.summary("encoded")
        raise typer.Exit(report.exit_code)


# --------------------------------------------------------------------------- partitions


def encode_partitioned(inputs: list[str], output: str, loaded_model, run, *, normalize: bool, dtype: str,
                       partition_size: int, rank: Optional[int], world: Optional[int], captions: bool,
                       quiet: bool) -> None:
    """Encode this process's partitions (of files, or one per WebDataset shard) and report on
    stderr, each line prefixed with the rank when there are several; exits 0 when only some
    images failed (torchrun ends every rank when one exits non-zero), non-zero only for
    errors that stop the run."""
    from ..items import expand_inputs
    from ..partitions import encode_partitions, encode_shards, make_folder, require_pyarrow, share
    from ..webdataset import expand_shards, is_shards
    from .render import Reporter

    part = share(rank, world)
    require_pyarrow()
    make_folder(output)
    if "-" in inputs and part.world > 1:
        raise InputError("several processes cannot share stdin: give the list as a file")
    shards = expand_shards(inputs) if is_shards(inputs) else None
    if captions and shards is None:
        raise InputError("--captions embeds the .txt of WebDataset samples: give tar shards")
    items = expand_inputs(inputs, video_interval=run.video_interval) if shards is None else []
    mine = part.count(len(items), partition_size)
    prefix = f"[rank {part.rank}/{part.world}] " if part.world > 1 else ""
    with Reporter(mine, "images", quiet, prefix=prefix, bar=part.rank == 0 and shards is None) as report:
        if shards is None:
            outcome = encode_partitions(loaded_model(), items, output, partition_size=partition_size, part=part,
                                        normalize=normalize, dtype=dtype, run=run, on_result=report.done)
        else:
            outcome = encode_shards(loaded_model(captions), shards, output, part=part, normalize=normalize,
                                    captions=captions, dtype=dtype, run=run, on_result=report.done)
        report.summary("encoded")
        report.message(f"partitions: {outcome['done']} written, {outcome['skipped']} already done, "
                       f"of {outcome['partitions']} in {output}")
        summary = outcome["summary"]
        if summary is not None:
            every = "the partition is" if summary["partitions"] == 1 else f"all {summary['partitions']} partitions are"
            failed = f"; {summary['error']} failed, listed in failed/" if summary["error"] else ""
            report.message(f"{every} done: {summary['ok']} of {summary['total']} inputs embedded{failed}; "
                           "_summary.json written")
    raise typer.Exit(0)


def check_options(texts: bool, resume: bool, inputs: Optional[list[str]]) -> None:
    """Options and inputs a folder output does not take."""
    from ..webdataset import SHARD

    shards = [arg for arg in inputs or [] if SHARD.search(arg)]
    if shards and len(shards) != len(inputs):
        raise InputError("give either WebDataset shards (.tar) or images, folders and lists, not both")
    if texts:
        raise InputError("a folder output (-o DIR/) takes images; write captions to a .npy file")
    if resume:
        raise InputError("a folder output resumes by itself: rerun the same command (finished partitions are skipped)")
