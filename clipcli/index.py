"""A search index of images: one SQLite file, updated incrementally, safe to interrupt.

Tables (schema version in ``PRAGMA user_version``, migrations in :data:`MIGRATIONS`):

- ``files``: one row per image, by absolute path as the filesystem's bytes, with the size
  and modification time it was seen at, its content's sha256, and the reason it failed (a
  failed file is retried only once it changes).
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
float32 ``.npy`` files memory-mapped, rebuilt when the model's generation changes), so a
search over a million vectors reads no SQLite rows but those of its results.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import IndexDatabaseError, NoVectorsError, OutputError
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
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


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


@dataclass
class Summary:
    """What an update did, by file."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    embedded: int = 0  # files the model ran on (the others reused a vector)
    model_loaded: bool = False
    seconds: float = 0.0

    def as_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Hit:
    rank: int
    path: bytes
    score: float

    @property
    def name(self) -> str:
        return os.fsdecode(self.path)


class Index:
    """An open index database. ``Index(path)`` creates it when missing (``readonly``: never)."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False, timeout: float = 60.0):
        self.path = Path(named(path, "the index path")).expanduser() if path is not None else default_path()
        exists = self.path.exists()
        if not exists and readonly:
            raise NoVectorsError(f"no index at {self.path}")
        if exists and not self.path.is_file():
            raise IndexDatabaseError(f"{self.path} is not a file")
        self.readonly = readonly or (exists and not os.access(self.path, os.W_OK)) or (
            exists and not os.access(self.path.parent, os.W_OK))
        if not exists:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OutputError(f"cannot create the folder of {self.path}: {error.strerror or error}") from None
            if not os.access(self.path.parent, os.W_OK):
                raise OutputError(f"cannot create the index {self.path}: its folder is not writable")
        self.db = self._connect(timeout)
        self._check_and_migrate(exists)

    # ----------------------------------------------------------------- opening

    def _connect(self, timeout: float) -> sqlite3.Connection:
        try:
            if self.readonly:
                db = self._connect_readonly(timeout)
            else:
                db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            db.execute("PRAGMA foreign_keys=ON")
            return db
        except sqlite3.DatabaseError as error:
            raise IndexDatabaseError(f"{self.path} is not a clipcli index ({error}); nothing was changed") from None

    def _connect_readonly(self, timeout: float) -> sqlite3.Connection:
        """Read-only; where SQLite cannot share the file (a folder it may not write its ``-shm``
        file in), as an immutable file: nothing may change it there anyway."""
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout, isolation_level=None)

    def _check_and_migrate(self, existed: bool) -> None:
        try:
            app = self.db.execute("PRAGMA application_id").fetchone()[0]
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            tables = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise IndexDatabaseError(f"{self.path} is not a clipcli index ({error}); nothing was changed") from None
        if tables and app != APPLICATION_ID:
            raise IndexDatabaseError(f"{self.path} is an SQLite database of another program, not a clipcli index; "
                              "nothing was changed")
        if version > SCHEMA_VERSION:
            raise IndexDatabaseError(f"{self.path} has index schema {version}, newer than this clipcli's "
                              f"{SCHEMA_VERSION}; upgrade clipcli")
        if not self.readonly:  # only now that the file is known to be ours (WAL rewrites its header)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        if version == SCHEMA_VERSION:
            return
        if self.readonly:
            raise IndexDatabaseError(f"{self.path} needs an upgrade to schema {SCHEMA_VERSION} and is read-only")
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

    def _write(self):
        """A write transaction, taken at once (BEGIN IMMEDIATE) so that concurrent writers queue."""
        if self.readonly:
            raise IndexDatabaseError(f"{self.path} is read-only (its file or folder cannot be written); "
                              "searching works, updating does not")
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def uuid(self) -> str:
        return self.db.execute("SELECT value FROM meta WHERE key = 'uuid'").fetchone()[0]

    # ----------------------------------------------------------------- models and rows

    def models(self) -> list[dict]:
        rows = self.db.execute("SELECT m.id, m.name, m.identity, m.dim, count(v.id) FROM models m "
                               "LEFT JOIN vectors v ON v.model_id = m.id GROUP BY m.id ORDER BY m.id").fetchall()
        return [dict(zip(("id", "name", "identity", "dim", "vectors"), row)) for row in rows]

    def model_id(self, key: str | None = None, identity: str | None = None) -> int | None:
        """The model row found by its key (before loading) or its identity (after)."""
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
        for path, size, mtime, sha, error in self.db.execute(
                "SELECT path, size, mtime_ns, sha256, error FROM files ORDER BY path"):
            yield {"path": os.fsdecode(path), "size": size, "mtime_ns": mtime, "sha256": sha, "error": error}


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, error, tb) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
