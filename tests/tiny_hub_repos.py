"""Tiny hub repositories as a new user finds them in the Hugging Face cache, for the end-to-end
SigLIP tests (tests/test_siglip_e2e.py): the weights, configs and tokenizer files each layout
holds, built here with the reference packages and a tokenizer trained here (the real
vocabularies cannot be downloaded).

- :func:`siglip2_transformers`: a fixed-resolution SigLIP 2 as ``google/siglip2-*`` repos hold
  it: transformers ``SiglipModel.save_pretrained`` (every bias and norm gain randomised; the
  Gemma vocabulary's 256,000 token embeddings, as the released model's config says), the
  ``preprocessor_config.json`` ``SiglipImageProcessor.save_pretrained`` writes, and a Gemma-style
  tokenizer (BPE, byte fallback, split digits, no dummy prefix) trained with sentencepiece and
  saved through transformers' ``GemmaTokenizer``: ``tokenizer.json``, ``tokenizer_config.json``
  and ``special_tokens_map.json``.
- :func:`siglip_open_clip`: an OpenCLIP SigLIP as ``timm/ViT-*-SigLIP`` repos hold it:
  ``open_clip_config.json`` naming a (tiny, registered) timm trunk and the repository itself as
  its ``hf_tokenizer_name``, ``open_clip_model.safetensors``, and a T5-style tokenizer.
- :func:`metaclip2_transformers`: a MetaCLIP 2 "worldwide" as ``facebook/metaclip-2-*`` repos
  hold it: transformers ``MetaClip2Model`` and an XLM-V-style tokenizer (XLM-R's ids) whose
  training corpus has Chinese, so ``一只猫`` is real pieces.

Each builder returns the folder and the reference model it saved (eval mode, float32). The
logit scale and bias are set so the tiny models' probabilities spread over (0, 1) instead of
saturating (a random model's scale of ``exp(4)`` would give 0s and 1s that any bug reproduces).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import spm_models
import torch
from foreign import randomize
from foreign_siglip import OPEN_CLIP_SIGLIP, TINY_TRUNK, _register_tiny_trunk, metaclip_2_model, siglip_model

GEMMA_VOCAB = 256000  # SigLIP 2's text_config.vocab_size (the tokenizer trained here uses the first ~900)
SIGLIP2_CONTEXT = 64  # the released SigLIP 2 and SigLIP context
OPEN_CLIP_CONTEXT = 32
OPEN_CLIP_VOCAB = 1000  # the T5-style vocabulary trained here has 700 pieces
METACLIP2_VOCAB = 2100  # XLM-R ids of the 2,000-piece vocabulary trained here: up to 2,001
SIGLIP_TRUNK_SIZES = (48, 2, 3, 72)  # the tiny trunk's (width, depth, heads, MLP width), for clipcli's table


def _copy_tokenizer(kind: str, folder: Path) -> None:
    for file in spm_models.hf_folder(kind).iterdir():
        shutil.copy(file, folder / file.name)


def _special_tokens_map(folder: Path, extra: list[str] | None = None) -> None:
    """``special_tokens_map.json`` as transformers 4 wrote it (transformers 5 no longer does;
    the released repositories hold one), from the saved ``tokenizer_config.json``."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    entry = lambda token: {"content": token, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                           "single_word": False}
    tokens = {key: entry(config[key]) for key in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
              if isinstance(config.get(key), str)}
    if extra:
        tokens["additional_special_tokens"] = extra
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2))


def _spread(model: torch.nn.Module, scale: float, bias: float | None) -> torch.nn.Module:
    """Logit scale ``log(scale)`` and bias ``bias``, whatever shape the model holds them in."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(scale))
        if bias is not None:
            model.logit_bias.fill_(bias)
    return model


def siglip2_transformers(folder: Path, seed: int = 5) -> tuple[Path, torch.nn.Module]:
    """A tiny transformers SigLIP 2 (fixed resolution) repository in ``folder``."""
    from transformers import SiglipImageProcessor

    model = _spread(siglip_model(seed, text={"vocab_size": GEMMA_VOCAB, "max_position_embeddings": SIGLIP2_CONTEXT}),
                    scale=12.0, bias=-1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    size = model.config.vision_config.image_size
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(str(folder))
    _copy_tokenizer("gemma", folder)
    _special_tokens_map(folder, extra=["<start_of_turn>", "<end_of_turn>"])
    return folder, model.eval()


def open_clip_siglip_config(repo: str) -> dict:
    """The tiny SigLIP's ``model_cfg``, its tokenizer in hub repository ``repo`` (as
    ``timm/ViT-B-16-SigLIP`` names itself)."""
    text_cfg = {**OPEN_CLIP_SIGLIP["text_cfg"], "hf_tokenizer_name": repo, "vocab_size": OPEN_CLIP_VOCAB,
                "context_length": OPEN_CLIP_CONTEXT}
    return {**OPEN_CLIP_SIGLIP, "text_cfg": text_cfg}


def siglip_open_clip(folder: Path, repo: str, seed: int = 6) -> tuple[Path, torch.nn.Module]:
    """A tiny OpenCLIP SigLIP repository in ``folder`` (to be cached as hub ``repo``)."""
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import save_file

    _register_tiny_trunk()
    cfg = open_clip_siglip_config(repo)
    text_cfg = {k: v for k, v in cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    model = CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], text_cfg, init_logit_bias=cfg["init_logit_bias"])
    model = _spread(randomize(model, seed), scale=10.0, bias=-0.5)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    _copy_tokenizer("t5", folder)
    _special_tokens_map(folder)
    return folder, model.eval()


def metaclip2_transformers(folder: Path, seed: int = 7) -> tuple[Path, torch.nn.Module]:
    """A tiny transformers MetaCLIP 2 "worldwide" repository in ``folder``: XLM-R's ``</s>`` (2)
    ends each text, and the text tower reads it out there."""
    from transformers import CLIPImageProcessor

    model = _spread(metaclip_2_model(seed, eos_token_id=2, vocab_size=METACLIP2_VOCAB), scale=20.0, bias=None)
    model.config.text_config.bos_token_id, model.config.text_config.pad_token_id = 0, 1  # XLM-R's <s>, <pad>
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    size = model.config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(folder))
    _copy_tokenizer("xlmv", folder)
    _special_tokens_map(folder)
    return folder, model.eval()


__all__ = ["GEMMA_VOCAB", "SIGLIP2_CONTEXT", "OPEN_CLIP_CONTEXT", "SIGLIP_TRUNK_SIZES", "TINY_TRUNK",
           "siglip2_transformers", "siglip_open_clip", "metaclip2_transformers", "open_clip_siglip_config"]


def tiny_unigram_tokenizer(folder: Path) -> None:
    """A tiny Unigram ``tokenizer.json`` (and its config) as SigLIP's repositories hold theirs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((c, -2.0) for c in "▁abcdefghijklmnopqrstuvwxyz"),
             ("▁a", -1.0), ("▁cat", -1.5)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}))
