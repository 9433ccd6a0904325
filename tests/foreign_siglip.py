"""Tiny random-weight SigLIP and MetaCLIP 2 models of the reference packages (transformers'
``SiglipModel`` and ``MetaClip2Model``, open_clip's timm-based SigLIP), every tensor randomised
(norm gains and biases included), for the conversion and parity tests.

open_clip builds a SigLIP image tower from a timm model *name*; a tiny one is registered here
beside timm's own (``vit_test_patch8_siglip_32``, as timm registers its test-size models), and
the tests that read its config through clipcli add it to clipcli's table of trunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from foreign import randomize

TINY_TRUNK = "vit_test_patch8_siglip_32"
# The tiny towers: image 48 wide (3 heads of 16), text 32 wide (2 heads), both 2 blocks deep.
VISION = dict(hidden_size=48, intermediate_size=72, num_attention_heads=3, num_hidden_layers=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=40, num_attention_heads=2, num_hidden_layers=2, vocab_size=100,
            max_position_embeddings=16, projection_size=48, bos_token_id=98, eos_token_id=99)


def siglip_model(seed: int = 0, vision: dict | None = None, text: dict | None = None) -> torch.nn.Module:
    """A transformers ``SiglipModel`` of the tiny towers (``vision``/``text`` override their fields)."""
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(text_config={**TEXT, **(text or {})}, vision_config={**VISION, **(vision or {})})
    return randomize(SiglipModel(config), seed)


def save_transformers(model: torch.nn.Module, folder: Path, preprocessor: dict | None = None) -> Path:
    """``folder`` as a transformers hub repository holds the model (``preprocessor``: its
    ``preprocessor_config.json``, a ``SiglipImageProcessor``'s by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    size = model.config.vision_config.image_size
    processor = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                 "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
                 "rescale_factor": 1 / 255, "size": {"height": size, "width": size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor or processor))
    return folder


def _register_tiny_trunk() -> None:
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if TINY_TRUNK in timm.list_models(TINY_TRUNK):
        return

    def vit_test_patch8_siglip_32(pretrained: bool = False, **kwargs):
        args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=1.5, class_token=False,
                    global_pool="map", act_layer="gelu_tanh")
        return _create_vision_transformer(TINY_TRUNK, pretrained=pretrained, **dict(args, **kwargs))

    register_model(vit_test_patch8_siglip_32)


# open_clip's model_cfg of the same tiny SigLIP (SigLIP 2's text activation, as transformers' has)
OPEN_CLIP_SIGLIP = dict(
    embed_dim=48, init_logit_bias=-10, custom_text=True,
    vision_cfg=dict(image_size=32, timm_model_name=TINY_TRUNK, timm_model_pretrained=False, timm_pool="map",
                    timm_proj="none"),
    text_cfg=dict(context_length=16, vocab_size=100, hf_tokenizer_name="timm/ViT-B-16-SigLIP2",
                  tokenizer_kwargs={"clean": "canonicalize"}, width=32, heads=2, layers=2, mlp_ratio=1.25,
                  no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6},
                  act_kwargs={"approximate": "tanh"}),
)


def open_clip_siglip(seed: int = 0) -> torch.nn.Module:
    """open_clip's ``CustomTextCLIP`` of :data:`OPEN_CLIP_SIGLIP`."""
    from open_clip.model import CustomTextCLIP

    _register_tiny_trunk()
    cfg = OPEN_CLIP_SIGLIP
    text_cfg = {k: v for k, v in cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    model = CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], text_cfg, init_logit_bias=cfg["init_logit_bias"])
    return randomize(model, seed)


def metaclip_2_model(seed: int = 0, eos_token_id: int = 2, vocab_size: int = 1000,
                     hidden_act: str = "gelu") -> torch.nn.Module:
    """A transformers ``MetaClip2Model`` with CLIP's towers and a vocabulary that is not OpenAI's."""
    from transformers import MetaClip2Config, MetaClip2Model

    config = MetaClip2Config(
        text_config=dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_hidden_layers=2,
                         max_position_embeddings=24, vocab_size=vocab_size, eos_token_id=eos_token_id,
                         hidden_act=hidden_act),
        vision_config=dict(hidden_size=96, intermediate_size=160, num_attention_heads=3, num_hidden_layers=2,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=40,
    )
    return randomize(MetaClip2Model(config), seed)
