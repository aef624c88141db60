"""Datasets: staged once per sweep in the driver, trained from device-resident tensors.

`stage_dataset` runs in the driver only. It reads a dataset from its source (scikit-learn's
digits, or CIFAR-10/100 through torchvision's dataset classes, downloading them into the cache
directory once if they are not there), makes the seeded train/validation/test split and returns
uint8 arrays. The driver puts the result in Ray's object store, so trials never open dataset
files, never download and never take a file lock.

Inside a trial, `DeviceSplit` copies one split to the trial's device once, normalizes it there,
and draws shuffled mini-batches from those tensors with the augmentation applied per sample but
computed for the whole batch at once on the device: no per-image Python transforms and no
DataLoader workers between the data and the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The held-out sizes' defaults live in the spec, which fills them in when it is validated;
# they are imported here under their old names for the code and tests that read them.
from sweeps.spec import DEFAULT_CIFAR_VAL_SIZE as DEFAULT_CIFAR_VAL_SIZE
from sweeps.spec import DEFAULT_DIGITS_HOLDOUT as DEFAULT_DIGITS_HOLDOUT
from sweeps.spec import Augment, DatasetSpec

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "REGSWEEP_DATA"
DEFAULT_DATA_ROOT = "~/.cache/regsweep"
LOCK_FILE = ".regsweep.lock"
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}

# How many times this process has read a dataset from its source (files or scikit-learn).
# A trial reports its own count as `data_loads_in_worker`, so that a sweep shows in its
# record that only the driver ever loaded anything.
_loads_in_process = 0


class DatasetError(RuntimeError):
    """A dataset cannot be loaded; the message says where it was looked for and what to do."""


def loads_in_process() -> int:
    """Times this process read a dataset from its source: 1 in a sweep's driver, 0 in a trial."""
    return _loads_in_process


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, C, H, W) and integer class labels (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class StagedData:
    """A dataset split three ways, with the per-channel statistics of its training split.

    `max_value` is the largest raw pixel value (16 for digits, 255 for CIFAR); `mean` and `std`
    are per channel, on pixels scaled to [0, 1], over the training split only.
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
    root = spec.root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(root).expanduser()


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache directory while its files are checked and read.

    Two sweeps started at once on one machine would otherwise both find CIFAR missing and both
    download and unpack it into the same folder. Only drivers take this lock. A cache that
    cannot be written (a shared, read-only copy of the dataset) is read without one.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    handle = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            handle = open(root / LOCK_FILE, "a")  # noqa: SIM115 (closed below)
    if handle is None:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing releases the lock


def _load_digits() -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]
    return Split(x, bunch.target.astype(np.int64))


def _load_cifar(spec: DatasetSpec) -> tuple[Split, Split]:
    """CIFAR's training and test sets through torchvision, which checks every file's md5.

    With `download` true, torchvision fetches and unpacks the archive only when the files are
    missing or corrupt; a second sweep on the same cache reads the files already there.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if spec.name == "cifar10" else CIFAR100
    root = data_root(spec)
    created = spec.download and not root.exists()
    if spec.download:
        root.mkdir(parents=True, exist_ok=True)
    try:
        return _read_cifar(cls, spec, root)
    except DatasetError:
        if created:  # a refused sweep leaves nothing behind: the folder it made, if empty
            with contextlib.suppress(OSError):
                (root / LOCK_FILE).unlink()
                root.rmdir()
        raise


def _read_cifar(cls: type, spec: DatasetSpec, root: Path) -> tuple[Split, Split]:
    folder = root / cls.base_folder
    splits = []
    with _cache_lock(root):
        for train in (True, False):
            try:
                # The download check (an md5 of every file) is needed once, not per split.
                ds = cls(str(root), train=train, download=spec.download and train)
            except RuntimeError as error:
                raise DatasetError(
                    f"{spec.name} is missing or corrupt in {folder} ({error}). Set "
                    f"dataset.download: true, copy torchvision's {cls.base_folder}/ folder "
                    f"there, or point dataset.root or ${DATA_ROOT_ENV} at a directory that "
                    "holds it"
                ) from None
            except OSError as error:
                raise DatasetError(
                    f"{spec.name} could not be downloaded into {root} ({error}). Download "
                    f"{cls.url} on a machine with internet access, unpack it into {root}, "
                    f"or point dataset.root or ${DATA_ROOT_ENV} at a directory that holds it"
                ) from None
            x = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
            splits.append(Split(x, np.asarray(ds.targets, dtype=np.int64)))
    return splits[0], splits[1]


def _holdout(split: Split, size: int, rng: np.random.Generator, what: str) -> tuple[Split, Split]:
    """Hold `size` random examples out of `split`: (the rest, the held-out ones)."""
    if size >= len(split):
        raise ValueError(
            f"dataset.{what}={size} leaves no training data out of {len(split)} examples; "
            f"choose a {what} below {len(split)}"
        )
    order = rng.permutation(len(split))
    keep, held = order[size:], order[:size]
    return Split(split.x[keep], split.y[keep]), Split(split.x[held], split.y[held])


def channel_stats(x: np.ndarray, max_value: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), scaled to [0, 1].

    Exact, from a histogram of each channel's 256 possible values: no float copy of the
    training split is made (45,000 CIFAR images would take 1.1 GB in float64). A constant
    channel gets std 1 so that normalizing it never divides by zero.
    """
    values = np.arange(256, dtype=np.float64) / max_value
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        mean = counts @ values / counts.sum()
        std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
        means.append(float(mean))
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)


def stage_dataset(spec: DatasetSpec) -> StagedData:
    """Load `spec.name`, split it with `spec.split_seed`, and compute training statistics.

    Digits (1,797 images of 8x8, 17 grey levels) has no test set of its own: `test_size` and
    then `val_size` examples are held out of it. CIFAR keeps its own 10,000 test images and
    holds `val_size` (default 5,000, the paper's 45k/5k split) out of its 50,000 training ones.
    The sizes are the spec's, whose validation filled in any that the spec file left out.
    Call it in the driver only; trials receive the result through Ray's object store.
    """
    global _loads_in_process
    started = time.perf_counter()
    rng = np.random.default_rng(spec.split_seed)

    # Read the source, once: this is the count a sweep's trials must never increase.
    _loads_in_process += 1
    if spec.name == "digits":
        pool = _load_digits()
        pool, test = _holdout(pool, spec.test_size, rng, "test_size")
        num_classes, max_value = 10, 16.0
    else:
        pool, test = _load_cifar(spec)
        num_classes, max_value = CIFAR_CLASSES[spec.name], 255.0
    train, val = _holdout(pool, spec.val_size, rng, "val_size")

    # Normalization statistics come from the training split alone.
    mean, std = channel_stats(train.x, max_value)
    staged = StagedData(spec.name, train, val, test, num_classes, max_value, mean, std)
    log.info(
        "staged %s in %.1f s: %s, mean %s, std %s",
        spec.name,
        time.perf_counter() - started,
        staged.sizes(),
        [round(m, 4) for m in mean],
        [round(s, 4) for s in std],
    )
    return staged


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the original size from a batch (N, C, H, W) padded with zeros.

    Each sample is shifted by its own offset in [-padding, padding] pixels on each axis, and
    the uncovered border is filled with zeros. On normalized images zero is the training mean
    colour, which is what the stochastic-depth paper's translation fills in. The crops are
    gathered for the whole batch at once on x's device.
    """
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=generator)

    # Every window of the original size, as a view (N, C, 2p+1, 2p+1, H, W); pick one each.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    samples = torch.arange(n, device=x.device)
    return windows[samples, :, offsets[0], offsets[1]]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample of a batch (N, C, H, W) left-right with probability one half."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class DeviceSplit:
    """One split, normalized once on `device`, served as mini-batches from device memory.

    `x` holds the normalized images as float32 (N, C, H, W) and `y` the labels, both on
    `device`. A trial builds one per split; nothing is read from disk or the host afterwards.
    """

    def __init__(
        self, split: Split, data: StagedData, device: torch.device, augment: Augment | None = None
    ) -> None:
        # Arrays fetched from Ray's object store are read-only views of shared memory; torch
        # warns about that, but they are only read, and copied to the device at once.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            images = torch.as_tensor(split.x)
            labels = torch.as_tensor(split.y)

        # Copy uint8 (a quarter of the bytes of float32), then scale and normalize in place
        # on the device.
        x = images.to(device).to(torch.float32, copy=True)
        mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.x = x.div_(data.max_value).sub_(mean).div_(std)
        self.y = labels.to(device=device, dtype=torch.int64)
        active = augment is not None and (augment.crop_padding > 0 or augment.flip)
        self.augment = augment if active else None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches in a random order (when `generator` is given) with augmentation.

        The order and every crop and flip come from `generator`, which must live on this
        split's device: the same seed gives the same epoch. Without a generator the order is
        fixed and nothing is augmented: for evaluation.
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
