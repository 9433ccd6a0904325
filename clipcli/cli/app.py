"""The Typer app every command registers on, and the one place errors become exit codes.

Commands live in sibling modules and are thin: parse options, call the library, write
records. A :class:`~clipcli.errors.ClipcliError` becomes ``error: <message>`` on stderr and
its ``exit_code``; a closed stdout (``| head``) ends the run quietly.
"""

import errno
import functools
import os
import sys
from enum import Enum
from typing import Annotated, Callable

import typer

from .. import __version__
from ..errors import ClipcliError

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


app = typer.Typer(
    name="clipcli",
    help="Batch image-text scoring with CLIP: encode, classify, similarity, models, download.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clipcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Batch image-text scoring with CLIP. Data goes to stdout, messages to stderr."""
    import warnings

    # Pillow warns about what it tolerates (corrupt EXIF, odd chunks): a file that cannot be
    # used is reported by its record; the rest would be stray multi-line noise on stderr.
    warnings.filterwarnings("ignore", module="PIL")


def error_line(message: str) -> None:
    from ..inputs import one_line

    typer.echo(f"error: {one_line(message)}", err=True)


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at devnull so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EPIPE}


def _os_error_line(error: OSError) -> str:
    from ..inputs import display

    if error.filename is None:
        return f"cannot write stdout: {error.strerror or error}"
    verb = "cannot write" if error.errno in _WRITE_ERRNOS else "cannot use"
    return f"{verb} {display(error.filename)}: {error.strerror or error}"


def _interrupt_on_sigterm() -> None:
    """SIGTERM ends a run like Ctrl-C: records already written stay, no half-written files,
    exit code 130."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def command(*args, **kwargs) -> Callable:
    """``app.command`` plus the error policy: typed errors -> one line and their exit code;
    Ctrl-C and SIGTERM -> exit code 130."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*a, **kw):
            _interrupt_on_sigterm()
            try:
                return fn(*a, **kw)
            except ClipcliError as error:
                error_line(str(error))
                raise typer.Exit(error.exit_code) from None
            except BrokenPipeError:
                _silence_stdout()
                raise typer.Exit(0) from None
            except OSError as error:  # writing stdout (a full disk, /dev/full), or a file the library did not name
                _silence_stdout()
                error_line(_os_error_line(error))
                raise typer.Exit(1) from None
            except (ImportError, MemoryError) as error:  # e.g. importing torch under a low `ulimit -v`
                error_line(f"cannot start: {type(error).__name__}: {error or 'out of memory'} "
                           "(is the memory limit, e.g. ulimit -v, too low?)")
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                error_line("interrupted")
                raise typer.Exit(130) from None

        return app.command(*args, **kwargs)(run)

    return register
