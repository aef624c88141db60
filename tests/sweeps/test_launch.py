"""Preflight: whatever refuses a sweep does so before anything is written, in seconds.

The checks of addresses and paths run in-process; the refusals of the CLI run it as a user
does, on a local Ray it starts itself, and look at what it left in its working directory.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
import yaml

from sweeps.launch import PreflightError, check_ray_address, check_storage
from tests.conftest import REPO, free_port, run_cli, small_spec_data

# The Ray address and the storage path, checked without Ray


def test_an_address_nothing_listens_at_is_refused_in_seconds() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(PreflightError, match=rf"no Ray cluster answers at '{address}'"):
        check_ray_address(address)
    assert time.monotonic() - started < 10


def test_an_address_that_answers_passes() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        check_ray_address(f"127.0.0.1:{listener.getsockname()[1]}")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("garbage", "is not HOST:PORT"),
        ("127.0.0.1:port", "is not HOST:PORT"),
        ("ray://127.0.0.1:10001", "is not supported"),
    ],
)
def test_malformed_addresses_say_what_to_give(address: str, message: str) -> None:
    with pytest.raises(PreflightError, match=message):
        check_ray_address(address)


def test_a_storage_path_is_checked_without_being_created(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there"
    check_storage(str(path))
    assert not (tmp_path / "not").exists()
    assert list(tmp_path.iterdir()) == []  # the probe file is gone too


def test_a_storage_path_below_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PreflightError, match="is not a folder"):
        check_storage(str(blocker / "results"))


def test_an_unwritable_storage_path_is_refused() -> None:
    # /proc refuses new files even to root.
    with pytest.raises(PreflightError, match="'/proc' is not writable"):
        check_storage("/proc/regsweep-results")


def test_a_storage_uri_that_cannot_be_reached_is_refused() -> None:
    with pytest.raises(PreflightError, match="'nosuch://bucket/x' cannot be reached"):
        check_storage("nosuch://bucket/x")


# The CLI refuses, exit 2, and leaves nothing behind


def refused(tmp_path: Path, args: list[str], **sections) -> tuple[str, list[str]]:
    """Run a refused sweep in `tmp_path`: its stderr and what it left next to the spec."""
    data = small_spec_data(tmp_path, **sections)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))

    done = run_cli(["run", str(spec_path), *args], cwd=tmp_path)

    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: preflight failed, nothing was started" in done.stderr
    assert "Traceback" not in done.stderr
    assert "staged" not in done.stdout
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "spec.yaml")
    return done.stderr, left


@pytest.mark.integration
def test_a_trial_that_cannot_fit_a_local_ray_is_refused_before_any_write(tmp_path: Path) -> None:
    stderr, left = refused(tmp_path, [], resources={"gpus_per_trial": 1})

    assert "'GPU': 1.0" in stderr and "gpus_per_trial" in stderr
    assert left == []  # no mlflow.db, no ray_results


@pytest.mark.integration
def test_a_ray_address_nothing_listens_at_is_refused_before_any_write(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    stderr, left = refused(tmp_path, ["--address", address])

    assert f"no Ray cluster answers at '{address}'" in stderr
    assert left == []


@pytest.mark.integration
def test_an_unusable_storage_path_is_refused_before_any_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    stderr, left = refused(tmp_path, ["--storage-path", str(tmp_path / "a-file" / "results")])

    assert "is not a folder" in stderr and "--storage-path" in stderr
    assert left == ["a-file"]


@pytest.mark.integration
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
    # The data is staged before the store is first written: no store, no run.
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("option", ["--tracking-uri", "--storage-path", "--address"])
def test_an_empty_option_is_refused_not_taken_for_the_default(tmp_path: Path, option) -> None:
    done = run_cli(["run", str(REPO / "sweeps/specs/digits.yaml"), option, ""], tmp_path)
    assert done.returncode == 2
    assert f"argument {option}: '' is not allowed" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["run", str(REPO / "sweeps/specs/digits.yaml")], ["resume"], ["extend", "--trials", "1"]],
    ids=["run", "resume", "extend"],
)
@pytest.mark.parametrize("top", ["0", "-1"])
def test_a_table_of_no_rows_is_refused_before_anything_starts(
    tmp_path: Path, command: list[str], top: str
) -> None:
    done = run_cli([*command, "--top", top], tmp_path)
    assert done.returncode == 2
    assert f"argument --top: {top} is not allowed: rows of the table, >= 1" in done.stderr
    assert list(tmp_path.iterdir()) == []


# Tune's hints that would mislead a regsweep user


@pytest.mark.parametrize(
    ("logger", "message", "shown"),
    [
        ("ray.tune.tune", 'saved.\nResume experiment with: Tuner.restore(path="x")', False),
        ("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics for 1 trial(s)", False),
        ("ray.tune.tune", "Stop signal received, ending Ray Tune run.", True),
    ],
)
def test_tunes_misleading_hints_are_dropped_and_its_other_warnings_kept(
    caplog: pytest.LogCaptureFixture, logger: str, message: str, shown: bool
) -> None:
    import sweeps.launch  # noqa: F401  (installs the filters)

    with caplog.at_level(logging.WARNING, logger=logger):
        logging.getLogger(logger).warning(message)
    assert (message in caplog.text) is shown
