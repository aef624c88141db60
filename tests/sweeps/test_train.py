"""One trial in plain torch: divergence is an outcome, recognised before the loss overflows."""

from __future__ import annotations

import math

import pytest

from sweeps.data import stage_dataset
from sweeps.spec import DatasetSpec
from sweeps.train import DIVERGED_LOSS_FACTOR, TrialConfig, is_diverged, run_trial


@pytest.fixture(scope="module")
def digits():
    return stage_dataset(DatasetSpec(name="digits"))


@pytest.mark.parametrize(
    ("loss", "diverged"),
    [
        (math.nan, True),
        (math.inf, True),
        (DIVERGED_LOSS_FACTOR * math.log(10) * 1.01, True),
        (1e15, True),
        (DIVERGED_LOSS_FACTOR * math.log(10) * 0.99, False),
        (2.3, False),  # a uniform guess over 10 classes: fails to learn, not diverged
        (0.01, False),
    ],
)
def test_divergence_is_a_non_finite_loss_or_one_far_above_a_uniform_guess(
    loss: float, diverged: bool
) -> None:
    assert is_diverged(loss, num_classes=10) is diverged


def test_more_classes_allow_a_proportionally_larger_loss() -> None:
    loss = DIVERGED_LOSS_FACTOR * math.log(10) * 1.5
    assert is_diverged(loss, num_classes=10)
    assert not is_diverged(loss, num_classes=100)


def trial(digits, **settings) -> list[dict[str, float]]:
    cfg = TrialConfig(
        dropout=0.1,
        weight_decay=1e-4,
        survival_prob=0.8,
        model="resnet8",
        batch_size=128,
        lr_schedule="constant",
        **settings,
    )
    reported: list[dict[str, float]] = []
    run_trial(cfg, digits, lambda metrics, state: reported.append(metrics))
    return reported


def test_a_blown_up_trial_ends_as_diverged_while_its_loss_is_still_finite(digits) -> None:
    # lr 10 with heavy momentum: the loss is in the hundreds after one epoch, not yet inf.
    reported = trial(digits, epochs=4, lr=10.0, momentum=0.99)

    last = reported[-1]
    assert last["diverged"] == 1.0
    assert math.isfinite(last["train_loss"])
    assert last["val_acc"] == 0.0 and math.isnan(last["val_loss"])
    assert len(reported) < 4  # the trial stops at the epoch it diverged
    assert all(m["diverged"] == 0.0 for m in reported[:-1])


def test_a_healthy_trial_is_not_diverged(digits) -> None:
    reported = trial(digits, epochs=2, lr=0.1)

    assert [m["diverged"] for m in reported] == [0.0, 0.0]
    assert reported[-1]["val_acc"] > 0.5
    assert [m["epoch"] for m in reported] == [1.0, 2.0]
