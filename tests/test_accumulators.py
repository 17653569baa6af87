"""Each accumulator against an independent reference (NumPy, or the reservoir's keys recomputed).

``sync`` needs several processes: tests/test_ddp.py covers it through a two-rank fit.
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune.collection import (
    ACCUMULATORS,
    Accumulator,
    ActivationCollector,
    ActivationRequest,
    ClassMomentSums,
    CovarianceSums,
    PooledReservoir,
    RowReservoir,
    SharedGenerator,
    accumulators,
    build_accumulators,
    sample_rows,
)
from lightning_prune.collection.accumulators import AccumulatorContext
from lightning_prune.collection.requests import Statistic


def _held_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from ``obj``'s attributes (independent of ``tensors()``)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_held_bytes(k, seen) + _held_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("lightning_prune"):
        return _held_bytes(vars(obj), seen)
    return 0


def _update(acc: Accumulator, request: ActivationRequest, x: torch.Tensor, labels=None) -> None:
    acc.begin_batch()
    acc.update(request, x, labels)
    acc.end_batch()


# ---------------------------------------------------------------------------------------------- covariance
@pytest.mark.parametrize("batches", [3, 70])  # 70: across two float64 flushes (every 32 batches)
def test_covariance_equals_numpy_over_the_concatenated_rows(batches):
    torch.manual_seed(0)
    request = ActivationRequest("conv", statistic="covariance", rows_per_batch=10_000)
    acc = CovarianceSums(request, channel_dim=1)
    rows = []
    for _ in range(batches):
        x = torch.randn(3, 4, 2, 3) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 0.5
        acc.update(request, x)
        rows.append(x.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy())
    rows = np.concatenate(rows)
    # float32 per batch (raw moments), float64 across batches: float32 rounding only
    np.testing.assert_allclose(acc.compute().numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-5, atol=2e-5)
    assert acc.rows_seen() == {request: rows.shape[0]}
    assert acc.results().keys() == {request}


def test_covariance_of_subsampled_rows_is_that_of_the_drawn_rows():
    torch.manual_seed(0)
    request = ActivationRequest("conv", statistic="covariance", rows_per_batch=7)
    acc = CovarianceSums(request, channel_dim=1, generator=torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    drawn = []
    for _ in range(5):
        x = torch.randn(4, 3, 5, 5)
        acc.update(request, x)
        samples = torch.randint(4, (7,), generator=replay)
        where = torch.randint(25, (7,), generator=replay)
        drawn.append(x.flatten(2)[samples, :, where].double().numpy())
    drawn = np.concatenate(drawn)
    np.testing.assert_allclose(acc.compute().numpy(), np.cov(drawn, rowvar=False, bias=True), rtol=1e-5, atol=2e-5)
    assert acc.rows_seen() == {request: 35}


def test_sample_rows_views_flattened_maps_channel_major_and_selects_columns():
    x = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)  # 4 channels x 3 positions, flattened
    rows = sample_rows(x, -1, 100, channels=4)
    expected = x.numpy().reshape(2, 4, 3).transpose(0, 2, 1).reshape(-1, 4)
    np.testing.assert_array_equal(rows.numpy(), expected)
    wide = torch.cat([torch.full((2, 5), -1.0), x], dim=1)  # the observed channels after 5 other features
    index = torch.arange(5, 17)
    np.testing.assert_array_equal(sample_rows(wide, -1, 100, channels=4, column_index=index).numpy(), expected)
    tokens = torch.randn(2, 6, 3)  # channels last
    np.testing.assert_array_equal(sample_rows(tokens, -1, 100).numpy(), tokens.reshape(-1, 3).numpy())


# ---------------------------------------------------------------------------------------------- class moments
def test_class_moments_equal_numpy_and_bad_labels_are_reported():
    torch.manual_seed(0)
    request = ActivationRequest("fc", statistic="class_moments", pooling="avg", num_classes=5)
    acc = ClassMomentSums(request, num_classes=5, channel_dim=1)
    feats, labels = [], []
    for _ in range(40):  # across a flush
        x, y = torch.randn(6, 3, 2, 2), torch.randint(0, 4, (6,))  # class 4 never occurs
        acc.update(request, x, y)
        feats.append(x.mean((2, 3)).double().numpy())
        labels.append(y.numpy())
    x, y = np.concatenate(feats), np.concatenate(labels)
    moments = acc.compute()
    np.testing.assert_array_equal(moments.counts.numpy(), np.bincount(y, minlength=5))
    np.testing.assert_allclose(moments.class_sums.numpy(), np.stack([x[y == k].sum(0) for k in range(5)]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moments.total.numpy(), x.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moments.scatter.numpy(), x.T @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        acc.update(request, torch.randn(2, 3, 2, 2), None)
    acc.update(request, torch.randn(2, 3, 2, 2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"1 collected label\(s\) fall outside \[0, 5\)"):
        acc.compute()


# ---------------------------------------------------------------------------------------------- reservoirs
@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=10), st.integers(2, 25), st.integers(0, 1000))
def test_row_reservoir_keeps_exactly_the_rows_with_the_largest_keys(batches, max_rows, seed):
    request = ActivationRequest("lin", statistic="rows", rows_per_batch=1000, max_rows=max_rows)
    acc = RowReservoir(request, channel_dim=-1, generator=torch.Generator().manual_seed(seed))
    replay = torch.Generator().manual_seed(seed)  # no subsampling: the keys are the only draws
    start, keys = 0, []
    for n in batches:
        x = torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).repeat(1, 2)  # row id in both columns
        acc.update(request, x)
        keys.append(torch.rand(n, generator=replay))
        start += n
    keys = torch.cat(keys)
    expected = sorted(torch.argsort(keys, descending=True)[:max_rows].tolist())
    rows = acc.compute()
    assert rows.shape == (min(max_rows, start), 2)
    assert sorted(rows[:, 0].long().tolist()) == expected
    assert acc.rows_seen() == {request: start}


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=10), st.integers(1, 15), st.integers(0, 1000))
def test_pooled_reservoir_keeps_the_largest_keys_aligned_across_requests_with_labels(batches, capacity, seed):
    a = ActivationRequest("a", statistic="pooled", pooling="max")
    b = ActivationRequest("b", statistic="pooled", pooling="avg")
    acc = PooledReservoir([a, b], max_samples=capacity, generator=torch.Generator().manual_seed(seed))
    replay = torch.Generator().manual_seed(seed)
    start, keys = 0, []
    for n in batches:
        ids = torch.arange(start, start + n, dtype=torch.float32)
        acc.begin_batch()
        acc.update(a, ids.view(n, 1, 1, 1).expand(n, 3, 2, 2), ids.long() % 7)
        acc.update(b, -ids.view(n, 1, 1).expand(n, 2, 4), ids.long() % 7)
        acc.end_batch()
        keys.append(torch.rand(n, generator=replay))  # drawn once per batch, at end_batch
        start += n
    expected = sorted(torch.argsort(torch.cat(keys), descending=True)[:capacity].tolist())
    values, labels = acc.compute()
    kept = values[a][:, 0].long()
    assert sorted(kept.tolist()) == expected
    assert values[a].shape == (len(expected), 3) and values[b].shape == (len(expected), 2)
    assert torch.equal(values[b][:, 0].long(), -kept)  # the same samples, in the same order
    assert torch.equal(labels, kept % 7)


def test_pooled_reservoir_rejects_labels_of_another_batch_size():
    request = ActivationRequest("a", statistic="pooled")
    acc = PooledReservoir([request], max_samples=4)
    acc.begin_batch()
    acc.update(request, torch.randn(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="2 labels for a batch of 3"):
        acc.end_batch()


def _fed(acc: Accumulator, request: ActivationRequest, batches: int, peak: list[int]) -> Accumulator:
    gen = torch.Generator().manual_seed(0)
    for _ in range(batches):
        _update(acc, request, torch.randn(8, 4, 3, 3, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        assert acc.nbytes() == _held_bytes(acc)  # everything held is accounted for
        peak.append(acc.nbytes())
    return acc


_SIZED = {
    "pooled": lambda r: PooledReservoir([r], max_samples=16, generator=SharedGenerator(0)),
    "covariance": lambda r: CovarianceSums(r, generator=SharedGenerator(0)),
    "class_moments": lambda r: ClassMomentSums(r, num_classes=3),
    "rows": lambda r: RowReservoir(r, generator=SharedGenerator(0)),
}


@pytest.mark.parametrize("statistic", list(_SIZED))
def test_nbytes_is_what_is_held_and_does_not_grow_with_more_batches(statistic, monkeypatch):
    # streamed sums keep rows until fold_rows of them are pending: a bound both runs reach (3 batches)
    monkeypatch.setattr(accumulators._Sums, "fold_rows", 25)
    index = (0, 2) if statistic == "rows" else ()  # the rows reservoir also holds the columns on the device
    request = ActivationRequest("m", statistic=statistic, rows_per_batch=10, max_rows=20, channel_index=index)
    peak_short: list[int] = []
    peak_long: list[int] = []
    short = _fed(_SIZED[statistic](request), request, 12, peak_short)  # 12 and 40: both just compacted
    long = _fed(_SIZED[statistic](request), request, 40, peak_long)
    assert max(peak_long) == max(peak_short)
    short.compute(), long.compute()
    assert long.nbytes() == short.nbytes() > 0
    assert sum(t.numel() * t.element_size() for t in long.tensors()) == long.nbytes()


# ---------------------------------------------------------------------------------------------- registry
def test_registry_covers_every_statistic_and_pooled_requests_share_one_reservoir():
    assert set(ACCUMULATORS) == set(typing.get_args(Statistic))
    requests = [
        ActivationRequest("a", statistic="pooled"), ActivationRequest("b", statistic="covariance"),
        ActivationRequest("c", statistic="pooled", pooling="avg"), ActivationRequest("d", statistic="rows"),
        ActivationRequest("e", statistic="class_moments", num_classes=2),
    ]
    built = build_accumulators(requests, AccumulatorContext(max_samples=8))
    assert list(built) == requests
    assert built[requests[0]] is built[requests[2]] and built[requests[0]].requests == (requests[0], requests[2])
    assert [type(built[r]) for r in requests] == [PooledReservoir, CovarianceSums, PooledReservoir, RowReservoir, ClassMomentSums]
    assert len({id(v) for v in built.values()}) == 4


class _ChannelMax(Accumulator):
    """A statistic added by one class and its registry entry: the running per-channel maximum."""

    def __init__(self, request: ActivationRequest) -> None:
        self.requests = (request,)
        self.value: torch.Tensor | None = None

    @classmethod
    def build(cls, requests, context):
        return cls(*requests)

    def update(self, request, x, labels=None):
        m = x.detach().flatten(1).amax(0)
        self.value = m if self.value is None else torch.maximum(self.value, m)

    def sync(self):
        pass

    def compute(self):
        return self.value

    @property
    def empty(self):
        return self.value is None

    def tensors(self):
        if self.value is not None:
            yield self.value


def test_a_new_statistic_is_one_class_and_its_entry(monkeypatch):
    monkeypatch.setitem(ACCUMULATORS, "channel_max", _ChannelMax)
    model = nn.Sequential(nn.Linear(3, 4))
    request = ActivationRequest("0", statistic="channel_max")
    collector = ActivationCollector(model, [request, ActivationRequest("0", statistic="pooled")])
    collector.attach()
    outs = []
    for _ in range(3):
        x = torch.randn(5, 3)
        collector.begin_batch()
        outs.append(model(x).detach())
        collector.end_batch()
    store = collector.store()
    torch.testing.assert_close(store.get("channel_max", request), torch.cat(outs).amax(0))
    assert collector.nbytes() == sum(a.nbytes() for a in collector.accumulators)
    assert store.num_samples == 15


# ---------------------------------------------------------------------------------------------- shared readers
class _TwoReaders(nn.Module):
    """``a`` and ``b`` read the same tensor (a block's first convolution and its projection shortcut),
    unless ``mode`` says otherwise: ``"skip_a"`` (``a`` not called), ``"other"`` (``b`` reads ``2x``),
    ``"inplace"`` (``x`` changed in place between the two reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.mode = "same"

    def forward(self, x):
        x = x + 0.0  # a fresh tensor the module owns
        out = self.a(x) if self.mode != "skip_a" else 0.0
        if self.mode == "inplace":
            x.mul_(3.0)
        return out + self.b(2 * x if self.mode == "other" else x)


def _gram_of_rows(x: torch.Tensor) -> np.ndarray:
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double().numpy()
    return rows.T @ rows


def _two_reader_collector(model: nn.Module) -> tuple[ActivationCollector, list[ActivationRequest]]:
    requests = [ActivationRequest(m, site="input", statistic="gram", rows_per_batch=10_000) for m in ("a", "b")]
    return ActivationCollector(model, requests), requests


def _run(collector: ActivationCollector, model: nn.Module, batches: list[torch.Tensor], modes: list[str]) -> None:
    collector.attach()
    with torch.no_grad():
        for x, mode in zip(batches, modes):
            model.mode = mode
            collector.begin_batch()
            model(x)
            collector.end_batch()
    collector.detach()


def test_readers_of_one_tensor_share_one_state_and_both_get_its_exact_gram():
    torch.manual_seed(0)
    model = _TwoReaders()
    batches = [torch.randn(4, 3, 5, 5) for _ in range(6)]
    collector, (ra, rb) = _two_reader_collector(model)
    _run(collector, model, batches, ["same"] * 6)
    expected = sum(_gram_of_rows(x) for x in batches)
    store = collector.store()
    for request in (ra, rb):
        np.testing.assert_allclose(store.gram(request).gram.numpy(), expected, rtol=1e-5)
        assert store.rows_seen[request] == 6 * 4 * 25
    assert store.gram(ra).gram is not store.gram(rb).gram  # each request gets its own result tensors
    alone = ActivationCollector(model, [ra])
    _run(alone, model, batches, ["same"] * 6)
    alone.store()
    assert collector.nbytes() == alone.nbytes() > 0  # the follower holds nothing of its own


@pytest.mark.parametrize("mode", ["other", "inplace"])
def test_readers_of_different_or_modified_tensors_do_not_share(mode):
    torch.manual_seed(1)
    model = _TwoReaders()
    batches = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    collector, (ra, rb) = _two_reader_collector(model)
    _run(collector, model, batches, [mode] * 3)
    store = collector.store()
    np.testing.assert_allclose(store.gram(ra).gram.numpy(), sum(_gram_of_rows(x) for x in batches), rtol=1e-5)
    factor = 2.0 if mode == "other" else 3.0  # b reads 2x, or x after the in-place x *= 3
    np.testing.assert_allclose(store.gram(rb).gram.numpy(), sum(_gram_of_rows(factor * x) for x in batches), rtol=1e-5)


def test_a_follower_whose_leader_is_not_called_keeps_every_row_exactly():
    torch.manual_seed(2)
    model = _TwoReaders()
    batches = [torch.randn(4, 3, 5, 5) for _ in range(5)]
    collector, (ra, rb) = _two_reader_collector(model)
    _run(collector, model, batches, ["same", "same", "skip_a", "same", "same"])
    store = collector.store()
    np.testing.assert_allclose(store.gram(rb).gram.numpy(), sum(_gram_of_rows(x) for x in batches), rtol=1e-5)
    a_batches = [x for i, x in enumerate(batches) if i != 2]
    np.testing.assert_allclose(store.gram(ra).gram.numpy(), sum(_gram_of_rows(x) for x in a_batches), rtol=1e-5)
    assert store.rows_seen == {ra: 4 * 100, rb: 5 * 100}


def test_a_follower_whose_leader_reads_another_tensor_restarts_with_an_honest_row_count():
    torch.manual_seed(3)
    model = _TwoReaders()
    batches = [torch.randn(4, 3, 5, 5) for _ in range(4)]
    collector, (ra, rb) = _two_reader_collector(model)
    _run(collector, model, batches, ["same", "same", "other", "same"])
    store = collector.store()
    np.testing.assert_allclose(store.gram(ra).gram.numpy(), sum(_gram_of_rows(x) for x in batches), rtol=1e-5)
    # b's own rows from the batch where the two parted: 2x of batch 2, then batch 3
    np.testing.assert_allclose(
        store.gram(rb).gram.numpy(), _gram_of_rows(2 * batches[2]) + _gram_of_rows(batches[3]), rtol=1e-5
    )
    assert store.rows_seen[rb] == 2 * 100


def test_synchronize_unshares_before_reducing_so_no_state_is_reduced_twice(monkeypatch):
    import torch.distributed as dist

    torch.manual_seed(4)
    model = _TwoReaders()
    batches = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    collector, (ra, rb) = _two_reader_collector(model)
    _run(collector, model, batches, ["same"] * 3)
    # two ranks that saw the same data: every all-reduce doubles what it is given
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: tensor.mul_(2))
    collector.synchronize()
    store = collector.store()
    expected = 2 * sum(_gram_of_rows(x) for x in batches)
    for request in (ra, rb):
        np.testing.assert_allclose(store.gram(request).gram.numpy(), expected, rtol=1e-5)
        assert store.rows_seen[request] == 2 * 3 * 100


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), channels=st.integers(1, 150), seed=st.integers(0, 2**16))
def test_the_blocked_gram_fold_equals_the_full_product(rows, channels, seed):
    x = torch.randn(rows, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = torch.zeros(channels, channels, dtype=torch.float64)
    accumulators._add_upper_gram(out, x)
    accumulators._add_upper_gram(out, 2 * x)
    reference = 5 * x.numpy().T @ x.numpy()
    np.testing.assert_allclose(accumulators._symmetric(out).numpy(), reference, rtol=1e-10, atol=1e-10)
