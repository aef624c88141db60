"""Optimizers whose weight decay means what it says.

Two senses of weight decay are offered, and `weight_decay` is always the coefficient in the sense
of the chosen `decay_mode`:

- "coupled": L2 regularization through the gradient (torch's SGD `weight_decay`). The penalty
  gradient weight_decay * w is added to the loss gradient, so it is scaled by the learning rate
  and, with momentum 0.9, accumulated about tenfold like any other gradient. This is the
  paper recipe's sense (wd 1e-4 with Nesterov momentum).
- "decoupled" (Loshchilov and Hutter, SGDW / AdamW): every step shrinks the weights directly,
  w <- w * (1 - lr * weight_decay), apart from the gradient and its momentum.

Batch-norm weights and all biases are left undecayed by default: decaying them only fights the
normalization. Each parameter group records its name ("decay" or "no_decay") and the decay mode,
and `describe_weight_decay` summarizes them for logging.

A parameter whose gradient is None in a step (the convolutions of a block that stochastic depth
dropped) is skipped by torch's optimizers, and by `SGDW`: it is neither decayed nor moved by
momentum that step. The original stochastic-depth code updated every parameter every step; the
difference matters only through momentum and decay of rarely kept late blocks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

DecayMode = Literal["coupled", "decoupled"]
OptimizerName = Literal["sgd", "adamw"]
DECAY_MODES: tuple[str, ...] = ("coupled", "decoupled")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")


def _check_number(name: str, value: float, low: float, high: float, *, low_open: bool) -> float:
    number = (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    )
    ok = number is not None and math.isfinite(number) and number < high
    ok = ok and (number > low if low_open else number >= low)  # type: ignore[operator]
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high})"
        raise ValueError(
            f"{name}={value!r} is not allowed: it must be a finite number in {interval}"
        )
    return number  # type: ignore[return-value]


def param_groups(
    model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False
) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a not-decayed group.

    Weights of convolutions and linear layers (ndim >= 2) are decayed at `weight_decay`;
    normalization weights and biases (ndim <= 1) are decayed only if `decay_norm_and_bias`.
    Every trainable parameter appears in exactly one group.
    """
    weight_decay = _check_number("weight_decay", weight_decay, 0.0, math.inf, low_open=False)
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 or decay_norm_and_bias else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "group": "no_decay"})
    return groups


class SGDW(torch.optim.SGD):
    """SGD with decoupled weight decay: w <- w * (1 - lr * weight_decay), then the SGD step.

    A group's `weight_decay` is the decoupled coefficient, as in torch's AdamW; the gradient
    and the momentum buffer never see it.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        # Gradients first, so that the decay applies to the parameters that have one now.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Shrink, then take the plain SGD step with the L2 term switched off.
        decays = []
        for group in self.param_groups:
            decay = group["weight_decay"]
            decays.append(decay)
            params = [p for p in group["params"] if p.grad is not None]
            if decay != 0 and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)
            group["weight_decay"] = 0.0
        try:
            super().step()
        finally:
            for group, decay in zip(self.param_groups, decays, strict=True):
                group["weight_decay"] = decay
        return loss


def build_optimizer(
    model: nn.Module,
    *,
    name: OptimizerName = "sgd",
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    decay_mode: DecayMode = "coupled",
    decay_norm_and_bias: bool = False,
) -> torch.optim.Optimizer:
    """Optimizer over `param_groups(model, weight_decay, ...)`.

    name: "sgd" (SGD or SGDW by `decay_mode`) or "adamw" (always decoupled).
    lr: learning rate, > 0. weight_decay: coefficient per step in the sense of `decay_mode`,
    >= 0. momentum: SGD momentum in [0, 1); nesterov applies when momentum > 0. SGD only.
    decay_norm_and_bias: also decay normalization weights and biases (off by default).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not allowed: choose one of {OPTIMIZERS}")
    if decay_mode not in DECAY_MODES:
        raise ValueError(f"decay_mode={decay_mode!r} is not allowed: choose one of {DECAY_MODES}")
    if name == "adamw" and decay_mode != "decoupled":
        raise ValueError(
            f"decay_mode={decay_mode!r} is not allowed with optimizer 'adamw', which always "
            "decays decoupled: set decay_mode='decoupled'"
        )
    lr = _check_number("lr", lr, 0.0, math.inf, low_open=True)
    momentum = _check_number("momentum", momentum, 0.0, 1.0, low_open=False)

    # Parameter groups that remember what they are, for `describe_weight_decay`.
    groups = param_groups(model, weight_decay, decay_norm_and_bias=decay_norm_and_bias)
    for group in groups:
        group["decay_mode"] = decay_mode

    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr)
    else:
        cls = torch.optim.SGD if decay_mode == "coupled" else SGDW
        optimizer = cls(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    log.debug("%s optimizer, weight decay %s", name, describe_weight_decay(optimizer))
    return optimizer


def describe_weight_decay(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """How `optimizer` decays weights, as flat values a tracker can log.

    weight_decay_mode: "coupled" or "decoupled"; weight_decay: the coefficient of the decayed
    group; decayed_params and undecayed_params: how many scalars each group holds.
    """
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    undecayed = [g for g in optimizer.param_groups if g["weight_decay"] == 0]
    default_mode = "decoupled" if isinstance(optimizer, SGDW | torch.optim.AdamW) else "coupled"
    modes = {g.get("decay_mode", default_mode) for g in optimizer.param_groups}
    return {
        "weight_decay_mode": modes.pop() if len(modes) == 1 else "mixed",
        "weight_decay": max((g["weight_decay"] for g in decayed), default=0.0),
        "decayed_params": sum(p.numel() for g in decayed for p in g["params"]),
        "undecayed_params": sum(p.numel() for g in undecayed for p in g["params"]),
    }
