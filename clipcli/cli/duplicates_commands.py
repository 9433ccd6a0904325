"""`clipcli duplicates`: thin over :mod:`clipcli.duplicates`."""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from ..errors import InputError, NoVectorsError, OutputError
from .app import command
from .index_commands import DbOpt, IndexModelOpt, _update, index_model
from .options import (
    MAX_PIXELS,
    ArchOpt,
    CacheDirOpt,
    DeviceOpt,
    OverwriteOpt,
    PrecisionOpt,
    PrivateOpt,
    QuietOpt,
    ThreadsOpt,
    run_options,
)
from .render import download_feedback, say

# clipcli.duplicates.NEAR and SIMILAR, spelled out so --help need not import the library
NEAR, SIMILAR = 0.99, 0.95


class DuplicatesFormat(str, Enum):
    jsonl = "jsonl"
    json = "json"
    table = "table"
    paths0 = "paths0"


def _tiers(value: str) -> list[str]:
    chosen = [t.strip().lower() for t in value.split(",") if t.strip()]
    if not chosen or any(t not in ("exact", "near", "similar") for t in chosen):
        raise typer.BadParameter(f"{value!r}: choose one or more of exact,near,similar (comma-separated)")
    return chosen


def _table_view(row: dict) -> dict:
    others = [os.path.basename(m["image"]) for m in row["members"][1:]]
    return {"group": row["group"], "tier": row["tier"], "score": row["score"], "keep": row["keep"],
            "others": ", ".join(others)}


@command("duplicates")
def duplicates(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        metavar="PATH", show_default=False,
        help="Folders or files: index them first, then report only groups of files under them. "
             "Without PATH: the whole index, as it is.")] = None,
    db: DbOpt = None,
    tiers: Annotated[str, typer.Option("--tiers", metavar="exact,near,similar",
                                       help="Which tiers to report.")] = "exact,near,similar",
    near: Annotated[float, typer.Option(
        "--near", metavar="COSINE",
        help="Near-identical (re-encodes, resizes, small crops) from this cosine up. 0.99: immich's duplicate "
             "default for ViT-B-32 (maxDistance 0.01), as NeMo Curator's semantic dedup eps=0.01.")] = NEAR,
    similar: Annotated[float, typer.Option(
        "--similar", metavar="COSINE",
        help="Similar shots (bursts, the same scene) from this cosine up. 0.95: the cut suggested for CLIP "
             "near duplicates (openai/CLIP#260), below immich's first duplicate default, 0.97.")] = SIMILAR,
    fmt: Annotated[Optional[DuplicatesFormat], typer.Option(
        "--format", "-f", help="Default: table on a terminal, jsonl in a pipe; paths0: the files other than "
                               "each group's keeper, each followed by a NUL byte, for xargs -0.")] = None,
    print0: Annotated[bool, typer.Option("--print0", "-0", help="Same as --format paths0.")] = False,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="DIR", help="Also write one contact sheet per group into DIR "
                                              "(0001-near.png ...), the keeper first and framed.")] = None,
    overwrite: OverwriteOpt = False,
    model: IndexModelOpt = None,
    arch: ArchOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    allow_private: PrivateOpt = False,
) -> None:
    """Find duplicate photos: exact copies (the same bytes), near-identical versions and similar
    shots, each file in one group of the strictest tier. Never deletes or moves anything:
    it reports, and --format paths0 lists the extras for you to act on.

    Each group is {"group", "tier", "score", "keep", "members": [{"image", "size", "width",
    "height", "taken", "similarity"}]}: "similarity" is the cosine to the keeper, "score" the
    lowest in the group (1.0 for exact copies). Every member is within the tier's threshold of
    the keeper, so groups never chain unlike photos through intermediates.

    The keeper: the largest resolution (width x height), then the oldest capture time (EXIF,
    else the file's time), then the oldest file (a copy is newer), then the shortest path.

    The thresholds suit CLIP ViT-B/32-class models; other models score on other scales.
    Comparing 100,000 photos takes about 20 s on two cores (--threads bounds it too).

    Example: clipcli duplicates ~/Pictures -o dupes/

    Example: clipcli duplicates --tiers exact,near -0 | xargs -0 -r mv -n -t ~/dupes-to-check/
    """
    from ..duplicates import check_sheet_folder, check_tiers, extras, find_duplicates, model_of, record, write_sheets
    from ..index import Index
    from ..output import RecordWriter, default_format, write_paths

    chosen = _tiers(tiers)
    check_tiers(chosen, near, similar)  # before an update indexes anything
    if print0 and fmt not in (None, DuplicatesFormat.paths0):
        raise InputError(f"prints paths: it cannot go with --format {fmt.value}", option="print0")
    if output:
        check_sheet_folder(output, overwrite)
    name = "paths0" if print0 else (fmt.value if fmt is not None else default_format(sys.stdout))
    try:
        opened = Index(db, readonly=not inputs)
    except NoVectorsError as error:
        raise NoVectorsError(f"{error.message}; build one with: clipcli index FOLDER") from None
    with opened:
        model = index_model(opened, model)
        if inputs:
            if opened.readonly:
                raise OutputError(f"{opened.path} is read-only: leave out PATH to look through the index as it is")
            run = run_options(None, None, MAX_PIXELS, False, allow_private, False)
            _update(opened, inputs, model, arch, cache_dir, device, precision, threads, quiet, run, {})
        compared = {"near", "similar"} & set(chosen)
        try:
            model_id = model_of(opened, model, arch=arch, cache_dir=cache_dir,
                                feedback=download_feedback(quiet)) if compared else None
        except NoVectorsError as error:
            raise NoVectorsError(f"{error.message}; index with it first: clipcli index FOLDER --model {model}") from None
        if threads:
            import torch

            torch.set_num_threads(threads)
        groups = find_duplicates(opened, model_id, tiers=chosen, near=near, similar=similar, under=inputs or ())
    if name == "paths0":
        write_paths(sys.stdout.buffer, extras(groups), b"\0")
    else:
        view = _table_view if name == "table" else None
        with RecordWriter(sys.stdout, name, view=view, paths_column="keep",
                          columns=["group", "tier", "score", "keep", "others"] if view else None) as writer:
            for number, group in enumerate(groups, start=1):
                writer.write(record(group, number))
    if output:
        notes = write_sheets(groups, output, overwrite)
        if not quiet:
            for note in notes:
                say(f"note: {note}")
    if not quiet:
        parts = []
        for tier in chosen:
            found = [g for g in groups if g.tier == tier]
            extra = sum(len(g.extras) for g in found)
            parts.append(f"{len(found)} {tier} ({extra} extra file{'' if extra == 1 else 's'})")
        say(f"duplicate groups: {', '.join(parts)}; nothing was moved or deleted")
