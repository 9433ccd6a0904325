"""SigLIP: a ViT without a class token pooled by attention, and a bidirectional text Transformer
read out at its last position; each image-text pair is scored on its own, with a sigmoid.

Modules read from the smallest piece to the whole, then :class:`SigLIP`. Parameter names and
shapes are exactly those of open_clip's timm-based SigLIP (``open_clip.create_model(
"ViT-B-16-SigLIP")``): the image tower is timm's ``VisionTransformer`` under ``visual.trunk.``
(``patch_embed.proj``, ``pos_embed`` ``(1, N, C)``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``, ``attn_pool``), the text tower open_clip's ``TextTransformer`` under
``text.`` (OpenAI's block names, a ``text_projection`` ``Linear`` with a bias), then
``logit_scale`` and ``logit_bias``. transformers' ``SiglipModel`` keys are converted to these in
:mod:`clipcli.models.convert_siglip`. Every LayerNorm has eps 1e-6; the image tower's activation is
``config.activation``, the text tower's ``config.text_act``: the models were trained with GELU's
tanh approximation, which transformers runs, while open_clip runs SigLIP 1 with the exact GELU
(timm's older trunks, its text tower without ``act_kwargs``); each one's config says which, and
parity is with each. No I/O and no printing here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ContextLengthError
from .attention import attend
from .checkpointing import checkpointed, recomputes
from .clip import DualEncoder, LayerNorm, Transformer, activation_module, init_block, patch_tokens, readout
from .config import CLIPConfig
from .packed import Packing, Parts, linear_weights

EPS = 1e-6  # SigLIP's LayerNorm epsilon (CLIP's is 1e-5)


class Attention(nn.Module):
    """timm's multi-head self-attention: one ``qkv`` Linear, then ``proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attend(self.qkv(x), self.heads))  # (B, T, C)


class Mlp(nn.Module):
    """timm's two-layer MLP (``fc1``, activation, ``fc2``)."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation_module(activation)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm ViT block in timm's names."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=EPS)
        self.attn = Attention(width, heads)
        self.norm2 = LayerNorm(width, eps=EPS)
        self.mlp = Mlp(width, mlp_width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def parts(self) -> Parts | None:
        """What :mod:`clipcli.models.packed` runs this block from (None: it runs as it is)."""
        attn, mlp = self.attn, self.mlp
        linears = [linear_weights(layer) for layer in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)]
        if None in linears:
            return None
        return Parts(self.norm1, linears[0], linears[1], self.norm2, linears[2], linears[3], mlp.act, attn.heads)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided convolution with a bias. A side that is not
    a multiple of the patch loses its remainder, as timm's does (SO400M/14 at 384 px: 27 x 27)."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_tokens(x, self.proj)  # (B, g*g, width)


class AttentionPool(nn.Module):
    """The MAP head (multihead attention pooling): one learned probe attends over the patch
    tokens with the tower's heads, then ``x + MLP(LayerNorm(x))``. timm's ``AttentionPoolLatent``
    names: ``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.empty(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=EPS)
        self.mlp = Mlp(width, mlp_width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        hs = C // self.heads
        # The probe's query does not depend on the image: computed once, shared by the batch.
        q = self.q(self.latent.to(x.dtype)).view(1, 1, self.heads, hs).transpose(1, 2)  # (1, nh, 1, hs)
        kv = self.kv(x).view(B, N, 2, self.heads, hs).permute(2, 0, 3, 1, 4)  # (2, B, nh, N, hs)
        y = F.scaled_dot_product_attention(q.expand(B, -1, -1, -1), kv[0], kv[1])  # (B, nh, 1, hs)
        y = self.proj(y.reshape(B, C))  # one query: (B, nh, 1, hs) is (B, C) in memory
        return y + self.mlp(self.norm(y))  # (B, C)


class VisionTrunk(nn.Module):
    """timm's ``VisionTransformer`` as SigLIP configures it: no class token, learned position
    embeddings, pre-norm blocks, a final LayerNorm, the MAP head. Its output is the embedding
    (SigLIP has no image projection)."""

    grad_checkpointing = False  # see clipcli.models.checkpointing.recomputes
    packing: Packing | None = None  # see clipcli.models.packed.enable_packing

    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, mlp_width: int,
                 activation: str):
        super().__init__()
        grid = resolution // patch_size
        self.patch_embed = PatchEmbed(patch_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_width, activation) for _ in range(layers)])
        self.norm = LayerNorm(width, eps=EPS)
        self.attn_pool = AttentionPool(width, heads, mlp_width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)  # (B, g*g, width)
        packed = self.packing.blocks_for(self.blocks, x) if self.packing is not None else None
        for i, block in enumerate(self.blocks):
            if packed is not None:
                x = packed[i](x)
            else:
                x = checkpointed(block, x) if recomputes(self) else block(x)
        return self.attn_pool(self.norm(x))  # (B, width)


class VisionTower(nn.Module):
    """open_clip's ``TimmModel`` wrapper: the trunk under ``trunk``, no head of its own."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.input_resolution = config.image_resolution
        self.output_dim = config.vision_width
        self.trunk = VisionTrunk(config.image_resolution, config.vision_patch_size, config.vision_width,
                                 int(config.vision_layers), config.vision_heads,
                                 config.vision_mlp_width or 4 * config.vision_width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class TextTower(nn.Module):
    """open_clip's ``TextTransformer`` as SigLIP configures it: no causal mask, every position
    of the context attended (padding included), a final LayerNorm, the readout (SigLIP's: the
    last position), then a Linear projection with a bias (none where ``config.text_projection``
    is False: the read-out position is the embedding)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width, vocab = config.transformer_width, config.vocab_size
        self.pool, self.eos_id = config.text_pool, config.eos_id
        self.token_embedding = nn.Embedding(vocab, width, _weight=torch.empty(vocab, width))
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(width, config.transformer_layers, config.transformer_heads, causal=False,
                                       mlp_width=config.text_mlp_width, activation=config.text_act, eps=EPS)
        self.ln_final = LayerNorm(width, eps=EPS)
        self.text_projection = nn.Linear(width, config.embed_dim) if config.text_projection else nn.Identity()

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        T, context = text.shape[-1], self.positional_embedding.shape[0]
        if T > context or (self.pool == "last" and T != context):  # read out at the last position: a row
            # shorter than the context would be read at another position than the model was trained at
            raise ContextLengthError(f"token ids of length {T} do not fill the model's {context}-token context "
                                     "(pad every row to it, as the model's tokenizer does)")
        x = self.token_embedding(text) + self.positional_embedding[:T].to(self.token_embedding.weight.dtype)
        # LayerNorm and the projection act per position: only the read-out one is computed.
        x = self.transformer(x, at=readout(text, self.pool, self.eos_id))  # (B, 1, width)
        return self.text_projection(self.ln_final(x[:, 0]))  # (B, embed_dim)


class SigLIP(DualEncoder):
    """SigLIP's two towers; the public surface is :class:`~clipcli.models.clip.CLIP`'s. With a
    ``logit_bias`` (``config.logit_bias``), ``sigmoid(logit_scale.exp() * cos + logit_bias)`` is
    each pair's probability. Constructors only allocate; ``initialize`` draws initial weights."""

    tower_attributes = {"image": ("visual",), "text": ("text",)}

    def __init__(self, config: CLIPConfig, initialize: bool = True):
        super().__init__()
        if config.vision_patch_size is None or config.vision_mixer or config.text_mixer:
            raise ValueError("a SigLIP has a ViT image tower (a patch size) and no Mixer blocks")
        text_out = config.embed_dim if config.text_projection else config.transformer_width
        if config.embed_dim != config.vision_width or text_out != config.embed_dim:
            raise ValueError("a SigLIP's image embedding is its ViT's output: embed_dim must be vision_width, "
                             "and the text tower's output (its width, without a projection) too")
        self.config = config
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        self.visual = VisionTower(config)
        self.text = TextTower(config)
        self.logit_scale = nn.Parameter(torch.empty([]))
        self.logit_bias = nn.Parameter(torch.empty([])) if config.logit_bias else None
        if initialize:
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Initial weights for training from scratch (loading overwrites them): the sigmoid loss's
        start (scale 10, bias -10), timm's ViT init (truncated normal 0.02 for Linear weights and
        position embeddings, zero biases, the probe at ``width**-0.5``) and open_clip's text init."""
        nn.init.constant_(self.logit_scale, math.log(10))
        if self.logit_bias is not None:
            nn.init.constant_(self.logit_bias, -10.0)
        trunk = self.visual.trunk
        nn.init.trunc_normal_(trunk.pos_embed, std=0.02)
        nn.init.trunc_normal_(trunk.attn_pool.latent, std=trunk.attn_pool.latent.shape[-1] ** -0.5)
        weight = trunk.patch_embed.proj.weight  # LeCun normal, as a Linear over the patch
        nn.init.trunc_normal_(weight, std=weight[0].numel() ** -0.5)
        nn.init.zeros_(trunk.patch_embed.proj.bias)
        for module in trunk.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        text = self.text
        width, layers = text.transformer.width, text.transformer.layers
        nn.init.normal_(text.token_embedding.weight, std=0.02)
        nn.init.normal_(text.positional_embedding, std=0.01)
        for block in text.transformer.resblocks:
            init_block(block, width, layers)
        if isinstance(text.text_projection, nn.Linear):
            nn.init.normal_(text.text_projection.weight, std=width**-0.5)
            nn.init.zeros_(text.text_projection.bias)

    @property
    def dtype(self) -> torch.dtype:
        module = self.visual.trunk.patch_embed.proj if self.visual is not None else self.text.token_embedding
        return module.weight.dtype

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self._require("image")
        features = self.visual(image.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``(B, T)``, padded as the tokenizer pads them: the tower is bidirectional,
        so padding is attended and the whole row matters (rows are never shortened here)."""
        self._require("text")
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features
