"""Shared test setup."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one intra-op thread is fastest, and immune to OpenMP stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
