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

:meth:`Index.update` walks the inputs, compares size and mtime with the rows, hashes only
what is new or changed, reuses vectors by content, embeds the rest (the model is loaded
only then) and commits each batch in its own transaction: a killed run loses at most the
batch in flight, and the next run finishes it. Rows of files gone from an indexed folder
are removed, and vectors no file refers to any more with them.

Searching multiplies a query vector with all of a model's vectors (exact search). The
vectors are kept contiguous in a derived cache beside the database (``NAME.vectors/``,
float32 ``.npy`` files memory-mapped, rebuilt when the model's generation changes), so a
search over a million vectors reads no SQLite rows but those of its results.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from .errors import ClipcliError, OutputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .pipeline import LoadedModel

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
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class IndexError_(ClipcliError):  # noqa: N801 - IndexError is a builtin
    """The index database cannot be used (not a clipcli index, a newer schema, read-only)."""


def default_path() -> Path:
    """``$CLIPCLI_INDEX``, else ``$XDG_DATA_HOME/clipcli/index.sqlite3`` (``~/.local/share/...``)."""
    if os.environ.get("CLIPCLI_INDEX"):
        return Path(os.environ["CLIPCLI_INDEX"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser() / "clipcli" / "index.sqlite3"


def path_key(path: str | os.PathLike) -> bytes:
    """How a path is stored: absolute, as the filesystem's bytes."""
    return os.fsencode(os.path.abspath(path))


def _under(folder: bytes) -> tuple[bytes, bytes]:
    """The range of keys strictly under ``folder`` (``folder/`` <= key < ``folder0``)."""
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


@dataclass
class _Scan:
    """A file found by the walk: its key, stat and, once hashed, content sha256."""

    key: bytes
    name: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    error: str | None = None
    old: tuple | None = field(default=None, repr=False)  # its row before this run


class Index:
    """An open index database. ``Index(path)`` creates it when missing (``readonly``: never)."""

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False, timeout: float = 60.0):
        self.path = Path(path).expanduser() if path is not None else default_path()
        exists = self.path.exists()
        if not exists and readonly:
            raise IndexError_(f"no index at {self.path}; build one with `clipcli index FOLDER`")
        if exists and not self.path.is_file():
            raise IndexError_(f"{self.path} is not a file")
        self.readonly = readonly or (exists and not os.access(self.path, os.W_OK)) or (
            exists and not os.access(self.path.parent, os.W_OK))
        if not exists:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OutputError(f"cannot create the folder of {self.path}: {error.strerror or error}") from None
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
            raise IndexError_(f"{self.path} is not a clipcli index ({error}); nothing was changed") from None

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
            raise IndexError_(f"{self.path} is not a clipcli index ({error}); nothing was changed") from None
        if tables and app != APPLICATION_ID:
            raise IndexError_(f"{self.path} is an SQLite database of another program, not a clipcli index; "
                              "nothing was changed")
        if version > SCHEMA_VERSION:
            raise IndexError_(f"{self.path} has index schema {version}, newer than this clipcli's "
                              f"{SCHEMA_VERSION}; upgrade clipcli")
        if not self.readonly:  # only now that the file is known to be ours (WAL rewrites its header)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        if version == SCHEMA_VERSION:
            return
        if self.readonly:
            raise IndexError_(f"{self.path} needs an upgrade to schema {SCHEMA_VERSION} and is read-only")
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
            raise IndexError_(f"{self.path} is read-only (its file or folder cannot be written); "
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

    def _register(self, key: str, loaded: "LoadedModel") -> int:
        with self._write():
            self.db.execute("INSERT INTO models (identity, name, dim) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            (loaded.identity, loaded.name, loaded.embed_dim))
            model = self.model_id(identity=loaded.identity)
            self.db.execute("INSERT INTO model_keys VALUES (?, ?) ON CONFLICT DO NOTHING", (key, model))
        return model

    def rows(self) -> Iterator[dict]:
        """Every file row: ``path`` (str), ``size``, ``mtime_ns``, ``sha256``, ``error``."""
        for path, size, mtime, sha, error in self.db.execute(
                "SELECT path, size, mtime_ns, sha256, error FROM files ORDER BY path"):
            yield {"path": os.fsdecode(path), "size": size, "mtime_ns": mtime, "sha256": sha, "error": error}

    # ----------------------------------------------------------------- updating

    def update(self, inputs: Sequence[str], key: str, load: Callable[[], "LoadedModel"], *,
               embed: Callable[["LoadedModel", list], Iterator] | None = None,
               on_result: Callable[[str, str | None], None] | None = None) -> Summary:
        """Bring the rows of ``inputs`` (folders, list files, files) up to date for the model
        whose :func:`~clipcli.pipeline.source_key` is ``key``. ``load()`` is called only if an
        image must be embedded; ``embed(loaded, items)`` yields one
        :class:`~clipcli.batching.Embedding` per item (default: :func:`embed_images`)."""
        from .items import expand_inputs

        started, summary = time.monotonic(), Summary()
        report = on_result or (lambda name, error: None)
        if self.readonly:
            self._write()  # raises: say so before walking a tree
        items = expand_inputs(list(inputs))
        roots = [path_key(arg) for arg in inputs if os.path.isdir(arg)]
        scans, failures = self._scan(items)
        for name, error in failures:
            summary.failed += 1
            report(name, error)
        under = self._attach_rows(scans, roots)
        model = self.model_id(key=key)
        have = self._shas(model)
        todo = []
        for scan in scans:
            old = scan.old
            if old and (old[0], old[1]) == (scan.size, scan.mtime_ns) and (old[3] is not None or old[2] in have):
                summary.unchanged += 1
            else:
                todo.append(scan)
        seen = {scan.key for scan in scans}
        gone = [(path, row[2]) for path, row in under.items() if path not in seen]  # (path, sha256)
        if todo:
            self._hash(todo)
            self._apply(todo, gone, key, model, have, load, embed, report, summary)
        if gone:
            with self._write():
                self.db.executemany("DELETE FROM files WHERE path = ?", [(path,) for path, _ in gone])
                self._collect_garbage()
            summary.removed += len(gone)
        summary.seconds = time.monotonic() - started
        return summary

    def _scan(self, items) -> tuple[list[_Scan], list[tuple[str, str]]]:
        scans, failures, seen = [], [], set()
        for item in items:
            if item.url is not None:
                failures.append((item.name, "the index holds local files; download it first"))
                continue
            if item.error is not None:
                failures.append((item.name, item.error))
                continue
            key = path_key(item.path)
            if key in seen:
                continue
            seen.add(key)
            try:
                st = os.stat(item.path)
            except OSError as error:
                failures.append((item.name, f"cannot read it: {error.strerror or error}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                failures.append((item.name, "not a regular file"))
                continue
            scans.append(_Scan(key, item.name, st.st_size, st.st_mtime_ns))
        return scans, failures

    def _attach_rows(self, scans: list[_Scan], roots: list[bytes]) -> dict[bytes, tuple]:
        """Each scan's row before this run: one range query per indexed folder, then one
        query per file outside them (files and list entries named on their own). Returns
        the rows under the folders."""
        rows: dict[bytes, tuple] = {}
        lows = [_under(root)[0] for root in roots]
        for low, high in map(_under, roots):
            rows.update((r[0], r[1:]) for r in self.db.execute(
                "SELECT path, size, mtime_ns, sha256, error FROM files WHERE path >= ? AND path < ?", (low, high)))
        for scan in scans:
            scan.old = rows.get(scan.key)
            if scan.old is None and not any(scan.key.startswith(low) for low in lows):
                row = self.db.execute("SELECT size, mtime_ns, sha256, error FROM files WHERE path = ?",
                                      (scan.key,)).fetchone()
                scan.old = tuple(row) if row else None
        return rows

    def _shas(self, model: int | None) -> set[str]:
        if model is None:
            return set()
        return {row[0] for row in self.db.execute("SELECT sha256 FROM vectors WHERE model_id = ?", (model,))}

    @staticmethod
    def _hash(scans: list[_Scan]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from .fsutil import sha256_file

        def one(scan: _Scan) -> None:
            try:
                scan.sha256 = sha256_file(Path(os.fsdecode(scan.key)))
            except OSError as error:
                scan.error = f"cannot read it: {error.strerror or error}"

        with ThreadPoolExecutor(4) as pool:  # hashlib releases the interpreter lock on large buffers
            list(pool.map(one, scans))

    def _apply(self, todo, gone, key, model, have, load, embed, report, summary) -> None:
        from collections import Counter

        moved_from = Counter(sha for _, sha in gone if sha)  # content that left a path this run
        failed = [s for s in todo if s.error is not None]
        for scan in failed:
            summary.failed += 1
            report(scan.name, scan.error)
        ready = [s for s in todo if s.error is None]
        if any(s.sha256 not in have for s in ready):
            loaded = load()
            summary.model_loaded = True
            model = self._register(key, loaded)  # also when the key is new but the identity is not
            have = self._shas(model)
        reuse = [s for s in ready if s.sha256 in have]
        for scan in reuse:
            if scan.old and scan.old[2] == scan.sha256 and scan.old[3] is None:
                kind = "unchanged"  # touched, same content
            else:
                kind = "moved" if scan.old is None and moved_from[scan.sha256] > 0 else ("updated" if scan.old else "added")
            if kind == "moved":
                moved_from[scan.sha256] -= 1
                summary.removed -= 1  # a move is not also a removal
            setattr(summary, kind, getattr(summary, kind) + 1)
            report(scan.name, None)
        with self._write():
            self._put_files(reuse + failed)
        fresh: dict[str, list[_Scan]] = {}  # content sha -> the files holding it
        for scan in ready:
            if scan.sha256 not in have:
                fresh.setdefault(scan.sha256, []).append(scan)
        if fresh:
            self._embed(fresh, model, loaded, embed, report, summary)

    def _embed(self, fresh: dict[str, list[_Scan]], model: int, loaded, embed, report, summary) -> None:
        import numpy as np

        from .batching import default_batch_size, embed_images
        from .items import Item

        firsts = [group[0] for group in fresh.values()]
        items = [Item(name=scan.name, path=os.fsdecode(scan.key)) for scan in firsts]
        run = embed or (lambda loaded, items: embed_images(loaded, items, normalize=True))
        batch = default_batch_size(loaded.device)
        files, vectors = [], []
        for scan, result in zip(firsts, run(loaded, items)):
            group = fresh[scan.sha256]
            for member in group:
                member.error = result.error
                kind = "updated" if member.old else "added"
                if result.ok:
                    setattr(summary, kind, getattr(summary, kind) + 1)
                else:
                    summary.failed += 1
                report(member.name, result.error)
            summary.embedded += 1
            files += group
            if result.ok:
                vectors.append((model, scan.sha256, np.asarray(result.embedding, np.float32).tobytes()))
            if len(files) >= batch:
                self._commit(files, vectors, model)
                files, vectors = [], []
        self._commit(files, vectors, model)

    def _commit(self, files: list[_Scan], vectors: list[tuple], model: int) -> None:
        if not files:
            return
        with self._write():
            self.db.executemany("INSERT INTO vectors (model_id, sha256, vector) VALUES (?, ?, ?) "
                                "ON CONFLICT (model_id, sha256) DO UPDATE SET vector = excluded.vector", vectors)
            self._put_files(files)
            if vectors:
                self.db.execute("UPDATE models SET generation = generation + 1 WHERE id = ?", (model,))

    def _put_files(self, scans: list[_Scan]) -> None:
        now = time.time()
        self.db.executemany(
            "INSERT INTO files (path, size, mtime_ns, sha256, error, indexed) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
            "sha256 = excluded.sha256, error = excluded.error, indexed = excluded.indexed",
            [(s.key, s.size, s.mtime_ns, s.sha256, s.error, now) for s in scans])

    def _collect_garbage(self) -> None:
        """Drop vectors no file refers to any more (inside the caller's transaction)."""
        orphans = self.db.execute("SELECT DISTINCT model_id FROM vectors v WHERE NOT EXISTS "
                                  "(SELECT 1 FROM files f WHERE f.sha256 = v.sha256)").fetchall()
        if orphans:
            self.db.execute("DELETE FROM vectors WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.sha256 = vectors.sha256)")
            self.db.executemany("UPDATE models SET generation = generation + 1 WHERE id = ?", orphans)

    # ----------------------------------------------------------------- searching

    def matrix(self, model: int) -> tuple["np.ndarray", "np.ndarray"]:
        """``(ids, vectors)``: the model's vector ids (ascending) and float32 ``(N, D)`` rows,
        memory-mapped from the cache beside the database, rebuilt first when stale."""
        from .vectors import load_matrix

        generation = self.db.execute("SELECT generation FROM models WHERE id = ?", (model,)).fetchone()[0]
        return load_matrix(self, model, generation)

    def search(self, model: int, query: "np.ndarray", *, top_k: int = 10, threshold: float | None = None,
               under: Sequence[str] = ()) -> list[Hit]:
        """The ``top_k`` files whose vectors score highest against the unit vector ``query``
        (cosine), best first; ``under`` limits them to files below those folders or paths."""
        from .vectors import top_scores

        ids, vectors = self.matrix(model)
        allowed = self._allowed(model, under) if under else None
        hits: list[Hit] = []
        want = top_k
        while True:  # a vector may be several files (duplicates); fetch more until top_k files
            best = top_scores(vectors, ids, query, want, threshold, allowed)
            hits = self._files_of(model, best, under)
            if len(hits) >= top_k or len(best) < want:
                break
            want *= 4
        return [Hit(rank, path, score) for rank, (path, score) in enumerate(hits[:top_k], start=1)]

    def _allowed(self, model: int, under: Sequence[str]) -> set[int]:
        allowed: set[int] = set()
        for place in under:
            low, high = _under(path_key(place))
            allowed.update(row[0] for row in self.db.execute(
                "SELECT v.id FROM files f JOIN vectors v ON v.sha256 = f.sha256 AND v.model_id = ? "
                "WHERE (f.path >= ? AND f.path < ?) OR f.path = ?", (model, low, high, path_key(place))))
        return allowed

    def _files_of(self, model: int, best: list[tuple[int, float]], under: Sequence[str]) -> list[tuple[bytes, float]]:
        score = dict(best)
        prefixes = [(path_key(p), _under(path_key(p))[0]) for p in under]
        found = []
        for start in range(0, len(best), 500):
            chunk = [vector_id for vector_id, _ in best[start : start + 500]]
            found += self.db.execute(
                f"SELECT f.path, v.id FROM vectors v JOIN files f ON f.sha256 = v.sha256 "
                f"WHERE v.model_id = ? AND v.id IN ({','.join('?' * len(chunk))})", (model, *chunk)).fetchall()
        if prefixes:
            found = [(p, v) for p, v in found if any(p == exact or p.startswith(low) for exact, low in prefixes)]
        return sorted(((path, score[vector_id]) for path, vector_id in found), key=lambda h: (-h[1], h[0]))


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, error, tb) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
