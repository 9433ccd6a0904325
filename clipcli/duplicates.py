"""Duplicate photos in an index, in three tiers, each file reported once; nothing is ever
deleted or moved here.

- ``exact``: files with the same content (sha256, already stored by the index); similarity 1.
- ``near``: different files whose embeddings have a cosine of at least :data:`NEAR`:
  re-encodes, resizes, small crops, the same photo with other metadata.
- ``similar``: at least :data:`SIMILAR`, a lower cosine: burst shots, the same scene.

The defaults are for CLIP ViT-B/32-class models (other models' cosines are on other
scales). :data:`NEAR`, 0.99, is immich's duplicate detection default for its ViT-B-32__openai
model (``maxDistance`` 0.01 of cosine distance, PR 10703; first 0.03, then 0.0155 "on datasets
with closely similar assets", PR 9781) and NVIDIA NeMo Curator's semantic dedup ``eps=0.01``
(cosine >= 0.99; its ``eps=0.001`` catches exact copies). Even at 0.99 immich users find
distinct exposures grouped (issue 31487): bursts reach such cosines, which is why similar shots
are a tier of their own. :data:`SIMILAR`, 0.95, is the cut suggested for CLIP duplicates or near
duplicates (openai/CLIP issue 260), below immich's first 0.97. A small crop may fall under 0.99
with a real model and then lands in ``similar``.

Grouping never chains: a group is a *keeper* and the files within the tier's threshold *of
that keeper*, so every extra is at least that similar to the file kept. Candidates are taken
best keeper first (:func:`keep_order`); each seed takes its neighbours not yet in a group. A
chain A~B~C with A and C apart is one group only when B is the best of the three to keep (a
star, both within the threshold of B: at 0.99 any two members are then at least cos(2
arccos 0.99) = 0.96 alike), never through a chain of intermediates as connected components
would (fastdup issue 302: members at 0.82 in components of 0.97). Near groups are made
first; similar groups only of what is left.

Each file is in one group, in the strictest tier holding it, with one exception: an exact
group's keeper also stands for its content in the near or similar group holding that content
(the other copies stay in the exact group only). So the keeper of every near and similar group
is no extra anywhere, and deleting every extra (every member but the keeper) leaves, for each
deleted file, a kept file of the same content or within its tier's threshold of that content.

Which to keep: the largest resolution (width x height), then the oldest capture time (EXIF,
else the file's modification time), then the oldest file (a copy is newer than its original),
then the shortest path. The index's ``width``, ``height``
and ``taken`` columns say; a NULL is read from the file's header for group candidates only.

Scale: the cosines are blocked matrix products over the model's vector cache
(:func:`clipcli.vectors.load_matrix`, :mod:`clipcli.pairs`): memory is the vectors plus one
tile plus the pairs kept, never N x N.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Sequence

import numpy as np

from .errors import InputError, NoVectorsError, OutputError, OutputExistsError
from .feedback import SILENT, Feedback
from .fsutil import named
from .index import Index, key_range, path_key
from .pairs import similar_pairs, star_groups

TIERS = ("exact", "near", "similar")
NEAR = 0.99
SIMILAR = 0.95
SHEET = re.compile(r"^\d{4,}-(exact|near|similar)\.png$")


@dataclass(frozen=True)
class Member:
    """One file of a group: ``taken`` in Unix seconds (the capture time, else the file's
    modification time), ``similarity`` its cosine to the group's keeper (1.0 for the keeper
    and exact copies), ``mtime`` the file's modification time."""

    path: bytes
    size: int
    width: int | None
    height: int | None
    taken: float | None
    similarity: float = 1.0
    mtime: float | None = None

    @property
    def name(self) -> str:
        return os.fsdecode(self.path)


@dataclass(frozen=True)
class Group:
    """A tier's group: the keeper first, then the others by similarity to it."""

    tier: str
    members: tuple[Member, ...]

    @property
    def keep(self) -> Member:
        return self.members[0]

    @property
    def extras(self) -> tuple[Member, ...]:
        return self.members[1:]

    @property
    def score(self) -> float:
        """The lowest similarity to the keeper within the group (1.0 for exact copies)."""
        return min(m.similarity for m in self.extras)


def keep_order(member: Member) -> tuple:
    """Sorts the file to keep first: largest width x height, then oldest (taken, then the file's
    own modification time: a copy is newer than what it copies), then shortest path."""
    pixels = (member.width or 0) * (member.height or 0)
    return (-pixels, member.taken if member.taken is not None else math.inf,
            member.mtime if member.mtime is not None else math.inf, len(member.path), member.path)


def check_tiers(tiers: Sequence[str], near: float = NEAR, similar: float = SIMILAR) -> None:
    """Refuse unknown or no tiers, thresholds that are no cosines, and a similar threshold above the near one."""
    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise InputError(f"{','.join(tiers) or 'nothing'}: choose one or more of {', '.join(TIERS)}", option="tiers")
    for option, value in (("near", near), ("similar", similar)):
        if not (-1.0 <= value <= 1.0):  # False for NaN
            raise InputError(f"{value}: give a cosine, a number from -1 to 1", option=option)
    if "near" in tiers and "similar" in tiers and similar > near:
        raise InputError(f"{similar} is above the near threshold {near}: similar shots are the looser tier",
                         option="similar")


# ----------------------------------------------------------------------------- reading the index


def _places(under: Sequence[str]) -> list[tuple[bytes, bytes, bytes]]:
    return [(key, *key_range(key)) for key in (path_key(named(place, "a place to look in")) for place in under)]


def _scope(places: list[tuple[bytes, bytes, bytes]], column: str = "path") -> tuple[str, list]:
    """SQL limiting ``column`` to files at or under ``places`` (nothing: every file)."""
    if not places:
        return "", []
    terms = " OR ".join(f"({column} >= ? AND {column} < ?) OR {column} = ?" for _ in places)
    return f" AND ({terms})", [value for key, low, high in places for value in (low, high, key)]


def _inside(path: bytes, places: list[tuple[bytes, bytes, bytes]]) -> bool:
    return not places or any(path == key or path.startswith(low) for key, low, _ in places)


def _member(path: bytes, size: int, mtime_ns: int, width: int | None, height: int | None,
            taken: float | None) -> Member:
    """A file row as a :class:`Member`; what the index does not know yet is read from the
    file's header (the size), or is its modification time (the capture time)."""
    if width is None or height is None:
        from .metadata import read_metadata

        read = read_metadata(os.fsdecode(path), mtime_ns)
        width, height = read.width, read.height
        taken = taken if taken is not None else read.taken
    return Member(path, size, width, height, taken if taken is not None else mtime_ns / 1e9, mtime=mtime_ns / 1e9)


_COLUMNS = "f.path, f.size, f.mtime_ns, f.width, f.height, f.taken"
# A video's frames (content "SHA256#t=SECONDS", clipcli.video) are no photos: a video is compared
# whole, by its own row's content, in the exact tier only.
def _not_frame(column: str = "sha256") -> str:
    return f"instr({column}, '#') = 0"


def _exact(index: Index, places: list) -> list[Group]:
    where, args = _scope(places)
    shas = [row[0] for row in index.db.execute(
        f"SELECT sha256 FROM files WHERE sha256 IS NOT NULL AND {_not_frame()}{where} GROUP BY sha256 "
        "HAVING count(*) > 1", args)]
    copies: dict[str, list[Member]] = {}
    for start in range(0, len(shas), 500):
        chunk = shas[start : start + 500]
        for *row, sha in index.db.execute(f"SELECT {_COLUMNS}, f.sha256 FROM files f WHERE f.sha256 IN "
                                          f"({','.join('?' * len(chunk))})", chunk):
            if _inside(row[0], places):
                copies.setdefault(sha, []).append(_member(*row))
    return [Group("exact", tuple(sorted(files, key=keep_order))) for files in copies.values() if len(files) > 1]


def _files_of(index: Index, model: int, vector_ids: np.ndarray, places: list) -> dict[int, list[Member]]:
    """The files in scope holding each of ``vector_ids`` (a content may be several files)."""
    found: dict[int, list[Member]] = {}
    wanted = [int(v) for v in vector_ids]
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        for *row, vector_id in index.db.execute(
                f"SELECT {_COLUMNS}, v.id FROM vectors v JOIN files f ON f.sha256 = v.sha256 "
                f"WHERE +v.model_id = ? AND v.id IN ({','.join('?' * len(chunk))})", (model, *chunk)):
            if _inside(row[0], places):
                found.setdefault(vector_id, []).append(_member(*row))
    return found


def _nodes(index: Index, model: int, places: list) -> tuple[np.ndarray, np.ndarray]:
    """``(vector ids, vectors)`` of the contents of the files in scope, a subset of the cache copied."""
    from .vectors import load_matrix

    ids, vectors = load_matrix(index, model)
    frames = index.db.execute(f"SELECT id FROM vectors WHERE model_id = ? AND NOT {_not_frame()} LIMIT 1",
                              (model,)).fetchall()
    if not places and not frames:
        return ids, vectors
    where, args = _scope(places, "f.path")
    wanted = np.array(sorted(row[0] for row in index.db.execute(
        "SELECT DISTINCT v.id FROM files f CROSS JOIN vectors v ON v.sha256 = f.sha256 AND v.model_id = ? "
        f"WHERE {_not_frame('v.sha256')}{where}", (model, *args))), np.int64)
    rows = np.searchsorted(ids, wanted)
    rows = rows[(rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == wanted)] if len(ids) else rows[:0]
    return ids[rows], np.ascontiguousarray(vectors[rows])


def _by_vectors(index: Index, model: int, thresholds: dict[str, float], places: list,
                rows: int | None, cols: int | None) -> list[Group]:
    ids, vectors = _nodes(index, model, places)
    left, right, score = similar_pairs(vectors, min(thresholds.values()), rows=rows, cols=cols)
    candidates = np.unique(np.concatenate([left, right]))
    files = _files_of(index, model, ids[candidates], places)
    keepers = {int(node): min(files[int(ids[node])], key=keep_order) for node in candidates if int(ids[node]) in files}
    rank = np.full(len(ids), len(ids), np.int64)  # nodes without a file in scope: never seeds
    for place, node in enumerate(sorted(keepers, key=lambda node: keep_order(keepers[node]))):
        rank[node] = place
    free = np.zeros(len(ids), bool)
    free[list(keepers)] = True
    groups = []
    for tier in ("near", "similar"):
        if tier in thresholds:
            for seed, mates, similarities in star_groups(left, right, score, thresholds[tier], rank, free):
                others = (replace(keepers[int(m)], similarity=min(1.0, round(float(s), 6)))
                          for m, s in zip(mates, similarities))
                groups.append(Group(tier, (keepers[seed], *others)))
    return groups


def find_duplicates(index: Index, model: int | None, *, tiers: Sequence[str] = TIERS, near: float = NEAR,
                    similar: float = SIMILAR, under: Sequence[str] = (), rows: int | None = None,
                    cols: int | None = None) -> list[Group]:
    """The duplicate groups of ``index``'s files (those at or under ``under``, if given) in
    ``tiers``, by tier, then by the keeper's path. ``model`` (an index model id, see
    :func:`model_of`) is needed for the near and similar tiers only."""
    check_tiers(tiers, near, similar)
    places = _places(under)
    thresholds = {tier: value for tier, value in (("near", near), ("similar", similar)) if tier in tiers}
    with index.guard():
        groups = _exact(index, places) if "exact" in tiers else []
        if thresholds:
            if model is None:
                raise NoVectorsError(f"{index.path} holds no vectors to compare for near and similar photos")
            groups += _by_vectors(index, model, thresholds, places, rows, cols)
    groups = [found for group in groups if (found := _on_disk(group)) is not None]
    return sorted(groups, key=lambda g: (TIERS.index(g.tier), g.keep.path))


def _on_disk(group: Group) -> Group | None:
    """``group`` as the disk has it now, so that no extra is ever the last copy: a member gone
    since the index saw it is left out; two paths to one file (a link, a folder indexed by two
    names) are one member, the path that is not a link. A near or similar group whose keeper is
    gone is dropped (its similarities were to that file); None when one member is left."""
    members: list[Member] = []
    files: dict[tuple[int, int], int] = {}  # (device, inode) -> its place in members
    for member in group.members:
        try:
            info = os.stat(member.path)
        except OSError:
            if member is group.keep and group.tier != "exact":
                return None
            continue
        place = files.get((info.st_dev, info.st_ino))
        if place is None:
            files[(info.st_dev, info.st_ino)] = len(members)
            members.append(member)
        elif os.path.islink(members[place].path) and not os.path.islink(member.path):
            members[place] = replace(member, similarity=members[place].similarity)
    if len(members) < 2:
        return None
    if group.tier == "exact":  # the same content: the keep rule chooses again among what is there
        members.sort(key=keep_order)
    return Group(group.tier, tuple(members))


def model_of(index: Index, name: str, *, arch: str | None = None, cache_dir: str | os.PathLike | None = None,
             feedback: Feedback = SILENT) -> int:
    """The id of the model called ``name`` in ``index``: the one it recorded under that name,
    else found by its weights (never loaded)."""
    held = [m for m in index.models() if m["vectors"]]
    if not held:  # nothing to look up (and no model to download for it)
        raise NoVectorsError(f"{index.path} holds no vectors")
    same = [m["id"] for m in held if m["name"] == name]
    if len(same) == 1:
        return same[0]
    from .loading import resolve, source_key

    model = index.model_id(key=source_key(resolve(name, arch=arch, cache_dir=cache_dir, feedback=feedback)))
    if model is None or model not in {m["id"] for m in held}:
        raise NoVectorsError(f"{index.path} holds no vectors of {name}")
    return model


# ----------------------------------------------------------------------------- what comes out


def record(group: Group, number: int) -> dict:
    """A group as the command writes it."""
    from .metadata import iso

    members = [{"image": m.name, "size": m.size, "width": m.width, "height": m.height, "taken": iso(m.taken),
                "similarity": m.similarity} for m in group.members]
    return {"group": number, "tier": group.tier, "score": group.score, "keep": group.keep.name, "members": members}


def extras(groups: Sequence[Group]) -> list[bytes]:
    """Every member but the keeper, group by group: what could go once a person agrees."""
    return [m.path for group in groups for m in group.extras]


def sheet_name(group: Group, number: int) -> str:
    return f"{number:04d}-{group.tier}.png"


def check_sheet_folder(folder: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, a sheet folder that is a file, cannot be made or written, or
    holds sheets of an earlier run (unless ``overwrite``)."""
    from .display import display

    place = Path(named(folder, "the contact sheet folder"))
    if place.exists() and not place.is_dir():
        raise OutputError(f"cannot write contact sheets into {display(str(place))}: it is not a folder")
    parent = place if place.is_dir() else place.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write contact sheets into {display(str(place))}: "
                          f"{display(str(parent))} is missing or not writable")
    if place.is_dir() and not overwrite and any(SHEET.match(p.name) for p in place.iterdir()):
        raise OutputExistsError(f"{display(str(place))} already holds contact sheets", fix="overwrite")


@dataclass(frozen=True)
class _Cell:
    """What :func:`clipcli.sheet.render` reads of one result."""

    name: str
    rank: str
    score: float
    taken: float | None
    prob: None = None


def draw_sheet(group: Group, stream: IO[bytes]) -> list[str]:
    """A PNG contact sheet of ``group``: the keeper first, captioned "keep" and framed in green,
    then the others with their similarity to it."""
    import io

    from PIL import Image, ImageDraw

    from .sheet import CAPTION, CELL, render

    cells = [_Cell(m.name, "1 keep" if at == 0 else str(at + 1), m.similarity, m.taken)
             for at, m in enumerate(group.members)]
    drawn = io.BytesIO()
    notes = render(cells, drawn, "png")
    with Image.open(drawn) as sheet:
        sheet.load()
    ImageDraw.Draw(sheet).rectangle((1, 1, CELL - 2, CELL + CAPTION - 2), outline=(0, 160, 0), width=3)
    sheet.save(stream, format="PNG")
    return notes


def write_sheets(groups: Sequence[Group], folder: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """One contact sheet per group in ``folder`` (made if missing): ``0001-near.png`` ...;
    sheets of an earlier run that this one did not write again are removed with ``overwrite``
    (they would describe groups that are gone). Returns notes for the user."""
    from .fsutil import atomic_write

    check_sheet_folder(folder, overwrite)
    place = Path(folder)
    place.mkdir(exist_ok=True)
    written, notes = set(), []
    for number, group in enumerate(groups, start=1):
        name = sheet_name(group, number)
        with atomic_write(place / name, overwrite=overwrite) as stream:
            notes += [f"{name}: {note}" for note in draw_sheet(group, stream)]
        written.add(name)
    for stale in place.iterdir():
        if SHEET.match(stale.name) and stale.name not in written:
            stale.unlink(missing_ok=True)
    return notes
