"""CIFAR-style residual networks of depth 6n + 2 (He et al., 2016, section 4.2).

A 3x3 stem with 16 channels, three stages of n basic blocks at 16, 32 and 64 channels (times a
width multiplier) on feature maps of the input size, half of it and a quarter of it, global
average pooling, optional dropout, and a linear classifier. Shortcuts are the paper's
parameter-free option A (subsample, then zero-pad the new channels) unless projection (option B,
1x1 convolution and batch norm) is asked for where the shape changes. With option A the network
has 0.27M (ResNet-20), 0.85M (ResNet-56) and 1.7M (ResNet-110) parameters, as in the paper's
Table 6.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from regmodels.layers import (
    DROP_MODES,
    DropMode,
    StochasticDepth,
    check_dropout,
    check_survival_prob,
    survival_schedule,
)

log = logging.getLogger(__name__)

ShortcutKind = Literal["A", "B"]
SHORTCUTS: tuple[str, ...] = ("A", "B")
STAGE_WIDTHS = (16, 32, 64)
_NAME = re.compile(r"^resnet(\d+)$")


def _check_depth(depth: int, shown: object) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth {shown!r} is not allowed: a CIFAR ResNet has depth 6n + 2 with n >= 1 "
            "(8, 14, 20, 32, 44, 56, 110, 1202, ...); by name: resnet20, resnet56, resnet110"
        )
    return depth


def parse_depth(name: str) -> int:
    """Depth of a model name such as "resnet110"; raises for names that are not 6n + 2."""
    match = _NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"model name {name!r} is not allowed: use resnet<depth> with depth 6n + 2, n >= 1 "
            "(resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202, ...)"
        )
    return _check_depth(int(match.group(1)), name)


class PadShortcut(nn.Module):
    """Option A shortcut: take every `stride`-th pixel and append zero channels.

    It has no parameters, so it keeps the parameter counts of the paper.
    """

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


class BasicBranch(nn.Module):
    """The residual branch of a basic block: conv-bn-relu, dropout, conv-bn.

    The dropout between the two 3x3 convolutions is the wide-ResNet placement (Zagoruyko and
    Komodakis, 2016); `dropout` is its rate in [0, 1), and 0 skips it.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(check_dropout(dropout, "block_dropout"))
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.dropout.p > 0:
            x = self.dropout(x)
        return self.bn2(self.conv2(x))


class CifarResNet(nn.Module):
    """ResNet of depth 6n + 2 with dropout and stochastic depth.

    depth: total weighted layers, 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...); the
        network has L = 3n residual blocks.
    num_classes, in_channels: set by the dataset.
    dropout: rate before the classifier, in [0, 1); 0 disables it.
    block_dropout: rate inside every residual branch between its convolutions, in [0, 1).
    survival_prob: final survival probability p_L of the last residual block, in (0, 1];
        earlier blocks follow the linear rule of `survival_schedule`; 1.0 disables it.
    width: integer channel multiplier on 16/32/64 (1 is the paper's network, k > 1 a wide one).
    shortcut: "A" (parameter-free, the paper's CIFAR choice) or "B" (projection).
    drop_mode: "batch" skips a dropped block's compute (the paper); "sample" masks per sample
        (timm and torchvision), for comparison.
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

        # Validate everything before building anything, each error naming its value.
        _check_depth(depth, depth)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width={width!r} is not allowed: it must be an integer >= 1")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r} is not allowed: choose one of {SHORTCUTS}")
        if drop_mode not in DROP_MODES:
            raise ValueError(f"drop_mode={drop_mode!r} is not allowed: choose one of {DROP_MODES}")
        for field, value, least in (
            ("num_classes", num_classes, 2),
            ("in_channels", in_channels, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(
                    f"{field}={value!r} is not allowed: it must be an integer >= {least}"
                )
        self.depth = depth
        self.width = width
        self.shortcut_kind = shortcut
        self.dropout_rate = check_dropout(dropout)
        self.block_dropout = check_dropout(block_dropout, "block_dropout")
        blocks_per_stage = (depth - 2) // 6
        self.survival_prob = check_survival_prob(survival_prob)
        schedule = survival_schedule(3 * blocks_per_stage, self.survival_prob)
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
                        BasicBranch(in_planes, planes, stride, self.block_dropout),
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

        # He initialization for convolutions; batch norm starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        log.debug(
            "built resnet%d: %d blocks, p_L=%.3f, width=%d, shortcut=%s",
            depth,
            len(schedule),
            self.survival_prob,
            width,
            shortcut,
        )

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, width={self.width}, shortcut={self.shortcut_kind}, "
            f"survival_prob={self.survival_prob:.4f}, dropout={self.dropout_rate}, "
            f"block_dropout={self.block_dropout}"
        )

    @property
    def blocks(self) -> list[StochasticDepth]:
        """The residual blocks 1..L in the order they run."""
        return [unit for stage in self.stages for unit in stage]

    @property
    def survival_probs(self) -> list[float]:
        """The per-block survival schedule p_1..p_L, as the blocks hold it."""
        return [unit.survival_prob for unit in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))
