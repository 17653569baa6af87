"""Shared test settings."""

from __future__ import annotations

import os
from pathlib import Path

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


_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The folder of Debian's ``dataset-fashion-mnist`` files (the four gzipped idx files).

    Missing files fail the test in CI (``CI=true``: ``make test`` installs the package there, so
    their absence is a broken machine, never a reason to skip); elsewhere the test is skipped with
    the package to install.
    """
    from lightning_prune.data.fashion_mnist import FASHION_MNIST_SYSTEM_DIR

    folder = Path(FASHION_MNIST_SYSTEM_DIR)
    missing = [name for name in _FASHION_MNIST_FILES if not (folder / name).is_file()]
    if missing:
        message = (
            f"Fashion-MNIST files missing from {folder}: {', '.join(missing)}; install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make install` does it as root)"
        )
        if _in_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return folder
