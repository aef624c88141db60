"""A sweep of concurrent trials on (fake) CIFAR-10 loads the data exactly once, in the driver.

The loads are counted, not inferred: `sweeps.data.loads_in_process()` in the driver (this test's
process), and in every trial the `data_loads_in_worker` metric it reports each epoch, read back
from the sweep's MLflow store. Any download attempt is counted too, and fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from torchvision.datasets import cifar as tv_cifar

from sweeps.data import loads_in_process, stage_dataset
from sweeps.launch import run_sweep
from sweeps.spec import SweepSpec
from tests.fake_cifar import trust, write_fake_cifar

pytestmark = pytest.mark.integration

TRIALS = 3


def test_concurrent_trials_share_one_load_and_the_cache_is_reused(
    ray_local: None,
    make_spec: Callable[..., SweepSpec],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "data"
    fake = write_fake_cifar(root, "cifar10", train=600, test=100, seed=3)
    trust(monkeypatch, fake)
    downloads: list[str] = []

    def no_download(url: str, *args: object, **kwargs: object) -> None:
        downloads.append(url)
        raise OSError("no network in tests")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_download)

    spec = make_spec(
        dataset={
            "name": "cifar10",
            "root": str(root),
            "download": True,  # allowed, but the files are there: nothing may be fetched
            "val_size": 100,
            "augment": {"crop_padding": 4, "flip": True},
        },
        search={"num_trials": TRIALS, "n_startup_trials": TRIALS},
        scheduler={"name": "fifo"},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": TRIALS},
        tracking={"register_model": False},
    )

    # The sweep: the driver stages once, every trial trains from the object store.
    before = loads_in_process()
    result = run_sweep(spec)
    assert result.status == "FINISHED"
    assert result.outcomes["completed"] == TRIALS
    assert loads_in_process() - before == 1
    assert downloads == []

    # Every trial, every epoch, reported that its process loaded nothing.
    client = MlflowClient(result.tracking_uri)
    children = client.search_runs(
        [result.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    assert len(children) == TRIALS
    for run in children:
        assert run.data.params["crop_padding"] == "4" and run.data.params["flip"] == "True"
        history = client.get_metric_history(run.info.run_id, "data_loads_in_worker")
        assert sorted(m.step for m in history) == [1, 2]
        assert all(m.value == 0 for m in history)

    # The trials did run side by side, so a per-trial load would have raced for the files.
    spans = sorted((run.info.start_time, run.info.end_time) for run in children)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))

    # A second staging on the same cache re-reads the files: same split, still no download.
    again = stage_dataset(spec.dataset)
    assert downloads == []
    assert loads_in_process() - before == 2
    assert again.sizes() == {"train": 500, "val": 100, "test": 100}
    originals = {image.tobytes() for image in fake.train_x}
    assert all(image.tobytes() in originals for image in again.val.x)


def test_a_trial_that_loads_data_itself_is_counted(
    ray_local: None, make_spec: Callable[..., SweepSpec]
) -> None:
    # The control: the metric above is a count, not a constant. A trainable that stages a
    # dataset inside its worker before training reports one load.
    def stages_in_the_worker(
        config: dict, *, data_refs: list, settings: dict, threads: int
    ) -> None:
        from sweeps.data import stage_dataset
        from sweeps.spec import DatasetSpec
        from sweeps.trainable import train_trial

        stage_dataset(DatasetSpec(name="digits"))
        train_trial(config, data_refs=data_refs, settings=settings, threads=threads)

    spec = make_spec(
        training={"epochs": 1},
        search={"num_trials": 1, "n_startup_trials": 1},
        scheduler={"name": "fifo"},
        tracking={"register_model": False},
    )
    result = run_sweep(spec, trainable=stages_in_the_worker)
    client = MlflowClient(result.tracking_uri)
    (run,) = client.search_runs(
        [result.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    assert run.data.metrics["data_loads_in_worker"] == 1
