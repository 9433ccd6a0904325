"""Multi-head self-attention from packed q, k, v projections: the one sequence of reshapes that
CLIP's, SigLIP's and the packed blocks' attention share. No parameters here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(qkv: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """``(B, T, 3C)`` projections (q, k and v side by side, each split into ``heads`` heads of
    ``C / heads``) -> ``(B, T, C)``."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.view(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
