"""Files on disk, written safely: the one place for atomic writes, locks, fsync and hashing.

- :func:`ensure_writable` refuses, before any work, outputs that could not be written.
- :func:`atomic_write` writes a temporary file beside the target, fsyncs it and renames it in
  place; a failure leaves the target as it was and names it (:func:`write_error`).
- :func:`exclusive_lock` lets one run at a time write a file (an ``encode`` output, a download).
- :func:`fsync_folder` makes a rename durable; :func:`sha256_file` hashes in chunks.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

from .display import display
from .errors import BusyError, InputError, OutputError, OutputExistsError, WriteError


def named(path: str | os.PathLike, what: str = "a path") -> str:
    """``path`` as text, refused when it names nothing: an empty or blank string (a script's
    unset ``"$DIR"``) would otherwise be the current folder, and an index update would drop
    every row under it."""
    text = os.fspath(path)
    if not (text.strip() if isinstance(text, str) else text.strip(b" \t\n")):
        raise InputError(f"{what} is empty: it names no file or folder (an unset variable?); "
                         "give a path, or . for the current folder")
    return text


def ensure_writable(paths: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """Refuse, before any work, outputs that could not be written: existing files (unless
    ``overwrite``), a folder that is missing, not a folder, or not writable."""
    for path in paths:
        name = display(os.fspath(path))
        if os.path.isdir(path):
            raise OutputError(f"cannot write {name}: it is a folder")
        if os.path.lexists(path) and not overwrite:
            raise OutputExistsError(f"{name} already exists", fix="overwrite")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise OutputError(f"cannot write {name}: folder {display(folder)} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {name}: folder {display(folder)} is not writable")


# What a failing write reports (a full disk, a quota, a read-only file system, an I/O error).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


def write_error(error: OSError, path: str | os.PathLike | None) -> WriteError:
    """A failed write as one line naming the file (``stdout`` when ``path`` is None)."""
    where = display(os.fspath(path)) if path is not None else "stdout"
    return WriteError(f"cannot write {where}: {error.strerror or error}")


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write (by any writer: ``np.save``, ``torch.save``,
    safetensors); on success it is fsynced and renamed to ``path`` with the umask's mode.

    On any error or interrupt the temporary file is removed and ``path`` is untouched; a full
    disk or an I/O error is a :class:`WriteError` naming ``path``. Without ``overwrite`` the
    final step is a hard link, which fails if ``path`` appeared meanwhile.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{display(path)} already exists", fix="overwrite")
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.close(handle)
    except OSError as error:
        raise write_error(error, path) from None
    try:
        try:
            yield Path(temp)
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as error:
            if error.errno not in WRITE_ERRNOS:  # the caller's own failure, not this file's
                raise
            raise write_error(error, path) from None  # a full disk, an I/O error: name the file
        os.chmod(temp, 0o666 & ~umask())
        if overwrite:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)
            except FileExistsError:
                raise OutputExistsError(f"{display(path)} already exists", fix="overwrite") from None
            except OSError:  # file systems without hard links
                os.replace(temp, path)
            else:
                os.unlink(temp)
        fsync_folder(folder)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, overwrite: bool = False, text: bool = False) -> Iterator[IO]:
    """:func:`atomic_path` as an open file (binary, or UTF-8 text with ``text``)."""
    with atomic_path(path, overwrite) as temp:
        try:
            with open(temp, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as f:
                yield f
        except OSError as error:
            if error.errno not in WRITE_ERRNOS:
                raise
            raise write_error(error, path) from None


@contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool = False,
                   on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (between threads and processes) for the duration.

    The lock is ``.NAME.lock`` beside ``path``, removed on release. Without ``wait`` a lock
    held by another run raises :class:`BusyError`; with it, ``on_wait`` hears once that this
    run is waiting. A waiter that locked a file its holder already removed notices (the inode
    at the path differs) and tries again. Where locks cannot be taken (no ``fcntl``, a
    read-only folder) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = os.fspath(path)
    lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only folder: nothing can be written there, so nothing to guard
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise BusyError(f"another run is writing {display(path)} (it holds {display(lock)}); "
                                    "wait for it to finish") from None
                if on_wait and not announced:
                    on_wait(f"waiting for another run writing {os.path.basename(path)} to finish (lock {lock})")
                    announced = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            held, current = os.fstat(fd), os.stat(lock)
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def umask() -> int:
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """The file's sha256, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
