"""Trainables that end trials in a chosen way, for the outcome tests.

They take the same arguments as `sweeps.trainable.train_trial`, so `run_sweep(trainable=...)`
runs them through the same Tuner, scheduler and lineage callback as a real sweep. The tests
register this module with cloudpickle by value, so Ray workers need not import it.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray import tune

ERROR_MESSAGE = "deliberate failure after epoch 1 (tests.sweeps.failing_trainables)"
EPOCH_SECONDS = 0.2


def _metrics(epoch: int, val_acc: float) -> dict[str, float]:
    """A plausible per-epoch result with the keys the real trainable reports."""
    return {
        "epoch": float(epoch),
        "train_loss": 1.0 / epoch,
        "train_acc": val_acc,
        "val_loss": 1.0 / epoch,
        "val_acc": val_acc,
        "gen_gap": 0.0,
        "diverged": 0.0,
    }


def raising_trial(
    config: dict[str, Any], *, data_refs: list[ray.ObjectRef], settings: dict, threads: int
) -> None:
    """Report one epoch, then raise: the trial must end FAILED with outcome `error`."""
    tune.report(_metrics(1, 0.5))
    raise RuntimeError(ERROR_MESSAGE)


def fading_trial(
    config: dict[str, Any], *, data_refs: list[ray.ObjectRef], settings: dict, threads: int
) -> None:
    """Every epoch reports the same val_acc, lower the later the trial starts.

    Run one trial at a time under ASHA (grace period 1, reduction factor 2): the first trial
    meets empty rungs and runs every epoch; each later trial is below the rung's cutoff after
    its first epoch, so ASHA stops it there.
    """
    val_acc = 1.0 - time.time() / 1e10
    for epoch in range(1, int(settings["epochs"]) + 1):
        time.sleep(EPOCH_SECONDS)
        tune.report(_metrics(epoch, val_acc))
