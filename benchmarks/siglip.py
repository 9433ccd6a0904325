"""SigLIP model-only speed: clipcli against open_clip and transformers, same weights, same inputs.

For each architecture: open_clip builds its timm-based SigLIP with random weights; clipcli loads
the same state dict (its parameter names are open_clip's); transformers' ``SiglipModel`` of the
same sizes gets the same weights too (its state dict converted by hand here, in the test's
direction: ours -> theirs is not a clipcli feature). Then, alternating implementations, each
tower is timed for at least ``--budget`` seconds after a warm-up: images/s at ``--image-batch``
and prompts/s for a batch of 64 full-context rows (SigLIP always runs its whole context). The
largest absolute differences between the implementations' embeddings are reported beside the
speeds, so a fast wrong answer cannot pass. CPU flags are recorded with the numbers.

    python benchmarks/siglip.py --threads 2 [--arch ViT-B-16-SigLIP ViT-SO400M-14-SigLIP-384]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import rate  # noqa: E402  (timing as the per-architecture table does)
from run import environment  # noqa: E402  (the shared machine description)

from clipcli.models.config import CLIPConfig  # noqa: E402
from clipcli.models.factory import build_model  # noqa: E402
from clipcli.models.registry import architecture_hints  # noqa: E402

ARCHITECTURES = ("ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP-384")


def _transformers_model(config: CLIPConfig, ours: dict[str, torch.Tensor]):
    """transformers' SiglipModel of ``config``'s sizes holding ``ours`` (open_clip's names)."""
    from transformers import SiglipConfig, SiglipModel

    vision = dict(hidden_size=config.vision_width, intermediate_size=config.vision_mlp_width or 4 * config.vision_width,
                  num_hidden_layers=int(config.vision_layers), num_attention_heads=config.vision_heads,
                  image_size=config.image_resolution, patch_size=config.vision_patch_size,
                  hidden_act="gelu_pytorch_tanh" if config.activation == "gelu_tanh" else "gelu", layer_norm_eps=1e-6)
    text = dict(hidden_size=config.transformer_width,
                intermediate_size=config.text_mlp_width or 4 * config.transformer_width,
                num_hidden_layers=config.transformer_layers, num_attention_heads=config.transformer_heads,
                vocab_size=config.vocab_size, max_position_embeddings=config.context_length,
                projection_size=config.embed_dim, layer_norm_eps=1e-6,
                hidden_act="gelu_pytorch_tanh" if config.text_act == "gelu_tanh" else "gelu")
    text.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # not CLIP's ids: only shapes matter
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    theirs = {}
    for key, value in ours.items():
        name = key
        if key.startswith("visual.trunk.blocks."):
            index, rest = key[len("visual.trunk.blocks."):].split(".", 1)
            base = f"vision_model.encoder.layers.{index}."
            if rest.startswith("attn.qkv."):
                for part, chunk in zip("qkv", value.chunk(3)):
                    theirs[f"{base}self_attn.{part}_proj.{rest.rsplit('.', 1)[1]}"] = chunk
                continue
            name = base + rest.replace("norm1", "layer_norm1").replace("norm2", "layer_norm2") \
                .replace("attn.proj", "self_attn.out_proj")
        elif key.startswith("text.transformer.resblocks."):
            index, rest = key[len("text.transformer.resblocks."):].split(".", 1)
            base = f"text_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                for part, chunk in zip("qkv", value.chunk(3)):
                    theirs[f"{base}self_attn.{part}_proj.{rest.rsplit('_', 1)[1]}"] = chunk
                continue
            name = base + rest.replace("ln_1", "layer_norm1").replace("ln_2", "layer_norm2") \
                .replace("attn.out_proj", "self_attn.out_proj").replace("c_fc", "fc1").replace("c_proj", "fc2")
        elif key.startswith("visual.trunk.attn_pool."):
            rest = key[len("visual.trunk.attn_pool."):]
            if rest == "latent":
                name = "vision_model.head.probe"
            elif rest.startswith("q."):
                continue  # packed with kv below
            elif rest.startswith("kv."):
                leaf = rest.split(".")[1]
                q = ours[f"visual.trunk.attn_pool.q.{leaf}"]
                theirs[f"vision_model.head.attention.in_proj_{leaf}"] = torch.cat([q, value])
                continue
            else:
                name = "vision_model.head." + (rest.replace("proj", "attention.out_proj", 1) if rest.startswith("proj")
                                               else rest.replace("norm", "layernorm"))
        else:
            name = {
                "visual.trunk.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
                "visual.trunk.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
                "visual.trunk.norm.weight": "vision_model.post_layernorm.weight",
                "visual.trunk.norm.bias": "vision_model.post_layernorm.bias",
                "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "text.ln_final.weight": "text_model.final_layer_norm.weight",
                "text.ln_final.bias": "text_model.final_layer_norm.bias",
                "text.text_projection.weight": "text_model.head.weight",
                "text.text_projection.bias": "text_model.head.bias",
            }.get(key, key)
            if key == "visual.trunk.pos_embed":
                name, value = "vision_model.embeddings.position_embedding.weight", value[0]
            elif key == "text.positional_embedding":
                name = "text_model.embeddings.position_embedding.weight"
            elif key in ("logit_scale", "logit_bias"):
                value = value.reshape(1)
        theirs[name] = value
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"transformers' names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def measure(arch: str, budget: float, image_batch: int) -> dict:
    import open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model(arch, pretrained=None).eval()
    state = reference.state_dict()
    with torch.no_grad():  # a nonzero logit bias and random norms: nothing hides behind defaults
        for key, value in state.items():
            if value.is_floating_point() and (key.endswith("bias") or "norm" in key or "ln_" in key):
                value.copy_(torch.randn_like(value) * 0.02 + (1.0 if key.endswith("weight") else 0.0))
    config = CLIPConfig(**architecture_hints(arch))
    ours = build_model(dict(state), config, source=arch).eval()
    hf = _transformers_model(ours.config, state)
    res = config.image_resolution
    images = torch.randn(image_batch, 3, res, res)
    tokens = torch.randint(1, config.vocab_size, (64, config.context_length))
    runs = {
        "clipcli": (lambda: ours.encode_image(images), lambda: ours.encode_text(tokens)),
        "open_clip": (lambda: reference.encode_image(images), lambda: reference.encode_text(tokens)),
        "transformers": (lambda: _features(hf.get_image_features(pixel_values=images)),
                         lambda: _features(hf.get_text_features(input_ids=tokens))),
    }
    row: dict = {"arch": arch, "parameters": sum(p.numel() for p in ours.parameters()), "resolution": res,
                 "image_batch": image_batch, "text_batch": len(tokens), "context": config.context_length}
    with torch.inference_mode():
        outputs = {name: (image(), text()) for name, (image, text) in runs.items()}
        for name in ("open_clip", "transformers"):
            row[f"max_diff_vs_{name}"] = max(float((outputs["clipcli"][i] - outputs[name][i]).abs().max())
                                             for i in range(2))
        for tower, index, count in (("images_per_s", 0, image_batch), ("prompts_per_s", 1, len(tokens))):
            for name in runs:  # alternating: clipcli, open_clip, transformers for each tower
                row[f"{name}_{tower}"] = round(rate(runs[name][index], count, budget), 3)
    return row


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per measurement")
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--label", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"environment": environment(), "rows": []}
    for arch in args.arch:
        batch = args.image_batch if "SO400M" not in arch else max(1, args.image_batch // 4)
        row = measure(arch, args.budget, batch)
        gc.collect()
        report["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = Path(__file__).parent / "results" / f"siglip-{args.label}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("| architecture | images/s clipcli / open_clip / transformers | prompts/s clipcli / open_clip / transformers "
          "| max diff vs open_clip, transformers |")
    print("|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['arch']} | {r['clipcli_images_per_s']:.2f} / {r['open_clip_images_per_s']:.2f} / "
              f"{r['transformers_images_per_s']:.2f} | {r['clipcli_prompts_per_s']:.1f} / "
              f"{r['open_clip_prompts_per_s']:.1f} / {r['transformers_prompts_per_s']:.1f} | "
              f"{r['max_diff_vs_open_clip']:.1e}, {r['max_diff_vs_transformers']:.1e} |")


if __name__ == "__main__":
    main()
