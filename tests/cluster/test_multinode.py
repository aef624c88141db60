"""A sweep on a Ray cluster of three nodes, on this one machine.

A head node and two worker nodes are started as separate `ray start` processes, with token
authentication as cluster.yaml starts them, and the sweep is submitted to the head the way a
job runs on the cluster (`python -m sweeps run SPEC --address HEAD`). Each worker advertises
one GPU and each trial asks for one, so the trials can only run on the workers; with no CUDA
here, `training.device: auto` trains on the CPU share Ray gives the trial.

Every process the test starts leads a session of its own and is stopped by session id, never
with `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from sweeps.launch import STORAGE_ENV
from tests.cluster.processes import stop_sessions
from tests.conftest import free_port, small_spec_data

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
NODE_MEMORY = str(100 * 1024 * 1024)  # object store bytes per node
STARTUP_S, SWEEP_S = 120, 300

# Run with the cluster's token: wait for `want` alive nodes, then print them as JSON.
_NODES = """
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([
    {"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
    for n in nodes
]))
"""


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    head_id: str
    worker_ids: set[str]
    node_ip: str


# Each node gets its own loopback address. Not 127.0.0.1: Ray replaces that one (and
# "localhost") with the machine's outward address, and these tests talk to loopback only.
HEAD_IP, WORKER_IPS = "127.0.0.2", ("127.0.0.3", "127.0.0.4")


def _ray_start(
    args: list[str], node_ip: str, temp_dir: str, env: dict[str, str]
) -> subprocess.Popen:
    command = [
        RAY, "start", "--block", "--node-ip-address", node_ip, "--temp-dir", temp_dir,
        "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0",
        "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--object-store-memory", NODE_MEMORY, *args,
    ]  # fmt: skip
    log = open(temp_dir + ".log", "w")  # noqa: SIM115 (the process keeps it)
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A token of our own, given explicitly: Ray would otherwise take ~/.ray/auth_token, or run
    # without authentication, depending on what else ran on this machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.pop(STORAGE_ENV, None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Short: Ray's unix socket paths live under the temp dir and must stay under 108 bytes.
    base = tempfile.mkdtemp(prefix="rsw", dir="/tmp")
    port = free_port()
    address = f"{HEAD_IP}:{port}"

    # The head, like cluster.yaml's: no CPU and no GPU, so no trial can run on it.
    head = ["--head", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0"]
    started = [_ray_start([*head, "--include-dashboard", "false"], HEAD_IP, f"{base}/h", env)]
    try:
        # Two workers with one GPU-unit each.
        for i in range(2):
            started.append(
                _ray_start(
                    ["--address", address, "--num-cpus", "1", "--num-gpus", "1"],
                    WORKER_IPS[i],
                    f"{base}/w{i}",
                    env,
                )
            )
        out = subprocess.run(
            [sys.executable, "-c", _NODES, address, "3", str(STARTUP_S)],
            env=env,
            capture_output=True,
            text=True,
            timeout=STARTUP_S + 60,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(nodes) == 3, f"{len(nodes)} of 3 nodes came up:\n{_logs(base)}"
        heads = [n for n in nodes if "node:__internal_head__" in n["resources"]]
        workers = [n for n in nodes if n["resources"].get("GPU") == 1.0]
        assert len(heads) == 1 and len(workers) == 2, nodes
        # Every node is on its own loopback address, none on the machine's outward one.
        assert heads[0]["ip"] == HEAD_IP, nodes
        assert {n["ip"] for n in workers} == set(WORKER_IPS), nodes
        yield Cluster(address, env, heads[0]["id"], {n["id"] for n in workers}, HEAD_IP)
    finally:
        left = stop_sessions(started)
        shutil.rmtree(base, ignore_errors=True)
        assert left == [], f"Ray processes this test started are still running: {left}"


def _logs(base: str) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
        for log in sorted(Path(base).glob("*.log"))
    )


def _submit(cluster: Cluster, spec: dict[str, Any], workdir: Path) -> subprocess.CompletedProcess:
    """`python -m sweeps run SPEC --address HEAD`, as the job's entrypoint runs on the head."""
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeps", "run", str(path), "--address", cluster.address],
        env=cluster.env,
        cwd=workdir,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = proc.communicate(timeout=SWEEP_S)
    except subprocess.TimeoutExpired:
        stop_sessions([proc])
        stdout, stderr = proc.communicate()
        pytest.fail(f"the sweep ran over {SWEEP_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        stop_sessions([proc])
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_a_sweep_runs_its_trials_on_the_worker_nodes(cluster, tmp_path):
    spec = small_spec_data(
        tmp_path,
        search={"num_trials": 2, "seed": 0, "n_startup_trials": 2},
        scheduler={"name": "fifo"},
        resources={"cpus_per_trial": 1, "gpus_per_trial": 1, "max_concurrent_trials": 2},
        storage={"path": str(tmp_path / "ray_results"), "shared": True},
    )
    done = _submit(cluster, spec, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    # The data was staged once, in the driver.
    assert done.stdout.count("staged once in the driver") == 1, done.stdout

    # Every result reached the head's tracking store: one sweep run, one child per trial.
    client = mlflow.MlflowClient(spec["tracking"]["uri"])
    experiment = client.get_experiment_by_name(spec["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("regsweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2
    epochs = spec["training"]["epochs"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["outcome"] == "completed"
        assert {"dropout", "weight_decay", "survival_prob"} <= set(child.data.params)
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        loads = client.get_metric_history(child.info.run_id, "data_loads_in_worker")
        assert loads and all(m.value == 0 for m in loads), "a trial loaded the dataset itself"

    # The trials ran on the workers, one on each (each has one GPU-unit), never on the head.
    where = [child.data.tags["node_id"] for child in children]
    assert set(where) <= cluster.worker_ids, (where, cluster.worker_ids)
    assert cluster.head_id not in where
    assert set(where) == cluster.worker_ids, "both trials ran on one worker"
    assert {child.data.tags["node_ip"] for child in children} == set(WORKER_IPS)
    assert {child.data.tags["device"] for child in children} == {"cpu"}  # no CUDA here

    # Tune wrote each trial's checkpoints to the declared shared storage.
    checkpoints = list((tmp_path / "ray_results").glob("*/*/checkpoint_*"))
    assert len({c.parent for c in checkpoints}) == 2, checkpoints


def test_a_head_only_storage_path_is_refused_before_anything_starts(cluster, tmp_path):
    spec = small_spec_data(
        tmp_path,
        resources={"cpus_per_trial": 1, "gpus_per_trial": 1, "max_concurrent_trials": 2},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "refused"},
    )
    assert "shared" not in spec["storage"]
    refused = _submit(cluster, spec, tmp_path)

    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    message = refused.stderr
    assert "preflight failed, nothing was started" in message
    assert "storage.path" in message and str(tmp_path / "ray_results") in message
    assert "3 nodes" in message and "storage.shared: true" in message
    assert "staged" not in refused.stdout

    # Not one run was opened.
    client = mlflow.MlflowClient(spec["tracking"]["uri"])
    experiment = client.get_experiment_by_name("refused")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_the_cluster_refuses_a_client_without_its_token(cluster, tmp_path):
    # The same client as the fixture's, with another token: the head must turn it away.
    env = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    log = tmp_path / "client.log"
    with log.open("w") as out:
        client = subprocess.Popen(
            [sys.executable, "-c", _NODES, cluster.address, "3", "5"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    try:
        while client.poll() is None and time.monotonic() < deadline:
            if "Unauthenticated" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
    finally:
        stop_sessions([client])
    text = log.read_text(errors="replace")
    assert "Unauthenticated" in text and "InvalidAuthToken" in text, text[-3000:]
    assert '"id"' not in text, "a client with the wrong token listed the nodes"
