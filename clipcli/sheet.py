"""A contact sheet of search results: thumbnails in rank order, each with its rank, score
(and probability, ``p``, for a model that has calibrated ones) and file name, drawn with
Pillow alone (people would rather look than read paths).

A sheet holds at most :data:`MAX_THUMBNAILS` results, in at most :data:`MAX_ROWS` rows (the
tallest image WebP can store); beyond :data:`COLUMNS` x :data:`MAX_ROWS` results it grows
wider instead. What is left out is said in the notes :func:`render` returns."""

from __future__ import annotations

import os
from typing import IO, Sequence

from PIL import Image, ImageDraw, ImageFont

from .display import escaped
from .images import DecodeOptions, read_image
from .items import local_item
from .metadata import iso

CELL = 200  # thumbnail side, pixels
CAPTION = 34
COLUMNS = 5
MAX_ROWS = 70  # 70 x 234 px = 16,380 px: WebP stores at most 16,383
MAX_THUMBNAILS = 1000  # 15 columns x 67 rows, 3,000 x 15,678 px
FORMATS = ("png", "jpg", "jpeg", "webp")


def sheet_format(path: str | os.PathLike) -> str:
    """The image format of a sheet file name; ``ValueError`` for one Pillow should not write."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"contact sheet file must end in .png, .jpg or .webp, not {os.fspath(path)!r}")
    return "jpeg" if suffix == "jpg" else suffix


def _thumbnail(name: str) -> Image.Image | None:
    try:
        image = read_image(local_item(name), DecodeOptions(draft_size=CELL))  # a file, or a video's frame
    except Exception:  # noqa: BLE001 - a file gone or changed since indexing is drawn as a blank cell
        return None
    image.thumbnail((CELL - 8, CELL - 8))  # a margin between cells
    return image


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, cut short with "…" to fit ``width`` pixels (a binary search: names can be long)."""
    if draw.textlength(text, font=font) <= width:
        return text
    low, high = 0, len(text)  # text[:low] + "…" fits; text[:high] + "…" does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if draw.textlength(text[:middle] + "…", font=font) <= width else (low, middle)
    return text[:low] + "…"


def grid(count: int) -> tuple[int, int]:
    """(columns, rows) for ``count`` thumbnails: :data:`COLUMNS` wide, wider past :data:`MAX_ROWS` rows."""
    columns = max(1, min(count, max(COLUMNS, -(-count // MAX_ROWS))))
    return columns, max(1, -(-count // columns))


def render(hits: Sequence, stream: IO[bytes], fmt: str = "png") -> list[str]:
    """Draw ``hits`` (:class:`~clipcli.index.Hit`) into ``stream`` as a ``fmt`` image: the first
    :data:`MAX_THUMBNAILS` of them. Returns notes for the user (what was left out)."""
    notes = []
    if len(hits) > MAX_THUMBNAILS:
        notes.append(f"the contact sheet shows the best {MAX_THUMBNAILS} of the {len(hits)} results")
        hits = hits[:MAX_THUMBNAILS]
    columns, rows = grid(len(hits))
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
        name = escaped(os.path.basename(hit.name))  # one line, a line break or escape sequence shown as \n, \x1b
        prob = getattr(hit, "prob", None)  # a model with calibrated probabilities: also the probability
        taken = getattr(hit, "taken", None)  # the capture day, when the index knows it
        caption = f"#{hit.rank}  {hit.score:.4f}" + (f"  p {prob:.3f}" if prob is not None else "") + (
            f"  {iso(taken)[:10]}" if taken is not None else "")
        draw.text((left + 4, top + CELL + 2), _fit(draw, caption, font, CELL - 8), fill="black", font=font)
        draw.text((left + 4, top + CELL + 17), _fit(draw, name, font, CELL - 8), fill="#333333", font=font)
    sheet.save(stream, format=fmt.upper())
    return notes
