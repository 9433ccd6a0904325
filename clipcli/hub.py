"""Files from Hugging Face hub repositories, through the Hugging Face cache.

A repository's files live where ``huggingface_hub``, transformers and open_clip keep them
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``; ``models--ORG--NAME/snapshots/<commit>/<file>``), so a model
any of those tools downloaded is used in place: no copy, no network. ``huggingface_hub``
downloads what is missing (resumable, locked, tokens for gated repositories); we then check
the file's sha256 against the hub's LFS hash (the blob's name), so a file is never used
unverified after a download. ``CLIPCLI_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: the cache only.

A hub that cannot be reached fails at once: each download first asks for the file with one
HEAD request without retries (``hf_hub_download`` alone retries a refused connection for about
25 s before giving up on a file that is not cached). A file neither cached nor to be had is a
:class:`NotCachedError`, which :func:`looking_for` rewords to name the model and every file
looked for. Every failure is one :class:`~clipcli.errors.DownloadError` line; nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from .errors import ChecksumError, DownloadError, OfflineError, UnknownModelError

PREFIX = "hf-hub:"
# A repository id as the hub takes it (huggingface_hub's validate_repo_id): ORG/NAME, each part
# starting and ending with a letter, digit or _, at most 96 characters a part, no "--" or "..".
_REPO = re.compile(r"^\w(?:[\w.-]*\w)?/\w(?:[\w.-]{0,94}\w)?$", re.ASCII)


def cache_dir() -> Path:
    """The Hugging Face hub cache, found as ``huggingface_hub`` finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than empty, 0,
    false, no or off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


OFFLINE_SWITCHES = ("CLIPCLI_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> bool:
    return any(map(env_flag, OFFLINE_SWITCHES))


def endpoint() -> str | None:
    """``$HF_ENDPOINT``, read now (huggingface_hub reads it once, at import); None: its default."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


def parse_name(name: str) -> tuple[str, str | None] | None:
    """``(repo, revision)`` for ``hf-hub:ORG/REPO`` or ``hf-hub:ORG/REPO@REVISION``, else None."""
    if not name.startswith(PREFIX):
        return None
    repo, _, revision = name[len(PREFIX):].strip().strip("/").partition("@")
    if not _REPO.match(repo) or "--" in repo or ".." in repo or repo.endswith(".git") or len(repo) > 200:
        raise UnknownModelError(f"{name!r}: a hub name is hf-hub:ORG/REPO (optionally @REVISION), each part of "
                                "letters, digits, -, _ and . (not starting or ending with - or ., no -- or ..), "
                                "the name at most 96 characters")
    return repo, revision or None


def cached_file(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """The cached copy of ``filename`` at ``revision`` (default: the cached ``main``), else None.
    huggingface_hub is imported only when the cache has a folder for ``repo`` (importing it is
    50 ms of a cold start that looks for a released model there and finds none)."""
    if not (cache_dir() / f"models--{repo.replace('/', '--')}").is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir(), revision=revision)
    except ValueError as error:  # huggingface_hub's validation of a name or revision
        raise UnknownModelError(f"{PREFIX}{repo}@{revision}: {_one_line(error)}") from None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def blob_sha256(path: Path) -> str | None:
    """The sha256 of a file in the HF cache, from its blob's name (an LFS file's hash), unread;
    None for any other file."""
    blob = Path(os.path.realpath(path))
    if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name
    return None


def verify(path: Path) -> None:
    """Check a cached hub file against its LFS sha256 (the name of the blob it links to)."""
    from .fsutil import sha256_file

    blob = Path(os.path.realpath(path))
    expected = blob.name
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        return  # a small git file: its blob is named by a git hash, not a sha256
    actual = sha256_file(blob)
    if actual != expected:
        with contextlib.suppress(OSError):
            blob.unlink()
            path.unlink()
        raise ChecksumError(f"{path} does not match the hub's sha256 (expected {expected}, got {actual}); "
                            "the file was deleted, run again to download it anew")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --------------------------------------------------------------------------- not cached


class NotCachedError(OfflineError):
    """Hub files that are not in the Hugging Face cache and cannot be downloaded now: offline
    by choice (``reason`` None) or the hub unreachable (``reason`` says how). Made by
    :func:`not_cached`; ``repo``, ``files`` and ``reason`` let :func:`looking_for` say it again
    for the whole model."""

    repo: str = ""
    files: tuple[str, ...] = ()
    reason: str | None = None


def _either(names: Sequence[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    names = list(dict.fromkeys(names))
    return "".join(names) if len(names) < 2 else f"{', '.join(names[:-1])} or {names[-1]}"


def not_cached(repo: str, files: Sequence[str], reason: str | None, name: str | None = None) -> NotCachedError:
    """The one line for model ``name`` (default ``hf-hub:REPO``) whose ``files`` are not in the
    cache: where the cache is, what was looked for, and the hub's state and the switches that
    decide whether it is asked."""
    name = name or f"{PREFIX}{repo}"
    whose = "" if repo in name else f" of {repo}"
    missing = f"not in the Hugging Face cache ({cache_dir()}: no {_either(files)}{whose})"
    if reason is None:
        switch = next((s for s in OFFLINE_SWITCHES if env_flag(s)), OFFLINE_SWITCHES[0])
        text = f"{name} is {missing}, and {switch} is set: the hub is not asked"
    else:
        text = (f"{name}: cannot reach the Hugging Face hub ({reason}) and it is {missing}; "
                "CLIPCLI_OFFLINE=1 or HF_HUB_OFFLINE=1 uses only the cache, without trying the hub")
    error = NotCachedError(text)
    error.repo, error.files, error.reason = repo, tuple(files), reason
    return error


@contextlib.contextmanager
def looking_for(name: str, repo: str, files: Sequence[str]):
    """Within: a :class:`NotCachedError` names model ``name`` and all of ``files`` (read when
    it is raised: a list may still grow), not just the one file whose download failed."""
    try:
        yield
    except NotCachedError as error:
        raise not_cached(repo, list(files) or error.files, error.reason, name=name) from None


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP library raises when the hub does not answer (refused, no
    route, no DNS, a timeout, a failing proxy): httpx2's, httpx's or requests', whichever it
    imported (it changed with its versions), and the built-in ones."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        library = sys.modules.get(module)
        errors += [getattr(library, n) for n in names if isinstance(getattr(library, n, None), type)]
    return tuple(errors)


def _ask(repo: str, filename: str, revision: str | None) -> None:
    """One HEAD request for ``filename``, without huggingface_hub's retries, so that a hub that
    cannot be reached fails now (:class:`NotCachedError`). An answer, even an error, is left to
    ``hf_hub_download``, which retries the transient ones."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    from . import __version__

    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint())
    try:
        get_hf_file_metadata(url, library_name="clipcli", library_version=__version__)
    except _connection_errors() as error:
        raise not_cached(repo, (filename,), f"{endpoint() or constants.ENDPOINT}: {_one_line(error)}") from None
    except HfHubHTTPError:
        pass  # the hub answered: hf_hub_download asks again, retrying what is transient (5xx, 429)


# --------------------------------------------------------------------------- downloading


def download(repo: str, filename: str, revision: str | None = None, *, bars: bool = False) -> Path:
    """``filename`` from hub ``repo`` into the Hugging Face cache (resumed if interrupted),
    sha256-verified. Raises :class:`FileNotFoundError` when the repository has no such file."""
    if offline():
        raise not_cached(repo, (filename,), None)
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    from . import __version__

    try:
        with _progress_bars(bars):
            _ask(repo, filename, revision)
            path = Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir(), endpoint=endpoint(),
                                        library_name="clipcli", library_version=__version__))
    except hf.GatedRepoError:
        raise DownloadError(f"hub repository {repo} is gated: accept its terms on its hub page, then log in "
                            "(`hf auth login` or $HF_TOKEN)") from None
    except hf.RepositoryNotFoundError:
        raise UnknownModelError(f"hub repository {repo} does not exist (or is private: log in with "
                                "`hf auth login` or $HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise UnknownModelError(f"hub repository {repo} has no revision {revision!r}") from None
    except hf.LocalEntryNotFoundError as error:  # a subclass of EntryNotFoundError: first
        # the hub answered _ask, then stopped answering (huggingface_hub retried it)
        raise not_cached(repo, (filename,), _one_line(error.__cause__ or error)) from None
    except hf.EntryNotFoundError:
        raise FileNotFoundError(filename) from None
    except (hf.HfHubHTTPError, OSError, ValueError, *_connection_errors()) as error:
        raise DownloadError(f"cannot download {repo}/{filename}: {_one_line(error)}") from None
    verify(path)
    return path


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """huggingface_hub's progress bars on stderr only when asked for, and none of its log
    lines (its retries' warnings: our errors say what failed, in one line); restored after."""
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    (enable_progress_bars if enabled else disable_progress_bars)()
    logger.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()
        logger.setLevel(level)


def first_cached(repo: str, candidates: Sequence[str], revision: str | None = None) -> Path | None:
    """The first of ``candidates`` in the Hugging Face cache, without the network; else None."""
    return next(filter(None, (cached_file(repo, filename, revision) for filename in candidates)), None)


def first_file(repo: str, candidates: Sequence[str], revision: str | None = None, *,
               bars: bool = False) -> Path | None:
    """The first of ``candidates`` the repository has: a cached one if any, else the first
    that downloads. None when it has none of them."""
    path = first_cached(repo, candidates, revision)
    if path is not None:
        return path
    for filename in candidates:
        try:
            return download(repo, filename, revision, bars=bars)
        except FileNotFoundError:
            continue
    return None


def optional_file(repo: str, filename: str, revision: str | None = None, *, bars: bool = False) -> Path | None:
    """``filename`` from the cache or the hub, or None when the repository has no such file
    (or, offline by choice, when the cache does not hold it)."""
    path = cached_file(repo, filename, revision)
    if path is not None or offline():
        return path
    try:
        return download(repo, filename, revision, bars=bars)
    except FileNotFoundError:
        return None
