"""A text-by-image similarity matrix drawn like the figure in CLIP's Interacting notebook.

Captions label the rows, a thumbnail of each image sits above its column, every cell
carries its value to two decimals, and a colour bar and a title frame it. The values are
cosine similarities, or for a model with calibrated probabilities (SigLIP's sigmoid, see
:mod:`clipcli.zeroshot`) each pair's probability, drawn on a fixed 0 to 1 scale. The figure
grows with the matrix; beyond :data:`MAX_DETAILED` rows or columns the thumbnails and cell values
would be unreadable, so they are left out and the returned notes say so.

Rendering uses matplotlib's object API on the Agg canvas (no pyplot, no display), imported
only when a heatmap is drawn.

Captions, names and the title are drawn literally: never as mathtext or TeX (``$5``,
``a_b^c``), with control characters escaped (``\\x1b``); a character matplotlib's font
lacks becomes a note, not a warning on stderr.
"""

from __future__ import annotations

import os
import re
import textwrap
import warnings
from typing import IO, TYPE_CHECKING, Sequence

from .display import escaped, one_line

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from PIL import Image

MAX_DETAILED = 30
TITLE = "Cosine similarity between text and image features"
PROBABILITY_TITLE = "Probability that each text matches each image (sigmoid)"
KINDS = {"cosine": (TITLE, "cosine similarity"), "sigmoid": (PROBABILITY_TITLE, "probability")}  # title, colour bar
FORMATS = ("png", "svg", "pdf")


def figure_format(path: str | os.PathLike) -> str:
    """``png``, ``svg`` or ``pdf`` from a file name; ``ValueError`` for anything else."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"heatmap file must end in .png, .svg or .pdf, not {os.fspath(path)!r}")
    return suffix


def _caption(text: str, width: int = 48, limit: int = 120) -> str:
    text = one_line(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "\n".join(textwrap.wrap(text, width)) or text


def _short(name: str, limit: int = 24) -> str:
    base = escaped(os.path.basename(name.rstrip("/")) or name)
    return base if len(base) <= limit else base[: limit - 1] + "…"


def _square(image: "Image.Image", size: int) -> "Image.Image":
    """Centre-crop to a square and shrink, as the model sees the image."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size))


def cell_text(value: float) -> str:
    """A cell's value to two decimals; one that rounds to zero reads ``0.00``, never ``-0.00``."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def colour_range(cosine: "np.ndarray") -> tuple[float, float]:
    """The data's range, at least 0.05 wide (the CLIP notebook fixed 0.1..0.3, where released
    models' cosines lie; other checkpoints need the range of their own values)."""
    low, high = float(cosine.min()), float(cosine.max())
    if high - low < 0.05:
        middle = (low + high) / 2
        low, high = middle - 0.025, middle + 0.025
    return low, high


_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from")


def _draw(cosine, texts, images, thumbnails, out, fmt: str, title: str, kind: str) -> list[str]:
    """:func:`render` without its care for warnings and rcParams (``cosine``: the values, of ``kind``)."""
    import numpy as np
    from matplotlib.figure import Figure

    cosine = np.asarray(cosine, dtype=np.float64)
    rows, cols = cosine.shape
    if rows != len(texts) or cols != len(images):
        raise ValueError(f"matrix is {rows}x{cols} but there are {len(texts)} texts and {len(images)} images")
    detailed = rows <= MAX_DETAILED and cols <= MAX_DETAILED
    notes = []
    if not detailed:
        notes.append(
            f"the matrix is {rows}x{cols}: cell values and thumbnails are drawn only up to "
            f"{MAX_DETAILED}x{MAX_DETAILED} (the JSON output has every value)"
        )
    show_thumbs = detailed and thumbnails is not None and any(t is not None for t in thumbnails)
    show_names = cols <= 4 * MAX_DETAILED

    # Cell size shrinks from 1 inch (small matrices) to 0.45 inch (30 columns), then stays small.
    largest = max(rows, cols)
    cell = 1.0 if largest <= 8 else max(0.45, 1.0 - 0.55 * (largest - 8) / (MAX_DETAILED - 8))
    if not detailed:
        cell = max(0.12, min(0.45, 14.0 / largest))
    thumb_rows = 1.1 if show_thumbs else 0.0
    width = cols * cell + 1.5
    height = (rows + thumb_rows) * cell + 1.0
    label_size = max(6.0, min(14.0, cell * 72 * 0.3))
    value_size = max(6.0, min(12.0, cell * 72 * 0.26))

    figure = Figure(figsize=(width, height), dpi=100)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    vmin, vmax = colour_range(cosine) if kind == "cosine" else (0.0, 1.0)  # probabilities mean what they say
    mesh = axes.imshow(cosine, vmin=vmin, vmax=vmax, cmap="viridis", aspect="equal", interpolation="nearest")

    axes.set_yticks(range(rows))
    # User strings are drawn literally (parse_math=False): "$5 $10" is not mathtext.
    axes.set_yticklabels([_caption(t) for t in texts] if rows <= 4 * MAX_DETAILED else [], fontsize=label_size,
                         parse_math=False)
    if show_names:
        axes.set_xticks(range(cols))
        axes.set_xticklabels(
            [_short(n) for n in images],
            rotation=45 if cols > 1 else 0,
            ha="right" if cols > 1 else "center",
            rotation_mode="anchor",
            fontsize=max(6.0, label_size * 0.75),
            parse_math=False,
        )
    else:
        axes.set_xticks([])
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)

    if detailed:
        norm = mesh.norm
        for y in range(rows):
            for x in range(cols):
                value = cosine[y, x]
                colour = "white" if norm(value) < 0.5 else "black"
                axes.text(x, y, cell_text(value), ha="center", va="center", fontsize=value_size, color=colour)

    top = -0.5
    if show_thumbs:
        for x, thumb in enumerate(thumbnails):
            if thumb is not None:
                axes.imshow(np.asarray(_square(thumb, 128)), extent=(x - 0.5, x + 0.5, -1.6, -0.6), origin="lower")
        top = -1.7
    axes.set_xlim(-0.5, cols - 0.5)
    axes.set_ylim(rows - 0.5, top)

    colourbar = figure.colorbar(mesh, ax=axes, fraction=0.04 if cols > 3 else 0.08, pad=0.02, shrink=0.8)
    colourbar.ax.tick_params(labelsize=max(6.0, label_size * 0.8))
    colourbar.set_label(KINDS[kind][1], fontsize=max(6.0, label_size * 0.8))
    axes.set_title(title, fontsize=max(9.0, min(20.0, label_size * 1.4)), pad=12, parse_math=False)

    figure.savefig(out, format=fmt, bbox_inches="tight", dpi=100 if fmt == "png" else None)
    return notes


def render(
    values: "np.ndarray",
    texts: Sequence[str],
    images: Sequence[str],
    thumbnails: Sequence["Image.Image | None"] | None,
    out: str | os.PathLike | IO[bytes],
    fmt: str = "png",
    title: str | None = None,
    kind: str = "cosine",
) -> list[str]:
    """Draw the matrix ``values`` (rows = ``texts``, columns = ``images``) into ``out`` as ``fmt``.

    ``kind`` says what the values are: ``"cosine"`` similarities (the colours span the data's
    range), or ``"sigmoid"`` probabilities (colours from 0 to 1, the colour bar and the default
    title say "probability"). ``title`` None: the kind's own.

    Returns notes for the user (e.g. what was left out of a large matrix, characters the
    font lacks).
    """
    import matplotlib

    if kind not in KINDS:
        raise ValueError(f"unknown kind of values {kind!r}; choose from {', '.join(KINDS)}")
    title = KINDS[kind][0] if title is None else title

    with warnings.catch_warnings(record=True) as caught, matplotlib.rc_context({"text.usetex": False}):
        warnings.simplefilter("always")
        notes = _draw(values, texts, images, thumbnails, out, fmt, one_line(title), kind)
    missing = set()
    for warning in caught:
        glyph = _MISSING_GLYPH.match(str(warning.message))
        if glyph:
            missing.add(chr(int(glyph.group(1))))
        else:  # not ours to hide, but never with a raw control character
            warnings.warn(one_line(str(warning.message)), warning.category, stacklevel=2)
    if missing:
        shown = "".join(sorted(missing)[:20]) + ("…" if len(missing) > 20 else "")
        notes.append(f"the font has no glyph for {len(missing)} character(s) of the labels, drawn as boxes: {shown}")
    return notes
