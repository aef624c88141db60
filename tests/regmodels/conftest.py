"""Fixtures for the model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one thread: these tests use tiny tensors, for which a second thread only adds
    contention on a shared 2-core machine (a ResNet-20 step on 4x4 inputs is ~6x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
