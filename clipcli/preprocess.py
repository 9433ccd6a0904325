"""Image preprocessing, exactly as OpenAI's CLIP does it.

Resize the shorter side to the model's resolution (bicubic), centre-crop a square, convert to
RGB, scale to [0, 1] and normalise with the CLIP training statistics.

There are two implementations of that one transform, bit-identical on PIL images:

- ``image_transform(resolution)`` is the torchvision ``Compose`` that OpenAI's ``clip.load``
  returns. ``clipcli.load`` returns it too, so code written for ``clip`` (which may inspect or
  extend the ``Compose``) keeps working.
- ``Preprocess(resolution)`` does the same steps with Pillow, numpy and torch alone; the batch
  pipeline uses it. Importing torchvision registers operators that pull in torch._dynamo,
  sympy and triton: measured, ``import torchvision.transforms`` after ``import torch`` loads
  about 1,078 more modules, takes about 1.5 s and adds 164 MB of peak resident memory to every
  process, only to call Pillow's resize and crop.

``Preprocess`` follows torchvision 0.29's functional code step by step: the resized size is
``_compute_resized_output_size`` (the longer side truncated, ``int(r * long / short)``), an
image already at that size is not resampled, crop offsets are ``int(round((n - r) / 2.0))``,
an image smaller than the crop is zero-padded by ``(r - n) // 2`` before (which Pillow's
``crop`` does when the box reaches outside the image), and ``ToTensor`` and ``Normalize`` are
the same float32 operations in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side set to ``short_side``, the longer truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if width <= height else (new_long, short_side)


def _crop_start(length: int, crop: int) -> int:
    """Where a centred crop starts along one side; negative when the side is padded."""
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    left, top = _crop_start(image.width, size), _crop_start(image.height, size)
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Preprocess:
    """``PIL.Image -> FloatTensor[3, resolution, resolution]``, equal to ``image_transform(resolution)``."""

    resolution: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = _resized_size(image.width, image.height, self.resolution)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        image = _center_crop(image, self.resolution).convert("RGB")
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))  # (r, r, 3)
        x = pixels.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)  # (3, r, r)
        mean = torch.as_tensor(MEAN, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(STD, dtype=x.dtype).view(-1, 1, 1)
        return x.sub_(mean).div_(std)


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
