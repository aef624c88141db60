"""The preflight, the lineage callback and the clean-up, against real MLflow stores.

The callback is driven with real (stub) Tune Trial objects and a real SQLite store; the
preflight is also run through the CLI, as a user meets it, to show exit code 2 and that nothing
was started.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from sweeps import tracking
from sweeps.spec import SWEPT
from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, ROLE_TAG, TrackingError, TrialLineage
from tests.conftest import free_port, small_spec_data
from tests.sweeps.cli_process import SweepCli

EPOCHS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating its schema takes seconds, so do it once."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


# The preflight


def test_preflight_creates_the_experiment_once_and_proves_it_writable(store: str) -> None:
    client, first = tracking.open_experiment(store, "created-once")
    _, second = tracking.open_experiment(store, "created-once")
    assert first == second
    experiment = client.get_experiment(first)
    assert experiment.name == "created-once"
    assert int(experiment.tags["regsweep.last_preflight"]) <= time.time()


def test_preflight_refuses_a_deleted_experiment(store: str) -> None:
    client, experiment_id = tracking.open_experiment(store, "gone")
    client.delete_experiment(experiment_id)
    with pytest.raises(TrackingError, match=r"'gone' at .* is deleted"):
        tracking.open_experiment(store, "gone")


def test_a_driver_that_loses_the_race_to_create_the_experiment_uses_the_winners(
    store: str,
) -> None:
    # Both drivers found no experiment; the other one created it first. Replay our create.
    client = MlflowClient(store)
    winner = client.create_experiment("raced")
    assert tracking._create_experiment(client, store, "raced") == winner


def test_the_read_only_preflight_leaves_a_new_sqlite_store_uncreated(tmp_path: Path) -> None:
    tracking.check_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "sweeps")
    assert list(tmp_path.iterdir()) == []  # neither the store nor the probe file


def test_the_read_only_preflight_refuses_a_deleted_experiment_and_writes_nothing(
    store: str,
) -> None:
    client, experiment_id = tracking.open_experiment(store, "gone-before-check")
    client.delete_experiment(experiment_id)
    before = Path(store.removeprefix("sqlite:///")).stat().st_mtime_ns
    with pytest.raises(TrackingError, match="is deleted"):
        tracking.check_store(store, "gone-before-check")
    assert Path(store.removeprefix("sqlite:///")).stat().st_mtime_ns == before


@pytest.mark.parametrize("check", [tracking.check_store, tracking.open_experiment])
def test_a_sqlite_store_that_cannot_be_written_is_refused_in_seconds(check) -> None:
    # MLflow alone retries a file it cannot create for about two minutes.
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"'sqlite:////proc/mlflow.db' cannot be used"):
        check("sqlite:////proc/mlflow.db", "sweeps")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "mlruns", "bogus"])
def test_a_file_store_is_refused_with_what_to_use_instead(uri: str) -> None:
    with pytest.raises(TrackingError, match=r"sqlite:///mlflow\.db") as refused:
        tracking.check_store(uri, "sweeps")
    assert repr(uri) in str(refused.value)


def _open_in_another_process(uri: str) -> str:
    return tracking.open_experiment(uri, "created-together")[1]


def test_drivers_creating_one_new_sqlite_store_together_all_succeed(tmp_path: Path) -> None:
    # Without taking turns, one of them fails in MLflow's schema migration.
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        ids = pool.map(_open_in_another_process, [uri] * 3)
    assert len(set(ids)) == 1
    names = [e.name for e in MlflowClient(uri).search_experiments()]
    assert names.count("created-together") == 1


def test_preflight_against_a_closed_port_fails_in_seconds_naming_the_uri() -> None:
    # MLflow's defaults retry a refused connection for minutes; the preflight must not.
    uri = f"http://127.0.0.1:{free_port()}"
    before = {k: os.environ.get(k) for k in os.environ if k.startswith("MLFLOW_HTTP")}
    started = time.monotonic()
    with pytest.raises(TrackingError) as refused:
        tracking.open_experiment(uri, "sweeps")
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert uri in message
    assert "not reachable" in message
    assert "--tracking-uri" in message
    # The short timeouts were for the preflight only.
    assert {k: os.environ.get(k) for k in os.environ if k.startswith("MLFLOW_HTTP")} == before


def test_preflight_names_an_unknown_scheme() -> None:
    with pytest.raises(TrackingError, match="'nosuch://store'"):
        tracking.open_experiment("nosuch://store", "sweeps")


def refused_uri(tmp_path: Path, kind: str) -> str:
    if kind == "closed-port":
        return f"http://127.0.0.1:{free_port()}"
    # A SQLite file below a regular file: no one, not even root, can create it.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return f"sqlite:///{blocker / 'mlflow.db'}"


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["closed-port", "unwritable-sqlite"])
def test_cli_stops_in_preflight_with_exit_2_and_starts_nothing(tmp_path: Path, kind: str) -> None:
    uri = refused_uri(tmp_path, kind)
    data = small_spec_data(tmp_path)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))

    started = time.monotonic()
    with SweepCli(["run", str(spec_file), "--tracking-uri", uri], tmp_path) as cli:
        returncode = cli.wait(timeout=300)
        output = cli.output()
        started_ray = cli.started_ray()
    seconds = time.monotonic() - started

    assert returncode == 2, output[-3000:]
    assert "error: preflight failed, nothing was started" in output
    assert repr(uri) in output
    assert "Traceback" not in output
    # Generous for a loaded machine, yet far below MLflow's minutes of retries.
    assert seconds < 90
    assert not started_ray
    assert not Path(data["storage"]["path"]).exists()


# The lineage callback


@pytest.fixture
def lineage(store: str) -> TrialLineage:
    """A callback for a fresh sweep parent run in the module's store."""
    client, experiment_id = tracking.open_experiment(store, "lineage")
    parent = client.create_run(experiment_id, tags={ROLE_TAG: "sweep"})
    return TrialLineage(
        client,
        experiment_id,
        parent.info.run_id,
        sweep="lineage-test",
        fixed_params={"model": "resnet8", "epochs": EPOCHS},
        swept=SWEPT,
        epochs=EPOCHS,
        num_trials=4,
    )


def new_trial(dropout: float = 0.1) -> Trial:
    config = {"dropout": dropout, "weight_decay": 1e-4, "survival_prob": 0.8}
    return Trial("train_trial", config=config, stub=True)


def epoch_result(epoch: int, training_iteration: int | None = None, **values: float) -> dict:
    return {
        "epoch": float(epoch),
        "training_iteration": training_iteration or epoch,
        "val_acc": 0.5 + 0.1 * epoch,
        "train_loss": 1.0 / epoch,
        "diverged": 0.0,
        "node_ip": "10.0.0.7",
        "hostname": "worker-7",
        "device": "cpu",
        "trial_id": "not a number",
        "done": False,
        **values,
    }


def run_trial(lineage: TrialLineage, trial: Trial, results: list[dict]) -> str:
    lineage.on_trial_start(0, [trial], trial)
    for result in results:
        lineage.on_trial_result(0, [trial], trial, result)
    return lineage.run_ids[trial.trial_id]


def test_a_trial_becomes_a_nested_run_with_params_tags_and_epoch_steps(
    lineage: TrialLineage,
) -> None:
    trial = new_trial(dropout=0.25)
    run_id = run_trial(lineage, trial, [epoch_result(1), epoch_result(2)])
    run = lineage.client.get_run(run_id)

    assert run.info.status == "RUNNING"
    assert run.data.tags[PARENT_TAG] == lineage.parent_run_id
    assert run.data.tags["trial_id"] == trial.trial_id
    assert run.data.tags["node_ip"] == "10.0.0.7"
    assert run.data.tags["hostname"] == "worker-7"
    assert run.data.params["dropout"] == "0.25"
    assert run.data.params["model"] == "resnet8"
    assert run.data.params["epochs"] == str(EPOCHS)
    history = lineage.client.get_metric_history(run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.6), (2, 0.7)]
    # Strings, booleans and Tune's bookkeeping are not metrics.
    assert not {"node_ip", "trial_id", "done", "training_iteration"} & set(run.data.metrics)


def test_steps_follow_the_epoch_not_tunes_iteration_count(lineage: TrialLineage) -> None:
    # A trial restored from its epoch-2 checkpoint: Tune counts iterations anew, epochs go on.
    trial = new_trial()
    run_id = run_trial(lineage, trial, [epoch_result(3, training_iteration=1)])
    steps = [m.step for m in lineage.client.get_metric_history(run_id, "val_acc")]
    assert steps == [3]


@pytest.mark.parametrize(
    ("results", "stopping", "outcome", "status"),
    [
        ([epoch_result(e) for e in range(1, EPOCHS + 1)], None, "completed", "FINISHED"),
        ([epoch_result(1)], None, "stopped_early", "FINISHED"),
        (
            [epoch_result(1), epoch_result(2, diverged=1.0, train_loss=math.nan)],
            None,
            "diverged",
            "FAILED",
        ),
        ([epoch_result(1)], "SIGINT", "interrupted", "KILLED"),
        ([epoch_result(e) for e in range(1, EPOCHS + 1)], "SIGINT", "completed", "FINISHED"),
    ],
    ids=["completed", "stopped-early", "diverged", "ended-after-a-signal", "done-before-signal"],
)
def test_a_completed_trial_gets_the_outcome_of_how_far_it_got(
    lineage: TrialLineage, results: list[dict], stopping: str | None, outcome: str, status: str
) -> None:
    trial = new_trial()
    run_id = run_trial(lineage, trial, results)
    lineage.stopping = stopping
    lineage.on_trial_complete(0, [trial], trial)

    run = lineage.client.get_run(run_id)
    assert run.data.tags[OUTCOME_TAG] == outcome
    assert run.info.status == status
    assert lineage.counts()[outcome] == 1
    losses = [m.value for m in lineage.client.get_metric_history(run_id, "train_loss")]
    assert len(losses) == len(results)


def test_a_failed_trial_is_error_or_interrupted_during_a_stop(lineage: TrialLineage) -> None:
    failed, during_stop = new_trial(), new_trial()
    failed_id = run_trial(lineage, failed, [epoch_result(1)])
    stop_id = run_trial(lineage, during_stop, [epoch_result(1)])

    lineage.on_trial_error(0, [failed], failed)
    lineage.stopping = "SIGTERM"
    lineage.on_trial_error(0, [during_stop], during_stop)

    failed_run = lineage.client.get_run(failed_id)
    assert (failed_run.info.status, failed_run.data.tags[OUTCOME_TAG]) == ("FAILED", "error")
    assert failed_run.data.tags["error"]  # Tune's error text, or a placeholder when it has none
    stopped_run = lineage.client.get_run(stop_id)
    assert (stopped_run.info.status, stopped_run.data.tags[OUTCOME_TAG]) == (
        "KILLED",
        "interrupted",
    )


def test_a_trial_ends_once_whatever_tune_reports_after(lineage: TrialLineage) -> None:
    trial = new_trial()
    run_id = run_trial(lineage, trial, [epoch_result(1)])
    lineage.on_trial_complete(0, [trial], trial)
    lineage.on_trial_error(0, [trial], trial)
    assert lineage.client.get_run(run_id).data.tags[OUTCOME_TAG] == "stopped_early"
    assert sum(lineage.counts().values()) == 1


def test_close_open_and_close_stale_runs_leave_nothing_running(lineage: TrialLineage) -> None:
    client = lineage.client
    ended, left_open = new_trial(), new_trial()
    ended_id = run_trial(lineage, ended, [epoch_result(e) for e in range(1, EPOCHS + 1)])
    lineage.on_trial_complete(0, [ended], ended)
    open_id = run_trial(lineage, left_open, [epoch_result(1)])
    # A child the callback never knew of (say, created just before the driver was killed)...
    stray = client.create_run(lineage.experiment_id, tags={PARENT_TAG: lineage.parent_run_id})
    # ...and a run of another sweep, which is not ours to close.
    other = client.create_run(lineage.experiment_id, tags={PARENT_TAG: "another-sweep"})

    assert lineage.close_open("interrupted") == 1
    assert tracking.close_stale_runs(client, lineage.experiment_id, lineage.parent_run_id) == 1

    def state(run_id: str) -> tuple[str, str | None]:
        run = client.get_run(run_id)
        return run.info.status, run.data.tags.get(OUTCOME_TAG)

    assert state(ended_id) == ("FINISHED", "completed")
    assert state(open_id) == ("KILLED", "interrupted")
    assert state(stray.info.run_id) == ("KILLED", "interrupted")
    assert state(other.info.run_id) == ("RUNNING", None)
    assert lineage.counts()["interrupted"] == 1


def test_closing_never_raises_when_the_store_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The clean-up runs in `finally` blocks: a dead server must not hide the original error.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(f"http://127.0.0.1:{free_port()}")
    tracking.end_run(client, "0" * 32, "KILLED")
    assert tracking.close_stale_runs(client, "1", "0" * 32) == 0
    tracking.log_summary(client, "0" * 32, {"trials_completed": 1})


# A sweep continued by a later driver


def test_an_adopted_interrupted_trial_goes_on_in_its_own_run(lineage: TrialLineage) -> None:
    # The first driver: two epochs of one trial, then an interrupt.
    trial = new_trial()
    run_id = run_trial(lineage, trial, [epoch_result(1), epoch_result(2)])
    lineage.close_open("interrupted")
    assert lineage.client.get_run(run_id).info.status == "KILLED"

    # The resuming driver adopts the run from the store and Tune restarts the trial, which
    # reports epoch 2 again (its checkpoint was older) and then goes on.
    later = TrialLineage(
        lineage.client,
        lineage.experiment_id,
        lineage.parent_run_id,
        sweep="lineage-test",
        fixed_params={},
        swept=SWEPT,
        epochs=EPOCHS,
        num_trials=4,
    )
    adopted = tracking.trial_runs(
        lineage.client, lineage.experiment_id, lineage.parent_run_id, SWEPT
    )
    assert adopted[trial.trial_id].outcome == "interrupted"
    assert adopted[trial.trial_id].epochs == 2
    assert adopted[trial.trial_id].swept == {
        "dropout": 0.1,
        "weight_decay": 1e-4,
        "survival_prob": 0.8,
    }
    later.adopt(adopted)
    assert later.counts()["interrupted"] == 1

    later.on_trial_start(0, [trial], trial)
    run = lineage.client.get_run(run_id)
    assert (run.info.status, run.data.tags[OUTCOME_TAG]) == ("RUNNING", "running")
    for epoch in (2, 3):
        later.on_trial_result(0, [trial], trial, epoch_result(epoch, val_acc=0.9))
    later.on_trial_complete(0, [trial], trial)

    run = lineage.client.get_run(run_id)
    assert (run.info.status, run.data.tags[OUTCOME_TAG]) == ("FINISHED", "completed")
    history = sorted(
        (m.step, m.value) for m in lineage.client.get_metric_history(run_id, "val_acc")
    )
    assert history == [(1, 0.6), (2, 0.7), (3, 0.9)]  # epoch 2 kept once, as first logged
    assert later.counts() == {**dict.fromkeys(tracking.OUTCOME_STATUS, 0), "completed": 1}


def test_a_retried_error_loses_its_old_error_tag(lineage: TrialLineage) -> None:
    trial = new_trial()
    run_id = run_trial(lineage, trial, [epoch_result(1)])
    lineage.on_trial_error(0, [trial], trial)
    assert "error" in lineage.client.get_run(run_id).data.tags

    lineage.on_trial_start(0, [trial], trial)  # Tune retries it (resume --retry-errored)
    for epoch in range(2, EPOCHS + 1):
        lineage.on_trial_result(0, [trial], trial, epoch_result(epoch))
    lineage.on_trial_complete(0, [trial], trial)

    run = lineage.client.get_run(run_id)
    assert (run.info.status, run.data.tags[OUTCOME_TAG]) == ("FINISHED", "completed")
    assert "error" not in run.data.tags


def test_the_relay_reaches_the_active_lineage_even_after_pickling(lineage: TrialLineage) -> None:
    import cloudpickle

    relay = lineage.relay()
    restored = cloudpickle.loads(cloudpickle.dumps(relay))  # as Tune keeps its callbacks
    assert vars(restored) == {"parent_run_id": lineage.parent_run_id}

    trial = new_trial()
    restored.on_trial_start(iteration=0, trials=[trial], trial=trial)
    restored.on_trial_result(iteration=0, trials=[trial], trial=trial, result=epoch_result(1))
    run_id = lineage.run_ids[trial.trial_id]
    assert [m.step for m in lineage.client.get_metric_history(run_id, "val_acc")] == [1]

    lineage.release()
    restored.on_trial_complete(iteration=0, trials=[trial], trial=trial)  # nobody listens now
    assert trial.trial_id not in lineage.outcomes
