"""Random-weight CLIP checkpoints in the released formats, built with OpenAI's reference code.

The checkpoints need only OpenAI's ``clip/model.py``, loaded from where the package is
installed without importing the package (its ``__init__`` imports ``pkg_resources``, which
setuptools 81 removed); the oracle tests that call ``clip.load`` import the whole package.

Every tensor is random, LayerNorm gains, BatchNorm statistics and all biases included (the
default initialisation would hide ordering bugs such as a swapped gain and bias).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

# name -> keyword arguments of OpenAI's clip.model.CLIP
CONFIGS = {
    "tiny-vit": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2),
    "tiny-rn": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=32, vision_patch_size=None,
                    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12),
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None,
                 context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12),
}


def openai_clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
    return clip


def reference_model_module():
    """OpenAI's ``clip.model`` (pure torch), without running ``clip/__init__.py``."""
    import importlib.util
    import sys

    if "clip.model" in sys.modules:
        return sys.modules["clip.model"]
    if "_openai_clip_model" not in sys.modules:
        package = importlib.util.find_spec("clip")
        if package is None or not package.submodule_search_locations:
            raise ImportError("OpenAI's clip package is not installed (pip install -e '.[test]')")
        location = Path(next(iter(package.submodule_search_locations))) / "model.py"
        spec = importlib.util.spec_from_file_location("_openai_clip_model", location)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_openai_clip_model"] = module
    return sys.modules["_openai_clip_model"]


def random_reference_model(name: str, seed: int = 0) -> torch.nn.Module:
    """OpenAI's CLIP with the architecture ``name`` and every tensor randomised, in float32."""
    torch.manual_seed(seed)
    model = reference_model_module().CLIP(**CONFIGS[name]).float()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            leaf = key.rsplit(".", 1)[-1]
            if key == "logit_scale":
                tensor.fill_(4.0 + torch.rand(()).item())
            elif leaf == "running_var":
                tensor.uniform_(0.5, 1.5)
            elif leaf == "running_mean" or leaf == "bias":
                tensor.normal_(0, 0.1)
            elif leaf == "weight" and tensor.ndim == 1:  # LayerNorm and BatchNorm gains
                tensor.normal_(1.0, 0.1)
            elif tensor.ndim >= 2 and "embedding" not in key:
                fan_in = tensor[0].numel() if tensor.ndim == 4 else tensor.shape[-1]
                tensor.normal_(0, fan_in**-0.5)
            else:
                tensor.normal_(0, 0.05)
    return model.eval()


def save_released(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model`` as OpenAI released CLIP: a traced TorchScript archive with float16
    weights and the extra ``input_resolution``/``context_length``/``vocab_size`` entries."""
    model = _copy(model)
    resolution, context, vocab = model.visual.input_resolution, model.context_length, model.vocab_size
    del model.context_length, model.vocab_size
    model.register_buffer("input_resolution", torch.tensor(resolution))
    model.register_buffer("context_length", torch.tensor(context))
    model.register_buffer("vocab_size", torch.tensor(vocab))
    image = torch.zeros(1, 3, resolution, resolution)
    text = torch.zeros(1, context, dtype=torch.long)
    text[0, :4] = torch.tensor([49406, 320, 1125, 49407])  # <start> a photo <end>: any valid tokens trace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    traced.half().save(str(path))
    return path


def released_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """What OpenAI's own loader sees in a released-format file (fp16, extras dropped)."""
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    return {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def save_state_dict(state: dict[str, torch.Tensor], path: Path, wrap: bool = False) -> Path:
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path)
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)
