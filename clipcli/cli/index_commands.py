"""`clipcli index` and `clipcli search`: thin over :mod:`clipcli.index` and :mod:`clipcli.search`."""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from ..display import escaped
from ..errors import InputError, NoVectorsError, OutputError
from .app import command
from .options import (
    DECODE_TIMEOUT,
    DEFAULT_MODEL,
    MAX_PIXELS,
    ArchOpt,
    BatchOpt,
    CacheDirOpt,
    DecodeTimeoutOpt,
    DeviceOpt,
    ExactOpt,
    IndexVideoIntervalOpt,
    MaxPixelsOpt,
    PrecisionOpt,
    PrivateOpt,
    QuietOpt,
    ThreadsOpt,
    TruncatedOpt,
    WorkersOpt,
    load,
    output_format,
    run_options,
)
from .render import say

DbOpt = Annotated[Optional[str], typer.Option("--db", envvar="CLIPCLI_INDEX", show_envvar=True, show_default=False,
                                              help="The index file (default: $XDG_DATA_HOME/clipcli/index.sqlite3).")]
IndexModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="CLIPCLI_MODEL", show_envvar=True, show_default=False,
    help="A name from `clipcli models`, hf-hub:ORG/REPO, a model folder or a checkpoint file. Default: the model "
         f"the index holds vectors of, else {DEFAULT_MODEL}.")]


def _when(value: str) -> float:
    from ..metadata import parse_when

    try:
        return parse_when(value)
    except InputError as error:
        raise typer.BadParameter(error.message) from None


WhenOpt = Optional[float]


def _summary_format(value: str) -> str:
    chosen = {"text": "table"}.get(value.strip().lower(), value.strip().lower())  # text: the old name, for a release
    if chosen not in ("table", "json"):
        raise typer.BadParameter(f"{value!r}: choose table (a line on stderr) or json (on stdout)")
    return chosen


def index_model(index, model: Optional[str]) -> str:
    """``--model`` as given, else the one model the index holds vectors of (else the default)."""
    if model:  # a checkpoint file by its absolute path: the index records the name, for runs from anywhere
        return os.path.abspath(model) if os.path.isfile(model) else model
    held = [m["name"] for m in index.models() if m["vectors"]]
    if len(held) > 1:
        raise InputError(f"{index.path} holds vectors of {len(held)} models ({', '.join(held)}); "
                         "choose one with --model NAME")
    return held[0] if held else DEFAULT_MODEL


class SearchFormat(str, Enum):
    jsonl = "jsonl"
    json = "json"
    csv = "csv"
    table = "table"
    paths = "paths"


def _summary_line(summary) -> str:
    counts = summary.as_json()
    parts = [f"{counts[k]} {k}" for k in ("added", "updated", "moved", "removed", "unchanged", "failed")]
    if summary.paired:
        parts.append(f"{summary.paired} RAW left out beside their JPEG")
    model = f"; the model ran on {summary.embedded}" if summary.model_loaded else "; the model was not loaded"
    return f"indexed: {', '.join(parts)} in {summary.seconds:.1f} s{model}"


def _update(index, inputs, model, arch, cache_dir, device, precision, threads, quiet, run, loaded: dict,
            raw_pairs: bool = True):
    """Update ``index``; a model it had to load is left in ``loaded["model"]`` for reuse."""
    from ..tasks import update_index
    from .render import Reporter, download_feedback

    def load_once():
        if "model" in loaded:  # loaded for the query already: add its image tower
            loaded["model"].ensure("image")
        else:
            loaded["model"] = load(model, arch, device, precision, threads, quiet, towers=("image",),
                                   cache_dir=cache_dir)
        return loaded["model"]

    with Reporter(0, "images", quiet) as report:
        summary = update_index(index, inputs, model, load_once, arch=arch, cache_dir=cache_dir, run=run,
                               on_result=report.done, feedback=download_feedback(quiet), raw_pairs=raw_pairs)
        report.message(_summary_line(summary))
    return summary


@command("index")
def index(
    inputs: Annotated[list[str], typer.Argument(metavar="PATH", show_default=False,
                                                help="Folders, image files or list files of paths.")],
    db: DbOpt = None,
    model: IndexModelOpt = None,
    arch: ArchOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    fmt: Annotated[str, typer.Option("--format", "-f", parser=_summary_format, metavar="table|json",
                                     help="table: the summary as a line on stderr; json: as JSON on stdout.")] = "table",
    quiet: QuietOpt = False,
    max_pixels: MaxPixelsOpt = MAX_PIXELS,
    allow_truncated: TruncatedOpt = False,
    exact_decode: ExactOpt = False,
    video_interval: IndexVideoIntervalOpt = None,
    decode_timeout: DecodeTimeoutOpt = DECODE_TIMEOUT,
    keep_raw_pairs: Annotated[bool, typer.Option(
        "--keep-raw-pairs", help="Index a camera RAW file (CR2, NEF, DNG, ...) even when a JPEG, HEIC, PNG or TIFF "
                                 "of the same name sits beside it (by default the RAW is left out, and counted).")] = False,
) -> None:
    """Add new images under PATH to the search index, re-embed changed ones, drop rows of
    files gone from the indexed folders; unchanged files are left alone.

    Files are matched by size and modification time, then by content: a renamed, moved or
    duplicated image reuses its vector. When nothing changed, the model is never loaded.
    A file that fails is retried once it changes. Safe to interrupt: rerun to finish.

    Example: clipcli index ~/Pictures

    Example: clipcli index photos/ --model ViT-L-14/laion2b_s32b_b82k --format json
    """
    from ..index import Index
    from ..output import to_json

    run = run_options(batch_size, workers, max_pixels, allow_truncated, False, exact_decode, video_interval, decode_timeout)
    with Index(db) as opened:
        summary = _update(opened, inputs, index_model(opened, model), arch, cache_dir, device, precision, threads,
                          quiet, run, {}, raw_pairs=not keep_raw_pairs)
    if fmt == "json":
        sys.stdout.write(to_json({"db": str(opened.path), **summary.as_json()}) + "\n")
    raise typer.Exit(1 if summary.failed else 0)


@command("search")
def search(
    queries: Annotated[list[str], typer.Argument(metavar="QUERY", show_default=False,
                                                 help="Text, an image file or an image URL; W:QUERY weighs it.")],
    db: DbOpt = None,
    within: Annotated[list[str], typer.Option("--in", help="Only files under PATH (repeatable); brings the index "
                                                           "up to date there first.")] = [],
    minus: Annotated[list[str], typer.Option("--minus", help="Subtract this query (repeatable).")] = [],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many results.")] = 10,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Only results scoring at least S (cosine).")] = None,
    after: Annotated[WhenOpt, typer.Option("--after", parser=_when, metavar="DATE", show_default=False,
                                           help="Only photos taken on or after DATE (2024-06-01, or 2024-06-01T14:30; "
                                                "UTC unless it says +02:00): EXIF's capture time, else the file's.")] = None,
    before: Annotated[WhenOpt, typer.Option("--before", parser=_when, metavar="DATE", show_default=False,
                                            help="Only photos taken before DATE (2024-09-01: up to August 31).")] = None,
    sort: Annotated[str, typer.Option("--sort", metavar="score|date",
                                      help="The best --top-k by score, listed by score or by date (newest first; "
                                           "each keeps its rank).")] = "score",
    min_prob: Annotated[Optional[float], typer.Option(
        "--min-prob", metavar="P", show_default=False,
        help="Only results at least P probable (0 to 1), for indexes of a model with calibrated probabilities "
             "(a logit bias: SigLIP); a CLIP has none: use --threshold.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Also write a contact sheet of the results (.png, .jpg, .webp).")] = None,
    no_update: Annotated[bool, typer.Option("--no-update", help="With --in: search the index as it is.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing contact sheet.")] = False,
    model: IndexModelOpt = None,
    arch: ArchOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    fmt: Annotated[Optional[SearchFormat], typer.Option("--format", "-f", help="Default: table on a terminal, jsonl in a pipe; paths: one path per line (a name that holds a line break is skipped: use --print0; a video's frames give the video, once).")] = None,
    print0: Annotated[bool, typer.Option("--print0", "-0", help="Paths, each followed by a NUL byte instead of a line break, for xargs -0: file names may contain line breaks (implies --format paths).")] = False,
    quiet: QuietOpt = False,
    allow_private: PrivateOpt = False,
) -> None:
    """Search the index by text or image: the best matches as {"rank", "image", "score", "score_kind"}.

    Terms are summed as unit vectors and normalised: clipcli search "a dog" 0.5:"on a beach"
    --minus "indoors". A term that names an existing file, or an http(s) URL, is an image.

    "score" is the cosine similarity. "score_kind" is "cosine" for a CLIP, or "sigmoid" for a
    model with a logit bias (SigLIP), whose results also carry "prob": the model's probability
    that the text matches the image (for image queries the same function of the cosine).
    "taken" is the capture time (EXIF, else the file's time; ISO 8601, UTC), with "width" and
    "height": --after/--before filter on it, --sort date lists by it.

    Example: clipcli search "a red bicycle" --top-k 5 -o sheet.png

    Example: clipcli search photos/cat.jpg --in ~/Pictures/2024 --print0 | xargs -0 ls -l

    Example: clipcli search "a dog on a beach" --after 2024-06-01 --before 2024-09-01 --sort date
    """
    from ..fsutil import atomic_write, ensure_writable
    from ..http import FetchOptions
    from ..index import Index
    from ..output import RecordWriter, write_paths
    from ..search import check_min_prob, check_sort, check_threshold, ordered, parse_terms, record, score_kind
    from ..search import search as run_search
    from ..zeroshot import check_probability

    terms = parse_terms(queries, minus)
    check_threshold(threshold)  # before --in updates the index and a model loads
    check_sort(sort)
    check_probability(min_prob)
    if print0 and fmt not in (None, SearchFormat.paths):
        raise InputError(f"prints paths: it cannot go with --format {fmt.value}", option="print0")
    if output:
        from ..sheet import sheet_format

        try:
            sheet = sheet_format(output)
        except ValueError as error:
            raise InputError(str(error)) from None
        ensure_writable([output], overwrite)
    update = bool(within) and not no_update
    try:
        opened = Index(db, readonly=not update)
    except NoVectorsError as error:
        raise NoVectorsError(f"{error.message}; build one with: clipcli index FOLDER") from None
    with opened:
        model = index_model(opened, model)
        loaded: dict = {}
        towers = ("image",) if all(t.is_image for t in terms) else ("text",)
        if min_prob is not None:  # whether the model has probabilities: known once loaded, before --in's update
            loaded["model"] = load(model, arch, device, precision, threads, quiet, towers=towers, cache_dir=cache_dir)
            check_min_prob(loaded["model"], min_prob)
        if update:
            if opened.readonly:
                raise OutputError(f"{opened.path} is read-only: add --no-update to search it as it is")
            run = run_options(None, None, MAX_PIXELS, False, allow_private, False)
            _update(opened, within, model, arch, cache_dir, device, precision, threads, quiet, run, loaded)
        loaded = loaded.get("model") or load(model, arch, device, precision, threads, quiet, towers=towers,
                                             cache_dir=cache_dir)
        try:
            hits = run_search(opened, loaded, terms, top_k=top_k, threshold=threshold, min_prob=min_prob,
                              under=within, after=after, before=before, fetch=FetchOptions(allow_private=allow_private))
        except NoVectorsError as error:
            raise NoVectorsError(f"{error.message}; index with it first: clipcli index FOLDER --model {model}") from None
    hits = ordered(hits, sort)
    name = "paths" if print0 else (output_format(fmt) if fmt is None else fmt.value)
    skipped: list[bytes] = []
    if name == "paths":
        from ..video import file_of

        files = list(dict.fromkeys(file_of(hit.path) for hit in hits))  # a video's frames: the video, once
        skipped = write_paths(sys.stdout.buffer, files, b"\0" if print0 else b"\n")
    else:
        kind = score_kind(loaded.model)
        columns, title = None, None
        if name == "table":  # for people: the kind in the title, the names keep their width
            dated = sort == "date" or after is not None or before is not None
            columns = ["rank", "image", "score", *(["prob"] if kind == "sigmoid" else []), *(["taken"] if dated else [])]
            title = "score: cosine" + (", prob: the model's probability (sigmoid)" if kind == "sigmoid" else "")
        with RecordWriter(sys.stdout, name, columns=columns, title=title, paths_column="image") as writer:
            for hit in hits:
                writer.write(record(hit, kind))
    if output:
        from ..sheet import render

        with atomic_write(output, overwrite=overwrite) as stream:
            notes = render(hits, stream, sheet)
        if not quiet:
            for note in notes:
                say(f"note: {note}")
    for path in skipped:  # on a line of its own it would read as two paths
        say(f"skipping {escaped(os.fsdecode(path))}: its name holds a line break; use --print0 with xargs -0")
    if skipped:
        raise typer.Exit(1)

