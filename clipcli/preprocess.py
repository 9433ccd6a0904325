"""Image preprocessing, exactly as OpenAI's CLIP does it.

Resize the shorter side to the model's resolution (bicubic), centre-crop a square, convert to
RGB, scale to [0, 1] and normalise with the CLIP training statistics.
"""

from __future__ import annotations

from typing import Callable

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(resolution: int) -> Callable:
    """The ``preprocess`` of ``clipcli.load``: ``PIL.Image -> FloatTensor[3, resolution, resolution]``."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose(
        [
            Resize(resolution, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(resolution),
            _to_rgb,
            ToTensor(),
            Normalize(MEAN, STD),
        ]
    )
