"""CLIP's ModifiedResNet image tower (OpenAI's RN50/RN101/RN50x4...): a ResNet with three stem
convolutions, anti-aliased (average-pooled) strided blocks, and attention pooling in place of the
global average pool. Smallest piece first: the bottleneck block, the attention pool, the tower.
No I/O here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import checkpointed, recomputes


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided convolution is replaced by average pooling (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys "-1" (pool, no parameters), "0" (conv), "1" (norm) match the released names.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pool a feature map by letting its mean attend over all positions (one query)."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(spatial_dim**2 + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, HW+1, C)
        x = x + self.positional_embedding.to(x.dtype)
        hs = C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k = self.k_proj(x).view(B, -1, self.heads, hs).transpose(1, 2)  # (B, nh, HW+1, hs)
        v = self.v_proj(x).view(B, -1, self.heads, hs).transpose(1, 2)  # (B, nh, HW+1, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, C))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-convolution stem with average pooling, anti-aliased bottlenecks,
    and attention pooling in place of global average pooling."""

    grad_checkpointing = False  # see recomputes(): one checkpoint per stage

    def __init__(self, layers: tuple[int, ...], output_dim: int, heads: int, input_resolution: int, width: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        embed_dim = width * 32  # the last stage's channels: width * 8 * expansion
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)  # (B, width, res/4, res/4)
        if recomputes(self):
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = checkpointed(stage, x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, width*32, res/32, res/32)
        return self.attnpool(x)
