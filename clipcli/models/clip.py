"""The CLIP model: a vision tower (ViT or ModifiedResNet) and a causal text Transformer.

Modules read from the smallest piece to the whole, then the config and :class:`CLIP`.
Parameter names and shapes are exactly those of OpenAI's released state dicts (which
OpenCLIP keeps), so ``load_state_dict(strict=True)`` takes them as they are. Building a model
from a checkpoint lives in :mod:`clipcli.models.factory`. No I/O and no printing here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipcliError
from .attention import attend
from .checkpointing import checkpointed, recomputes
from .config import _TEXT_PREFIXES, ACTIVATIONS, HEAD_WIDTH, TOWERS, CLIPConfig, tower_of  # noqa: F401 (re-exported)
from .packed import Packing, Parts, linear_weights
from .resnet import ModifiedResNet  # noqa: F401 (re-exported)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in float32, then returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with: a swish ``x * sigmoid(b x)``, b = 1.702."""

    swish_beta = 1.702

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(self.swish_beta * x)
        # Inference: one new tensor instead of three (the same values, bit for bit).
        return torch.mul(x, self.swish_beta).sigmoid_().mul_(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the packed ``in_proj`` weights of ``nn.MultiheadAttention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, at: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, C)`` -> ``(B, T, C)``; with ``at`` ``(B,)`` (bidirectional only), each row's
        output at that one position ``(B, 1, C)``: the other queries are never computed."""
        if at is not None:
            if causal:
                raise ValueError("one position's output is computed for bidirectional attention only")
            return self._at(x, at)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        return self.out_proj(attend(qkv, self.heads, causal))

    def _at(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.heads
        rows = x[torch.arange(B, device=x.device), at]  # (B, C)
        q = F.linear(rows, self.in_proj_weight[:C], self.in_proj_bias[:C]).view(B, self.heads, 1, hs)  # (B, nh, 1, hs)
        kv = F.linear(x, self.in_proj_weight[C:], self.in_proj_bias[C:])  # (B, T, 2C)
        kv = kv.view(B, T, 2, self.heads, hs).permute(2, 0, 3, 1, 4)  # (2, B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, nh, 1, hs)
        return self.out_proj(y.reshape(B, 1, C))  # one query: (B, nh, 1, hs) is already (B, 1, C) in memory


def activation_module(name: str) -> nn.Module:
    """QuickGELU (OpenAI, MetaCLIP, DFN, LAION-400M), the exact erf GELU (most OpenCLIP models)
    or GELU's tanh approximation (SigLIP)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; use one of {ACTIVATIONS}")


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int | None = None, activation: str = "quick_gelu"):
        super().__init__()
        hidden = hidden or 4 * width
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation_module(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int | None = None, activation: str = "quick_gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, activation)
        self.ln_2 = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool = False, at: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, width)``; with ``at`` ``(B,)``, only each row's output at that position ``(B, 1, width)``."""
        y = self.attn(self.ln_1(x), causal=causal, at=at)
        x = (x if at is None else x[torch.arange(x.shape[0], device=x.device), at][:, None]) + y
        return x + self.mlp(self.ln_2(x))

    def parts(self) -> Parts | None:
        """What :mod:`clipcli.models.packed` runs this block from (None: it runs as it is)."""
        attn, mlp = self.attn, self.mlp
        linears = [linear_weights(layer) for layer in (attn.out_proj, mlp.c_fc, mlp.c_proj)]
        if None in linears or not attn.in_proj_weight.is_floating_point():
            return None
        return Parts(self.ln_1, (attn.in_proj_weight, attn.in_proj_bias), linears[0], self.ln_2, linears[1],
                     linears[2], mlp.gelu, attn.heads)


class Transformer(nn.Module):
    """A stack of pre-norm residual blocks over batch-first sequences ``(B, T, width)``
    (LayerNorm ``eps``: CLIP's 1e-5, SigLIP's 1e-6)."""

    grad_checkpointing = False  # see recomputes()
    packing: Packing | None = None  # see clipcli.models.packed.enable_packing

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False, mlp_width: int | None = None,
                 activation: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_width, activation, eps) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, width)``; with ``at`` ``(B,)`` (bidirectional only), only each row's output at
        that position ``(B, 1, width)``, which the last block computes alone."""
        last = len(self.resblocks) - 1
        if recomputes(self):
            for i, block in enumerate(self.resblocks):
                x = checkpointed(block, x, self.causal, at if i == last else None)
            return x
        packed = None
        if self.packing is not None:  # with ``at``, the last block computes one position and stays plain
            packed = self.packing.blocks_for(self.resblocks[:last] if at is not None else self.resblocks, x)
        for i, block in enumerate(self.resblocks):
            if packed is not None and (i < last or at is None):
                x = packed[i](x, causal=self.causal)
            else:
                x = block(x, causal=self.causal, at=at if i == last else None)
        return x


def patch_tokens(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` (a patch embedding: stride = kernel, no padding) on images ``(B, 3, H, W)`` as one
    matrix product over the patches: ``(B, gh*gw, width)``. The same sums as the convolution in
    another order (equal to about 1e-6), several times faster than oneDNN's convolution at
    small batches. A side that is not a multiple of the patch loses its remainder, as with the
    convolution."""
    B, C, H, W = x.shape
    p = conv.kernel_size[0]
    gh, gw = H // p, W // p
    x = x[:, :, : gh * p, : gw * p].reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return F.linear(x.reshape(B, gh * gw, C * p * p), conv.weight.reshape(conv.out_channels, -1), conv.bias)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 mlp_width: int | None = None, activation: str = "quick_gelu"):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_width=mlp_width, activation=activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = patch_tokens(x, self.conv1)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, grid*grid+1, width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, output_dim)


def readout(text: torch.Tensor, pool: str, eos_id: int | None = None) -> torch.Tensor:
    """The position each row of token ids ``(B, T)`` is read out at ``(B,)``: its end token, the
    largest id (``"argmax"``, OpenAI's BPE), the first ``eos_id`` (``"eos"``, other tokenizers; the
    first position when a row has none, as open_clip and transformers read it), or the last
    position (``"last"``, SigLIP)."""
    if pool == "argmax":
        return text.argmax(dim=-1)
    if pool == "eos":
        return (text == eos_id).int().argmax(dim=-1)  # the first True, or 0 when there is none
    if pool == "last":
        return torch.full(text.shape[:1], text.shape[-1] - 1, dtype=torch.long, device=text.device)
    raise ValueError(f"unknown text readout {pool!r}")


class DualEncoder(nn.Module):
    """What every family's model shares (CLIP here, SigLIP in :mod:`clipcli.models.siglip`): two
    towers that can be dropped and adopted one at a time, and scores from normalised embeddings.
    A subclass names each tower's attributes in ``tower_attributes`` (the first one is the
    tower's main module) and defines ``encode_image`` and ``encode_text``."""

    tower_attributes: dict[str, tuple[str, ...]] = {}
    logit_scale: nn.Parameter
    logit_bias: nn.Parameter | None

    @property
    def score_kind(self) -> str:
        """``"sigmoid"`` when the model has a learned logit bias (each image-text pair's own
        probability), else ``"softmax"`` (probabilities over the labels asked about)."""
        return "softmax" if self.logit_bias is None else "sigmoid"

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers this model has: both, unless it was built for one (see :mod:`clipcli.models.factory`)."""
        return tuple(t for t in TOWERS if getattr(self, self._attributes(t)[0]) is not None)

    def _attributes(self, tower: str) -> tuple[str, ...]:
        if tower not in TOWERS:
            raise ValueError(f"unknown tower {tower!r}; use one of {TOWERS}")
        return self.tower_attributes[tower]

    def drop_tower(self, tower: str) -> None:
        """Free one tower's weights (a model that only embeds images needs no text tower)."""
        for name in self._attributes(tower):
            setattr(self, name, None)

    def adopt_tower(self, other: "DualEncoder", tower: str) -> None:
        """Take ``tower``'s modules from ``other``, a model of the same architecture (built from
        the same checkpoint with that tower), so a tower can be loaded when it is first needed."""
        if other.config != self.config:
            raise ValueError("cannot adopt a tower from a model of another architecture")
        for name in self._attributes(tower):
            setattr(self, name, getattr(other, name))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block (each ResNet stage) in the backward pass instead of
        keeping its activations: less memory for about one more forward pass, while training
        with gradients; inference is untouched. The gradients are the same."""
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    def _require(self, tower: str) -> None:
        if tower not in self.towers:
            raise ClipcliError(f"this model was loaded without its {tower} tower (towers: {', '.join(self.towers)})")

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)``: cosine similarity times ``logit_scale.exp()``,
        plus ``logit_bias`` when the model has one (then ``sigmoid(logits)`` are probabilities)."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()


class CLIP(DualEncoder):
    """CLIP's two towers. Constructors only allocate; ``initialize`` draws CLIP's initial
    weights (pass ``False`` when a checkpoint overwrites them anyway: on the ``meta`` device,
    random ops would import half of torch's compiler stack, seconds per process).

    Mixer towers are built by :func:`clipcli.models.factory.create_model`, which swaps the blocks."""

    tower_attributes = {"image": ("visual",), "text": tuple(prefix.rstrip(".") for prefix in _TEXT_PREFIXES)}

    def __init__(self, config: CLIPConfig, initialize: bool = True):
        super().__init__()
        self.config = config
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        if config.image_tower is not None:  # a torchvision network and a projection
            from .torchvision_tower import TorchvisionTower

            self.visual = TorchvisionTower(config.image_tower, config.embed_dim, config.image_resolution)
        elif config.vision_patch_size is None:
            self.visual = ModifiedResNet(
                layers=tuple(config.vision_layers),
                output_dim=config.embed_dim,
                heads=config.vision_heads,
                input_resolution=config.image_resolution,
                width=config.vision_width,
            )
        else:
            self.visual = VisionTransformer(
                input_resolution=config.image_resolution,
                patch_size=config.vision_patch_size,
                width=config.vision_width,
                layers=int(config.vision_layers),
                heads=config.vision_heads,
                output_dim=config.embed_dim,
                mlp_width=config.vision_mlp_width,
                activation=config.activation,
            )
        width = config.transformer_width
        self.transformer = Transformer(width, config.transformer_layers, config.transformer_heads, causal=True,
                                       mlp_width=config.text_mlp_width, activation=config.text_act)
        self.token_embedding = nn.Embedding(config.vocab_size, width, _weight=torch.empty(config.vocab_size, width))
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty([]))
        self.logit_bias = nn.Parameter(torch.empty([])) if config.logit_bias else None
        if initialize:
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """CLIP's initialisation (used when training from scratch; loading overwrites it)."""
        if self.logit_bias is None:
            nn.init.constant_(self.logit_scale, math.log(1 / 0.07))
        else:  # the sigmoid loss's start (SigLIP): scale 10, bias -10
            nn.init.constant_(self.logit_scale, math.log(10))
            nn.init.constant_(self.logit_bias, -10.0)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.config.image_tower is not None:  # torchvision drew the trunk's weights as it built it
            self.visual.initialize_parameters()
        elif isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            nn.init.normal_(pool.positional_embedding, std=pool.positional_embedding.shape[-1] ** -0.5)
            std = pool.c_proj.in_features**-0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)  # each residual branch starts as the identity
        else:
            scale = self.visual.class_embedding.shape[0] ** -0.5
            for parameter in (self.visual.class_embedding, self.visual.positional_embedding, self.visual.proj):
                nn.init.normal_(parameter, std=scale)
            for block in self.visual.transformer.resblocks:
                init_block(block, self.visual.transformer.width, self.visual.transformer.layers)
        for block in self.transformer.resblocks:
            init_block(block, self.transformer.width, self.transformer.layers)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        if self.visual is None:
            return self.token_embedding.weight.dtype
        return (self.visual.proj if self.config.image_tower is not None else self.visual.conv1).weight.dtype

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self._require("image")
        features = self.visual(image.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def _readout(self, text: torch.Tensor) -> torch.Tensor:
        if self.config.text_pool == "last":
            raise ValueError("a causal text tower cannot be read out at its last position (padding)")
        return readout(text, self.config.text_pool, self.config.eos_id)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # The tower is causal and reads out at each row's end token, so positions after the
        # last end token in the batch cannot change the result.
        self._require("text")
        eot = self._readout(text)  # (B,)
        T = int(eot.max()) + 1 if text.numel() else text.shape[-1]
        x = self.token_embedding(text[:, :T]) + self.positional_embedding[:T].to(self.dtype)  # (B, T, width)
        x = self.ln_final(self.transformer(x))
        features = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (B, embed_dim)
        return F.normalize(features, dim=-1) if normalize else features


def init_block(block: nn.Module, width: int, layers: int) -> None:
    if not isinstance(block, ResidualAttentionBlock):  # a MixerBlock knows its own initialisation
        block.initialize(width, layers)
        return
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
    nn.init.zeros_(block.attn.in_proj_bias)
    nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
    nn.init.zeros_(block.attn.out_proj.bias)
    nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
    nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
