"""Shared fixtures: small digits specs, a local Ray cluster, isolated MLflow stores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sweeps.spec import SweepSpec, parse_spec

REPO = Path(__file__).resolve().parent.parent

# The tests never read the user's own tracking store.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
# Single-node Ray in these tests listens on loopback only (set before Ray is imported; the
# multi-node tests give each node its own 127.0.0.x address instead).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m sweeps ARGS` in `cwd`, as a user runs it; output captured as text.

    MLFLOW_TRACKING_URI and RAY_ADDRESS are not passed on: `mlflow.set_tracking_uri` in an
    earlier test sets the variable in this process, and it would override the spec's store.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", "sweeps", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_spec_data(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A fast digits sweep (ResNet-8, 2 epochs, 3 trials) storing everything under tmp_path."""
    data: dict[str, Any] = {
        "name": "test-sweep",
        "dataset": {"name": "digits", "augment": {"crop_padding": 1}},
        "model": {"name": "resnet8"},
        "training": {"epochs": 2, "batch_size": 128, "lr": 0.1, "lr_schedule": "constant"},
        "search": {"num_trials": 3, "seed": 0, "n_startup_trials": 3},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test"},
        "storage": {"path": str(tmp_path / "ray_results")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks() -> Iterator[None]:
    """Undo `mlflow.set_tracking_uri` after each test.

    MLflow also writes the URI to $MLFLOW_TRACKING_URI, which outranks a spec's tracking.uri,
    so one test's store would otherwise become the store of every later sweep in the session.
    """
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _no_signal_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no signal noted by sweeps.interrupts, and leaves none behind.

    A test that signals its own process (SIGTERM to an in-process sweep) would otherwise make
    every later in-process sweep stop before its first trial.
    """
    from sweeps import interrupts

    fresh = {"_received": None, "_record_closed": False, "_closer": None, "_farewell": ""}
    for name, value in fresh.items():
        monkeypatch.setattr(interrupts, name, value)
    monkeypatch.setattr(interrupts, "_first_note", interrupts._first_note)


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., SweepSpec]:
    """make_spec(training={"epochs": 3}, ...) -> a validated small SweepSpec under tmp_path."""

    def make(**sections: dict[str, Any]) -> SweepSpec:
        return parse_spec(small_spec_data(tmp_path, **sections))

    return make


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the session (4 logical CPUs so that 2-3 trials run at once).

    run_sweep sees Ray already initialized and neither starts nor stops it.
    """
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
