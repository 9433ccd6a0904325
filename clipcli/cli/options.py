"""The options and helpers the commands that run a model share: model, device, precision,
batching, decoding, output format; and loading a model with its notes on stderr.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from .render import download_feedback, say


class Format(str, Enum):
    """How records are written on stdout (shared by every command that writes records)."""

    jsonl = "jsonl"
    json = "json"
    csv = "csv"
    table = "table"


class Precision(str, Enum):
    """Number type the model computes in (shared by every command that runs one)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


DEFAULT_MODEL = "ViT-B/32"


# Options every command that runs a model shares.
ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="CLIPCLI_MODEL", show_envvar=True,
                                       help="A name from `clipcli models` (ViT-B/32, ViT-B-32/laion2b_s34b_b79k), "
                                            "hf-hub:ORG/REPO, a model folder or a checkpoint file.")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", show_default=False,
                                                help="Architecture of a --model file that does not say (a name from "
                                                     "`clipcli models`, e.g. ViT-H-14/laion2b_s32b_b79k).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, show_default=False,
                                                help="Images per model call. Default: 32 on CPU, 256 on CUDA.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=0, show_default=False,
                                                  help="Workers decoding images while the model runs (0: none). "
                                                       "Default: 4 threads on CPU; on CUDA, one per core up to 16.")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option("--precision", help="Default: fp16 on CUDA, fp32 on CPU.")]
FormatOpt = Annotated[Optional[Format], typer.Option("--format", "-f", help="Default: table on a terminal, jsonl in a pipe.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for the model (default: one per core). On a busy or shared machine, fewer threads can be much faster.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, skip messages or summary on stderr.")]
# clipcli.images.DEFAULT_MAX_PIXELS (Pillow's cap), spelled out so --help need not import images.
MAX_PIXELS = 89_478_485
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse larger images (decompression bombs).")]
TruncatedOpt = Annotated[bool, typer.Option("--allow-truncated", help="Score truncated files from what decodes.")]
PrivateOpt = Annotated[bool, typer.Option("--allow-private", help="Allow URLs on loopback/private/link-local addresses.")]
ExactOpt = Annotated[bool, typer.Option("--exact-decode", help="Decode JPEGs at full size, exactly as the reference does (slower; by default large JPEGs decode at the smallest scale keeping twice the model's resolution).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]


def run_options(batch_size: Optional[int], workers: Optional[int], max_pixels: int, allow_truncated: bool, allow_private: bool,
                exact_decode: bool):
    """The shared run options (:class:`clipcli.tasks.RunOptions`) from the shared flags."""
    from ..http import FetchOptions
    from ..images import DecodeOptions
    from ..tasks import RunOptions

    return RunOptions(batch_size=batch_size, workers=workers,
                      decode=DecodeOptions(max_pixels=max_pixels, allow_truncated=allow_truncated, exact=exact_decode),
                      fetch=FetchOptions(allow_private=allow_private))


def output_format(fmt: Optional[Format]) -> str:
    from ..output import default_format

    return fmt.value if fmt is not None else default_format(sys.stdout)


def load(model: str, arch: Optional[str], device: str, precision: Optional[Precision], threads: Optional[int],
         quiet: bool, towers: tuple[str, ...] = ("image", "text")):
    from ..pipeline import load_model, slow_precision_note

    loaded = load_model(model, device=device, precision=precision.value if precision else None, towers=towers,
                        threads=threads, arch=arch, feedback=download_feedback(quiet))
    notes = [*loaded.notes, slow_precision_note(loaded.device, loaded.dtype)]
    if not quiet:
        for note in filter(None, notes):
            say(f"note: {note}")
    return loaded
