"""Named architectures for training from scratch: the released OpenAI sizes, small CPU ones,
and small SigLIPs.

Data, not logic: each preset is the keyword arguments of :class:`clipcli.models.clip.CLIPConfig`
(``vision_patch_size=None`` means a ModifiedResNet image tower).

The SigLIP presets have SigLIP's towers (:mod:`clipcli.models.siglip`: a ViT without class
token read out by attention pooling, its output the embedding itself, so ``embed_dim`` is the
vision width; a bidirectional text tower read out at its last position; tanh-GELU), its
learned logit bias, and are trained with the sigmoid loss by default. Their text goes through
the bundled CLIP BPE (49,408 ids, context 64, zero padding), not a SentencePiece vocabulary:
a model trained from scratch has no released vocabulary to match, and with the BPE the
checkpoint describes itself completely, so every command loads it with no tokenizer file.
"""

from __future__ import annotations

_SIGLIP = dict(family="siglip", activation="gelu_tanh", text_pool="last", logit_bias=True, tokenizer="clip",
               text_clean="clip", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), interpolation="bicubic",
               resize_mode="squash", context_length=64, vocab_size=49408)
_TEXT_B = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)

PRESETS: dict[str, dict] = {
    # Trains on a laptop CPU in about a minute on 32 px images (see examples/train_shapes.sh).
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2),
    "small": dict(embed_dim=256, image_resolution=64, vision_layers=6, vision_width=256, vision_patch_size=8,
                  context_length=77, vocab_size=49408, transformer_width=256, transformer_heads=4, transformer_layers=6),
    "siglip-tiny": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                        transformer_width=64, transformer_heads=1, transformer_layers=2, **_SIGLIP),
    "siglip-small": dict(embed_dim=256, image_resolution=64, vision_layers=6, vision_width=256, vision_patch_size=8,
                         transformer_width=256, transformer_heads=4, transformer_layers=6, **_SIGLIP),
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None, **_TEXT_B),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64, vision_patch_size=None, **_TEXT_B),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32, **_TEXT_B),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16, **_TEXT_B),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12, transformer_layers=12),
}


def preset_name(arch: str) -> str:
    """The preset ``arch`` names, in any spelling the other commands take: ``ViT-B/32``,
    open_clip's ``ViT-B-32``, or a registry name such as ``ViT-B-32/openai`` (its
    architecture; training starts from scratch). Unknown names are returned as given."""
    if arch in PRESETS:
        return arch
    spelled = {name.replace("/", "-").lower(): name for name in PRESETS}
    head = arch.split("/", 1)[0].lower()
    return spelled.get(arch.lower()) or spelled.get(head) or arch
