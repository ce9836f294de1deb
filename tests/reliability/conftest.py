"""Fixtures of the reliability tests: one torch thread (see `one_torch_thread`)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Train the tiny model on one thread: on a busy 2-core machine two threads spin against each other
    and make every small matmul ~100x slower (measured: 8 ms vs 30 us for a 32x32 linear)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
