"""Full-size SigLIP, SigLIP 2 and MetaCLIP 2 architectures against open_clip, random weights.

One architecture per kind of image trunk and text tower (timm's base, large and so400m SigLIP
trunks with exact and tanh GELU, patch 14 at 384 px on a 27 x 27 grid, the i18n tower without a
text projection, SigLIP 2's Gemma vocabulary, MetaCLIP 2's XLM-V CLIP read out at its end token):
open_clip builds each with random weights (norms and biases randomised too), clipcli builds the
same state dict from the hints of the architecture's open_clip config, as a hub folder holds it, and
the registry agrees with that config. Slow (about a minute): ``pytest -m slow``.
"""

from __future__ import annotations

import gc

import pytest
import torch

from clipcli.models import convert
from clipcli.models.config import CLIPConfig
from clipcli.models.factory import build_model
from clipcli.models.registry import architecture_hints

open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.slow

ARCHITECTURES = ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-B-32-SigLIP2-256", "ViT-L-16-SigLIP-384",
                 "ViT-SO400M-14-SigLIP-384", "ViT-SO400M-16-SigLIP-i18n-256", "ViT-SO400M-16-SigLIP2-256",
                 "ViT-H-14-worldwide"]
TOLERANCE = 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_size_architecture_matches_open_clip(arch):
    torch.manual_seed(0)
    reference = open_clip.create_model(arch, pretrained=None).eval()
    state = reference.state_dict()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in state.items():
            if value.is_floating_point() and (key.endswith("bias") or "norm" in key or "ln_" in key):
                value.copy_(torch.randn(value.shape, generator=generator) * 0.05 + float(key.endswith("weight")))
    hints = convert.config_from_open_clip({"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": {}}, arch)
    ours = build_model(dict(state), hints, source=arch).eval()
    registry = CLIPConfig(**architecture_hints(arch))
    for field in ("family", "vision_heads", "transformer_heads", "activation", "text_act", "text_pool", "eos_id",
                  "logit_bias", "context_length", "vocab_size", "embed_dim", "text_projection"):
        assert getattr(ours.config, field) == getattr(registry, field), field
    config = ours.config
    images = torch.randn(1, 3, config.image_resolution, config.image_resolution, generator=generator)
    tokens = torch.randint(3, min(config.vocab_size, 30000), (2, config.context_length), generator=generator)
    if config.text_pool == "eos":
        tokens[:, 10] = config.eos_id
    with torch.inference_mode():
        image_diff = (ours.encode_image(images) - reference.encode_image(images)).abs().max().item()
        text_diff = (ours.encode_text(tokens) - reference.encode_text(tokens)).abs().max().item()
    print(f"\n{arch}: max |clipcli - open_clip| encode_image {image_diff:.1e}, encode_text {text_diff:.1e}")
    assert image_diff <= TOLERANCE and text_diff <= TOLERANCE
    del reference, ours, state
    gc.collect()
