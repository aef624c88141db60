"""GPU check: training throughput of ResNet-56 and ResNet-110, and stochastic depth's saving.

Prints images per second for training on CIFAR-shaped random data already on the GPU, with and
without channels_last, bf16 autocast and torch.compile, then the stochastic-depth step-time
ratio (p_L = 0.5 over none) of regmodels and of torchvision measured side by side on the GPU.
Rows are run cheapest first; a row that would start after `--budget-s` seconds is printed as
skipped, so the whole check ends in about five minutes even where compiling is slow.

Run it through benchmarks/gpu_check.sh, which stops at once where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import regmodels
from benchmarks import stochastic_depth

NO_CUDA = (
    "gpu_check: no CUDA device is visible to torch {version} (torch.cuda.is_available() is "
    "False); run it on a machine with an NVIDIA GPU and a CUDA build of torch"
)


def throughput(
    depth: int,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    channels_last: bool,
    bf16: bool,
    compile_model: bool,
    device: torch.device,
    backend: str = "inductor",
    survival_prob: float = 1.0,
) -> tuple[float, float]:
    """Training images per second and the seconds spent warming up (compiling included)."""
    torch.manual_seed(0)
    model: nn.Module = regmodels.create_model(f"resnet{depth}", survival_prob=survival_prob)
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = torch.compile(model, backend=backend) if compile_model else model
    batches = stochastic_depth.random_batches(batch_size, device, channels_last=channels_last)
    step = stochastic_depth.make_step(trained, batches, bf16=bf16, device=device)

    # Warm-up: cuDNN autotuning and, with compile, the compilation itself.
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - started), warmup_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="the paper's 128")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--budget-s", type=float, default=210.0, help="start no row after this")
    # For a dry run of this script on a CPU (tiny batch, a cheap compile backend).
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its kernels
    started = time.perf_counter()

    def within_budget() -> bool:
        return time.perf_counter() - started < args.budget_s

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"gpu_check: {name}, torch {torch.__version__}")
    print(f"training, CIFAR-shaped random data on the device, batch {args.batch_size}, ", end="")
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps")
    print()
    header = (
        f"{'model':<11} {'p_L':>4} {'channels_last':>13} {'bf16':>5} {'compile':>7} "
        f"{'images/s':>10}"
    )
    print(header)

    # Eager rows first, then the stochastic-depth ratio, then the compiled rows (slowest, the
    # most telling first); a row is (depth, p_L, channels_last, bf16, compile).
    Row = tuple[int, float, bool, bool, bool]
    eager = [(cl, bf) for cl in (False, True) for bf in (False, True)]
    rows: list[Row] = [(depth, 1.0, cl, bf, False) for depth in (56, 110) for cl, bf in eager]
    compiled: list[Row] = [
        (110, 1.0, True, True, True),
        (56, 1.0, True, True, True),
        (110, 1.0, False, False, True),
        (56, 1.0, False, False, True),
        (110, 0.5, True, True, True),  # stochastic depth compiled: one graph break a block
    ]

    def run_rows(selected: list[Row]) -> None:
        for depth, p, cl, bf, comp in selected:
            label = f"resnet{depth:<5} {p:>4g} {cl!s:>13} {bf!s:>5} {comp!s:>7}"
            if not within_budget():
                print(f"{label} {'skipped: time budget':>10}", flush=True)
                continue
            torch._dynamo.reset()  # each compiled row starts from an empty cache
            images_s, warmup_s = throughput(
                depth,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                channels_last=cl,
                bf16=bf,
                compile_model=comp,
                device=device,
                backend=args.compile_backend,
                survival_prob=p,
            )
            note = f"   (warm-up {warmup_s:.0f} s)" if comp else ""
            print(f"{label} {images_s:>10.1f}{note}", flush=True)

    run_rows(rows)
    print()
    if within_budget():
        stochastic_depth.run(
            depth=110,
            batch_size=args.batch_size,
            rounds=5,
            steps=6,
            warmup=3,
            device=device,
            channels_last=True,
            bf16=True,
            clock="wall",
            header="stochastic depth on the GPU: ResNet-110, channels_last, bf16, eager",
        )
    else:
        print("stochastic depth ratio: skipped (time budget)")
    print()
    print(header)
    run_rows(compiled)
    print(f"\ngpu_check: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
