"""Weight decay two ways, and which parameters it touches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import regmodels
from regmodels import SGDW


def test_norm_weights_and_biases_are_not_decayed_by_default() -> None:
    model = regmodels.create_model("resnet20")
    groups = regmodels.param_groups(model, 5e-4)
    decay, no_decay = groups

    assert (decay["group"], decay["weight_decay"]) == ("decay", 5e-4)
    assert (no_decay["group"], no_decay["weight_decay"]) == ("no_decay", 0.0)

    # Every parameter in exactly one group.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))

    # Decayed: the 19 convolutions and the classifier's weight. Not: batch norms and biases.
    convs_and_fc = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert {id(p) for p in decay["params"]} == {id(p) for p in convs_and_fc}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = {id(m.weight) for m in norms} | {id(m.bias) for m in norms} | {id(model.fc.bias)}
    assert {id(p) for p in no_decay["params"]} == expected
    assert len(decay["params"]) == 20


def test_decaying_norm_and_bias_puts_everything_in_one_group() -> None:
    model = regmodels.create_model("resnet8")
    groups = regmodels.param_groups(model, 1e-4, decay_norm_and_bias=True)
    assert len(groups) == 1
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out() -> None:
    model = regmodels.create_model("resnet8")
    model.fc.requires_grad_(False)
    params = [p for g in regmodels.param_groups(model, 1e-4) for p in g["params"]]
    assert all(p is not model.fc.weight and p is not model.fc.bias for p in params)


class Probe(nn.Module):
    """A model whose loss (c . w) has the constant gradient c, so every step is known."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))


def expected_sgd(w: torch.Tensor, c: torch.Tensor, *, lr: float, wd: float, mode: str, steps: int):
    """Nesterov SGD, momentum 0.9, written out step by step."""
    mu, buf = 0.9, None
    for _ in range(steps):
        g = c + wd * w if mode == "coupled" else c
        if mode == "decoupled":
            w = w * (1 - lr * wd)
        buf = g.clone() if buf is None else mu * buf + g
        w = w - lr * (g + mu * buf)
    return w


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
@pytest.mark.parametrize("gradient", [0.0, 1.0])
def test_weight_decay_follows_its_definition(mode: str, gradient: float) -> None:
    lr, wd, steps = 0.1, 0.05, 5
    model = Probe()
    c_weight = torch.tensor([[0.3, -0.1], [0.2, 0.4]], dtype=torch.float64) * gradient
    c_bias = torch.tensor([0.5, -0.5], dtype=torch.float64) * gradient
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = regmodels.build_optimizer(model, lr=lr, weight_decay=wd, decay_mode=mode)  # type: ignore[arg-type]
    assert isinstance(optimizer, SGDW) == (mode == "decoupled")

    for _ in range(steps):
        optimizer.zero_grad()
        ((model.weight * c_weight).sum() + (model.bias * c_bias).sum()).backward()
        optimizer.step()

    expected = expected_sgd(w0, c_weight, lr=lr, wd=wd, mode=mode, steps=steps)
    assert torch.allclose(model.weight.detach(), expected, rtol=1e-12, atol=1e-12)
    # The bias is in the no-decay group: plain momentum SGD.
    expected_bias = expected_sgd(b0, c_bias, lr=lr, wd=0.0, mode=mode, steps=steps)
    assert torch.allclose(model.bias.detach(), expected_bias, rtol=1e-12, atol=1e-12)


def test_decoupled_decay_shrinks_by_lr_times_wd_whatever_the_gradient() -> None:
    lr, wd = 0.1, 0.05
    shrunk = {}
    for gradient in (0.0, 3.0):
        model = Probe()
        optimizer = regmodels.build_optimizer(
            model, lr=lr, weight_decay=wd, decay_mode="decoupled", momentum=0.0
        )
        w0 = model.weight.detach().clone()
        (model.weight.sum() * gradient + model.bias.sum()).backward()
        optimizer.step()
        # Without momentum: w1 = w0 * (1 - lr * wd) - lr * gradient.
        shrunk[gradient] = (model.weight.detach() + lr * gradient) / w0
    for ratio in shrunk.values():
        assert torch.allclose(ratio, torch.full_like(ratio, 1 - lr * wd), rtol=1e-12)


def test_coupled_and_decoupled_differ_under_momentum() -> None:
    # With momentum the coupled penalty is accumulated like a gradient (about tenfold at 0.9),
    # the decoupled one is not: the same coefficient decays much less when decoupled.
    finals = {}
    for mode in ("coupled", "decoupled"):
        model = Probe()
        optimizer = regmodels.build_optimizer(model, lr=0.1, weight_decay=0.05, decay_mode=mode)  # type: ignore[arg-type]
        for _ in range(20):
            optimizer.zero_grad()
            (model.weight.sum() * 0.0 + model.bias.sum() * 0.0).backward()
            optimizer.step()
        finals[mode] = model.weight.detach().norm().item()
    start = Probe().weight.detach().norm().item()
    assert finals["decoupled"] == pytest.approx(start * (1 - 0.1 * 0.05) ** 20, rel=1e-12)
    assert finals["coupled"] < finals["decoupled"] * 0.95


def test_sgdw_skips_parameters_without_a_gradient_and_keeps_its_coefficient() -> None:
    model = Probe()
    optimizer = regmodels.build_optimizer(model, lr=0.1, weight_decay=0.5, decay_mode="decoupled")
    before = model.weight.detach().clone()
    model.bias.sum().backward()  # the weight gets no gradient, like a dropped block

    optimizer.step()

    assert torch.equal(model.weight.detach(), before)
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    assert optimizer.state_dict()["param_groups"][0]["weight_decay"] == 0.5


def test_adamw_is_decoupled_with_the_same_groups() -> None:
    model = regmodels.create_model("resnet8")
    optimizer = regmodels.build_optimizer(
        model, name="adamw", lr=1e-3, weight_decay=0.05, decay_mode="decoupled"
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_the_decay_choice_is_recorded_for_logging() -> None:
    model = regmodels.create_model("resnet8")
    convs_and_fc = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    )
    total = sum(p.numel() for p in model.parameters())

    optimizer = regmodels.build_optimizer(model, lr=0.1, weight_decay=1e-4, decay_mode="decoupled")
    assert regmodels.describe_weight_decay(optimizer) == {
        "weight_decay_mode": "decoupled",
        "weight_decay": 1e-4,
        "decayed_params": convs_and_fc,
        "undecayed_params": total - convs_and_fc,
    }

    optimizer = regmodels.build_optimizer(
        model, lr=0.1, weight_decay=1e-4, decay_norm_and_bias=True
    )
    summary = regmodels.describe_weight_decay(optimizer)
    assert summary["weight_decay_mode"] == "coupled"
    assert (summary["decayed_params"], summary["undecayed_params"]) == (total, 0)


BAD_OPTIMIZER_ARGUMENTS = [
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001"),
    ({"weight_decay": math.nan}, "weight_decay=nan"),
    ({"weight_decay": math.inf}, "weight_decay=inf"),
    ({"lr": 0.0}, "lr=0.0"),
    ({"lr": math.nan}, "lr=nan"),
    ({"momentum": 1.0}, "momentum=1.0"),
    ({"name": "lion"}, "optimizer='lion'"),
    ({"decay_mode": "l2"}, "decay_mode='l2'"),
    ({"name": "adamw", "decay_mode": "coupled"}, "decay_mode='coupled'"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_OPTIMIZER_ARGUMENTS)
def test_bad_optimizer_arguments_raise_an_error_naming_the_value(kwargs: dict, named: str) -> None:
    model = regmodels.create_model("resnet8")
    arguments = {"lr": 0.1, "weight_decay": 1e-4, **kwargs}
    with pytest.raises(ValueError, match="not allowed") as error:
        regmodels.build_optimizer(model, **arguments)
    assert named in str(error.value)
