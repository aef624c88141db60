"""Datasets: loading the CIFAR formats, seeded disjoint splits, device batches, augmentation.

CIFAR is read from a small fake written in torchvision's on-disk format (tests/fake_cifar.py);
nothing is downloaded. Random things are checked with fixed seeds and stated tolerances.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import cifar as tv_cifar

from sweeps import data as sweeps_data
from sweeps.data import (
    DATA_ROOT_ENV,
    DEFAULT_CIFAR_VAL_SIZE,
    DatasetError,
    DeviceSplit,
    Split,
    StagedData,
    channel_stats,
    data_root,
    loads_in_process,
    random_crop,
    random_flip,
    stage_dataset,
)
from sweeps.spec import Augment, DatasetSpec
from tests.fake_cifar import FakeCifar, trust, write_fake_cifar

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def keys(x: np.ndarray) -> list[bytes]:
    """One hashable key per image; every fake image is distinct, so keys identify images."""
    return [image.tobytes() for image in x]


class Downloads:
    """Stands in for torchvision's download function: counts calls and fails or writes files."""

    def __init__(self, fake: FakeCifar | None = None, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.fake = fake
        self.delay_s = delay_s

    def __call__(self, url: str, root: str, **kwargs: object) -> None:
        self.calls += 1
        if self.fake is None:
            raise OSError("no network in tests")
        time.sleep(self.delay_s)
        write_fake_cifar(root, self.fake.name, len(self.fake.train_y), len(self.fake.test_y))


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> Downloads:
    """No test may reach the network: any download attempt is counted and fails."""
    recorder = Downloads()
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", recorder)
    return recorder


@pytest.fixture
def cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCifar:
    fake = write_fake_cifar(tmp_path / "data", "cifar10", train=500, test=100, seed=1)
    trust(monkeypatch, fake)
    return fake


@pytest.fixture
def cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCifar:
    fake = write_fake_cifar(tmp_path / "data", "cifar100", train=600, test=200, seed=2)
    trust(monkeypatch, fake)
    return fake


def cifar_spec(fake: FakeCifar, **fields: object) -> DatasetSpec:
    return DatasetSpec(**{"name": fake.name, "root": str(fake.root), "val_size": 50, **fields})


# Loading and splitting -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_loads_both_cifar_formats_with_their_labels(
    name: str, request: pytest.FixtureRequest, downloads: Downloads
) -> None:
    fake: FakeCifar = request.getfixturevalue(name)
    staged = stage_dataset(cifar_spec(fake))

    assert staged.num_classes == {"cifar10": 10, "cifar100": 100}[name]
    assert staged.max_value == 255.0
    assert staged.in_channels == 3 and staged.image_size == (32, 32)
    total = len(fake.train_y)
    assert staged.sizes() == {"train": total - 50, "val": 50, "test": len(fake.test_y)}
    for split in (staged.train, staged.val, staged.test):
        assert split.x.dtype == np.uint8 and split.x.shape[1:] == (3, 32, 32)
        assert split.y.dtype == np.int64

    # Every image keeps its own (fine, for CIFAR-100) label through the split.
    label_of = dict(zip(keys(fake.train_x), fake.train_y.tolist(), strict=True))
    for split in (staged.train, staged.val):
        assert [label_of[k] for k in keys(split.x)] == split.y.tolist()
    np.testing.assert_array_equal(staged.test.x, fake.test_x)
    np.testing.assert_array_equal(staged.test.y, fake.test_y)
    assert downloads.calls == 0


def test_train_and_val_are_disjoint_and_cover_the_training_set(
    cifar10: FakeCifar, downloads: Downloads
) -> None:
    staged = stage_dataset(cifar_spec(cifar10, val_size=120))
    train, val = set(keys(staged.train.x)), set(keys(staged.val.x))

    assert len(train) == 380 and len(val) == 120
    assert not train & val
    assert train | val == set(keys(cifar10.train_x))
    assert not (train | val) & set(keys(cifar10.test_x))


def test_same_seed_same_split_other_seed_other_split(
    cifar10: FakeCifar, downloads: Downloads
) -> None:
    first = stage_dataset(cifar_spec(cifar10, split_seed=7))
    again = stage_dataset(cifar_spec(cifar10, split_seed=7))
    other = stage_dataset(cifar_spec(cifar10, split_seed=8))

    np.testing.assert_array_equal(first.val.x, again.val.x)
    np.testing.assert_array_equal(first.train.y, again.train.y)
    assert first.mean == again.mean and first.std == again.std
    assert set(keys(first.val.x)) != set(keys(other.val.x))


def test_cifar_default_holds_out_the_papers_5000(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, downloads: Downloads
) -> None:
    fake = write_fake_cifar(tmp_path, "cifar10", train=DEFAULT_CIFAR_VAL_SIZE + 100, test=10)
    trust(monkeypatch, fake)
    staged = stage_dataset(DatasetSpec(name="cifar10", root=str(tmp_path)))
    assert DEFAULT_CIFAR_VAL_SIZE == 5_000
    assert staged.sizes() == {"train": 100, "val": 5_000, "test": 10}


def test_digits_is_split_three_ways() -> None:
    before = loads_in_process()
    staged = stage_dataset(DatasetSpec(name="digits", val_size=200, test_size=300))

    assert staged.sizes() == {"train": 1_797 - 500, "val": 200, "test": 300}
    assert staged.in_channels == 1 and staged.image_size == (8, 8)
    assert staged.max_value == 16.0 and staged.num_classes == 10
    assert int(staged.train.x.max()) <= 16
    assert loads_in_process() == before + 1


def test_a_holdout_as_large_as_the_data_is_refused(
    cifar10: FakeCifar, downloads: Downloads
) -> None:
    with pytest.raises(ValueError, match=r"dataset\.val_size=500 leaves no training data"):
        stage_dataset(cifar_spec(cifar10, val_size=500))


# The cache directory: where, missing files, corrupt files, downloading once ------------------


def test_cache_directory_is_spec_root_then_env_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "from-env"))
    assert data_root(DatasetSpec(root=str(tmp_path / "spec"))) == tmp_path / "spec"
    assert data_root(DatasetSpec()) == tmp_path / "from-env"
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert data_root(DatasetSpec()) == Path("~/.cache/regsweep").expanduser()


def test_env_variable_points_staging_at_the_cache(
    cifar10: FakeCifar, monkeypatch: pytest.MonkeyPatch, downloads: Downloads
) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(cifar10.root))
    staged = stage_dataset(DatasetSpec(name="cifar10", val_size=50, download=False))
    assert len(staged.train) == 450


def test_missing_files_without_download_name_the_folder_and_the_fix(
    tmp_path: Path, downloads: Downloads
) -> None:
    spec = DatasetSpec(name="cifar100", root=str(tmp_path), download=False)
    with pytest.raises(DatasetError) as error:
        stage_dataset(spec)
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "dataset.download" in message and DATA_ROOT_ENV in message
    assert downloads.calls == 0


def test_a_corrupt_file_fails_the_integrity_check(
    cifar10: FakeCifar, downloads: Downloads
) -> None:
    batch = cifar10.folder / "data_batch_3"
    raw = bytearray(batch.read_bytes())
    raw[-10] ^= 0xFF
    batch.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="missing or corrupt"):
        stage_dataset(cifar_spec(cifar10, download=False))


def test_a_failed_download_says_how_to_fix_it(tmp_path: Path, downloads: Downloads) -> None:
    with pytest.raises(DatasetError, match="could not be downloaded") as error:
        stage_dataset(DatasetSpec(name="cifar10", root=str(tmp_path / "empty")))
    assert "no network in tests" in str(error.value)
    assert downloads.calls == 1
    assert not (tmp_path / "empty").exists()  # the cache folder it made is removed again


def test_downloads_once_then_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The md5s of the files a "download" will write (the fake is deterministic in its seed).
    reference = write_fake_cifar(tmp_path / "reference", "cifar10", train=300, test=60)
    trust(monkeypatch, reference)
    downloader = Downloads(fake=reference)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", downloader)
    spec = DatasetSpec(name="cifar10", root=str(tmp_path / "cache"), val_size=30)

    first = stage_dataset(spec)
    second = stage_dataset(spec)
    assert downloader.calls == 1
    np.testing.assert_array_equal(first.train.x, second.train.x)


def test_two_drivers_staging_at_once_download_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two sweeps started together on one machine share the cache directory: the lock makes
    # the second wait for the first's download instead of downloading into the same folder.
    reference = write_fake_cifar(tmp_path / "reference", "cifar10", train=300, test=60)
    trust(monkeypatch, reference)
    downloader = Downloads(fake=reference, delay_s=0.5)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", downloader)
    spec = DatasetSpec(name="cifar10", root=str(tmp_path / "cache"), val_size=30)

    results: list[StagedData] = []
    threads = [
        threading.Thread(target=lambda: results.append(stage_dataset(spec))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2
    assert downloader.calls == 1


def test_a_cache_where_no_lock_can_be_made_is_still_read(
    cifar10: FakeCifar, monkeypatch: pytest.MonkeyPatch, downloads: Downloads
) -> None:
    # As in a read-only, pre-filled dataset directory: the lock file cannot be created.
    monkeypatch.setattr(sweeps_data, "LOCK_FILE", "no-such-folder/lock")
    staged = stage_dataset(cifar_spec(cifar10, download=False))
    assert len(staged.val) == 50
    assert not (cifar10.root / "no-such-folder").exists()


# Normalization and device batches ------------------------------------------------------------


def test_channel_stats_match_a_float64_computation(cifar10: FakeCifar) -> None:
    scaled = cifar10.train_x.astype(np.float64) / 255.0
    mean, std = channel_stats(cifar10.train_x, 255.0)
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 2, 3)), rtol=1e-12)

    constant = np.full((4, 2, 3, 3), 7, dtype=np.uint8)
    assert channel_stats(constant, 16.0) == ((7 / 16, 7 / 16), (1.0, 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_device_split_is_normalized_per_channel_on_the_device(
    device: str, cifar10: FakeCifar, downloads: Downloads
) -> None:
    staged = stage_dataset(cifar_spec(cifar10))
    train = DeviceSplit(staged.train, staged, torch.device(device))

    assert train.x.device.type == device and train.y.device.type == device
    assert train.x.dtype == torch.float32 and train.x.shape == (450, 3, 32, 32)
    x = train.x.double()
    # The statistics are the training split's, so there it is exactly zero mean, unit std.
    zeros = torch.zeros(3, dtype=x.dtype, device=device)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), zeros, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), zeros + 1, atol=1e-5, rtol=0)

    # The same affine map, pixel by pixel, as computed on the host.
    raw = torch.as_tensor(staged.train.x[:5], dtype=torch.float64) / 255.0
    mean = torch.tensor(staged.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(staged.std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(x[:5].cpu(), (raw - mean) / std, atol=1e-5, rtol=0)


def test_device_split_reads_ray_style_read_only_arrays_without_warning(
    cifar10: FakeCifar, downloads: Downloads
) -> None:
    staged = stage_dataset(cifar_spec(cifar10))
    x, y = staged.val.x.copy(), staged.val.y.copy()
    x.setflags(write=False)
    y.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = DeviceSplit(Split(x, y), staged, torch.device("cpu"))
    assert len(split) == 50
    np.testing.assert_array_equal(x, staged.val.x)


def labelled_split(n: int) -> tuple[Split, StagedData]:
    """n distinct tiny images whose label is their index, to follow each one through batches."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8)
    split = Split(x, np.arange(n, dtype=np.int64))
    return split, StagedData("toy", split, split, split, n, 255.0, (0.5,), (0.25,))


def test_an_epoch_visits_each_example_once_and_drops_the_partial_batch() -> None:
    split, staged = labelled_split(100)
    train = DeviceSplit(split, staged, torch.device("cpu"), augment=Augment())
    generator = torch.Generator().manual_seed(0)

    batches = list(train.batches(32, generator))
    assert [len(y) for _, y in batches] == [32, 32, 32]
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 96
    assert seen.tolist() != sorted(seen.tolist())
    for x, y in batches:  # no augmentation asked for: the stored images, in the drawn order
        torch.testing.assert_close(x, train.x[y])

    # Evaluation: fixed order, every example, the last batch partial.
    evaluated = list(train.batches(32))
    assert [len(y) for _, y in evaluated] == [32, 32, 32, 4]
    assert torch.cat([y for _, y in evaluated]).tolist() == list(range(100))


def test_augmented_epochs_are_reproducible_from_the_seed() -> None:
    split, staged = labelled_split(256)
    train = DeviceSplit(split, staged, torch.device("cpu"), Augment(crop_padding=2, flip=True))

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(train.batches(64, torch.Generator().manual_seed(seed)))

    first, again, other = epoch(3), epoch(3), epoch(4)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    assert first[0][0].shape == (64, 1, 4, 4)


# Augmentation statistics ---------------------------------------------------------------------


def test_flip_rate_is_one_half_and_flips_are_exact_mirrors() -> None:
    n = 20_000
    x = torch.rand(n, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    out = random_flip(x, torch.Generator().manual_seed(1))

    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())  # each sample is exactly one of the two
    # Binomial(20000, 1/2): standard deviation 0.0035; the tolerance is over 4 of them.
    assert abs(flipped.float().mean().item() - 0.5) < 0.015


def test_crops_are_shifts_within_the_padding_filled_with_zeros() -> None:
    n, pad, size = 4_900, 3, 8
    # Positive, distinct pixel values: a zero can only come from the padding.
    x = torch.randperm(n * 2 * size * size, generator=torch.Generator().manual_seed(0))
    x = (x.view(n, 2, size, size) + 1).float()
    out = random_crop(x, pad, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype

    # For each sample, which of the (2p+1)^2 translations of the original reproduces it?
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    shifts = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)]
    matches = np.stack(
        [
            (
                out.numpy() == padded[:, :, pad + dy : pad + dy + size, pad + dx : pad + dx + size]
            ).all(axis=(1, 2, 3))
            for dy, dx in shifts
        ],
        axis=1,
    )
    assert (matches.sum(axis=1) == 1).all()  # exactly one shift, within the padding

    # The shifts are uniform: 100 expected per shift; Poisson sd 10, tolerance 5 sd.
    counts = matches.sum(axis=0)
    assert counts.min() > 50 and counts.max() < 150
    drawn = np.array(shifts)[matches.argmax(axis=1)]
    assert np.abs(drawn.mean(axis=0)).max() < 0.1  # no drift in either direction


def test_cifar_batches_keep_their_shape_through_crop_and_flip(
    cifar10: FakeCifar, downloads: Downloads
) -> None:
    staged = stage_dataset(cifar_spec(cifar10))
    augment = Augment(crop_padding=4, flip=True)
    train = DeviceSplit(staged.train, staged, torch.device("cpu"), augment)
    x, y = next(train.batches(128, torch.Generator().manual_seed(0)))

    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (128,)
    # Padding fills whole border rows or columns with zeros (the mean colour) in some samples,
    # and never touches the centre, which every crop within 4 pixels keeps.
    border_zero = (x[:, :, :, 0] == 0).all(dim=(1, 2)) | (x[:, :, :, -1] == 0).all(dim=(1, 2))
    assert 0 < int(border_zero.sum()) < 128
    centre = x[:, :, 4:28, 4:28]
    assert int((centre == 0).all(dim=(1, 2, 3)).sum()) == 0


def test_crop_with_zero_padding_is_the_identity() -> None:
    x = torch.rand(3, 1, 4, 4)
    assert random_crop(x, 0, torch.Generator().manual_seed(0)) is x


def test_pipeline_benchmark_runs_and_prints_its_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import data_pipeline

    ratios = data_pipeline.main(["--images", "96", "--batch-size", "32", "--epochs", "1"])
    out = capsys.readouterr().out
    for name in ("model steps alone", "regsweep: DeviceSplit", "torchvision: DataLoader"):
        assert name in out
    assert "goal, regsweep's epoch within 1.10x" in out
    # Each pipeline adds its own data time to the same model steps.
    assert ratios["regsweep_from_parts"] > 1 and ratios["torchvision_from_parts"] > 1
