"""clipcli: CLIP image-text scoring, a drop-in for OpenAI's ``clip`` package.

    import clipcli
    model, preprocess = clipcli.load("ViT-B/32")
    logits_per_image, logits_per_text = model(preprocess(image)[None], clipcli.tokenize(["a cat"]))

Nothing heavy is imported here: torch loads on first use of ``load``/``tokenize``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "tokenize", "available_models", "pretrained_models", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import available_models, load, pretrained_models, tokenize


def __getattr__(name: str) -> Any:
    if name in ("load", "tokenize", "available_models", "pretrained_models"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'clipcli' has no attribute {name!r}")
