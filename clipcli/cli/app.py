"""The Typer app every command registers on, and the one place errors become exit codes.

Commands live in sibling modules and are thin: parse options, call the library, write
records. A :class:`~clipcli.errors.ClipcliError` becomes ``error: <message>`` on stderr and
its ``exit_code``, and so does a usage error (an unknown option, a missing argument: one
line and exit code 2, not Typer's box); a closed stdout (``| head``) ends the run quietly.
"""

import contextlib
import errno
import functools
import os
import sys
from typing import Annotated, Callable, NoReturn

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .. import __version__
from ..errors import ClipcliError
from ..fsutil import named
from ..messages import error_text
from .render import error_line

# Typer's vendored Click: its usage errors derive from this (typer exports BadParameter only).
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error(error: Exception, ctx) -> typer.Exit:
    """A usage error as one line (``error: No such option: --bogus; see clipcli encode --help``)."""
    where = getattr(error, "ctx", None) or ctx
    hint = f"; see {where.command_path} --help" if where is not None else ""
    error_line(f"{error.format_message().rstrip('.')}{hint}")
    return typer.Exit(error.exit_code)


# Parameters that name files or folders: an empty or blank value (a script's unset "$DIR") is a
# usage error, never the current folder (an index update would drop every row under it).
PATH_PARAMETERS = frozenset({"inputs", "output", "out", "db", "within", "labels_file", "text_file", "cache_dir",
                             "model", "train_data", "val_data", "zeroshot_dir", "init", "src", "dst"})


class _Command(TyperCommand):
    """A command whose usage line reads ``INPUTS...`` (Typer writes ``{INPUTS}...``), whose
    usage errors are one line, and whose paths are never empty."""

    def parse_args(self, ctx, args):
        rest = super().parse_args(ctx, args)
        for param in self.get_params(ctx):
            value = ctx.params.get(param.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if param.name in PATH_PARAMETERS:
                name = param.opts[0] if param.param_type_name == "option" else (param.metavar or param.name.upper())
                try:
                    for text in values:
                        if isinstance(text, str):
                            named(text, name)
                except ClipcliError as error:
                    error_line(error_text(error))
                    raise typer.Exit(error.exit_code) from None
        return rest

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or param.name.upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _ClickException as error:
            raise _usage_error(error, parent) from None


class _Group(TyperGroup):
    """The top level: an unknown command is one line too."""

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except _ClickException as error:
            raise _usage_error(error, ctx) from None


app = typer.Typer(
    name="clipcli",
    cls=_Group,
    help="Batch image-text scoring with CLIP: classify, similarity, encode, index, search, duplicates, serve, "
         "train, models, download, convert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
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


class ClosedStreamError(OSError):
    """Writing to a standard stream that was closed before the process started."""


class _ClosedStream:
    """Stands in for a standard stream closed before the process started (``>&-``), where
    Python leaves ``None``: writing to it is an ``OSError`` the error policy reports."""

    def __init__(self, name: str):
        self.name = name
        self.buffer = self

    def write(self, data) -> int:
        raise ClosedStreamError(errno.EBADF, f"{self.name} is closed")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation(f"{self.name} is closed")


def mend_streams() -> None:
    """A closed stdout takes writes as errors (one line on stderr, exit code 1; commands that
    write files work); a closed stdin reads as empty; a closed stderr swallows messages (the
    exit code still tells). Text that the streams' encoding cannot carry (``PYTHONIOENCODING=
    ascii``) is written escaped (``\\xe9``), not a ``UnicodeEncodeError``."""
    import io

    if sys.stdout is None:
        sys.stdout = _ClosedStream("stdout")
    if sys.stdin is None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(b""))
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and stream.encoding.lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at devnull so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _writing_stdout_failed(error: OSError) -> bool:
    """Whether ``error`` is stdout refusing data (a full disk, /dev/full, an I/O error):
    the library names every file it writes, so a nameless write error is stdout's."""
    from ..fsutil import WRITE_ERRNOS

    return error.filename is None and (error.errno in WRITE_ERRNOS or isinstance(error, ClosedStreamError))


@contextlib.contextmanager
def flush_at_exit():
    """Flush stdout before the interpreter does, where a failure (``--help > /dev/full``)
    would be an "Exception ignored" traceback: one line and exit code 1 instead."""
    failed = None
    try:
        yield
    except OSError as error:  # writing --help or --version, before any command's error policy
        if not _writing_stdout_failed(error):
            raise
        failed = error
    finally:
        try:
            sys.stdout.flush()
        except OSError as error:
            failed = error
        if failed is not None:
            _silence_stdout()
            error_line(f"cannot write stdout: {failed.strerror or failed}")
            raise SystemExit(1) from None


@contextlib.contextmanager
def only_command(argv: list[str]):
    """While inside, the app holds only the command ``argv`` runs (``clipcli classify ...``),
    so that Typer builds its parameters alone, not those of all eleven (30 ms of a cold
    start). Anything else (``--help``, an unknown or misspelt command) sees them all."""
    name = argv[1] if len(argv) > 1 else None
    every = list(app.registered_commands)
    chosen = [info for info in every if info.name == name]
    if len(chosen) == 1:
        app.registered_commands[:] = chosen
    try:
        yield
    finally:
        app.registered_commands[:] = every


def exit_now(done: SystemExit) -> NoReturn:
    """End the process with ``done``'s status without tearing the interpreter down.

    After ``import torch``, Python's finalisation (every module's teardown, then libtorch's
    static destructors) takes 0.4 s (more on a busy machine) and raises the peak RSS by 125 MB
    (measured: ``python -c "import torch"`` peaks at 632 MB, 507 MB when it ends with
    ``os._exit``): a one-image ``classify`` would spend more on exiting than on its model. The atexit handlers
    still run (logging, multiprocessing, temporary folders, coverage) and the standard streams
    are flushed; files a command writes are closed by then. The normal exit is kept when
    something relies on it: a status that is not a number (Python prints it), a profiler or
    tracer (``python -m cProfile`` reports after ``main`` returns), or a thread that Python
    would wait for."""
    import atexit
    import threading

    code = 0 if done.code is None else done.code
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    waited_for = [t for t in threading.enumerate()
                  if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not isinstance(code, int) or sys.gettrace() or sys.getprofile() or waited_for or run_handlers is None:
        raise done
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: already reported
            stream.flush()
    os._exit(code & 0xFF)


def _run_and_flush(fn: Callable, a, kw):
    """``fn`` with stdout flushed inside the error policy (not in the interpreter's final flush,
    where a full disk would be an "Exception ignored" traceback)."""
    try:
        result = fn(*a, **kw)
    except typer.Exit:
        sys.stdout.flush()
        raise
    sys.stdout.flush()
    return result


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
            mend_streams()
            _interrupt_on_sigterm()
            try:
                return _run_and_flush(fn, a, kw)
            except ClipcliError as error:
                error_line(error_text(error))
                raise typer.Exit(error.exit_code) from None
            except _ClickException as error:  # typer.BadParameter raised by a command itself
                raise _usage_error(error, None) from None
            except BrokenPipeError:
                _silence_stdout()
                raise typer.Exit(0) from None
            except OSError as error:
                if _writing_stdout_failed(error):
                    _silence_stdout()
                    error_line(f"cannot write stdout: {error.strerror or error}")
                    raise typer.Exit(1) from None
                from ..display import display

                where = f"{display(str(error.filename))}: " if error.filename else ""
                error_line(f"{where}{error.strerror or error}")  # e.g. a library failing to map its memory
                raise typer.Exit(1) from None
            except ImportError as error:  # e.g. importing torch under a low `ulimit -v`
                error_line(f"cannot start: {error} (a missing package, or too little memory allowed: ulimit -v?)")
                raise typer.Exit(2) from None
            except MemoryError:
                error_line("out of memory (try a smaller --batch-size or model, or allow more memory)")
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                error_line("interrupted")
                raise typer.Exit(130) from None

        return app.command(*args, cls=_Command, **kwargs)(run)

    return register
