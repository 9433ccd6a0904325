"""Errors the library raises. Each carries the exit code the CLI turns it into.

A message says what went wrong, never which command-line flag would fix it: the library is
used without the CLI too. An error may name the parameter at fault (``option``, by its
library name: ``"precision"``; its message then starts with the value: ``'fp8': choose ...``)
and a key for the remedy (``fix``: ``"overwrite"``, ``"resume"``, ``"fp32"``; see
``clipcli.messages.FIXES``); the CLI spells those as its flags, prints one line on stderr
and exits with ``error.exit_code``. No traceback is shown for any of these. A failed item's
:class:`Reason` carries a ``fix`` the same way, and an error made from a Reason keeps it.
"""

from __future__ import annotations


class ClipcliError(Exception):
    """Base class: a problem the user can act on, described in one line."""

    exit_code = 2

    def __init__(self, message: str = "", *, option: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.option = option
        self.fix = fix if fix is not None else getattr(message, "fix", None)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"{self.option} {self.message}" if self.option else self.message


class Reason(str):
    """Why one item failed (the text of its error record), with the key of a remedy, if any."""

    fix: str | None = None

    def __new__(cls, text: str, fix: str | None = None) -> "Reason":
        reason = super().__new__(cls, text)
        reason.fix = fix
        return reason


class CheckpointError(ClipcliError):
    """A checkpoint file cannot be read, or does not describe a CLIP model we can build."""


class UnsupportedModelError(CheckpointError):
    """A model of a family clipcli does not run (SigLIP, CoCa, EVA, ...): refused, never loaded wrongly."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need arbitrary code execution to load, and we refuse it."""


class ContextLengthError(ClipcliError, ValueError):
    """A text does not fit in the model's context (and truncation was not asked for)."""


class UnknownModelError(ClipcliError, ValueError):
    """A model name that is neither a released model nor an existing checkpoint path."""


class DownloadError(ClipcliError):
    """A file could not be downloaded or did not verify."""


class ChecksumError(DownloadError):
    """A downloaded or cached file's sha256 does not match the expected one."""


class OfflineError(DownloadError):
    """A model is not cached and cannot be downloaded (offline or unreachable)."""


class IndexDatabaseError(ClipcliError):
    """A search index cannot be used: not a clipcli index, a newer schema, read-only, missing."""


class NoVectorsError(IndexDatabaseError):
    """The index holds no vectors of the model a search asked for (or there is no index)."""


class InputError(ClipcliError):
    """An input (image, list file, caption file, URL) cannot be used."""


class ItemError(InputError):
    """One item cannot be used; ``str(error)`` is the reason put in its error record."""

    @property
    def reason(self) -> Reason:
        return Reason(str(self), self.fix)


class OutputError(ClipcliError):
    """An output cannot be written (a folder that is missing or not writable, a full disk)."""


class OutputExistsError(OutputError):
    """An output file exists and overwriting was not asked for."""


class BusyError(OutputError):
    """Another run holds the lock on an output (or download) this run would write."""


class WriteError(OutputError):
    """Writing an output failed part-way (a full disk, an I/O error): the run did not finish."""

    exit_code = 1
