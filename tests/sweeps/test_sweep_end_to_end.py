"""The embedded digits sweep, run as a user runs it (smoke size), checked in its MLflow store."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from sweeps.spec import SWEPT, load_spec
from sweeps.train import EPOCH_METRICS
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeps",
            "run",
            str(REPO / "sweeps/specs/digits.yaml"),
            "--smoke-test",
            "--tracking-uri",
            uri,
            "--storage-path",
            str(work / "results"),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return {"done": done, "uri": uri, "work": work}


def test_cli_finishes_and_prints_the_table_and_ui_command(smoke_run: dict) -> None:
    done = smoke_run["done"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "Best trials (final epoch, read back from MLflow)" in out
    for column in ("dropout", "weight_decay", "survival_prob", "val_acc", "outcome"):
        assert column in out
    assert "test_acc" in out
    assert f"--backend-store-uri {smoke_run['uri']}" in out
    assert "models:/digits-resnet20@best" in out


@pytest.mark.parametrize(
    "noise",
    [
        "Configuration for experiment",  # Tune's box
        "tensorboard --logdir",  # Tune's hint
        "A new study created",  # Optuna
        "Creating initial MLflow database tables",  # MLflow, on a new store
        "Token authentication is enabled",  # Ray
    ],
)
def test_the_output_is_regsweeps_not_the_libraries_start_up_lines(
    smoke_run: dict, noise: str
) -> None:
    done = smoke_run["done"]
    assert done.returncode == 0
    assert noise not in done.stdout + done.stderr


def test_store_has_one_parent_and_one_terminal_child_per_trial(smoke_run: dict) -> None:
    spec = load_spec(REPO / "sweeps/specs/digits.yaml").smoke()
    client = MlflowClient(smoke_run["uri"])
    experiment = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([experiment.experiment_id])

    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert len(children) == spec.search.num_trials
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}

    # The parent holds the spec, the searcher settings, versions and the commit.
    assert parent.data.params["search.seed"] == str(spec.search.seed)
    assert parent.data.params["searcher"] == "optuna.TPESampler"
    assert "git_commit" in parent.data.tags and "version.ray" in parent.data.tags
    assert 0.0 <= parent.data.metrics["best_test_acc"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "spec_file"} <= artifacts

    for child in children:
        assert child.info.status in ("FINISHED", "FAILED", "KILLED")
        assert child.data.tags["outcome"] in ("completed", "stopped_early")
        for name in SWEPT:
            value = float(child.data.params[name])
            low = getattr(spec.search.space, name).low
            high = getattr(spec.search.space, name).high
            assert low <= value <= high
        # All three regularizers were active.
        assert float(child.data.params["dropout"]) > 0
        assert float(child.data.params["weight_decay"]) > 0
        assert float(child.data.params["survival_prob"]) < 1

        epochs = int(child.data.metrics["epoch"])
        assert 1 <= epochs <= spec.training.epochs
        for key in EPOCH_METRICS:
            history = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in history] == list(range(1, epochs + 1)), key
        assert 0.0 < child.data.metrics["executed_fraction"] <= 1.0
        assert child.data.metrics["data_loads_in_worker"] == 0


def test_no_run_is_left_running(smoke_run: dict) -> None:
    client = MlflowClient(smoke_run["uri"])
    running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="attributes.status = 'RUNNING'",
    )
    assert running == []
