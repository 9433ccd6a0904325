"""Training-time image augmentation, named and drawn as open_clip's ``aug_cfg`` does.

A training transform is ``transform(image, generator) -> FloatTensor[3, r, r]``: every random
number it uses comes from ``generator``, never from torch's or Python's global generators, so
a sample's augmentation depends only on the seed the data reader gives it (seed, epoch and the
sample's position; see :mod:`clipcli.train.data`), whatever the number of processes and data
workers, and a resumed epoch crops exactly as the uninterrupted one would have.

Without an ``aug`` dict the transform is inference's preprocessing (:func:`clipcli.preprocess.preprocess_for`)
and ignores the generator. With one, it follows open_clip's ``image_transform(is_train=True)``:

1. ``RandomResizedCrop`` to the model's resolution: a box of ``scale`` times the image's area
   (open_clip's default ``(0.9, 1.0)``) and an aspect ratio drawn log-uniformly from ``ratio``
   (``(3/4, 4/3)``), ten tries, then a centred fallback; resized with the model's interpolation
   (open_clip always uses bicubic, which is every released model's);
2. conversion to RGB (after the crop: the image comes decoded in its file's mode, as inference's
   exact decode gives it, with EXIF orientation and the pixel cap applied);
3. with probability ``color_jitter_prob``, torchvision's ``ColorJitter(*color_jitter)``;
4. with probability ``gray_scale_prob``, grayscale with three channels;
5. ``ToTensor`` and ``Normalize`` with the model's ``image_mean`` and ``image_std``.

The parameters are drawn as torchvision draws them (the same calls, in the same order), so a
generator seeded ``k`` gives the pixels that open_clip's transform gives after
``torch.manual_seed(k)`` whenever its Python-``random`` coin flips agree (probabilities 0 or 1:
the coin is not drawn then, here or there). Deviations, for things open_clip leaves out or warns
about: ``ratio`` is honoured (open_clip ignores it without timm); ``color_jitter`` may be one number
(brightness, contrast and saturation alike, hue 0) or three, and without ``color_jitter_prob`` it
applies with probability 0.8 (open_clip's jitter default; open_clip itself ignores it then). Keys
that need timm (``use_timm``, ``re_prob``, ``re_count``) are refused rather than ignored.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..models.config import CLIPConfig

DEFAULTS = {"scale": (0.9, 1.0), "ratio": (3 / 4, 4 / 3)}  # open_clip's AugmentationCfg / torchvision's
JITTER_PROB = 0.8  # open_clip's color_jitter transform's default probability
SUPPORTED = ("scale", "ratio", "color_jitter", "color_jitter_prob", "gray_scale_prob")
NEEDS_TIMM = ("use_timm", "re_prob", "re_count")  # open_clip's keys for timm's transform


# ----------------------------------------------------------------------------- the settings


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range(key: str, value: Any, upper: float = math.inf) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_number, value))
            and 0 < value[0] <= value[1] <= upper):
        bound = f" <= {upper:g}" if upper != math.inf else ""
        raise InputError(f"{key}={value!r}: give two numbers (low, high) with 0 < low <= high{bound}, "
                         f"e.g. {key}='{DEFAULTS[key]}'", option="aug_cfg")
    return float(value[0]), float(value[1])


def _probability(key: str, value: Any) -> float:
    if not (_number(value) and 0 <= value <= 1):
        raise InputError(f"{key}={value!r}: give a probability between 0 and 1", option="aug_cfg")
    return float(value)


def _jitter(value: Any) -> tuple[float, float, float, float]:
    """``(brightness, contrast, saturation, hue)`` from one number, three or four."""
    if _number(value):
        value = (value, value, value)
    if not (isinstance(value, (tuple, list)) and len(value) in (3, 4) and all(map(_number, value))
            and all(v >= 0 for v in value) and (len(value) == 3 or value[3] <= 0.5)):
        raise InputError(f"color_jitter={value!r}: give one number >= 0, or (brightness, contrast, saturation"
                         "[, hue]) with each >= 0 and hue <= 0.5, e.g. color_jitter='(0.4,0.4,0.4,0.1)'",
                         option="aug_cfg")
    return tuple(float(v) for v in value) + ((0.0,) if len(value) == 3 else ())


def check_aug(aug: dict) -> dict:
    """``aug`` with every value checked and filled in: ``scale``, ``ratio``, and ``color_jitter``
    (four numbers or None), ``color_jitter_prob``, ``gray_scale_prob``. Raises :class:`InputError`
    naming a key we do not know or do not support, or a value that does not fit."""
    unknown = [key for key in aug if key not in SUPPORTED]
    if unknown:
        timm = [key for key in unknown if key in NEEDS_TIMM]
        why = f" ({', '.join(timm)}: timm's transform, which clipcli does not use)" if timm else ""
        raise InputError(f"{', '.join(unknown)}: not an augmentation clipcli applies{why}; "
                         f"use {', '.join(SUPPORTED)}", option="aug_cfg")
    jitter = None if aug.get("color_jitter") is None else _jitter(aug["color_jitter"])
    if aug.get("color_jitter_prob") is not None and jitter is None:
        raise InputError("color_jitter_prob needs color_jitter (how strong), e.g. color_jitter=0.4", option="aug_cfg")
    return {
        "scale": _range("scale", aug.get("scale", DEFAULTS["scale"]), upper=1.0),
        "ratio": _range("ratio", aug.get("ratio", DEFAULTS["ratio"])),
        "color_jitter": jitter,
        "color_jitter_prob": (0.0 if jitter is None else
                              _probability("color_jitter_prob", aug.get("color_jitter_prob", JITTER_PROB))),
        "gray_scale_prob": _probability("gray_scale_prob", aug.get("gray_scale_prob", 0.0)),
    }


def parse_aug_cfg(items: list[str]) -> dict:
    """``["scale=(0.5,1.0)", "color_jitter=0.4"]`` -> ``{"scale": (0.5, 1.0), "color_jitter": 0.4}``,
    values read as Python literals, then checked by :func:`check_aug` (the dict holds what was written)."""
    aug: dict = {}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise InputError(f"{item!r}: write KEY=VALUE, e.g. scale='(0.5,1.0)'", option="aug_cfg")
        try:
            aug[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise InputError(f"{key}={text!r}: the value is not a number or tuple of numbers", option="aug_cfg") from None
    check_aug(aug)
    return aug


# ----------------------------------------------------------------------------- the draws


def _uniform(low: float, high: float, generator: "torch.Generator") -> float:
    import torch

    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _randint(high: int, generator: "torch.Generator") -> int:
    """An integer in ``[0, high)``, as ``torch.randint(0, high, (1,))`` draws it."""
    import torch

    return int(torch.randint(0, high, size=(1,), generator=generator).item())


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: "torch.Generator") -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop: torchvision's ``RandomResizedCrop.get_params``,
    draw for draw, from ``generator``."""
    import torch

    area = height * width
    log_ratio = torch.log(torch.tensor(ratio)).tolist()  # in float32, as torchvision computes it
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(height - h + 1, generator)
            left = _randint(width - w + 1, generator)
            return top, left, h, w
    in_ratio = width / height  # the fallback: the whole image, cut to the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _coin(p: float, generator: "torch.Generator") -> bool:
    """True with probability ``p``; certain outcomes draw nothing (so do open_clip's, from its generator)."""
    import torch

    if p <= 0 or p >= 1:
        return p >= 1
    return bool(torch.rand(1, generator=generator).item() < p)


def _color_jitter(image: "Image.Image", strengths: tuple[float, float, float, float],
                  generator: "torch.Generator") -> "Image.Image":
    """torchvision's ``ColorJitter`` (its ranges, draws and random order of the four adjustments)."""
    import torch
    from torchvision.transforms import functional as F

    brightness, contrast, saturation, hue = strengths
    ranges = [None if s == 0 else (max(0.0, 1 - s), 1 + s) for s in (brightness, contrast, saturation)]
    ranges.append(None if hue == 0 else (-hue, hue))
    order = torch.randperm(4, generator=generator).tolist()
    factors = [None if r is None else _uniform(r[0], r[1], generator) for r in ranges]
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for index in order:
        if factors[index] is not None:
            image = adjust[index](image, factors[index])
    return image


# ----------------------------------------------------------------------------- the transforms


@dataclass(frozen=True)
class Augment:
    """``(PIL image, generator) -> FloatTensor[3, resolution, resolution]``: the steps of the module docstring."""

    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    scale: tuple[float, float]
    ratio: tuple[float, float]
    color_jitter: tuple[float, float, float, float] | None = None
    color_jitter_prob: float = 0.0
    gray_scale_prob: float = 0.0

    def __call__(self, image: "Image.Image", generator: "torch.Generator") -> "torch.Tensor":
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        top, left, height, width = crop_box(image.width, image.height, self.scale, self.ratio, generator)
        mode = InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC
        image = F.resized_crop(image, top, left, height, width, [self.resolution, self.resolution], mode,
                               antialias=True).convert("RGB")
        if self.color_jitter is not None and _coin(self.color_jitter_prob, generator):
            image = _color_jitter(image, self.color_jitter, generator)
        if _coin(self.gray_scale_prob, generator):
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        return F.normalize(F.to_tensor(image), list(self.mean), list(self.std))


@dataclass(frozen=True)
class Unaugmented:
    """Inference's preprocessing with a training transform's signature: the generator is unused."""

    preprocess: Callable

    def __call__(self, image: "Image.Image", generator: "torch.Generator | None" = None) -> "torch.Tensor":
        return self.preprocess(image)


def train_transform(config: "CLIPConfig", aug: dict | None) -> Callable[["Image.Image", "torch.Generator"], "torch.Tensor"]:
    """The training transform for a model of ``config``: inference's preprocessing when ``aug`` is
    None, else open_clip's augmentation as ``aug`` (its ``aug_cfg`` names) sets it."""
    if aug is None:
        from ..preprocess import preprocess_for

        return Unaugmented(preprocess_for(config))
    settings = check_aug(aug)
    return Augment(config.image_resolution, tuple(config.image_mean), tuple(config.image_std), config.interpolation,
                   **settings)
