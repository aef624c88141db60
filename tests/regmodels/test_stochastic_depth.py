"""Stochastic depth as DESIGN.md defines it: schedule, draws, skipped compute, expectation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import regmodels
from regmodels import StochasticDepth


class Scale(nn.Module):
    """A linear residual branch, y = w * x, cheap enough to call thousands of times."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.w * x


def binomial_tolerance(p: float, n: int, sigmas: float = 4.5) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# The schedule and the conversions


def test_survival_schedule_decays_linearly_to_p_last() -> None:
    schedule = regmodels.survival_schedule(4, 0.5)
    assert schedule == pytest.approx([0.875, 0.75, 0.625, 0.5])

    # ResNet-110: L = 54 blocks; p_l = 1 - (l / 54) * 0.5.
    schedule = regmodels.survival_schedule(54, 0.5)
    assert schedule[0] == pytest.approx(1 - 0.5 / 54)
    assert schedule[26] == pytest.approx(0.75)
    assert schedule[-1] == pytest.approx(0.5)
    assert regmodels.survival_schedule(3, 1.0) == [1.0, 1.0, 1.0]


def test_the_model_takes_its_schedule_from_survival_schedule() -> None:
    model = regmodels.create_model("resnet110", survival_prob=0.5)
    assert model.survival_probs == regmodels.survival_schedule(54, 0.5)
    assert [u.survival_prob for u in regmodels.stochastic_depth_units(model)] == (
        model.survival_probs
    )


def test_expected_executed_fraction_is_the_mean_survival_probability() -> None:
    # ResNet-110 at p_L = 0.5: 1 - 0.5 * (L + 1) / (2 L) with L = 54, about 0.745.
    schedule = regmodels.survival_schedule(54, 0.5)
    assert regmodels.expected_executed_fraction(schedule) == pytest.approx(1 - 0.25 * 55 / 54)
    assert regmodels.expected_executed_fraction([1.0] * 9) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        regmodels.expected_executed_fraction([])


def test_drop_probability_is_one_minus_survival() -> None:
    assert regmodels.drop_prob_from_survival(0.8) == pytest.approx(0.2)
    assert regmodels.drop_prob_from_survival(1.0) == 0.0
    with pytest.raises(ValueError, match="survival_prob=0"):
        regmodels.drop_prob_from_survival(0)


@pytest.mark.parametrize("bad", [0.0, -1.0, 1.0001, math.nan, math.inf, None, True])
def test_schedule_rejects_bad_final_survival(bad: object) -> None:
    with pytest.raises(ValueError, match=f"survival_prob={bad!r} is not allowed"):
        regmodels.survival_schedule(9, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_schedule_rejects_bad_block_counts(bad: object) -> None:
    with pytest.raises(ValueError, match=f"num_blocks={bad!r}"):
        regmodels.survival_schedule(bad, 0.5)  # type: ignore[arg-type]


def test_unit_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode='row' is not allowed"):
        StochasticDepth(Scale(1.0), survival_prob=0.5, mode="row")  # type: ignore[arg-type]


# Training-time draws


def test_each_block_runs_with_its_survival_probability() -> None:
    # Nine units on the ResNet-20 schedule with cheap linear branches, so that many steps fit.
    torch.manual_seed(1234)
    schedule = regmodels.survival_schedule(9, 0.5)
    net = nn.Sequential(*(StochasticDepth(Scale(1.0), survival_prob=p) for p in schedule))
    x = torch.ones(1)
    steps = 6000

    with torch.no_grad():
        for _ in range(steps):
            net(x)

    for unit, p in zip(net, schedule, strict=True):
        assert unit.training_steps == steps
        assert unit.branch.calls == unit.executed_steps
        assert abs(unit.executed_steps / steps - p) < binomial_tolerance(p, steps)

    # All nine together: the executed fraction is the mean survival probability, tightly.
    expected = regmodels.expected_executed_fraction(schedule)
    spread = math.sqrt(sum(p * (1 - p) for p in schedule)) / (9 * math.sqrt(steps))
    assert abs(regmodels.executed_fraction(net) - expected) < 4.5 * spread


def test_a_models_blocks_run_at_the_expected_fraction() -> None:
    torch.manual_seed(99)
    model = regmodels.create_model("resnet20", survival_prob=0.5).train()
    x = torch.randn(2, 3, 4, 4)
    steps = 300

    with torch.no_grad():
        for _ in range(steps):
            model(x)

    expected = regmodels.expected_executed_fraction(model.survival_probs)  # 0.72
    spread = math.sqrt(sum(p * (1 - p) for p in model.survival_probs)) / (9 * math.sqrt(steps))
    assert abs(regmodels.executed_fraction(model) - expected) < 4.5 * spread
    # The first block (p = 0.94) runs more often than the last (p = 0.5).
    assert model.blocks[0].executed_steps > model.blocks[-1].executed_steps + steps // 4


def test_one_draw_decides_for_the_whole_mini_batch() -> None:
    torch.manual_seed(0)
    unit = StochasticDepth(Scale(1.0), survival_prob=0.5).train()
    x = torch.randn(64, 3)

    outcomes = set()
    for _ in range(40):
        kept = unit(x) != x  # a kept sample has x + x, a dropped one x
        assert kept.all() or not kept.any()
        outcomes.add(bool(kept.all()))
    assert outcomes == {True, False}


def test_a_dropped_block_runs_no_convolution_and_gets_no_gradient() -> None:
    torch.manual_seed(0)
    model = regmodels.create_model("resnet20", survival_prob=0.3).train()
    conv_calls = [0] * 9
    for i, unit in enumerate(model.blocks):
        for conv in (unit.branch.conv1, unit.branch.conv2):

            def count(_module: nn.Module, _args: tuple, i: int = i) -> None:
                conv_calls[i] += 1

            conv.register_forward_pre_hook(count)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])

    dropped_seen = kept_seen = 0
    for _ in range(6):
        model.zero_grad(set_to_none=True)
        before = [u.executed_steps for u in model.blocks]
        calls_before = list(conv_calls)
        nn.functional.cross_entropy(model(x), y).backward()

        for i, unit in enumerate(model.blocks):
            kept = unit.executed_steps > before[i]
            grads = [p.grad for p in unit.branch.parameters()]
            if kept:
                kept_seen += 1
                assert conv_calls[i] == calls_before[i] + 2
                assert all(g is not None for g in grads)
            else:
                dropped_seen += 1
                assert conv_calls[i] == calls_before[i]
                assert all(g is None for g in grads)
        # The layers that always run always learn.
        assert model.stem[0].weight.grad is not None and model.fc.weight.grad is not None

    assert dropped_seen > 5 and kept_seen > 5


def test_a_dropped_unit_returns_the_activated_shortcut_alone() -> None:
    torch.manual_seed(0)
    shortcut = regmodels.PadShortcut(in_planes=2, planes=4, stride=2)
    branch = nn.Conv2d(2, 4, 3, stride=2, padding=1)
    unit = StochasticDepth(branch, shortcut, survival_prob=0.5, activation=nn.ReLU()).train()
    x = torch.randn(3, 2, 8, 8)

    outputs = [unit(x) for _ in range(20)]

    dropped = [out for out in outputs if torch.equal(out, torch.relu(shortcut(x)))]
    assert 0 < len(dropped) < 20
    assert unit.training_steps - unit.executed_steps == len(dropped)


# Evaluation


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_evaluation_is_deterministic_and_the_expectation_of_training(mode: str) -> None:
    torch.manual_seed(0)
    p, w = 0.7, 2.0
    unit = StochasticDepth(Scale(w), survival_prob=p, mode=mode)  # type: ignore[arg-type]
    x = torch.randn(16, 5)

    # Evaluation: x + p * branch(x), exactly, twice the same, with no random number drawn.
    unit.eval()
    rng = torch.get_rng_state()
    first, second = unit(x), unit(x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first, second)
    assert torch.allclose(first, x + p * w * x)

    # Training: the mean over many draws approaches the evaluation output.
    unit.train()
    draws = 4000
    with torch.no_grad():
        mean = sum(unit(x) for _ in range(draws)) / draws
    kept_fraction = (mean - x) / (w * x)
    assert torch.allclose(kept_fraction, torch.full_like(x, p), atol=binomial_tolerance(p, draws))


def test_evaluation_of_a_model_is_deterministic() -> None:
    torch.manual_seed(0)
    model = regmodels.create_model("resnet20", survival_prob=0.5, dropout=0.3, block_dropout=0.2)
    model.train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(x)  # move the batch-norm statistics away from their initial values
        model.eval()
        assert torch.equal(model(x), model(x))


# Per-sample mode (the timm / torchvision behaviour), kept for comparison


def test_sample_mode_masks_each_sample_and_always_runs_the_branch() -> None:
    torch.manual_seed(0)
    branch = Scale(1.0)
    unit = StochasticDepth(branch, survival_prob=0.5, mode="sample").train()
    x = torch.ones(4000, 1)

    out = unit(x)

    kept = out[:, 0] == 2.0
    assert torch.all((out[:, 0] == 2.0) | (out[:, 0] == 1.0))
    assert abs(kept.float().mean().item() - 0.5) < binomial_tolerance(0.5, 4000)
    assert branch.calls == 1
    assert regmodels.executed_fraction(unit) == 1.0  # no compute saved


# Accounting


def test_accounting_counts_steps_and_resets() -> None:
    torch.manual_seed(0)
    model = regmodels.create_model("resnet8", survival_prob=0.5)
    x = torch.randn(2, 3, 8, 8)
    assert math.isnan(regmodels.executed_fraction(model))

    with torch.no_grad():
        model.train()
        for _ in range(10):
            model(x)
        model.eval()
        model(x)  # evaluation is not counted

    assert [u.training_steps for u in model.blocks] == [10, 10, 10]
    executed = sum(u.executed_steps for u in model.blocks)
    assert 0 < executed < 30
    assert regmodels.executed_fraction(model) == pytest.approx(executed / 30)

    regmodels.reset_executed_counts(model)
    assert math.isnan(regmodels.executed_fraction(model))


def test_without_stochastic_depth_everything_is_executed() -> None:
    model = regmodels.create_model("resnet8", survival_prob=1.0).train()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert regmodels.executed_fraction(model) == 1.0
    # A block that cannot skip does not count: there is nothing to account for.
    assert [u.training_steps for u in model.blocks] == [0, 0, 0]
    assert not any(u.skips_compute for u in model.blocks)


# torch.compile


def compiled_training_patterns(model: nn.Module, backend: str, steps: int) -> set[tuple[int, ...]]:
    """Which blocks ran in each of `steps` compiled training steps, checked against gradients."""
    compiled = torch.compile(model, backend=backend)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    units = regmodels.stochastic_depth_units(model)
    patterns = set()
    for step in range(1, steps + 1):
        before = [u.executed_steps for u in units]
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(compiled(x), y).backward()
        ran = [
            (u.executed_steps > b) if u.skips_compute else True
            for u, b in zip(units, before, strict=True)
        ]
        assert all(u.training_steps == step for u in units if u.skips_compute)
        patterns.add(tuple(int(r) for r in ran))
        # The gradients follow the decisions of this step, not those of the step that was traced.
        for unit, unit_ran in zip(units, ran, strict=True):
            assert (unit.branch.conv1.weight.grad is not None) == unit_ran
    return patterns


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_drop_decisions_still_vary_under_torch_compile(backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = regmodels.create_model("resnet8", survival_prob=0.5).train()

    patterns = compiled_training_patterns(model, backend, steps=12)

    # 3 blocks kept with 0.83, 0.67 and 0.5: 12 steps show several different patterns, where
    # a decision frozen into the graph would show one.
    assert len(patterns) >= 3


def test_compiled_evaluation_and_plain_training_keep_their_semantics() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = regmodels.create_model("resnet8", survival_prob=0.5)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)

    model.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)

    plain = regmodels.create_model("resnet8", survival_prob=1.0).train()
    assert compiled_training_patterns(plain, "aot_eager", steps=3) == {(1, 1, 1)}


@pytest.mark.parametrize(
    ("survival_prob", "mode", "most_graphs"),
    [(1.0, "batch", 1), (0.5, "sample", 1), (0.5, "batch", 12)],
)
def test_torch_compile_does_not_recompile_step_after_step(
    survival_prob: float, mode: str, most_graphs: int
) -> None:
    # Counters or probabilities read inside a graph would become guards that fail as the
    # values change, and the model would be recompiled every step until torch gives up.
    torch._dynamo.reset()
    torch.manual_seed(0)
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    model = regmodels.create_model("resnet20", survival_prob=survival_prob, drop_mode=mode)
    compiled = torch.compile(model.train(), backend=counting_backend)
    x = torch.randn(2, 3, 8, 8)
    after_step = []
    for _ in range(12):
        compiled(x).sum().backward()
        after_step.append(len(graphs))

    assert after_step[-1] <= most_graphs
    assert after_step[-1] == after_step[5]  # nothing new once each kind of block has been seen


def test_sample_mode_masks_vary_under_torch_compile() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    unit = StochasticDepth(Scale(1.0), survival_prob=0.5, mode="sample").train()
    compiled = torch.compile(unit, backend="aot_eager")
    x = torch.ones(64, 1)

    masks = [compiled(x)[:, 0] == 2.0 for _ in range(4)]

    assert all(0 < m.sum() < 64 for m in masks)
    assert len({tuple(m.tolist()) for m in masks}) == 4
