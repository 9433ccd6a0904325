"""A model's two towers as ONNX graphs, for runtimes without PyTorch (onnxruntime and the like).

``clipcli convert MODEL NAME.onnx`` writes, beside each other:

- ``NAME.visual.onnx``: input ``pixels`` ``(N, 3, S, S)`` float32, already preprocessed
  (resized, cropped, normalised with the model's mean and std) -> ``image_embeds`` ``(N, D)``;
- ``NAME.text.onnx``: input ``input_ids`` ``(N, context)`` int64, padded to the full context as
  the model's tokenizer pads them -> ``text_embeds`` ``(N, D)``;
- ``NAME.json``: what a runtime needs around the graphs (:func:`sidecar`): image size, mean/std,
  resize, context length, tokenizer, ``logit_scale``/``logit_bias``, and that the outputs are
  unit vectors (so ``image_embeds @ text_embeds.T`` is the cosine similarity).

Only the batch axis ``N`` is dynamic. Both outputs are L2-normalised. Weights are float32: the
graphs are traced with PyTorch's TorchScript exporter at opset :data:`OPSET` (the ``torch.export``
one needs onnxscript, prints to stdout and failed to lower its graph to opset 17 here), which
needs the ``onnx`` package (``pip install "clipcli[onnx]"``). A tower of more than
:data:`EXTERNAL_DATA_BYTES` keeps its weights in one ``NAME.visual.onnx.data`` (or ``.text``)
file beside its graph, since a protobuf file cannot pass 2 GiB.

Each tower is wrapped so that nothing is read off the example batch: CLIP's ``encode_text`` cuts
a batch at its last end token (``int(eot.max())``, which a trace would bake in), so the text graph
runs the causal tower over the whole context instead (the same values: positions after a row's
end token cannot change it) and gathers each row's read-out position inside the graph.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import InputError, OutputError
from .clip import readout
from .config import config_to_json

OPSET = 17  # the first with LayerNormalization (one node per LayerNorm, not a chain of seven)
EXTRA = 'pip install "clipcli[onnx]"'
# Past this many bytes of float32 weights a tower's weights go to a .data file: a protobuf file
# cannot pass 2 GiB, and constant folding may add transposed copies of some weights.
EXTERNAL_DATA_BYTES = 3 * 2**29  # 1.5 GiB
FORMAT = "clipcli-onnx"
FORMAT_VERSION = 1


def require_onnx() -> None:
    """:class:`OutputError` naming the extra to install when the ``onnx`` package is missing
    (the exporter needs it), before any model is loaded."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise OutputError(f"writing ONNX needs the onnx package: {EXTRA}") from None


# --------------------------------------------------------------------------- the two graphs

def _unit(features: torch.Tensor) -> torch.Tensor:
    """``F.normalize``'s values, written so that the exporter keeps the output's width static
    (``F.normalize``'s ``expand_as`` leaves it a symbolic dimension in the graph)."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ImageGraph(nn.Module):
    """``pixels`` ``(N, 3, S, S)`` -> unit ``image_embeds`` ``(N, D)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _unit(self.model.encode_image(pixels))


class TextGraph(nn.Module):
    """``input_ids`` ``(N, context)`` -> unit ``text_embeds`` ``(N, D)``, read out inside the graph.

    SigLIP's tower already runs the whole row and finds its position from the ids; CLIP's is
    run here over the whole context (see the module's docstring), then gathered at each row's
    end token (``argmax``/``eos``) without an index built from the batch size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        if model.config.family == "siglip":
            return _unit(model.encode_text(input_ids))
        # onnxruntime has no int64 ArgMax kernel; ids fit in int32 (the largest vocabulary is 256k).
        at = readout(input_ids.int(), model.config.text_pool, model.config.eos_id)  # (N,)
        x = model.token_embedding(input_ids) + model.positional_embedding.to(model.dtype)  # (N, T, width)
        x = model.ln_final(model.transformer(x))  # (N, T, width)
        x = x.gather(1, at.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))[:, 0]  # (N, width)
        return _unit(x @ model.text_projection)  # (N, D)


# --------------------------------------------------------------------------- files

@dataclass(frozen=True)
class OnnxFiles:
    """Where an export of ``NAME.onnx`` goes: the two graphs and the JSON sidecar."""

    visual: Path
    text: Path
    sidecar: Path

    @classmethod
    def of(cls, dst: str | os.PathLike) -> "OnnxFiles":
        dst = Path(dst)
        stem = dst.with_suffix("")
        return cls(stem.with_name(f"{stem.name}.visual.onnx"), stem.with_name(f"{stem.name}.text.onnx"),
                   stem.with_name(f"{stem.name}.json"))

    @property
    def graphs(self) -> dict[str, Path]:
        return {"image": self.visual, "text": self.text}

    def data_files(self, model: nn.Module) -> list[Path]:
        """The ``.data`` files the export of ``model`` writes (towers past :data:`EXTERNAL_DATA_BYTES`)."""
        return [data_path(path) for tower, path in self.graphs.items() if weight_bytes(model, tower) > EXTERNAL_DATA_BYTES]


def data_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".data")


def _tower_modules(model: nn.Module, tower: str) -> list[nn.Module]:
    return [m for m in (getattr(model, name) for name in model.tower_attributes[tower]) if m is not None]


def weight_bytes(model: nn.Module, tower: str) -> int:
    """A tower's weights in float32 bytes, as its graph stores them."""
    total = 0
    for module in _tower_modules(model, tower):
        if isinstance(module, nn.Parameter):
            total += module.numel() * 4
        else:
            total += sum(t.numel() * 4 for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())
    return total


def sidecar(model: nn.Module, files: OnnxFiles, *, tokenizer_files: Sequence[str] = (),
            metadata: dict | None = None) -> dict:
    """What a runtime needs to feed the graphs and score their outputs, as one JSON object.

    ``logit_scale`` is the multiplier itself (``exp`` of the model's parameter): logits are
    ``logit_scale * cosine + logit_bias`` (bias 0 when ``logit_bias`` is null); ``score`` says
    whether to take a softmax over the labels (CLIP) or each logit's sigmoid (SigLIP)."""
    config = model.config
    bias = model.logit_bias
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **(metadata or {}),
        "opset": OPSET,
        "dtype": "float32",
        "family": config.family,
        "embed_dim": config.embed_dim,
        "normalized": True,  # both outputs are unit vectors
        "score": model.score_kind,
        "logit_scale": math.exp(model.logit_scale.item()),
        "logit_bias": None if bias is None else bias.item(),
        "image": {
            "file": files.visual.name, "input": "pixels", "output": "image_embeds",
            "size": config.image_resolution, "mean": list(config.image_mean), "std": list(config.image_std),
            "interpolation": config.interpolation, "resize_mode": config.resize_mode,
        },
        "text": {
            "file": files.text.name, "input": "input_ids", "output": "text_embeds",
            "context_length": config.context_length, "tokenizer": config.tokenizer,
            "tokenizer_files": sorted(tokenizer_files), "text_clean": config.text_clean,
            "readout": config.text_pool, "eos_id": config.eos_id,
        },
        "clipcli_config": json.loads(config_to_json(config)),
    }


# --------------------------------------------------------------------------- export

def _example(model: nn.Module, tower: str) -> torch.Tensor:
    """A batch of two to trace with: two, so that no size-1 broadcast is taken for the batch axis."""
    config = model.config
    if tower == "image":
        size = config.image_resolution
        return torch.zeros(2, 3, size, size, dtype=torch.float32)
    return torch.zeros(2, config.context_length, dtype=torch.long)


def _trace(model: nn.Module, tower: str, path: Path) -> None:
    """One tower's graph at ``path`` (maybe with external tensor files beside it, for a tower
    past protobuf's 2 GiB)."""
    graph, names = (ImageGraph(model), ("pixels", "image_embeds")) if tower == "image" else \
        (TextGraph(model), ("input_ids", "text_embeds"))
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of torch.export's (see the module's docstring).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")  # how it is exported, not a fault
        torch.onnx.export(graph.eval(), (_example(model, tower),), str(path), opset_version=OPSET,
                          input_names=[names[0]], output_names=[names[1]],
                          dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
                          do_constant_folding=True, **options)


def _place(source: Path, target: Path, overwrite: bool) -> None:
    """Move a finished file into place with the overwrite rules of :func:`~clipcli.fsutil.atomic_path`."""
    from ..fsutil import atomic_path

    with atomic_path(target, overwrite) as temp:
        os.replace(source, temp)


def _export_tower(model: nn.Module, tower: str, target: Path, overwrite: bool) -> list[Path]:
    """Trace one tower into a private folder beside ``target``, then move its graph (and its
    ``.data`` file) into place: a failure leaves no part-written graph under its final name."""
    import onnx

    external = weight_bytes(model, tower) > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as folder:
        traced = Path(folder) / "traced" / target.name
        traced.parent.mkdir()
        try:
            _trace(model, tower, traced)
        except OSError as error:
            raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
        except torch.onnx.errors.OnnxExporterError as error:  # an operator the exporter cannot write
            raise OutputError(f"cannot export the {tower} tower to ONNX: {(str(error).splitlines() or ['?'])[0]}") from None
        if external or len(os.listdir(traced.parent)) > 1:  # the exporter wrote one file per large tensor
            saved = Path(folder) / target.name
            proto = onnx.load(str(traced))
            onnx.save_model(proto, str(saved), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_path(target).name, size_threshold=1024)
            del proto
            onnx.checker.check_model(str(saved))
            _place(data_path(saved), data_path(target), overwrite)
            _place(saved, target, overwrite)
            return [target, data_path(target)]
        onnx.checker.check_model(str(traced))
        _place(traced, target, overwrite)
        return [target]


def export_onnx(model: nn.Module, dst: str | os.PathLike, *, overwrite: bool = False,
                tokenizer_files: Sequence[str] = (), metadata: dict | None = None) -> list[Path]:
    """Write ``model``'s towers as ONNX graphs and their JSON sidecar for ``dst`` (``NAME.onnx``;
    see the module's docstring for the layout): the files written, the sidecar last. The model
    must be a float32 one on the CPU, with both towers; ``tokenizer_files`` names the tokenizer
    files the caller puts beside the graphs, ``metadata`` goes into the sidecar as it is."""
    require_onnx()
    from ..fsutil import atomic_write

    if set(model.towers) != {"image", "text"}:
        raise InputError(f"an ONNX export needs both towers; this model was loaded with {', '.join(model.towers)}")
    kinds = {(t.dtype, t.device.type) for t in model.parameters()}
    if kinds != {(torch.float32, "cpu")}:
        raise InputError("an ONNX export is float32 on the CPU: load the model with dtype=torch.float32, device='cpu'")
    files = OnnxFiles.of(dst)
    written = []
    for tower, target in files.graphs.items():
        written += _export_tower(model, tower, target, overwrite)
    record = sidecar(model, files, tokenizer_files=tokenizer_files, metadata=metadata)
    with atomic_write(files.sidecar, overwrite, text=True) as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return [*written, files.sidecar]

