"""A search index of images: one SQLite file, updated incrementally, safe to interrupt.

Tables (schema version in ``PRAGMA user_version``, migrations in :data:`MIGRATIONS`):

- ``files``: one row per image (and per video and video frame: :mod:`clipcli.index_videos`),
  by absolute path as the filesystem's bytes, with the size and modification time it was seen
  at, its content's sha256, and the reason it failed (retried only once it changes).
- ``models``: one row per model identity (weights sha256 + architecture + preprocessing),
  found before loading by its *keys* (``model_keys``: weights sha256 + the hints that
  shapes cannot give; two keys may name one identity).
- ``vectors``: one float32 embedding per (model, content sha256). A renamed, moved or
  duplicated file reuses its content's vector; no vector belongs to two models.

:func:`clipcli.indexing.update` brings the rows up to date, committing each batch in its own
transaction; :func:`clipcli.vectors.search` scores a query. Both build on this module, which
imports neither.

Searching multiplies a query vector with all of a model's vectors (exact search). The
vectors are kept contiguous in a derived cache beside the database (``NAME.vectors/``,
float32 ``.npy`` files memory-mapped, rebuilt when the model's generation changes or the
cache disagrees with the database), so a search over a million vectors reads no SQLite rows
but those of its results.

SQLite's errors never leave this module's boundary as tracebacks: :class:`Index` turns them
into one line naming the index, the cause and the fix (a damaged file: rebuild it; a full
disk: nothing was half-written, each batch being one transaction).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import BusyError, IndexDatabaseError, NoVectorsError, OutputError, WriteError
from .fsutil import named

APPLICATION_ID = 0x434C4950  # "CLIP": this SQLite file is a clipcli index
MIGRATIONS = [  # (version, statements): a database at version n runs every later entry once
    (1, """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE files (path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                            sha256 TEXT, error TEXT, indexed REAL NOT NULL);
        CREATE INDEX files_sha256 ON files (sha256);
        CREATE TABLE models (id INTEGER PRIMARY KEY, identity TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                             dim INTEGER NOT NULL, generation INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE model_keys (key TEXT PRIMARY KEY, model_id INTEGER NOT NULL REFERENCES models (id));
        CREATE TABLE vectors (id INTEGER PRIMARY KEY, model_id INTEGER NOT NULL REFERENCES models (id),
                              sha256 TEXT NOT NULL, vector BLOB NOT NULL, UNIQUE (model_id, sha256));
    """),
    (2, """
        CREATE INDEX vectors_sha256 ON vectors (sha256);   -- collecting orphans by content
        CREATE INDEX vectors_model ON vectors (model_id);  -- a model's rows in id order, no sort
    """),
    (3, """
        ALTER TABLE files ADD COLUMN width INTEGER;        -- what clipcli.metadata reads: filled when a
        ALTER TABLE files ADD COLUMN height INTEGER;       -- file is hashed, and for older rows on the next
        ALTER TABLE files ADD COLUMN taken REAL;           -- update (Unix seconds, UTC)
        ALTER TABLE files ADD COLUMN taken_source TEXT;
        ALTER TABLE files ADD COLUMN camera TEXT;
        ALTER TABLE files ADD COLUMN gps INTEGER;
        CREATE INDEX files_taken ON files (taken);
        -- files refused before HEIC/AVIF/RAW were read: seen again (as changed) by the next update
        UPDATE files SET size = -1 WHERE error LIKE 'unsupported format: %';
    """),
    (4, """
        ALTER TABLE files ADD COLUMN interval REAL;  -- a video's row: the seconds between the frames read
        -- videos named in lists were refused as no image before they were read: seen again by the next update
        UPDATE files SET size = -1 WHERE error IS NOT NULL AND (lower(CAST(path AS TEXT)) LIKE '%.mp4' OR lower(CAST(path AS TEXT)) LIKE '%.m4v' OR lower(CAST(path AS TEXT)) LIKE '%.mov' OR lower(CAST(path AS TEXT)) LIKE '%.webm' OR lower(CAST(path AS TEXT)) LIKE '%.mkv' OR lower(CAST(path AS TEXT)) LIKE '%.avi' OR lower(CAST(path AS TEXT)) LIKE '%.3gp' OR lower(CAST(path AS TEXT)) LIKE '%.mts' OR lower(CAST(path AS TEXT)) LIKE '%.m2ts' OR lower(CAST(path AS TEXT)) LIKE '%.mpg' OR lower(CAST(path AS TEXT)) LIKE '%.mpeg' OR lower(CAST(path AS TEXT)) LIKE '%.wmv' OR lower(CAST(path AS TEXT)) LIKE '%.ogv')
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
TABLES = {"meta", "files", "models", "model_keys", "vectors"}
# A model's generation grows in every transaction that changes its vectors, by a random step:
# an index restored from a backup and changed again never reaches a generation its vector
# cache (clipcli.vectors) was built at before the restore.
NEXT_GENERATION = "generation + 1 + abs(random() % 1000000)"
REBUILD = "to rebuild it, move it away and index the folders again"
_MAGIC = b"SQLite format 3\x00"
# SQLite's primary result codes (error.sqlite_errorcode & 0xFF)
_PERM, _BUSY, _LOCKED, _NOMEM, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN = 3, 5, 6, 7, 8, 10, 11, 13, 14
_CONSTRAINT, _MISMATCH, _NOTADB, _READONLY_DBMOVED = 19, 20, 26, 1032


def default_path() -> Path:
    """``$CLIPCLI_INDEX``, else ``$XDG_DATA_HOME/clipcli/index.sqlite3`` (``~/.local/share/...``)."""
    if os.environ.get("CLIPCLI_INDEX"):
        return Path(os.environ["CLIPCLI_INDEX"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser() / "clipcli" / "index.sqlite3"


def path_key(path: str | os.PathLike) -> bytes:
    """How a path is stored: absolute, as the filesystem's bytes."""
    return os.fsencode(os.path.abspath(path))


def key_range(folder: bytes) -> tuple[bytes, bytes]:
    """The range of keys strictly under ``folder`` (``folder/`` <= key < ``folder0``, "0"
    being the byte after "/"), for range queries on the ``files`` primary key."""
    folder = folder.rstrip(b"/") + b"/"
    return folder, folder[:-1] + b"0"  # "0" is the byte after "/"


def _header(path: Path) -> bytes:
    """The first 100 bytes of a file (an SQLite database's header), or none."""
    try:
        with open(path, "rb") as stream:
            return stream.read(100)
    except OSError:
        return b""


def _write_limits(path: Path) -> tuple[str, str]:
    """What stops writes beside ``path`` and what to do, if it can be told: a full disk, a
    file size limit (``ulimit -f``)."""
    found, fix = "", "once it can be written"
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            found, fix = f"; files are limited to {limit} bytes here (ulimit -f)", "with a higher limit"
    except (ImportError, OSError, ValueError):
        pass
    try:
        space = os.statvfs(path.parent)
        if space.f_bavail * space.f_frsize < 1 << 20:
            found, fix = found + "; the disk is full", "once there is room"
    except OSError:
        pass
    return found, fix


@dataclass
class Hit:
    """One search result: its rank, the file, its cosine ``score`` and, for a model with
    calibrated probabilities (a logit bias: SigLIP), the sigmoid probability ``prob``."""

    rank: int
    path: bytes
    score: float
    prob: float | None = None
    taken: float | None = None  # capture time, Unix seconds UTC (clipcli.metadata)
    taken_source: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def name(self) -> str:
        return os.fsdecode(self.path)


class Index:
    """An open index database. ``Index(path)`` creates it when missing (``readonly``: never).

    SQLite's errors stop here: opening, reading (``with index.guard():`` around the callers'
    queries) and writing (:meth:`_write`) turn them into one-line errors naming the index,
    the cause and the fix (:meth:`_error`)."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False, timeout: float = 60.0):
        self.path = Path(named(path, "the index path")).expanduser() if path is not None else default_path()
        self._opened = False  # a write failing before the index is open is no run failing part-way
        self._timeout = timeout
        exists = self.path.exists()
        if not exists and readonly:
            raise NoVectorsError(f"no index at {self.path}")
        if exists and not self.path.is_file():
            raise IndexDatabaseError(f"{self.path} is not a file")
        if exists and not os.access(self.path, os.R_OK):
            raise IndexDatabaseError(f"cannot read {self.path}: permission denied")
        self.readonly = readonly or (exists and not os.access(self.path, os.W_OK)) or (
            exists and not os.access(self.path.parent, os.W_OK))
        if exists:
            self._check_header()
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OutputError(f"cannot create the folder of {self.path}: {error.strerror or error}") from None
            if not os.access(self.path.parent, os.W_OK):
                raise OutputError(f"cannot create the index {self.path}: its folder is not writable")
        self.db = self._connect(timeout)
        try:
            self._check_and_migrate()
        except BaseException:
            self.db.close()
            raise
        self._opened = True

    # ----------------------------------------------------------------- errors

    @contextlib.contextmanager
    def guard(self, writing: bool = False) -> Iterator["Index"]:
        """SQLite's errors inside as one-line clipcli errors naming this index (:meth:`_error`)."""
        try:
            yield self
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.ProgrammingError):  # a misuse of the connection: a bug
                raise
            raise self._error(error, writing) from None

    def _error(self, error: sqlite3.DatabaseError, writing: bool) -> Exception:
        """``error`` as what the user can act on: damaged (rebuild it), a full disk or a file
        size limit while writing (nothing half-written: each batch is one transaction), busy,
        read-only, unreadable."""
        code, text = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF, str(error)
        if code == _NOMEM:
            return MemoryError(text)
        if code in (_BUSY, _LOCKED):
            return BusyError(f"{self.path} is locked by another program ({text}); try again once it is done")
        if (getattr(error, "sqlite_errorcode", None) or 0) == _READONLY_DBMOVED:
            return IndexDatabaseError(f"{self.path} was moved or deleted while in use ({text}); nothing more "
                                      "was written to it")
        if code == _READONLY:
            return IndexDatabaseError(f"cannot write {self.path} ({text}); searching works, updating does not")
        if writing and code in (_FULL, _IOERR):
            failed = WriteError if self._opened else OutputError  # part-way: the run did not finish
            found, fix = _write_limits(self.path)
            return failed(f"cannot write {self.path}: {text}{found}; nothing was half-written (what was "
                          f"committed before is kept): run again {fix}")
        if code in (_FULL, _IOERR, _CANTOPEN, _PERM):
            return IndexDatabaseError(f"cannot read {self.path}: {text}{_write_limits(self.path)[0]}")
        if code in (_CORRUPT, _NOTADB, _CONSTRAINT, _MISMATCH) or re.match(r"no such (table|column|index)", text):
            if self._opened or _header(self.path)[68:72] == APPLICATION_ID.to_bytes(4, "big"):
                return IndexDatabaseError(f"{self.path} is damaged ({text}); {REBUILD}")
            return IndexDatabaseError(f"{self.path} is a damaged SQLite database ({text}), not known to be a "
                                      "clipcli index; nothing was changed")
        return IndexDatabaseError(f"cannot use {self.path}: {text}")

    # ----------------------------------------------------------------- opening

    def _check_header(self) -> None:
        """Refuse a file that is no SQLite database before SQLite touches it."""
        head = _header(self.path)
        if head and not head.startswith(_MAGIC):
            if head[68:72] == APPLICATION_ID.to_bytes(4, "big"):
                raise IndexDatabaseError(f"{self.path} is damaged (its SQLite header is overwritten); {REBUILD}")
            raise IndexDatabaseError(f"{self.path} is not a clipcli index (not an SQLite database); "
                                     "nothing was changed")

    def _connect(self, timeout: float) -> sqlite3.Connection:
        with self.guard():
            if self.readonly:
                db = self._connect_readonly(timeout)
            else:
                db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            db.execute("PRAGMA foreign_keys=ON")
            return db

    def _connect_readonly(self, timeout: float) -> sqlite3.Connection:
        """Read-only. Where SQLite cannot share the file (a folder it may not write its ``-shm``
        file in), as an immutable file, which reads the main file only: refused when a
        write-ahead log beside it may hold committed rows that such a read would miss."""
        uri, db = self.path.resolve().as_uri(), None
        try:
            db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError as error:
            if db is not None:
                db.close()
            if (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF not in (_CANTOPEN, _READONLY):
                raise
            cause = str(error)
        wal = Path(f"{self.path}-wal")
        try:
            logged = wal.stat().st_size > 32  # more than its header: frames of committed transactions
        except FileNotFoundError:
            logged = False
        except OSError:
            logged = True
        if logged:
            raise IndexDatabaseError(
                f"cannot read all of {self.path}: committed changes are still in its write-ahead log {wal.name}, "
                f"which SQLite reads only with a {self.path.name}-shm file it cannot create or open in this "
                f"read-only folder ({cause}); make the folder writable, or copy {self.path.name} together with "
                f"{wal.name} into a writable folder")
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout, isolation_level=None)

    def _check_and_migrate(self) -> None:
        """Ours (current, older or newer), empty (initialised, unless read-only), or refused."""
        with self.guard():
            app = self.db.execute("PRAGMA application_id").fetchone()[0]
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            objects = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        empty = not (app or version or objects)
        if empty:
            self._adopt()
        elif app != APPLICATION_ID:
            raise IndexDatabaseError(f"{self.path} is an SQLite database of another program, not a clipcli index; "
                                     "nothing was changed")
        elif version > SCHEMA_VERSION:
            raise IndexDatabaseError(f"{self.path} has index schema {version}, newer than this clipcli's "
                                     f"{SCHEMA_VERSION}; upgrade clipcli")
        elif version < 1 or not TABLES <= tables:
            missing = ", ".join(sorted(TABLES - tables)) or "none"
            raise IndexDatabaseError(f"{self.path} is damaged (schema {version}, missing tables: {missing}); {REBUILD}")
        if not self.readonly:  # only now that the file is known to be ours (WAL rewrites its header)
            with self.guard(writing=True):
                self._wal()
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        if version < SCHEMA_VERSION:
            if self.readonly and not self._writable():
                raise IndexDatabaseError(f"{self.path} has index schema {version}, which this clipcli upgrades to "
                                         f"{SCHEMA_VERSION} on its first update, and it is read-only here")
            if self.readonly:  # a search of an older index: upgraded in place (new columns only), then read
                Index(self.path, timeout=self._timeout).close()
            else:
                self._migrate(version)
        with self.guard():
            row = self.db.execute("SELECT value FROM meta WHERE key = 'uuid'").fetchone()
        if row is None or not isinstance(row[0], str):
            raise IndexDatabaseError(f"{self.path} is damaged (its uuid is missing); {REBUILD}")
        self._uuid = row[0]

    def _wal(self) -> None:
        """WAL mode. SQLite answers this pragma "locked" at once, without waiting, while another
        process holds the new file (two first runs at once): tried again until the timeout."""
        import time

        deadline = time.monotonic() + self._timeout
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                busy = (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF in (_BUSY, _LOCKED)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _writable(self) -> bool:
        return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)

    def _adopt(self) -> None:
        """An empty file: a 0-byte one (``touch``, a bind-mounted placeholder, a first run killed
        before writing) or the blank WAL database a first run killed before its first commit
        leaves. Nothing in it can be lost; any other empty SQLite database is another program's."""
        size = self.path.stat().st_size
        if size and _header(self.path)[18:20] != b"\x02\x02":  # not in WAL mode: not left by clipcli
            raise IndexDatabaseError(f"{self.path} is an empty SQLite database clipcli did not create, not a "
                                     "clipcli index; nothing was changed")
        if self.readonly:
            what = "an empty file" if not size else "an empty SQLite database"
            raise NoVectorsError(f"{self.path} is {what}, not an index yet")

    def _migrate(self, version: int) -> None:
        with self._write():
            if self.db.execute("PRAGMA user_version").fetchone()[0] != version:
                return  # another process migrated it meanwhile
            for target, statements in MIGRATIONS:
                if target > version:  # one statement at a time: executescript() would commit midway
                    for statement in filter(str.strip, statements.split(";")):
                        self.db.execute(statement)
            if not version:
                self.db.execute("INSERT INTO meta VALUES ('uuid', ?)", (uuid.uuid4().hex,))
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _write(self) -> "_Transaction":
        """A write transaction, taken at once (BEGIN IMMEDIATE) so that concurrent writers queue."""
        if self.readonly:
            raise IndexDatabaseError(f"{self.path} is read-only (its file or folder cannot be written); "
                                     "searching works, updating does not")
        return _Transaction(self)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def uuid(self) -> str:
        return self._uuid

    # ----------------------------------------------------------------- models and rows

    def models(self) -> list[dict]:
        with self.guard():
            rows = self.db.execute("SELECT m.id, m.name, m.identity, m.dim, count(v.id) FROM models m LEFT JOIN "
                                   "vectors v ON v.model_id = m.id GROUP BY m.id ORDER BY m.id").fetchall()
        return [dict(zip(("id", "name", "identity", "dim", "vectors"), row)) for row in rows]

    def model_id(self, key: str | None = None, identity: str | None = None) -> int | None:
        """The model row found by its key (before loading) or its identity (after)."""
        with self.guard():
            if key is not None:
                row = self.db.execute("SELECT model_id FROM model_keys WHERE key = ?", (key,)).fetchone()
            else:
                row = self.db.execute("SELECT id FROM models WHERE identity = ?", (identity,)).fetchone()
        return row[0] if row else None

    def _register(self, key: str, identity: str, name: str, dim: int) -> int:
        with self._write():
            self.db.execute("INSERT INTO models (identity, name, dim) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            (identity, name, dim))
            model = self.model_id(identity=identity)
            self.db.execute("INSERT INTO model_keys VALUES (?, ?) ON CONFLICT DO NOTHING", (key, model))
        return model

    def rows(self) -> Iterator[dict]:
        """Every file row: ``path`` (str), ``size``, ``mtime_ns``, ``sha256``, ``error``."""
        with self.guard():
            for path, size, mtime, sha, error in self.db.execute(
                    "SELECT path, size, mtime_ns, sha256, error FROM files ORDER BY path"):
                yield {"path": os.fsdecode(path), "size": size, "mtime_ns": mtime, "sha256": sha, "error": error}


class _Transaction:
    """One write transaction of ``index``: committed, or rolled back whole; SQLite's errors
    (a full disk, a file size limit) leave as the index's one-line errors."""

    def __init__(self, index: Index):
        self.index, self.db = index, index.db

    def __enter__(self) -> sqlite3.Connection:
        with self.index.guard(writing=True):
            self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.DatabaseError as failed:
                error = failed
        self._rollback()
        if isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.ProgrammingError):
            raise self.index._error(error, writing=True) from None
        if kind is None:
            raise error

    def _rollback(self) -> None:
        if self.db.in_transaction:  # SQLite may have rolled back already (a full disk, an I/O error)
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # closing the connection rolls back what is left
