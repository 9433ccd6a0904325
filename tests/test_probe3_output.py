"""Issue 21, items 5, 6, 14, 15 (sheet), 17: every value from outside is shown literally.

File names, labels, captions and titles reach tables, contact sheets and heatmaps; none is
read as rich markup, mathtext or an emoji code, and none carries a control character (an
escape sequence that clears or retitles the terminal, a bidi override, a line break) to the
terminal raw. Paths for ``xargs`` can be NUL-separated. The commands run with the fake
encoder of ``test_cli_fake`` (an image's embedding is its mean colour).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from test_cli_fake import PROMPTS, FakeLoaded
from typer.testing import CliRunner

from clipcli import heatmap, sheet
from clipcli.cli import app
from clipcli.display import escaped, one_line
from clipcli.output import RecordWriter, to_json, write_paths

# A name and how a table, a sheet or a heatmap shows it.
ODD = {
    "x].png": "x].png",
    "[bold]a.png": "[bold]a.png",
    "[link=file:x]b[.png": "[link=file:x]b[.png",
    ":smile:.png": ":smile:.png",
    "clear\x1b[2J.png": "clear\\x1b[2J.png",
    "\x1b]0;title\x07.png": "\\x1b]0;title\\x07.png",
    "rev\u202egnp.png": "rev\\u202egnp.png",
    "two\nlines.png": "two\\nlines.png",
    "csi\x9b31m.png": "csi\\x9b31m.png",
    "a_b^c\\$.png": "a_b^c\\$.png",
}


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    """The fake model under any name, found without a file (the index keys models by name)."""

    def load(name, *args, **kwargs):
        loaded = FakeLoaded(PROMPTS)
        loaded.name = name
        return loaded

    monkeypatch.setattr("clipcli.pipeline.load_model", load)
    monkeypatch.setattr("clipcli.loading.resolve", lambda name, **kwargs: name)
    monkeypatch.setattr("clipcli.loading.source_key", lambda source: f"key-{source}")
    monkeypatch.setenv("COLUMNS", "400")  # rich's width off a terminal: every header on one line


@pytest.fixture
def odd(tmp_path, monkeypatch) -> Path:
    """A folder named "[" holding one small image under each odd name; the cwd is its parent."""
    folder = tmp_path / "["
    folder.mkdir()
    for i, name in enumerate(ODD):
        Image.new("RGB", (16, 16), (20 * i, 100, 200)).save(folder / name, format="PNG")
    monkeypatch.chdir(tmp_path)
    return folder


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_safe(text: str) -> None:
    """No byte that acts on a terminal: ESC, BEL, C1 controls, a bidi override."""
    for char in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert char not in text, repr(text)


def assert_every_name_shown(text: str) -> None:
    for shown in ODD.values():
        assert shown in text, f"{shown!r} not in {text!r}"


# --------------------------------------------------------------------------- item 5: tables


def table(records, **kwargs) -> str:
    stream = io.StringIO()
    with RecordWriter(stream, "table", **kwargs) as writer:
        for record in records:
            writer.write(record)
    return stream.getvalue()


@pytest.mark.parametrize("name", list(ODD))
def test_a_table_shows_each_odd_name_literally(name):
    text = table([{"image": f"[/{name}", "score": 0.5}, {"image": f"[/[{name}", "score": 0.25}], paths_column="image")
    assert_safe(text)
    assert ODD[name] in text and f"[{ODD[name]}" in text
    assert "paths relative to [" in text  # the caption names the folder "[" literally


def test_headers_titles_and_nested_cells_are_literal_too():
    row = {"text": "[red]caption\x1b[2J", "[bold]x.png": 0.5, "top": [{"label": "[i]cat\u202e\x9b", "score": 1.0}]}
    text = table([row], title="[b]title\x1b]0;t\x07")
    assert_safe(text)
    for shown in ("[red]caption\\x1b[2J", "[bold]x.png", "[b]title\\x1b]0;t\\x07", "[i]cat"):
        assert shown in text
    assert "\\u202e" in text and "\\u009b" in text  # escaped twice over: in JSON, then shown as its text


def test_a_table_keeps_a_line_per_record():
    text = table([{"image": "a\nb.png"}, {"image": "c\r\nd.png"}])
    assert "a\\nb.png" in text and "c\\r\\nd.png" in text
    assert len(text.splitlines()) == 6  # top rule, header, rule, two rows, bottom rule


@pytest.mark.parametrize("args", [
    ["classify", "[", "-l", "red,green,blue"],
    ["encode", "["],
    ["similarity", "[", "--text", "red", "--text", "[bold]blue\x1b[2J"],
])
def test_the_commands_print_odd_names_in_a_table(odd, args):
    result = run(*args, "-f", "table")
    assert result.exit_code == 0, result.stderr
    assert_safe(result.stdout)
    assert_safe(result.stderr)
    assert_every_name_shown(result.stdout)
    if args[0] == "similarity":
        assert "[bold]blue\\x1b[2J" in result.stdout


def test_search_prints_odd_names_in_a_table_and_as_records(odd, tmp_path):
    db = tmp_path / "index.sqlite3"
    assert run("index", "[", "--db", db, "-m", "fake", "-q").exit_code == 0
    result = run("search", "red", "--db", db, "-m", "fake", "-k", "20", "-f", "table")
    assert result.exit_code == 0, result.stderr
    assert_safe(result.stdout)
    assert_every_name_shown(result.stdout)
    records = run("search", "red", "--db", db, "-m", "fake", "-k", "20", "-f", "jsonl")
    assert_safe(records.stdout)
    names = {os.path.basename(json.loads(line)["image"]) for line in records.stdout.splitlines()}
    assert names == set(ODD)  # JSON escapes them, and reads them back unchanged


# --------------------------------------------------------------------------- JSON and text helpers


@pytest.mark.parametrize("value", ["a\x7fb", "\x9b2J", "rev\u202ex", "line\u2028sep", "tag\U000e0041", "\x1b[2J"])
def test_json_escapes_what_a_terminal_would_act_on_and_reads_back_the_same(value):
    text = to_json({"image": value})
    assert_safe(text)
    assert "\x7f" not in text and "\u2028" not in text and "\U000e0041" not in text
    assert json.loads(text)["image"] == value


def test_json_keeps_printable_text_readable():
    assert to_json({"a": "café 中文 👨\u200d👩"}) == '{"a": "café 中文 👨\u200d👩"}'


def test_escaped_keeps_line_breaks_visible_and_one_line_joins_them():
    assert escaped("a\nb\tc\x1b[2J\u202e") == "a\\nb\\tc\\x1b[2J\\u202e"
    assert one_line("a\nb\tc\x1b[2J\u202e") == "a b c\\x1b[2J\\u202e"
    assert escaped(os.fsdecode(b"caf\xe9")) == "caf\\udce9"
    assert escaped("\U000e0041") == "\\U000e0041"
    assert escaped("plain [text] é") == "plain [text] é"


# --------------------------------------------------------------------------- items 6 and 15: contact sheets


def hits(names):
    return [SimpleNamespace(rank=i + 1, name=name, score=0.5) for i, name in enumerate(names)]


def test_a_sheet_draws_odd_names_on_one_line(odd):
    out = io.BytesIO()
    notes = sheet.render(hits([str(odd / name) for name in ODD]), out)
    assert notes == []
    assert Image.open(out).size == (5 * sheet.CELL, 2 * (sheet.CELL + sheet.CAPTION))


def test_a_long_name_is_cut_to_its_cell():
    draw, font, width = ImageDraw.Draw(Image.new("RGB", (10, 10))), ImageFont.load_default(), sheet.CELL - 8
    text = sheet._fit(draw, "n" * 2000, font, width)
    assert text.endswith("…") and draw.textlength(text, font=font) <= width
    assert draw.textlength(text[:-1] + "n…", font=font) > width  # the longest that fits


def test_a_sheet_of_many_results_is_capped_and_says_so(monkeypatch):
    monkeypatch.setattr(sheet, "MAX_THUMBNAILS", 12)
    out = io.BytesIO()
    notes = sheet.render(hits([f"gone{i}.png" for i in range(30001)]), out)
    assert notes == ["the contact sheet shows the best 12 of the 30001 results"]
    assert Image.open(out).size == (5 * sheet.CELL, 3 * (sheet.CELL + sheet.CAPTION))


@pytest.mark.parametrize("count", [1, 5, 6, 349, 350, 351, 700, 999, sheet.MAX_THUMBNAILS])
def test_every_sheet_fits_every_format(count):
    columns, rows = sheet.grid(count)
    assert columns * rows >= count and rows <= sheet.MAX_ROWS
    assert rows * (sheet.CELL + sheet.CAPTION) <= 16383 and columns * sheet.CELL <= 16383  # WebP's largest side
    if count <= sheet.COLUMNS * sheet.MAX_ROWS:  # wider only when it has to be
        assert columns == min(count, sheet.COLUMNS)


@pytest.mark.slow  # a whole process (or a large sheet): with the kill and race tests in `pytest -m slow`
def test_the_largest_sheet_is_written_as_webp():
    out = io.BytesIO()
    assert sheet.render(hits([f"gone{i}.png" for i in range(sheet.MAX_THUMBNAILS + 1)]), out, "webp")
    assert Image.open(out).size == (15 * sheet.CELL, 67 * (sheet.CELL + sheet.CAPTION))


def test_search_writes_a_sheet_of_odd_names(odd, tmp_path):
    db, out = tmp_path / "index.sqlite3", tmp_path / "sheet.png"
    assert run("index", "[", "--db", db, "-m", "fake", "-q").exit_code == 0
    result = run("search", "red", "--db", db, "-m", "fake", "-k", "20", "-f", "jsonl", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert_safe(result.stderr)
    assert Image.open(out).size == (5 * sheet.CELL, 2 * (sheet.CELL + sheet.CAPTION))


# --------------------------------------------------------------------------- item 17: heatmaps


def heat(texts, images, fmt="svg", title=heatmap.TITLE):
    out = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notes = heatmap.render(np.full((len(texts), len(images)), 0.2), texts, images, None, out, fmt, title)
    assert [str(w.message) for w in caught] == []
    return out.getvalue(), notes


def svg_strings(data: bytes) -> list[str]:
    """The strings matplotlib drew: it writes each text's string as a comment beside its glyphs."""
    return [line.strip()[5:-4] for line in data.decode().splitlines() if line.strip().startswith("<!-- ")]


def test_heatmap_labels_are_drawn_literally_never_as_mathtext():
    data, notes = heat(["costs $5 or $10", r"$\frac{1}{2}$"], ["a_b^c\\$.png", "$x^2$.png"], title="$unbalanced")
    strings = svg_strings(data)
    for label in ("costs $5 or $10", r"$\frac{1}{2}$", "a_b^c\\$.png", "$x^2$.png", "$unbalanced"):
        assert label in strings
    assert notes == []


def test_heatmap_labels_escape_control_characters_and_warn_nothing():
    names = ["clear\x1b[2J.png", "two\nlines.png", "\x1b]0;title\x07.png", "csi\x9b31m.png"]
    data, notes = heat(["red\x1b[2J", "two\nlines \u202e"], names, title="t\x1b]0;x\x07")
    text = data.decode()
    assert_safe(text)
    strings = svg_strings(data)
    assert "red\\x1b[2J" in strings and "t\\x1b]0;x\\x07" in strings
    assert "two lines \\u202e" in strings  # a caption is prose: its line break is a space
    assert "clear\\x1b[2J.png" in strings and "two\\nlines.png" in strings  # a name shows its line break
    assert notes == []


def test_a_missing_glyph_is_a_note_not_a_warning():
    _, notes = heat(["caption"], ["\U0001d4b3\U000100a0.png"], fmt="png")
    assert len(notes) == 1 and "no glyph for 2 character(s)" in notes[0]


def test_a_usetex_matplotlibrc_does_not_make_names_tex():
    import matplotlib

    with matplotlib.rc_context({"text.usetex": True}):  # no TeX here: it would fail if used
        data, _ = heat(["$5 & 10%"], ["a_b#c.png"])
    assert "a_b#c.png" in svg_strings(data)


def test_similarity_draws_odd_names_without_raw_bytes_on_stderr(odd, tmp_path):
    out = tmp_path / "heat.png"
    result = run("similarity", "[", "--text", "red\x1b[2J", "--text", "$5", "-o", out, "--title", "$t\x1b")
    assert result.exit_code == 0, result.stderr
    assert_safe(result.stderr)
    assert out.stat().st_size > 1000


# --------------------------------------------------------------------------- item 14: paths for xargs


def test_paths_can_be_nul_separated():
    stream = io.BytesIO()
    left_out = write_paths(stream, [b"a.png", b"x.png\n/tmp/y", b"caf\xe9.png"], separator=b"\0")
    assert stream.getvalue() == b"a.png\0x.png\n/tmp/y\0caf\xe9.png\0" and left_out == []


def test_a_path_with_a_line_break_is_left_out_of_lines_and_returned():
    stream = io.BytesIO()
    left_out = write_paths(stream, [b"a.png", b"x.png\n/tmp/y", b"b.png"])
    assert stream.getvalue() == b"a.png\nb.png\n"  # no "/tmp/y" for xargs to act on
    assert left_out == [b"x.png\n/tmp/y"]
