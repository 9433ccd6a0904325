"""Zero-shot classification as in the CLIP paper, as pure functions (tensors in, tensors out).

Each label is put into each prompt template ("a photo of a {}."). The text embeddings of
one label's prompts are L2-normalised, averaged over the templates and normalised again:
that average is the label's row in the classifier. An image's probabilities are the
softmax over labels of ``logit_scale.exp() * cosine(image, label)``.

The template sets are data files in ``clipcli/data``: ``imagenet`` (the 80 templates of
CLIP's ImageNet notebook) and ``imagenet7`` (the 7-template subset found there).
"""

from __future__ import annotations

import os
from importlib import resources
from typing import TYPE_CHECKING, Sequence

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS = {"imagenet": "templates_imagenet.txt", "imagenet7": "templates_imagenet7.txt"}


def parse_templates(lines: Sequence[str], source: str) -> list[str]:
    """Check that every template has exactly one ``{}`` for the label."""
    for template in lines:
        if template.count("{}") != 1:
            raise InputError(f"template {template!r} from {source} must contain exactly one {{}} for the label")
    if not lines:
        raise InputError(f"no templates in {source}")
    return list(lines)


def load_templates(spec: str) -> list[str]:
    """Templates for ``imagenet``, ``imagenet7`` or a file with one template per line."""
    from .items import parse_list, read_lines

    if spec in TEMPLATE_SETS:
        data = resources.files("clipcli.data").joinpath(TEMPLATE_SETS[spec]).read_bytes()
        return parse_templates(parse_list(data, spec), spec)
    if not os.path.exists(spec):
        raise InputError(f"{spec!r}: not {' or '.join(TEMPLATE_SETS)} and no such file", option="templates")
    return parse_templates(read_lines(spec), spec)


def prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label in every template, label-major: ``[l0t0, l0t1, ..., l1t0, ...]``."""
    return [template.replace("{}", label) for label in labels for template in templates]


def build_classifier(text_embeddings: "torch.Tensor", num_templates: int) -> "torch.Tensor":
    """Classifier weights ``[L, D]`` from prompt embeddings ``[L*T, D]`` in :func:`prompts` order."""
    embeddings = text_embeddings.float()
    embeddings = embeddings.reshape(-1, num_templates, embeddings.shape[-1])  # (L, T, D)
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    mean = embeddings.mean(dim=1)  # (L, D)
    return mean / mean.norm(dim=-1, keepdim=True)


def normalize(embeddings: "torch.Tensor") -> "torch.Tensor":
    """Rows scaled to unit L2 norm (float32)."""
    embeddings = embeddings.float()
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


# exp(logit_scale) beyond this is a hard argmax anyway; capping it keeps every logit finite
# (a checkpoint with logit_scale 100 or 1e6 would give inf * cosine and NaN probabilities).
MAX_SCALE = 1e30


def scaled_softmax(cosine: "torch.Tensor", logit_scale: "torch.Tensor | float") -> "torch.Tensor":
    """Softmax over the last axis of ``exp(logit_scale) * cosine``, finite for any scale."""
    import torch

    scale = torch.as_tensor(logit_scale, dtype=torch.float64).exp()
    scale = torch.nan_to_num(scale, nan=1.0, posinf=MAX_SCALE).clamp(max=MAX_SCALE)  # a NaN scale: plain cosines
    return (scale * cosine.double()).softmax(dim=-1).float()


def probabilities(image_embeddings: "torch.Tensor", classifier: "torch.Tensor", logit_scale: "torch.Tensor | float") -> "torch.Tensor":
    """Softmax over labels ``[N, L]`` of ``exp(logit_scale) * cosine``; images need not be normalised."""
    return scaled_softmax(normalize(image_embeddings) @ classifier.float().T, logit_scale)  # (N, L)


def top_k(probs: "torch.Tensor", labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row of ``probs``, the ``k`` most probable ``(label, probability)`` pairs."""
    k = max(1, min(k, len(labels)))
    values, indices = probs.topk(k, dim=-1)
    return [
        [(labels[i], float(v)) for v, i in zip(row_values.tolist(), row_indices.tolist())]
        for row_values, row_indices in zip(values, indices)
    ]
