"""Records out: exact text for every format, atomic writes, the stderr reporter."""

from __future__ import annotations

import io
import json
import os

import pytest

from clipcli.cli.render import Reporter
from clipcli.errors import OutputError, OutputExistsError
from clipcli.fsutil import atomic_write, ensure_writable
from clipcli.messages import error_text
from clipcli.output import RecordWriter, default_format, to_json

RECORDS = [
    {"image": "a.png", "status": "ok", "label": "cat", "score": 0.75, "top": [{"label": "cat", "score": 0.75}]},
    {"image": "b.png", "status": "error", "error": "empty file (0 bytes)"},
]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def written(fmt, records=RECORDS, **kwargs) -> str:
    stream = io.StringIO()
    with RecordWriter(stream, fmt, **kwargs) as writer:
        for record in records:
            writer.write(record)
    return stream.getvalue()


def test_default_format_follows_the_terminal():
    assert default_format(Terminal()) == "table"
    assert default_format(io.StringIO()) == "jsonl"


def test_jsonl_is_one_record_per_line_and_streams():
    stream = io.StringIO()
    with RecordWriter(stream, "jsonl") as writer:
        writer.write(RECORDS[0])
        assert stream.getvalue().count("\n") == 1  # written before the run ends
        writer.write(RECORDS[1])
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == RECORDS
    assert stream.getvalue().splitlines()[1] == '{"image": "b.png", "status": "error", "error": "empty file (0 bytes)"}'


def test_json_is_one_array():
    assert json.loads(written("json")) == RECORDS


def test_json_keeps_number_rows_on_one_line():
    text = to_json({"cosine": [[0.1, 0.2, 0.3] * 10, [0.4] * 30]}, indent=2)
    assert text.splitlines()[2:4] == ["    [" + ", ".join(["0.1, 0.2, 0.3"] * 10) + "],", "    [" + ", ".join(["0.4"] * 30) + "]"]
    assert json.loads(text)["cosine"][1] == [0.4] * 30


def test_csv_has_a_header_and_json_cells():
    text = written("csv", columns=["image", "status", "label", "score", "top", "error"])
    assert text.splitlines() == [
        "image,status,label,score,top,error",
        'a.png,ok,cat,0.75,"[{""label"": ""cat"", ""score"": 0.75}]",',
        "b.png,error,,,,empty file (0 bytes)",
    ]


def test_table_shows_every_record():
    text = written("table", columns=["image", "status", "label", "score", "error"])
    assert "a.png" in text and "0.7500" in text and "empty file (0 bytes)" in text


def test_table_paths_are_relative_to_their_common_folder():
    records = [{"image": "/data/photos/2024/a.png"}, {"image": "/data/photos/b.png"}]
    text = written("table", records, paths_column="image")
    assert "2024/a.png" in text and "/data/photos/b.png" not in text and "/data/photos" in text
    urls = [{"image": "https://example.com/a.png"}, {"image": "https://example.com/b.png"}]
    assert "https://example.com/a.png" in written("table", urls, paths_column="image")


def test_unknown_format():
    with pytest.raises(ValueError):
        RecordWriter(io.StringIO(), "xml")


def test_non_finite_numbers_are_never_written():
    with pytest.raises(ValueError):
        to_json({"score": float("nan")})


def test_undecodable_names_round_trip():
    name = os.fsdecode(b"caf\xe9.png")
    text = to_json({"image": name})
    assert text == '{"image": "caf\\udce9.png"}'
    assert json.loads(text)["image"] == name
    assert "caf\\udce9.png" in written("csv", [{"image": name}])
    assert "é" in to_json({"image": "é"})  # real non-ASCII stays readable


def test_atomic_write_replaces_only_when_asked(tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    path = tmp_path / "out.bin"
    with atomic_write(path) as f:
        f.write(b"one")
    assert path.read_bytes() == b"one"
    with pytest.raises(OutputExistsError, match="out.bin already exists$") as caught:
        with atomic_write(path) as f:
            f.write(b"two")
    assert error_text(caught.value).endswith("already exists; pass --overwrite to replace it")
    with atomic_write(path, overwrite=True) as f:
        f.write(b"two")
    assert path.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    path = tmp_path / "out.txt"
    path.write_text("precious")
    with pytest.raises(RuntimeError):
        with atomic_write(path, overwrite=True, text=True) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_write_does_not_clobber_a_file_that_appears_meanwhile(tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    path = tmp_path / "out.txt"
    with pytest.raises(OutputExistsError):
        with atomic_write(path, text=True) as f:
            path.write_text("someone else's")
            f.write("mine")
    assert path.read_text() == "someone else's"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_ensure_writable(tmp_path):
    (tmp_path / "emb.npy").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="emb.npy already exists"):
        ensure_writable([tmp_path / "emb.npy"], overwrite=False)
    ensure_writable([tmp_path / "emb.npy"], overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        ensure_writable([tmp_path / "missing" / "emb.npy"], overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        ensure_writable([tmp_path], overwrite=True)


def test_reporter_lines():
    stream = io.StringIO()
    with Reporter(2, "images", stream=stream) as report:
        report.done("a.png")
        report.done("b.png", "empty file (0 bytes)")
    report.summary("classified")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "skipping b.png: empty file (0 bytes)"
    assert lines[1].startswith("classified 1 image in ") and lines[1].endswith("; 1 of 2 failed")
    assert report.exit_code == 1


def test_reporter_quiet():
    stream = io.StringIO()
    with Reporter(1, quiet=True, stream=stream) as report:
        report.done("b.png", "bad")
    report.summary("encoded")
    assert stream.getvalue() == "" and report.exit_code == 1


def test_reporter_progress_on_a_terminal_keeps_messages():
    stream = Terminal()
    with Reporter(3, stream=stream) as report:
        for name in ["a", "b", "c"]:
            report.done(name, "bad" if name == "b" else None)
    assert "skipping b: bad" in stream.getvalue()
