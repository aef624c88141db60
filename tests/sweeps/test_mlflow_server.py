"""A sweep against a real `mlflow server`, read back over HTTP as a user reads it.

The module starts `python -m sweeps server` (SQLite backend, served artifacts, both under a
temporary directory) on a free loopback port, runs a smoke sweep against it on local Ray and
checks the record run by run against what Tune itself wrote to the storage path.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests
import torch
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from sweeps import tracking
from sweeps.data import DeviceSplit, stage_dataset
from sweeps.launch import SweepResult, run_sweep
from sweeps.spec import SWEPT, SweepSpec, parse_spec
from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, ROLE_TAG
from sweeps.train import EPOCH_METRICS, evaluate, is_diverged
from tests.conftest import REPO, free_port, run_cli, small_spec_data
from tests.sweeps.cli_process import SweepCli
from tests.sweeps.test_outcomes import wait_for_running_child

pytestmark = pytest.mark.integration

SERVER_START_TIMEOUT_S = 180  # two busy cores: importing the server alone can take 30 s


def start_server(work: Path, port: int) -> subprocess.Popen:
    """`python -m sweeps server` on `port` with its store under `work`, once it answers."""
    log_path = work / "server.log"
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "sweeps", "server"),
                *("--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"),
                *("--artifacts-destination", str(work / "artifacts")),
                *("--port", str(port), "--workers", "1"),
            ],
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited ({process.returncode}):\n{log_path.read_text()}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_process_group(process)
            pytest.fail(f"mlflow server not up in {SERVER_START_TIMEOUT_S} s")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a fresh MLflow server; stopped by its process group when the module ends."""
    port = free_port()
    process = start_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@dataclass
class Sweep:
    spec: SweepSpec
    result: SweepResult
    client: MlflowClient
    parent: Run
    children: list[Run]
    tune_records: dict[str, list[dict]]  # trial_id -> Tune's own per-epoch results


def read_sweep(url: str, spec: SweepSpec, result: SweepResult) -> Sweep:
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    children = [r for r in runs if PARENT_TAG in r.data.tags]

    # What Tune wrote for each trial: one JSON line per reported epoch.
    experiment_dir = Path(result.storage_path) / f"{spec.name}-{result.parent_run_id[:8]}"
    records: dict[str, list[dict]] = {}
    for path in experiment_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            records[lines[0]["trial_id"]] = lines
    return Sweep(spec, result, client, parents[0], children, records)


@pytest.fixture(scope="module")
def sweep(server: str, ray_local, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """A smoke sweep (3 trials of ResNet-8, 2 epochs, ASHA) tracked by the server."""
    work = tmp_path_factory.mktemp("served-sweep")
    data = small_spec_data(work, tracking={"uri": server, "experiment": "served"})
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    spec = parse_spec(data)
    result = run_sweep(spec, spec_path=str(spec_path))
    return read_sweep(server, spec, result)


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_one_parent_with_the_spec_versions_and_outcome_counts(sweep: Sweep) -> None:
    parent, spec = sweep.parent, sweep.spec
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[ROLE_TAG] == "sweep"
    assert parent.data.params["search.seed"] == str(spec.search.seed)
    assert parent.data.params["scheduler"] == "asha"
    assert parent.data.params["model.name"] == "resnet8"
    # The commit of the checkout the code ran from, wherever the driver's working dir was.
    commit = parent.data.tags["git_commit"]
    if (REPO / ".git").exists():
        assert re.fullmatch("[0-9a-f]{40}", commit), commit
    assert parent.data.tags["version.mlflow"] == mlflow.__version__

    # The spec went to the server's artifact store, both as parsed and as the file given.
    artifacts = {a.path for a in sweep.client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "spec_file"} <= artifacts
    path = sweep.client.download_artifacts(parent.info.run_id, "spec_file/spec.yaml")
    assert yaml.safe_load(Path(path).read_text())["tracking"]["experiment"] == "served"

    # Counts by outcome agree with the children's own tags.
    outcomes = [c.data.tags[OUTCOME_TAG] for c in sweep.children]
    for outcome in ("completed", "stopped_early", "diverged", "error", "interrupted"):
        assert parent.data.metrics[f"trials_{outcome}"] == outcomes.count(outcome), outcome
        assert sweep.result.outcomes[outcome] == outcomes.count(outcome)


def test_nested_children_mirror_what_tune_recorded(sweep: Sweep) -> None:
    spec, client = sweep.spec, sweep.client
    assert len(sweep.children) == spec.search.num_trials
    assert set(sweep.tune_records) == {c.data.tags["trial_id"] for c in sweep.children}

    for child in sweep.children:
        tags, params = child.data.tags, child.data.params
        records = sweep.tune_records[tags["trial_id"]]
        assert tags[PARENT_TAG] == sweep.parent.info.run_id
        assert tags[ROLE_TAG] == "trial"
        for key in ("node_ip", "node_id", "hostname", "device"):
            assert tags[key] == str(records[0][key]), key

        # Swept values exactly as Tune ran them, fixed settings beside them.
        for name in SWEPT:
            assert params[name] == str(records[0]["config"][name]), name
        assert params["model"] == "resnet8"
        assert params["epochs"] == str(spec.training.epochs)
        assert params["trial_id"] == tags["trial_id"]

        # One point per completed epoch, step = epoch, values equal to Tune's.
        epochs = len(records)
        for key in EPOCH_METRICS:
            history = metric_history(client, child.info.run_id, key)
            assert [step for step, _ in history] == list(range(1, epochs + 1)), key
            assert [v for _, v in history] == [float(r[key]) for r in records], key

        # Terminal status and outcome from how far the trial got.
        assert child.info.status == "FINISHED"
        expected = "completed" if epochs == spec.training.epochs else "stopped_early"
        assert tags[OUTCOME_TAG] == expected


def test_best_model_loads_and_scores_the_reported_val_acc(sweep: Sweep) -> None:
    best, parent, client = sweep.result.best, sweep.parent, sweep.client

    # The best trial is the child with the highest final val_acc.
    final = {
        c.info.run_id: metric_history(client, c.info.run_id, "val_acc")[-1][1]
        for c in sweep.children
    }
    assert parent.data.tags["best_run_id"] == best["run_id"]
    assert final[best["run_id"]] == max(final.values())
    reported = final[best["run_id"]]

    # Both URIs load the same weights, which score what the trial reported.
    data = stage_dataset(sweep.spec.dataset)
    val = DeviceSplit(data.val, data, torch.device("cpu"))
    mlflow.set_tracking_uri(sweep.result.tracking_uri)
    torch.set_num_threads(1)  # as in the trial: one CPU, one thread
    for uri in (best["model_uri"], f"models:/{sweep.spec.name}@best"):
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
        _, val_acc = evaluate(model, val)
        assert val_acc == reported, uri
    assert parent.data.metrics["best_val_acc"] == reported

    # Registered under the sweep's name, from this sweep's parent run.
    version = client.get_model_version_by_alias(sweep.spec.name, "best")
    assert version.run_id == parent.info.run_id
    assert "best_test_acc" in parent.data.metrics


def test_ui_and_rest_search_answer_for_the_sweep(server: str, sweep: Sweep) -> None:
    # The UI page.
    page = requests.get(f"{server}/", timeout=30)
    assert page.status_code == 200
    assert "<html" in page.text.lower()

    # The REST search a script or the UI uses returns exactly the sweep's runs.
    experiment_id = sweep.parent.info.experiment_id
    response = requests.post(
        f"{server}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "max_results": 100},
        timeout=30,
    )
    assert response.status_code == 200
    found = {r["info"]["run_id"] for r in response.json()["runs"]}
    expected = {sweep.parent.info.run_id} | {c.info.run_id for c in sweep.children}
    assert found == expected

    # Through an SSH tunnel the browser says localhost:<its own port>; that is accepted, while
    # a foreign Host header (DNS rebinding) is still refused.
    get = f"{server}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
    assert requests.get(get, headers={"Host": "localhost:8080"}, timeout=30).status_code == 200
    assert requests.get(get, headers={"Host": "evil.example"}, timeout=30).status_code == 403


def test_a_driver_that_loses_the_race_to_create_the_experiment_uses_the_winners(
    server: str,
) -> None:
    # Two drivers both find no experiment "raced"; the first creates it. The second's create
    # is refused by the server (RESOURCE_ALREADY_EXISTS over REST) and must take the
    # winner's experiment rather than fail. The second driver's step is replayed here.
    client = MlflowClient(server)
    winner = client.create_experiment("raced")
    assert tracking._create_experiment(client, server, "raced") == winner
    assert tracking.open_experiment(server, "raced")[1] == winner


def test_diverged_trial_is_recorded_with_nan_over_http(server: str, ray_local, tmp_path) -> None:
    # lr 10 with weight decay 1 (coupled) multiplies the weights by about -9 each step: the
    # loss blows up before the 3 epochs are done. The diverged epoch's val_loss is NaN, and the
    # NaN must survive the REST round trip.
    data = small_spec_data(
        tmp_path,
        training={"epochs": 3, "lr": 10.0},
        search={
            "num_trials": 1,
            "n_startup_trials": 1,
            "space": {"weight_decay": {"low": 1.0, "high": 1.0}},
        },
        scheduler={"name": "fifo"},
        tracking={"uri": server, "experiment": "served-diverged"},
    )
    spec = parse_spec(data)
    result = run_sweep(spec)
    sweep = read_sweep(server, spec, result)

    [child] = sweep.children
    assert child.info.status == "FAILED"
    assert child.data.tags[OUTCOME_TAG] == "diverged"
    assert result.outcomes["diverged"] == 1
    assert sweep.parent.data.metrics["trials_diverged"] == 1
    assert sweep.parent.info.status == "FAILED"  # no trial of the sweep trained

    losses = metric_history(sweep.client, child.info.run_id, "train_loss")
    val_losses = metric_history(sweep.client, child.info.run_id, "val_loss")
    diverged = metric_history(sweep.client, child.info.run_id, "diverged")
    assert [step for step, _ in losses] == list(range(1, len(losses) + 1))
    assert len(losses) < spec.training.epochs
    assert is_diverged(losses[-1][1], num_classes=10)
    assert all(not is_diverged(value, num_classes=10) for _, value in losses[:-1])
    assert math.isnan(val_losses[-1][1])
    assert diverged[-1] == (len(losses), 1.0)

    # A diverged network is no candidate for the best model.
    assert result.best == {}
    assert "best_run_id" not in sweep.parent.data.tags
    running = sweep.client.search_runs(
        [child.info.experiment_id], filter_string="attributes.status = 'RUNNING'"
    )
    assert list(running) == []


def test_a_server_lost_mid_sweep_stops_it_in_seconds_and_resume_finishes_it(
    tmp_path: Path,
) -> None:
    # MLflow's own retries kept the driver in one request for 4 minutes, deaf to Ctrl-C.
    port, epochs = free_port(), 12
    url = f"http://127.0.0.1:{port}"
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    data = small_spec_data(
        tmp_path,
        training={"epochs": epochs},
        search={"num_trials": 2, "n_startup_trials": 2},
        scheduler={"name": "fifo"},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
        tracking={"uri": url, "experiment": "lost"},
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))

    process = start_server(server_dir, port)
    try:
        with SweepCli(["run", str(spec_file)], tmp_path) as cli:
            wait_for_running_child(url, timeout=240, cli=cli)
            stop_process_group(process)
            lost_at = time.monotonic()
            returncode = cli.wait(timeout=240)
            seconds = time.monotonic() - lost_at
            output = cli.output()
        assert returncode == 1, output[-4000:]
        assert "stopped answering while trials ran" in output
        assert "Traceback" not in output
        assert seconds < 120, output[-4000:]

        # The store answers again: the printed command finishes the sweep in the same runs.
        process = start_server(server_dir, port)
        done = run_cli(["resume", "--tracking-uri", url], cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("lost")
        runs = client.search_runs([experiment.experiment_id])
        assert [r.info.status for r in runs if PARENT_TAG not in r.data.tags] == ["FINISHED"]
        children = [r for r in runs if PARENT_TAG in r.data.tags]
        assert len(children) == 2
        for child in children:
            assert child.info.status == "FINISHED"
            steps = [step for step, _ in metric_history(client, child.info.run_id, "val_acc")]
            assert steps == list(range(1, epochs + 1))
    finally:
        stop_process_group(process)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend-store-uri", "bogus://x"], "is not a database URI"),
        (["--backend-store-uri", "sqlite:///no/such/folder/m.db"], "does not exist"),
        (["--port", "70000"], "1..65535"),
        (["--workers", "0"], ">= 1"),
    ],
)
def test_server_refuses_bad_options_with_exit_2(tmp_path: Path, args, message) -> None:
    done = run_cli(["server", *args], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_server_refuses_a_port_in_use_with_exit_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(["server", "--port", str(port)], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot listen at 127.0.0.1:{port}" in done.stderr
    assert list(tmp_path.iterdir()) == []
