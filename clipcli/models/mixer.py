"""MLP-Mixer encoders for CLIP: the self-attention sub-layer replaced by an MLP across tokens.

A Mixer block is a Transformer block whose attention is swapped for *token mixing*: the
channels of every token go through ``LayerNorm``, then an MLP is applied along the token axis
(the same MLP for every channel), then the usual channel MLP follows. Both sub-layers are
residual, exactly as in the Transformer blocks of :mod:`clipcli.models.clip`.

For text the token MLP is causal: both of its ``T x T`` weight matrices are lower-triangular,
so the output at position ``t`` depends only on tokens ``0..t``. The end-of-text read-out of
:meth:`CLIP.encode_text` therefore stays valid, and a prefix of length ``T' < T`` is mixed with
the top-left ``T' x T'`` corner of the weights (what ``encode_text`` does when it cuts the
padding off a batch).

The image Mixer keeps the ViT's patch embedding, class token and positional embedding, so a
checkpoint's key names and shapes still describe the architecture; only the blocks differ
(``token_mix.fc1``/``fc2`` where a Transformer block has ``attn``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import checkpointed, recomputes
from .clip import MLP, LayerNorm, QuickGELU


class TokenMixing(nn.Module):
    """An MLP over the token axis of ``(B, T, C)``: ``T -> T -> T``, shared across channels."""

    def __init__(self, tokens: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.fc1 = nn.Linear(tokens, tokens)
        self.gelu = QuickGELU()
        self.fc2 = nn.Linear(tokens, tokens)

    def _weight(self, linear: nn.Linear, T: int) -> torch.Tensor:
        weight = linear.weight[:T, :T]  # (T, T): output token x input token
        return weight.tril() if self.causal else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if not self.causal and T != self.fc1.in_features:
            raise ValueError(f"image Mixer expects {self.fc1.in_features} tokens, got {T}")
        y = x.transpose(1, 2)  # (B, C, T)
        y = self.gelu(F.linear(y, self._weight(self.fc1, T), self.fc1.bias[:T]))  # (B, C, T)
        y = F.linear(y, self._weight(self.fc2, T), self.fc2.bias[:T])  # (B, C, T)
        return y.transpose(1, 2)  # (B, T, C)


class MixerBlock(nn.Module):
    def __init__(self, width: int, tokens: int, causal: bool, mlp_width: int | None = None,
                 activation: str = "quick_gelu"):
        super().__init__()
        self.token_mix = TokenMixing(tokens, causal)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width, mlp_width, activation)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mix(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def initialize(self, width: int, layers: int) -> None:
        tokens = self.token_mix.fc1.in_features
        proj_std = (2 * layers) ** -0.5
        for linear, std in ((self.token_mix.fc1, tokens**-0.5), (self.token_mix.fc2, tokens**-0.5 * proj_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
            if self.token_mix.causal:
                with torch.no_grad():  # entries above the diagonal are never used
                    linear.weight.copy_(linear.weight.tril())
        nn.init.normal_(self.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(self.mlp.c_proj.weight, std=width**-0.5 * proj_std)


class Mixer(nn.Module):
    """A stack of Mixer blocks over ``(B, T, width)``; a drop-in for :class:`clipcli.models.clip.Transformer`."""

    grad_checkpointing = False  # see clipcli.models.checkpointing.recomputes

    def __init__(self, width: int, layers: int, tokens: int, causal: bool = False, mlp_width: int | None = None,
                 activation: str = "quick_gelu"):
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.resblocks = nn.ModuleList([MixerBlock(width, tokens, causal, mlp_width, activation) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = checkpointed(block, x) if recomputes(self) else block(x)
        return x
