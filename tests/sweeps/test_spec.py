"""Spec validation: good specs parse, bad ones name the field, the value and what is allowed."""

from __future__ import annotations

import time
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
        ("model", {"name": "resnet99999998"}, "model.name", "up to 1202"),
        ("tracking", {"experiment": ""}, "tracking.experiment", "at least 1 character"),
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


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[1, 2]", "a spec is a YAML mapping of fields, got a list"),
        ("name: [unclosed", "is not valid YAML"),
        ("", "is empty: a spec is a YAML mapping of fields"),
        ("# only a comment\n", "is empty"),
        ("name: x\ntraining: null\n", "training: expected a mapping of fields"),
        ("name: x\nsearch: {space: {dropout: 0.1}}\n", "dropout: expected a mapping of fields"),
    ],
)
def test_not_a_mapping_or_not_yaml(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"bad\.yaml") as refused:
        load_spec(path)
    assert says in str(refused.value)
    assert "Spec" not in str(refused.value).replace("SpecError", "")  # no pydantic class names


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


# Specs that used to pass `check` and fail later, or give a traceback ------------------------


def refusal(data: dict) -> str:
    """The SpecError message `parse_spec` gives for `data`; fails the test if it is accepted."""
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    return str(caught.value)


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("section", "key", "seed"),
    [
        ("search", "seed", -1),
        ("search", "seed", 2**32),
        ("training", "seed", 2**70),
        ("training", "seed", -5),
        ("dataset", "split_seed", 2**32),
        ("dataset", "split_seed", -1),
    ],
)
def test_seeds_outside_0_to_2_pow_32_are_refused(
    tmp_path: Path, section: str, key: str, seed: int
) -> None:
    data = small_spec_data(tmp_path, **{section: {key: seed}})
    message = refusal(data)
    assert f"{section}.{key}: a seed is an integer in [0, 2**32 - 1]" in message
    assert f"(got {seed})" in message


def test_seeds_at_both_ends_of_the_range_are_accepted(tmp_path: Path) -> None:
    top = 2**32 - 1
    spec = parse_spec(
        small_spec_data(
            tmp_path, search={"seed": top}, training={"seed": 0}, dataset={"split_seed": top}
        )
    )
    assert (spec.search.seed, spec.training.seed, spec.dataset.split_seed) == (top, 0, top)


@pytest.mark.parametrize(
    ("dataset", "words"),
    [
        ({"val_size": 5000}, ["val_size=5000", "test_size=270", "1,797"]),
        ({"test_size": 1600}, ["val_size=270", "test_size=1600", "1,797"]),
        ({"val_size": 1000, "test_size": 797}, ["at most 1,796"]),
        ({"name": "cifar10", "val_size": 50_000}, ["val_size=50000", "below 50,000"]),
        ({"name": "cifar100", "val_size": 60_000}, ["cifar100", "50,000"]),
    ],
)
def test_holdouts_that_leave_nothing_to_train_on_are_refused(
    tmp_path: Path, dataset: dict, words: list[str]
) -> None:
    data = small_spec_data(tmp_path, dataset=dataset)
    message = refusal(data)
    assert "dataset: " in message
    for word in words:
        assert word in message


def test_holdouts_leaving_one_training_example_are_accepted(tmp_path: Path) -> None:
    digits = parse_spec(small_spec_data(tmp_path, dataset={"val_size": 1000, "test_size": 796}))
    cifar = parse_spec(small_spec_data(tmp_path, dataset={"name": "cifar10", "val_size": 49_999}))
    assert digits.dataset.val_size + digits.dataset.test_size == 1_796
    assert cifar.dataset.val_size == 49_999


@pytest.mark.parametrize(
    ("dataset", "val_size", "test_size"),
    [("digits", 270, 270), ("cifar10", 5_000, None), ("cifar100", 5_000, None)],
)
def test_validation_fills_in_the_effective_defaults(
    dataset: str, val_size: int, test_size: int | None
) -> None:
    spec = parse_spec({"name": "filled", "dataset": {"name": dataset}})
    assert spec.dataset.val_size == val_size
    assert spec.dataset.test_size == test_size
    assert spec.tracking.experiment == spec.experiment == "filled"

    # Idempotent: a dumped spec (as stored in spec.yaml), changed as `--trials` changes it,
    # parses to the same values; so does the smoke version.
    data = spec.model_dump(mode="json")
    data["search"]["num_trials"] = 7
    again = parse_spec(data)
    assert again.dataset == spec.dataset and again.tracking == spec.tracking
    assert again.search.num_trials == 7
    assert SweepSpec.model_validate(spec.model_dump()) == spec
    assert spec.smoke().dataset == spec.dataset


def test_a_spec_stored_before_the_defaults_were_filled_in_still_parses() -> None:
    old = parse_spec({"name": "old"}).model_dump(mode="json")
    old["dataset"].update(val_size=None, test_size=None)
    old["tracking"]["experiment"] = None
    spec = parse_spec(old)
    assert (spec.dataset.val_size, spec.dataset.test_size) == (270, 270)
    assert spec.tracking.experiment == "old"


def test_given_sizes_and_experiment_are_kept(tmp_path: Path) -> None:
    spec = parse_spec(small_spec_data(tmp_path, dataset={"val_size": 100, "test_size": 50}))
    assert (spec.dataset.val_size, spec.dataset.test_size) == (100, 50)
    assert spec.tracking.experiment == spec.experiment == "test"


def test_check_prints_effective_values_not_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweeps.__main__ import EXIT_OK, main

    path = write(tmp_path, "name: shown\n")
    assert main(["check", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "dataset.val_size = 270" in out and "dataset.test_size = 270" in out
    assert "tracking.experiment = shown" in out


def test_cuda_without_a_gpu_share_is_refused(tmp_path: Path) -> None:
    data = small_spec_data(tmp_path, training={"device": "cuda"})
    message = refusal(data)
    assert "training.device='cuda'" in message and "resources.gpus_per_trial=0" in message

    data["resources"]["gpus_per_trial"] = 0.5
    assert parse_spec(data).training.device == "cuda"


@pytest.mark.parametrize(
    ("custom", "field", "words"),
    [
        ({"foo": -1}, "resources.custom.foo", "greater than 0 (got -1)"),
        ({"foo": 0}, "resources.custom.foo", "greater than 0 (got 0)"),
        ({"foo": float("inf")}, "resources.custom.foo", "finite number"),
        ({"foo": float("nan")}, "resources.custom.foo", "finite number"),
        ({"CPU": 1}, "resources.custom", "resources.cpus_per_trial"),
        ({"GPU": 1}, "resources.custom", "resources.gpus_per_trial"),
        ({"memory": 1}, "resources.custom", "'memory' is not a custom resource"),
        ({"object_store_memory": 1}, "resources.custom", "Ray's own resource"),
        ({"": 1}, "resources.custom", "resource name '' is empty"),
        ({"  ": 1}, "resources.custom", "is empty"),
    ],
)
def test_bad_custom_resources_are_refused(
    tmp_path: Path, custom: dict, field: str, words: str
) -> None:
    message = refusal(small_spec_data(tmp_path, resources={"custom": custom}))
    assert f"{field}: " in message
    assert words in message


def test_a_custom_resource_with_a_positive_amount_is_accepted(tmp_path: Path) -> None:
    custom = {"accelerator_type:H100": 0.001, "licences": 2}
    spec = parse_spec(small_spec_data(tmp_path, resources={"custom": custom}))
    assert spec.resources.custom == custom


@pytest.mark.parametrize(
    ("section", "patch", "field", "where"),
    [
        ("training", {"epochs": True}, "training.epochs", "(got True)"),
        ("training", {"lr": True}, "training.lr", "(got True)"),
        ("training", {"lr_milestones": [0.5, False]}, "training.lr_milestones", "at item 1"),
        ("training", {"seed": False}, "training.seed", "(got False)"),
        ("search", {"num_trials": True}, "search.num_trials", "(got True)"),
        (
            "search",
            {"space": {"dropout": {"low": False, "high": 0.5}}},
            "search.space.dropout.low",
            "(got False)",
        ),
        ("dataset", {"val_size": True}, "dataset.val_size", "(got True)"),
        ("dataset", {"augment": {"crop_padding": True}}, "dataset.augment.crop_padding", "True"),
        ("model", {"width": True}, "model.width", "(got True)"),
        ("resources", {"gpus_per_trial": True}, "resources.gpus_per_trial", "(got True)"),
        ("resources", {"custom": {"foo": True}}, "resources.custom", "at key 'foo'"),
        ("scheduler", {"reduction_factor": True}, "scheduler.reduction_factor", "True"),
    ],
)
def test_true_or_false_where_a_number_goes_is_refused(
    tmp_path: Path, section: str, patch: dict, field: str, where: str
) -> None:
    message = refusal(small_spec_data(tmp_path, **{section: patch}))
    assert f"{field}: expected a number" in message
    assert "not true or false" in message and where in message


def test_bool_fields_still_take_true_and_false(tmp_path: Path) -> None:
    data = small_spec_data(
        tmp_path,
        dataset={"download": False, "augment": {"flip": True}},
        training={"nesterov": False, "bf16": True},
        search={"space": {"weight_decay": {"low": 1e-4, "high": 1e-3, "log": False}}},
        storage={"shared": True},
    )
    spec = parse_spec(data)
    assert spec.dataset.augment.flip and not spec.dataset.download
    assert not spec.training.nesterov and spec.training.bf16
    assert not spec.search.space.weight_decay.log and spec.storage.shared


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("training", "lr"),
        ("training", "momentum"),
        ("resources", "cpus_per_trial"),
        ("scheduler", "reduction_factor"),
        ("model", "block_dropout"),
    ],
)
def test_nan_and_inf_are_refused_as_not_finite(
    tmp_path: Path, section: str, field: str, bad: float | str
) -> None:
    message = refusal(small_spec_data(tmp_path, **{section: {field: bad}}))
    assert f"{section}.{field}: Input should be a finite number" in message


@pytest.mark.parametrize(
    ("text", "field", "kind"),
    [
        ('training:\n  lr: "0.1"', "training.lr", "number (got '0.1')"),
        ("training:\n  epochs: '3'", "training.epochs", "integer (got '3')"),
        ("training:\n  epochs: 3.0", "training.epochs", "integer (got 3.0)"),
        ("training:\n  lr: nan", "training.lr", "number (got 'nan')"),
        ("training:\n  nesterov: 'yes'", "training.nesterov", "boolean (got 'yes')"),
        ("training:\n  bf16: 1", "training.bf16", "boolean (got 1)"),
        ("dataset:\n  augment: {flip: 'true'}", "dataset.augment.flip", "boolean (got 'true')"),
        ("model:\n  name: 20", "model.name", "string (got 20)"),
        # YAML 1.1 would read these as true, 16, 8 and 1000; the spec reads them as YAML 1.2.
        ("training:\n  nesterov: yes", "training.nesterov", "boolean (got 'yes')"),
        ("dataset:\n  augment: {flip: On}", "dataset.augment.flip", "boolean (got 'On')"),
        ("training:\n  epochs: 0x10", "training.epochs", "integer (got '0x10')"),
        ("training:\n  epochs: 010", "training.epochs", "integer (got '010')"),
        ("training:\n  lr: 1_000", "training.lr", "number (got '1_000')"),
    ],
)
def test_quoted_or_wrong_typed_values_are_refused_not_converted(
    tmp_path: Path, text: str, field: str, kind: str
) -> None:
    path = write(tmp_path, f"name: strict\n{text}\n")
    with pytest.raises(SpecError) as refused:
        load_spec(path)
    assert f"{field}: Input should be a valid {kind}" in str(refused.value)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-5 as a string; a spec reads it as YAML 1.2 does.
    space = "space:\n    weight_decay: {low: 1e-5, high: 3E-3, log: true}"
    path = write(tmp_path, f"name: exp\ntraining:\n  lr: 5e-2\nsearch:\n  {space}\n")
    spec = load_spec(path)
    assert spec.training.lr == 0.05
    assert spec.search.space.weight_decay.low == 1e-5
    assert spec.search.space.weight_decay.high == 3e-3


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("lr: .nan", "training.lr"),
        ("lr_milestones: [0.5, .inf]", "training.lr_milestones.1"),
    ],
)
def test_nan_and_inf_from_yaml_are_refused(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, f"name: finite\ntraining:\n  {text}\n")
    with pytest.raises(SpecError, match=rf"{field}: Input should be a finite number"):
        load_spec(path)


def test_nan_in_a_search_range_reads_as_not_finite(tmp_path: Path) -> None:
    space = {"dropout": {"low": float("nan"), "high": 0.5}}
    message = refusal(small_spec_data(tmp_path, search={"space": space}))
    assert "search.space.dropout.low: Input should be a finite number (got nan)" in message
    assert "less than" not in message


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("name: a\ndescription: x\nname: b\n", "'name'", "line 1 and line 3"),
        ("name: a\ntraining:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "'lr'", "line 3 and line 5"),
        (
            "name: a\nsearch:\n  space:\n    dropout: {low: 0.1, high: 0.2, low: 0.3}\n",
            "'low'",
            "line 4 and line 4",
        ),
    ],
)
def test_a_key_given_twice_is_refused_with_its_lines(
    tmp_path: Path, text: str, key: str, lines: str
) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, text))
    message = str(caught.value)
    assert "spec.yaml" in message and "is not valid YAML" in message
    assert f"key {key} is given twice" in message and lines in message


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    text = (
        "name: merged\nsearch:\n  space:\n    dropout: &range {low: 0.1, high: 0.4}\n"
        "    survival_prob: {<<: *range, low: 0.5, high: 0.9}\n"
    )
    spec = load_spec(write(tmp_path, text))
    assert (spec.search.space.survival_prob.low, spec.search.space.survival_prob.high) == (
        0.5,
        0.9,
    )


@pytest.mark.parametrize("path", ["", " ", "\t"])
def test_an_empty_storage_path_is_refused(tmp_path: Path, path: str) -> None:
    message = refusal(small_spec_data(tmp_path, storage={"path": path}))
    assert "storage.path: give a directory or a URL" in message
    assert f"(got {path!r})" in message


def test_a_file_that_is_not_utf8_is_a_spec_error(tmp_path: Path) -> None:
    path = write(tmp_path, "name: caf\xe9\n".encode("latin-1"), name="latin1.yaml")
    with pytest.raises(SpecError, match=r"latin1\.yaml' is not UTF-8 text: byte 0xe9"):
        load_spec(path)


def alias_bomb(levels: int, width: int) -> str:
    """A "billion laughs" document: `width ** levels` leaves through nested aliases."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_loads_quickly(tmp_path: Path) -> None:
    # 9 ** 9 = 387 million leaves, but PyYAML builds an alias as a reference to the object
    # already built, so the document loads at once and needs no limit on aliases.
    from sweeps.spec import _load_yaml

    started = time.perf_counter()
    data = _load_yaml(alias_bomb(levels=9, width=9), name="bomb.yaml")
    assert time.perf_counter() - started < 5
    assert data["l9"][0] is data["l9"][8]


def test_an_alias_bomb_is_refused_with_a_short_message(tmp_path: Path) -> None:
    # 9 ** 7 = 4.8 million leaves: shown whole, the message would run to about 34 MB (a
    # larger bomb once gave 39 MB); cut short, each value takes a line of a few hundred.
    text = alias_bomb(levels=7, width=9) + "name: *l7\ntraining:\n  lr_milestones: *l7\n"
    started = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, text))
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "name: Input should be a valid string" in message
    assert "training.lr_milestones.0" in message
    assert all(len(line) < 400 for line in message.splitlines())
    assert len(message) < 20_000


def test_a_value_shown_in_an_error_is_cut_short(tmp_path: Path) -> None:
    message = refusal(small_spec_data(tmp_path, training={"lr": "x" * 100_000}))
    line = next(line for line in message.splitlines() if "training.lr" in line)
    assert len(line) < 400 and "..." in line


def test_nesting_too_deep_for_the_parser_is_a_spec_error(tmp_path: Path) -> None:
    path = write(tmp_path, "name: " + "[" * 5_000 + "]" * 5_000 + "\n")
    with pytest.raises(SpecError, match="nests lists or mappings too deeply"):
        load_spec(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: a\nname: b\n", "given twice"),
        (b"name: \xff\xfe\n", "not UTF-8"),
        ("name: cuda\ntraining: {device: cuda}\n", "resources.gpus_per_trial=0"),
        ("name: seeds\nsearch: {seed: -1}\n", "search.seed"),
    ],
    ids=["duplicate-key", "not-utf8", "cuda-without-gpu", "negative-seed"],
)
def test_check_refuses_bad_files_with_exit_2_and_no_traceback(
    tmp_path: Path, text: str | bytes, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweeps.__main__ import EXIT_REFUSED, main

    assert main(["check", str(write(tmp_path, text))]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("gpus", "accepted"), [(0.25, True), (1, True), (2, True), (1.5, False)])
def test_gpus_per_trial_is_a_fraction_of_one_or_whole_gpus(gpus: float, accepted: bool) -> None:
    data = {"name": "gpus", "resources": {"gpus_per_trial": gpus}}
    if accepted:
        assert parse_spec(data).resources.gpus_per_trial == gpus
    else:
        with pytest.raises(SpecError, match=r"resources\.gpus_per_trial: 1\.5 GPUs"):
            parse_spec(data)


def test_equal_lr_milestones_are_refused(tmp_path: Path) -> None:
    message = refusal(small_spec_data(tmp_path, training={"lr_milestones": [0.5, 0.5]}))
    assert "training: lr_milestones=[0.5, 0.5] must be strictly increasing" in message


@pytest.mark.parametrize("uri", ["", "  "])
def test_an_empty_tracking_uri_is_refused_not_taken_for_the_default(
    tmp_path: Path, uri: str
) -> None:
    message = refusal(small_spec_data(tmp_path, tracking={"uri": uri}))
    assert "tracking.uri: an empty URI is not the default" in message
