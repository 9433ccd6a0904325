"""Videos as frames (clipcli.video): a frame every --video-interval seconds, named VIDEO#t=SECONDS,
through encode, index, search, duplicates and serve. The videos are made here with PyAV: H.264 in
MP4 and VP8 in WebM, 64x48, 10 frames a second, each frame a flat colour of its own, so the frame
read at a time is told by the colour nearest to what it shows."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipcli.batching import embed_images, image_step
from clipcli.cli import app
from clipcli.errors import ItemError
from clipcli.images import DecodeOptions, read_image
from clipcli.items import Item, expand_inputs

av = pytest.importorskip("av")

DATA = Path(__file__).parent / "data"
FPS = 10


def colour(frame: int) -> tuple[int, int, int]:
    return ((frame * 9) % 256, 255 - (frame * 5) % 256, (frame * 13 + 40) % 256)


def make_video(path: Path, seconds: float = 6.0, codec: str = "libx264", created: str | None = None,
               faststart: bool = False, offset: int = 0) -> Path:
    """A video whose frame ``i`` is flat :func:`colour` ``(i + offset)``."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        if created:
            container.metadata["creation_time"] = created
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "10"} if codec == "libx264" else {"crf": "4", "b:v": "4M"}  # colours told apart
        for i in range(int(seconds * FPS)):
            pixels = np.empty((48, 64, 3), np.uint8)
            pixels[:] = colour(i + offset)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def shown(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3).mean(axis=0)


def nearest(image, frames: int = 200) -> int:
    """The frame whose colour ``image`` shows."""
    return int(np.argmin([np.abs(shown(image) - colour(i)).sum() for i in range(frames)]))


@pytest.mark.parametrize("codec, suffix", [("libx264", "mp4"), ("libvpx", "webm")])
def test_a_video_is_its_frames_every_interval_named_by_time(tmp_path, codec, suffix):
    make_video(tmp_path / f"clip.{suffix}", seconds=6.0, codec=codec)
    items = expand_inputs([str(tmp_path)], video_interval=2)
    assert [item.name.rpartition("/")[2] for item in items] == [f"clip.{suffix}#t={t}" for t in (0, 2, 4)]
    for item in items:
        image = read_image(item)
        assert image.size == (64, 48) and image.mode == "RGB"
        assert nearest(image) == round(item.frame * FPS), item.name
    assert [i.name.rpartition("#")[2] for i in expand_inputs([str(tmp_path)], video_interval=0)] == ["t=0"]
    assert len(expand_inputs([str(tmp_path / f"clip.{suffix}")])) == 2  # the default: every 5 s
    assert len(expand_inputs([str(tmp_path)], video_interval=None)) == 1  # one item: the file


def test_frames_embed_like_the_same_pixels_as_png(tmp_path, tiny_vit_checkpoint):
    from clipcli.pipeline import load_model

    model = load_model(str(tiny_vit_checkpoint), device="cpu")
    make_video(tmp_path / "clip.mp4", seconds=3.0)
    frames = expand_inputs([str(tmp_path / "clip.mp4")], video_interval=1)
    _, options = image_step(model, DecodeOptions())
    twins = []
    for item in frames:  # the frame as the pipeline decodes it, saved losslessly
        twin = tmp_path / f"{item.frame}.png"
        read_image(item, options).save(twin)
        twins.append(Item(name=str(twin), path=str(twin)))
    results = list(embed_images(model, frames + twins, batch_size=8, workers=2))
    assert [r.error for r in results] == [None] * 6 and [r.name for r in results[:3]] == [i.name for i in frames]
    for frame, twin in zip(results[:3], results[3:]):
        assert np.abs(frame.embedding - twin.embedding).max() <= 1e-6, frame.name


def test_a_video_damaged_halfway_gives_its_frames_up_to_the_damage(tmp_path, tiny_vit_checkpoint):
    whole = make_video(tmp_path / "whole.mp4", seconds=10.0, faststart=True)
    data = whole.read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(data[: len(data) // 2])  # the index (moov) is whole, the media half there
    frames = expand_inputs([str(broken)], video_interval=2)
    assert [item.frame for item in frames] == [0, 2, 4, 6, 8]
    reasons = []
    for item in frames:
        try:
            read_image(item)
            reasons.append(None)
        except ItemError as error:
            reasons.append(str(error))
    assert reasons[0] is None and reasons[-1] is not None, reasons
    assert all("video frame at 8 s" in r for r in reasons[-1:]), reasons
    result = CliRunner().invoke(app, ["encode", str(broken), "-m", str(tiny_vit_checkpoint), "-f", "jsonl",
                                      "--video-interval", "2"])
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1 and len(records) == 5
    assert records[0]["status"] == "ok" and records[-1]["status"] == "error"
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    [failed] = expand_inputs([str(not_a_video)])
    assert failed.error.startswith("cannot open video"), failed.error


def test_without_pyav_a_video_fails_naming_the_extra(tmp_path, monkeypatch):
    import sys

    make_video(tmp_path / "clip.mp4", seconds=1.0)
    monkeypatch.setitem(sys.modules, "av", None)
    [item] = expand_inputs([str(tmp_path / "clip.mp4")])
    assert 'pip install "clipcli[photos]"' in item.error and item.error.fix == "decoder"


def index(db: Path, model: Path, *paths: Path, interval: str | None = "2") -> dict:
    asked = ["--video-interval", interval] if interval is not None else []
    result = CliRunner().invoke(app, ["index", *map(str, paths), "--db", str(db), "-m", str(model), "-f", "json",
                                      "-q", *asked])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def rows(db: Path) -> dict[str, tuple]:
    from clipcli.index import Index

    with Index(db, readonly=True) as opened, opened.guard():
        return {Path(path.decode()).name: (sha, taken) for path, sha, taken in
                opened.db.execute("SELECT path, sha256, taken FROM files")}


def test_the_index_holds_a_row_per_frame_and_follows_the_video(tmp_path, tiny_vit_checkpoint):
    folder, db = tmp_path / "photos", tmp_path / "index.sqlite3"
    folder.mkdir()
    shutil.copy(DATA / "rocket.jpg", folder / "rocket.jpg")
    os.utime(folder / "rocket.jpg", (1.6e9, 1.6e9))  # 2020: before the video
    make_video(folder / "clip.mp4", seconds=6.0, created="2024-07-01T10:00:00.000000Z")
    first = index(db, tiny_vit_checkpoint, folder)
    assert (first["added"], first["embedded"]) == (4, 4)
    found = rows(db)
    assert sorted(found) == ["clip.mp4", "clip.mp4#t=0", "clip.mp4#t=2", "clip.mp4#t=4", "rocket.jpg"]
    video_sha, created = found["clip.mp4"]
    assert found["clip.mp4#t=4"] == (f"{video_sha}#t=4", created + 4)  # the video's time plus the frame's
    again = index(db, tiny_vit_checkpoint, folder)
    assert (again["unchanged"], again["model_loaded"]) == (4, False)

    search = CliRunner().invoke(app, ["search", "--db", str(db), "-m", str(tiny_vit_checkpoint), "a rocket", "-k",
                                      "10", "-f", "json", "--after", "2024-07-01", "--sort", "date"])
    assert search.exit_code == 0, search.stderr
    hits = json.loads(search.stdout)
    assert [Path(h["image"]).name for h in hits] == ["clip.mp4#t=4", "clip.mp4#t=2", "clip.mp4#t=0"]  # newest first
    assert [h["taken"] for h in hits] == ["2024-07-01T10:00:04Z", "2024-07-01T10:00:02Z", "2024-07-01T10:00:00Z"]

    shutil.copy(folder / "clip.mp4", folder / "copy.mp4")  # the same content: its frames' vectors reused
    copied = index(db, tiny_vit_checkpoint, folder)
    assert (copied["added"], copied["unchanged"], copied["model_loaded"]) == (3, 4, False)
    make_video(folder / "clip.mp4", seconds=4.0, offset=20)  # changed: every frame read again
    changed = index(db, tiny_vit_checkpoint, folder)
    assert (changed["updated"], changed["embedded"]) == (2, 2)
    assert sorted(n for n in rows(db) if n.startswith("clip")) == ["clip.mp4", "clip.mp4#t=0", "clip.mp4#t=2"]
    wider = index(db, tiny_vit_checkpoint, folder, interval="3")  # another interval: other frames
    assert sorted(n for n in rows(db) if n.startswith("copy")) == ["copy.mp4", "copy.mp4#t=0", "copy.mp4#t=3"]
    # each video keeps #t=0 (and the photo is unchanged), reads #t=3, drops #t=2 (and copy's #t=4)
    assert (wider["unchanged"], wider["added"], wider["removed"]) == (3, 2, 3)
    assert rows(db)["copy.mp4#t=3"][1] == created + 3  # the frames read again keep their dates
    kept = index(db, tiny_vit_checkpoint, folder, interval=None)  # no interval asked: each video's own
    assert (kept["unchanged"], kept["model_loaded"]) == (5, False)
    (folder / "copy.mp4").unlink()
    gone = index(db, tiny_vit_checkpoint, folder, interval=None)
    assert gone["removed"] == 2 and not any(n.startswith("copy") for n in rows(db))


def test_a_frame_is_served_and_drawn_from_its_video(tmp_path, tiny_vit_checkpoint):
    from PIL import Image

    from clipcli.index import Index
    from clipcli.serve.files import Thumbnails, file_ids, resolve_id
    from clipcli.sheet import render

    folder, db = tmp_path / "videos", tmp_path / "index.sqlite3"
    folder.mkdir()
    make_video(folder / "clip.mp4", seconds=4.0)
    index(db, tiny_vit_checkpoint, folder)
    frame = str(folder / "clip.mp4") + "#t=2"
    with Index(db, readonly=True) as opened:
        [file_id] = file_ids(opened, [frame.encode()])
        assert resolve_id(opened, file_id) == frame
    import io

    thumbnail = Image.open(io.BytesIO(Thumbnails().thumbnail(frame)))
    assert thumbnail.format == "JPEG" and nearest(thumbnail) == 20
    data, kind = Thumbnails().full(frame)
    assert kind == "image/jpeg" and Image.open(io.BytesIO(data)).size == (64, 48)

    class Cell:
        name, rank, score, taken, prob = frame, "1", 0.5, None, None

    sheet = io.BytesIO()
    assert render([Cell()], sheet, "png") == []  # drawn, not a blank cell with a note


def two_copies_indexed(tmp_path: Path, model: Path, seconds: float) -> Path:
    """videos/a.mp4 and its copy b.mp4, indexed every 2 s: the index's path."""
    folder, db = tmp_path / "videos", tmp_path / "index.sqlite3"
    folder.mkdir()
    make_video(folder / "a.mp4", seconds=seconds)
    shutil.copy(folder / "a.mp4", folder / "b.mp4")
    index(db, model, folder)
    return db


def test_duplicates_compare_videos_whole_not_their_frames(tmp_path, tiny_vit_checkpoint):
    db = two_copies_indexed(tmp_path, tiny_vit_checkpoint, 6.0)
    result = CliRunner().invoke(app, ["duplicates", "--db", str(db), "-m", str(tiny_vit_checkpoint), "-f", "json",
                                      "--similar", "0.5"])
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    assert [(g["tier"], sorted(Path(m["image"]).name for m in g["members"])) for g in groups] == [
        ("exact", ["a.mp4", "b.mp4"])]


def test_the_interval_is_checked():
    from clipcli.errors import InputError
    from clipcli.video import check_interval, split_frame

    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(InputError, match="seconds between frames"):
            check_interval(bad)
    assert split_frame("a/clip.mp4#t=2.5") == ("a/clip.mp4", 2.5)
    assert split_frame("a/photo.jpg#t=2") == ("a/photo.jpg#t=2", None)  # no video: a name like any other
    assert split_frame("a/clip.mp4#t=-1") == ("a/clip.mp4#t=-1", None)


def test_search_paths_name_the_video_once(tmp_path, tiny_vit_checkpoint):
    """`-0 | xargs -0 mpv`: a path that exists, not VIDEO#t=SECONDS, and each video once."""
    folder, db = tmp_path / "videos", tmp_path / "index.sqlite3"
    folder.mkdir()
    make_video(folder / "clip.mp4", seconds=6.0)
    index(db, tiny_vit_checkpoint, folder)
    result = CliRunner().invoke(app, ["search", "--db", str(db), "-m", str(tiny_vit_checkpoint), "a clip", "-0"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == str(folder / "clip.mp4").encode() + b"\0"
    # a frame (or a video: its first) as the query finds itself first
    for query, best in ((f"{folder / 'clip.mp4'}#t=4", "clip.mp4#t=4"), (str(folder / "clip.mp4"), "clip.mp4#t=0")):
        found = CliRunner().invoke(app, ["search", "--db", str(db), "-m", str(tiny_vit_checkpoint), query, "-f", "json"])
        assert found.exit_code == 0, found.stderr
        assert Path(json.loads(found.stdout)[0]["image"]).name == best and json.loads(found.stdout)[0]["score"] > 0.9999


# ----------------------------------------------------------------------------- hostile and odd videos


def test_hostile_and_odd_videos_are_failed_items_never_crashes(tmp_path, tiny_vit_checkpoint):
    """A codec FFmpeg cannot decode, a header claiming a huge duration (or an interval that small),
    a time past the end: one failed item each, with its reason; the run goes on."""
    from clipcli.errors import InputError
    from clipcli.video import MAX_FRAMES, frame_times, read_frame

    clip = make_video(tmp_path / "clip.mp4", seconds=3.0)
    data = clip.read_bytes()
    (tmp_path / "alien.mp4").write_bytes(data.replace(b"avc1", b"zzzz"))  # a codec no decoder knows
    [alien] = expand_inputs([str(tmp_path / "alien.mp4")])
    assert alien.error and "codec" in alien.error, alien.error
    result = CliRunner().invoke(app, ["index", str(tmp_path / "alien.mp4"), str(clip), "--db",
                                      str(tmp_path / "a.sqlite3"), "-m", str(tiny_vit_checkpoint), "-f", "json", "-q"])
    assert result.exit_code == 1 and json.loads(result.stdout)["failed"] == 1, (result.stdout, result.stderr)
    with pytest.raises(ItemError, match=f"over the limit of {MAX_FRAMES}"):
        frame_times(1e12, 5.0)  # a hostile header's duration
    with pytest.raises(InputError, match="0.001 or more"):
        expand_inputs([str(clip)], video_interval=1e-4)
    with pytest.raises(ItemError, match="the stream ends before it"):
        read_frame(str(clip), 8.0, DecodeOptions())
    assert np.abs(shown(read_frame(str(clip), 2.95, DecodeOptions())) - colour(29)).max() <= 8  # the last frame


def test_a_transport_stream_starting_late_gives_the_frames_asked(tmp_path):
    """MPEG-TS starts its clock at 1.4 s and has no seek index: frames are timed from the start."""
    path = tmp_path / "camcorder.mts"
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(60):
            pixels = np.empty((48, 64, 3), np.uint8)
            pixels[:] = colour(i)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].start_time > 0  # the case at hand
    frames = expand_inputs([str(path)], video_interval=1)
    assert [item.frame for item in frames] == [0, 1, 2, 3, 4, 5]
    assert [nearest(read_image(item)) for item in frames] == [0, 10, 20, 30, 40, 50]


def test_a_portrait_phone_video_is_upright_and_sized_as_shown(tmp_path):
    from clipcli.video import probe

    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(-90)  # as phones store portrait video: landscape pixels, turned on display
        for _ in range(10):
            pixels = np.zeros((48, 64, 3), np.uint8)
            pixels[:, :32] = (250, 20, 20)  # left half red
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    info = probe(str(path))
    assert (info.width, info.height) == (48, 64)
    [item] = expand_inputs([str(path)])
    image = read_image(item)
    assert image.size == (48, 64)
    top, bottom = np.asarray(image)[:16].mean(axis=(0, 1)), np.asarray(image)[-16:].mean(axis=(0, 1))
    assert top[0] > 200 > bottom[0]  # turned clockwise: the left half is on top


def test_names_like_frames_beside_a_video_are_files_of_their_own(tmp_path, tiny_vit_checkpoint):
    folder, db = tmp_path / "videos", tmp_path / "index.sqlite3"
    folder.mkdir()
    make_video(folder / "clip.mp4", seconds=4.0)
    shutil.copy(DATA / "rocket.jpg", folder / "clip.mp4#t=5.jpg")
    (folder / "clip.mp4#t=old").mkdir()
    shutil.copy(DATA / "rocket.jpg", folder / "clip.mp4#t=old" / "rocket.jpg")
    first = index(db, tiny_vit_checkpoint, folder)
    again = index(db, tiny_vit_checkpoint, folder)
    assert (first["added"], again["unchanged"], again["removed"]) == (4, 4, 0)
    make_video(folder / "clip.mp4", seconds=2.0, offset=30)  # changed: its frames only are replaced
    changed = index(db, tiny_vit_checkpoint, folder)
    assert (changed["updated"], changed["removed"]) == (1, 1)
    assert {"clip.mp4#t=5.jpg", "rocket.jpg"} <= set(rows(db))


def test_updates_in_passing_keep_the_interval_a_video_was_indexed_at(tmp_path, tiny_vit_checkpoint):
    """`search --in` and `duplicates PATH` update the index first: they must not re-read every
    video at the default interval (nor does a plain `index`), and a single-frame video is read
    again when a smaller interval is asked."""
    folder, db = tmp_path / "videos", tmp_path / "index.sqlite3"
    folder.mkdir()
    make_video(folder / "clip.mp4", seconds=6.0)
    assert index(db, tiny_vit_checkpoint, folder, interval="0")["added"] == 1
    assert index(db, tiny_vit_checkpoint, folder, interval="2")["added"] == 2  # #t=2, #t=4
    for command in (["search", "a clip", "--in", str(folder)], ["duplicates", str(folder)]):
        result = CliRunner().invoke(app, [*command, "--db", str(db), "-m", str(tiny_vit_checkpoint), "-f", "json"])
        assert result.exit_code == 0, result.stderr
    assert sorted(n for n in rows(db) if "#t=" in n) == ["clip.mp4#t=0", "clip.mp4#t=2", "clip.mp4#t=4"]


def test_a_contact_sheet_draws_a_video_by_its_first_frame(tmp_path, tiny_vit_checkpoint):
    db = two_copies_indexed(tmp_path, tiny_vit_checkpoint, 2.0)
    result = CliRunner().invoke(app, ["duplicates", "--db", str(db), "-m", str(tiny_vit_checkpoint), "-o",
                                      str(tmp_path / "sheets")])
    assert result.exit_code == 0 and "cannot" not in result.stderr, result.stderr
    assert [p.name for p in (tmp_path / "sheets").iterdir()] == ["0001-exact.png"]


def test_a_video_the_previous_schema_refused_is_read_after_the_upgrade(tmp_path, tiny_vit_checkpoint):
    """Schema 3 read no video: one named in a list was stored as a failed image, never retried.
    The upgrade to schema 4 (the interval column) has the next update look at it again."""
    import sqlite3

    from clipcli.index import MIGRATIONS

    folder, db = tmp_path / "videos", tmp_path / "index.sqlite3"
    folder.mkdir()
    make_video(folder / "clip.mp4", seconds=2.0)
    index(db, tiny_vit_checkpoint, folder)
    with sqlite3.connect(db) as raw:  # as schema 3 left it: the video's row a failure, no frames
        raw.execute("DELETE FROM files WHERE path != ?", (os.fsencode(folder / "clip.mp4"),))
        raw.execute("UPDATE files SET error = 'unsupported format: ISO media (''isom''), not an image we open'")
        raw.execute("ALTER TABLE files DROP COLUMN interval")
        raw.execute(f"PRAGMA user_version = {MIGRATIONS[2][0]}")
    again = index(db, tiny_vit_checkpoint, folder)
    assert again["added"] == 1 and sorted(rows(db)) == ["clip.mp4", "clip.mp4#t=0"]


def test_an_interval_too_small_or_a_killed_run_loses_no_frame(tmp_path, tiny_vit_checkpoint, monkeypatch):
    """--video-interval 0.001 on a long video is refused for that video (its frames kept, the
    next run with a sensible interval unchanged); a run killed part-way through an interval
    change leaves the video to be read again, not a mix of frames called up to date."""
    from clipcli import video

    folder, db = tmp_path / "videos", tmp_path / "index.sqlite3"
    folder.mkdir()
    make_video(folder / "clip.mp4", seconds=6.0)
    index(db, tiny_vit_checkpoint, folder, interval="2")
    monkeypatch.setattr(video, "MAX_FRAMES", 100)
    result = CliRunner().invoke(app, ["index", str(folder), "--db", str(db), "-m", str(tiny_vit_checkpoint), "-f",
                                      "json", "-q", "--video-interval", "0.01"])
    assert result.exit_code == 1 and json.loads(result.stdout)["removed"] == 0
    assert index(db, tiny_vit_checkpoint, folder, interval=None)["unchanged"] == 3

    from clipcli import batching

    real, calls = batching.read_image, []

    def killed_after_one(item, *args, **kwargs):
        calls.append(item.name)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the run is killed while the second new frame is read
        return real(item, *args, **kwargs)

    monkeypatch.setattr(batching, "read_image", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        from clipcli.index import Index
        from clipcli.pipeline import load_model
        from clipcli.tasks import RunOptions, update_index

        with Index(db) as opened:
            update_index(opened, [str(folder)], str(tiny_vit_checkpoint),
                         lambda: load_model(str(tiny_vit_checkpoint), device="cpu"),
                         run=RunOptions(workers=0, batch_size=1, video_interval=1.0))
    monkeypatch.setattr(batching, "read_image", real)
    again = index(db, tiny_vit_checkpoint, folder, interval=None)  # read again at its own interval, 2 s
    assert again["removed"] == 1  # the frame at 1 s the killed run had stored
    assert sorted(n for n in rows(db) if "#t=" in n) == ["clip.mp4#t=0", "clip.mp4#t=2", "clip.mp4#t=4"]
    assert index(db, tiny_vit_checkpoint, folder, interval=None)["unchanged"] == 3
