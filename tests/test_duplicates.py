"""`clipcli duplicates`: the three tiers on a real index, grouping without chains, the keep
rule, the outputs (records, NUL-separated extras, contact sheets), PATH limiting, and the
blocked similarity computation against a brute-force one.

A tiny random model cannot judge photos, so the thresholds of the index tests are set between
the cosines it actually gives (computed here, and the premise they rest on asserted); the
grouping itself is tested on hand-made unit vectors.
"""

from __future__ import annotations

import json
import os
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.duplicates import Member, find_duplicates, keep_order, model_of
from clipcli.index import Index
from clipcli.pairs import similar_pairs, star_groups
from clipcli.vectors import load_matrix

DATA = Path(__file__).parent / "data"
runner = CliRunner()
OLD, NEW = 1_600_000_000, 1_700_000_000  # file times: originals, and the copies made later


def cli(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def make_library(root: Path) -> Path:
    """photos/: five distinct photos as JPEG, an exact copy of one under a shorter name (newer),
    a quality-60 re-encode of another (newer) and a 90% centre crop of a third (older, but
    smaller); elsewhere/: one more exact copy of the rocket (newer)."""
    photos, elsewhere = root / "photos", root / "elsewhere"
    photos.mkdir(parents=True)
    elsewhere.mkdir()
    for at, source in enumerate(sorted(DATA.glob("*.*"))):
        if source.suffix in (".png", ".jpg"):
            target = photos / f"{source.stem}.jpg"
            Image.open(source).convert("RGB").save(target, quality=95)
            os.utime(target, (OLD + at, OLD + at))
    shutil.copy(photos / "astronaut.jpg", photos / "astro.jpg")
    Image.open(photos / "chelsea.jpg").save(photos / "chelsea-q60.jpg", quality=60)
    rocket = Image.open(photos / "rocket.jpg")
    width, height = rocket.size
    rocket.crop((width // 20, height // 20, width - width // 20, height - height // 20)).save(
        photos / "rocket-crop.jpg", quality=95)
    shutil.copy(photos / "rocket.jpg", elsewhere / "rocket.jpg")
    for name, when in (("astro.jpg", NEW), ("chelsea-q60.jpg", NEW), ("rocket-crop.jpg", OLD - 100)):
        os.utime(photos / name, (when, when))
    os.utime(elsewhere / "rocket.jpg", (NEW, NEW))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_vit_checkpoint):
    """(root, index, model) built once with `clipcli index`, in an isolated home."""
    root = tmp_path_factory.mktemp("library")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(root / "home"))
        patch.setenv("CLIPCLI_CACHE_DIR", str(root / "cache"))
        patch.setenv("CLIPCLI_OFFLINE", "1")
        make_library(root)
        db = root / "index.sqlite3"
        cli("index", str(root / "photos"), str(root / "elsewhere"), "--db", str(db), "-m", str(tiny_vit_checkpoint), "-q")
    return root, db, str(tiny_vit_checkpoint)


def cosines(db: Path) -> dict[frozenset, float]:
    """The cosine of every pair of distinct contents, each by the name of its oldest file in photos/."""
    with Index(db, readonly=True) as index:
        ids, vectors = load_matrix(index, 1)
        names = {}
        for path, vector_id in index.db.execute("SELECT f.path, v.id FROM files f JOIN vectors v ON v.sha256 = f.sha256 "
                                             "ORDER BY f.mtime_ns"):
            if b"/photos/" in path:
                names.setdefault(vector_id, os.path.basename(os.fsdecode(path)))
    row = {vector_id: at for at, vector_id in enumerate(ids)}
    return {frozenset((names[a], names[b])): float(vectors[row[a]] @ vectors[row[b]]) for a, b in combinations(names, 2)}


def thresholds(db: Path) -> tuple[float, float, frozenset]:
    """(near, similar, the similar pair) between the tiny model's cosines.

    near: between the two edited pairs (re-encode, crop) and the closest distinct photos; this
    rests on the model scoring both edits above every pair of distinct photos, asserted here
    (the tiny model does: about 0.9998 and 0.995 against at most 0.94). similar: between the
    closest pair of photos left outside near groups and the next one, so one similar group."""
    found = cosines(db)
    edits = {frozenset(("chelsea.jpg", "chelsea-q60.jpg")), frozenset(("rocket.jpg", "rocket-crop.jpg"))}
    distinct = {pair: c for pair, c in found.items() if pair not in edits}
    assert min(found[e] for e in edits) > max(distinct.values()) + 1e-3, found
    near = (min(found[e] for e in edits) + max(distinct.values())) / 2
    edited = {"chelsea.jpg", "chelsea-q60.jpg", "rocket.jpg", "rocket-crop.jpg"}
    left = sorted(((c, pair) for pair, c in distinct.items() if not pair & edited), key=lambda x: x[0], reverse=True)
    assert left[0][0] > left[1][0] + 1e-3
    return near, (left[0][0] + left[1][0]) / 2, left[0][1]


def names(group) -> list[str]:
    return [os.path.relpath(m.name, os.path.dirname(os.path.dirname(m.name))) for m in group.members]


# ----------------------------------------------------------------------------- tiers on a real index


def test_three_tiers_on_an_indexed_folder(built):
    root, db, model = built
    near, similar, pair = thresholds(db)
    with Index(db, readonly=True) as index:
        groups = find_duplicates(index, model_of(index, model), near=near, similar=similar)
    by_tier = {tier: [names(g) for g in groups if g.tier == tier] for tier in ("exact", "near", "similar")}
    # exact: the same bytes; the older file is kept before the shorter name
    assert by_tier["exact"] == [["photos/astronaut.jpg", "photos/astro.jpg"],
                                ["photos/rocket.jpg", "elsewhere/rocket.jpg"]]
    # near: the re-encode with its original (same size: the older); the crop with the larger original
    # (the crop is older: resolution comes first); the rocket's content stands as its exact keeper
    assert by_tier["near"] == [["photos/chelsea.jpg", "photos/chelsea-q60.jpg"],
                               ["photos/rocket.jpg", "photos/rocket-crop.jpg"]]
    # similar: the closest pair of what is left, the larger image kept
    assert len(by_tier["similar"]) == 1 and {n.split("/")[1] for n in by_tier["similar"][0]} == set(pair)
    kept = by_tier["similar"][0][0].split("/")[1]
    sizes = {n: Image.open(root / "photos" / n).size for n in pair}
    assert sizes[kept][0] * sizes[kept][1] == max(w * h for w, h in sizes.values())
    for group in groups:
        assert group.score == min(m.similarity for m in group.extras)
        assert group.score >= {"exact": 1.0, "near": near, "similar": similar}[group.tier] - 1e-6
    crop = next(g for g in groups if g.keep.name.endswith("rocket.jpg") and g.tier == "near").extras[0]
    assert ((crop.width, crop.height), crop.taken) == (Image.open(root / "photos" / "rocket-crop.jpg").size, OLD - 100)
    # tiers chosen alone: near without exact still never reports a content twice
    with Index(db, readonly=True) as index:
        only = find_duplicates(index, model_of(index, model), tiers=["near"], near=near)
    assert [names(g) for g in only] == by_tier["near"]


def test_records_paths0_sheets_and_overwriting(built, tmp_path):
    root, db, model = built
    near, similar, _ = thresholds(db)
    common = ["--db", str(db), "-m", model, "--near", str(near), "--similar", str(similar)]
    records = [json.loads(line) for line in cli("duplicates", *common, "-q").stdout.splitlines()]
    assert [(r["group"], r["tier"]) for r in records] == [(1, "exact"), (2, "exact"), (3, "near"), (4, "near"),
                                                          (5, "similar")]
    first = records[0]
    assert first["keep"] == str(root / "photos" / "astronaut.jpg") and first["score"] == 1.0
    assert first["members"][1] == {"image": str(root / "photos" / "astro.jpg"), "size": os.path.getsize(root / "photos" / "astro.jpg"),
                                   "width": 512, "height": 512, "taken": "2023-11-14T22:13:20Z", "similarity": 1.0}
    extras = cli("duplicates", *common, "-0").stdout_bytes
    assert extras.endswith(b"\0") and extras.split(b"\0")[:-1] == [
        os.fsencode(m["image"]) for r in records for m in r["members"][1:]]
    assert cli("duplicates", *common, "--format", "paths0", "-q").stdout_bytes == extras
    sheets = tmp_path / "dupes"
    cli("duplicates", *common, "-o", str(sheets), "-q")
    assert sorted(p.name for p in sheets.iterdir()) == ["0001-exact.png", "0002-exact.png", "0003-near.png",
                                                        "0004-near.png", "0005-similar.png"]
    assert Image.open(sheets / "0003-near.png").size == (400, 234)  # two cells, the keeper framed
    assert Image.open(sheets / "0003-near.png").getpixel((2, 100))[:3] == (0, 160, 0)
    refused = cli("duplicates", *common, "-o", str(sheets), code=2)
    assert refused.stderr.strip().splitlines() == [f"error: {sheets} already holds contact sheets; "
                                                   "pass --overwrite to replace it"]
    cli("duplicates", *common, "--tiers", "exact", "-o", str(sheets), "--overwrite", "-q")
    assert sorted(p.name for p in sheets.iterdir()) == ["0001-exact.png", "0002-exact.png"]  # stale ones gone


def test_paths_limit_the_groups_and_are_indexed_first(built, tmp_path):
    root, db, model = built
    near, similar, _ = thresholds(db)
    mine = tmp_path / "index.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{db}{suffix}").exists():
            shutil.copy(f"{db}{suffix}", f"{mine}{suffix}")
    common = ["--db", str(mine), "-m", model, "--near", str(near), "--similar", str(similar), "-f", "json", "-q"]
    assert json.loads(cli("duplicates", str(root / "elsewhere"), *common).stdout) == []  # its copy's twin is outside
    inside = json.loads(cli("duplicates", str(root / "photos"), *common).stdout)
    assert all("/elsewhere/" not in m["image"] for r in inside for m in r["members"])
    assert [r["tier"] for r in inside] == ["exact", "near", "near", "similar"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(root / "photos" / "camera.jpg", fresh / "one.jpg")
    shutil.copy(root / "photos" / "camera.jpg", fresh / "two.jpg")
    found = json.loads(cli("duplicates", str(fresh), *common).stdout)
    assert [(r["tier"], [Path(m["image"]).name for m in r["members"]]) for r in found] == [("exact", ["one.jpg", "two.jpg"])]


def test_bad_options_are_one_line(built):
    _, db, _ = built
    for args, text in ((["--near", "0.9", "--similar", "0.95"], "--similar 0.95 is above the near threshold 0.9"),
                       (["--near", "1.5"], "--near 1.5: give a cosine"),
                       (["-0", "--format", "json"], "--print0 prints paths")):
        result = cli("duplicates", "--db", str(db), *args, code=2)
        assert len(result.stderr.strip().splitlines()) == 1 and text in result.stderr
    assert "choose one or more of exact,near,similar" in cli("duplicates", "--db", str(db), "--tiers", "best", code=2).stderr


# ----------------------------------------------------------------------------- pure pieces


def unit(*degrees: float) -> np.ndarray:
    """Unit vectors in a plane, at these angles (the cosine of two is that of their difference)."""
    return np.array([[np.cos(np.radians(d)), np.sin(np.radians(d)), 0.0] for d in degrees], np.float32)


def grouped(vectors: np.ndarray, threshold: float, rank: list[int]) -> list[list[int]]:
    left, right, score = similar_pairs(vectors, threshold, rows=2, cols=3)
    free = np.ones(len(vectors), bool)
    return [[seed, *map(int, mates)] for seed, mates, _ in star_groups(left, right, score, threshold,
                                                                      np.array(rank), free)]


def test_a_chain_never_becomes_one_group():
    # A~B and B~C at 10 degrees (0.985), A and C at 20 degrees (0.940): threshold 0.97
    chain = unit(0, 10, 20)
    assert grouped(chain, 0.97, rank=[0, 1, 2]) == [[0, 1]]  # A kept first: takes B; C has no one left
    assert grouped(chain, 0.97, rank=[2, 1, 0]) == [[2, 1]]
    # B the best to keep: a star, every member within the threshold of B (never A-C through B's chain)
    [star] = grouped(chain, 0.97, rank=[1, 0, 2])
    assert star[0] == 1 and sorted(star[1:]) == [0, 2]
    # a long chain at 10 degree steps: connected components would make one group of 6
    groups = grouped(unit(0, 10, 20, 30, 40, 50), 0.97, rank=[0, 1, 2, 3, 4, 5])
    assert groups == [[0, 1], [2, 3], [4, 5]]
    # members sorted by similarity to the keeper, and nodes already taken are left alone
    left, right, score = similar_pairs(unit(0, 3, 9, 100), 0.98)
    free = np.array([True, True, True, False])
    assert [(s, list(m)) for s, m, _ in star_groups(left, right, score, 0.98, np.arange(4), free)] == [(0, [1, 2])]
    assert not free.any()


def test_the_keep_rule():
    def member(name: str, width, height, taken) -> Member:
        return Member(name.encode(), 1, width, height, taken)

    big_new = member("/p/big_new.jpg", 4000, 3000, NEW)
    small_old = member("/p/s.jpg", 2000, 1500, OLD)
    same_old_long = member("/p/a/long/path.jpg", 4000, 3000, OLD)
    same_old_short = member("/p/b.jpg", 4000, 3000, OLD)
    unknown = member("/p/u.jpg", None, None, OLD - 1)
    ranked = sorted([unknown, small_old, big_new, same_old_long, same_old_short], key=keep_order)
    assert ranked == [same_old_short, same_old_long, big_new, small_old, unknown]
    # an exact copy taken at the same moment: the older file is the original, whatever its name
    original = Member(b"/p/2024/IMG_0001.jpg", 1, 4000, 3000, OLD, mtime=OLD)
    copy = Member(b"/p/c/IMG_0001 (1).jpg", 1, 4000, 3000, OLD, mtime=NEW)
    assert sorted([copy, original], key=keep_order) == [original, copy]
    # 3000 x 4000 (portrait) is as large as 4000 x 3000: pixels, not width
    assert sorted([big_new, member("/p/portrait.jpg", 3000, 4000, OLD)], key=keep_order)[0].name == "/p/portrait.jpg"


@pytest.mark.parametrize("fast", [False, True])
def test_blocked_pairs_equal_a_brute_force_computation(fast):
    """In float32, and with the bfloat16 first pass (the same pairs, float32 scores): pairs planted
    on both sides of the threshold, closer to it than bfloat16 rounding, land where float64 says."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    vectors[500:520] = vectors[:20] + 0.05 * rng.standard_normal((20, 16)).astype(np.float32)  # planted near pairs
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    threshold = 0.6
    for k, delta in enumerate(np.linspace(-0.004, 0.004, 40)):  # cos(angle) = threshold + delta
        angle = np.arccos(threshold + delta)
        vectors[900 + 2 * k] = 0.0
        vectors[900 + 2 * k, k % 16] = 1.0
        vectors[901 + 2 * k] = 0.0
        vectors[901 + 2 * k, k % 16], vectors[901 + 2 * k, (k + 1) % 16] = np.cos(angle), np.sin(angle)
    exact = vectors.astype(np.float64) @ vectors.astype(np.float64).T  # (N, N)
    i, j = np.nonzero(np.triu(exact >= threshold, k=1))
    for rows, cols in ((64, 96), (1000, 1000), (7, 1024)):  # tiles that do not divide N, one tile, thin rows
        left, right, score = similar_pairs(vectors, threshold, rows=rows, cols=cols, fast=fast)
        assert np.all(left < right)
        found = dict(zip(zip(left.tolist(), right.tolist()), score.tolist()))
        expected = {(a, b) for a, b in zip(i.tolist(), j.tolist()) if abs(exact[a, b] - threshold) > 1e-6}
        assert expected <= set(found) and all(abs(exact[a, b] - threshold) <= 1e-6 for a, b in set(found) - expected)
        assert max(abs(s - exact[a, b]) for (a, b), s in found.items()) < 1e-6
    assert len(found) > 1000 and {(k, 500 + k) for k in range(20)} <= set(found)


def test_a_vector_that_is_not_finite_pairs_with_nothing_and_hides_nothing():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    vectors[150:160] = vectors[:10] + 0.01
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[42] = np.nan
    plain = similar_pairs(vectors, 0.9, fast=False)
    fast = similar_pairs(vectors, 0.9, fast=True)
    assert len(plain[0]) >= 10 and sorted(zip(*plain[:2])) == sorted(zip(*fast[:2]))


def test_an_extra_is_never_the_keepers_own_file(tmp_path, tiny_vit_checkpoint):
    """Two paths to one file (a link) are one photo, and a file deleted since it was indexed is
    no keeper: `-0 | xargs rm` could otherwise remove the last copy."""
    import os
    import shutil

    from typer.testing import CliRunner

    from clipcli.cli import app

    folder = tmp_path / "linked"
    folder.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "rocket.jpg", folder / "b-rocket.jpg")
    os.symlink(folder / "b-rocket.jpg", folder / "a.jpg")  # the shorter path: the keeper by name
    shutil.copy(Path(__file__).parent / "data" / "chelsea.png", folder / "c.png")
    shutil.copy(folder / "c.png", folder / "c-copy.png")
    db = tmp_path / "linked.sqlite3"

    def groups(*args: str) -> list[dict]:
        result = CliRunner().invoke(app, ["duplicates", *args, "--db", str(db), "-m", str(tiny_vit_checkpoint),
                                          "--tiers", "exact", "-f", "json", "-q"])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    found = groups(str(folder))
    assert [g["keep"] for g in found] == [str(folder / "c.png")]  # the link and its target: one file
    (folder / "c.png").unlink()  # the keeper goes; the index has not seen it
    assert groups() == []
