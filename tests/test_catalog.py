"""What `clipcli models` lists: every entry's licence, and a table that fits the terminal."""

from __future__ import annotations

import io

import pytest

from clipcli import catalog, hub


def test_every_named_entry_has_a_licence():
    records = catalog.catalog()
    registry = catalog.registry
    assert len(records) == 9 + len(registry.pretrained()) + len(registry.hub_aliases())
    assert all(r["released"] for r in records)
    assert [r["name"] for r in records if r["license"] in (None, "", "unknown")] == []
    assert {r["license"] for r in records} == {"MIT", "apple-ascl", "CC-BY-NC-4.0", "Apache-2.0"}
    by_name = {r["name"]: r["license"] for r in records}
    assert by_name["ViT-B-32/laion400m_e31"] == "MIT" and by_name["ViT-H-14/dfn5b"] == "apple-ascl"
    assert by_name["ViT-L-14/metaclip_400m"] == "CC-BY-NC-4.0" and by_name["ViT-L/14"] == "MIT"


def test_where_cached(tmp_path):
    hf = hub.cache_dir() / "models--laion--X" / "snapshots" / ("0" * 40) / "open_clip_model.safetensors"
    assert [catalog.where_cached(p) for p in (None, str(hf), str(tmp_path / "clipcli-cache" / "RN50.pt"))] == [
        "no", "HF", "clipcli"]


def test_cells_are_short_text():
    record = {"name": "mine.pt", "released": False, "input_resolution": None, "embed_dim": None, "size": 3,
              "cached": True, "path": "/somewhere/mine.pt", "sha256": "0" * 64, "url": None, "family": None,
              "parameters": None, "license": None, "imagenet_top1": None, "score_kind": None, "multilingual": None}
    assert catalog.cells(record) == {"name": "mine.pt", "family": "-", "score": "-", "params": "-", "res": "-",
                                     "dim": "-", "lang": "-", "licence": "-", "top-1": "-", "cached": "clipcli"}
    vit = next(r for r in catalog.catalog() if r["name"] == "ViT-B/32")
    assert catalog.cells(vit) == {"name": "ViT-B/32", "family": "OpenAI", "score": "softmax", "params": "151M",
                                  "res": "224", "dim": "512", "lang": "en", "licence": "MIT", "top-1": "63.3",
                                  "cached": "no"}


def table(rows, columns, width):
    """The table as `clipcli models` draws it with rich (box, padding and all)."""
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    drawn = Table(header_style="bold")
    for column in columns:
        drawn.add_column(column, no_wrap=column == "name", overflow="fold")
    for row in rows:
        drawn.add_row(*(row[c] for c in columns))
    Console(file=out, width=width).print(drawn)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("width, columns", [
    (160, catalog.COLUMNS),
    (120, ("name", "family", "params", "res", "licence", "top-1", "cached")),
    (100, ("name", "params", "licence", "top-1", "cached")),
    (80, ("name", "licence", "cached")),
    (60, ("name", "cached")),
])
def test_columns_fit_the_terminal_and_names_stay_whole(width, columns):
    rows = [catalog.cells(r) for r in catalog.catalog()]
    assert catalog.fitting_columns(rows, width) == columns
    lines = table(rows, columns, width)
    assert max(map(len, lines)) <= width
    cells = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert cells == [row["name"] for row in rows]  # one line per entry: no name folded mid-word
