"""The options and helpers the commands that run a model share: model, device, precision,
batching, decoding, output format; and loading a model with its notes on stderr.
"""

from __future__ import annotations

import math
import os
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from ..messages import hinted
from .render import download_feedback, say


class Format(str, Enum):
    """How records are written on stdout (shared by every command that writes records)."""

    jsonl = "jsonl"
    json = "json"
    csv = "csv"
    table = "table"


# One vocabulary for number types: --precision (what the model computes in) and --dtype (what
# is stored) both take either spelling.
NUMBER_TYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def number_type(value: str) -> str:
    """``fp16``/``float16`` (any case) -> ``float16``; anything else is a usage error."""
    found = NUMBER_TYPES.get(value.strip().lower())
    if found is None:
        raise typer.BadParameter(f"{value!r}: choose fp32, fp16 or bf16 (or float32, float16, bfloat16)")
    return found


def fixed_precision_name(value: str) -> str:
    """``float16``/``fp16`` -> ``fp16``: the precision names of :mod:`clipcli.precision`."""
    return SHORT[number_type(value)]


def precision_name(value: str) -> str:
    """A precision name, or ``auto`` (see :func:`clipcli.precision.resolve_dtype`)."""
    return "auto" if value.strip().lower() == "auto" else fixed_precision_name(value)


def dtype_option(choices: tuple[str, ...], help: str):
    """A ``--dtype`` option taking ``choices`` (canonical names) in either spelling."""

    def parse(value: str) -> str:
        found = number_type(value)
        if found not in choices:
            raise typer.BadParameter(f"{value!r}: this output stores {' or '.join(choices)}")
        return found

    return typer.Option("--dtype", parser=parse, metavar="|".join(choices), show_default=False, help=help)


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
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-j", min=0, show_default=False,
                                                  help="Workers decoding images while the model runs (0: none). "
                                                       "Default: 4 threads on CPU; on CUDA, one per core up to 16.")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", parser=precision_name,
                                                    metavar="fp32|fp16|bf16|auto", show_default=False,
                                                    help="Number type the model computes in (float32, float16, "
                                                         "bfloat16 also accepted). Default: fp16 on CUDA, fp32 on "
                                                         "CPU (equal to the reference). auto: fp16 on CUDA, bf16 on a "
                                                         "CPU with AVX512-BF16 or AMX (about 3x faster, cosine "
                                                         "about 0.9999 to fp32), else fp32.")]
FormatOpt = Annotated[Optional[Format], typer.Option("--format", "-f", help="Default: table on a terminal, jsonl in a pipe.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for the model (default: one per core). On a busy or shared machine, fewer threads can be much faster.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, skip messages or summary on stderr.")]
# clipcli.images.DEFAULT_MAX_PIXELS (Pillow's cap), spelled out so --help need not import images.
MAX_PIXELS = 89_478_485
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse larger images (decompression bombs).")]
TruncatedOpt = Annotated[bool, typer.Option("--allow-truncated", help="Score truncated files from what decodes.")]
PrivateOpt = Annotated[bool, typer.Option("--allow-private", help="Allow URLs on loopback/private/link-local addresses.")]
ExactOpt = Annotated[bool, typer.Option("--exact-decode", help="Decode exactly as the reference does: JPEGs at full size (by default large ones decode at the smallest scale keeping twice the model's resolution), and palette/transparent images resized in their own mode and converted to RGB after the crop (by default alpha is composited on white first). Slower.")]
# clipcli.images.DECODE_TIMEOUT, spelled out likewise.
DECODE_TIMEOUT = 60.0
DecodeTimeoutOpt = Annotated[float, typer.Option("--decode-timeout", min=0.001, metavar="SECONDS",
                                                 help="A file whose decoding takes longer fails (a stuck decoder).")]
# clipcli.items.VIDEO_INTERVAL, spelled out likewise.
VIDEO_INTERVAL = 5.0
VideoIntervalOpt = Annotated[float, typer.Option("--video-interval", min=0.0, metavar="SECONDS",
                                                 help="Read a video's first frame, then one every SECONDS (0: the "
                                                      "first only); each frame is an item named VIDEO#t=SECONDS.")]
IndexVideoIntervalOpt = Annotated[Optional[float], typer.Option(
    "--video-interval", min=0.0, metavar="SECONDS", show_default=False,
    help="Read a video's first frame, then one every SECONDS (0: the first only), each frame a row "
         "VIDEO#t=SECONDS. Default: as each video was indexed before, else 5.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
CacheDirOpt = Annotated[Optional[str], typer.Option(
    "--cache-dir", show_default=False,
    help="Cache folder for OpenAI's weights and downloads. Default: $CLIPCLI_CACHE_DIR, else "
         "$XDG_CACHE_HOME/clipcli, else ~/.cache/clipcli.")]
TextOpt = Annotated[list[str], typer.Option("--text", help="A caption (repeatable).")]
TextFileOpt = Annotated[list[str], typer.Option("--text-file", help="Captions, one per line (repeatable; - for stdin).")]


def run_options(batch_size: Optional[int], workers: Optional[int], max_pixels: int, allow_truncated: bool, allow_private: bool,
                exact_decode: bool, video_interval: Optional[float] = None, decode_timeout: float = DECODE_TIMEOUT):
    """The shared run options (:class:`clipcli.tasks.RunOptions`) from the shared flags."""
    from ..http import FetchOptions
    from ..images import DecodeOptions
    from ..tasks import RunOptions

    return RunOptions(batch_size=batch_size, workers=workers,
                      decode=DecodeOptions(max_pixels=max_pixels, allow_truncated=allow_truncated, exact=exact_decode,
                                          timeout=decode_timeout if math.isfinite(decode_timeout) else None),
                      fetch=FetchOptions(allow_private=allow_private), video_interval=video_interval)


def output_format(fmt: Optional[Format]) -> str:
    from ..output import default_format

    return fmt.value if fmt is not None else default_format(sys.stdout)


def read_captions(text: list[str], text_file: list[str], quiet: bool, old_file_flag: bool = False) -> list[str]:
    """The captions of ``--text`` (each one caption) and ``--text-file`` (one per line), in that
    order. With ``old_file_flag`` (``encode``, for one release), a ``--text`` that names an
    existing file is read as a file, as ``encode --text FILE`` did, with a note to use
    ``--text-file``."""
    found: list[str] = []
    for value in text:
        if old_file_flag and os.path.isfile(value):
            if not quiet:
                say(f"note: reading captions from {value}: --text FILE is deprecated, use --text-file {value} "
                    "(--text takes a caption)")
            found += _caption_file(value)
        else:
            found.append(value)
    for name in text_file:
        found += _caption_file(name)
    return found


def _caption_file(name: str) -> list[str]:
    from ..errors import InputError
    from ..items import read_lines

    lines = read_lines(name, comments=False)  # data: a caption may start with "#"
    if not lines:
        raise InputError(f"no captions in {name}")
    return lines


def load(model: str, arch: Optional[str], device: str, precision: Optional[str], threads: Optional[int],
         quiet: bool, towers: tuple[str, ...] = ("image", "text"), cache_dir: Optional[str] = None):
    from ..pipeline import load_model
    from ..precision import slow_precision_note

    loaded = load_model(model, device=device, precision=precision, towers=towers, threads=threads, arch=arch,
                        cache_dir=cache_dir, feedback=download_feedback(quiet))
    notes = [*loaded.notes, slow_precision_note(loaded.device, loaded.dtype)]
    if not quiet:
        for note in filter(None, notes):
            say(f"note: {hinted(note)}")
    return loaded
