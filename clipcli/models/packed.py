"""Transformer blocks on weights laid out once for oneDNN: CPU inference in float32, and in
bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX).

A ``Linear`` layer hands its weight to the matrix-product library on every call, and at the
row counts of one to a few images (50 tokens per ViT-B/32 image) re-laying it out costs about
as much as the product itself. Here each block's four weight matrices are reordered once into
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``: a lossless permutation of
the same values, as large as the weights), and the block's inference forward runs on them with
the elementwise work fused into the products: the activation (GELU, its tanh form, and
QuickGELU as a swish on weights scaled by 1.702, in float32) and both residual additions.

Measured on a 2-core Xeon with AMX (BENCHMARKS.md, the same process alternating the two
paths): the ViT-B/32 image tower 1.23x/1.14x/1.09x faster at batch 1/8/32 in float32,
1.34x/1.21x/1.18x in bfloat16; results equal the plain path to about 1e-6 (a different
summation order, and QuickGELU's scale moved into the weights).

:func:`enable_packing` switches it on for a model's stacks of blocks, each packed once it has
run a given number of times the plain way (so a one-image command never pays for it, in time
or in memory: the packed copies double the blocks' weights). A stack runs its plain forward
whenever packing does not apply: gradients on, autocast, tracing or compiling, an input of
another dtype or device, a block that is not made of plain ``Linear`` layers (a quantized one),
a forward hook on a block or its layers, and whenever a block's live weights are no longer the
tensors it was packed from, on the same storage, at the same version (an optimiser step,
``load_state_dict`` copied or assigned, a dtype move, a replaced layer); it packs again once
reused. A run with gradients drops the packs (a fused optimiser's step bumps no version), so
training between inference runs is safe. In-place changes through ``.data`` bypass torch's
version counters and are not seen: call :func:`disable_packing` after them.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import native_on_cpu
from .attention import attend

Weights = tuple[torch.Tensor, "torch.Tensor | None"]  # a linear map's (weight, bias)


class Parts(NamedTuple):
    """A pre-norm block ``x + out(attend(qkv(ln1(x))))``, then ``x + proj(act(fc(ln2(x))))``, by its
    parts: CLIP's (``in_proj``, ``out_proj``, ``c_fc``, ``c_proj``) and timm's (``qkv``, ``proj``,
    ``fc1``, ``fc2``) names map to the same four products."""

    ln1: nn.Module
    qkv: Weights
    out: Weights
    ln2: nn.Module
    fc: Weights
    proj: Weights
    activation: nn.Module
    heads: int

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in (self.qkv, self.out, self.fc, self.proj) for t in pair if t is not None]


def linear_weights(layer: nn.Module) -> Weights | None:
    """A plain ``nn.Linear``'s floating-point (weight, bias); None for anything else (a quantized
    or wrapped layer runs as it is)."""
    if type(layer) is not nn.Linear or not layer.weight.is_floating_point():
        return None
    return layer.weight, layer.bias


def supported(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's packed products run in this torch for ``dtype`` (float32, or bfloat16 on
    a CPU that computes it natively), and are not switched off."""
    if not torch.backends.mkldnn.enabled:
        return False
    if dtype == torch.bfloat16 and not native_on_cpu("bf16"):
        return False
    return dtype in (torch.float32, torch.bfloat16) and _probe(dtype)


@functools.cache
def _probe(dtype: torch.dtype) -> bool:
    """One tiny packed product with each post-op used here, against ``F.linear``: False where
    any is missing or wrong in this build (then every stack stays plain)."""
    try:
        generator = torch.Generator().manual_seed(0)
        x, w, b, r = (torch.randn(shape, generator=generator).to(dtype)
                      for shape in ((3, 8), (16, 8), (16,), (3, 16)))
        linear, packed, z = torch.ops.mkldnn._linear_pointwise, _reorder(w), F.linear(x, w, b)
        pairs = [(linear(x, packed, b, "none", [], ""), z), (linear(x, packed, b, "swish", [], ""), F.silu(z)),
                 (linear(x, packed, b, "gelu", [], "none"), F.gelu(z)),
                 (linear(x, packed, b, "gelu", [], "tanh"), F.gelu(z, approximate="tanh")),
                 (linear.binary(x, r, packed, b, "add"), z + r)]
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        return torch.backends.mkldnn.is_available() and all(
            torch.allclose(a.float(), e.float(), atol=tolerance, rtol=tolerance) for a, e in pairs)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def applies(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` packed for oneDNN serve the input ``x`` (the same dtype, on
    the CPU, one :func:`supported`); no gradients, autocast, tracing or compiling."""
    if x.device.type != "cpu" or x.dtype != dtype or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return supported(dtype)


def _hooked(block: nn.Module) -> bool:
    """Whether anything watches ``block`` or its layers run (forward hooks): then it runs as it is."""
    from torch.nn.modules import module as torch_module

    if getattr(torch_module, "_global_forward_hooks", None) or getattr(torch_module, "_global_forward_pre_hooks", None):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in block.modules())


class _Stamp(NamedTuple):
    """What changes when a tensor's values may have: its version (in-place changes), its dtype
    and its storage (``Module.to()`` and ``.data =`` keep the tensor and swap the storage)."""

    version: int
    dtype: torch.dtype
    storage: weakref.ref

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "_Stamp":
        return cls(tensor._version, tensor.dtype, weakref.ref(tensor.untyped_storage()))

    def holds(self, tensor: torch.Tensor) -> bool:
        return (tensor._version == self.version and tensor.dtype == self.dtype
                and self.storage() is tensor.untyped_storage())


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)  # the row count is only a hint


def _activation(module: nn.Module, dtype: torch.dtype) -> tuple[str, str, float] | None:
    """oneDNN's post-op for an activation module, as (name, algorithm, scale of the weights
    before it); None where it runs apart (unknown, or a swish in bfloat16, whose weights would
    lose bits to the scale)."""
    if type(module) is nn.GELU:
        return "gelu", module.approximate, 1.0
    beta = getattr(module, "swish_beta", None)  # x * sigmoid(b x) = swish(b x) / b: b moves into the weights
    if beta is not None and dtype == torch.float32:
        return "swish", "", beta
    return None


class PackedBlock:
    """One block's inference forward on packed weights, with what it was packed from."""

    def __init__(self, parts: Parts):
        self.parts, self.sources = parts, parts.tensors()
        self.stamps = [_Stamp.of(t) for t in self.sources]
        fused = _activation(parts.activation, parts.fc[0].dtype)
        self.activation = None if fused else parts.activation  # run apart, between the products
        self.post, self.algorithm, scale = fused or ("none", "", 1.0)
        with torch.no_grad():
            (fc, fc_bias), (proj, _) = parts.fc, parts.proj
            self.qkv, self.out = _reorder(parts.qkv[0]), _reorder(parts.out[0])
            self.fc = _reorder(fc * scale if scale != 1.0 else fc)
            self.fc_bias = fc_bias * scale if scale != 1.0 and fc_bias is not None else fc_bias
            self.proj = _reorder(proj / scale if scale != 1.0 else proj)

    def fresh(self, live: Parts | None) -> bool:
        """Whether ``live`` (the block's parts now) are what this was packed from, unchanged: the
        same modules and tensors, each on the same storage (a dtype move swaps it: ``.to()``
        keeps the Parameter) at the same version (an in-place change bumps it)."""
        p = self.parts
        if live is None or live.heads != p.heads:
            return False
        if live.ln1 is not p.ln1 or live.ln2 is not p.ln2 or live.activation is not p.activation:
            return False
        tensors = live.tensors()
        return len(tensors) == len(self.sources) and all(
            a is b and stamp.holds(a) for a, b, stamp in zip(tensors, self.sources, self.stamps))

    def __call__(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        linear = torch.ops.mkldnn._linear_pointwise
        p = self.parts
        qkv = linear(p.ln1(x), self.qkv, p.qkv[1], "none", [], "")  # (B, T, 3C)
        x = linear.binary(attend(qkv, p.heads, causal), x, self.out, p.out[1], "add")  # x + out(attention)
        h = linear(p.ln2(x), self.fc, self.fc_bias, self.post, [], self.algorithm)  # (B, T, hidden)
        if self.activation is not None:
            h = self.activation(h)
        return linear.binary(h, x, self.proj, p.proj[1], "add")  # x + proj(h)


class Packing:
    """One stack of blocks' packing: the plain runs so far, and its packed blocks once made."""

    def __init__(self, after: int = 1):
        self.after = after  # plain runs before packing
        self.runs = 0
        self.blocks: list[PackedBlock] | None = None
        self.failed = False  # this build's oneDNN refused to pack: plain for good
        self._lock = threading.Lock()

    def blocks_for(self, blocks: Sequence[nn.Module], x: torch.Tensor) -> list[PackedBlock] | None:
        """The packed forms of ``blocks`` (each has ``parts()``) to run ``x`` through, made once
        ``after`` eligible runs went the plain way, and again when the weights changed since;
        None where the plain forward must run."""
        if self.failed or not blocks:
            return None
        parts = [block.parts() for block in blocks]
        if torch.is_grad_enabled() or None in parts or any(_hooked(block) for block in blocks):
            self.drop()  # training (a fused optimiser step bumps no version), a replaced layer, a hook
            return None
        if not applies(x, parts[0].qkv[0].dtype):
            return None
        packed = self._current(parts)
        if packed is not None:
            return packed
        with self._lock:  # one thread packs; another that waited finds it done
            packed = self._current(parts)
            if packed is not None:
                return packed
            self.blocks = None  # stale or never made: freed before any new copy is made
            if self.runs < self.after:
                self.runs += 1
                return None
            try:
                self.blocks = [PackedBlock(p) for p in parts]
            except (RuntimeError, NotImplementedError):
                self.failed = True
                return None
            self.runs = 0
            return self.blocks

    def _current(self, parts: list[Parts]) -> list[PackedBlock] | None:
        packed = self.blocks
        if packed is not None and len(packed) == len(parts) and all(b.fresh(p) for b, p in zip(packed, parts)):
            return packed
        return None

    def drop(self) -> None:
        """Forget the packed blocks (they are made again once reused)."""
        with self._lock:
            self.blocks, self.runs = None, 0

    def __getstate__(self) -> dict:  # copies and pickles carry the policy, not oneDNN's opaque tensors
        return {"after": self.after}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["after"])


def disable_packing(model: nn.Module) -> None:
    """Every stack of ``model`` runs its plain forward again; packed blocks are dropped."""
    for module in model.modules():
        if hasattr(module, "packing"):
            module.packing = None


def enable_packing(model: nn.Module, after: int = 1) -> int:
    """Let every stack of blocks in ``model`` (a module with a ``packing`` attribute) pack them
    once it has run ``after`` times the plain way: 1, the default, packs on reuse, so a single
    call never pays for it; 0 packs on the first call. Returns how many stacks will; none where
    this torch has no working oneDNN. Call it again after adopting a tower or to change ``after``
    (packed blocks are kept); after changing weights in place through ``.data``, call
    :func:`disable_packing` first, then this again."""
    if not supported():
        return 0
    count = 0
    for module in model.modules():
        if hasattr(module, "packing"):
            if module.packing is None:
                module.packing = Packing(after)
            module.packing.after = after
            count += 1
    return count
