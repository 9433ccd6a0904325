"""The public API, shaped like OpenAI's ``clip`` module: ``load``, ``tokenize``, ``available_models``."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from .errors import ClipcliError
from .feedback import SILENT, Feedback
from .models.clip import CLIP


def available_models() -> list[str]:
    """Names of the nine released OpenAI CLIP models, as ``clip.available_models()`` lists them.
    OpenCLIP's weights (``ARCH/TAG``) load by name too: :func:`pretrained_models` lists them."""
    from .models.registry import MODELS

    return [info.name for info in MODELS]


def pretrained_models() -> list[str]:
    """Every registry name: OpenAI's nine, then OpenCLIP's ``ARCH/TAG`` pairs."""
    from .models.registry import pretrained

    return available_models() + [entry.name for entry in pretrained()]


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """Token ids ``[N, context_length]``, identical to OpenAI's ``clip.tokenize``."""
    from .text.bpe import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length, truncate=truncate)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    name: str | os.PathLike,
    device: str | torch.device | None = None,
    jit: bool = False,
    download_root: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    arch: str | None = None,
    feedback: Feedback = SILENT,
) -> tuple[CLIP, Callable]:
    """Load a CLIP model and its image transform: ``model, preprocess = clipcli.load("ViT-B/32")``.

    ``name`` is one of OpenAI's names (see :func:`available_models`), an OpenCLIP ``ARCH/TAG``
    (:func:`pretrained_models`), ``hf-hub:ORG/REPO`` (an OpenCLIP or transformers CLIP on the
    Hugging Face hub, read through its cache), a model folder, or a checkpoint file (OpenAI
    TorchScript ``.pt``, a PyTorch state dict, or safetensors; ``arch`` names the architecture
    of a file that does not say). Weights are float32 on CPU and float16 on CUDA unless
    ``dtype`` says otherwise. The model is in eval mode; ``preprocess`` is the model's own
    transform (a torchvision ``Compose``). A download of the weights is silent unless
    ``feedback`` (:class:`clipcli.feedback.Feedback`) asks for its news and progress, e.g.
    ``feedback=Feedback(log=print)``.
    """
    from .loading import load_model
    from .preprocess import transform_for

    if jit:
        raise ClipcliError("jit=True is not supported: clipcli never executes TorchScript; use jit=False")
    device = torch.device(device if device is not None else default_device())
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_model(name, device, dtype, arch=arch, cache_dir=download_root, feedback=feedback)
    return model, transform_for(model.config)
