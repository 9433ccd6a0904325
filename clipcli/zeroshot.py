"""Zero-shot classification as in the CLIP paper, as pure functions (tensors in, tensors out).

Each label is put into each prompt template ("a photo of a {}."). The text embeddings of
one label's prompts are L2-normalised, averaged over the templates and normalised again:
that average is the label's row in the classifier.

What a score means depends on how the model was trained (its ``score_kind``):

- ``softmax`` (CLIP, contrastive loss): an image's probabilities are the softmax over the
  labels asked about of ``logit_scale.exp() * cosine(image, label)``. They sum to 1 and say
  which label fits best, not whether any fits.
- ``sigmoid`` (SigLIP, sigmoid loss, a model with a ``logit_bias``): each pair's own
  probability ``sigmoid(logit_scale.exp() * cosine + logit_bias)``, independent of the other
  labels (multi-label: they need not sum to 1, and all may be small).
- ``cosine``: the bare cosine similarity (search scores, CLIP's similarity matrix).

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


def parse_labels(values: Sequence[str], lines: Sequence[str] = ()) -> list[str]:
    """Labels from comma-separated ``values`` and whole ``lines`` (a labels file's), in order;
    one given twice is refused (its scores would be split between the two)."""
    found = [label.strip() for value in values for label in value.split(",") if label.strip()]
    found += list(lines)
    seen: set[str] = set()
    for label in found:
        if label in seen:
            raise InputError(f"label {label!r} is given twice")
        seen.add(label)
    return found


def choose_templates(given: Sequence[str], named: str | None, source: str) -> list[str]:
    """The templates of ``named`` (a set such as ``imagenet``, or a file), then ``given``
    (from ``source``, for messages), each once; the default template when there are none."""
    chosen = load_templates(named) if named else []
    chosen += parse_templates(given, source) if given else []
    return list(dict.fromkeys(chosen)) or [DEFAULT_TEMPLATE]


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


def _finite_scale(logit_scale: "torch.Tensor | float") -> "torch.Tensor":
    """``exp(logit_scale)`` in float64, at most :data:`MAX_SCALE` (a NaN scale: 1, plain cosines)."""
    import torch

    scale = torch.as_tensor(logit_scale, dtype=torch.float64).exp()
    return torch.nan_to_num(scale, nan=1.0, posinf=MAX_SCALE).clamp(max=MAX_SCALE)


def scaled_softmax(cosine: "torch.Tensor", logit_scale: "torch.Tensor | float") -> "torch.Tensor":
    """Softmax over the last axis of ``exp(logit_scale) * cosine``, finite for any scale."""
    return (_finite_scale(logit_scale) * cosine.double()).softmax(dim=-1).float()


def sigmoid_probabilities(cosine: "torch.Tensor", logit_scale: "torch.Tensor | float",
                          logit_bias: "torch.Tensor | float") -> "torch.Tensor":
    """Each pair's own probability ``sigmoid(exp(logit_scale) * cosine + logit_bias)`` (SigLIP),
    elementwise and finite for any scale and bias: computed in float64 with the scale capped
    as in :func:`scaled_softmax` and the bias kept within ``±MAX_SCALE`` (a NaN bias: 0), so no
    ``inf - inf`` can make a NaN."""
    import torch

    bias = torch.as_tensor(logit_bias, dtype=torch.float64)
    bias = torch.nan_to_num(bias, nan=0.0, posinf=MAX_SCALE, neginf=-MAX_SCALE)
    return torch.sigmoid(_finite_scale(logit_scale) * cosine.double() + bias).float()


def logit_parameters(model) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """``(logit_scale, logit_bias)`` of ``model`` as float32 CPU tensors; the bias is None for a
    model without one (CLIP: softmax scores; with one, SigLIP's sigmoid probabilities)."""
    bias = getattr(model, "logit_bias", None)  # a model object from before logit biases: none
    return model.logit_scale.detach().float().cpu(), bias.detach().float().cpu() if bias is not None else None


def score_kind(logit_bias: "torch.Tensor | float | None") -> str:
    """``"sigmoid"`` for a model with a logit bias, else ``"softmax"`` (see the module docstring)."""
    return "softmax" if logit_bias is None else "sigmoid"


def label_probabilities(cosine: "torch.Tensor", logit_scale: "torch.Tensor | float",
                        logit_bias: "torch.Tensor | float | None" = None) -> "torch.Tensor":
    """The model's probabilities for ``cosine`` ``[..., L]``: the softmax over the last axis
    without a logit bias (CLIP), each entry's own sigmoid probability with one (SigLIP)."""
    if logit_bias is None:
        return scaled_softmax(cosine, logit_scale)
    return sigmoid_probabilities(cosine, logit_scale, logit_bias)


def probabilities(image_embeddings: "torch.Tensor", classifier: "torch.Tensor", logit_scale: "torch.Tensor | float",
                  logit_bias: "torch.Tensor | float | None" = None) -> "torch.Tensor":
    """Probabilities ``[N, L]`` of each image for each label (:func:`label_probabilities`):
    softmax over labels of ``exp(logit_scale) * cosine``, or with ``logit_bias`` each label's
    own sigmoid probability. Images need not be normalised."""
    return label_probabilities(normalize(image_embeddings) @ classifier.float().T, logit_scale, logit_bias)  # (N, L)


def check_probability(value: float | None, option: str = "min_prob") -> None:
    """A minimum probability must be a number from 0 to 1 (NaN would silently keep nothing)."""
    if value is None:
        return
    try:
        inside = 0.0 <= float(value) <= 1.0  # False for NaN
    except (TypeError, ValueError):
        inside = False
    if not inside:
        raise InputError(f"{value}: give a probability, a number from 0 to 1", option=option)


def top_k(probs: "torch.Tensor", labels: Sequence[str], k: int,
          min_prob: float | None = None) -> list[list[tuple[str, float]]]:
    """For each row of ``probs``, the ``k`` most probable ``(label, probability)`` pairs; with
    ``min_prob``, only those of them at least that probable (a row may be left empty)."""
    k = max(1, min(k, len(labels)))
    values, indices = probs.topk(k, dim=-1)
    floor = -1.0 if min_prob is None else float(min_prob)
    return [
        [(labels[i], float(v)) for v, i in zip(row_values.tolist(), row_indices.tolist()) if v >= floor]
        for row_values, row_indices in zip(values, indices)
    ]
