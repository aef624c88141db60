"""Does stochastic depth save the compute it drops? Training-step time, measured side by side.

Trains ResNet-110 on CIFAR-shaped random data and prints the ratio of the training-step time
at p_L = 0.5 to the time without stochastic depth, for

- regmodels, which skips a dropped block (Huang et al., 2016), and
- torchvision.ops.StochasticDepth used the usual way: the branch is always computed and then
  multiplied by a per-sample mask (mode="row", as torchvision's own models use it).

Both networks are the same ResNet-110 with the same linear survival schedule; only the residual
unit differs. The four configurations take turns step by step (in a shuffled order each time),
so that a load change on a shared machine hits all of them alike; each round of a few steps
gives one ratio per library, and the table shows the median and the range over the rounds.

    python -m benchmarks.stochastic_depth                  # about 2 minutes on a CPU
    python -m benchmarks.stochastic_depth --rounds 15 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import regmodels
from regmodels import StochasticDepth

# The paper's headline setting.
DEPTH = 110
SURVIVAL_PROB = 0.5  # final survival probability p_L
CIFAR_SHAPE = (3, 32, 32)
NUM_CLASSES = 10

# "process" counts the CPU time of this process only: with one intra-op thread it is the step's
# compute, which other programs on a shared machine do not inflate the way they inflate
# wall-clock time. A GPU step must be timed by the wall clock.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


class TorchvisionUnit(nn.Module):
    """A residual unit with torchvision's StochasticDepth: act(shortcut(x) + mask * branch(x)).

    torchvision scales kept samples by 1 / p at training time and computes the branch always.
    """

    def __init__(self, unit: StochasticDepth) -> None:
        super().__init__()
        self.branch, self.shortcut, self.activation = unit.branch, unit.shortcut, unit.activation
        drop_prob = regmodels.drop_prob_from_survival(unit.survival_prob)
        self.stochastic_depth = torchvision.ops.StochasticDepth(drop_prob, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.shortcut(x) + self.stochastic_depth(self.branch(x)))


def build_model(library: str, survival_prob: float, depth: int = DEPTH) -> nn.Module:
    """ResNet-`depth` whose residual units are regmodels' or torchvision's stochastic depth."""
    model = regmodels.create_model(f"resnet{depth}", survival_prob=survival_prob)
    if library == "torchvision":
        for stage in model.stages:
            for i, unit in enumerate(stage):
                stage[i] = TorchvisionUnit(unit)
    return model


@dataclass
class Config:
    library: str
    survival_prob: float
    step: Callable[[], None] = field(repr=False)
    model: nn.Module = field(repr=False)
    seconds: list[float] = field(default_factory=list)  # mean step time, one per round
    executed: list[float] = field(default_factory=list)  # executed fraction, one per round

    @property
    def label(self) -> str:
        return f"{self.library} p_L={self.survival_prob:g}"


def make_step(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    bf16: bool = False,
    device: torch.device,
) -> Callable[[], None]:
    """One training step: forward, cross-entropy, backward, Nesterov SGD (the paper's recipe).

    The step ends with a device synchronization so that wall-clock time measures the step.
    """
    optimizer = regmodels.build_optimizer(model, lr=0.1, weight_decay=1e-4)
    counter = iter(range(sys.maxsize))

    def step() -> None:
        x, y = batches[next(counter) % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def random_batches(
    batch_size: int, device: torch.device, count: int = 4, channels_last: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = torch.randn(batch_size, *CIFAR_SHAPE, generator=generator)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x.to(device), y.to(device)))
    return batches


def measure_interleaved(
    configs: list[Config],
    *,
    rounds: int,
    steps: int,
    warmup: int,
    seed: int,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Warm every configuration up, then time rounds of `steps` steps of each.

    Steps are interleaved one by one, in a shuffled order each time, so that the load of a
    shared machine at any moment lands on all configurations alike.
    """
    for config in configs:
        for _ in range(warmup):
            config.step()
    order = random.Random(seed)
    for _ in range(rounds):
        seconds = dict.fromkeys(range(len(configs)), 0.0)
        for config in configs:
            regmodels.reset_executed_counts(config.model)
        for _ in range(steps):
            indices = list(range(len(configs)))
            order.shuffle(indices)
            for i in indices:
                started = clock()
                configs[i].step()
                seconds[i] += clock() - started
        for i, config in enumerate(configs):
            config.seconds.append(seconds[i] / steps)
            config.executed.append(regmodels.executed_fraction(config.model))


def ratios(stochastic: Config, plain: Config) -> list[float]:
    return [s / p for s, p in zip(stochastic.seconds, plain.seconds, strict=True)]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def run(
    *,
    depth: int,
    batch_size: int,
    rounds: int,
    steps: int,
    warmup: int,
    device: torch.device,
    channels_last: bool = False,
    bf16: bool = False,
    seed: int = 0,
    clock: str = "wall",
    header: str = "",
) -> dict[str, list[float]]:
    """Measure the four configurations and print the table; return the per-round ratios."""
    torch.manual_seed(seed)
    batches = random_batches(batch_size, device, channels_last=channels_last)
    configs = []
    for library in ("regmodels", "torchvision"):
        for survival_prob in (1.0, SURVIVAL_PROB):
            model = build_model(library, survival_prob, depth).to(device).train()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            step = make_step(model, batches, bf16=bf16, device=device)
            configs.append(Config(library, survival_prob, step, model))

    started = time.perf_counter()
    timer = CLOCKS[clock]
    measure_interleaved(configs, rounds=rounds, steps=steps, warmup=warmup, seed=seed, clock=timer)
    elapsed = time.perf_counter() - started

    # Per-configuration step times, then the ratios the benchmark is about.
    schedule = regmodels.survival_schedule(3 * ((depth - 2) // 6), SURVIVAL_PROB)
    expected = regmodels.expected_executed_fraction(schedule)
    by_label = {c.label: c for c in configs}
    result = {
        library: ratios(by_label[f"{library} p_L={SURVIVAL_PROB:g}"], by_label[f"{library} p_L=1"])
        for library in ("regmodels", "torchvision")
    }
    print(header or f"ResNet-{depth} training step, CIFAR-shaped random data")
    print(
        f"batch {batch_size}, device {device}, {torch.get_num_threads()} CPU threads, "
        f"channels_last={channels_last}, bf16={bf16}; {rounds} rounds x {steps} steps per "
        f"configuration, interleaved; {clock} clock; {elapsed:.0f} s"
    )
    print()
    print(f"{'configuration':<28} {'step ms, median [min, max] over rounds':>40}")
    for config in configs:
        ms = [1e3 * s for s in config.seconds]
        print(f"{config.label:<28} {spread(ms):>40}")
    print()
    print(f"{'ratio p_L=0.5 / no stochastic depth':<44} {'median [min, max]':>24} {'n':>4}")
    print(
        f"{'regmodels (skips dropped blocks)':<44} {spread(result['regmodels']):>24} {rounds:>4}"
    )
    label = 'torchvision StochasticDepth(mode="row")'
    print(f"{label:<44} {spread(result['torchvision']):>24} {rounds:>4}")
    print()
    executed = by_label[f"regmodels p_L={SURVIVAL_PROB:g}"].executed
    print(f"expected compute fraction (mean p_l over {len(schedule)} blocks): {expected:.3f}")
    print(f"executed fraction measured (regmodels, per round): {spread(executed)}")
    verdict = "met" if statistics.median(result["regmodels"]) <= 0.80 else "NOT met"
    print(f"goal regmodels ratio <= 0.80: {verdict}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=DEPTH, help="6n + 2 (default 110)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared 2-core machine a second intra-op thread "
        "makes step times swing tenfold; 0 keeps torch's default)",
    )
    parser.add_argument("--channels-last", action="store_true", help="channels_last format")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="what a step's time is: CPU time of this process or wall clock "
        "(default: process on cpu with one thread, wall otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clock is None:
        args.clock = "process" if args.device == "cpu" and args.threads == 1 else "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    run(
        depth=args.depth,
        batch_size=args.batch_size,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        device=torch.device(args.device),
        channels_last=args.channels_last,
        bf16=args.bf16,
        seed=args.seed,
        clock=args.clock,
    )


if __name__ == "__main__":
    main()
