"""CIFAR-style residual networks of depth 6n + 2 (He et al., 2016, section 4.2).

A 3x3 stem with 16 channels, three stages of n basic blocks at 16, 32 and 64 channels (times a
width multiplier) on feature maps of the input size, half of it and a quarter of it, global
average pooling, optional dropout, and a linear classifier. Shortcuts are the paper's
parameter-free option A (subsample, then zero-pad the new channels) unless projection (option B,
1x1 convolution and batch norm) is asked for where the shape changes.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from regmodels.layers import (
    DropMode,
    StochasticDepth,
    check_dropout,
    survival_schedule,
)

ShortcutKind = Literal["A", "B"]
STAGE_WIDTHS = (16, 32, 64)
_NAME = re.compile(r"^resnet(\d+)$")


class PadShortcut(nn.Module):
    """Option A shortcut: take every `stride`-th pixel and append zero channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = planes - in_planes

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.extra_channels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def _shortcut(in_planes: int, planes: int, stride: int, kind: ShortcutKind) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_planes, planes, stride)
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


def _basic_branch(in_planes: int, planes: int, stride: int, block_dropout: float) -> nn.Module:
    # conv-bn-relu, dropout between the two convolutions as in wide ResNets, conv-bn.
    layers: list[nn.Module] = [
        nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(planes),
        nn.ReLU(inplace=True),
    ]
    if block_dropout > 0:
        layers.append(nn.Dropout(block_dropout))
    layers += [
        nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(planes),
    ]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet of depth 6n + 2 with dropout and stochastic depth.

    depth: total weighted layers, 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...).
    num_classes, in_channels: set by the dataset.
    dropout: rate before the classifier, in [0, 1); 0 disables it.
    block_dropout: rate inside every residual branch between its convolutions, in [0, 1).
    survival_prob: final survival probability p_L of the last residual block, in (0, 1];
        earlier blocks follow the linear rule of `survival_schedule`; 1.0 disables it.
    width: channel multiplier on 16/32/64 (1 is the paper's network).
    shortcut: "A" (parameter-free, the paper's CIFAR choice) or "B" (projection).
    drop_mode: "batch" skips a dropped block's compute; "sample" masks per sample.
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        block_dropout: float = 0.0,
        survival_prob: float = 1.0,
        width: int = 1,
        shortcut: ShortcutKind = "A",
        drop_mode: DropMode = "batch",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"depth={depth!r} is not allowed: a CIFAR ResNet has depth 6n + 2 with n >= 1 "
                "(8, 14, 20, 32, 44, 56, 110, 1202, ...)"
            )
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width={width!r} is not allowed: it must be an integer >= 1")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is not allowed: choose 'A' or 'B'")
        if num_classes < 2 or in_channels < 1:
            raise ValueError(
                f"num_classes={num_classes!r}, in_channels={in_channels!r}: need at least two "
                "classes and one input channel"
            )
        self.depth = depth
        self.dropout_rate = check_dropout(dropout)
        block_dropout = check_dropout(block_dropout, "block_dropout")
        blocks_per_stage = (depth - 2) // 6
        schedule = survival_schedule(3 * blocks_per_stage, survival_prob)
        widths = [w * width for w in STAGE_WIDTHS]

        # Stem
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )

        # Three stages; block l of L takes the l-th survival probability of the schedule.
        stages = []
        in_planes, block = widths[0], 0
        for stage, planes in enumerate(widths):
            units = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                units.append(
                    StochasticDepth(
                        _basic_branch(in_planes, planes, stride, block_dropout),
                        _shortcut(in_planes, planes, stride, shortcut),
                        survival_prob=schedule[block],
                        mode=drop_mode,
                        activation=nn.ReLU(),
                    )
                )
                in_planes, block = planes, block + 1
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)

        # Head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.fc = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def survival_probs(self) -> list[float]:
        """The per-block survival schedule p_1..p_L, as the blocks hold it."""
        return [unit.survival_prob for stage in self.stages for unit in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


def parse_depth(name: str) -> int:
    """Depth of a model name such as "resnet110"; raises for names that are not 6n + 2."""
    match = _NAME.match(name)
    depth = int(match.group(1)) if match else -1
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"model name {name!r} is not allowed: use resnet<depth> with depth 6n + 2, n >= 1 "
            "(resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202, ...)"
        )
    return depth
