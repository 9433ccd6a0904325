"""Everything the CLI draws on stderr: run progress and summaries, download progress, error lines.

The library reports through callbacks (:class:`~clipcli.feedback.Feedback`, ``on_result``)
and raises typed errors that say what went wrong; this module renders them, and
errors are worded by :mod:`clipcli.messages`.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from ..display import display, one_line
from ..feedback import SILENT, Feedback
from ..messages import hinted


def _isatty(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def say(text: str) -> None:
    print(one_line(text), file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    say(f"error: {message}")


class ByteMeter:
    """A rich progress bar of one transfer on stderr: bytes, rate, time left."""

    def __init__(self, label: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self._task = self._bar.add_task(label, total=None)
        self._bar.start()

    def update(self, done: int, total: int | None) -> None:
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        self._bar.stop()


class StderrLines:
    """Lines on stderr and, on a terminal, one status line rewritten in place until the next line."""

    def __init__(self):
        self._status_open = False

    def log(self, text: str) -> None:
        self.close()
        say(text)

    def status(self, text: str) -> None:
        sys.stderr.write("\r" + one_line(text))
        sys.stderr.flush()
        self._status_open = True

    def close(self) -> None:
        if self._status_open:
            sys.stderr.write("\n")
            self._status_open = False

    def feedback(self, quiet: bool) -> Feedback:
        if quiet:
            return SILENT
        terminal = _isatty(sys.stderr)
        return Feedback(log=self.log, meter=ByteMeter if terminal else None, status=self.status if terminal else None)


def download_feedback(quiet: bool) -> Feedback:
    """Download news as lines on stderr, and a byte meter on a terminal; nothing when ``quiet``."""
    return StderrLines().feedback(quiet)


class Reporter:
    """Everything a run says on stderr: a progress bar (only on a terminal), one
    ``skipping NAME: reason`` line per failed item, and a final summary.

    ``quiet`` silences all three; the records still carry every error.
    """

    def __init__(self, total: int, noun: str = "images", quiet: bool = False, stream: IO[str] | None = None,
                 prefix: str = "", bar: bool = True):
        self.total, self.noun, self.quiet, self.prefix, self.bar = total, noun, quiet, prefix, bar
        self.stream = stream if stream is not None else sys.stderr
        self.ok = self.failed = 0
        self.started = time.monotonic()
        self._progress = None
        self._task = None

    def __enter__(self) -> "Reporter":
        if not self.quiet and self.bar and _isatty(self.stream) and self.total > 1:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.noun, total=self.total, rate="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def message(self, text: str) -> None:
        if self.quiet:
            return
        text = self.prefix + one_line(text)
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self, name: str, error: str | None = None) -> None:
        """One item finished, successfully or with ``error``."""
        if error is None:
            self.ok += 1
        else:
            self.failed += 1
            self.message(f"skipping {display(name)}: {hinted(error)}")
        if self._progress is not None:
            count = self.ok + self.failed
            self._progress.update(self._task, completed=count, rate=f"{count / self._elapsed():.1f} {self.noun}/s")

    def _elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def summary(self, verb: str) -> None:
        """``encoded 6 images in 1.2 s (5.0/s); 1 of 6 failed``."""
        count = self.ok + self.failed
        noun = self.noun.removesuffix("s") if self.ok == 1 else self.noun
        text = f"{verb} {self.ok} {noun} in {self._elapsed():.1f} s ({count / self._elapsed():.1f}/s)"
        if self.failed:
            text += f"; {self.failed} of {count} failed"
        self.message(text)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

