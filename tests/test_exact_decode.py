"""``--exact-decode`` against OpenAI's preprocess on palette, transparent, 1-bit and 16-bit files.

OpenAI's ``clip.load(...)[1]`` (and OpenCLIP's transform) resize the image in the mode
``Image.open`` gives (Pillow resizes P and 1 with nearest neighbour, RGBA and LA with
premultiplied alpha), crop, and only then ``convert("RGB")``, which drops alpha. With
``DecodeOptions(exact=True)`` clipcli hands the transform the file's own mode, so the tensors
are the same computation on the same CPU and are compared with ``torch.equal``. The default
decoding composites alpha on white before resizing, on purpose, and differs on these files.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import openai_clip
from PIL import Image

from clipcli.images import DecodeOptions, pillow_limits, read_image
from clipcli.items import Item
from clipcli.preprocess import Preprocess, image_transform

SIZES = ((53, 37), (19, 71))  # odd, both orientations; resolution 24 shrinks them, 64 enlarges
RESOLUTIONS = (24, 64)


def _files(folder: Path, width: int, height: int) -> dict[str, Path]:
    """One file per mode and kind of transparency, random pixels (the hardest case to agree on)."""
    rng = np.random.default_rng(width * 1000 + height)
    alpha = rng.integers(0, 256, (height, width), np.uint8)
    alpha[::3] = 0  # fully transparent rows, whose stored colour the reference shows
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8), "RGB")
    rgb.paste((7, 8, 9), (width // 3, height // 3, width // 2, height // 2))  # its transparent colour
    grey = rgb.convert("L")
    palette = rgb.quantize(64)
    images: dict[str, tuple[Image.Image, dict]] = {
        "p.png": (palette, {}),
        "p-transparent.png": (palette, {"transparency": 3}),
        "p-transparent.gif": (palette, {"transparency": 5}),
        "rgba.png": (Image.merge("RGBA", (*rgb.split(), Image.fromarray(alpha))), {}),
        "la.png": (Image.merge("LA", (grey, Image.fromarray(alpha))), {}),
        "l.png": (grey, {}),
        "l-transparent.png": (grey, {"transparency": int(np.asarray(grey)[0, 0])}),
        "rgb-transparent.png": (rgb, {"transparency": (7, 8, 9)}),
        "1.png": (grey.convert("1"), {}),
        "cmyk.tiff": (Image.fromarray(rng.integers(0, 256, (height, width, 4), np.uint8), "CMYK"), {}),
        "i16.png": (Image.fromarray(rng.integers(0, 65536, (height, width), np.uint16)), {}),
        "i16-low.png": (Image.fromarray(rng.integers(0, 400, (height, width), np.uint16)), {}),
    }
    paths = {}
    for name, (image, options) in images.items():
        paths[name] = folder / f"{width}x{height}-{name}"
        image.save(paths[name], **options)
    return paths


def _decoded(path: Path, exact: bool) -> Image.Image:
    options = DecodeOptions(exact=exact)
    with pillow_limits(options):
        return read_image(Item(name=str(path), path=str(path)), options)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("modes")
    out = {}
    for width, height in SIZES:
        out.update({f"{width}x{height}-{name}": path for name, path in _files(folder, width, height).items()})
    return out


def test_the_files_open_in_the_modes_under_test(files):
    modes = set()
    for path in files.values():
        with Image.open(path) as image:
            modes.add((image.mode, "transparency" in image.info))
    assert {("P", False), ("P", True), ("RGBA", False), ("LA", False), ("L", False), ("L", True), ("RGB", True),
            ("1", False), ("CMYK", False)} <= modes
    assert any(mode.startswith("I;16") for mode, _ in modes)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_exact_decode_equals_openai_preprocess_bit_for_bit(files, resolution):
    reference = openai_clip().clip._transform(resolution)
    ours, torchvision = Preprocess(resolution), image_transform(resolution)
    for name, path in files.items():
        with Image.open(path) as image:
            expected = reference(image)
        image = _decoded(path, exact=True)
        assert torch.equal(ours(image), expected), name
        assert torch.equal(torchvision(image), expected), name


def test_exact_decode_equals_open_clip_preprocess(files):
    import open_clip

    reference = open_clip.image_transform(24, is_train=False)
    for name, path in files.items():
        with Image.open(path) as image:
            expected = reference(image)
        assert torch.equal(Preprocess(24)(_decoded(path, exact=True)), expected), name


def test_default_decode_composites_alpha_on_white_where_exact_drops_it(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # transparent black, as many logos store it
    rgba.paste((200, 30, 30, 255), (10, 5, 30, 25))
    path = tmp_path / "logo.png"
    rgba.save(path)
    corner = (0, 0)
    assert _decoded(path, exact=False).getpixel(corner) == (255, 255, 255)
    assert _decoded(path, exact=True).convert("RGB").getpixel(corner) == (0, 0, 0)

    default, exact = Preprocess(24)(_decoded(path, exact=False)), Preprocess(24)(_decoded(path, exact=True))
    with Image.open(path) as image:
        assert torch.equal(exact, openai_clip().clip._transform(24)(image))
    assert not torch.equal(default, exact)


def test_sixteen_bit_grey_is_scaled_by_default_and_clipped_as_the_reference_under_exact(files):
    path = files["53x37-i16.png"]
    assert _decoded(path, exact=False).mode == "RGB"
    values = np.asarray(_decoded(path, exact=False))
    assert 100 < values.mean() < 155  # uniform 16-bit noise, scaled by 1/257
    assert np.asarray(_decoded(path, exact=True).convert("RGB")).mean() > 250  # Pillow clips at 255


def test_exact_decode_still_applies_the_exif_orientation(tmp_path):
    """The one deliberate difference left: a photo stored sideways is turned upright (the
    reference transforms ignore EXIF)."""
    picture = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif)
    path = tmp_path / "sideways.jpg"
    path.write_bytes(buffer.getvalue())
    assert _decoded(path, exact=True).size == (20, 40)
    with Image.open(path) as image:
        assert image.size == (40, 20)


def test_thumbnails_of_exact_decodes_are_rgb_on_white(files):
    from clipcli.batching import _thumbnail

    for name in ("53x37-p-transparent.png", "53x37-rgba.png", "53x37-i16.png", "53x37-1.png"):
        assert _thumbnail(_decoded(files[name], exact=True)).mode == "RGB", name
    rgb = _decoded(files["53x37-rgba.png"], exact=False)
    assert _thumbnail(rgb) is not rgb and _thumbnail(rgb).mode == "RGB"
