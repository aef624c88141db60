"""Every shipped spec passes `python -m sweeps check`, and the CIFAR specs hold the paper's recipe.

The recipe (Huang et al., 2016, as in DESIGN.md): SGD with Nesterov momentum 0.9, batch 128,
lr 0.1 divided by 10 at 50% and 75% of 500 epochs, weight decay 1e-4, a 45k/5k train/val split,
4-pixel translation and horizontal flips, ResNet-110 with parameter-free shortcuts.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.__main__ import EXIT_OK, main
from sweeps.data import DEFAULT_CIFAR_VAL_SIZE
from sweeps.spec import SweepSpec, load_spec
from tests.conftest import REPO

SPECS = sorted((REPO / "sweeps" / "specs").glob("*.yaml"))
CIFAR_SPECS = ("cifar10-resnet110", "cifar100-resnet110", "cifar10-resnet56")
PAPER_SPECS = ("cifar10-resnet110", "cifar100-resnet110")


def spec_named(name: str) -> SweepSpec:
    return load_spec(REPO / "sweeps" / "specs" / f"{name}.yaml")


def test_the_cluster_specs_are_shipped() -> None:
    assert {path.stem for path in SPECS} >= {"digits", *CIFAR_SPECS}


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("path", SPECS, ids=[path.stem for path in SPECS])
def test_check_accepts_every_shipped_spec(
    path: Path, smoke: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["check", str(path)] + (["--smoke-test"] if smoke else [])
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    spec = load_spec(path)
    assert f"valid sweep spec {spec.name!r}" in out
    assert spec.name == path.stem or path.stem == "digits"
    if smoke:
        assert "training.epochs = 1" in out or "training.epochs = 2" in out


def test_check_from_the_command_line() -> None:
    path = REPO / "sweeps" / "specs" / "cifar100-resnet110.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "sweeps", "check", str(path), "--smoke-test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "valid sweep spec 'cifar100-resnet110'" in done.stdout
    assert "dataset.name = cifar100" in done.stdout


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_paper_specs_hold_the_papers_recipe(name: str) -> None:
    spec = spec_named(name)
    d, m, t = spec.dataset, spec.model, spec.training

    assert d.name == name.split("-")[0]
    assert (d.val_size or DEFAULT_CIFAR_VAL_SIZE) == 5_000
    assert d.augment.crop_padding == 4 and d.augment.flip
    assert m.name == "resnet110" and m.shortcut == "A" and m.width == 1
    assert t.epochs == 500 and t.batch_size == 128
    assert (t.optimizer, t.nesterov, t.momentum) == ("sgd", True, 0.9)
    assert (t.lr, t.lr_schedule, t.lr_gamma) == (0.1, "step", 0.1)
    assert t.lr_milestones == [0.5, 0.75] and t.warmup_epochs == 0
    assert t.weight_decay_mode == "coupled" and t.label_smoothing == 0
    assert spec.resources.gpus_per_trial == 1


@pytest.mark.parametrize("name", CIFAR_SPECS)
def test_search_space_is_centred_on_the_papers_settings(name: str) -> None:
    space = spec_named(name).search.space

    # Weight decay 1e-4 at the geometric centre of a log range (within a factor of 1.5).
    wd = space.weight_decay
    assert wd.log
    assert abs(math.log10(math.sqrt(wd.low * wd.high)) - math.log10(1e-4)) < math.log10(1.5)
    # p_L = 0.5 in the middle of the survival range; no dropout is inside the dropout range.
    sp = space.survival_prob
    assert abs((sp.low + sp.high) / 2 - 0.5) < 0.05 and sp.high < 1
    assert space.dropout.low == 0 < space.dropout.high


@pytest.mark.parametrize("name", CIFAR_SPECS)
def test_cifar_specs_give_each_trial_a_gpu_share(name: str) -> None:
    spec = spec_named(name)
    r = spec.resources
    assert 0 < r.gpus_per_trial <= 1 and r.cpus_per_trial >= 1
    assert spec.training.device == "auto"
    assert spec.dataset.root is None  # the cache comes from $REGSWEEP_DATA or the default
    if name == "cifar10-resnet56":
        assert r.gpus_per_trial < 1  # several quick trials share one GPU
        assert spec.model.name == "resnet56"


@pytest.mark.parametrize("name", CIFAR_SPECS)
def test_smoke_versions_stay_small(name: str) -> None:
    smoke = spec_named(name).smoke()
    assert smoke.training.epochs <= 2 and smoke.search.num_trials <= 3
    assert smoke.scheduler.grace_period <= smoke.training.epochs
