"""Preprocessing parity: image_transform with OpenAI's and open_clip's transforms on real photos,
and Preprocess (no torchvision) bit-identical to image_transform on every mode and odd sizes."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import openai_clip
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipcli.preprocess import Preprocess, _center_crop, image_transform

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("resolution", [224, 336, 32])
def test_matches_openai_transform(sample_images, resolution):
    openai_clip()
    from clip.clip import _transform

    theirs = _transform(resolution)
    ours = image_transform(resolution)
    modes = set()
    for path in sample_images:
        with Image.open(path) as image:
            modes.add(image.mode)
            a, b = ours(image), theirs(image)
        assert a.shape == (3, resolution, resolution)
        assert (a - b).abs().max().item() <= 1e-6, path.name
    assert {"RGB", "L"} <= modes


def test_matches_open_clip_transform(sample_images):
    import open_clip

    _, _, theirs = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    ours = image_transform(224)
    for path in sample_images:
        with Image.open(path) as image:
            assert torch.allclose(ours(image), theirs(image), atol=1e-6), path.name


def test_rgba_and_palette_images_become_rgb():
    ours = image_transform(32)
    for mode in ("RGBA", "P", "LA", "CMYK", "1"):
        image = Image.new(mode, (40, 50))
        assert ours(image).shape == (3, 32, 32)


# Preprocess: the torchvision-free transform of the batch pipeline, bit-identical to image_transform.

MODES = ("RGB", "RGBA", "P", "L", "LA", "I;16", "1", "CMYK")
RESOLUTIONS = (224, 288, 336, 15)


@functools.cache
def _torchvision(resolution: int):
    return image_transform(resolution)


def _noise(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """A random image of ``mode``: the hardest input for resampling to agree on."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        values = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        return Image.frombytes(mode, (width, height), values.astype("<u2").tobytes())
    rgb = Image.frombytes("RGB", (width, height), rng.integers(0, 256, (height, width, 3), np.uint8).tobytes())
    if mode == "P":
        return rgb.quantize(64)
    if mode == "1":
        return rgb.convert("L").convert("1")
    channels = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, (width, height), rng.integers(0, 256, (height, width, channels), np.uint8).tobytes())


def _assert_same(image: Image.Image, resolution: int):
    ours, theirs = Preprocess(resolution)(image), _torchvision(resolution)(image)
    assert ours.shape == (3, resolution, resolution)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), (image.mode, image.size, resolution)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_preprocess_equals_torchvision_on_photos(sample_images, resolution):
    for path in sample_images:
        with Image.open(path) as image:
            _assert_same(image, resolution)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_preprocess_equals_torchvision_on_every_mode(mode, resolution):
    _assert_same(_noise(mode, 333, 500), resolution)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_preprocess_equals_torchvision_on_odd_sizes(resolution):
    """Already the resolution (no resampling), one side already right, extreme aspect ratios,
    and sizes whose longer side does not scale to a whole number (torchvision truncates it)."""
    r = resolution
    sizes = [(r, r), (r, 2 * r + 1), (3 * r - 1, r), (1, 1), (1000, 3), (3, 1000), (1, 2), (333, 500), (640, 427)]
    for width, height in sizes:
        _assert_same(_noise("RGB", width, height, seed=width * height), r)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 600),
    height=st.integers(1, 600),
    mode=st.sampled_from(MODES),
    resolution=st.sampled_from((7, 15, 64, 224)),
)
def test_preprocess_equals_torchvision_on_random_images(width, height, mode, resolution):
    _assert_same(_noise(mode, width, height), resolution)


@pytest.mark.parametrize("mode", ("RGB", "RGBA", "P", "L", "I;16", "1"))
@pytest.mark.parametrize(("width", "height", "crop"), [(1, 5, 4), (5, 1, 4), (2, 3, 5), (3, 3, 4), (6, 2, 3)])
def test_center_crop_pads_like_torchvision(mode, width, height, crop):
    """Unreachable after the resize (both sides end at least the crop), but matched anyway."""
    from torchvision.transforms.functional import center_crop

    image = _noise(mode, width, height)
    ours, theirs = _center_crop(image, crop), center_crop(image, [crop])
    assert (ours.mode, ours.size) == (theirs.mode, theirs.size)
    assert np.array_equal(np.array(ours), np.array(theirs))
    assert ours.getpalette() == theirs.getpalette()


def test_preprocess_does_not_import_torchvision():
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "import clipcli.preprocess as p\n"
        "p.Preprocess(224)(Image.new('RGB', (640, 480)))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_a_batch_normalised_at_once_equals_each_image_alone(sample_images):
    """The batch path (uint8 pixels from the decode workers, normalised per batch) gives the
    same floats as ``Preprocess(image)``, which equals torchvision's transform."""
    preprocess = Preprocess(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = [Image.open(path) for path in sample_images]
    batch = preprocess.normalize(torch.from_numpy(np.stack([preprocess.pixels(image) for image in images])))
    assert batch.shape == (len(images), 3, 224, 224) and batch.dtype == torch.float32
    assert all(torch.equal(row, preprocess(image)) for row, image in zip(batch, images))

