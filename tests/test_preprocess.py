"""Preprocessing parity with OpenAI's transform on real photos (RGB, grayscale, JPEG, PNG)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from checkpoints import openai_clip
from clipcli.preprocess import image_transform


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
