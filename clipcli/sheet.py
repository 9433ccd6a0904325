"""A contact sheet of search results: thumbnails in rank order, each with its rank, score
and file name, drawn with Pillow alone (people would rather look than read paths)."""

from __future__ import annotations

import os
from typing import IO, Sequence

from PIL import Image, ImageDraw, ImageFont

from .images import DecodeOptions, read_image
from .items import Item
from .text import display

CELL = 200  # thumbnail side, pixels
CAPTION = 34
COLUMNS = 5
FORMATS = ("png", "jpg", "jpeg", "webp")


def sheet_format(path: str | os.PathLike) -> str:
    """The image format of a sheet file name; ``ValueError`` for one Pillow should not write."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"contact sheet file must end in .png, .jpg or .webp, not {os.fspath(path)!r}")
    return "jpeg" if suffix == "jpg" else suffix


def _thumbnail(name: str) -> Image.Image | None:
    try:
        image = read_image(Item(name=name, path=name), DecodeOptions(draft_size=CELL))
    except Exception:  # noqa: BLE001 - a file gone or changed since indexing is drawn as a blank cell
        return None
    image.thumbnail((CELL - 8, CELL - 8))  # a margin between cells
    return image


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render(hits: Sequence, stream: IO[bytes], fmt: str = "png") -> None:
    """Draw ``hits`` (:class:`~clipcli.index.Hit`) into ``stream`` as a ``fmt`` image."""
    columns = max(1, min(COLUMNS, len(hits)))
    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for place, hit in enumerate(hits):
        left, top = place % columns * CELL, place // columns * (CELL + CAPTION)
        thumb = _thumbnail(hit.name)
        if thumb is None:
            draw.rectangle((left + 4, top + 4, left + CELL - 5, top + CELL - 5), fill="#dddddd")
            draw.text((left + 10, top + CELL // 2), "cannot read", fill="black", font=font)
        else:
            sheet.paste(thumb, (left + (CELL - thumb.width) // 2, top + (CELL - thumb.height) // 2))
        name = display(os.path.basename(hit.name))
        draw.text((left + 4, top + CELL + 2), _fit(draw, f"#{hit.rank}  {hit.score:.4f}", font, CELL - 8),
                  fill="black", font=font)
        draw.text((left + 4, top + CELL + 17), _fit(draw, name, font, CELL - 8), fill="#333333", font=font)
    sheet.save(stream, format=fmt.upper())
