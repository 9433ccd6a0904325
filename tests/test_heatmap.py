"""The similarity heatmap from a fake matrix: formats, layout choices, what is left out."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipcli import heatmap


def matrix(rows, cols, seed=0):
    return np.random.default_rng(seed).uniform(0.1, 0.3, (rows, cols))


def thumbs(n):
    return [Image.new("RGB", (40, 30), (40 * i % 255, 90, 160)) for i in range(n)]


def render(cosine, texts=None, images=None, thumbnails=None, fmt="png", **kwargs):
    rows, cols = cosine.shape
    out = io.BytesIO()
    notes = heatmap.render(cosine, texts or [f"caption {i}" for i in range(rows)],
                           images or [f"img{i}.jpg" for i in range(cols)], thumbnails, out, fmt, **kwargs)
    return out.getvalue(), notes


def test_png_with_thumbnails_and_values():
    data, notes = render(matrix(3, 4), thumbnails=thumbs(4))
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and notes == []
    without, _ = render(matrix(3, 4))
    assert image.size[1] > Image.open(io.BytesIO(without)).size[1]  # the thumbnail row takes room


def test_svg_has_every_value_the_captions_and_the_title():
    cosine = np.array([[0.123, 0.456], [0.25, 0.3]])
    data, _ = render(cosine, texts=["a photo of a cat", "a dog"], fmt="svg")
    text = data.decode()
    # matplotlib writes SVG text as paths by default; the comments keep the strings.
    for label in ["0.12", "0.46", "0.25", "0.30", "a photo of a cat", "Cosine similarity between text and image features"]:
        assert label in text


def test_pdf():
    data, _ = render(matrix(2, 2), fmt="pdf")
    assert data.startswith(b"%PDF")


def test_large_matrices_drop_details_and_say_so():
    data, notes = render(matrix(40, 35), thumbnails=thumbs(35))
    assert len(notes) == 1 and "40x35" in notes[0] and "30x30" in notes[0]
    assert Image.open(io.BytesIO(data)).size[0] < 3000


def test_thirty_by_thirty_keeps_everything():
    _, notes = render(matrix(30, 30), thumbnails=thumbs(30))
    assert notes == []


def test_figure_grows_with_the_matrix():
    small = Image.open(io.BytesIO(render(matrix(2, 2))[0])).size
    large = Image.open(io.BytesIO(render(matrix(12, 12))[0])).size
    assert large[0] > small[0] and large[1] > small[1]


def test_shape_mismatch_and_format():
    with pytest.raises(ValueError, match="2 texts"):
        heatmap.render(matrix(3, 2), ["a", "b"], ["x", "y"], None, io.BytesIO())
    assert heatmap.figure_format("out/Heat.PNG") == "png"
    with pytest.raises(ValueError, match=".png, .svg or .pdf"):
        heatmap.figure_format("heat.jpg")


def test_renders_headless_without_pyplot():
    code = (
        "import io, numpy as np, sys; from clipcli import heatmap;"
        "heatmap.render(np.eye(2), ['a','b'], ['x','y'], None, io.BytesIO());"
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"MPLBACKEND": "", "PATH": ""})


@pytest.mark.parametrize("value, text", [
    (-0.001, "0.00"), (-0.0049, "0.00"), (-0.0, "0.00"), (0.0, "0.00"), (0.004, "0.00"),
    (-0.005001, "-0.01"), (-0.3, "-0.30"), (0.456, "0.46"), (1.0, "1.00"),
])
def test_cell_text_never_shows_minus_zero(value, text):
    assert heatmap.cell_text(value) == text


def test_tiny_negative_cells_read_zero_in_the_figure():
    data, _ = render(np.array([[-0.001, 0.2], [0.004, -0.3]]), texts=["a", "b"], images=["x", "y"], fmt="svg")
    drawn = re.findall(r"<!-- (.*?) -->", data.decode())  # every string drawn, in order
    assert drawn[drawn.index("b") + 1:][:4] == ["0.00", "0.20", "0.00", "-0.30"]
    assert "-0.00" not in drawn
