"""A small fake CIFAR-10 / CIFAR-100 written in torchvision's on-disk format.

The real datasets are python pickles of dicts: `cifar-10-batches-py/` holds `data_batch_1..5`,
`test_batch` and `batches.meta`; `cifar-100-python/` holds `train`, `test` and `meta`. Each
batch has `data` (uint8, one row of 3 x 32 x 32 = 3072 values per image, channel-major) and its
labels (`labels` for CIFAR-10; `fine_labels` and `coarse_labels` for CIFAR-100). This module
writes the same files with fewer images, so that torchvision's own dataset classes read them.

torchvision checks each file's md5 against the real dataset's. `trust` makes a test accept the
fake files by setting the expected md5s to theirs, through pytest's monkeypatch, so that the
production code keeps its integrity checks untouched.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10, CIFAR100

CLASSES = {"cifar10": 10, "cifar100": 100}
DATASET_CLASS = {"cifar10": CIFAR10, "cifar100": CIFAR100}
# The real files are protocol-2 pickles written by Python 2; protocol 2 keeps the fakes close.
PICKLE_PROTOCOL = 2


@dataclass(frozen=True)
class FakeCifar:
    """What was written: images as uint8 (N, 3, 32, 32), fine labels, and each file's md5."""

    name: str
    root: Path
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    md5: dict[str, str]

    @property
    def folder(self) -> Path:
        return self.root / DATASET_CLASS[self.name].base_folder


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(rng: np.random.Generator, labels: np.ndarray, classes: int) -> np.ndarray:
    """Noise around a colour per class: learnable, and every image distinct from the others."""
    colours = rng.integers(40, 216, size=(classes, 3, 1, 1))
    noise = rng.integers(-40, 41, size=(len(labels), 3, 32, 32))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)


def _dump(path: Path, entry: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=PICKLE_PROTOCOL)


def write_fake_cifar(
    root: str | Path, name: str = "cifar10", train: int = 500, test: int = 100, seed: int = 0
) -> FakeCifar:
    """Write `train` training and `test` test images of dataset `name` under `root`.

    CIFAR-10's training images are spread over its five batch files, as in the real one; the
    labels cycle through every class so that each class is present.
    """
    classes = CLASSES[name]
    cls = DATASET_CLASS[name]
    rng = np.random.default_rng(seed)
    folder = Path(root) / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)

    # Labels and images; CIFAR-100's coarse label is a different number from its fine one.
    train_y = rng.permutation(np.arange(train) % classes)
    test_y = rng.permutation(np.arange(test) % classes)
    train_x = _images(rng, train_y, classes)
    test_x = _images(rng, test_y, classes)

    def entry(x: np.ndarray, y: np.ndarray, label: str) -> dict:
        rows = x.reshape(len(x), -1)
        names = [f"fake_{label}_{i}.png" for i in range(len(x))]
        if name == "cifar10":
            return {"batch_label": label, "labels": y.tolist(), "data": rows, "filenames": names}
        coarse = (y // 5).tolist()
        return {
            "batch_label": label,
            "fine_labels": y.tolist(),
            "coarse_labels": coarse,
            "data": rows,
            "filenames": names,
        }

    # The batch files, then the metadata with the class names.
    train_files = [file for file, _ in cls.train_list]
    chunks = np.array_split(np.arange(train), len(train_files))
    for file, chunk in zip(train_files, chunks, strict=True):
        _dump(folder / file, entry(train_x[chunk], train_y[chunk], f"training {file}"))
    _dump(folder / cls.test_list[0][0], entry(test_x, test_y, "testing batch"))
    if name == "cifar10":
        meta = {
            "label_names": [f"class_{i}" for i in range(classes)],
            "num_cases_per_batch": len(chunks[0]),
            "num_vis": 3072,
        }
    else:
        meta = {
            "fine_label_names": [f"fine_{i}" for i in range(classes)],
            "coarse_label_names": [f"coarse_{i}" for i in range(classes // 5)],
        }
    _dump(folder / cls.meta["filename"], meta)

    md5 = {path.name: _md5(path) for path in folder.iterdir()}
    return FakeCifar(name, Path(root), train_x, train_y, test_x, test_y, md5)


def trust(monkeypatch: pytest.MonkeyPatch, fake: FakeCifar) -> None:
    """Make torchvision's integrity check expect the fake files' md5s, for this test only."""
    cls = DATASET_CLASS[fake.name]
    monkeypatch.setattr(cls, "train_list", [[f, fake.md5[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, fake.md5[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": fake.md5[cls.meta["filename"]]})
