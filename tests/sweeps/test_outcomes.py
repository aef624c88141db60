"""Every way a trial can end leaves its MLflow run in the terminal status the README promises.

Each test forces one outcome through a real sweep (local Ray, OptunaSearch, ASHA, the lineage
callback, an MLflow SQLite store) and reads the store back. The SIGINT test runs the CLI as a
user does, in its own process group, and sends the signal to the driver alone. The diverged
outcome is tested in test_mlflow_server.py, against a server, where NaN metrics cross HTTP.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from sweeps.interrupts import STOP_GRACE_ENV
from sweeps.launch import run_sweep
from sweeps.tracking import OUTCOME_TAG, PARENT_TAG
from tests.conftest import small_spec_data
from tests.sweeps import failing_trainables
from tests.sweeps.cli_process import SweepCli

pytestmark = pytest.mark.integration

# Ray workers get the helper trainables by value: they need not import the tests package.
cloudpickle.register_pickle_by_value(failing_trainables)


def sweep_runs(uri: str, parent_run_id: str) -> tuple[Run, list[Run]]:
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    )
    return parent, list(children)


def running_runs(uri: str) -> list[str]:
    """Ids of every run in the whole store still RUNNING."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")
    return [r.info.run_id for r in runs]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    points = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def test_raising_trial_is_failed_with_outcome_error_and_its_message(make_spec, ray_local) -> None:
    spec = make_spec(search={"num_trials": 2, "n_startup_trials": 2}, scheduler={"name": "fifo"})
    result = run_sweep(spec, trainable=failing_trainables.raising_trial)

    parent, children = sweep_runs(result.tracking_uri, result.parent_run_id)
    assert len(children) == 2
    client = MlflowClient(result.tracking_uri)
    for child in children:
        assert child.info.status == "FAILED"
        assert child.data.tags[OUTCOME_TAG] == "error"
        assert failing_trainables.ERROR_MESSAGE in child.data.tags["error"]
        assert "RuntimeError" in child.data.tags["error"]
        error_file = client.download_artifacts(child.info.run_id, "error.txt")
        assert failing_trainables.ERROR_MESSAGE in Path(error_file).read_text()
        # The epoch reported before the failure is kept.
        assert history(result.tracking_uri, child.info.run_id, "val_acc") == [(1, 0.5)]
    assert result.outcomes["error"] == 2
    assert parent.data.metrics["trials_error"] == 2
    # No trial trained: the sweep itself failed.
    assert result.status == "FAILED"
    assert parent.info.status == "FAILED"
    assert result.best == {}
    assert running_runs(result.tracking_uri) == []


def test_asha_stopped_trials_are_finished_with_outcome_stopped_early(make_spec, ray_local) -> None:
    # One trial at a time, each scoring below every earlier one: ASHA lets the first run all
    # 3 epochs and stops each later trial at its first rung (epoch 1).
    epochs = 3
    spec = make_spec(
        training={"epochs": epochs},
        search={"num_trials": 3, "n_startup_trials": 3},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )
    result = run_sweep(spec, trainable=failing_trainables.fading_trial)

    parent, children = sweep_runs(result.tracking_uri, result.parent_run_id)
    assert len(children) == 3
    by_outcome: dict[str, list[Run]] = {}
    for child in children:
        by_outcome.setdefault(child.data.tags[OUTCOME_TAG], []).append(child)
        assert child.info.status == "FINISHED"
        steps = [s for s, _ in history(result.tracking_uri, child.info.run_id, "val_acc")]
        expected = epochs if child.data.tags[OUTCOME_TAG] == "completed" else 1
        assert steps == list(range(1, expected + 1)), child.data.tags[OUTCOME_TAG]
    assert sorted(by_outcome) == ["completed", "stopped_early"]
    assert len(by_outcome["completed"]) == 1
    assert len(by_outcome["stopped_early"]) == 2
    assert result.outcomes["stopped_early"] == 2
    assert parent.data.metrics["trials_stopped_early"] == 2
    assert parent.data.metrics["trials_completed"] == 1
    assert running_runs(result.tracking_uri) == []


def wait_for_running_child(uri: str, timeout: float, cli: SweepCli | None = None) -> str:
    """Wait until a trial's run exists and has reported an epoch; return its run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cli is not None:
            assert cli.running(), (
                "the sweep ended before it could be interrupted:\n" + (cli.output()[-3000:])
            )
        try:
            client = MlflowClient(uri)
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(
                experiments,
                filter_string="attributes.status = 'RUNNING' and metrics.epoch >= 1",
            )
            children = [r for r in runs if PARENT_TAG in r.data.tags]
            if children:
                return children[0].info.run_id
        except Exception:  # the store may not exist yet, or be locked for a moment
            pass
        time.sleep(1.0)
    raise AssertionError(f"no trial reported an epoch within {timeout} s")


def long_sweep(epochs: int) -> dict[str, dict]:
    """Spec sections of trials long enough (`epochs`) for a signal to arrive mid-trial."""
    return {
        "training": {"epochs": epochs},
        "search": {"num_trials": 3, "n_startup_trials": 3},
        "scheduler": {"name": "fifo"},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 1},
    }


def assert_interrupted(uri: str, interrupted_id: str, epochs: int, context: str = "") -> None:
    """The parent and every child KILLED as interrupted, none ran to the end, none RUNNING."""
    client = MlflowClient(uri)
    interrupted = client.get_run(interrupted_id)
    parent, children = sweep_runs(uri, interrupted.data.tags[PARENT_TAG])
    assert parent.info.status == "KILLED", context
    assert interrupted.info.status == "KILLED"
    assert interrupted.data.tags[OUTCOME_TAG] == "interrupted"
    assert 1 <= len(children) < 3  # the sweep stopped before every trial ran
    for child in children:
        assert len(history(uri, child.info.run_id, "epoch")) < epochs, "a trial finished"
        assert child.info.status == "KILLED"
        assert child.data.tags[OUTCOME_TAG] == "interrupted"
    assert parent.data.metrics["trials_interrupted"] == len(children)
    assert "best_run_id" not in parent.data.tags  # no best model from an interrupted sweep
    assert running_runs(uri) == []


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_sigint_to_the_cli_exits_130_and_kills_every_run(tmp_path: Path, signals: int) -> None:
    # Twice: the second signal lands while Tune stops or while the runs are being closed.
    epochs = 40
    data = small_spec_data(tmp_path, **long_sweep(epochs))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    uri = data["tracking"]["uri"]

    with SweepCli(["run", str(spec_file)], tmp_path) as cli:
        interrupted_id = wait_for_running_child(uri, timeout=240, cli=cli)
        for _ in range(signals):
            os.kill(cli.pid, signal.SIGINT)  # the driver only, not its process group
            time.sleep(0.3)
        returncode = cli.wait(timeout=180)
        output = cli.output()
    assert returncode == 130, output[-4000:]
    assert "interrupted (SIGINT)" in output
    assert "Continue it: " in output and " -m sweeps resume --run-id " in output
    assert "Tuner.restore" not in output  # Tune's own hint would leave the MLflow runs behind
    assert_interrupted(uri, interrupted_id, epochs, output[-4000:])


def test_sigterm_to_the_driver_kills_every_run(make_spec, ray_local) -> None:
    # In process: a watcher thread sends SIGTERM to this process once a trial has reported an
    # epoch, which is while tuner.fit() runs with the sweep's handler installed.
    epochs = 40
    spec = make_spec(**long_sweep(epochs))
    uri = spec.tracking.uri
    seen: list[str] = []

    def send_sigterm() -> None:
        seen.append(wait_for_running_child(uri, timeout=240))
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=send_sigterm, daemon=True)
    watcher.start()
    result = run_sweep(spec)
    watcher.join(timeout=10)

    assert result.status == "KILLED"
    assert result.best == {}
    assert seen, "the watcher never saw a running trial"
    assert_interrupted(uri, seen[0], epochs)


def test_sigterm_to_the_whole_process_group_still_kills_every_run(tmp_path: Path) -> None:
    # `timeout` and some job runners signal the group: the local Ray dies with the driver,
    # Tune can no longer stop, and the watchdog closes the record after its grace period.
    epochs = 40
    data = small_spec_data(tmp_path, **long_sweep(epochs))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    uri = data["tracking"]["uri"]

    with SweepCli(["run", str(spec_file)], tmp_path, {STOP_GRACE_ENV: "8"}) as cli:
        interrupted_id = wait_for_running_child(uri, timeout=240, cli=cli)
        os.killpg(cli.pid, signal.SIGTERM)  # the group this test started, Ray included
        returncode = cli.wait(timeout=120)
        output = cli.output()
    assert returncode == 130, output[-4000:]
    assert "received SIGTERM" in output
    assert_interrupted(uri, interrupted_id, epochs, output[-4000:])


def test_a_signal_before_any_trial_starts_exits_130_and_records_nothing(tmp_path: Path) -> None:
    data = small_spec_data(tmp_path)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))

    with SweepCli(["run", str(spec_file)], tmp_path) as cli:
        # While Python imports Ray and MLflow: a signal there used to vanish or crash.
        time.sleep(1.0)
        os.kill(cli.pid, signal.SIGINT)
        returncode = cli.wait(timeout=120)
        output = cli.output()
    assert returncode == 130, output[-4000:]
    assert "Traceback" not in output
    assert "nothing was recorded" in output
    assert not (tmp_path / "mlflow.db").exists()
