"""Analysis reads a real MLflow store (SQLite) written the way the lineage callback writes it."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from sweeps import analysis
from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, ROLE_TAG
from tests.conftest import REPO, run_cli


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


@pytest.mark.parametrize("chosen", ["r1", "r2", "r3"])
def test_the_trial_whose_model_was_logged_leads_its_ties(chosen: str) -> None:
    frame = pd.DataFrame(
        {
            "run_id": ["r1", "r2", "r3", "r4"],
            "trial_id": ["t1", "t2", "t3", "t4"],
            "val_acc": [0.9, 0.95, 0.95, math.nan],
        }
    )
    order = list(analysis.best_trials(frame, top=4, best_run_id=chosen)["trial_id"])
    if chosen == "r1":  # not among the top ties: the order is by val_acc alone, stably
        assert order == ["t2", "t3", "t1", "t4"]
    else:
        assert order[0] == "t" + chosen[1] and set(order[:2]) == {"t2", "t3"}
        assert order[2:] == ["t1", "t4"]


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


@pytest.mark.parametrize("name", ["trials.png", "trials"])
def test_plot_writes_a_png_and_returns_its_path(store, tmp_path: Path, name: str) -> None:
    _, parent_id, _ = store
    path = analysis.plot_trials(analysis.trials_frame(parent_id), tmp_path / name)
    assert path == tmp_path / "trials.png"
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_ui_command_for_file_and_server_stores() -> None:
    assert "--backend-store-uri sqlite:///x.db --host 127.0.0.1" in analysis.ui_command(
        "sqlite:///x.db"
    )
    assert "http://127.0.0.1:5000" in analysis.ui_command("http://127.0.0.1:5000")


def test_ui_command_runs_the_mlflow_beside_this_python_without_an_activated_venv() -> None:
    # This test's own interpreter: from the repository root the command names a script that
    # exists (the venv's mlflow, relative when the venv is inside the repository).
    words = shlex.split(analysis.ui_command("sqlite:///mlflow.db", cwd=REPO))
    script = Path(sys.executable).parent / "mlflow"
    if script.is_file():
        assert (REPO / words[0]).resolve() == script.resolve()
        assert not Path(words[0]).is_absolute() or not script.is_relative_to(REPO)
    else:
        assert words[:3] == [sys.executable, "-m", "mlflow"]
    expected = "ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"
    assert words[-7:] == expected.split()


def test_ui_command_is_relative_below_cwd_absolute_elsewhere_and_falls_back_to_python_m(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    uri = "sqlite:///mlflow.db"

    # No mlflow script beside the interpreter: run MLflow as a module of that interpreter.
    assert analysis.ui_command(uri, cwd=tmp_path).startswith(f"{bin_dir / 'python'} -m mlflow ui")

    (bin_dir / "mlflow").write_text("#!/bin/sh\n")
    assert analysis.ui_command(uri, cwd=tmp_path).startswith("venv/bin/mlflow ui ")
    assert analysis.ui_command(uri, cwd=bin_dir).startswith("./mlflow ui ")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert analysis.ui_command(uri, cwd=elsewhere).startswith(f"{bin_dir / 'mlflow'} ui ")

    # A path with a space is quoted so that the command still runs as printed.
    spaced = tmp_path / "my venv" / "bin"
    spaced.mkdir(parents=True)
    (spaced / "mlflow").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(spaced / "python"))
    assert shlex.split(analysis.ui_command(uri, cwd=elsewhere))[0] == str(spaced / "mlflow")


@pytest.mark.parametrize(
    ("params", "requested", "expected"),
    [
        (
            {"scheduler.name": "asha", "scheduler.grace_period": "2", "training.epochs": "9"},
            None,
            2,
        ),
        (
            {"scheduler.name": "fifo", "scheduler.grace_period": "2", "training.epochs": "9"},
            None,
            9,
        ),
        ({"scheduler": "fifo", "scheduler.grace_period": "3", "training.epochs": "5"}, None, 5),
        ({"scheduler.name": "fifo", "training.epochs": "9"}, 4, 4),
        ({}, None, 1),
    ],
)
def test_comparison_epoch_is_asha_first_rung_or_fifo_final_epoch(
    params: dict[str, str], requested: int | None, expected: int
) -> None:
    epoch, why = analysis.comparison_epoch(params, requested)
    assert epoch == expected
    assert why


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


@pytest.mark.parametrize("epoch", ["0", "-3"])
def test_report_refuses_an_epoch_below_1(store, tmp_path: Path, epoch: str) -> None:
    uri, _, _ = store
    done = run_cli(["report", "--tracking-uri", uri, "--epoch", epoch], tmp_path)

    assert done.returncode == 2
    assert f"--epoch {epoch}: give an epoch >= 1" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_report_at_an_epoch_no_trial_reached_says_how_far_they_got(store, tmp_path: Path) -> None:
    uri, parent_id, trials = store
    done = run_cli(["report", "--tracking-uri", uri, "--epoch", "999"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert f"sweep run {parent_id}: {len(trials)} trials" in done.stdout
    assert "no trial reached epoch 999 (the trials reached epochs 2 to 4)" in done.stdout
    comparison = done.stdout.split("Comparing trials at epoch 999: the epoch requested\n", 1)[1]
    assert comparison.startswith("no trial reached epoch 999")
    assert "Spearman" not in comparison and "fANOVA" not in comparison
    assert "NaN" not in comparison


def test_report_of_a_fifo_sweep_compares_at_the_final_epoch(store, tmp_path: Path) -> None:
    uri, parent_id, _ = store
    client = MlflowClient(uri)
    client.log_param(parent_id, "scheduler.name", "fifo")
    client.log_param(parent_id, "training.epochs", "4")
    done = run_cli(["report", "--tracking-uri", uri], tmp_path)

    assert done.returncode == 0, done.stderr
    assert "Comparing trials at epoch 4: the final epoch (training.epochs)" in done.stdout
    assert "FIFO" in done.stdout
    assert "At epoch 4, over the 4 trials that reached it" in done.stdout


def test_report_of_an_asha_sweep_says_it_compares_at_the_first_rung(store, tmp_path: Path) -> None:
    uri, _, _ = store
    done = run_cli(["report", "--tracking-uri", uri, "--top", "2"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert "Comparing trials at epoch 2: ASHA's first rung (scheduler.grace_period)" in done.stdout
    assert len(done.stdout.split("\n\n")[0].splitlines()) == 1 + 1 + 2  # title, header, 2 rows
    ui = shlex.split(done.stdout.split("Open the UI: ", 1)[1].splitlines()[0])
    assert ui[ui.index("ui") :][:3] == ["ui", "--backend-store-uri", uri]


def test_report_with_a_plot_in_a_missing_folder_exits_2_before_reading(tmp_path: Path) -> None:
    # The store does not exist either: the option is checked before the store is opened.
    target = tmp_path / "no" / "such" / "dir" / "x.png"
    done = run_cli(
        ["report", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}", "--plot", str(target)],
        tmp_path,
    )

    assert done.returncode == 2
    assert f"--plot {target}: the folder {target.parent} does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert not target.parent.exists()


def test_report_with_a_plot_format_matplotlib_cannot_write_exits_2_before_reading(
    tmp_path: Path,
) -> None:
    target = tmp_path / "trials.txt"
    done = run_cli(
        ["report", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}", "--plot", str(target)],
        tmp_path,
    )

    assert done.returncode == 2
    assert "matplotlib cannot write '.txt' files" in done.stderr and ".png" in done.stderr
    assert "Traceback" not in done.stderr
    assert not target.exists() and not (tmp_path / "typo.db").exists()


def test_the_printed_cli_command_runs_with_this_python(tmp_path: Path) -> None:
    words = shlex.split(analysis.sweeps_command(cwd=tmp_path))
    assert words[1:] == ["-m", "sweeps"]
    assert Path(words[0]).is_absolute() or (tmp_path / words[0]).exists()
    done = subprocess.run([*words, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "resume" in done.stdout


def test_report_says_why_it_skips_fanova_for_fewer_than_4_trials(store, tmp_path: Path) -> None:
    uri, parent_id, _ = store
    client = MlflowClient(uri)
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
    )
    reached_4 = [c for c in children if c.data.tags[OUTCOME_TAG] == "completed"]
    for child in reached_4[:2]:
        client.delete_run(child.info.run_id)
    done = run_cli(["report", "--tracking-uri", uri, "--epoch", "4"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert "At epoch 4, over the 2 trials that reached it" in done.stdout
    assert "fANOVA importance skipped: it needs at least 4 trials at epoch 4, 2 reached it" in (
        done.stdout
    )
