"""Shared test settings."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """The tests use tiny tensors: intra-op thread synchronisation costs more than the work itself
    (measured: ~30 ms instead of 0.1 ms per tiny conv with 2 threads when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # NumPy/SciPy BLAS too (the QR, PLS and eigen solvers)
        yield
    torch.set_num_threads(threads)
