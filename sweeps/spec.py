"""Sweep spec files: parse, validate, and explain what is wrong.

A spec is a YAML mapping validated by pydantic models with `extra="forbid"`, so a misspelt key
is an error rather than a silently ignored setting. `load_spec` turns every validation failure
into one `SpecError` whose message names each bad field, the value given and what is allowed.
Validation also fills in the defaults that depend on other fields (the held-out sizes of the
dataset, the MLflow experiment), so a parsed spec holds the values a sweep really uses, and
parsing a dumped spec again gives the same spec.
"""

from __future__ import annotations

import itertools
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from regmodels.resnet import parse_depth

SWEPT = ("dropout", "weight_decay", "survival_prob")
DATASETS = ("digits", "cifar10", "cifar100")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Images per dataset. Digits has no test set of its own; CIFAR-10 and CIFAR-100 each have
# 50,000 training images and a test set of 10,000.
DIGITS_IMAGES = 1_797
CIFAR_TRAIN_IMAGES = 50_000
# The paper's split: 5,000 of CIFAR's 50,000 training images held out, 45,000 trained on.
DEFAULT_CIFAR_VAL_SIZE = 5_000
# Digits: this many images go to each of validation and test, about 15% each.
DEFAULT_DIGITS_HOLDOUT = 270
DEFAULT_VAL_SIZE = {
    "digits": DEFAULT_DIGITS_HOLDOUT,
    "cifar10": DEFAULT_CIFAR_VAL_SIZE,
    "cifar100": DEFAULT_CIFAR_VAL_SIZE,
}

# Seeds: Optuna's samplers and NumPy's legacy seeding take [0, 2**32 - 1]; torch takes these.
SEED_MAX = 2**32 - 1
# Ray's own resource names: a trial's CPUs and GPUs have their own fields in `resources`.
RAY_RESOURCES = {
    "CPU": "set it with resources.cpus_per_trial",
    "GPU": "set it with resources.gpus_per_trial",
    "memory": "it is Ray's own resource, not a custom one",
    "object_store_memory": "it is Ray's own resource, not a custom one",
}
# The longest text an error message shows of one value, in characters.
SHOWN_CHARS = 200

_YAML_MERGE = "tag:yaml.org,2002:merge"


class SpecError(ValueError):
    """A spec file that cannot be run; the message says what to change."""


def _shown(value: Any) -> str:
    """`repr(value)` cut to at most SHOWN_CHARS characters, without building it whole first.

    A YAML alias bomb (nested lists sharing one another) loads in microseconds but has a repr
    of gigabytes; reprlib stops at a few levels and a few items per level.
    """
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 8, 8, 8, 8
    short.maxstring, short.maxother, short.maxlong = SHOWN_CHARS, SHOWN_CHARS, 60
    text = short.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _misplaced_bool(annotation: Any, value: Any) -> str | None:
    """Where `value` has true or false where `annotation` wants a number, or None if nowhere.

    The answer is "" for `value` itself, or " at item 2", " at key 'foo'" for an item of a list
    or mapping (looked into one level deep). Python counts a bool as an int, so pydantic would
    read `epochs: true` as 1 epoch and `lr: true` as 1.0.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _misplaced_bool(args[0], value)
    if origin in (typing.Union, types.UnionType):
        if bool in args:
            return None
        places = (_misplaced_bool(arm, value) for arm in args)
        return next((place for place in places if place is not None), None)
    if isinstance(value, bool):
        return "" if annotation in (int, float) else None
    if origin is list and isinstance(value, list):
        bad = (i for i, item in enumerate(value) if _misplaced_bool(args[0], item) == "")
        return next((f" at item {i}" for i in bad), None)
    if origin is dict and isinstance(value, dict):
        bad = (key for key, item in value.items() if _misplaced_bool(args[1], item) == "")
        return next((f" at key {_shown(key)}" for key in bad), None)
    return None


def _seed(seed: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(
            f"a seed is an integer in [0, 2**32 - 1] = [0, {SEED_MAX}], the range Optuna, "
            "NumPy and torch all accept"
        )
    return seed


Seed = Annotated[int, AfterValidator(_seed)]


class _Strict(BaseModel):
    # strict=True: no coercion, so a quoted "0.1" or "true" is refused where a number or a
    # bool is wanted (an int is still a valid float). allow_inf_nan=False: every float field
    # refuses NaN and +-inf ("a finite number").
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        where = _misplaced_bool(cls.model_fields[info.field_name].annotation, value)
        if where is not None:
            raise ValueError(f"expected a number{where}, not true or false")
        return value


class Range(_Strict):
    """A search range [low, high]; log=true samples uniformly in log space."""

    low: float
    high: float
    log: bool = False

    # NaN and inf never get here: the model config refuses them for every float field.
    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low={self.low!r} is above high={self.high!r}; need low <= high")
        if self.log and self.low <= 0:
            raise ValueError(f"low={self.low!r} with log=true; a log range needs low > 0")
        return self


class SearchSpace(_Strict):
    dropout: Range = Range(low=0.0, high=0.5)
    weight_decay: Range = Range(low=1e-5, high=1e-2, log=True)
    survival_prob: Range = Range(low=0.5, high=1.0)

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, r: Range) -> Range:
        if r.low < 0 or r.high >= 1:
            raise ValueError(f"[{r.low}, {r.high}] is outside [0, 1): a dropout rate is < 1")
        return r

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay(cls, r: Range) -> Range:
        if r.low < 0 or r.high > 1:
            raise ValueError(f"[{r.low}, {r.high}] is outside [0, 1]: weight decay per step")
        return r

    @field_validator("survival_prob")
    @classmethod
    def _survival(cls, r: Range) -> Range:
        if r.low <= 0 or r.high > 1:
            raise ValueError(
                f"[{r.low}, {r.high}] is outside (0, 1]: the final survival probability p_L "
                "is above 0 and at most 1"
            )
        return r


class Augment(_Strict):
    crop_padding: Annotated[int, Field(ge=0, le=16)] = 0
    flip: bool = False


class DatasetSpec(_Strict):
    """The dataset and its seeded split.

    Validation fills in `val_size` (270 for digits, 5,000 for CIFAR) and, for digits,
    `test_size` (270). CIFAR's `test_size` stays None: its own 10,000 test images are used.
    """

    name: Literal["digits", "cifar10", "cifar100"] = "digits"
    root: str | None = None
    download: bool = True
    val_size: Annotated[int, Field(ge=1)] | None = None
    test_size: Annotated[int, Field(ge=1)] | None = None
    split_seed: Seed = 0
    augment: Augment = Augment()

    @model_validator(mode="before")
    @classmethod
    def _default_sizes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("name", cls.model_fields["name"].default)
        if not isinstance(name, str) or name not in DEFAULT_VAL_SIZE:
            return data  # the name's own error says what is allowed

        # None and absent mean the same, so a dumped spec (explicit nulls) fills the same way.
        filled = dict(data)
        if filled.get("val_size") is None:
            filled["val_size"] = DEFAULT_VAL_SIZE[name]
        if name == "digits" and filled.get("test_size") is None:
            filled["test_size"] = DEFAULT_DIGITS_HOLDOUT
        return filled

    @model_validator(mode="after")
    def _sizes(self) -> DatasetSpec:
        if self.name != "digits" and self.test_size is not None:
            raise ValueError(
                f"test_size={self.test_size!r} is only for digits: {self.name} has its own "
                "test set; remove test_size"
            )

        # Something must be left to train on. Digits holds test_size out first, then val_size.
        if self.name == "digits":
            held = self.val_size + self.test_size
            if held >= DIGITS_IMAGES:
                raise ValueError(
                    f"val_size={self.val_size} plus test_size={self.test_size} hold out "
                    f"{held:,} of the {DIGITS_IMAGES:,} digits images, leaving none to train "
                    f"on; together they must be at most {DIGITS_IMAGES - 1:,}"
                )
        elif self.val_size >= CIFAR_TRAIN_IMAGES:
            raise ValueError(
                f"val_size={self.val_size} holds out all of {self.name}'s "
                f"{CIFAR_TRAIN_IMAGES:,} training images, leaving none to train on; it must "
                f"be below {CIFAR_TRAIN_IMAGES:,}"
            )
        return self


# The deepest CIFAR ResNet of He et al. (2016). Deeper names are valid for regmodels but a
# spec that asks for one is almost certainly a typo, and it would fill the memory of a node.
MAX_DEPTH = 1202


class ModelSpec(_Strict):
    name: str = "resnet20"
    width: Annotated[int, Field(ge=1, le=16)] = 1
    shortcut: Literal["A", "B"] = "A"
    block_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    drop_mode: Literal["batch", "sample"] = "batch"

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        depth = parse_depth(name)
        if depth > MAX_DEPTH:
            raise ValueError(
                f"depth {depth} is more than this sweep service trains: use resnet<depth> with "
                f"depth 6n + 2 up to {MAX_DEPTH} (resnet{MAX_DEPTH}, the deepest of He et al.)"
            )
        return name


class TrainingSpec(_Strict):
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 15
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.1
    lr_schedule: Literal["step", "cosine", "constant"] = "step"
    lr_milestones: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = [0.5, 0.75]
    lr_gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    nesterov: bool = True
    weight_decay_mode: Literal["coupled", "decoupled"] = "coupled"
    decay_norm_and_bias: bool = False
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = False
    bf16: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        steps = itertools.pairwise(self.lr_milestones)
        if any(before >= after for before, after in steps):
            raise ValueError(
                f"lr_milestones={_shown(self.lr_milestones)} must be strictly increasing: "
                "each milestone after the one before"
            )
        if self.optimizer == "adamw" and self.weight_decay_mode != "decoupled":
            raise ValueError("optimizer 'adamw' needs weight_decay_mode 'decoupled'")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}"
            )
        return self


class SearchSpec(_Strict):
    num_trials: Annotated[int, Field(ge=1, le=100_000)] = 12
    seed: Seed = 0
    n_startup_trials: Annotated[int, Field(ge=1)] = 5
    space: SearchSpace = SearchSpace()


class SchedulerSpec(_Strict):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 3
    reduction_factor: Annotated[float, Field(gt=1.0)] = 3.0


class ResourcesSpec(_Strict):
    cpus_per_trial: Annotated[float, Field(gt=0.0, le=1024)] = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0.0, le=64)] = 0.0
    max_concurrent_trials: Annotated[int, Field(ge=1, le=10_000)] = 2
    # Extra Ray resources per trial, by name; an amount of 0 or below would never be met and
    # the sweep would wait forever.
    custom: dict[str, Annotated[float, Field(gt=0.0)]] = {}

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_gpus_above_one(cls, gpus: float) -> float:
        # Ray shares one GPU among trials (a fraction), but a trial of more than one GPU
        # takes whole ones.
        if gpus > 1 and not float(gpus).is_integer():
            raise ValueError(
                f"{gpus} GPUs: a trial takes a fraction of one GPU (at most 1) or a whole "
                "number of GPUs"
            )
        return gpus

    @field_validator("custom")
    @classmethod
    def _custom(cls, custom: dict[str, float]) -> dict[str, float]:
        for name in custom:
            if not name.strip():
                raise ValueError(
                    f"resource name {name!r} is empty or blank; give each resource a name"
                )
            if name in RAY_RESOURCES:
                raise ValueError(
                    f"{name!r} is not a custom resource: {RAY_RESOURCES[name]}; custom names "
                    f"must not be {', '.join(RAY_RESOURCES)}"
                )
        return custom


class TrackingSpec(_Strict):
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (sweeps.launch.resolve_tracking_uri).
    uri: str | None = None
    # None: the sweep's name, filled in by SweepSpec's validation.
    experiment: Annotated[str, Field(min_length=1)] | None = None
    register_model: bool = True

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.strip():
            raise ValueError(
                "an empty URI is not the default: leave tracking.uri out (or null) for "
                "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
            )
        return uri


class StorageSpec(_Strict):
    path: str = "ray_results"
    checkpoints_to_keep: Annotated[int, Field(ge=1)] = 1
    # A local `path` that every node of a multi-node cluster mounts (NFS, EFS). False: a local
    # path is taken to be on the head's disk only, and a multi-node sweep refuses it.
    shared: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if not path.strip():
            raise ValueError(
                "give a directory or a URL: an empty path makes Tune write its results "
                "straight into the working directory"
            )
        return path


class SweepSpec(_Strict):
    name: str
    description: str = ""
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()

    @model_validator(mode="before")
    @classmethod
    def _default_experiment(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return data

        # tracking.experiment defaults to the sweep's name; a bad tracking is left to fail.
        tracking = data.get("tracking", {})
        if isinstance(tracking, dict) and tracking.get("experiment") is None:
            return {**data, "tracking": {**tracking, "experiment": data["name"]}}
        if isinstance(tracking, TrackingSpec) and tracking.experiment is None:
            tracking = tracking.model_copy(update={"experiment": data["name"]})
            return {**data, "tracking": tracking}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                "use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )
        return name

    @model_validator(mode="after")
    def _grace(self) -> SweepSpec:
        if self.scheduler.name == "asha" and self.scheduler.grace_period > self.training.epochs:
            raise ValueError(
                f"scheduler.grace_period={self.scheduler.grace_period} is above "
                f"training.epochs={self.training.epochs}; it must be at most the epochs"
            )
        return self

    @model_validator(mode="after")
    def _device(self) -> SweepSpec:
        if self.training.device == "cuda" and self.resources.gpus_per_trial == 0:
            raise ValueError(
                "training.device='cuda' with resources.gpus_per_trial=0: Ray hides every GPU "
                "from a trial without a GPU share; give each trial a share (e.g. "
                "gpus_per_trial: 1) or use training.device 'auto'"
            )
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def smoke(self) -> SweepSpec:
        """The same sweep shrunk for CI: at most 3 trials of at most 2 epochs."""
        training = self.training.model_copy(
            update={"epochs": min(self.training.epochs, 2), "warmup_epochs": 0}
        )
        search = self.search.model_copy(
            update={
                "num_trials": min(self.search.num_trials, 3),
                "n_startup_trials": min(self.search.n_startup_trials, 3),
            }
        )
        scheduler = self.scheduler.model_copy(update={"grace_period": 1})
        return self.model_copy(
            update={"training": training, "search": search, "scheduler": scheduler}
        )

    def flat_params(self) -> dict[str, str]:
        """The spec as flat "section.key" -> value strings, for MLflow params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                flat[prefix] = str(value)

        walk("", self.model_dump(mode="json"))
        return flat


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(spec)"


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = _location(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against the README's spec reference"
        elif item["type"] == "model_type":  # names the pydantic class otherwise
            message = "expected a mapping of fields (key: value lines, indented below it)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {_shown(value)})"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    """Validate a mapping as a sweep spec, raising SpecError with every problem listed."""
    if data is None:
        raise SpecError(f"{source} is empty: a spec is a YAML mapping of fields, `name:` at least")
    if not isinstance(data, dict):
        got = {list: "a list", str: "a single text", int: "a number", float: "a number"}
        raise SpecError(
            f"{source}: a spec is a YAML mapping of fields, got "
            f"{got.get(type(data), type(data).__name__)}"
        )
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source} is not a valid sweep spec:\n{_format(error)}") from None


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    The safe loader alone keeps the last of two equal keys, silently. Keys that a merge
    (`<<: *anchor`) brings in may still be overridden, as YAML intends.

    Plain scalars are typed as YAML 1.2's core schema types them, not as PyYAML's YAML 1.1:
    `1e-5` is a number (a string in 1.1), and only true/false are booleans and only decimal
    digits integers (1.1 reads `yes`, `on` and `off` as booleans, `010` as 8, `0x10` as 16 and
    `1_000` as 1000). Those stay text, which the spec's strict types refuse, naming the value.

    Aliases need no limit here: PyYAML builds an alias as a reference to the object already
    built, so an alias bomb loads in microseconds; only printing it whole would be costly, and
    error messages show a value cut short (`_shown`).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _YAML_MERGE:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {_shown(key)} is given twice in one mapping, on line "
                    f"{first_line[key]} and line {line}; keep one",
                    key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _core_schema_resolvers() -> dict[str | None, list[tuple[str, re.Pattern[str]]]]:
    """PyYAML's implicit resolvers with bool, int and float as in YAML 1.2's core schema."""
    retyped = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
    resolvers = {
        first: [(tag, regexp) for tag, regexp in entries if tag not in retyped]
        for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    # A float has a dot or an exponent; `010` is neither int nor float (1.2 would say 10, 1.1
    # says 8), so it stays text and is refused.
    core = [
        ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
        ("int", r"[-+]?(?:0|[1-9][0-9]*)", "-+0123456789"),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?", "-+.0123456789"),
        ("float", r"[-+]?[0-9]+[eE][-+]?[0-9]+", "-+0123456789"),
        ("float", r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+."),
    ]
    for kind, pattern, firsts in core:
        for first in firsts:
            entry = (f"tag:yaml.org,2002:{kind}", re.compile(f"^(?:{pattern})$"))
            resolvers.setdefault(first, []).append(entry)
    return resolvers


_SpecLoader.yaml_implicit_resolvers = _core_schema_resolvers()


def _load_yaml(text: str, name: str) -> Any:
    """`yaml.load` with `_SpecLoader`, whose messages name `name` (not "<unicode string>")."""
    loader = _SpecLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML spec file (UTF-8, no key twice in one mapping)."""
    path = Path(path)
    source = f"spec file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{source} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{source} is not UTF-8 text: byte {error.object[error.start]:#04x} at offset "
            f"{error.start} cannot be decoded; save the file as UTF-8"
        ) from None

    try:
        data = _load_yaml(text, name=str(path))
    except yaml.YAMLError as error:
        raise SpecError(f"{source} is not valid YAML: {error}") from None
    except RecursionError:
        raise SpecError(
            f"{source} nests lists or mappings too deeply to read; a spec is a few levels deep"
        ) from None
    return parse_spec(data, source=source)
