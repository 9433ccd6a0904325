"""Training augmentation: equal to open_clip's ``image_transform(is_train=True)`` for the same random draws,
deterministic per generator, and its ``--aug-cfg`` parsing and refusals.

open_clip (test-only oracle) draws from torch's global generator and flips its probability coins with Python's
``random``; ours draws from the generator it is given. After ``torch.manual_seed(k)`` and with a generator
seeded ``k``, the draws are the same numbers, so the pixels must be too (coins at probability 0 or 1 are not
drawn by either).
"""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from clipcli.errors import InputError
from clipcli.models.clip import CLIPConfig
from clipcli.train.augment import Augment, check_aug, crop_box, parse_aug_cfg, train_transform

pytestmark = pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")  # open_clip's, though it uses them
CONFIG = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
                    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                    transformer_layers=1, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth gradient with noise, so that crops and colour changes show in the pixels."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([x, y, (x + y) / 2], dim=-1) * 200 + torch.rand(height, width, 3, generator=generator) * 55
    image = Image.fromarray(base.to(torch.uint8).numpy(), "RGB")
    return image.convert(mode)


def open_clip_transform(aug: dict):
    open_clip_transform_module = pytest.importorskip("open_clip.transform")
    return open_clip_transform_module.image_transform(CONFIG.image_resolution, is_train=True, mean=CONFIG.image_mean,
                                                      std=CONFIG.image_std, aug_cfg=aug)


def theirs_and_ours(aug: dict, image: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    reference = open_clip_transform(aug)
    torch.manual_seed(seed)
    random.seed(seed)
    expected = reference(image)
    return expected, train_transform(CONFIG, aug)(image, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("aug", [{}, {"scale": (0.3, 1.0)},
                                 {"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 1.0},
                                 {"color_jitter": (0.4, 0.3, 0.2, 0.1), "color_jitter_prob": 1.0, "gray_scale_prob": 1.0},
                                 {"gray_scale_prob": 1.0}])
@pytest.mark.parametrize(("size", "mode"), [((40, 30), "RGB"), ((17, 64), "RGBA"), ((300, 12), "L"), ((33, 33), "P")])
def test_the_same_draws_give_open_clips_pixels(aug, size, mode):
    image = picture(*size, mode=mode, seed=size[0])
    for seed in range(3):
        expected, got = theirs_and_ours(aug, image, seed)
        assert got.shape == (3, 32, 32) and got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=1e-6), (aug, size, mode, seed, (got - expected).abs().max())


@pytest.mark.parametrize("ratio", [(3 / 4, 4 / 3), (0.2, 5.0), (2.0, 3.0)])
@pytest.mark.parametrize("size", [(50, 40), (400, 10), (10, 400)])  # the extreme ones reach the centred fallback
def test_crop_box_draws_as_torchvision_does(ratio, size):
    from torchvision.transforms import RandomResizedCrop

    image = Image.new("RGB", size)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, [0.08, 1.0], list(ratio))
        assert crop_box(*size, (0.08, 1.0), ratio, torch.Generator().manual_seed(seed)) == expected


def test_the_generator_alone_decides():
    transform = train_transform(CONFIG, {"scale": (0.2, 1.0), "color_jitter": 0.4, "gray_scale_prob": 0.5})
    image = picture(64, 48)
    first = transform(image, torch.Generator().manual_seed(7))
    torch.manual_seed(123)
    random.seed(123)  # global state plays no part
    assert torch.equal(transform(image, torch.Generator().manual_seed(7)), first)
    assert not torch.equal(transform(image, torch.Generator().manual_seed(8)), first)
    gray = [bool(torch.equal(out[0] * 0.2 + 0.5, out[1] * 0.25 + 0.4))  # equal channels before normalising
            for out in (transform(image, torch.Generator().manual_seed(s)) for s in range(30))]
    assert 0 < sum(gray) < 30  # the coin comes up both ways


def test_no_augmentation_is_inference_preprocessing():
    from clipcli.preprocess import preprocess_for

    transform = train_transform(CONFIG, None)
    image = picture(70, 50, mode="RGBA")
    assert torch.equal(transform(image, torch.Generator().manual_seed(1)), preprocess_for(CONFIG)(image))
    assert torch.equal(transform(image, torch.Generator().manual_seed(2)), transform(image, None))


def test_defaults_and_interpolation_follow_open_clip_and_the_model():
    transform = train_transform(CONFIG, {})
    assert isinstance(transform, Augment)
    assert (transform.scale, transform.ratio, transform.color_jitter, transform.gray_scale_prob) == (
        (0.9, 1.0), (3 / 4, 4 / 3), None, 0.0)
    jitter = check_aug({"color_jitter": 0.3})
    assert jitter["color_jitter"] == (0.3, 0.3, 0.3, 0.0) and jitter["color_jitter_prob"] == 0.8
    assert check_aug({"color_jitter": (0.1, 0.2, 0.3)})["color_jitter"] == (0.1, 0.2, 0.3, 0.0)
    from dataclasses import replace

    bilinear = train_transform(replace(CONFIG, interpolation="bilinear"), {})
    image = picture(90, 60)
    assert not torch.equal(bilinear(image, torch.Generator().manual_seed(0)), transform(image, torch.Generator().manual_seed(0)))


def test_parse_aug_cfg_reads_literals_and_names_what_is_wrong():
    assert parse_aug_cfg(["scale=(0.5,1.0)", "color_jitter=0.4", "gray_scale_prob=0.2"]) == {
        "scale": (0.5, 1.0), "color_jitter": 0.4, "gray_scale_prob": 0.2}
    assert parse_aug_cfg([]) == {}
    for items, words in [
        (["scale=(0.5,"], "scale="), (["scale"], "KEY=VALUE"), (["scale=(1.5, 2)"], "scale="),
        (["scale=(0.9, 0.5)"], "scale="), (["ratio=(0, 1)"], "ratio="), (["gray_scale_prob=2"], "gray_scale_prob"),
        (["color_jitter=(0.1, 0.2)"], "color_jitter="), (["color_jitter=(0,0,0,0.7)"], "color_jitter="),
        (["color_jitter_prob=0.5"], "needs color_jitter"), (["re_prob=0.3", "use_timm=True"], "timm"),
        (["sharpness=0.5"], "sharpness"), (["gray_scale_prob=lots"], "gray_scale_prob"),
    ]:
        with pytest.raises(InputError, match=words) as caught:
            parse_aug_cfg(items)
        assert caught.value.option == "aug_cfg"
    with pytest.raises(InputError, match="use_timm"):
        train_transform(CONFIG, {"use_timm": False})
