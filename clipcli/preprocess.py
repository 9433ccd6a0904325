"""Image preprocessing, exactly as OpenAI's CLIP and OpenCLIP do it.

OpenAI's transform: resize the shorter side to the model's resolution (bicubic), centre-crop a
square, convert to RGB, scale to [0, 1] and normalise with the CLIP training statistics.
OpenCLIP models may differ in each step, and their config says how (the fields of
:class:`~clipcli.models.clip.CLIPConfig`): the statistics (``image_mean``/``image_std``, e.g.
0.5s for LAION's ViT-L-14), the ``interpolation`` (bicubic or bilinear) and the
``resize_mode``: ``shortest`` (as above), ``squash`` (resize to a square, ignoring the aspect
ratio: the DFN models) or ``longest`` (fit the longer side, then pad to a square with black).
SigLIP's transform is a bicubic ``squash`` with mean and std 0.5 (open_clip's and transformers'
``SiglipImageProcessor``'s alike): equal to open_clip's bit for bit, and to transformers' with its
PIL backend; its default torchvision backend resamples tensors with its own bicubic, up to 2 of
255 levels away (``tests/test_siglip.py``).

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
the same float32 operations in the same order. Like torchvision's ``Compose``, it resizes and
crops the image in its own mode and converts to RGB only then: Pillow resizes P and 1 images with
nearest neighbour and RGBA and LA with premultiplied alpha, and the conversion drops alpha. Images
decoded with ``--exact-decode`` arrive in their file's mode and so match the reference for every
mode; by default decoding has already made them RGB (alpha on white, see
:func:`clipcli.images.to_rgb`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

from .models.config import OPENAI_MEAN, OPENAI_STD

if TYPE_CHECKING:  # pragma: no cover
    import torch

MEAN, STD = OPENAI_MEAN, OPENAI_STD  # CLIP's training statistics
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash", "longest")
_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side set to ``short_side``, the longer truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if width <= height else (new_long, short_side)


def _fitted_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the longer side set to ``side`` and the other rounded (OpenCLIP's
    ``ResizeKeepRatio(longest=1)``)."""
    ratio = max(width / side, height / side)
    return round(width / ratio), round(height / ratio)


def _target_size(width: int, height: int, resolution: int, resize_mode: str) -> tuple[int, int]:
    if resize_mode == "shortest":
        return _resized_size(width, height, resolution)
    if resize_mode == "squash":
        return resolution, resolution
    if resize_mode == "longest":
        return _fitted_size(width, height, resolution)
    raise ValueError(f"unknown resize mode {resize_mode!r}; use shortest, squash or longest")


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
    """``PIL.Image -> FloatTensor[3, resolution, resolution]``, equal to ``image_transform``
    with the same arguments."""

    resolution: int
    mean: Sequence[float] = MEAN
    std: Sequence[float] = STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __call__(self, image: Image.Image) -> "torch.Tensor":
        import torch

        return self.normalize(torch.from_numpy(self.pixels(image))[None])[0]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The resized, cropped RGB pixels, ``uint8 (r, r, 3)``: what decode workers hand over
        (a quarter of the bytes of the float tensor), normalised per batch where the model runs."""
        size = _target_size(image.width, image.height, self.resolution, self.resize_mode)
        if size != image.size:
            image = image.resize(size, _RESAMPLING[self.interpolation])
        image = _center_crop(image, self.resolution).convert("RGB")
        return np.array(image, np.uint8, copy=True)  # (r, r, 3)

    def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """``uint8 (B, r, r, 3)`` -> ``float (B, 3, r, r)`` on the pixels' device: ``ToTensor``
        and ``Normalize``'s float32 operations in their order, so the same values on any device.
        The 255 is a tensor on purpose: CUDA divides by a plain-number divisor as a
        multiplication by its reciprocal, which is not always the same float."""
        import torch

        x = pixels.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype())  # (B, 3, r, r)
        scale = torch.tensor(255, dtype=x.dtype, device=x.device)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1).to(x.device)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1).to(x.device)
        return x.div_(scale).sub_(mean).div_(std)


def preprocess_for(config) -> Preprocess:
    """The transform a model of ``config`` (a :class:`~clipcli.models.clip.CLIPConfig`) expects."""
    return Preprocess(config.image_resolution, tuple(config.image_mean), tuple(config.image_std),
                      config.interpolation, config.resize_mode)


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(resolution: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                    interpolation: str = "bicubic", resize_mode: str = "shortest") -> Callable:
    """The ``preprocess`` of ``clipcli.load``: ``PIL.Image -> FloatTensor[3, resolution, resolution]``,
    a torchvision ``Compose`` as OpenAI's ``clip.load`` and OpenCLIP return."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[interpolation]
    if resize_mode == "shortest":
        steps = [Resize(resolution, interpolation=mode), CenterCrop(resolution)]
    elif resize_mode == "squash":
        steps = [Resize((resolution, resolution), interpolation=mode)]
    elif resize_mode == "longest":
        def fit(image):
            width, height = _fitted_size(image.width, image.height, resolution)
            return Resize((height, width), interpolation=mode)(image)

        steps = [fit, CenterCrop(resolution)]
    else:
        raise ValueError(f"unknown resize mode {resize_mode!r}; use shortest, squash or longest")
    return Compose([*steps, _to_rgb, ToTensor(), Normalize(tuple(mean), tuple(std))])


def transform_for(config) -> Callable:
    """:func:`image_transform` for a model of ``config``."""
    return image_transform(config.image_resolution, config.image_mean, config.image_std, config.interpolation,
                           config.resize_mode)
