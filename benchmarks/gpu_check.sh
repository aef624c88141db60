#!/usr/bin/env bash
# GPU check for regmodels: training images/s of ResNet-56 and ResNet-110 with and without
# channels_last, bf16 autocast and torch.compile, and the stochastic-depth step-time ratio
# (p_L = 0.5 over none) of regmodels and torchvision on the GPU; then one CIFAR-sized epoch of
# ResNet-20 through regsweep's device-resident pipeline, against the model steps alone and a
# torchvision DataLoader. About five minutes at most; installs nothing.
# Run from anywhere:  bash benchmarks/gpu_check.sh [--budget-s 170 ...]
# Exit status: 0 done, 2 no CUDA device, 3 no Python with torch, 124 hard time limit hit.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# The project's virtual environment if there is one, else the machine's python3.
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

# Stop at once, with the reason, where there is no torch or torch sees no CUDA device.
"$python" - "$python" <<'PY' || exit $?
import sys

try:
    import torch
except ImportError:
    print(f"gpu_check: {sys.argv[1]!r} cannot import torch; set PYTHON to one that can",
          file=sys.stderr)
    sys.exit(3)
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device is visible to torch {torch.__version__} "
          "(torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU "
          "and a CUDA build of torch", file=sys.stderr)
    sys.exit(2)
PY
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# The package from this checkout, whether or not it is installed; hard stops that add up to
# under 5 minutes.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout 220 "$python" -m benchmarks.gpu_check --budget-s 170 "$@" || status=$?

echo
echo "data pipeline on the GPU (ResNet-20, 45,000 CIFAR-shaped images, 4 DataLoader workers)"
timeout 70 "$python" benchmarks/data_pipeline.py --device cuda --full --epochs 1 --workers 4 \
    --threads 4 || status=$?
exit "$status"
