"""The public API, shaped like OpenAI's ``clip`` module: ``load``, ``tokenize``, ``available_models``.

A SigLIP loads the same way and has the same methods; its text needs its own tokenizer, which
``tokenize(texts, model=model)`` (or ``model.tokenizer``) uses, while ``tokenize(texts)`` stays
OpenAI's ``clip.tokenize``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .errors import ClipcliError
from .feedback import SILENT, Feedback

if TYPE_CHECKING:  # pragma: no cover
    from .models.clip import DualEncoder


def available_models() -> list[str]:
    """Names of the nine released OpenAI CLIP models, as ``clip.available_models()`` lists them.
    OpenCLIP's weights (``ARCH/TAG``) load by name too: :func:`pretrained_models` lists them."""
    from .models.registry import MODELS

    return [info.name for info in MODELS]


def pretrained_models() -> list[str]:
    """Every registry name: OpenAI's nine, then OpenCLIP's ``ARCH/TAG`` pairs."""
    from .models.registry import pretrained

    return available_models() + [entry.name for entry in pretrained()]


def tokenize(texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False,
             model: "DualEncoder | None" = None) -> torch.LongTensor:
    """Token ids ``[N, context_length]``.

    Without ``model``: identical to OpenAI's ``clip.tokenize`` (OpenAI's BPE, a context of 77).
    With a ``model`` from :func:`load`: that model's own tokenizer (``model.tokenizer``: the BPE for
    a CLIP, the SentencePiece model its files hold for a SigLIP) and, unless ``context_length``
    says otherwise, the model's context (SigLIP's 64, padded as it was trained). A text longer
    than the context raises :class:`~clipcli.errors.ContextLengthError` unless ``truncate=True``.
    """
    if model is None:
        from .text.bpe import tokenize as _tokenize

        return _tokenize(texts, context_length=77 if context_length is None else context_length, truncate=truncate)
    from .text.tokenizers import tokenizer_of

    tokenizer = tokenizer_of(model)  # built, or loaded without its files: its config's (which says what is missing)
    texts = [texts] if isinstance(texts, str) else list(texts)
    context_length = model.context_length if context_length is None else context_length
    return tokenizer.encode_texts(texts, context_length=context_length, truncate=truncate)[0]


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
) -> tuple[DualEncoder, Callable]:
    """Load a model and its image transform: ``model, preprocess = clipcli.load("ViT-B/32")``.

    ``name`` is one of OpenAI's names (see :func:`available_models`), an OpenCLIP ``ARCH/TAG``
    (:func:`pretrained_models`, SigLIPs included), ``hf-hub:ORG/REPO`` (an OpenCLIP CLIP or SigLIP,
    or a transformers ``CLIPModel`` or ``SiglipModel``, on the Hugging Face hub, read through its
    cache), a model folder, or a checkpoint file (OpenAI TorchScript ``.pt``, a PyTorch state
    dict, or safetensors; ``arch`` names the architecture of a file that does not say). Weights
    are float32 on CPU and float16 on CUDA unless ``dtype`` says otherwise. The model is in eval
    mode; ``preprocess`` is the model's own transform (a torchvision ``Compose``: for a SigLIP a
    bicubic squash to the square, no crop, mean and std 0.5). ``model.tokenizer`` tokenizes for
    it (see :func:`tokenize`); ``model.score_kind`` says how to read ``model(images, tokens)``'s
    logits: ``"softmax"`` over the texts (CLIP) or ``"sigmoid"``, each pair's own probability
    (a model with a logit bias, SigLIP). A download of the weights is silent unless
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
