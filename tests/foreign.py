"""Tiny random-weight OpenCLIP and transformers CLIP models, saved the way the hub holds them.

Every tensor is randomised (LayerNorm gains, biases and projections included: the default
initialisation would hide ordering bugs such as swapped q/k/v or an untransposed projection).
``hf_cache_repo`` lays out a repository as the Hugging Face cache does
(``models--ORG--NAME/refs/main`` and ``snapshots/<commit>/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# OpenCLIP model configs, each carrying one trait that OpenAI's shapes-only reading gets wrong.
OPEN_CLIP_CONFIGS = {
    # GELU (LAION/DataComp); 80-wide vision heads (ViT-H-14's) with a text tower of 2 x 48-wide heads
    "gelu-head80": dict(embed_dim=32, quick_gelu=False,
                        vision_cfg=dict(image_size=32, layers=2, width=320, patch_size=8, head_width=80),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=96, heads=2, layers=2)),
    # ViT-g-14's 88-wide heads and mlp_ratio 4.3637
    "head88-mlp4.3637": dict(embed_dim=32,
                             vision_cfg=dict(image_size=32, layers=1, width=264, patch_size=8, head_width=88,
                                             mlp_ratio=4.3637),
                             text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)),
    # ViT-bigG-14's 104-wide heads and mlp_ratio 4.9231, at a non-224-like resolution (40 px)
    "head104-mlp4.9231-40px": dict(embed_dim=32,
                                   vision_cfg=dict(image_size=40, layers=2, width=208, patch_size=8, head_width=104,
                                                   mlp_ratio=4.9231),
                                   text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)),
    # QuickGELU (OpenAI, MetaCLIP, DFN)
    "quickgelu": dict(embed_dim=32, quick_gelu=True,
                      vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=16),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)),
    # a ModifiedResNet image tower with GELU in the text tower
    "resnet-gelu": dict(embed_dim=32,
                        vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=32, patch_size=None),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1)),
}
# preprocess_cfg per model (the hub's open_clip_config.json); DFN's squash, LAION ViT-L's 0.5s
PREPROCESS = {
    "gelu-head80": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "quickgelu": {"resize_mode": "squash"},
    "head104-mlp4.9231-40px": {"interpolation": "bilinear", "resize_mode": "longest"},
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            leaf = key.rsplit(".", 1)[-1]
            noise = torch.randn(tensor.shape, generator=generator)
            if key.endswith("logit_scale"):
                tensor.fill_(4.0 + float(noise.flatten()[0].abs()))
            elif leaf == "running_var":
                tensor.copy_(0.5 + noise.abs())
            elif leaf in ("bias", "running_mean"):
                tensor.copy_(0.1 * noise)
            elif leaf == "weight" and tensor.ndim == 1:  # norm gains
                tensor.copy_(1.0 + 0.1 * noise)
            elif tensor.ndim >= 2 and "embedding" not in key:
                fan_in = tensor[0].numel() if tensor.ndim == 4 else tensor.shape[-1]
                tensor.copy_(noise * fan_in**-0.5)
            else:
                tensor.copy_(0.05 * noise)
    return model.eval()


def open_clip_model(name: str, seed: int = 0) -> torch.nn.Module:
    from open_clip.model import CLIP

    cfg = OPEN_CLIP_CONFIGS[name]
    model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    return randomize(model, seed)


def save_open_clip(model: torch.nn.Module, name: str, folder: Path, weights: str = "open_clip_model.safetensors",
                   model_cfg: dict | None = None) -> Path:
    """``folder`` with ``open_clip_config.json`` and the weights, as an OpenCLIP hub repo holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg or OPEN_CLIP_CONFIGS[name], "preprocess_cfg": PREPROCESS.get(name, {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


def open_clip_transform(name: str):
    from open_clip.transform import image_transform

    cfg, pre = OPEN_CLIP_CONFIGS[name], PREPROCESS.get(name, {})
    return image_transform(cfg["vision_cfg"]["image_size"], is_train=False, mean=pre.get("mean"), std=pre.get("std"),
                           resize_mode=pre.get("resize_mode"), interpolation=pre.get("interpolation"))


# transformers CLIPModel configs: OpenAI's QuickGELU with the legacy eos_token_id 2, and GELU with 49407
TRANSFORMERS_CONFIGS = {
    "quick_gelu-eos2": dict(hidden_act="quick_gelu", eos_token_id=2),
    "gelu-eos49407": dict(hidden_act="gelu", eos_token_id=49407),
}


def transformers_model(name: str, seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    trait = TRANSFORMERS_CONFIGS[name]
    config = CLIPConfig(
        text_config=dict(hidden_size=96, intermediate_size=200, num_attention_heads=2, num_hidden_layers=2,
                         max_position_embeddings=77, vocab_size=49408, hidden_act=trait["hidden_act"],
                         eos_token_id=trait["eos_token_id"]),
        vision_config=dict(hidden_size=240, intermediate_size=500, num_attention_heads=3, num_hidden_layers=2,
                           image_size=32, patch_size=8, hidden_act=trait["hidden_act"]),
        projection_dim=32,
    )
    return randomize(CLIPModel(config), seed)


def save_transformers(model: torch.nn.Module, folder: Path, safetensors: bool = True, mean=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=safetensors)
    if mean is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": mean, "image_std": [0.25, 0.25, 0.25], "resample": 3, "crop_size": 32,
             "size": {"shortest_edge": 32}}))
    return folder


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features``; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hf_cache_repo(cache: Path, repo: str, files_from: Path, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay out ``files_from``'s files as the Hugging Face cache holds repository ``repo``."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in files_from.iterdir():
        shutil.copy(file, snapshot / file.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot
