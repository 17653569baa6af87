"""Keep freed memory in the process, so that CPU timings do not depend on what the process ran before.

On Linux, glibc's ``malloc`` serves large blocks (from 128 KiB, a threshold it moves as blocks are
freed) with fresh ``mmap`` pages and hands them back to the kernel on ``free``, and trims the top of
its heap when enough is free there. A CPU forward pass allocates and frees its activations on every
call, so each call may fault its activations' pages in again (a 16 MiB activation is 4,096 page
faults), or may not, depending on where the moving threshold stands, which depends on everything
the process allocated before. Timings then depend on the process's history:
measured on this project's benchmark machine, the same pruned torchvision ResNet-18 (batch 64,
64 px) ran in 0.65x of the dense model in fresh processes and in 0.57x inside two of three processes
that had built latency tables first, where the candidates of ``round_to="auto"`` were ranked
differently.

:func:`retain_freed_memory` pins the thresholds (blocks up to 32 MiB come from the heap, which is
never trimmed below 2 GiB), so the pages a forward frees are reused by the next one, whatever ran
before. PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same reason; with
either preloaded (``LD_PRELOAD``), this function is not needed (it then changes nothing they use).
The same settings can be given before Python starts, e.g. for the ``lightning-prune`` command:
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=268435456``.
The cost is memory: the process keeps its peak heap instead of returning it.

Example::

    from lightning_prune.engine.heap import retain_freed_memory

    retain_freed_memory()  # once, early; then timings (LatencyEstimator, benchmarks) are reproducible
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

__all__ = ["MMAP_THRESHOLD", "TOP_PAD", "TRIM_THRESHOLD", "history_dependent_timings", "retain_freed_memory"]

#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: blocks up to this size come from the heap (glibc's largest allowed value on 64-bit systems)
MMAP_THRESHOLD = 32 * 2**20
#: the heap is trimmed only when this much is free at its top (``mallopt`` takes a C int)
TRIM_THRESHOLD = 2**31 - 1
#: extra heap requested each time it grows, so that growth is rare
TOP_PAD = 256 * 2**20
#: allocators that keep freed memory themselves (named in ``LD_PRELOAD``)
_RETAINING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
#: glibc's environment variables for the same settings (read when the process starts)
_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD, "MALLOC_TOP_PAD_": TOP_PAD}
#: set once glibc's own thresholds were pinned in this process
_retained = False


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl has no such symbol, and its mallopt does nothing
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def retain_freed_memory(mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); call it once, early.

    Args:
        mallopt: the ``mallopt(parameter, value) -> int`` to call (default: glibc's, found with
            ``ctypes``); tests pass a recorder.

    Returns:
        True when every setting was applied; False where there is no glibc (macOS, Windows, musl)
        or it refused one (nothing to undo: each setting only changes when memory is returned).
    """
    global _retained
    call = mallopt if mallopt is not None else _glibc_mallopt()
    if call is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    applied = all([call(parameter, value) == 1 for parameter, value in settings])  # a list: every setting tried
    if mallopt is None:
        _retained = _retained or applied
    return applied


def history_dependent_timings() -> str | None:
    """Why CPU timings in this process may depend on what it ran before, or None when they need not:
    glibc's allocator as it comes (no :func:`retain_freed_memory` yet, no ``MALLOC_*_`` thresholds in
    the environment, no jemalloc, tcmalloc or mimalloc in ``LD_PRELOAD``). The text names the fixes."""
    if _retained or _glibc_mallopt() is None:
        return None
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _RETAINING_ALLOCATORS):
        return None
    if all(os.environ.get(name) for name in _ENVIRONMENT):  # the same thresholds, set before Python started
        return None
    return (
        "latency is timed on the CPU with glibc's allocator as it comes: it returns freed activations to the kernel "
        "and faults them in again depending on what the process ran before, so measured ratios (latency targets, "
        'round_to="auto") can move by 0.1 from one process to the next; call '
        "lightning_prune.engine.retain_freed_memory() once before the fit, or start the process with "
        f"{' '.join(f'{k}={v}' for k, v in _ENVIRONMENT.items())} (e.g. for the lightning-prune command), "
        "or preload jemalloc / tcmalloc"
    )
