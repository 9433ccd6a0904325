"""Transformer blocks on weights laid out once for oneDNN: float32 inference on the CPU.

A ``Linear`` layer hands its weight to the matrix-product library on every call, and at the
row counts of one to a few images (50 tokens per ViT-B/32 image) re-laying it out costs about
as much as the product itself. Here each block's four weight matrices are reordered once into
oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``: a lossless permutation of
the same values, as large as the weights), and the block's inference forward runs on them with
the elementwise work fused into the products: the activation (GELU, its tanh form, and
QuickGELU as a swish on weights scaled by 1.702) and both residual additions.

Measured on a 2-core Xeon (BENCHMARKS.md): the ViT-B/32 image tower 1.3x faster at batch 1,
1.15x at 8, 1.08x at 32; results equal the plain path to about 1e-6 (a different summation
order, and QuickGELU's scale moved into the weights).

:func:`enable_packing` switches it on for a model's stacks of blocks: by default each one packs
its blocks the second time it runs without gradients on float32 CPU inputs (so a one-image
command never pays for it, in time or memory: the packed copies double the blocks' weights). A packed block falls
back to the plain forward whenever its weights have changed since (training, ``load_state_dict``,
a dtype or device move), gradients are on, or the input is not float32 on the CPU.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def supported() -> bool:
    """Whether this torch build has oneDNN's packed linear operators."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively here (AVX512-BF16 or AMX), not by emulation."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def applies(x: torch.Tensor) -> bool:
    """Whether packed weights serve this input: float32 (or bfloat16 where the CPU computes it
    natively) on the CPU, without gradients."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _native_bf16())


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)  # the row count is only a hint


def _activation(module: nn.Module, dtype: torch.dtype) -> tuple[str, str, float] | None:
    """oneDNN's post-op for an activation module, as (name, algorithm, scale of the weights
    before it); None where it runs apart (unknown, or a swish in bfloat16, whose weights would
    lose bits to the scale)."""
    if isinstance(module, nn.GELU):
        return "gelu", module.approximate, 1.0
    beta = getattr(module, "swish_beta", None)  # x * sigmoid(b x) = swish(b x) / b: b moves into the weights
    if beta is not None and dtype == torch.float32:
        return "swish", "", beta
    return None


class PackedBlock:
    """One pre-norm block ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``, on packed weights.

    Built from the block's parts, so CLIP's (``in_proj``, ``out_proj``, ``c_fc``, ``c_proj``)
    and timm's (``qkv``, ``proj``, ``fc1``, ``fc2``) names map to the same four products."""

    def __init__(self, ln1: nn.Module, qkv: tuple, out: tuple, ln2: nn.Module, fc: tuple, proj: tuple,
                 activation: nn.Module, heads: int):
        self.ln1, self.ln2, self.heads = ln1, ln2, heads
        fused = _activation(activation, fc[0].dtype)
        self.activation = None if fused else activation
        self.post, self.algorithm, scale = fused or ("none", "", 1.0)
        self.sources = [w for w, _ in (qkv, out, fc, proj)] + [b for _, b in (qkv, out, fc, proj) if b is not None]
        self.stamp = self._stamp()
        with torch.no_grad():
            self.qkv, self.qkv_bias = _reorder(qkv[0]), qkv[1]
            self.out, self.out_bias = _reorder(out[0]), out[1]
            self.fc = _reorder(fc[0] * scale) if scale != 1.0 else _reorder(fc[0])
            self.fc_bias = fc[1] * scale if scale != 1.0 and fc[1] is not None else fc[1]
            self.proj = _reorder(proj[0] / scale) if scale != 1.0 else _reorder(proj[0])
            self.proj_bias = proj[1]

    def _stamp(self) -> list[tuple]:
        return [(t._version, t.data_ptr(), t.dtype, t.device) for t in self.sources]

    @property
    def fresh(self) -> bool:
        """Whether the weights are those that were packed (not trained, reloaded or moved since)."""
        return self._stamp() == self.stamp

    def __call__(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        linear = torch.ops.mkldnn._linear_pointwise
        B, T, C = x.shape
        qkv = linear(self.ln1(x), self.qkv, self.qkv_bias, "none", [], "")  # (B, T, 3C)
        qkv = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = linear.binary(y, x, self.out, self.out_bias, "add")  # x + out(y)
        h = linear(self.ln2(x), self.fc, self.fc_bias, self.post, [], self.algorithm)  # (B, T, hidden)
        if self.activation is not None:
            h = self.activation(h)
        return linear.binary(h, x, self.proj, self.proj_bias, "add")  # x + proj(h)


class Packing:
    """The packing state of one stack of blocks: waiting for its second run, or its packed blocks."""

    def __init__(self, after: int = 1):
        self.after = after  # plain runs before packing
        self.runs = 0
        self.blocks: list[PackedBlock] | None = None

    def blocks_for(self, blocks: Sequence[nn.Module], x: torch.Tensor) -> list[PackedBlock] | None:
        """The packed forms of ``blocks`` (each block's ``packed()``) to run ``x`` through, made
        once ``after`` eligible runs went the plain way (again after the weights change); None
        where the plain forward must run."""
        if not applies(x):
            return None
        if self.blocks is not None:
            if all(block.fresh for block in self.blocks):
                return self.blocks
            self.blocks = None  # stale: the plain forward until the new weights are reused
        if self.runs < self.after:
            self.runs += 1
            return None
        self.runs = 0
        self.blocks = [block.packed() for block in blocks]
        return self.blocks


def enable_packing(model: nn.Module, after: int = 1) -> int:
    """Let every stack of blocks in ``model`` (a module with a ``packing`` attribute) pack them
    once it has run ``after`` times the plain way: 1, the default, packs on reuse, so a single
    call never pays for it; 0 packs on the first call (a warm server, whose answers then never
    change between requests). Returns how many stacks will; none where this torch has no oneDNN.
    Call it again after adopting a tower, or to change ``after`` (packed blocks are kept)."""
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
