"""Which weights exist, as data: the nine CLIP models OpenAI released, OpenCLIP's, and the
transformers repositories of the SigLIP, SigLIP 2 and MetaCLIP 2 models among them.

OpenAI's nine: each entry names the released TorchScript file, its sha256 (the hex directory
in OpenAI's URL, so the URL is derived from it), its size, what the model computes (input
resolution, embedding dimension), the names people type for it, and the Hugging Face hub
repository that holds the same weights as fp32 safetensors. How to fetch and cache them lives
in :mod:`clipcli.download`.

OpenCLIP's (LAION, DataComp, CommonPool, DFN, MetaCLIP, YFCC, CC12M, SigLIP, SigLIP 2, MetaCLIP 2),
named ``ARCH/TAG`` as open_clip names them, are in ``data/pretrained.json``: per architecture
the :class:`~clipcli.models.config.CLIPConfig` fields (head width and MLP width included, which
shapes do not show; for SigLIP the family, activations, pooling, logit bias, tokenizer and
preprocessing too) and the hub repository holding its tokenizer, per weights its hub
repository, the file names to try in order, whether it runs QuickGELU, its preprocessing,
licence, published ImageNet zero-shot top-1 and whether its text tower is multilingual.
``ARCH-quickgelu`` names a CLIP architecture run with QuickGELU, as in open_clip.

The same file lists transformers repositories of these models (``google/siglip-*``,
``google/siglip2-*``, ``facebook/metaclip-2-worldwide-*``): :func:`find_hub_alias` turns such a
name, typed without ``hf-hub:``, into the hub name that loads it.

Sizes are the byte counts of OpenAI's files as published by several independent projects
that pin them next to the same sha256 (ViT-B-32.pt: 353,976,522 bytes, and so on).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Mapping

OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{file}"
HF_FILE = "open_clip_model.safetensors"


@dataclass(frozen=True)
class ModelInfo:
    name: str  # as clip.available_models() spells it
    file: str  # OpenAI's file name, also the name in our cache
    sha256: str
    size: int | None  # bytes of `file`; None where not known
    input_resolution: int
    embed_dim: int
    hf_repo: str  # same weights, fp32 safetensors with OpenAI key names, at `HF_FILE`
    aliases: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return OPENAI_URL.format(sha256=self.sha256, file=self.file)

    @property
    def stem(self) -> str:
        return self.file.rsplit(".", 1)[0]


MODELS: tuple[ModelInfo, ...] = (
    ModelInfo("RN50", "RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
              255_827_503, 224, 1024, "timm/resnet50_clip.openai"),
    ModelInfo("RN101", "RN101.pt", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
              291_791_292, 224, 512, "timm/resnet101_clip.openai"),
    ModelInfo("RN50x4", "RN50x4.pt", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
              421_854_225, 288, 640, "timm/resnet50x4_clip.openai"),
    ModelInfo("RN50x16", "RN50x16.pt", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
              661_125_706, 384, 768, "timm/resnet50x16_clip.openai"),
    ModelInfo("RN50x64", "RN50x64.pt", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
              1_353_500_174, 448, 1024, "timm/resnet50x64_clip.openai"),
    ModelInfo("ViT-B/32", "ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
              353_976_522, 224, 512, "timm/vit_base_patch32_clip_224.openai", ("ViT-B-32", "vit-b/32")),
    ModelInfo("ViT-B/16", "ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
              350_837_078, 224, 512, "timm/vit_base_patch16_clip_224.openai", ("ViT-B-16", "vit-b/16")),
    ModelInfo("ViT-L/14", "ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
              932_768_134, 224, 768, "timm/vit_large_patch14_clip_224.openai", ("ViT-L-14", "vit-l/14")),
    ModelInfo("ViT-L/14@336px", "ViT-L-14-336px.pt",
              "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
              934_088_680, 336, 768, "timm/vit_large_patch14_clip_336.openai",
              ("ViT-L-14-336px", "ViT-L-14-336", "vit-l/14@336px")),
)


def _key(name: str) -> str:
    """Case, separators and a trailing ``.pt`` do not matter: ``vit_b_32`` == ``ViT-B/32``."""
    name = name.strip().lower()
    if name.endswith(".pt"):
        name = name[:-3]
    return re.sub(r"[\s/_@-]+", "-", name)


def find_model(name: str) -> ModelInfo | None:
    """The released model called ``name`` (or one of its aliases, or OpenCLIP's
    ``ARCH/openai`` and ``ARCH-quickgelu/openai``), else ``None``."""
    key = _key(name)
    if key.endswith("-openai"):
        key = key[: -len("-openai")].removesuffix("-quickgelu")
    for info in MODELS:
        if key in {_key(info.name), _key(info.stem), *map(_key, info.aliases)}:
            return info
    return None


# --------------------------------------------------------------------------- OpenCLIP's weights

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                   "open_clip_pytorch_model.bin")
TRANSFORMERS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
QUICKGELU = "-quickgelu"


@dataclass(frozen=True)
class Pretrained:
    """One set of OpenCLIP weights: ``ARCH/TAG``, where it lives, and what it is."""

    arch: str
    tag: str
    hf_repo: str
    files: tuple[str, ...]  # names to try in the repository, in order
    hints: Mapping[str, Any]  # CLIPConfig fields: architecture, activation, preprocessing
    family: str  # whose weights: "LAION-2B", "DFN-5B", "SigLIP", "SigLIP 2", "MetaCLIP 2", ...
    license: str
    imagenet_top1: float | None  # percent, open_clip's results table (SigLIP 2: big_vision's)
    tokenizer_repo: str | None = None  # hub repository of its tokenizer files, where not hf_repo
    multilingual: bool = False  # a text tower trained for many languages

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.tag}"

    @property
    def score_kind(self) -> str:
        """``sigmoid`` (a learned logit bias: each pair's score a probability) or ``softmax``."""
        return score_kind(self.hints)


@cache
def _data() -> dict:
    return json.loads(resources.files("clipcli").joinpath("data/pretrained.json").read_text(encoding="utf-8"))


def _architecture(arch: str) -> dict | None:
    """The stored fields of ``arch`` (case-insensitive); ``ARCH-quickgelu`` is a CLIP
    architecture ``ARCH`` run with QuickGELU, as open_clip names it."""
    name = arch.strip().lower()
    for stored, fields in _data()["architectures"].items():
        if stored.lower() == name:
            return dict(fields)
    if name.endswith(QUICKGELU):
        fields = _architecture(name[: -len(QUICKGELU)])
        if fields is not None and fields.get("family", "clip") == "clip":
            return {**fields, "quick_gelu": True}
    return None


def _hints(arch: str, quick_gelu: bool = False, preprocess: Mapping[str, Any] | None = None) -> dict:
    fields = _architecture(arch)
    if fields is None:
        raise KeyError(arch)
    for fact in ("params", "tokenizer_repo"):  # facts about the architecture, not config fields
        fields.pop(fact, None)
    trained_quick = fields.pop("quick_gelu", False)  # the architecture config's own flag
    fields["activation"] = "quick_gelu" if quick_gelu or trained_quick else fields.get("activation", "gelu")
    for key, value in (preprocess or {}).items():
        if value is not None:
            fields[key] = value
    return {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}


def score_kind(hints: Mapping[str, Any]) -> str:
    """How a model of these config fields scores a pair: ``sigmoid`` where it has a learned
    logit bias (SigLIP), else ``softmax``."""
    return "sigmoid" if hints.get("logit_bias") else "softmax"


def tokenizer_repo(arch: str) -> str | None:
    """The hub repository holding the tokenizer files of ``arch`` (open_clip's
    ``hf_tokenizer_name``), or None: the bundled OpenAI BPE, or an unknown architecture."""
    fields = _architecture(arch)
    return fields.get("tokenizer_repo") if fields else None


@cache
def pretrained() -> tuple[Pretrained, ...]:
    """Every OpenCLIP weights entry, in the registry's order."""
    entries = []
    for entry in _data()["weights"]:
        preprocess = {"image_mean": entry.get("mean"), "image_std": entry.get("std"),
                      "interpolation": entry.get("interpolation"), "resize_mode": entry.get("resize_mode")}
        tokenizer = tokenizer_repo(entry["arch"])
        entries.append(Pretrained(
            arch=entry["arch"], tag=entry["tag"], hf_repo=entry["hf_repo"],
            files=tuple(entry.get("files") or OPEN_CLIP_FILES),
            hints=_hints(entry["arch"], entry.get("quick_gelu", False), preprocess),
            family=entry["family"], license=entry["license"], imagenet_top1=entry.get("imagenet_top1"),
            tokenizer_repo=tokenizer if tokenizer != entry["hf_repo"] else None,
            multilingual=entry.get("multilingual", False),
        ))
    return tuple(entries)


def find_pretrained(name: str) -> Pretrained | None:
    """The OpenCLIP weights called ``ARCH/TAG`` (case-insensitive), else None. open_clip's
    ``ARCH-quickgelu/TAG`` names the same weights where they were trained with QuickGELU
    (clipcli runs each set of weights with its own activation, whichever name is used)."""
    arch, _, tag = name.strip().lower().partition("/")
    quick = arch.endswith(QUICKGELU)
    arch = arch.removesuffix(QUICKGELU)
    for entry in pretrained():
        if entry.arch.lower() == arch and entry.tag.lower() == tag:
            return entry if not quick or entry.hints["activation"] == "quick_gelu" else None
    return None


def parameters(arch: str) -> int | None:
    """Parameters of a model of ``arch`` (stored in the data; a test checks them)."""
    fields = _architecture(arch)
    return fields.get("params") if fields else None


def openai_architecture(info: ModelInfo) -> str:
    """open_clip's name for the architecture of one of OpenAI's models (``ViT-L-14-336``)."""
    return info.stem.replace("-336px", "-336")


def openai_facts(info: ModelInfo) -> dict:
    """Licence and published ImageNet zero-shot top-1 of OpenAI's ``info``."""
    return dict(_data()["openai"].get(openai_architecture(info), {}))


def openai_hints(info: ModelInfo) -> dict:
    """The config fields of OpenAI's ``info`` (OpenAI's choices: QuickGELU, 64-wide heads)."""
    arch = openai_architecture(info)
    return _hints(arch, quick_gelu=True) if _architecture(arch) is not None else {}


def architecture_hints(name: str) -> dict | None:
    """Config fields for ``--arch``: a registry name (``ViT-H-14/laion2b_s32b_b79k``, ``ViT-B/32``)
    or an architecture (``ViT-H-14``, with its config's activation and OpenAI's preprocessing)."""
    info = find_model(name)
    if info is not None:
        return openai_hints(info)
    entry = find_pretrained(name)
    if entry is not None:
        return dict(entry.hints)
    return _hints(name) if _architecture(name) is not None else None


# --------------------------------------------------------------------------- transformers repositories

HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class HubAlias:
    """A transformers repository of a SigLIP, SigLIP 2 or MetaCLIP 2 model (``google/siglip-*``,
    ``google/siglip2-*``, ``facebook/metaclip-2-worldwide-*``) and what it is: ``arch`` is the
    open_clip architecture of the same model (its sizes; the repository's own config.json says
    the rest when it loads)."""

    repo: str
    arch: str
    family: str
    image_resolution: int
    context_length: int
    parameters: int
    license: str
    imagenet_top1: float | None
    multilingual: bool = False

    @property
    def name(self) -> str:
        """The name that loads it: ``hf-hub:ORG/REPO``."""
        return HUB_PREFIX + self.repo

    @property
    def score_kind(self) -> str:
        return score_kind(_hints(self.arch))


@cache
def hub_aliases() -> tuple[HubAlias, ...]:
    """Every listed transformers repository, in the registry's order."""
    return tuple(HubAlias(
        repo=entry["repo"], arch=entry["arch"], family=entry["family"], image_resolution=entry["image_resolution"],
        context_length=entry["context_length"], parameters=entry.get("params") or parameters(entry["arch"]),
        license=entry["license"], imagenet_top1=entry.get("imagenet_top1"),
        multilingual=entry.get("multilingual", False),
    ) for entry in _data()["hub_aliases"])


def find_hub_alias(name: str) -> str | None:
    """``hf-hub:ORG/REPO`` for a listed transformers repository typed as ``ORG/REPO`` or just
    ``REPO`` (case-insensitive; ``google/siglip-base-patch16-224``, ``siglip2-base-patch16-256``),
    else None."""
    key = name.strip().lower().removeprefix(HUB_PREFIX)
    for alias in hub_aliases():
        if key in (alias.repo.lower(), alias.repo.split("/", 1)[1].lower()):
            return alias.name
    return None
