"""The public API, shaped like OpenAI's ``clip`` module: ``load``, ``tokenize``, ``available_models``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import ClipcliError
from .model import CLIP, TOWERS, build_model, tower_of
from .preprocess import image_transform


def available_models() -> list[str]:
    """Names of the nine released OpenAI CLIP models, as ``clip.available_models()`` lists them."""
    from .registry import MODELS

    return [info.name for info in MODELS]


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """Token ids ``[N, context_length]``, identical to OpenAI's ``clip.tokenize``."""
    from .tokenizer import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length, truncate=truncate)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_checkpoint(name_or_path: str | os.PathLike, download_root: str | os.PathLike | None = None) -> Path:
    """A checkpoint path for a released model name (downloading if needed) or an existing file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    from .download import model_file

    return model_file(str(name_or_path), cache_dir=download_root)


def load(
    name: str | os.PathLike,
    device: str | torch.device | None = None,
    jit: bool = False,
    download_root: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[CLIP, Callable]:
    """Load a CLIP model and its image transform: ``model, preprocess = clipcli.load("ViT-B/32")``.

    ``name`` is a released model name (see :func:`available_models`) or a checkpoint file
    (OpenAI TorchScript ``.pt``, a PyTorch state dict, or safetensors). Weights are float32 on
    CPU and float16 on CUDA unless ``dtype`` says otherwise. The model is in eval mode.
    """
    if jit:
        raise ClipcliError("jit=True is not supported: clipcli never executes TorchScript; use jit=False")
    device = torch.device(device if device is not None else default_device())
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_weights(resolve_checkpoint(name, download_root), device, dtype)
    return model, image_transform(model.visual.input_resolution)


def load_weights(path: Path, device: torch.device, dtype: torch.dtype, towers: Sequence[str] = TOWERS) -> CLIP:
    """The model in ``path`` in eval mode, with only ``towers`` (the others' weights are never read)."""
    from .checkpoint import read_state_dict

    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ClipcliError(f"towers must be some of {TOWERS}, not {tuple(towers)}")
    towers = tuple(t for t in TOWERS if t in towers)
    keep = None if towers == TOWERS else (lambda key: tower_of(key) in (*towers, None))
    model = build_model(read_state_dict(path, dtype=dtype, keep=keep), source=str(path), towers=towers)
    return model.to(device=device, dtype=dtype).eval()
