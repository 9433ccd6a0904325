"""Which number type a model computes in: the names users give, ``auto``, and whether this CPU
computes bf16/fp16 natively or by emulation. No model code here."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .errors import ClipcliError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_dtype(precision: str | None, device: "torch.device") -> "torch.dtype":
    """``fp32``/``fp16``/``bf16``, or ``auto``: the fast one that computes natively here (fp16 on
    CUDA; bf16 on a CPU with AVX512-BF16 or AMX, fp32 on other CPUs). By default fp16 on CUDA
    and fp32 on the CPU, whose results equal the reference's (BENCHMARKS.md: bf16 is about 3.4x
    faster on an AMX Xeon at batch 32, at a cosine of about 0.9999 to fp32)."""
    import torch

    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "bf16" if native_on_cpu("bf16") else "fp32"
    if precision is None:
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ClipcliError(f"{precision!r}: choose {', '.join(PRECISIONS)} or auto", option="precision")
    return getattr(torch, PRECISIONS[precision])


@functools.cache
def native_on_cpu(precision: str) -> bool | None:
    """Whether this CPU computes ``bf16`` (AVX512-BF16 or AMX) or ``fp16`` (AVX512-FP16 or AMX-FP16,
    oneDNN's probe) natively rather than by emulation; None where this torch cannot say.
    (oneDNN's own bf16 probe says yes to any AVX-512 CPU, which emulates bf16.)"""
    import torch

    try:
        if precision == "bf16":
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # an older or newer torch without the probes
        return None


def slow_precision_note(device: "torch.device", dtype: "torch.dtype") -> str | None:
    """Why fp16/bf16 will be slow on this CPU (no native support: emulated), or None.

    Measured on an AVX2-only EPYC: bf16 ViT-B/32 at 0.11-0.22x the fp32 speed, an fp16
    matrix product 100x slower than fp32.
    """
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    if device.type != "cpu" or dtype not in names or native_on_cpu(names[dtype]) is not False:
        return None
    name = names[dtype]
    return (f"this CPU has no native {name} arithmetic (AVX512-{name.upper()}/AMX), so {name} precision runs "
            "emulated and several times slower than fp32; fp32 is the fast choice here")
