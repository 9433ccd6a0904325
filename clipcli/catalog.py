"""What ``clipcli models`` lists: every registry entry, its facts, and whether it is cached.

Cheap and read-only: no torch, no network. OpenAI's nine are looked for in clipcli's cache
(:func:`clipcli.cache.cache_listing`), OpenCLIP's in the Hugging Face cache.
"""

from __future__ import annotations

import os

from . import hub, registry


def _architecture_facts(arch: str) -> dict:
    hints = registry.architecture_hints(arch) or {}
    return {"input_resolution": hints.get("image_resolution"), "embed_dim": hints.get("embed_dim"),
            "parameters": registry.parameters(arch)}


def catalog(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One record per registry entry (OpenAI's nine, then OpenCLIP's), then one per other
    file downloaded with ``clipcli download URL``."""
    from .cache import cache_listing

    named, downloads = [], []
    for record in cache_listing(cache_dir):
        info = registry.find_model(record["name"]) if record["released"] else None
        if info is None:
            downloads.append({**record, "family": None, "parameters": None, "license": None, "imagenet_top1": None})
            continue
        facts = registry.openai_facts(info)
        arch = _architecture_facts(registry.openai_architecture(info))
        if not record["cached"]:  # the same weights as open_clip downloads them, in the HF cache
            path = hub.first_cached(info.hf_repo, registry.OPEN_CLIP_FILES)
            record = {**record, "cached": path is not None, "path": str(path) if path else None}
        named.append({**record, "family": "OpenAI", "parameters": arch["parameters"],
                      "license": facts.get("license"), "imagenet_top1": facts.get("imagenet_top1")})
    for entry in registry.pretrained():
        path = hub.first_cached(entry.hf_repo, entry.files)
        named.append({"name": entry.name, "released": True, **_architecture_facts(entry.arch), "size": None,
                      "cached": path is not None, "path": str(path) if path else None, "sha256": None,
                      "url": f"https://huggingface.co/{entry.hf_repo}", "family": entry.family,
                      "license": entry.license, "imagenet_top1": entry.imagenet_top1})
    return named + downloads
