"""A loaded model and what runs it: device and precision, the model identity, and the
classify and similarity runs (batched inference itself is :mod:`clipcli.batching`).

:func:`load_model` resolves a name and loads only the towers a run needs into a
:class:`LoadedModel`. :func:`classify` and :func:`similarity` build the records the commands
print, so a Python caller gets exactly what the CLI writes. Label embeddings for classification are cached on
disk, keyed by the full model identity (weights sha256, architecture, preprocessing), the
labels, the templates and the precision.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from . import cache
from .batching import Embedding, embed_images, embed_texts
from .errors import ClipcliError
from .feedback import SILENT, Feedback
from .items import Item
from .precision import resolve_dtype

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .loading import ModelSource

# --------------------------------------------------------------------------- model


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked. CUDA comes
    back with its index (``torch.cuda.set_device`` refuses a bare ``cuda``): under
    ``torchrun``, ``auto`` and ``cuda`` mean this process's own GPU, ``cuda:LOCAL_RANK``; under
    SLURM with several tasks on a node that sees several GPUs, ``cuda:SLURM_LOCALID``;
    otherwise the current one (0 unless the caller chose another)."""
    import torch

    from .topology import from_environment, slurm_local_id

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ClipcliError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    topology = from_environment()
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ClipcliError(f"{device}: CUDA is not available here", option="device", fix="cpu")
        if resolved.index is None:
            slurm = slurm_local_id()
            if topology.distributed:
                index = topology.local_rank
            elif slurm is not None and torch.cuda.device_count() > 1:  # tasks sharing a node's GPUs
                index = slurm
            else:  # one GPU in sight (SLURM's --gpus-per-task binds each task to its own as cuda:0)
                index = torch.cuda.current_device()
            resolved = torch.device("cuda", index)
        if resolved.index >= torch.cuda.device_count():
            raise ClipcliError(f"{device}: only {torch.cuda.device_count()} CUDA device(s)", option="device")
    elif resolved.type != "cpu":
        raise ClipcliError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    elif resolved.index not in (None, 0):
        raise ClipcliError(f"{device}: there is one CPU device", option="device", fix="one_cpu")
    return resolved


@dataclass
class LoadedModel:
    """A model ready to run, with what the records and the caches need to know about it."""

    model: Any
    preprocess: Callable
    name: str
    source: "ModelSource"
    device: "torch.device"
    dtype: "torch.dtype"
    notes: list[str] = field(default_factory=list)  # what was assumed while loading (for stderr)
    pack_after: int | None = None  # see load_model

    @property
    def path(self) -> Path:
        return self.source.path

    @cached_property
    def sha256(self) -> str:
        """sha256 of the weights (of the shard hashes, for a sharded checkpoint)."""
        from .loading import weights_sha256

        return weights_sha256(self.source)

    @cached_property
    def identity(self) -> str:
        """The full model identity: weights sha256 + architecture + preprocessing, + where the
        tokenizer comes from for a model with its own (a CLIP's stays what it was). Caches and
        resumable outputs are keyed by it, never by the file alone."""
        from .models.config import config_to_json
        from .tokenizer_files import tokenizer_fingerprint

        tokenizer = tokenizer_fingerprint(getattr(self.source, "tokenizer_files", {}),
                                          getattr(self.source, "tokenizer_repos", ()))
        text = f"{self.sha256}\0{config_to_json(self.model.config)}" + (f"\0{tokenizer}" if tokenizer else "")
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def input_resolution(self) -> int | None:
        """The image side the model takes (None for a model that does not say)."""
        return getattr(getattr(self.model, "visual", None), "input_resolution", None)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().cpu())

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    def enable_packing(self) -> None:
        """On the CPU, let the towers run on packed weights after ``pack_after`` runs (see
        :func:`load_model`); a tower adopted later is included by calling it again."""
        if self.device.type == "cpu" and self.pack_after is not None:
            from .models.packed import enable_packing

            enable_packing(self.model, after=self.pack_after)

    def disable_packing(self) -> None:
        """Run the plain forward from now on (towers adopted later too), packed weights dropped.
        What writes embeddings in bulk (encode, index) calls it: at batches of 32 packing saves
        6-16% of the model's time but nothing measurable end to end, for 31-34% more memory
        (BENCHMARKS.md), and a file's bytes then never depend on where in its process a batch ran."""
        from .models.packed import disable_packing

        self.pack_after = None
        disable_packing(self.model)

    def warm_up(self) -> None:
        """Run each loaded tower once on a blank input (packing it, where packing starts at the
        first run): a warm server's first request then costs what the next ones do."""
        import torch

        towers = getattr(self.model, "towers", ("image", "text"))
        if "image" in towers and self.input_resolution:
            side = self.input_resolution
            with torch.inference_mode():
                self.model.encode_image(torch.zeros(1, 3, side, side, dtype=self.dtype, device=self.device))
        if "text" in towers:
            embed_texts(self, [""])

    def ensure(self, tower: str) -> None:
        """Load ``tower`` now if the model was loaded without it, reading only its weights (a
        ``classify`` whose label embeddings are cached never reads the text tower)."""
        towers = getattr(self.model, "towers", None)
        if towers is None or tower in towers:
            return
        from .loading import load

        other, _ = load(self.source, self.device, self.dtype, towers=(tower,))
        self.model.adopt_tower(other, tower)
        self.enable_packing()
        if tower == "image":
            self.preprocess = _preprocess_for(self.model)


def load_model(name: str, device: str = "auto", precision: str | None = None,
               towers: Sequence[str] = ("image", "text"), threads: int | None = None,
               arch: str | None = None, cache_dir: str | os.PathLike | None = None,
               feedback: Feedback = SILENT, pack_after: int | None = 1) -> LoadedModel:
    """Resolve a model name, folder or checkpoint (see :mod:`clipcli.loading`) and load it
    with only the ``towers`` the run needs (``encode`` of images never reads the text
    tower's weights). ``threads`` sets torch's CPU threads for this process (default:
    torch's choice, one per core); a download goes to ``cache_dir`` (default: clipcli's cache)
    and reports to ``feedback``. On the CPU, each tower's blocks run on weights packed for
    oneDNN once the tower has run ``pack_after`` times (1: when reused, so a one-image run never
    pays for it; 0: from the start, as a warm server wants; None: never; see
    :mod:`clipcli.models.packed`)."""
    import torch

    from .loading import load, resolve

    if threads is not None:
        if threads < 1:
            raise ClipcliError(f"threads must be at least 1, not {threads}")
        torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":  # or this process's pinned memory and context land on GPU 0 too
        torch.cuda.set_device(torch_device)
    dtype = resolve_dtype(precision, torch_device)
    source = resolve(name, arch=arch, cache_dir=cache_dir, feedback=feedback)
    model, note = load(source, torch_device, dtype, towers)
    loaded = LoadedModel(model, _preprocess_for(model), str(name), source, torch_device, dtype,
                         notes=[note] if note else [], pack_after=pack_after)
    loaded.enable_packing()
    return loaded


def _preprocess_for(model) -> Callable | None:
    """The image transform for ``model`` (None without an image tower); no torchvision import."""
    from .preprocess import preprocess_for

    return preprocess_for(model.config) if model.visual is not None else None


# --------------------------------------------------------------------------- classify


def label_classifier(
    loaded: LoadedModel,
    labels: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    use_cache: bool = True,
) -> "torch.Tensor":
    """Zero-shot classifier ``[L, D]`` (float32, unit rows), from the disk cache when possible."""
    import numpy as np
    import torch

    from .zeroshot import build_classifier, prompts

    material = {"model": loaded.identity, "labels": list(labels), "templates": list(templates),
                "dtype": str(loaded.dtype), "version": 2}
    path = cache.entry("labels", json.dumps(material, ensure_ascii=True), ".npy")
    if use_cache:
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.ndim == 2 and cached.shape[0] == len(labels) and np.isfinite(cached).all():
                return torch.from_numpy(cached.astype(np.float32))
        except (OSError, ValueError):
            pass
    texts = prompts(labels, templates)
    embedded = embed_texts(loaded, texts, batch_size=batch_size, normalize=False, truncate=True)
    bad = next((e for e in embedded if not e.ok), None)
    if bad is not None:
        raise ClipcliError(f"cannot embed prompt {bad.name!r}: {bad.error}")
    classifier = build_classifier(torch.from_numpy(np.stack([e.embedding for e in embedded])), len(templates))
    if not torch.isfinite(classifier).all():
        raise ClipcliError("the label embeddings are not finite (NaN/inf)", fix="fp32")
    if use_cache:
        cache.save_entry(path, lambda f: np.save(f, classifier.numpy(), allow_pickle=False))
    return classifier


def image_record(result: Embedding, **fields) -> dict:
    """``{"image", "status": "ok", ...fields}`` or ``{"image", "status": "error", "error"}``."""
    if result.ok:
        return {"image": result.name, "status": "ok", **fields}
    return {"image": result.name, "status": "error", "error": result.error}


def classify(
    loaded: LoadedModel,
    items: Sequence[Item],
    labels: Sequence[str],
    templates: Sequence[str],
    *,
    top_k: int = 5,
    min_prob: float | None = None,
    use_cache: bool = True,
    **run: Any,
) -> Iterator[dict]:
    """One record per item: ``{"image", "status", "label", "score", "top": [{"label", "score"}],
    "score_kind"}``.

    ``score_kind`` says what the scores are (:mod:`clipcli.zeroshot`): ``"softmax"`` (CLIP: the
    softmax over the labels, summing to 1) or ``"sigmoid"`` (a model with a logit bias, such as
    SigLIP: each label's own probability, multi-label). ``top`` holds the ``top_k`` most
    probable labels; with ``min_prob`` (0 to 1), only those at least that probable, so an image
    none reaches still has its record, with ``label`` and ``score`` None and ``top`` empty.
    The label classifier is built (or read from the cache) before this returns; the images
    are scored as the returned iterator is consumed. ``run`` takes :func:`embed_images`'s
    keyword arguments (batch size, workers, ...).
    """
    from .zeroshot import check_probability

    check_probability(min_prob)
    classifier = label_classifier(loaded, labels, templates, use_cache=use_cache)
    return label_records(loaded, embed_images(loaded, items, normalize=True, **run), classifier, labels,
                         top_k=top_k, min_prob=min_prob)


def label_records(loaded: LoadedModel, results: Iterable[Embedding], classifier: "torch.Tensor",
                  labels: Sequence[str], *, top_k: int = 5, min_prob: float | None = None) -> Iterator[dict]:
    """:func:`classify`'s records for image embeddings already made (unit length) and a
    classifier from :func:`label_classifier`, as ``results`` are consumed."""
    import torch

    from .zeroshot import logit_parameters, probabilities, score_kind
    from .zeroshot import top_k as best

    scale, bias = logit_parameters(loaded.model)
    kind = score_kind(bias)
    for result in results:
        if not result.ok:
            yield image_record(result)
            continue
        probs = probabilities(torch.from_numpy(result.embedding)[None], classifier, scale, bias)  # (1, L)
        top = best(probs, labels, top_k, min_prob)[0]
        label, score = top[0] if top else (None, None)
        yield image_record(result, label=label, score=score,
                           top=[{"label": label, "score": score} for label, score in top], score_kind=kind)


# --------------------------------------------------------------------------- similarity


@dataclass
class Similarity:
    """Texts x images: ``cosine[t, i]`` and ``probs[t, i]``: with ``score_kind`` ``"softmax"``
    (CLIP) the softmax over images per text, with ``"sigmoid"`` (a model with a logit bias,
    SigLIP) each pair's own probability.

    Only inputs that succeeded are in the matrix; ``failed`` has the others' records.
    """

    images: list[str]
    texts: list[str]
    cosine: "np.ndarray"
    probs: "np.ndarray"
    thumbnails: list
    truncated: list[bool]
    failed: list[dict]
    image_ok: list[bool] = field(default_factory=list)  # per input image, in input order
    score_kind: str = "softmax"  # what probs are: "softmax" or "sigmoid"

    @property
    def matrix_kind(self) -> str:
        """What the matrix views show (:meth:`rows`, the heatmap): ``"sigmoid"`` probabilities
        for a sigmoid model, whose probabilities mean something on their own, else ``"cosine"``."""
        return "sigmoid" if self.score_kind == "sigmoid" else "cosine"

    @property
    def matrix(self) -> "np.ndarray":
        """``probs`` for a sigmoid model, else ``cosine`` (see :attr:`matrix_kind`)."""
        return self.probs if self.matrix_kind == "sigmoid" else self.cosine

    def as_json(self) -> dict:
        out = {
            "images": self.images,
            "texts": self.texts,
            "cosine": self.cosine.tolist(),
            "probs": self.probs.tolist(),
            "score_kind": self.score_kind,
        }
        if any(self.truncated):
            out["truncated"] = self.truncated
        if self.failed:
            out["errors"] = self.failed
        return out

    def records(self) -> list[dict]:
        """One record per input image in input order (an input named twice is two records,
        a failed one its error record), then the failed captions' records."""
        ok = iter({"image": image, "status": "ok",
                   "scores": [{"text": text, "cosine": float(self.cosine[row, column]),
                               "prob": float(self.probs[row, column])} for row, text in enumerate(self.texts)],
                   "score_kind": self.score_kind}
                  for column, image in enumerate(self.images))
        failed = iter([f for f in self.failed if "image" in f])
        records = [next(ok) if good else next(failed) for good in self.image_ok]
        return records + [f for f in self.failed if "text" in f]

    def rows(self, names: Sequence[str] | None = None) -> list[dict]:
        """The matrix as one row per caption: ``{"text", <image name>: value, ...}``, the values
        being :attr:`matrix` (cosines, or a sigmoid model's probabilities; ``names`` relabels
        the images' columns)."""
        names = list(names) if names is not None else list(self.images)
        return [{"text": text, **{name: float(self.matrix[row, column]) for column, name in enumerate(names)}}
                for row, text in enumerate(self.texts)]


def similarity(
    loaded: LoadedModel,
    items: Sequence[Item],
    texts: Sequence[str],
    *,
    truncate: bool = True,
    on_image: Callable[[Embedding], None] | None = None,
    on_text: Callable[[Embedding], None] | None = None,
    **run: Any,
) -> Similarity:
    """Cosine similarity of every text with every image, as in the CLIP notebook, and the
    model's probabilities (:class:`Similarity`: softmax over images per text, or with a logit
    bias each pair's own sigmoid probability).

    ``on_image``/``on_text`` see each result as it is done (for progress and messages).
    """
    import numpy as np
    import torch

    text_results = embed_texts(loaded, texts, truncate=truncate)
    image_results = []
    for result in embed_images(loaded, items, normalize=True, **run):
        image_results.append(result)
        if on_image:
            on_image(result)
    for result in text_results:
        if on_text:
            on_text(result)
    good_texts = [t for t in text_results if t.ok]
    good_images = [i for i in image_results if i.ok]
    failed = [image_record(r) for r in image_results if not r.ok]
    failed += [{"text": t.name, "status": "error", "error": t.error} for t in text_results if not t.ok]
    dim = (good_texts or good_images)[0].embedding.shape[-1] if (good_texts or good_images) else 0
    text_matrix = np.stack([t.embedding for t in good_texts]) if good_texts else np.zeros((0, dim), np.float32)
    image_matrix = np.stack([i.embedding for i in good_images]) if good_images else np.zeros((0, dim), np.float32)
    cosine = torch.from_numpy(text_matrix) @ torch.from_numpy(image_matrix).T  # (T, I)
    from .zeroshot import label_probabilities, logit_parameters, score_kind

    scale, bias = logit_parameters(loaded.model)
    probs = label_probabilities(cosine, scale, bias) if cosine.shape[1] else cosine
    return Similarity(
        images=[i.name for i in good_images],
        texts=[t.name for t in good_texts],
        cosine=cosine.numpy(),
        probs=probs.numpy(),
        thumbnails=[i.thumbnail for i in good_images],
        truncated=[t.truncated for t in good_texts],
        failed=failed,
        image_ok=[i.ok for i in image_results],
        score_kind=score_kind(bias),
    )
