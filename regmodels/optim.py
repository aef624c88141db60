"""Optimizers whose weight decay means what it says.

Two senses of weight decay are offered. "coupled" is L2 regularization through the optimizer's
gradient (torch's SGD weight_decay): the penalty is scaled by the learning rate and, with
momentum, accumulated like a gradient. "decoupled" (Loshchilov & Hutter, SGDW / AdamW) shrinks
the weights directly by lr * weight_decay each step, apart from the gradient. Batch-norm weights
and all biases are left undecayed by default: decaying them only fights the normalization.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

DecayMode = Literal["coupled", "decoupled"]
OptimizerName = Literal["sgd", "adamw"]


def param_groups(
    model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False
) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and a not-decayed group.

    Weights of convolutions and linear layers (ndim >= 2) are decayed at `weight_decay`;
    normalization weights and biases (ndim <= 1) are decayed only if `decay_norm_and_bias`.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} is not allowed: it must be >= 0")
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
    """SGD with decoupled weight decay: w <- w - lr * weight_decay * w, then the SGD step."""

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = group["weight_decay"]
            group["weight_decay"] = 0.0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for group in self.param_groups:
            shrink = 1.0 - group["lr"] * group["decoupled_weight_decay"]
            if shrink != 1.0:
                for param in group["params"]:
                    if param.grad is not None:
                        param.mul_(shrink)
        return super().step(closure)


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

    lr: learning rate; weight_decay: coefficient per step, in the sense of `decay_mode`;
    momentum and nesterov apply to SGD only. AdamW is always decoupled.
    """
    groups = param_groups(model, weight_decay, decay_norm_and_bias=decay_norm_and_bias)
    if name == "adamw":
        if decay_mode != "decoupled":
            raise ValueError("optimizer 'adamw' decays decoupled: set decay_mode='decoupled'")
        return torch.optim.AdamW(groups, lr=lr)
    if name != "sgd":
        raise ValueError(f"optimizer={name!r} is not allowed: choose 'sgd' or 'adamw'")
    if decay_mode not in ("coupled", "decoupled"):
        raise ValueError(
            f"decay_mode={decay_mode!r} is not allowed: choose 'coupled' or 'decoupled'"
        )
    nesterov = nesterov and momentum > 0
    cls = torch.optim.SGD if decay_mode == "coupled" else SGDW
    return cls(groups, lr=lr, momentum=momentum, nesterov=nesterov)
