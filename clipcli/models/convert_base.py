"""What every converter of foreign model descriptions shares (:mod:`clipcli.models.convert` for
OpenCLIP, transformers CLIP and MetaCLIP 2; :mod:`clipcli.models.convert_siglip` for SigLIP): the
one-line refusal, preprocessing and tokenizer fields from checked values, q/k/v packing. Pure
functions, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError
from ..preprocess import INTERPOLATIONS, RESIZE_MODES
from .config import check_fields, shown, triple

if TYPE_CHECKING:  # pragma: no cover
    import torch

VOCAB_SIZE = 49408  # OpenAI's BPE, the bundled tokenizer
RUNS = "clipcli runs CLIP, MetaCLIP 2 and SigLIP models only"


def refuse(source: str, family: str, why: str, instead: str | None = None) -> UnsupportedModelError:
    """The one-line refusal of a model of a family clipcli does not run (``instead``: what to use)."""
    return UnsupportedModelError(f"{source} is a {family} model ({why}); {instead or RUNS}")


def preprocess_fields(source: str, mean, std, interpolation, resize_mode) -> dict[str, Any]:
    """Preprocessing fields from values :func:`check_fields` has checked."""
    fields: dict[str, Any] = {}
    for name, value in (("image_mean", mean), ("image_std", std)):
        if value is not None:
            fields[name] = triple(value)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise UnsupportedModelError(f"{source}: interpolation {shown(interpolation)} is not supported "
                                        f"(use one of {', '.join(INTERPOLATIONS)})")
        fields["interpolation"] = interpolation
    if resize_mode is not None:
        if resize_mode not in RESIZE_MODES:
            raise UnsupportedModelError(f"{source}: resize mode {shown(resize_mode)} is not supported "
                                        f"(use one of {', '.join(RESIZE_MODES)})")
        fields["resize_mode"] = resize_mode
    return fields


_CLEANS = ("canonicalize", "lower", "whitespace")  # open_clip's tokenizer_kwargs.clean


def tokenizer_fields(text: dict, source: str, where: str, prefix: str) -> dict[str, Any]:
    """Tokenizer fields of an OpenCLIP ``text_cfg``: a hub tokenizer (``hf_tokenizer_name``) is
    the model's own (``"sentencepiece"``), its text cleaned as ``tokenizer_kwargs.clean`` says
    (open_clip's HFTokenizer default: ``"whitespace"``); without one, OpenAI's BPE (no fields)."""
    kwargs = check_fields(where, text.get("tokenizer_kwargs") or {}, {"clean": "text"}, f"{prefix}tokenizer_kwargs.")
    clean = kwargs.get("clean")
    named = bool(text.get("hf_tokenizer_name"))
    if set(kwargs) - {"clean"} or clean not in (None, *_CLEANS) or text.get("tokenizer_mode") is not None \
            or (not named and clean not in (None, "lower")):  # the BPE's own cleaning is open_clip's "lower"
        raise refuse(source, "non-standard tokenizer", f"{prefix}tokenizer_kwargs={shown(kwargs)}, "
                     f"{prefix}tokenizer_mode={shown(text.get('tokenizer_mode'))}")
    if not named:
        if text.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
            raise refuse(source, "non-standard tokenizer", f"{prefix}vocab_size={shown(text.get('vocab_size'))} "
                         f"with OpenAI's BPE of {VOCAB_SIZE}")
        return {}
    return {"tokenizer": "sentencepiece", "text_clean": clean or "whitespace"}


def pack_qkv(out: dict[str, torch.Tensor], qkv: dict[str, dict[str, tuple[str, torch.Tensor]]]) -> None:
    """Into ``out``: each ``{q, k, v}`` of ``qkv`` (our name -> part -> (their key, tensor)) as one, (C, ...) x 3
    -> (3C, ...); parts that cannot be packed go in under their own keys, for the strict load to name."""
    import torch

    for ours, parts in qkv.items():
        values = [value for _, value in parts.values()]
        if set(parts) != {"q", "k", "v"} or not all(v.ndim for v in values) \
                or len({(v.shape[1:], v.dtype, v.device) for v in values}) != 1:
            out.update(dict(parts.values()))  # left as they are: the strict load names what is wrong
            continue
        out[ours] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
