"""One epoch of ResNet-20 on CIFAR-shaped data, through three pipelines, measured side by side.

    .venv/bin/python benchmarks/data_pipeline.py            # 2,560 images per epoch (20 steps)
    .venv/bin/python benchmarks/data_pipeline.py --full     # CIFAR's 45,000 training images

The three pipelines train the same model (three copies of one initialization) with the same
step function (forward, cross-entropy, backward, SGD step, loss read back):

- model steps alone: one fixed, already normalized batch, reused every step; no data work;
- regsweep: `sweeps.data.DeviceSplit` with the paper's augmentation (random crop from 4-pixel
  padding and horizontal flip), shuffled and augmented on the device, batch at a time;
- torchvision: a DataLoader over a torchvision-style dataset of PIL images with per-image
  transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize).

The pipelines run interleaved step by step (step i of each, in a rotating order), so that a
slow moment of a shared machine slows all three alike, and each pipeline's epoch time is the
sum of its own steps, batch fetches included, plus its per-epoch set-up (the shuffle, the
DataLoader iterator). Epochs are repeated; the table gives medians and ranges over them, and
the ratios are paired: each epoch's time over the model-alone time of the same epoch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import VisionDataset

import regmodels
from sweeps.data import DeviceSplit, Split, StagedData, channel_stats
from sweeps.spec import Augment

GOAL = 1.10  # regsweep's epoch at most this many times the model steps alone
CROP_PADDING = 4  # pixels, the paper's translation
FULL_IMAGES = 45_000  # CIFAR's training images after the paper's 5,000 held out

Batch = tuple[torch.Tensor, torch.Tensor]


class ArrayImages(VisionDataset):
    """A torchvision-style dataset: uint8 HWC images handed out as PIL images, one at a time.

    This is how torchvision's CIFAR10 serves its samples, without the files.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        super().__init__(root="", transform=transform)
        self.images = images
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def synthetic_cifar(n: int, seed: int) -> StagedData:
    """n random CIFAR-shaped uint8 images (3 x 32 x 32), 10 classes, staged as regsweep does."""
    rng = np.random.default_rng(seed)
    split = Split(
        rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8),
        rng.integers(0, 10, size=n).astype(np.int64),
    )
    mean, std = channel_stats(split.x, 255.0)
    return StagedData("cifar-shaped", split, split, split, 10, 255.0, mean, std)


class Trainer:
    """One model and its optimizer; `step` is the same work in every pipeline."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model.to(device).train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
        self.device = device

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Pipeline:
    """A name, a trainer, and a way to start an epoch's batch iterator."""

    def __init__(self, name: str, trainer: Trainer, start: Callable[[], Iterator[Batch]]) -> None:
        self.name = name
        self.trainer = trainer
        self.start = start
        self.batches: Iterator[Batch] = iter(())
        self.seconds = 0.0  # the whole epoch: its start, then every fetch and step
        self.start_seconds = 0.0  # the shuffle, or the DataLoader iterator's start
        self.data_seconds = 0.0  # fetching batches (and augmenting them), all steps together
        self.step_seconds: list[float] = []  # fetch + model step, one per step

    def begin(self) -> None:
        self.seconds = self.data_seconds = 0.0
        self.step_seconds = []
        started = time.perf_counter()
        self.batches = self.start()
        sync(self.trainer.device)
        self.start_seconds = time.perf_counter() - started
        self.seconds += self.start_seconds

    def one_step(self) -> None:
        device = self.trainer.device
        started = time.perf_counter()
        x, y = next(self.batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        sync(device)
        fetched = time.perf_counter()
        self.trainer.step(x, y)
        sync(device)
        self.data_seconds += fetched - started
        self.step_seconds.append(time.perf_counter() - started)
        self.seconds += self.step_seconds[-1]


def build_pipelines(
    data: StagedData, device: torch.device, batch_size: int, workers: int, seed: int
) -> tuple[list[Pipeline], float]:
    """The three pipelines, and the seconds DeviceSplit took to move and normalize the split."""
    torch.manual_seed(seed)
    model = regmodels.create_model(
        "resnet20", num_classes=10, in_channels=3, dropout=0.0, survival_prob=1.0
    )

    # regsweep: the split goes to the device once (timed: a once-per-trial cost).
    started = time.perf_counter()
    split = DeviceSplit(data.train, data, device, Augment(crop_padding=CROP_PADDING, flip=True))
    sync(device)
    setup_seconds = time.perf_counter() - started
    generator = torch.Generator(device=device).manual_seed(seed)

    # Model steps alone: one normalized batch, already on the device.
    fixed = (split.x[:batch_size].clone(), split.y[:batch_size].clone())

    def forever() -> Iterator[Batch]:
        while True:
            yield fixed

    # torchvision: per-image PIL transforms, batched by a DataLoader.
    per_image = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=CROP_PADDING),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(data.mean, data.std),
        ]
    )
    dataset = ArrayImages(data.train.x.transpose(0, 2, 3, 1).copy(), data.train.y, per_image)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )

    pipelines = [
        Pipeline("model steps alone", Trainer(copy.deepcopy(model), device), forever),
        Pipeline(
            "regsweep: DeviceSplit, crop+flip on the device",
            Trainer(copy.deepcopy(model), device),
            lambda: split.batches(batch_size, generator),
        ),
        Pipeline(
            "torchvision: DataLoader, per-image transforms",
            Trainer(copy.deepcopy(model), device),
            lambda: iter(loader),
        ),
    ]
    return pipelines, setup_seconds


def run_epoch(pipelines: list[Pipeline], steps: int) -> None:
    """One epoch of every pipeline, interleaved step by step in a rotating order."""
    for pipeline in pipelines:
        pipeline.begin()
    for step in range(steps):
        shift = step % len(pipelines)
        for pipeline in pipelines[shift:] + pipelines[:shift]:
            pipeline.one_step()


def spread(values: list[float], digits: int = 2) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the comparison, print the table, and return the median ratios it printed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2_560, help="training images per epoch")
    parser.add_argument("--full", action="store_true", help=f"use {FULL_IMAGES:,} images")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (n), after warm-up")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a trial's cpus_per_trial)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images = FULL_IMAGES if args.full else args.images
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    steps = images // args.batch_size
    data = synthetic_cifar(images, args.seed)
    pipelines, setup_seconds = build_pipelines(
        data, device, args.batch_size, args.workers, args.seed
    )

    # Warm-up: a few steps of each, untimed (allocator, kernel selection, first PIL calls).
    run_epoch(pipelines, min(3, steps))

    # Timed epochs; each pipeline keeps its epoch totals, its parts and its per-step times.
    epoch_s: dict[str, list[float]] = {p.name: [] for p in pipelines}
    overhead_s: dict[str, list[float]] = {p.name: [] for p in pipelines}
    step_s: dict[str, list[float]] = {p.name: [] for p in pipelines}
    data_ms: dict[str, list[float]] = {p.name: [] for p in pipelines}
    for epoch in range(args.epochs):
        run_epoch(pipelines, steps)
        for p in pipelines:
            epoch_s[p.name].append(p.seconds)
            overhead_s[p.name].append(p.start_seconds + p.data_seconds)
            step_s[p.name].extend(p.step_seconds)
            data_ms[p.name].append(1e3 * p.data_seconds / steps)
        times = ", ".join(f"{p.seconds:.1f} s" for p in pipelines)
        print(f"epoch {epoch + 1}/{args.epochs}: {times}", file=sys.stderr, flush=True)

    # Ratios to the model alone, paired epoch with epoch and step i with step i; and from the
    # parts: the model-alone epoch plus this pipeline's own data time (start and fetches),
    # which a busy machine disturbs far less than it disturbs whole steps.
    alone = pipelines[0].name

    def paired(times: dict[str, list[float]], name: str) -> list[float]:
        return [t / a for t, a in zip(times[name], times[alone], strict=True)]

    by_epoch = {p.name: paired(epoch_s, p.name) for p in pipelines}
    by_step = {p.name: paired(step_s, p.name) for p in pipelines}
    from_parts = {
        p.name: [1 + o / a for o, a in zip(overhead_s[p.name], epoch_s[alone], strict=True)]
        for p in pipelines
    }

    where = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"ResNet-20, {images:,} CIFAR-shaped images per epoch = {steps} steps of "
        f"{args.batch_size}, on {where} ({args.threads} torch threads), DataLoader "
        f"num_workers={args.workers}.\nn = {args.epochs} epochs ({args.epochs * steps} paired "
        "steps), the pipelines interleaved step by step. Cells: median (min-max)."
    )
    name_width = max(len(p.name) for p in pipelines)
    columns = [
        ("pipeline", name_width),
        ("epoch s", 19),
        ("data ms/step", 17),
        ("x model, by epoch", 19),
        ("x model, by step", 19),
        ("x model, from parts", 19),
    ]
    print("| " + " | ".join(f"{title:<{width}}" for title, width in columns) + " |")
    print("|" + "|".join("-" * (width + 2) for _, width in columns) + "|")
    for p in pipelines:
        cells = [
            p.name,
            spread(epoch_s[p.name]),
            spread(data_ms[p.name], 1),
            spread(by_epoch[p.name], 3),
            spread(by_step[p.name], 3),
            spread(from_parts[p.name], 3),
        ]
        row = " | ".join(
            f"{cell:<{width}}" for cell, (_, width) in zip(cells, columns, strict=True)
        )
        print(f"| {row} |")
    print(
        f"DeviceSplit set-up, once per trial (copy {images:,} images to {device.type} and "
        f"normalize them there): {setup_seconds:.3f} s"
    )

    # The goal, on the direct epoch pairing and on the parts.
    regsweep, torchvision = pipelines[1].name, pipelines[2].name
    direct = statistics.median(by_epoch[regsweep])
    parts = statistics.median(from_parts[regsweep])
    verdict = "met" if max(direct, parts) <= GOAL else "NOT met"
    print(
        f"goal, regsweep's epoch within {GOAL:.2f}x the model steps alone: {verdict} "
        f"(by epoch {direct:.3f}x, from parts {parts:.3f}x; torchvision DataLoader: "
        f"{statistics.median(by_epoch[torchvision]):.3f}x and "
        f"{statistics.median(from_parts[torchvision]):.3f}x)"
    )
    return {
        "regsweep_by_epoch": direct,
        "regsweep_from_parts": parts,
        "torchvision_by_epoch": statistics.median(by_epoch[torchvision]),
        "torchvision_from_parts": statistics.median(from_parts[torchvision]),
    }


if __name__ == "__main__":
    main()
