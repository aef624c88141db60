"""Preflight of the resources a trial needs, on a local Ray the CLI starts itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, small_spec_data

pytestmark = pytest.mark.integration


def test_a_trial_that_cannot_fit_a_local_ray_is_refused_before_any_run(tmp_path: Path) -> None:
    data = small_spec_data(tmp_path, resources={"gpus_per_trial": 1})
    spec_path = tmp_path / "gpu.yaml"
    spec_path.write_text(yaml.safe_dump(data))

    done = run_cli(["run", str(spec_path)], cwd=tmp_path)

    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "'GPU': 1.0" in done.stderr and "gpus_per_trial" in done.stderr
    assert "staged" not in done.stdout
    client = MlflowClient(data["tracking"]["uri"])
    experiment = client.get_experiment_by_name(data["tracking"]["experiment"])
    assert client.search_runs([experiment.experiment_id]) == []
    assert not any((tmp_path / "ray_results").glob("*/*"))


def test_a_dataset_that_is_not_there_exits_2_with_the_fix_and_no_run(tmp_path: Path) -> None:
    data = small_spec_data(
        tmp_path, dataset={"name": "cifar10", "root": str(tmp_path / "empty"), "download": False}
    )
    spec_path = tmp_path / "cifar.yaml"
    spec_path.write_text(yaml.safe_dump(data))

    done = run_cli(["run", str(spec_path)], cwd=tmp_path)

    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dataset could not be staged" in done.stderr
    assert str(tmp_path / "empty") in done.stderr and "download" in done.stderr
    assert "Traceback" not in done.stderr
    client = MlflowClient(data["tracking"]["uri"])
    experiment = client.get_experiment_by_name(data["tracking"]["experiment"])
    assert client.search_runs([experiment.experiment_id]) == []
