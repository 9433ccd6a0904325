"""An image tower taken from torchvision: a classification network without its last layer, then a
linear projection into the joint embedding space.

This is the recipe of building a CLIP from pretrained unimodal backbones (an ImageNet ResNet and a
text encoder) and training little more than the projections that join them. A config names the
network in ``image_tower`` (``"torchvision:resnet50"``, the names are
:data:`~clipcli.models.config.TORCHVISION_TOWERS`); :class:`~clipcli.models.clip.CLIP` builds this
tower in place of its own, and its text tower is CLIP's as ever.

Keys: ``visual.trunk.*`` are torchvision's own names (so a torchvision state dict loads into the
trunk as it is, less its classifier), ``visual.proj.weight`` the projection (no bias, as open_clip's
timm towers have it). The trunk's pooled features are those the classifier read: ResNet's global
average, ConvNeXt's normalised global average, ViT's class token after the final norm.

Locking part of the trunk follows open_clip's ``TimmModel.lock``, which groups a timm network's
parameters with its fine-grained ``group_matcher``; the same groups are found here on torchvision's
names. The stem is the first group, then each block is one (ResNet's residual blocks; ConvNeXt's
blocks, a stage's downsampling layer joining that stage's first block; ViT's encoder layers, the
final norm joining the last one), and whatever matches none of those (ConvNeXt's head norm) is the
last. open_clip freezes BatchNorm statistics by swapping in ``FrozenBatchNorm2d``, which drops the
``num_batches_tracked`` entries from the state dict; here the layer stays what it is and is held in
eval mode, whatever ``train()`` asks (:meth:`TorchvisionTower.freeze_norms`), so its running
statistics never move and checkpoints keep torchvision's keys.

ConvNeXt is built without stochastic depth (torchvision's builders default to 0.1 to 0.5, for
training from scratch on ImageNet; open_clip's timm towers use none unless asked). With
``grad_checkpointing`` (:meth:`~clipcli.models.clip.DualEncoder.set_grad_checkpointing`) the trunk
recomputes each ResNet stage, ConvNeXt stage or ViT block in the backward pass. No I/O here.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .config import TORCHVISION, TORCHVISION_TOWERS

_JOIN_PREVIOUS = 99999  # an ordinal ending in this joins the group before it (timm's MATCH_PREV_GROUP)
_LAST = (float("inf"),)  # what no pattern matches: the last group
# Each family's trunk, by the name torchvision's builders start with: the classifier's last layer
# (its parameters' key prefix, dropped from a torchvision state dict) and the parameter groups.
CLASSIFIERS = {"resnet": "fc.", "convnext": "classifier.2.", "vit": "heads."}


def family_of(name: str) -> str:
    """``resnet``, ``convnext`` or ``vit`` for a name of :data:`TORCHVISION_TOWERS`."""
    return name.split("_")[0].rstrip("0123456789")


def _ordinal(family: str, name: str) -> tuple[float, ...]:
    """Where parameter (or module) ``name`` of a trunk sorts among its groups, as timm's fine-grained
    ``group_matcher`` of the same network orders it (on torchvision's names)."""
    if family == "resnet":
        if found := re.match(r"layer(\d+)\.(\d+)", name):
            return (1, int(found[1]), int(found[2]))
        return (0,) if re.match(r"(conv1|bn1|maxpool)\b", name) else _LAST
    if family == "convnext":  # features.0 the stem; features.2k+1 stage k's blocks; features.2k its downsampling
        if re.match(r"features\.0\b", name):
            return (0,)
        if found := re.match(r"features\.(\d+)\.(\d+)", name):
            index, block = int(found[1]), int(found[2])
            return (1, index // 2, block) if index % 2 else (1, index // 2, 0)
        return _LAST
    if family == "vit":
        if re.match(r"(class_token|conv_proj|encoder\.pos_embedding)\b", name):
            return (0,)
        if found := re.match(r"encoder\.layers\.encoder_layer_(\d+)\b", name):
            return (1, int(found[1]))
        return (1, _JOIN_PREVIOUS) if re.match(r"encoder\.ln\b", name) else _LAST
    raise ValueError(f"unknown torchvision family {family!r}")


def _without_classifier(trunk: nn.Module, family: str) -> int:
    """Replace the classifier's last layer of ``trunk`` by the identity; the width of what it read."""
    if family == "resnet":
        width, trunk.fc = trunk.fc.in_features, nn.Identity()
    elif family == "convnext":  # (LayerNorm2d, Flatten, Linear): the norm stays
        width, trunk.classifier[2] = trunk.classifier[2].in_features, nn.Identity()
    else:
        width, trunk.heads = trunk.heads.head.in_features, nn.Identity()
    return width


class TorchvisionTower(nn.Module):
    """torchvision's ``name`` network (``resnet50``) without its classifier, pooled features
    ``(B, width)`` projected to ``(B, output_dim)``. torchvision initialises the trunk as it builds
    it (cheap on the ``meta`` device); :meth:`initialize_parameters` draws the projection."""

    grad_checkpointing = False  # see clipcli.models.checkpointing.recomputes()

    def __init__(self, name: str, output_dim: int, input_resolution: int):
        super().__init__()
        import torchvision

        if name.startswith(TORCHVISION):
            name = name[len(TORCHVISION):]
        if name not in TORCHVISION_TOWERS:
            raise ValueError(f"{name!r} is not one of the torchvision towers: {', '.join(TORCHVISION_TOWERS)}")
        self.name = name
        self.family = family_of(name)
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        options = {"vit": {"image_size": input_resolution}, "convnext": {"stochastic_depth_prob": 0.0}}
        self.trunk = torchvision.models.get_model(name, weights=None, **options.get(self.family, {}))
        width = _without_classifier(self.trunk, self.family)
        self.proj = nn.Linear(width, output_dim, bias=False)
        self.frozen_norms: frozenset[str] = frozenset()  # trunk BatchNorm layers kept in eval mode

    def initialize_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)  # as CLIP's own image projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return self.proj(self._recomputed(x))
        return self.proj(self.trunk(x))  # (B, 3, res, res) -> (B, width) -> (B, output_dim)

    def _recomputed(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's forward (torchvision's, step by step) with each stage or block checkpointed."""
        from .checkpointing import checkpointed

        trunk = self.trunk
        if self.family == "resnet":
            x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))  # (B, 64, res/4, res/4)
            for stage in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
                x = checkpointed(stage, x)
            return torch.flatten(trunk.avgpool(x), 1)  # (B, width)
        if self.family == "convnext":
            for stage in trunk.features:
                x = checkpointed(stage, x)
            return trunk.classifier(trunk.avgpool(x))  # (B, width)
        x = trunk._process_input(x)  # (B, grid*grid, width)
        x = torch.cat([trunk.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, grid*grid+1, width)
        encoder = trunk.encoder
        x = encoder.dropout(x + encoder.pos_embedding)
        for block in encoder.layers:
            x = checkpointed(block, x)
        return encoder.ln(x)[:, 0]  # (B, width)

    def groups(self) -> list[list[str]]:
        """The trunk's parameter names, by group, first to last (see the module docstring)."""
        names = [name for name, _ in self.trunk.named_parameters()]
        ordinals = {name: _ordinal(self.family, name) for name in names}
        groups: list[list[str]] = []
        for key in sorted(set(ordinals.values())):
            if not groups or key[-1] != _JOIN_PREVIOUS:
                groups.append([])
            groups[-1].extend(name for name in names if ordinals[name] == key)
        return groups

    def group_of(self, name: str) -> int | None:
        """The index in :meth:`groups` of the trunk's module or parameter ``name`` (None when it
        has no parameters of its own group)."""
        ordinals = sorted({_ordinal(self.family, n) for n, _ in self.trunk.named_parameters()})
        index, where = -1, {}
        for key in ordinals:
            if index < 0 or key[-1] != _JOIN_PREVIOUS:
                index += 1
            where[key] = index
        return where.get(_ordinal(self.family, name))

    def freeze_norms(self, names: Iterable[str]) -> None:
        """Hold the trunk's BatchNorm layers ``names`` in eval mode from now on: they normalise
        with their running statistics and never update them, also in ``train()`` mode."""
        names = frozenset(names)
        for name in names:
            if not isinstance(self.trunk.get_submodule(name), nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"{name} is not a BatchNorm layer of the {self.name} trunk")
        self.frozen_norms = self.frozen_norms | names
        self.train(self.training)

    def train(self, mode: bool = True) -> "TorchvisionTower":
        super().train(mode)
        for name in self.frozen_norms:
            self.trunk.get_submodule(name).eval()
        return self
