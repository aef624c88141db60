"""Stochastic depth, its survival schedule and the accounting of skipped compute.

Huang et al. (2016), "Deep Networks with Stochastic Depth": residual block l of L survives a
training step with probability p_l = 1 - (l / L) * (1 - p_L). A dropped block is skipped
entirely, so its convolutions run neither forward nor backward; that skipped work is where the
paper's ~25% training speed-up at p_L = 0.5 comes from. At evaluation every block runs and its
residual branch is scaled by p_l, which is the expectation of the training-time output.

The public API speaks of *survival* probability. timm and torchvision speak of *drop*
probability; `drop_prob_from_survival` is the one place that converts between the two.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

DropMode = Literal["batch", "sample"]
DROP_MODES: tuple[str, ...] = ("batch", "sample")


def _as_real(value: object) -> float:
    # A real number (Python or NumPy) as a float; NaN for anything else, bools included.
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return math.nan


def check_survival_prob(survival_prob: float, name: str = "survival_prob") -> float:
    """Return `survival_prob` as a float, or raise if it is not in (0, 1]."""
    value = _as_real(survival_prob)
    if not (0.0 < value <= 1.0):
        raise ValueError(
            f"{name}={survival_prob!r} is not allowed: a survival probability must be a number "
            "in (0, 1]; 1.0 turns stochastic depth off"
        )
    return value


def check_dropout(rate: float, name: str = "dropout") -> float:
    """Return a dropout `rate` as a float, or raise if it is not in [0, 1)."""
    value = _as_real(rate)
    if not (0.0 <= value < 1.0):
        raise ValueError(
            f"{name}={rate!r} is not allowed: a dropout rate must be a number in [0, 1); "
            "0 disables it"
        )
    return value


def survival_schedule(num_blocks: int, survival_prob: float) -> list[float]:
    """Per-block survival probabilities p_1..p_L of the linear decay rule.

    `survival_prob` is p_L, the survival probability of the last residual block, in (0, 1];
    block l of `num_blocks` = L survives with p_l = 1 - (l / L) * (1 - p_L). This is the only
    place the schedule is computed; every other part of regsweep reads it from the blocks.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks!r} is not allowed: it must be an integer >= 1")
    p_last = check_survival_prob(survival_prob)
    return [1.0 - (block / num_blocks) * (1.0 - p_last) for block in range(1, num_blocks + 1)]


def expected_executed_fraction(schedule: Sequence[float]) -> float:
    """Expected fraction of residual branches run per training step: the mean of p_l.

    In the CIFAR ResNets every block costs about the same (the first block of a stage that
    halves the resolution costs 3/4 of the others), so this is also the expected fraction of
    block compute; the stem, the shortcuts and the classifier always run.
    """
    if len(schedule) == 0:
        raise ValueError("schedule=[] is not allowed: it needs one survival probability a block")
    return sum(check_survival_prob(p, "schedule entry") for p in schedule) / len(schedule)


def drop_prob_from_survival(survival_prob: float) -> float:
    """Convert a survival probability (regsweep's sense) to a drop probability (timm's sense)."""
    return 1.0 - check_survival_prob(survival_prob)


@torch.compiler.disable(recursive=False)
def _forward_dropping(unit: StochasticDepth, x: torch.Tensor) -> torch.Tensor:
    # One Bernoulli draw shared by the whole mini-batch, from the CPU generator so that a GPU
    # run never waits on the device for it. This frame stays out of torch.compile on purpose.
    # A tracer that records one path (torch.export, torch.jit.trace) would freeze the branch
    # below, dropping the same blocks every step; dynamo instead splits the graph here and
    # specializes the code after the split on each outcome and each block shape, which in
    # ResNet-110 runs into its recompile limit. Kept eager, the decision is an ordinary Python
    # branch at every step and the counters never become guards. recursive=False keeps only
    # this frame eager: the branch and the shortcut it calls are compiled as frames of their own.
    survives = bool(torch.rand(()) < unit.survival_prob)
    unit.training_steps += 1
    if not survives:
        return unit.activation(unit.shortcut(x))
    unit.executed_steps += 1
    return unit.activation(unit.shortcut(x) + unit.branch(x))


class StochasticDepth(nn.Module):
    """A residual unit act(shortcut(x) + branch(x)) whose branch survives with probability p.

    survival_prob: probability p that the branch runs in a training step, in (0, 1]; 1.0 makes
        the unit a plain residual unit.
    mode: "batch" (the paper's): one draw decides for the whole mini-batch and a dropped branch
        is not called at all, so it costs nothing forward or backward. "sample" (the timm and
        torchvision behaviour): the branch always runs and a per-sample mask zeroes it; it
        saves no compute and is kept for comparison.

    In both modes evaluation runs the branch and scales it by p, the expectation of training,
    so no rescaling happens at training time. A unit that can skip its branch counts how often
    the branch ran in training (`executed_steps` of `training_steps`) for the accounting of
    skipped compute; the counting happens outside any compiled graph, so that the changing
    counts never make torch.compile recompile.

    Under torch.compile each training-time draw in "batch" mode is a graph break by design (see
    `_forward_dropping`), so `fullgraph=True` cannot be used there; evaluation, p = 1 and
    "sample" mode trace into one graph. Under DistributedDataParallel a skipped branch leaves
    parameters without gradients, which needs `find_unused_parameters=True`.
    """

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module | None = None,
        survival_prob: float = 1.0,
        mode: DropMode = "batch",
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if mode not in DROP_MODES:
            raise ValueError(f"mode={mode!r} is not allowed: choose one of {DROP_MODES}")
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.activation = activation if activation is not None else nn.Identity()
        self._survival_prob = check_survival_prob(survival_prob)
        self.mode = mode
        self.stochastic = self._survival_prob < 1.0
        # The evaluation scale p lives in a tensor rather than a Python float, so that a
        # compiled model does not guard on (and recompile for) each block's own probability.
        self.register_buffer(
            "eval_scale", torch.tensor(self._survival_prob, dtype=torch.float32), persistent=False
        )
        self.executed_steps = 0
        self.training_steps = 0

    @property
    def survival_prob(self) -> float:
        """Probability that the branch runs in a training step, fixed at construction."""
        return self._survival_prob

    def extra_repr(self) -> str:
        return f"survival_prob={self._survival_prob:.4f}, mode={self.mode}"

    def reset_counts(self) -> None:
        self.executed_steps = 0
        self.training_steps = 0

    @property
    def skips_compute(self) -> bool:
        """Whether training ever skips the branch: p < 1 in "batch" mode."""
        return self.stochastic and self.mode == "batch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Plain residual unit: no stochastic depth.
        if not self.stochastic:
            return self.activation(self.shortcut(x) + self.branch(x))

        # Evaluation: every branch runs, scaled by its survival probability.
        if not self.training:
            return self.activation(self.shortcut(x) + self.branch(x) * self.eval_scale)

        # Training, the paper's way: one draw for the mini-batch; a dropped branch is skipped.
        if self.mode == "batch":
            return _forward_dropping(self, x)

        # Training, per-sample mask: the branch runs for every sample; no compute is saved.
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = torch.rand(shape, device=x.device) < self.eval_scale
        return self.activation(self.shortcut(x) + self.branch(x) * keep.to(x.dtype))


def stochastic_depth_units(model: nn.Module) -> list[StochasticDepth]:
    """The stochastic-depth units of `model`, in the order they run."""
    return [m for m in model.modules() if isinstance(m, StochasticDepth)]


def executed_fraction(model: nn.Module) -> float:
    """Mean over blocks of the fraction of counted training steps in which the block's branch ran.

    A block that never skips its branch (p = 1, or "sample" mode) counts as 1. NaN when a block
    that can skip has counted no training step since the last `reset_executed_counts`, or when
    `model` has no stochastic-depth unit.
    """
    fractions = []
    for unit in stochastic_depth_units(model):
        if not unit.skips_compute:
            fractions.append(1.0)
        elif unit.training_steps == 0:
            return math.nan
        else:
            fractions.append(unit.executed_steps / unit.training_steps)
    return sum(fractions) / len(fractions) if fractions else math.nan


def reset_executed_counts(model: nn.Module) -> None:
    """Zero the counters of every stochastic-depth unit, e.g. at the start of an epoch."""
    for unit in stochastic_depth_units(model):
        unit.reset_counts()
