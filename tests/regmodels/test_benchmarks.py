"""The benchmark scripts that measure regmodels: they run, and the GPU check stops cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import stochastic_depth

REPO = Path(__file__).resolve().parents[2]


def test_the_torchvision_variant_differs_only_in_its_residual_units() -> None:
    ours = stochastic_depth.build_model("regmodels", 0.5, depth=20)
    theirs = stochastic_depth.build_model("torchvision", 0.5, depth=20)

    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    drops = [m.p for m in theirs.modules() if m.__class__.__name__ == "StochasticDepth"]
    assert drops == pytest.approx([1 - p for p in ours.survival_probs])


def test_stochastic_depth_benchmark_runs_and_prints_both_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = stochastic_depth.run(
        depth=8, batch_size=2, rounds=2, steps=1, warmup=1, device=torch.device("cpu")
    )

    out = capsys.readouterr().out
    assert len(result["regmodels"]) == len(result["torchvision"]) == 2
    assert "regmodels (skips dropped blocks)" in out
    assert 'torchvision StochasticDepth(mode="row")' in out
    assert "expected compute fraction (mean p_l over 3 blocks): 0.667" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_check_stops_at_once_without_cuda() -> None:
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )

    assert run.returncode == 2
    assert "no CUDA device is visible to torch" in run.stderr
    assert run.stdout == ""
