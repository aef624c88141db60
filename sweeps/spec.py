"""Sweep spec files: parse, validate, and explain what is wrong.

A spec is a YAML mapping validated by pydantic models with `extra="forbid"`, so a misspelt key
is an error rather than a silently ignored setting. `load_spec` turns every validation failure
into one `SpecError` whose message names each bad field, the value given and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from regmodels.resnet import parse_depth

SWEPT = ("dropout", "weight_decay", "survival_prob")
DATASETS = ("digits", "cifar10", "cifar100")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """A spec file that cannot be run; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """A search range [low, high]; log=true samples uniformly in log space."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low={self.low!r} and high={self.high!r} must be finite numbers")
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
    name: Literal["digits", "cifar10", "cifar100"] = "digits"
    root: str | None = None
    download: bool = True
    val_size: Annotated[int, Field(ge=1)] | None = None
    test_size: Annotated[int, Field(ge=1)] | None = None
    split_seed: int = 0
    augment: Augment = Augment()

    @model_validator(mode="after")
    def _sizes(self) -> DatasetSpec:
        if self.name != "digits" and self.test_size is not None:
            raise ValueError(
                f"test_size={self.test_size!r} is only for digits: {self.name} has its own "
                "test set; remove test_size"
            )
        return self


class ModelSpec(_Strict):
    name: str = "resnet20"
    width: Annotated[int, Field(ge=1, le=16)] = 1
    shortcut: Literal["A", "B"] = "A"
    block_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    drop_mode: Literal["batch", "sample"] = "batch"

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        parse_depth(name)
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
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = False
    bf16: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if sorted(self.lr_milestones) != list(self.lr_milestones):
            raise ValueError(f"lr_milestones={self.lr_milestones!r} must be increasing")
        if self.optimizer == "adamw" and self.weight_decay_mode != "decoupled":
            raise ValueError("optimizer 'adamw' needs weight_decay_mode 'decoupled'")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}"
            )
        return self


class SearchSpec(_Strict):
    num_trials: Annotated[int, Field(ge=1, le=100_000)] = 12
    seed: int = 0
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
    custom: dict[str, float] = {}


class TrackingSpec(_Strict):
    uri: str | None = None
    experiment: str | None = None
    register_model: bool = True


class StorageSpec(_Strict):
    path: str = "ray_results"
    checkpoints_to_keep: Annotated[int, Field(ge=1)] = 1
    # A local `path` that every node of a multi-node cluster mounts (NFS, EFS). False: a local
    # path is taken to be on the head's disk only, and a multi-node sweep refuses it.
    shared: bool = False


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
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    """Validate a mapping as a sweep spec, raising SpecError with every problem listed."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping of fields, got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source} is not a valid sweep spec:\n{_format(error)}") from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {error}") from None
    return parse_spec(data, source=f"spec file {str(path)!r}")
