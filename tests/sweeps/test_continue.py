"""A sweep continued by a later driver (`resume`, `extend`) stays one sweep in MLflow.

The refusals are checked against a SQLite store with hand-made sweep runs (they stop before Ray
starts). The integration tests interrupt real CLI sweeps, with SIGINT and with SIGKILL (a
crashed driver, which closes nothing), continue them with `resume` and `extend`, and read the
store back: one parent run, every trial in one child run with each epoch logged once, and no run
left RUNNING.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import statistics
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeps import tracking
from sweeps.launch import (
    PreflightError,
    _evaluated_trials,
    _searcher,
    extend_sweep,
    resume_sweep,
    run_sweep,
)
from sweeps.spec import SWEPT, SpecError
from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, ROLE_TAG
from tests.conftest import run_cli, small_spec_data
from tests.sweeps import failing_trainables
from tests.sweeps.cli_process import SweepCli
from tests.sweeps.test_outcomes import running_runs, sweep_runs, wait_for_running_child

EPOCHS = 10


# Refusals, before anything starts


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    """(client, uri, experiment id) of a fresh SQLite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, experiment_id = tracking.open_experiment(uri, "continued")
    return client, uri, experiment_id


def make_sweep_run(
    client: MlflowClient, experiment_id: str, status: str, tmp_path: Path, **tags: str
) -> str:
    """A sweep parent run as a driver leaves it, with its spec, in `status`."""
    run = client.create_run(experiment_id, tags={ROLE_TAG: "sweep", **tags})
    client.log_text(run.info.run_id, yaml.safe_dump(small_spec_data(tmp_path)), "spec.yaml")
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_resume_refuses_a_finished_sweep_and_points_to_extend(store, tmp_path: Path) -> None:
    client, uri, experiment_id = store
    run_id = make_sweep_run(client, experiment_id, "FINISHED", tmp_path)
    with pytest.raises(PreflightError, match=f"extend --run-id {run_id} --trials N"):
        resume_sweep(uri, run_id=run_id)


def test_resume_refuses_a_sweep_whose_driver_is_alive(store, tmp_path: Path) -> None:
    client, uri, experiment_id = store
    here = {tracking.DRIVER_HOST_TAG: socket.gethostname()}
    alive = make_sweep_run(
        client,
        experiment_id,
        "RUNNING",
        tmp_path,
        **here,
        **{tracking.DRIVER_PID_TAG: str(os.getpid())},
    )
    elsewhere = make_sweep_run(
        client, experiment_id, "RUNNING", tmp_path, **{tracking.DRIVER_HOST_TAG: "other-host"}
    )
    with pytest.raises(PreflightError, match=f"its driver \\(pid {os.getpid()}\\) is alive"):
        resume_sweep(uri, run_id=alive)
    with pytest.raises(PreflightError, match=r"'other-host'.*--force"):
        resume_sweep(uri, run_id=elsewhere)
    # Neither run was touched.
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"


def test_resume_refuses_a_sweep_without_tunes_state(store, tmp_path: Path) -> None:
    client, uri, experiment_id = store
    gone = str(tmp_path / "ray_results" / "gone")
    run_id = make_sweep_run(
        client, experiment_id, "KILLED", tmp_path, **{tracking.TUNE_PATH_TAG: gone}
    )
    with pytest.raises(PreflightError, match=r"no tuner\.pkl"):
        resume_sweep(uri, run_id=run_id)
    assert client.get_run(run_id).info.status == "KILLED"


def test_continuing_needs_a_sweep_parent_run(store, tmp_path: Path) -> None:
    client, uri, experiment_id = store
    parent = make_sweep_run(client, experiment_id, "KILLED", tmp_path)
    child = client.create_run(experiment_id, tags={PARENT_TAG: parent, ROLE_TAG: "trial"})
    with pytest.raises(PreflightError, match="not a sweep's parent run"):
        resume_sweep(uri, run_id=child.info.run_id)
    with pytest.raises(PreflightError, match=r"there is no run '0+'"):
        resume_sweep(uri, run_id="0" * 32)
    with pytest.raises(PreflightError, match=r"'nothing-here' .* has no sweep runs"):
        extend_sweep(uri, 2, experiment="nothing-here")


def test_a_deleted_experiment_is_named_as_deleted(store, tmp_path: Path) -> None:
    client, uri, experiment_id = store
    make_sweep_run(client, experiment_id, "KILLED", tmp_path)
    client.delete_experiment(experiment_id)
    with pytest.raises(PreflightError, match=r"experiment 'continued' at .* is deleted"):
        resume_sweep(uri, experiment="continued")


def test_extend_refuses_an_unfinished_sweep_and_a_bad_trial_count(store, tmp_path: Path) -> None:
    client, uri, experiment_id = store
    killed = make_sweep_run(client, experiment_id, "KILLED", tmp_path)
    with pytest.raises(PreflightError, match="is KILLED, not finished: resume it first"):
        extend_sweep(uri, 2, run_id=killed)
    # FAILED with trials unfinished (no trial runs here, 3 planned): resume it first too.
    failed = make_sweep_run(
        client, experiment_id, "FAILED", tmp_path, **{tracking.NUM_TRIALS_TAG: "3"}
    )
    with pytest.raises(PreflightError, match="is FAILED, not finished: resume it first"):
        extend_sweep(uri, 2, run_id=failed)
    running = make_sweep_run(client, experiment_id, "RUNNING", tmp_path)
    with pytest.raises(PreflightError, match="is RUNNING: wait for its driver to finish"):
        extend_sweep(uri, 2, run_id=running)
    finished = make_sweep_run(client, experiment_id, "FINISHED", tmp_path)
    with pytest.raises(SpecError, match=r"search\.num_trials"):
        extend_sweep(uri, 0, run_id=finished)


def test_the_cli_refuses_with_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    command = ["resume", "--experiment", "none", "--tracking-uri", f"sqlite:///{db}"]

    # No store at all: refused, and no empty SQLite file is left where the path was mistyped.
    done = run_cli(command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "error: preflight failed, nothing was started" in done.stderr
    assert "there is no MLflow store" in done.stderr
    assert "Traceback" not in done.stderr
    assert not db.exists()

    # A store without that sweep: refused, naming the experiment.
    MlflowClient(tracking_uri=f"sqlite:///{db}").create_experiment("none")
    done = run_cli(command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "'none'" in done.stderr and "has no sweep runs" in done.stderr
    assert "Traceback" not in done.stderr


# What the searcher of an extension starts from


def test_only_trials_that_trained_or_diverged_within_the_ranges_teach_the_searcher(
    make_spec,
) -> None:
    spec = make_spec()
    inside = {"dropout": 0.1, "weight_decay": 1e-4, "survival_prob": 0.8}

    def trial(outcome: str, val_acc: float = 0.9, **swept: float) -> tracking.AdoptedTrial:
        return tracking.AdoptedTrial("run", outcome, 3, {**inside, **swept}, val_acc)

    adopted = {
        "completed": trial("completed"),
        "stopped": trial("stopped_early", 0.5),
        "diverged": trial("diverged", 0.0),
        "error": trial("error"),
        "interrupted": trial("interrupted"),
        "no-metric": trial("completed", float("nan")),
        "outside": trial("completed", dropout=0.9),
    }
    evaluated = _evaluated_trials(spec, adopted)
    assert sorted(reward for _, reward in evaluated) == [0.0, 0.5, 0.9]
    assert all(values == inside for values, _ in evaluated)


def test_a_warm_started_searcher_proposes_where_earlier_trials_did_best(make_spec) -> None:
    spec = make_spec(search={"seed": 0, "n_startup_trials": 5})
    rng = random.Random(1)
    evaluated = []
    for _ in range(20):
        values = {
            "dropout": rng.uniform(0.0, 0.5),
            "weight_decay": 10 ** rng.uniform(-5, -2),
            "survival_prob": rng.uniform(0.5, 1.0),
        }
        evaluated.append((values, 1.0 - abs(values["dropout"] - 0.05)))  # best at dropout 0.05

    def distance(searcher) -> float:
        proposals = [searcher.suggest(f"t{i}")["dropout"] for i in range(12)]
        return statistics.mean(abs(d - 0.05) for d in proposals)

    warm, cold = distance(_searcher(spec, evaluated)), distance(_searcher(spec))
    assert warm < cold / 2, (warm, cold)


def test_an_extension_in_the_random_start_up_phase_does_not_replay_the_sweep(make_spec) -> None:
    # Fewer evaluated trials than n_startup_trials: the extension's TPE still draws at random.
    spec = make_spec(search={"seed": 7, "n_startup_trials": 6})
    sweep = _searcher(spec)
    first = [sweep.suggest(f"t{i}") for i in range(4)]
    evaluated = [(values, 0.9) for values in first]

    extension = _searcher(spec, evaluated, extension=1)
    proposals = [extension.suggest(f"e{i}") for i in range(4)]
    for values in proposals:
        assert values not in first, values


# Real sweeps, interrupted and continued


def interruptible_spec(work: Path) -> tuple[Path, str]:
    """A sweep of 3 trials, one at a time, long enough to be interrupted mid-trial."""
    data = small_spec_data(
        work,
        training={"epochs": EPOCHS},
        search={"num_trials": 3, "n_startup_trials": 3},
        scheduler={"name": "fifo"},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )
    spec_file = work / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    return spec_file, data["tracking"]["uri"]


def interrupt(spec_file: Path, uri: str, work: Path, signum: signal.Signals) -> str:
    """Run the sweep, send `signum` to the driver once a trial reported; the trial's run id."""
    with SweepCli(["run", str(spec_file)], work) as cli:
        interrupted = wait_for_running_child(uri, timeout=240, cli=cli)
        os.kill(cli.pid, signum)
        cli.wait(timeout=180)
    return interrupted


def assert_complete(uri: str, parent_id: str, trials: int) -> None:
    """One finished parent; `trials` children, each with every epoch logged exactly once."""
    client = MlflowClient(uri)
    parent, children = sweep_runs(uri, parent_id)
    assert parent.info.status == "FINISHED"
    assert len(children) == trials
    for child in children:
        assert (child.info.status, child.data.tags[OUTCOME_TAG]) == ("FINISHED", "completed")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "epoch")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), child.data.tags["trial_id"]
    assert parent.data.metrics["trials_completed"] == trials
    assert parent.data.metrics["trials_interrupted"] == 0
    assert running_runs(uri) == []


@pytest.mark.integration
def test_an_interrupted_sweep_resumes_then_extends_in_the_same_runs(tmp_path: Path) -> None:
    spec_file, uri = interruptible_spec(tmp_path)
    interrupted = interrupt(spec_file, uri, tmp_path, signal.SIGINT)
    client = MlflowClient(uri)
    parent_id = client.get_run(interrupted).data.tags[PARENT_TAG]
    assert client.get_run(parent_id).info.status == "KILLED"
    assert client.get_run(interrupted).info.status == "KILLED"

    # resume: the interrupted trial goes on in its own run, the rest are proposed and run.
    resumed = run_cli(["resume", str(spec_file)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming sweep run {parent_id} (KILLED)" in resumed.stdout
    assert "resumed after epoch" in resumed.stdout
    assert_complete(uri, parent_id, trials=3)
    assert client.get_run(interrupted).data.tags[OUTCOME_TAG] == "completed"
    parent = client.get_run(parent_id)
    assert parent.data.tags["best_run_id"] in {
        c.info.run_id for c in sweep_runs(uri, parent_id)[1]
    }
    assert "models:/test-sweep@best" in resumed.stdout

    again = run_cli(["resume", str(spec_file)], cwd=tmp_path)
    assert again.returncode == 2 and "nothing to resume" in again.stderr

    # extend: two more trials under the same parent, TPE warm-started by the three.
    extended = run_cli(["extend", str(spec_file), "--trials", "2"], cwd=tmp_path)
    assert extended.returncode == 0, extended.stdout[-3000:] + extended.stderr[-3000:]
    assert "TPE starts from 3 of its 3 trials" in extended.stdout
    assert_complete(uri, parent_id, trials=5)
    parent = client.get_run(parent_id)
    assert parent.data.tags["regsweep.extensions"] == "1"
    assert parent.data.tags[tracking.TUNE_PATH_TAG].endswith("-extend1")
    best_val_acc = parent.data.metrics["best_val_acc"]
    children = sweep_runs(uri, parent_id)[1]
    assert best_val_acc == max(c.data.metrics["val_acc"] for c in children)
    for child in children:
        for name in SWEPT:
            assert name in child.data.params
    proposals = {tuple(c.data.params[name] for name in SWEPT) for c in children}
    assert len(proposals) == len(children)
    assert "regsweep.extensions.1.seed" in parent.data.tags


@pytest.mark.integration
def test_a_sweep_in_which_no_trial_trained_is_extended_not_resumed(make_spec, ray_local) -> None:
    # Every trial raises: the sweep is FAILED with nothing left to run.
    spec = make_spec(search={"num_trials": 2, "n_startup_trials": 2}, scheduler={"name": "fifo"})
    failed = run_sweep(spec, trainable=failing_trainables.raising_trial)
    assert failed.status == "FAILED" and failed.outcomes["error"] == 2
    uri, parent_id = failed.tracking_uri, failed.parent_run_id

    # resume could only rerun nothing; it says so and points to extend and --retry-errored.
    with pytest.raises(PreflightError) as refused:
        resume_sweep(uri, run_id=parent_id)
    message = str(refused.value)
    assert "no trial left to run: all 2 ended (2 error) and none trained" in message
    assert f"extend --run-id {parent_id} --trials N" in message
    assert "--retry-errored" in message

    # extend adds trials to it; one that trains makes the sweep FINISHED.
    extended = extend_sweep(uri, 1, run_id=parent_id)
    assert extended.status == "FINISHED", extended
    assert extended.outcomes["completed"] + extended.outcomes["stopped_early"] == 1
    parent, children = sweep_runs(uri, parent_id)
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert parent.data.tags["best_run_id"] not in {
        c.info.run_id for c in children if c.data.tags[OUTCOME_TAG] == "error"
    }
    assert running_runs(uri) == []


@pytest.mark.integration
def test_a_crashed_driver_leaves_running_runs_that_resume_finishes(tmp_path: Path) -> None:
    spec_file, uri = interruptible_spec(tmp_path)
    interrupted = interrupt(spec_file, uri, tmp_path, signal.SIGKILL)
    client = MlflowClient(uri)
    parent_id = client.get_run(interrupted).data.tags[PARENT_TAG]
    # SIGKILL closes nothing: this is the state resume exists for.
    assert {parent_id, interrupted} <= set(running_runs(uri))

    resumed = run_cli(["resume", "--run-id", parent_id, "--tracking-uri", uri], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming sweep run {parent_id} (RUNNING)" in resumed.stdout
    assert_complete(uri, parent_id, trials=3)
