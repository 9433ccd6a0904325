"""`clipcli classify` and `clipcli similarity` (their shared options are in :mod:`.options`).

Thin: parse options, call :mod:`clipcli.pipeline`, write records. torch, PIL and matplotlib
are imported inside the commands so that ``clipcli --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from ..errors import ClipcliError, InputError
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
    load,
    output_format,
    read_captions,
    run_options,
)

# --------------------------------------------------------------------------- classify


def _labels(labels: list[str], labels_file: Optional[str]) -> list[str]:
    from ..items import read_lines
    from ..zeroshot import parse_labels

    found = parse_labels(labels, read_lines(labels_file, comments=False) if labels_file else ())  # a label may start with "#"
    if not found:
        raise InputError("no labels: pass --labels cat,dog or --labels-file FILE")
    return found


def _top_view(record: dict) -> dict:
    """Table/CSV row of a classify record: the top list as ``label (score)`` text."""
    row = dict(record)
    if "top" in row:
        row["top"] = ", ".join(f"{t['label']} ({t['score']:.3f})" for t in row["top"])
    return row


@command("classify")
def classify(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUTS", show_default=False,
                                                help="Images, folders, list files of paths/URLs, URLs, or - (a list on stdin).")],
    labels: Annotated[list[str], typer.Option("--labels", "-l", help="Comma-separated labels (repeatable).")] = [],
    labels_file: Annotated[Optional[str], typer.Option("--labels-file", help="File with one label per line.")] = None,
    template: Annotated[list[str], typer.Option("--template", "-t", help="Prompt template with {} for the label (repeatable).")] = [],
    templates: Annotated[Optional[str], typer.Option("--templates", help="imagenet (80 CLIP templates), imagenet7, or a file.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels listed per image.")] = 5,
    min_prob: Annotated[Optional[float], typer.Option(
        "--min-prob", metavar="P", show_default=False,
        help="List only labels at least P probable (0 to 1); an image none reaches still gets its record, with "
             "no label. For a softmax (CLIP) model these are the softmax probabilities over the labels given.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the records to FILE (.jsonl, .json "
                                                  "or .csv; --format overrides) instead of stdout.")] = None,
    overwrite: OverwriteOpt = False,
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
) -> None:
    """Zero-shot classify images: one record per image with its best label and the top K.

    Each label goes into each template (default "a photo of a {}."). Label embeddings are
    cached on disk. Each record's "score_kind" says what its scores are: "softmax" (CLIP: the
    softmax over the labels given, as in the CLIP paper; they sum to 1 and rank the labels,
    they do not say whether any label fits) or "sigmoid" (models with a logit bias, SigLIP:
    each label's own probability of fitting the image, multi-label, need not sum to 1).

    Example: clipcli classify photos/ --labels cat,dog,car

    Example: clipcli classify photos/ -l cat,dog | jq -r 'select(.label=="cat") | .image'

    Example: clipcli classify photos/ --labels-file labels.txt -o labels.csv
    """
    import contextlib

    from ..fsutil import atomic_write, ensure_writable
    from ..items import expand_inputs
    from ..output import RecordWriter, file_format
    from ..pipeline import classify as run_classify
    from ..zeroshot import check_probability, choose_templates, logit_parameters, score_kind
    from .render import Reporter

    check_probability(min_prob)  # before a model loads
    label_list = _labels(labels, labels_file)
    template_list = choose_templates(template, templates, "--template")
    if output == "-":
        output = None  # stdout, as encode takes it
    fmt_name = fmt.value if fmt is not None else (file_format(output) if output else output_format(None))
    if output:
        ensure_writable([output], overwrite)
    items = expand_inputs(inputs, exclude=[output] if output else [], video_interval=video_interval)
    loaded = load(model, arch, device, precision, threads, quiet, towers=("image",),  # text tower: on a label-cache miss
                  cache_dir=cache_dir)
    records = run_classify(loaded, items, label_list, template_list, top_k=top_k, min_prob=min_prob,
                           **run_options(batch_size, workers, max_pixels, allow_truncated, allow_private, exact_decode,
                                       decode_timeout=decode_timeout).pipeline_kwargs())
    columns = ["image", "status", "label", "score", "top", "error"]
    kind = score_kind(logit_parameters(loaded.model)[1])
    if fmt_name == "table":  # for people: the kind in the title, the names keep their width
        title = "scores: softmax over the labels" if kind == "softmax" else "scores: each label's own probability"
    else:
        columns, title = [*columns, "score_kind"], None
    target = atomic_write(output, overwrite=overwrite, text=True) if output else contextlib.nullcontext(sys.stdout)
    # The writer encloses the reporter so that a table is printed after the progress bar has gone.
    with target as stream, RecordWriter(stream, fmt_name, columns=columns, view=_top_view, title=title,
                                        paths_column="image") as writer:
        with Reporter(len(items), "images", quiet) as report:
            for record in records:
                report.done(record["image"], record.get("error"))
                writer.write(record)
    if output:
        report.message(f"wrote {output}")
    report.summary("classified")
    raise typer.Exit(report.exit_code)



# --------------------------------------------------------------------------- similarity


def _split_similarity_args(inputs: list[str], text: list[str], text_file: list[str],
                           quiet: bool) -> tuple[list[str], list[str]]:
    """The images and the captions: from --text/--text-file, else the last argument is a captions file."""
    if text or text_file:
        return inputs, read_captions(text, text_file, quiet)
    if len(inputs) < 2:
        raise InputError("give the images and then a captions file (one caption per line), or --text/--text-file")
    return inputs[:-1], read_captions([], [inputs[-1]], quiet)


@command("similarity")
def similarity(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUTS", show_default=False,
                                                help="Images, folders, list files or URLs, then a captions file (one caption per line) unless --text or --text-file is given.")],
    text: TextOpt = [],
    text_file: TextFileOpt = [],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the heatmap to FILE.png, .svg or .pdf.")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Heatmap title.")] = None,
    no_truncate: Annotated[bool, typer.Option("--no-truncate", help="Report captions longer than the context instead of cutting them.")] = False,
    overwrite: OverwriteOpt = False,
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
) -> None:
    """Similarity of every caption with every image (cosine, and the model's probabilities), as a matrix or a heatmap.

    clipcli similarity IMAGES... CAPTIONS_FILE, or clipcli similarity IMAGES... --text T --text U
    (--text-file FILE reads captions from a file).

    Rows are captions, columns are images (as in the CLIP notebook). JSON and JSONL give both
    "cosine" and "probs"/"prob", whose kind "score_kind" names: "softmax" (CLIP: the softmax
    over the images for each caption) or "sigmoid" (models with a logit bias, SigLIP: each
    pair's own probability). The matrix (CSV, table, heatmap) shows cosines for a softmax
    model and probabilities for a sigmoid one; its CSV's last column, "score_kind", says
    which ("cosine" or "sigmoid"). With -o, the heatmap is written and stdout stays empty
    unless --format is given.

    Example: clipcli similarity photos/ captions.txt -o heatmap.png

    Example: clipcli similarity urls.txt --text "a dog" --text "a cat" --format json
    """
    from ..fsutil import atomic_write, ensure_writable
    from ..heatmap import figure_format, render
    from ..items import expand_inputs
    from ..messages import hinted
    from ..output import RecordWriter, to_json
    from .render import Reporter

    image_args, captions = _split_similarity_args(inputs, text, text_file, quiet)
    if output:
        try:
            figure = figure_format(output)
        except ValueError as error:
            raise InputError(str(error)) from None
        ensure_writable([output], overwrite)
    items = expand_inputs(image_args, exclude=[output] if output else [], video_interval=video_interval)
    fmt_name = fmt.value if fmt is not None else (None if output else output_format(None))
    loaded = load(model, arch, device, precision, threads, quiet, cache_dir=cache_dir)

    from ..pipeline import similarity as run_similarity

    with Reporter(len(items), "images", quiet) as report:
        result = run_similarity(
            loaded, items, captions, truncate=not no_truncate, thumbnails=bool(output),
            on_image=lambda r: report.done(r.name, r.error),
            on_text=lambda r: None if r.ok else report.message(f"skipping caption {r.name!r}: {hinted(r.error)}"),
            **run_options(batch_size, workers, max_pixels, allow_truncated, allow_private, exact_decode,
                                       decode_timeout=decode_timeout).pipeline_kwargs(),
        )
    text_failures = sum(1 for f in result.failed if "text" in f)
    if output:
        if not result.images or not result.texts:
            raise ClipcliError("nothing to draw: no image or no caption could be embedded")
        with atomic_write(output, overwrite=overwrite) as f:
            notes = render(result.matrix, result.texts, result.images, result.thumbnails, f, figure, title,
                           kind=result.matrix_kind)
        for note in notes:
            report.message(f"note: {note}")
        report.message(f"wrote {output} ({len(result.texts)} captions x {len(result.images)} images)")
    if fmt_name == "json":
        sys.stdout.write(to_json(result.as_json(), indent=2) + "\n")
    elif fmt_name == "jsonl":
        with RecordWriter(sys.stdout, "jsonl") as writer:
            for record in result.records():
                writer.write(record)
    elif fmt_name in ("csv", "table"):
        csv = fmt_name == "csv"
        names = list(result.images) if csv else _short_names(result.images)
        kind = result.matrix_kind
        what = "cosine similarity" if kind == "cosine" else "probability (sigmoid)"
        with RecordWriter(sys.stdout, fmt_name, columns=["text", *names, *(["score_kind"] if csv else [])],
                          title=f"{what} (rows: captions, columns: images)") as writer:
            for row in result.rows(names):
                writer.write({**row, "score_kind": kind} if csv else row)
    report.summary("compared")
    raise typer.Exit(1 if report.failed or text_failures else 0)


def _short_names(names: list[str]) -> list[str]:
    """Table headers: paths relative to their common folder (URLs and mixed names unchanged)."""
    from ..output import common_folder

    folder = common_folder(names)
    return [os.path.relpath(n, folder) for n in names] if folder else list(names)
