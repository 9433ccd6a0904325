"""`clipcli models`, `clipcli download`, `clipcli convert`: the weights on this machine.

Thin: parse options, call :mod:`clipcli.download` (and the checkpoint readers for
``convert``), print data on stdout and messages on stderr. torch loads inside ``convert``
only, so ``clipcli --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ClipcliError
from ..messages import error_text
from .app import command
from .options import ArchOpt, CacheDirOpt, Format, QuietOpt, dtype_option
from .render import download_feedback, error_line, say


def _message(quiet: bool, text: str) -> None:
    if not quiet:
        say(text)


# --- clipcli models ------------------------------------------------------------------------

def _is_terminal() -> bool:
    return sys.stdout.isatty()


@command("models")
def models(
    fmt: Annotated[Optional[Format], typer.Option(
        "--format", "-f", help="Default: table on a terminal, jsonl in a pipe.")] = None,
    as_json: Annotated[bool, typer.Option("--json", hidden=True, help="The old spelling of --format json.")] = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """List every model clipcli knows by name, and what is cached.

    OpenAI's nine (ViT-B/32, ...); OpenCLIP's LAION, DataComp, CommonPool, DFN, MetaCLIP, YFCC
    and CC12M weights, SigLIP, SigLIP 2 and MetaCLIP 2 "worldwide" (ARCH/TAG, e.g.
    ViT-B-32/laion2b_s34b_b79k, ViT-B-16-SigLIP2/webli); the transformers repositories of SigLIP,
    SigLIP 2 and MetaCLIP 2 (hf-hub:google/siglip2-base-patch16-224, also typed without hf-hub:):
    family, score (softmax for CLIP; sigmoid, each label's own probability, for SigLIP),
    parameters, input resolution, embedding size, languages (en or multi), licence, published
    ImageNet zero-shot top-1 (%), and whether it is cached (clipcli's cache or the Hugging Face
    one; --format json gives the path and the text context length); then any file downloaded
    with `clipcli download URL`. A narrow terminal shows fewer columns rather than breaking names.
    Any hf-hub:ORG/REPO holding an OpenCLIP model, a transformers CLIP, SigLIP or MetaCLIP 2 loads too.

    Example: clipcli models -f json | jq -r '.[] | select(.cached) | .path'
    """
    from ..catalog import catalog
    from ..output import RecordWriter

    records = catalog(cache_dir)
    name = "json" if as_json else (fmt.value if fmt else ("table" if _is_terminal() else "jsonl"))
    if name != "table":
        with RecordWriter(sys.stdout, name) as writer:
            for record in records:
                writer.write(record)
        return
    from rich.console import Console
    from rich.table import Table

    from ..catalog import cells, fitting_columns

    rows = [cells(r) for r in records]
    console = Console(file=sys.stdout)
    columns = fitting_columns(rows, console.width)  # names whole: narrow terminals drop columns, not wrap names
    table = Table(header_style="bold")
    for column in columns:
        table.add_column(column, justify="right" if column in ("params", "res", "dim", "top-1") else "left",
                         no_wrap=column == "name", overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)


# --- clipcli download ----------------------------------------------------------------------

def _is_url(text: str) -> bool:
    return text.split("://", 1)[0].lower() in ("http", "https", "file") and "://" in text


def _url_file_name(url: str, name: Optional[str]) -> str:
    """The cache file name for a URL download: --name, else the URL's last path segment."""
    import urllib.parse

    from ..models.registry import MODELS

    chosen = name or urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not chosen or chosen.startswith(".") or "/" in chosen or os.sep in chosen or chosen.endswith(".json"):
        raise typer.BadParameter(f"{chosen!r} cannot be a file name in the cache; choose one with --name",
                                 param_hint="--name")
    for info in MODELS:
        if chosen in (info.file, f"{info.stem}.safetensors"):
            raise typer.BadParameter(f"{chosen} is where the released model {info.name} is cached; "
                                     "choose another --name", param_hint="--name")
    return chosen


@command("download")
def download(
    targets: Annotated[Optional[list[str]], typer.Argument(
        metavar="NAME|URL", show_default=False,
        help="Released model names (see `clipcli models`), or one URL together with --sha256.")] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Download all nine released models.")] = False,
    sha256: Annotated[Optional[str], typer.Option(
        "--sha256", metavar="HEX", show_default=False, help="Expected sha256 of the file at URL (required with a URL).")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", show_default=False, help="File name in the cache for a URL (default: the URL's last segment).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash cached files instead of only checking their size.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Download again even if a good copy is cached.")] = False,
    quiet: QuietOpt = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Download released models, or any checkpoint URL, into the cache, verified and resumable.

    Prints the path of each file on stdout. A file only ever reaches its place in the cache
    after its sha256 matches; an interrupted download resumes on the next run. Sources for a
    released model: OpenAI, then the Hugging Face hub, then $CLIPCLI_MIRROR.

    Examples: clipcli download ViT-B/32 RN50 --verify;
    clipcli download https://example.org/clip.pt --sha256 HEX --name my-clip.pt
    """
    from .. import cache
    from .. import download as dl
    from ..models.registry import MODELS
    from ..tasks import download_models

    targets = list(targets or [])
    if all_models:
        if targets:
            raise typer.BadParameter("give model names or --all, not both", param_hint="--all")
        targets = [info.name for info in MODELS]
    if not targets:
        raise typer.BadParameter("name a released model (see `clipcli models`), give a URL with --sha256, or use --all",
                                 param_hint="NAME|URL")
    feedback = download_feedback(quiet)
    urls = [t for t in targets if _is_url(t)]
    if urls:
        if len(targets) != 1:
            raise typer.BadParameter("download one URL at a time", param_hint="URL")
        if not sha256:
            raise typer.BadParameter("a URL needs --sha256 HEX, the sha256 the file must have", param_hint="--sha256")
        url = urls[0]
        dest = cache.resolve_cache_dir(cache_dir) / _url_file_name(url, name)
        path = dl.download_url(url, dest, sha256, name=name or dest.name, force=force, verify=verify,
                               feedback=feedback)
        typer.echo(str(path))
        return
    if sha256 or name:
        raise typer.BadParameter("--sha256 and --name go with a URL; released models are verified against the registry",
                                 param_hint="--sha256/--name")
    exit_code = 0
    for target, got in download_models(targets, cache_dir=cache_dir, force=force, verify=verify, feedback=feedback):
        if isinstance(got, ClipcliError):
            if len(targets) == 1:
                raise got
            text = error_text(got)  # the name once: added only where the message does not say it
            error_line(text if target in text else f"{target}: {text}")
            exit_code = max(exit_code, got.exit_code)
            continue
        for path in got:
            typer.echo(str(path))
    if exit_code:
        raise typer.Exit(exit_code)


# --- clipcli convert -----------------------------------------------------------------------

@command("convert")
def convert(
    src: Annotated[str, typer.Argument(
        metavar="SRC", show_default=False,
        help="A model name (see `clipcli models`), hf-hub:ORG/REPO, a model folder, or a checkpoint file "
             "(OpenAI TorchScript .pt, PyTorch state dict, safetensors).")],
    dst: Annotated[Path, typer.Argument(
        metavar="DST", dir_okay=False, show_default=False,
        help="The file to write: NAME.safetensors, or NAME.onnx for NAME.visual.onnx, NAME.text.onnx and NAME.json.")],
    dtype: Annotated[Optional[str], dtype_option(("float32", "float16", "bfloat16"),
                                                 "Store floating-point tensors as this type (default: as in SRC; "
                                                 "ONNX: float32 only).")] = None,
    arch: ArchOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST (and its other files) if it exists.")] = False,
    quiet: QuietOpt = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Convert a model to one safetensors file with OpenAI's key names and its full config, or to ONNX.

    Any model clipcli reads (OpenAI, OpenCLIP, transformers CLIPModel, SigLIP) becomes one file that
    loads with `clipcli.load(DST)` (and `--model DST`), gives the same outputs, and carries
    its architecture and preprocessing in its metadata. DST is written atomically.

    DST ending in .onnx exports the two towers for ONNX runtimes (opset 17, float32, needs
    pip install "clipcli[onnx]"): NAME.visual.onnx (input `pixels` (N, 3, S, S) float32, preprocessed
    -> `image_embeds` (N, D)), NAME.text.onnx (input `input_ids` (N, context) int64, padded as the
    model's tokenizer pads -> `text_embeds` (N, D)), both outputs unit vectors with a dynamic batch N,
    and NAME.json with the image size, mean/std, context length, tokenizer and logit scale/bias.
    A tower over 1.5 GiB keeps its weights in NAME.visual.onnx.data (or .text) beside its graph.
    Prints the paths written on stdout.

    Examples: clipcli convert ViT-B/32 vit-b-32.safetensors --dtype float16;
    clipcli convert ViT-B-16-SigLIP2/webli siglip2.onnx
    """
    if dst.suffix not in (".safetensors", ".onnx"):
        raise typer.BadParameter(f"{dst} must end in .safetensors or .onnx", param_hint="DST")
    from ..tasks import convert_checkpoint
    from ..transfer import format_size

    done = convert_checkpoint(src, dst, dtype=dtype, arch=arch, cache_dir=cache_dir,
                              overwrite=overwrite, feedback=download_feedback(quiet))
    if done.note:
        _message(quiet, f"note: {done.note}")
    onnx = dst.suffix == ".onnx"
    if onnx:
        from ..models.onnx_export import OPSET

        what = f"exported {src} -> {', '.join(path.name for path in done.files)} (opset {OPSET}, "
    else:
        what = f"converted {src} -> {dst} ({done.tensors} tensors, "
    _message(quiet, what + f"{'/'.join(done.dtypes)}, {format_size(done.size)})"
             + (f", its tokenizer beside it ({', '.join(done.tokenizer_files)})" if done.tokenizer_files else ""))
    for path in done.files if onnx else [dst]:
        typer.echo(str(path))
