"""WebDataset shards (img2dataset's output) read as streams with the standard library.

A shard is a tar file whose members are grouped into samples by *key*: the member's path
up to the first dot of its file name (``00001/000010042.jpg``, ``.txt`` and ``.json`` make
one sample ``00001/000010042``). A sample's image is its ``jpg``, ``jpeg``, ``png`` or
``webp`` member, its caption the ``txt`` one, its metadata the ``json`` one. Shards are
named as files, globs (``shards/*.tar``) or brace patterns (``shards/{00000..00999}.tar``).

A sample without an image is an error sample, and a shard that is truncated or corrupt
part-way gives its samples up to there, then one error sample saying where it broke (what
came after cannot be known). A shard that cannot be read at all (missing, a permission, an
I/O error) stops the run instead, so that a rerun tries it again, and so does a shard whose
members are not grouped by key (``tar -cf`` of a folder in directory order interleaves them):
read as a stream, each sample would be cut into fragments. Only image, caption and JSON
members are read, images up to :data:`MAX_MEMBER_BYTES` and captions and JSON up to
:data:`MAX_SIDECAR_BYTES` each.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from .display import display
from .errors import ClipcliError, InputError
from .items import Item

# A sample's image, by its member's extension, in this order of preference (img2dataset writes jpg;
# photo libraries packed as shards hold the rest; HEIC and RAW need the photos extra).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "avif", "heic", "heif", "tif", "tiff", "bmp", "gif", "ppm", "pgm",
                    "pnm", "dng")
MAX_MEMBER_BYTES = 64 << 20  # an image larger than this is an error sample
MAX_SIDECAR_BYTES = 1 << 20  # and so is a caption or JSON larger than this: a whole shard's are held
SHARD = re.compile(r"\.(tar(\.gz|\.bz2|\.xz)?|tgz)$", re.IGNORECASE)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


class ShardError(ClipcliError):
    """A shard could not be read (not damage in it): the run stops, and a rerun tries it again."""

    exit_code = 1


@dataclass
class Sample:
    """One sample of a shard: its key, image (as an :class:`Item` to decode), caption, and its
    ``.json`` member as text (kept whole, parsed or not) with the ``url`` it names."""

    key: str
    item: Item
    caption: str | None = None
    json: str | None = None
    url: str | None = None


def is_shards(inputs: Sequence[str]) -> bool:
    """Whether every input names tar shards (a ``.tar`` file, glob or brace pattern)."""
    return bool(inputs) and all(SHARD.search(arg) for arg in inputs)


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b`` -> ``a0b a1b a2b`` (zero-padded as written), ``{x,y}`` -> both; the
    leftmost brace varies slowest, as in the shell."""
    found = min(filter(None, (_RANGE.search(pattern), _CHOICE.search(pattern))), key=lambda m: m.start(), default=None)
    if found is None:
        return [pattern]
    if found.re is _RANGE:
        first, last = found[1], found[2]
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(first) <= int(last) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = found[1].split(",")
    return [name for choice in choices for name in expand_braces(pattern[: found.start()] + choice + pattern[found.end():])]


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """The shard files ``patterns`` name, in order; a pattern that names none is an error."""
    shards: list[str] = []
    for pattern in patterns:
        for name in expand_braces(pattern):
            matches = sorted(glob.glob(name)) if glob.has_magic(name) else ([name] if os.path.exists(name) else [])
            if not matches:
                raise InputError(f"no shard matches {display(name)}")
            shards += matches
    return list(dict.fromkeys(shards))


def _split(member: str) -> tuple[str, str]:
    folder, _, base = member.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _sample(key: str, parts: dict, caption: str = "txt") -> Sample:
    image = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if "error" in parts:
        item = Item(name=key, error=parts.pop("error"))
    elif image:
        item = Item(name=key, data=parts[image])
    else:
        item = Item(name=key, error=f"no image in this sample (it has {', '.join(sorted(parts)) or 'nothing we read'})")
    sample = Sample(key, item)
    if caption in parts:
        sample.caption = parts[caption].decode("utf-8", "replace").strip()
    if "json" in parts:
        sample.json = parts["json"].decode("utf-8", "replace")
        try:
            meta = json.loads(sample.json)
        except (ValueError, RecursionError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("url"), str):
            sample.url = meta["url"]
    return sample


def samples(shard: str, caption: str = "txt") -> Iterator[Sample]:
    """The samples of ``shard`` in order, read as a stream. A shard that cannot be opened or
    read (missing, a permission, an I/O error) raises :class:`ShardError`: it is not done and a
    rerun tries it again. Damage found in its bytes (a truncated or corrupt archive) is final:
    the samples before it, then one error sample."""
    try:
        stream = open(shard, "rb")
    except OSError as error:
        raise ShardError(f"cannot read shard {display(shard)}: {error.strerror or error}") from None
    key, parts, done = None, {}, None  # done: the last sample read whole
    seen: set[str] = set()  # every key read whole: one coming back means the members are not grouped
    wanted = (*IMAGE_EXTENSIONS, caption, "json")
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                member_key, extension = _split(member.name)
                if not member.isfile() or member.name.rpartition("/")[2].startswith("."):
                    continue  # folders, links, hidden files (macOS ._ files)
                if member_key != key and key is not None:
                    if member_key in seen:
                        raise ShardError(
                            f"{display(shard)} is not grouped by key: {display(member.name)} comes after sample "
                            f"{display(key)}, away from the rest of sample {display(member_key)}; WebDataset needs "
                            "each sample's files side by side: write the shard again with tar --sort=name")
                    yield _sample(key, parts, caption)
                    seen.add(key)
                    done, parts = key, {}
                key = member_key
                if extension not in wanted:
                    continue  # never read: other members may be large (.mp4, .npy)
                limit = MAX_SIDECAR_BYTES if extension in (caption, "json") else MAX_MEMBER_BYTES
                if member.size > limit:
                    parts["error"] = f"{extension} member of {member.size:,} bytes is over the {limit:,} limit"
                    continue
                parts[extension] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error) as error:
        where = f"after {done}" if done is not None else "at its start"
        reason = f"the shard is damaged {where} ({error or type(error).__name__}); what followed is lost"
        yield Sample(f"{shard}#damaged", Item(name=f"{shard}#damaged", error=reason))
        return
    except OSError as error:  # reading failed (an I/O error), not the archive: try again later
        raise ShardError(f"cannot read shard {display(shard)}: {error.strerror or error}") from None
    if key is not None:
        yield _sample(key, parts, caption)
