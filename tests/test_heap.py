"""retain_freed_memory: the glibc settings it applies, and their effect (page faults, not time)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from lightning_prune.engine import heap
from lightning_prune.engine.heap import retain_freed_memory


def test_applies_the_three_settings_and_reports_a_refusal():
    calls: list[tuple[int, int]] = []

    def recorder(parameter: int, value: int) -> int:
        calls.append((parameter, value))
        return 1

    assert retain_freed_memory(recorder)
    # glibc's malloc.h: M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1, M_TOP_PAD -2; mallopt takes a C int
    assert sorted(calls) == sorted([(-3, 32 * 2**20), (-1, 2**31 - 1), (-2, 256 * 2**20)])
    assert all(value < 2**31 for _, value in calls)
    assert not retain_freed_memory(lambda parameter, value: 0 if parameter == -3 else 1)  # glibc refused one


def test_without_glibc_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap._glibc_mallopt() is None
    assert not retain_freed_memory()


_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    if sys.argv[1] == "retain":
        from lightning_prune.engine.heap import retain_freed_memory
        assert retain_freed_memory()
    def forward_like():  # three 16 MiB activations written, then freed, as a CPU forward does
        tensors = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(3)]
        del tensors
    for _ in range(3):
        forward_like()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        forward_like()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    """
)


@pytest.mark.skipif(heap._glibc_mallopt() is None, reason="needs glibc (Linux)")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    # glibc's own threshold moves with what the process allocated before (that is the problem), so
    # both processes start from a fixed one, glibc's initial 128 KiB: every 16 MiB block is mapped on
    # allocation and unmapped on free, and each round faults all its pages in (12,288 of 4 KiB)
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 2**10)}

    def faults_per_round(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True, env=environment)
        return float(out.stdout.strip().splitlines()[-1])

    assert faults_per_round("default") > 3 * 4096 * 0.9
    assert faults_per_round("retain") < 100  # the call overrides the threshold: freed pages are reused


def test_history_dependent_timings_names_the_fix_until_memory_is_retained(monkeypatch):
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: (lambda parameter, value: 1))
    monkeypatch.setattr(heap, "_retained", False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for name in heap._ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    why = heap.history_dependent_timings()
    assert why is not None and "retain_freed_memory()" in why and "jemalloc" in why
    assert "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647" in why
    for name, value in heap._ENVIRONMENT.items():  # the same thresholds, from the environment
        monkeypatch.setenv(name, str(value))
    assert heap.history_dependent_timings() is None
    for name in heap._ENVIRONMENT:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert heap.history_dependent_timings() is None  # an allocator that keeps freed memory itself
    monkeypatch.delenv("LD_PRELOAD")
    assert retain_freed_memory()  # the (patched) glibc accepted every setting
    assert heap.history_dependent_timings() is None
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: None)
    monkeypatch.setattr(heap, "_retained", False)
    assert heap.history_dependent_timings() is None  # no glibc: nothing to say


def test_the_callback_warns_before_timing_eager_forwards_on_the_cpu(monkeypatch):
    import torch
    from torch import nn

    from lightning_prune import callback
    from lightning_prune.engine.latency import LatencyEstimator

    monkeypatch.setattr(callback, "history_dependent_timings", lambda: "glibc as it comes")
    model = nn.Linear(4, 2)
    with pytest.warns(UserWarning, match="glibc as it comes"):
        callback._warn_if_history_dependent(LatencyEstimator(), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # timed by a latency_fn (its own runtime and allocator), or on another device: no warning
        callback._warn_if_history_dependent(LatencyEstimator(latency_fn=lambda m, x: 1e-3), model)
        callback._warn_if_history_dependent(LatencyEstimator(device=torch.device("meta")), model)
        monkeypatch.setattr(callback, "history_dependent_timings", lambda: None)
        callback._warn_if_history_dependent(LatencyEstimator(), model)
