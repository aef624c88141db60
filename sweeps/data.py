"""Datasets: staged once per sweep in the driver, trained from device-resident tensors.

`stage_dataset` loads a dataset (downloading it once if needed), makes the seeded
train/validation/test split and returns uint8 arrays. The driver puts the result in Ray's object
store, so trials never open dataset files. Inside a trial, `DeviceSplit` moves one split to the
trial's device once, normalizes it there, and draws shuffled, augmented mini-batches from those
tensors: no per-image Python transforms, no DataLoader workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sweeps.spec import Augment, DatasetSpec

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "REGSWEEP_DATA"
DEFAULT_CIFAR_VAL_SIZE = 5_000
DEFAULT_DIGITS_HOLDOUT = 270

# How many times this process has loaded a dataset from its source; trials report theirs so
# that a sweep can show that only the driver ever loaded anything.
_loads_in_process = 0


def loads_in_process() -> int:
    return _loads_in_process


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, C, H, W) and integer labels (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class StagedData:
    """A dataset split three ways, with the per-channel statistics of its training split.

    `max_value` is the largest raw pixel value (16 for digits, 255 for CIFAR); `mean` and `std`
    are per channel, on pixels scaled to [0, 1].
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    max_value: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.x.shape[2]), int(self.train.x.shape[3])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def data_root(spec: DatasetSpec) -> Path:
    """Cache directory: the spec's `root`, else $REGSWEEP_DATA, else ~/.cache/regsweep."""
    root = spec.root or os.environ.get(DATA_ROOT_ENV) or "~/.cache/regsweep"
    return Path(root).expanduser()


def _load_digits() -> tuple[Split, None]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]
    return Split(x, bunch.target.astype(np.int64)), None


def _load_cifar(name: str, spec: DatasetSpec) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root = data_root(spec)
    root.mkdir(parents=True, exist_ok=True)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=spec.download)
        except RuntimeError as error:
            raise RuntimeError(
                f"{name} is not in {root} and could not be loaded ({error}); put the "
                f"torchvision files there, or set dataset.root / ${DATA_ROOT_ENV}"
            ) from None
        x = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
        splits.append(Split(x, np.asarray(ds.targets, dtype=np.int64)))
    return splits[0], splits[1]


def _holdout(split: Split, size: int, rng: np.random.Generator, what: str) -> tuple[Split, Split]:
    if size >= len(split):
        raise ValueError(f"{what}={size} leaves no training data out of {len(split)} examples")
    order = rng.permutation(len(split))
    keep, held = order[size:], order[:size]
    return Split(split.x[keep], split.y[keep]), Split(split.x[held], split.y[held])


def stage_dataset(spec: DatasetSpec) -> StagedData:
    """Load `spec.name`, split it with `spec.split_seed`, and compute training statistics.

    Digits (1,797 images of 8x8, 17 grey levels) has no test set of its own: `test_size` and
    then `val_size` examples are held out of it. CIFAR keeps its own 10,000 test images and
    holds `val_size` (default 5,000, the paper's 45k/5k split) out of its 50,000 training ones.
    """
    global _loads_in_process
    _loads_in_process += 1
    rng = np.random.default_rng(spec.split_seed)

    if spec.name == "digits":
        pool, _ = _load_digits()
        pool, test = _holdout(pool, spec.test_size or DEFAULT_DIGITS_HOLDOUT, rng, "test_size")
        train, val = _holdout(pool, spec.val_size or DEFAULT_DIGITS_HOLDOUT, rng, "val_size")
        num_classes, max_value = 10, 16.0
    else:
        pool, test = _load_cifar(spec.name, spec)
        train, val = _holdout(pool, spec.val_size or DEFAULT_CIFAR_VAL_SIZE, rng, "val_size")
        num_classes, max_value = (10 if spec.name == "cifar10" else 100), 255.0

    scaled = train.x.astype(np.float64) / max_value
    mean = tuple(float(m) for m in scaled.mean(axis=(0, 2, 3)))
    std = tuple(float(s) for s in scaled.std(axis=(0, 2, 3)))
    staged = StagedData(spec.name, train, val, test, num_classes, max_value, mean, std)
    log.info("staged %s: %s", spec.name, staged.sizes())
    return staged


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the original size from a zero-padded batch (N, C, H, W).

    Each sample gets its own shift in [-padding, padding] on each axis; the crop is gathered
    for the whole batch at once on x's device.
    """
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    shifts = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=generator)
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample left-right with probability one half."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class DeviceSplit:
    """One split, normalized once on `device`, served as mini-batches from device memory."""

    def __init__(
        self, split: Split, data: StagedData, device: torch.device, augment: Augment | None = None
    ) -> None:
        x = torch.as_tensor(np.asarray(split.x)).to(device=device, dtype=torch.float32)
        mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.x = (x / data.max_value - mean) / std
        self.y = torch.as_tensor(np.asarray(split.y)).to(device=device)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches in a random order (when `generator` is given) with augmentation.

        Without a generator the order is fixed and nothing is augmented: for evaluation.
        """
        n = len(self)
        if generator is None:
            for start in range(0, n, batch_size):
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            return
        order = torch.randperm(n, device=self.x.device, generator=generator)
        # Training drops the last partial batch (a fresh one each epoch, as the order changes)
        # so that batch norm never sees a batch of one.
        usable = n - n % batch_size if n >= batch_size else n
        for start in range(0, usable, batch_size):
            index = order[start : start + batch_size]
            x = self.x[index]
            if self.augment is not None:
                x = random_crop(x, self.augment.crop_padding, generator)
                if self.augment.flip:
                    x = random_flip(x, generator)
            yield x, self.y[index]
