"""Stochastic depth and the survival schedule.

Huang et al. (2016), "Deep Networks with Stochastic Depth": residual block l of L survives a
training step with probability p_l = 1 - (l / L) * (1 - p_L). A dropped block is skipped
entirely, so its convolutions run neither forward nor backward; that skipped work is where the
paper's ~25% training speed-up at p_L = 0.5 comes from. At evaluation every block runs and its
residual branch is scaled by p_l, which is the expectation of the training-time output.

The public API speaks of *survival* probability. timm and torchvision speak of *drop*
probability; `drop_prob_from_survival` is the one place that converts between the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

DropMode = Literal["batch", "sample"]
DROP_MODES: tuple[str, ...] = ("batch", "sample")


def check_survival_prob(survival_prob: float, name: str = "survival_prob") -> float:
    """Return `survival_prob` as a float, or raise if it is not in (0, 1]."""
    value = float(survival_prob)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"{name}={survival_prob!r} is not allowed: the final survival probability must be "
            "in (0, 1]; 1.0 turns stochastic depth off"
        )
    return value


def check_dropout(rate: float, name: str = "dropout") -> float:
    """Return a dropout `rate` as a float, or raise if it is not in [0, 1)."""
    value = float(rate)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(
            f"{name}={rate!r} is not allowed: a dropout rate must be in [0, 1); 0 disables it"
        )
    return value


def survival_schedule(num_blocks: int, survival_prob: float) -> list[float]:
    """Per-block survival probabilities p_1..p_L of the linear decay rule.

    `survival_prob` is p_L, the survival probability of the last residual block, in (0, 1].
    This is the only place the schedule is computed; every other part of regsweep reads it
    from the blocks.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks!r} is not allowed: it must be at least 1")
    p_last = check_survival_prob(survival_prob)
    return [1.0 - (block / num_blocks) * (1.0 - p_last) for block in range(1, num_blocks + 1)]


def expected_executed_fraction(schedule: Sequence[float]) -> float:
    """Expected fraction of residual-branch compute run per training step: mean of p_l."""
    return sum(schedule) / len(schedule)


def drop_prob_from_survival(survival_prob: float) -> float:
    """Convert a survival probability (regsweep's sense) to a drop probability (timm's sense)."""
    return 1.0 - check_survival_prob(survival_prob)


@torch.compiler.disable
def _draw_keep(survival_prob: float) -> bool:
    # One Bernoulli draw shared by the whole mini-batch, from the CPU generator so that a GPU
    # run never waits on the device for it. It is kept out of compiled graphs on purpose:
    # traced inside torch.compile a random Python branch would be frozen into the graph and
    # the same blocks would be dropped on every step.
    return bool(torch.rand(()) < survival_prob)


class StochasticDepth(nn.Module):
    """A residual unit act(shortcut(x) + branch(x)) whose branch survives with probability p.

    In "batch" mode (the paper's) one draw decides for the whole mini-batch and a dropped
    branch is not called at all. In "sample" mode (the timm / torchvision behaviour) the branch
    always runs and a per-sample mask zeroes it; it is kept only for comparison. In both modes
    evaluation runs the branch and scales it by p, the expectation of training.

    The module counts how often its branch ran in training (`executed_steps` of
    `training_steps`), for the sweep's accounting of skipped compute.
    """

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module,
        survival_prob: float = 1.0,
        mode: DropMode = "batch",
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if mode not in DROP_MODES:
            raise ValueError(f"mode={mode!r} is not allowed: choose one of {DROP_MODES}")
        self.branch = branch
        self.shortcut = shortcut
        self.survival_prob = check_survival_prob(survival_prob)
        self.mode = mode
        self.activation = activation if activation is not None else nn.Identity()
        self.executed_steps = 0
        self.training_steps = 0

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}, mode={self.mode}"

    def reset_counts(self) -> None:
        self.executed_steps = 0
        self.training_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self._residual(x))

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        p = self.survival_prob

        # Evaluation, or no stochastic depth: the expectation, deterministic.
        if not self.training or p == 1.0:
            if self.training:
                self.training_steps += 1
                self.executed_steps += 1
            branch = self.branch(x)
            return identity + branch if p == 1.0 else identity + p * branch

        self.training_steps += 1
        if self.mode == "batch":
            if not _draw_keep(p):
                # Dropped: the branch is not called, so it costs nothing forward or backward.
                return identity
            self.executed_steps += 1
            return identity + self.branch(x)

        # Per-sample mask: the branch runs for every sample; no compute is saved.
        self.executed_steps += 1
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p
        return identity + self.branch(x) * keep.to(x.dtype)


def stochastic_depth_units(model: nn.Module) -> list[StochasticDepth]:
    return [m for m in model.modules() if isinstance(m, StochasticDepth)]


def executed_fraction(model: nn.Module) -> float:
    """Fraction of residual branches actually run over the training steps counted so far.

    NaN when no training step has been counted since the last `reset_executed_counts`.
    """
    units = stochastic_depth_units(model)
    steps = sum(u.training_steps for u in units)
    if steps == 0:
        return float("nan")
    return sum(u.executed_steps for u in units) / steps


def reset_executed_counts(model: nn.Module) -> None:
    for unit in stochastic_depth_units(model):
        unit.reset_counts()
