"""Spec validation: good specs parse, bad ones name the field, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, SweepSpec, load_spec, parse_spec
from tests.conftest import REPO, run_cli, small_spec_data


def test_embedded_digits_spec_is_valid_and_sweeps_all_three_regularizers() -> None:
    spec = load_spec(REPO / "sweeps/specs/digits.yaml")
    space = spec.search.space
    assert spec.dataset.name == "digits"
    assert spec.search.num_trials >= 12
    # All three regularizers active in every trial the space can propose.
    assert space.dropout.low > 0
    assert space.weight_decay.low > 0 and space.weight_decay.log
    assert space.survival_prob.high < 1


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_spec({"name": "minimal"})
    assert spec.experiment == "minimal"
    assert spec.model.name == "resnet20"
    assert spec.scheduler.name == "asha"


def test_smoke_shrinks_trials_and_epochs(tmp_path: Path) -> None:
    spec = parse_spec(
        small_spec_data(tmp_path, training={"epochs": 30}, search={"num_trials": 50})
    ).smoke()
    assert spec.training.epochs == 2
    assert spec.search.num_trials == 3
    assert spec.scheduler.grace_period == 1


@pytest.mark.parametrize(
    ("section", "patch", "field", "words"),
    [
        (
            "search",
            {"space": {"dropout": {"low": 0.1, "high": 1.5}}},
            "search.space.dropout",
            "[0, 1)",
        ),
        (
            "search",
            {"space": {"survival_prob": {"low": 0.0, "high": 1.0}}},
            "survival_prob",
            "(0, 1]",
        ),
        (
            "search",
            {"space": {"weight_decay": {"low": 0, "high": 0.1, "log": True}}},
            "weight_decay",
            "log",
        ),
        ("search", {"space": {"dropout": {"low": 0.4, "high": 0.2}}}, "dropout", "low <= high"),
        ("search", {"num_trials": 0}, "search.num_trials", "greater than or equal to 1"),
        ("model", {"name": "resnet21"}, "model.name", "6n + 2"),
        ("model", {"name": "vgg16"}, "model.name", "resnet<depth>"),
        ("training", {"epochs": -3}, "training.epochs", "-3"),
        ("training", {"lr": "fast"}, "training.lr", "'fast'"),
        ("training", {"lr_milestones": [0.75, 0.5]}, "training", "increasing"),
        ("training", {"optimizer": "adam"}, "training.optimizer", "'sgd' or 'adamw'"),
        ("resources", {"gpus_per_trial": -1}, "resources.gpus_per_trial", "-1"),
        ("resources", {"max_concurrent_trials": 0}, "max_concurrent_trials", "0"),
        ("scheduler", {"grace_period": 50}, "grace_period", "at most the epochs"),
        ("dataset", {"name": "imagenet"}, "dataset.name", "'digits'"),
        ("dataset", {"name": "cifar10", "test_size": 10}, "test_size", "own test set"),
    ],
)
def test_bad_value_names_field_value_and_allowed(
    tmp_path: Path, section: str, patch: dict, field: str, words: str
) -> None:
    data = small_spec_data(tmp_path)
    merged = {**data[section], **patch}
    if "space" in patch:
        merged["space"] = patch["space"]
    data[section] = merged
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    message = str(caught.value)
    assert field in message
    assert words in message


def test_unknown_key_is_an_error_not_ignored(tmp_path: Path) -> None:
    data = small_spec_data(tmp_path)
    data["training"]["epocs"] = 5
    with pytest.raises(SpecError, match=r"training\.epocs: unknown field"):
        parse_spec(data)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    data = small_spec_data(tmp_path)
    data["training"]["epochs"] = 0
    data["resources"]["cpus_per_trial"] = 0
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    message = str(caught.value)
    assert "training.epochs" in message and "resources.cpus_per_trial" in message


@pytest.mark.parametrize("text", ["[1, 2]", "name: [unclosed", ""])
def test_not_a_mapping_or_not_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"bad\.yaml"):
        load_spec(path)


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "nope.yaml")


def test_flat_params_round_trip_every_field(tmp_path: Path) -> None:
    spec = parse_spec(small_spec_data(tmp_path))
    flat = spec.flat_params()
    assert flat["search.space.dropout.low"] == str(spec.search.space.dropout.low)
    assert flat["model.name"] == "resnet8"
    assert SweepSpec.model_validate(spec.model_dump()) == spec


def test_cli_refuses_bad_spec_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    data = small_spec_data(tmp_path)
    data["search"]["space"] = {"survival_prob": {"low": 0.5, "high": 1.2}}
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    before = sorted(p.name for p in tmp_path.iterdir())

    done = run_cli(["run", str(spec_path)], cwd=tmp_path)

    assert done.returncode == 2
    assert "search.space.survival_prob" in done.stderr
    assert "1.2" in done.stderr and "(0, 1]" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no mlflow.db, no results


def test_cli_check_accepts_the_embedded_spec() -> None:
    done = run_cli(["check", "sweeps/specs/digits.yaml"], cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "valid sweep spec 'digits-resnet20'" in done.stdout
