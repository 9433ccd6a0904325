"""A crash-safe journal of an ``encode`` run, so that a resumed run can finish it.

The journal is a folder beside the output (``emb.npy.journal/``) holding three files:

- ``identity.json``: what the run belongs to (checkpoint sha256, a hash of the inputs list,
  normalize/dtype/truncate options, embedding width). A journal whose identity differs from
  the new run's is refused rather than mixed in.
- ``rows.bin``: embeddings appended as fixed-size rows (``dim`` values of ``dtype``, no header).
- ``records.jsonl``: one JSON record per finished input, in input order; an ``ok`` record
  carries ``index``, its row in ``rows.bin``.

A batch is appended rows first, then records, each fsynced. After a crash (even SIGKILL) the
files may end in a partial row or a partial line; :meth:`Journal.open` keeps only the longest
prefix of complete records whose rows are complete, and truncates both files to it. So a
resumed run starts exactly after the last batch that reached the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Sequence

import numpy as np

from .errors import ClipcliError
from .fsutil import atomic_write, fsync_folder, write_error

VERSION = 1


class JournalError(ClipcliError):
    """A journal exists where it should not, or belongs to a different run."""


def journal_path(output: str | os.PathLike) -> str:
    return os.fspath(output) + ".journal"


def inputs_hash(names: Sequence[str]) -> str:
    """sha256 of the inputs list, in order (names joined by NUL, undecodable bytes escaped)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


class Journal:
    """Progress of one run: the records and rows finished so far, appended batch by batch."""

    def __init__(self, path: str, identity: dict[str, Any]):
        self.path = path
        self.identity = identity
        self.dtype = np.dtype(identity["dtype"])
        self.dim = int(identity["dim"])
        self.row_bytes = self.dim * self.dtype.itemsize
        self.records: list[dict] = []
        self.rows = 0

    @property
    def _rows_file(self) -> str:
        return os.path.join(self.path, "rows.bin")

    @property
    def _records_file(self) -> str:
        return os.path.join(self.path, "records.jsonl")

    @classmethod
    def open(cls, path: str | os.PathLike, identity: dict[str, Any], *, resume: bool = False,
             overwrite: bool = False) -> "Journal":
        """Start a journal at ``path``, or with ``resume`` continue the one there.

        An existing journal without ``resume`` is an error unless ``overwrite`` (then it is
        discarded); one whose identity differs from ``identity`` is always refused.
        """
        path = os.fspath(path)
        identity = {"version": VERSION, **identity}
        journal = cls(path, identity)
        if os.path.lexists(path) and not os.path.isdir(path) and not overwrite:
            raise JournalError(f"{path} should be a journal folder but is not", fix="restart")
        if os.path.lexists(path):
            if not resume:
                if not overwrite:
                    raise JournalError(f"{path} holds an unfinished run", fix="resume")
                journal.remove()
            else:
                journal._load()
                return journal
        os.mkdir(path)
        journal._create_files()
        fsync_folder(os.path.dirname(os.path.abspath(path)))
        return journal

    def _load(self) -> None:
        try:
            with open(os.path.join(self.path, "identity.json"), encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as error:
            if any(os.path.getsize(f) for f in (self._rows_file, self._records_file) if os.path.isfile(f)):
                raise self._damaged(f"identity.json: {getattr(error, 'strerror', None) or error}") from None
            # Killed before identity.json was renamed in place: nothing was journaled yet.
            self.remove()
            os.mkdir(self.path)
            return self._create_files()
        if not isinstance(stored, dict):
            raise self._damaged("identity.json is not a JSON object")
        if stored != self.identity:
            differs = sorted(k for k in set(stored) | set(self.identity) if stored.get(k) != self.identity.get(k))
            raise JournalError(f"{self.path} belongs to a different run ({', '.join(differs)} differ)",
                               fix="restart")
        try:
            with open(self._records_file, "rb") as f:
                data = f.read()
            rows_available = os.path.getsize(self._rows_file) // self.row_bytes if self.row_bytes else 0
        except OSError as error:
            raise self._damaged(f"{os.path.basename(error.filename or '?')}: {error.strerror or error}") from None
        kept, kept_bytes, rows = [], 0, 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a line cut short by the crash
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict) or not isinstance(record.get("status"), str) or \
                    not ({"image", "text"} & set(record)):
                raise self._damaged(f"records.jsonl line {len(kept) + 1} is not a record")
            if record.get("index") is not None:
                if record["index"] != rows or rows >= rows_available:
                    break
                rows += 1
            kept.append(record)
            kept_bytes += len(line)
        with open(self._records_file, "r+b") as f:
            f.truncate(kept_bytes)
            os.fsync(f.fileno())
        with open(self._rows_file, "r+b") as f:
            f.truncate(rows * self.row_bytes)
            os.fsync(f.fileno())
        self.records, self.rows = kept, rows

    def _damaged(self, reason: str) -> "JournalError":
        return JournalError(f"the journal {self.path} is damaged ({reason})", fix="restart")

    def _create_files(self) -> None:
        open(self._rows_file, "wb").close()
        open(self._records_file, "wb").close()
        # identity.json last: a journal without it holds nothing yet (see _load)
        with atomic_write(os.path.join(self.path, "identity.json"), overwrite=True, text=True) as f:
            json.dump(self.identity, f, sort_keys=True)

    def append(self, records: Sequence[dict], rows: Sequence[np.ndarray]) -> None:
        """Add one batch durably: ``rows`` (in order) are the embeddings of the ``ok`` records,
        whose ``index`` must already count on from :attr:`rows`."""
        if rows:
            block = np.stack([np.asarray(row, dtype=self.dtype).reshape(self.dim) for row in rows])
            self._append(self._rows_file, block.tobytes())
        if records:
            text = "".join(json.dumps(record, ensure_ascii=True, sort_keys=False) + "\n" for record in records)
            self._append(self._records_file, text.encode("ascii"))
        self.records.extend(records)
        self.rows += len(rows)

    @staticmethod
    def _append(path: str, data: bytes) -> None:
        try:
            with open(path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:  # a full disk: what is journaled so far resumes; say which file
            raise write_error(error, path) from None

    def matrix(self) -> np.ndarray:
        """All journaled rows as a ``[rows, dim]`` array."""
        data = np.fromfile(self._rows_file, dtype=self.dtype, count=self.rows * self.dim)
        return data.reshape(self.rows, self.dim)

    def remove(self) -> None:
        if os.path.isdir(self.path) and not os.path.islink(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        elif os.path.lexists(self.path):
            os.unlink(self.path)
