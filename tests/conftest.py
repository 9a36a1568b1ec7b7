"""Shared test setup."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one intra-op thread is fastest, and immune to OpenMP stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """The device of the device-relevant tests (tests/test_device.py): ``MTML_TEST_DEVICE`` (default ``cpu``).
    Asking for a device this machine lacks fails the tests instead of skipping them."""
    name = os.environ.get("MTML_TEST_DEVICE", "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"MTML_TEST_DEVICE={name}, but torch sees no CUDA device here (torch {torch.__version__}).")
    return device
