"""How the library tells its caller what it is doing, without printing: callbacks.

A :class:`Feedback` carries ``log`` (one line of news: a file resumed, a retry, a cached
copy used, a skipped image), ``meter`` (opens a :class:`Meter` for one transfer, or None for
no progress) and ``status`` (a line that replaces the previous one, e.g. a training step on
a terminal; None: progress goes to ``log`` at its own pace).
The default, :data:`SILENT`, drops them all; the CLI passes ones that draw on stderr
(:mod:`clipcli.cli.render`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

Log = Callable[[str], None]


class Meter(Protocol):
    """Progress of one transfer: bytes done of ``total`` (None when unknown)."""

    def update(self, done: int, total: int | None) -> None: ...

    def close(self) -> None: ...


class _NoMeter:
    def update(self, done: int, total: int | None) -> None:
        pass

    def close(self) -> None:
        pass


def _ignore(message: str) -> None:
    pass


@dataclass(frozen=True)
class Feedback:
    log: Log = _ignore
    meter: Callable[[str], Meter] | None = None  # label -> a meter for that transfer
    status: Log | None = None

    @property
    def shows_progress(self) -> bool:
        return self.meter is not None

    def open_meter(self, label: str) -> Meter:
        return self.meter(label) if self.meter is not None else _NoMeter()


SILENT = Feedback()
