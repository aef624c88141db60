"""regmodels: CIFAR-style ResNets with dropout and stochastic depth that skips dropped blocks.

Torch only; knows nothing of Ray or MLflow.
"""

from __future__ import annotations

from regmodels.layers import (
    DROP_MODES,
    StochasticDepth,
    check_dropout,
    check_survival_prob,
    drop_prob_from_survival,
    executed_fraction,
    expected_executed_fraction,
    reset_executed_counts,
    stochastic_depth_units,
    survival_schedule,
)
from regmodels.optim import (
    DECAY_MODES,
    SGDW,
    build_optimizer,
    describe_weight_decay,
    param_groups,
)
from regmodels.resnet import SHORTCUTS, BasicBranch, CifarResNet, PadShortcut, parse_depth

__all__ = [
    "DECAY_MODES",
    "DROP_MODES",
    "SGDW",
    "SHORTCUTS",
    "BasicBranch",
    "CifarResNet",
    "PadShortcut",
    "StochasticDepth",
    "build_optimizer",
    "check_dropout",
    "check_survival_prob",
    "create_model",
    "describe_weight_decay",
    "drop_prob_from_survival",
    "executed_fraction",
    "expected_executed_fraction",
    "param_groups",
    "reset_executed_counts",
    "stochastic_depth_units",
    "survival_schedule",
]


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    dropout: float = 0.0,
    survival_prob: float = 1.0,
    block_dropout: float = 0.0,
    width: int = 1,
    shortcut: str = "A",
    drop_mode: str = "batch",
) -> CifarResNet:
    """Build a model by name: "resnet20", "resnet56", "resnet110", ... (depth 6n + 2).

    dropout: rate before the classifier, in [0, 1). survival_prob: final survival probability
    p_L of the last residual block, in (0, 1]; 1.0 means no stochastic depth. block_dropout:
    rate between the two convolutions of every residual branch, in [0, 1). See `CifarResNet`
    for width, shortcut and drop_mode.

    The model is built in float32 and contiguous memory format. For GPU speed convert it with
    `model.to(memory_format=torch.channels_last)` and run it under
    `torch.autocast("cuda", dtype=torch.bfloat16)`; both are off by default and work on CPU too.
    """
    return CifarResNet(
        parse_depth(name),
        num_classes=num_classes,
        in_channels=in_channels,
        dropout=dropout,
        block_dropout=block_dropout,
        survival_prob=survival_prob,
        width=width,
        shortcut=shortcut,  # type: ignore[arg-type]
        drop_mode=drop_mode,  # type: ignore[arg-type]
    )
