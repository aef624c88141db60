"""Analysis reads a real MLflow store (SQLite) written the way the lineage callback writes it."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from sweeps import analysis
from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, ROLE_TAG
from tests.conftest import run_cli


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, str, list[dict]]:
    """A sweep of 8 trials whose val_acc rises with survival_prob and falls with dropout."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("analysis")
    parent = client.create_run(experiment_id, tags={ROLE_TAG: "sweep"})
    client.log_param(parent.info.run_id, "scheduler.grace_period", "2")
    rng = np.random.default_rng(0)
    trials = []
    for i in range(8):
        swept = {
            "dropout": float(rng.uniform(0, 0.5)),
            "weight_decay": float(10 ** rng.uniform(-5, -2)),
            "survival_prob": float(rng.uniform(0.5, 1.0)),
        }
        epochs = 4 if i % 2 == 0 else 2
        run = client.create_run(
            experiment_id,
            tags={PARENT_TAG: parent.info.run_id, "trial_id": f"t{i}", ROLE_TAG: "trial"},
        )
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in swept.items()])
        now = int(time.time() * 1000)
        for epoch in range(1, epochs + 1):
            val = 0.5 + 0.4 * swept["survival_prob"] - 0.2 * swept["dropout"] + 0.01 * epoch
            client.log_batch(
                run.info.run_id,
                metrics=[
                    Metric("val_acc", val, now, epoch),
                    Metric("train_acc", val + 0.05, now, epoch),
                    Metric("gen_gap", 0.05, now, epoch),
                    Metric("epoch", epoch, now, epoch),
                ],
            )
        outcome = "completed" if epochs == 4 else "stopped_early"
        client.set_tag(run.info.run_id, OUTCOME_TAG, outcome)
        client.set_terminated(run.info.run_id, "FINISHED")
        trials.append({**swept, "epochs": epochs, "val_acc": val, "outcome": outcome})
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri, parent.info.run_id, trials


def test_trials_frame_has_one_row_per_trial_with_final_metrics(store) -> None:
    _, parent_id, trials = store
    frame = analysis.trials_frame(parent_id)
    assert len(frame) == len(trials)
    by_id = frame.set_index("trial_id")
    for i, trial in enumerate(trials):
        row = by_id.loc[f"t{i}"]
        assert row["epochs"] == trial["epochs"]
        assert row["val_acc"] == pytest.approx(trial["val_acc"])
        assert row["dropout"] == pytest.approx(trial["dropout"])
        assert row["outcome"] == trial["outcome"]


def test_best_trials_are_sorted_by_val_acc(store) -> None:
    _, parent_id, trials = store
    best = analysis.best_trials(analysis.trials_frame(parent_id), top=3)
    assert list(best["val_acc"]) == sorted((t["val_acc"] for t in trials), reverse=True)[:3]


def test_latest_sweep_run_id_finds_the_parent(store) -> None:
    uri, parent_id, _ = store
    assert analysis.latest_sweep_run_id(uri, "analysis") == parent_id
    with pytest.raises(LookupError, match="no sweep runs"):
        analysis.latest_sweep_run_id(uri, "Default")


def test_effects_at_a_common_epoch_find_the_planted_signs(store) -> None:
    _, parent_id, trials = store
    compared = analysis.at_epoch(analysis.trials_frame(parent_id), 2)
    assert len(compared) == len(trials)  # every trial reached epoch 2
    effects = analysis.effects(compared).set_index("param")
    assert effects.loc["survival_prob", "corr_val_acc"] > 0.5
    assert effects.loc["dropout", "corr_val_acc"] < 0
    assert (effects["n"] == len(trials)).all()
    importance = analysis.importance(compared)
    assert math.isclose(importance.sum(), 1.0, rel_tol=1e-6)
    assert importance.idxmax() == "survival_prob"


def test_plot_writes_a_png(store, tmp_path: Path) -> None:
    _, parent_id, _ = store
    path = analysis.plot_trials(analysis.trials_frame(parent_id), tmp_path / "trials.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_ui_command_for_file_and_server_stores() -> None:
    assert "--backend-store-uri sqlite:///x.db" in analysis.ui_command("sqlite:///x.db")
    assert "http://127.0.0.1:5000" in analysis.ui_command("http://127.0.0.1:5000")


def test_report_without_a_spec_reads_the_latest_sweep_in_the_store(store, tmp_path: Path) -> None:
    uri, parent_id, trials = store
    done = run_cli(["report", "--tracking-uri", uri, "--plot", str(tmp_path / "p.png")], tmp_path)

    assert done.returncode == 0, done.stderr
    assert f"sweep run {parent_id}: {len(trials)} trials" in done.stdout
    assert "At epoch 2, over the 8 trials that reached it" in done.stdout
    assert (tmp_path / "p.png").stat().st_size > 0


def test_report_on_a_missing_store_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    done = run_cli(["report", "--tracking-uri", f"sqlite:///{missing}"], tmp_path)

    assert done.returncode == 2
    assert f"there is no MLflow store at sqlite:///{missing}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not missing.exists()
