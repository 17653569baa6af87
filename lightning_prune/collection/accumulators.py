"""Accumulators: one class per collected statistic, in the manner of torchmetrics' metrics.

An :class:`Accumulator` holds the bounded-memory state of one statistic and offers:

* :meth:`~Accumulator.update`: fold one activation in, on its device, with no host synchronisation;
* :meth:`~Accumulator.sync`: combine every rank's state in place (``torch.distributed``), so that
  every rank ends with the statistic of all ranks' data; a no-op when no process group is
  initialised or the world has one rank;
* :meth:`~Accumulator.compute`: the result handed to criteria;
* :meth:`~Accumulator.tensors` and :meth:`~Accumulator.nbytes`: memory accounting.

The built-in statistics:

* :class:`PooledReservoir` (``"pooled"``): *one* reservoir shared by every pooled request, so that
  all layers keep the same samples (aligned rows, with their labels);
* :class:`CovarianceSums` (``"covariance"``): streamed channel sums and outer products over rows;
* :class:`ClassMomentSums` (``"class_moments"``): streamed class counts, class sums and ``X^T X``;
* :class:`RowReservoir` (``"rows"``): a uniform reservoir of activation rows;
* :class:`GramSums` (``"gram"``): the streamed Gram matrix ``Z^T Z`` (with ``sum z`` and the row
  count) of activation rows, O(C^2) memory, the statistic of least-squares weight correction.

:data:`ACCUMULATORS` maps :attr:`ActivationRequest.statistic
<lightning_prune.collection.requests.ActivationRequest>` to its class, and
:func:`build_accumulators` is the one place that dispatches on it: adding a statistic is one
subclass and its entry. Every random draw goes through one :class:`SharedGenerator`, in hook order,
so that results are reproducible for a given seed.

Example::

    sums = CovarianceSums(ActivationRequest("conv", statistic="covariance"))
    for x in activations:
        sums.update(sums.request, x)
    sums.sync()  # all ranks' rows
    cov = sums.compute()  # (C, C) float64
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from lightning_prune.collection.requests import ActivationRequest
from lightning_prune.collection.statistics import (
    covariance_from_sums,
    pool_channels,
    reservoir_merge,
    sample_rows,
)

__all__ = [
    "ACCUMULATORS",
    "Accumulator",
    "AccumulatorContext",
    "ClassMomentSums",
    "ClassMoments",
    "CovarianceSums",
    "GramStatistic",
    "GramSums",
    "PooledReservoir",
    "PooledSamples",
    "RowReservoir",
    "SharedGenerator",
    "build_accumulators",
]

class SharedGenerator:
    """One seeded :class:`torch.Generator` for every accumulator of a collector.

    Calling it with a device returns the generator, re-created from ``seed`` when the device
    changes. Sharing it keeps the random draws (row subsampling, reservoir keys) in hook order, so
    a collection is reproducible; sampling never touches the global generator.

    Args:
        seed: seed of the generator.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    def __call__(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


def _generator(generator: Any, device: torch.device) -> torch.Generator | None:
    return generator(device) if callable(generator) else generator


@dataclass(frozen=True)
class AccumulatorContext:
    """What a collector hands to :meth:`Accumulator.build` besides the requests.

    Attributes:
        channel_dims: the resolved channel dimension of every request's activation.
        generator: the collector's shared generator.
        max_samples: capacity of the pooled reservoir.
        num_classes: the collector's number of classes (requests may set their own).
    """

    channel_dims: Mapping[ActivationRequest, int] = field(default_factory=dict)
    generator: SharedGenerator = field(default_factory=SharedGenerator)
    max_samples: int = 2048
    num_classes: int | None = None


# ---------------------------------------------------------------------------------------------- distributed
def _world_size() -> int:
    """The number of ranks when a process group is initialised, else 1."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _default_device() -> torch.device:
    """Where a rank that holds nothing puts what the others sent (the backend's device)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------------------------- base
class Accumulator(ABC):
    """Bounded-memory state of one statistic, updated from the activations of training batches.

    Subclasses set :attr:`requests` and implement :meth:`build`, :meth:`update`, :meth:`sync`,
    :meth:`compute`, :meth:`tensors` and :attr:`empty`; :meth:`begin_batch` and :meth:`end_batch`
    are for accumulators that align a batch across requests.

    Attributes:
        shared: when True, one instance serves every request of its statistic (the collector
            builds it once with all of them); otherwise one instance per request.
        requests: the requests this accumulator serves.
    """

    shared: ClassVar[bool] = False
    requests: tuple[ActivationRequest, ...]

    @classmethod
    @abstractmethod
    def build(cls, requests: Sequence[ActivationRequest], context: AccumulatorContext) -> Accumulator:
        """The accumulator of ``requests`` (exactly one unless :attr:`shared`) in a collector."""

    def begin_batch(self) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """A training batch starts."""

    @abstractmethod
    def update(self, request: ActivationRequest, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Fold in ``x``, the activation of ``request`` in the current batch (``labels``: the batch's)."""

    def end_batch(self) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """The training batch ended (every request of it was updated)."""

    def share_key(self) -> Hashable | None:
        """Accumulators with equal keys that are handed the *same tensor* in a batch may share one
        state (:meth:`follow`); None (the default): never shared."""
        return None

    def follow(self, leader: Accumulator) -> bool:
        """Share ``leader``'s state for this batch, ``leader`` having just folded in the tensor this
        accumulator was about to read; False when this accumulator cannot (it has state of its own)."""
        return False

    def unshare(self) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """Hold a state of one's own again (before :meth:`sync`, so that no rank reduces a state twice)."""

    @abstractmethod
    def sync(self) -> None:
        """Combine the state of every rank, in place, identically on all ranks (a no-op on one rank)."""

    @abstractmethod
    def compute(self) -> Any:
        """The statistic, as handed to criteria."""

    @property
    @abstractmethod
    def empty(self) -> bool:
        """Whether nothing was accumulated yet."""

    @property
    def labels(self) -> torch.Tensor | None:
        """Labels of the samples the accumulator keeps; None for streamed statistics."""
        return None

    def results(self) -> dict[ActivationRequest, Any]:
        """:meth:`compute` per request served; empty when nothing was accumulated."""
        if self.empty:
            return {}
        return {self.requests[0]: self.compute()}

    def rows_seen(self) -> dict[ActivationRequest, int]:
        """Rows folded in per request (for statistics over rows)."""
        return {}

    @abstractmethod
    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the accumulator holds."""

    def nbytes(self) -> int:
        """Bytes of :meth:`tensors`."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


# ---------------------------------------------------------------------------------------------- pooled
class PooledSamples(NamedTuple):
    """What :meth:`PooledReservoir.compute` returns."""

    values: dict[ActivationRequest, torch.Tensor]  #: ``(N, C)`` pooled values per request, rows aligned
    labels: torch.Tensor | None  #: ``(N,)`` labels of the samples, or None when a batch had none


class PooledReservoir(Accumulator):
    """Per-sample pooled channel values of every ``"pooled"`` request, for a uniform reservoir of samples.

    Every sample gets one uniform random key at :meth:`end_batch`; the samples with the
    ``max_samples`` largest keys are kept (:func:`~lightning_prune.collection.statistics.reservoir_merge`),
    the same samples for every request, with their labels. Batches are buffered and compacted once
    ``2 * max_samples`` are pending: amortised O(1) copies per sample, memory bounded by about
    ``3 * max_samples`` samples whatever the number seen.

    Args:
        requests: the pooled requests (their ``pooling`` is used).
        max_samples: reservoir capacity.
        generator: draws the keys: a generator, a function of the device returning one (a
            :class:`SharedGenerator`), or None for the global generator.
        channel_dims: the channel dimension per request (default 1).
    """

    shared = True

    def __init__(
        self,
        requests: Sequence[ActivationRequest],
        max_samples: int = 2048,
        generator: Any = None,
        channel_dims: Mapping[ActivationRequest, int] | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.requests = tuple(requests)
        self.max_samples = int(max_samples)
        self.generator = generator
        self.channel_dims = {r: (channel_dims or {}).get(r, 1) for r in self.requests}
        self._keys: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._pooled: dict[ActivationRequest, torch.Tensor] = {}
        self._chunks: list[tuple[torch.Tensor, torch.Tensor | None, dict[ActivationRequest, torch.Tensor]]] = []
        self._pending = 0
        self._staged: dict[ActivationRequest, torch.Tensor] = {}
        self._batch_labels: torch.Tensor | None = None

    @classmethod
    def build(cls, requests: Sequence[ActivationRequest], context: AccumulatorContext) -> PooledReservoir:
        return cls(requests, context.max_samples, context.generator, context.channel_dims)

    def begin_batch(self) -> None:
        self._staged, self._batch_labels = {}, None

    def update(self, request: ActivationRequest, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Stage the pooled values of ``x`` (``(N, C)``); they enter the reservoir at :meth:`end_batch`."""
        self._staged[request] = pool_channels(x, request.pooling, self.channel_dims[request], request.token_pooling)
        self._batch_labels = labels

    def end_batch(self) -> None:
        """Key the batch's samples and buffer them (compacting at ``2 * max_samples`` pending)."""
        pooled, labels = self._staged, self._batch_labels
        self._staged, self._batch_labels = {}, None
        if not pooled:
            return
        first = next(iter(pooled.values()))
        n, device = first.shape[0], first.device
        keys = torch.rand(n, generator=_generator(self.generator, device), device=device)
        if labels is not None and labels.shape[0] != n:
            raise ValueError(f"label_fn returned {labels.shape[0]} labels for a batch of {n} samples")
        self._chunks.append((keys, labels, pooled))
        self._pending += n
        if self._pending >= 2 * self.max_samples:
            self._compact()

    def _compact(self) -> None:
        if not self._chunks:
            return
        old_keys = self._keys if self._keys is not None else self._chunks[0][0][:0]
        new_keys = torch.cat([c[0] for c in self._chunks])
        index, self._keys = reservoir_merge(old_keys, new_keys, self.max_samples)
        chunk_labels = [c[1] for c in self._chunks]
        if all(lab is not None for lab in chunk_labels) and (old_keys.numel() == 0 or self._labels is not None):
            labelled = [lab for lab in chunk_labels if lab is not None]  # all of them (narrowed for the type checker)
            old = self._labels if self._labels is not None else labelled[0][:0]
            self._labels = torch.cat([old, *labelled])[index]
        else:
            self._labels = None
        for request in self._chunks[0][2]:
            kept = self._pooled.get(request)
            parts = ([kept] if kept is not None else []) + [c[2][request] for c in self._chunks]
            self._pooled[request] = torch.cat(parts)[index]
        self._chunks = []
        self._pending = 0

    def sync(self) -> None:
        """Gather every rank's reservoir and keep the ``max_samples`` largest keys of all of them.

        Still a uniform sample of all the samples seen by all ranks; labels are kept when every
        rank has them.
        """
        if _world_size() == 1:
            return
        self._compact()
        local = None
        if self._keys is not None:
            local = {
                "keys": self._keys.cpu(),
                "labels": None if self._labels is None else self._labels.cpu(),
                "pooled": {r: v.cpu() for r, v in self._pooled.items()},
            }
        gathered = [g for g in _all_gather(local) if g is not None]
        if not gathered:
            return
        device = self._keys.device if self._keys is not None else _default_device()
        keys = torch.cat([g["keys"] for g in gathered])
        index, kept = reservoir_merge(keys[:0], keys, self.max_samples)
        if all(g["labels"] is not None for g in gathered):
            self._labels = torch.cat([g["labels"] for g in gathered])[index].to(device)
        else:
            self._labels = None
        for request in gathered[0]["pooled"]:
            self._pooled[request] = torch.cat([g["pooled"][request] for g in gathered])[index].to(device)
        self._keys = kept.to(device)

    def compute(self) -> PooledSamples:
        """The reservoir (compacted to at most ``max_samples`` samples) and its labels."""
        self._compact()
        return PooledSamples(dict(self._pooled), self._labels)

    @property
    def empty(self) -> bool:
        return self._keys is None and not self._chunks

    @property
    def labels(self) -> torch.Tensor | None:
        self._compact()
        return self._labels

    def results(self) -> dict[ActivationRequest, Any]:
        return self.compute().values

    def tensors(self) -> Iterator[torch.Tensor]:
        if self._keys is not None:
            yield self._keys
        if self._labels is not None:
            yield self._labels
        yield from self._pooled.values()
        for keys, labels, pooled in self._chunks:
            yield keys
            if labels is not None:
                yield labels
            yield from pooled.values()


# ---------------------------------------------------------------------------------------------- streamed sums
class _Sums:
    """``sum x`` and ``sum x x^T`` over rows. Rows are kept as they come and folded in together
    (one ``cat`` and one ``addmm_`` per ``fold_rows`` rows, at most ``fold_elements`` values pending):
    on small layers the fixed cost of a matrix product per batch, not its arithmetic, is what training
    pays for collection. Folded into float32 sums, flushed into float64 every ``flush_every`` batches
    so that long windows keep float64 accuracy. :meth:`flush` (before any read) folds what is pending."""

    flush_every = 32
    fold_rows = 4096
    fold_elements = 2**20

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.batches = 0
        self.total32 = torch.zeros(channels, device=device)
        self.outer32 = torch.zeros(channels, channels, device=device)
        self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64, device=device)
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0

    def add(self, rows: torch.Tensor) -> None:
        self.count += int(rows.shape[0])
        self._pending.append(rows)
        self._pending_rows += int(rows.shape[0])
        self.batches += 1
        if self._pending_rows >= self.fold_rows or self._pending_rows * rows.shape[1] >= self.fold_elements:
            self._fold()
        if self.batches % self.flush_every == 0:
            self.flush()

    def _fold(self) -> None:
        if not self._pending:
            return
        rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._pending, self._pending_rows = [], 0
        self.total32.add_(rows.sum(0))
        _add_upper_gram(self.outer32, rows)

    def flush(self) -> None:
        self._fold()
        self.total += self.total32.double()
        self.outer += _symmetric(self.outer32).double()
        self.total32.zero_()
        self.outer32.zero_()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held, rows pending included (memory accounting)."""
        return [self.total32, self.outer32, self.total, self.outer, *self._pending]

    def copy(self) -> _Sums:
        """An independent copy (pending rows are never written to, so they are shared)."""
        other = copy.copy(self)
        for name in ("total32", "outer32", "total", "outer"):
            setattr(other, name, getattr(self, name).clone())
        other._pending = list(self._pending)
        return other


#: :func:`_add_upper_gram` splits a Gram of C >= 4 * _MIN_BLOCK channels into _GRAM_BLOCKS row panels of
#: at least _MIN_BLOCK rows (narrower products lose more to overhead than the triangle saves)
_GRAM_BLOCKS = 8
_MIN_BLOCK = 16


def _add_upper_gram(out: torch.Tensor, rows: torch.Tensor) -> None:
    """``out += rows^T rows`` on and above the diagonal blocks only (about half the products when
    ``C >= 64``): ``_GRAM_BLOCKS`` panels ``out[i:j, i:] += rows[:, i:j]^T rows[:, i:]``. Below the
    diagonal blocks ``out`` is left as it is; :func:`_symmetric` completes it."""
    channels = rows.shape[1]
    block = max(_MIN_BLOCK, -(-channels // _GRAM_BLOCKS))
    if channels < 4 * _MIN_BLOCK:
        out.addmm_(rows.T, rows)
        return
    for start in range(0, channels, block):
        stop = min(channels, start + block)
        out[start:stop, start:].addmm_(rows[:, start:stop].T, rows[:, start:])


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``upper``."""
    return upper.triu() + upper.triu(1).T


def _owned(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``rows``, copied if they share memory with the activation ``x``: folded in batches later, they
    must not see a later in-place change of ``x`` (an in-place ReLU after a linear layer)."""
    return rows.clone() if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else rows


def _all_reduce_sums(sums: _Sums | None, extra: Callable[[], list[torch.Tensor]], name: str) -> None:
    """Flush and all-reduce ``sums`` (and ``extra()``) with the row count; every rank must hold some."""
    import torch.distributed as dist

    device = sums.total.device if sums is not None else _default_device()
    state = torch.tensor([0.0 if sums is None else float(sums.count), float(sums is None)], dtype=torch.float64, device=device)
    dist.all_reduce(state)
    if int(state[1].item()) == 0:
        assert sums is not None  # no rank (this one included) lacks sums
        sums.flush()
        for tensor in [sums.total, sums.outer, *extra()]:
            dist.all_reduce(tensor)
        sums.count = int(state[0].item())
    elif int(state[1].item()) < dist.get_world_size():  # the same decision on every rank: no hang
        raise RuntimeError(f"{name}: some ranks collected nothing while others did; statistics cannot be combined")


class _RowSampling(Accumulator):
    """Shared by the accumulators of activation rows: :func:`sample_rows` with the request's settings."""

    request: ActivationRequest
    channel_dim: int
    generator: Any

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        column_index = None
        if self.request.channel_index:
            column_index = self._column_index.get(x.device)
            if column_index is None:  # one host-to-device copy per request and device, not per batch
                column_index = self._column_index[x.device] = torch.tensor(self.request.channel_index, device=x.device)
        return sample_rows(
            x, self.channel_dim, self.request.rows_per_batch,
            channels=self.request.channels, column_index=column_index, generator=self.generator,
            token_pooling=self.request.token_pooling,
        )

    def _index_tensors(self) -> Iterator[torch.Tensor]:
        yield from self._column_index.values()

    def _init_sampling(self, request: ActivationRequest, channel_dim: int, generator: Any) -> None:
        self.request = request
        self.requests = (request,)
        self.channel_dim = int(channel_dim)
        self.generator = generator
        self._column_index: dict[torch.device, torch.Tensor] = {}


class _StreamedRows(_RowSampling):
    """Rows sampled per batch folded into float32 sums (``sum x``, ``sum x x^T``, row count), flushed
    into float64 every 32 batches, all-reduced under DDP; subclasses say what :meth:`compute` returns.

    Two such accumulators with the same settings handed the same tensor (a block's input read by
    its first convolution and by its projection shortcut) share one state: the collector offers
    the second to :meth:`follow` the first, which then samples, folds and stores nothing. Should
    the two stop reading one tensor (a forward that changes), the follower takes a copy of the
    leader's sums when they hold no row of the current batch, and otherwise starts its own (its
    row count then says how many rows it holds).
    """

    label = "rows"  #: what error messages call the statistic

    def __init__(self, request: ActivationRequest, channel_dim: int = 1, generator: Any = None) -> None:
        self._init_sampling(request, channel_dim, generator)
        self._sums: _Sums | None = None
        self._leader: _StreamedRows | None = None
        # everything that decides the statistic of a given tensor: the request but for where it is read
        settings = tuple(getattr(request, f.name) for f in dataclasses.fields(request) if f.name not in ("module", "site"))
        self._share_key = (type(self), settings, self.channel_dim)
        self._batch = 0  # batches begun
        self._updated = 0  # the batch of the latest update

    @classmethod
    def build(cls, requests: Sequence[ActivationRequest], context: AccumulatorContext) -> _StreamedRows:
        (request,) = requests
        return cls(request, context.channel_dims.get(request, 1), context.generator)

    def begin_batch(self) -> None:
        self._batch += 1

    def share_key(self) -> Hashable:
        return self._share_key

    def follow(self, leader: Accumulator) -> bool:
        if leader is self._leader:
            return True
        if self._leader is None and self._sums is None and isinstance(leader, _StreamedRows) and leader._leader is None:
            self._leader = leader
            return True
        return False

    def unshare(self) -> None:
        leader, self._leader = self._leader, None
        if leader is not None and leader._sums is not None:
            leader._sums.flush()
            self._sums = leader._sums.copy()

    def update(self, request: ActivationRequest, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if self._leader is not None:  # no longer reading the leader's tensor
            leader, self._leader = self._leader, None
            if leader._sums is not None and leader._updated < leader._batch:
                self._sums = leader._sums.copy()
        self._updated = self._batch
        rows = self._rows(x)
        if self._sums is None:
            self._sums = _Sums(rows.shape[1], rows.device)
        self._sums.add(_owned(rows, x))

    @property
    def _state(self) -> _Sums | None:
        return self._leader._sums if self._leader is not None else self._sums

    def sync(self) -> None:
        """All-reduce the sums and the row count."""
        if self._leader is not None:
            raise RuntimeError(f"{self.label} of '{self.request.module}' shares another's sums: unshare() all accumulators first")
        if _world_size() > 1:
            _all_reduce_sums(self._sums, list, f"{self.label} of '{self.request.module}'")

    def _flushed(self) -> _Sums:
        sums = self._state
        if sums is None:
            raise RuntimeError(f"{self.label} of '{self.request.module}': nothing accumulated")
        sums.flush()
        return sums

    @property
    def empty(self) -> bool:
        return self._state is None

    def rows_seen(self) -> dict[ActivationRequest, int]:
        sums = self._state
        return {} if sums is None else {self.request: sums.count}

    def tensors(self) -> Iterator[torch.Tensor]:
        if self._sums is not None:  # a follower holds nothing of its own
            yield from self._sums.tensors()
        yield from self._index_tensors()


class CovarianceSums(_StreamedRows):
    """Streaming channel covariance over rows (every sample and position is a row), O(C^2) memory.

    Per batch, up to ``request.rows_per_batch`` rows are sampled (:func:`sample_rows`) and folded
    into float32 sums (one ``addmm_``), flushed into float64 every 32 batches.

    Args:
        request: a ``"covariance"`` request.
        channel_dim: the channel dimension of the activation (default 1).
        generator: draws the row subsample (see :class:`PooledReservoir`).
    """

    label = "covariance"

    def compute(self) -> torch.Tensor:
        """``(C, C)`` float64 population covariance over every row folded in."""
        sums = self._flushed()
        return covariance_from_sums(torch.tensor(float(sums.count)), sums.total, sums.outer)


@dataclass(frozen=True)
class ClassMoments:
    """Streamed per-class statistics of pooled features (float64): everything DI needs."""

    counts: torch.Tensor  #: (K,) samples per class
    class_sums: torch.Tensor  #: (K, C) feature sums per class
    total: torch.Tensor  #: (C,) feature sum
    scatter: torch.Tensor  #: (C, C) sum of x x^T


class ClassMomentSums(Accumulator):
    """Streamed class counts, class sums, feature sum and ``X^T X`` of pooled features, O(K C + C^2) memory.

    Labels are one-hot encoded; labels outside ``[0, num_classes)`` are counted and reported by
    :meth:`compute`.

    Args:
        request: a ``"class_moments"`` request (its ``pooling`` is used).
        num_classes: the number of classes ``K``.
        channel_dim: the channel dimension of the activation (default 1).
    """

    def __init__(self, request: ActivationRequest, num_classes: int, channel_dim: int = 1) -> None:
        if num_classes < 1:
            raise ValueError(f"class_moments of '{request.module}' need num_classes >= 1, got {num_classes}")
        self.request = request
        self.requests = (request,)
        self.classes = int(num_classes)
        self.channel_dim = int(channel_dim)
        self._sums: _Sums | None = None
        self._counts: torch.Tensor | None = None
        self._class_sums: torch.Tensor | None = None
        self._invalid: torch.Tensor | None = None

    @classmethod
    def build(cls, requests: Sequence[ActivationRequest], context: AccumulatorContext) -> ClassMomentSums:
        (request,) = requests
        return cls(request, request.num_classes or int(context.num_classes or 0), context.channel_dims.get(request, 1))

    def update(self, request: ActivationRequest, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if labels is None:
            raise ValueError(f"class_moments of '{request.module}' need the batch labels (begin_batch(labels))")
        rows = pool_channels(x, request.pooling, self.channel_dim, request.token_pooling)
        if self._sums is None:
            self._sums = _Sums(rows.shape[1], rows.device)
            self._counts = torch.zeros(self.classes, dtype=torch.float64, device=rows.device)
            self._class_sums = torch.zeros(self.classes, rows.shape[1], dtype=torch.float64, device=rows.device)
            self._invalid = torch.zeros((), dtype=torch.long, device=rows.device)
        counts, class_sums, invalid = self._state()
        labels = labels.to(rows.device).long()
        invalid += ((labels < 0) | (labels >= self.classes)).sum()
        onehot = torch.nn.functional.one_hot(labels.clamp(0, self.classes - 1), self.classes).to(rows.dtype)
        counts += onehot.sum(0).double()
        class_sums += (onehot.T @ rows).double()
        self._sums.add(_owned(rows, x))

    def _state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Counts, class sums and invalid-label count (created together with the sums)."""
        assert self._counts is not None and self._class_sums is not None and self._invalid is not None
        return self._counts, self._class_sums, self._invalid

    def sync(self) -> None:
        """All-reduce the counts, sums and invalid-label count."""
        if _world_size() > 1:
            _all_reduce_sums(
                self._sums, lambda: list(self._state()),
                f"class_moments of '{self.request.module}'",
            )

    def compute(self) -> ClassMoments:
        """The moments; raises ValueError when labels fell outside ``[0, num_classes)``."""
        if self._sums is None:
            raise RuntimeError(f"class_moments of '{self.request.module}': nothing accumulated")
        counts, class_sums, invalid = self._state()
        if int(invalid):
            raise ValueError(
                f"{int(invalid)} collected label(s) fall outside [0, {self.classes}); "
                "pass num_classes= to the criterion (criterion_kwargs) or fix label_fn"
            )
        self._sums.flush()
        return ClassMoments(counts, class_sums, self._sums.total, self._sums.outer)

    @property
    def empty(self) -> bool:
        return self._sums is None

    def tensors(self) -> Iterator[torch.Tensor]:
        if self._sums is not None:
            yield from self._sums.tensors()
            yield from self._state()


@dataclass(frozen=True)
class GramStatistic:
    """What :meth:`GramSums.compute` returns (float64): ``gram = Z^T Z``, ``total = Z^T 1``, ``count`` rows."""

    gram: torch.Tensor  #: (C, C) sum of z z^T over rows (uncentred)
    total: torch.Tensor  #: (C,) sum of z over rows
    count: int  #: rows folded in

    def centred(self) -> torch.Tensor:
        """``(Z - 1 mean^T)^T (Z - 1 mean^T)``: the Gram of the centred rows."""
        n = max(1, self.count)
        return self.gram - torch.outer(self.total, self.total) / n


class GramSums(_StreamedRows):
    """The streamed Gram matrix ``Z^T Z`` of activation rows (every sample and position is a row),
    with ``sum z`` and the row count, O(C^2) memory whatever the number of rows.

    Per batch, up to ``request.rows_per_batch`` rows are sampled (:func:`sample_rows`, all of them
    in order when the batch has fewer) and folded into float32 sums with one ``addmm_``, flushed into
    float64 every 32 batches (as :class:`CovarianceSums`). ``channels`` and ``channel_index`` are
    honoured (a flattened map viewed per channel, one branch's columns of a concatenation).

    Args:
        request: a ``"gram"`` request.
        channel_dim: the channel dimension of the activation (default 1).
        generator: draws the row subsample (see :class:`PooledReservoir`).
    """

    label = "gram"

    def compute(self) -> GramStatistic:
        """``Z^T Z``, ``Z^T 1`` (float64) and the row count over every row folded in."""
        sums = self._flushed()
        return GramStatistic(sums.outer.clone(), sums.total.clone(), int(sums.count))


# ---------------------------------------------------------------------------------------------- rows
class RowReservoir(_RowSampling):
    """A uniform reservoir of at most ``request.max_rows`` activation rows (sample x position).

    Per batch, up to ``request.rows_per_batch`` rows are sampled (:func:`sample_rows`), each with a
    uniform random key; the rows with the largest keys are kept, compacted once ``2 * max_rows``
    are pending (amortised O(1) copies per row).

    Args:
        request: a ``"rows"`` request (its ``channels`` and ``channel_index`` are honoured).
        channel_dim: the channel dimension of the activation (default 1).
        generator: draws the row subsample and the keys (see :class:`PooledReservoir`).
    """

    def __init__(self, request: ActivationRequest, channel_dim: int = 1, generator: Any = None) -> None:
        self._init_sampling(request, channel_dim, generator)
        self.max_rows = int(request.max_rows)
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._pending = 0
        self._seen = 0

    @classmethod
    def build(cls, requests: Sequence[ActivationRequest], context: AccumulatorContext) -> RowReservoir:
        (request,) = requests
        return cls(request, context.channel_dims.get(request, 1), context.generator)

    def update(self, request: ActivationRequest, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        rows = self._rows(x)
        keys = torch.rand(rows.shape[0], generator=_generator(self.generator, rows.device), device=rows.device)
        if self._keys is None or self._values is None:
            self._keys, self._values = keys[:0], rows[:0]
        if self._pending + rows.shape[0] >= 2 * self.max_rows:  # compact: amortised O(1) copies per row
            index, self._keys = reservoir_merge(self._keys, keys, self.max_rows)
            self._values, self._pending = torch.cat([self._values, rows])[index], 0
        else:
            self._keys, self._values = torch.cat([self._keys, keys]), torch.cat([self._values, rows])
            self._pending += rows.shape[0]
        self._seen += int(rows.shape[0])

    def sync(self) -> None:
        """Gather every rank's rows and keep the ``max_rows`` largest keys of all of them."""
        if _world_size() == 1:
            return
        local = None if self._keys is None or self._values is None else (self._keys.cpu(), self._values.cpu(), self._seen)
        gathered = [g for g in _all_gather(local) if g is not None]
        if not gathered:
            return
        device = self._values.device if self._values is not None else _default_device()
        keys = torch.cat([g[0] for g in gathered])
        values = torch.cat([g[1] for g in gathered])
        index, kept = reservoir_merge(keys[:0], keys, self.max_rows)
        self._keys, self._values, self._pending = kept.to(device), values[index].to(device), 0
        self._seen = sum(g[2] for g in gathered)

    def compute(self) -> torch.Tensor:
        """``(M, C)`` rows, a uniform sample of at most ``max_rows`` of all the rows folded in."""
        if self._keys is None or self._values is None:
            raise RuntimeError(f"rows of '{self.request.module}': nothing accumulated")
        index, _kept = reservoir_merge(self._keys[:0], self._keys, self.max_rows)
        return self._values[index]

    @property
    def empty(self) -> bool:
        return self._keys is None

    def rows_seen(self) -> dict[ActivationRequest, int]:
        return {} if self._keys is None else {self.request: self._seen}

    def tensors(self) -> Iterator[torch.Tensor]:
        if self._keys is not None and self._values is not None:
            yield self._keys
            yield self._values
        yield from self._index_tensors()


# ---------------------------------------------------------------------------------------------- registry
#: ``ActivationRequest.statistic`` -> the accumulator class that collects it.
ACCUMULATORS: dict[str, type[Accumulator]] = {
    "pooled": PooledReservoir,
    "covariance": CovarianceSums,
    "class_moments": ClassMomentSums,
    "rows": RowReservoir,
    "gram": GramSums,
}


def build_accumulators(
    requests: Sequence[ActivationRequest], context: AccumulatorContext
) -> dict[ActivationRequest, Accumulator]:
    """The accumulator of every request (requests of a :attr:`~Accumulator.shared` class share one).

    The dict's order is that of ``requests``; distinct accumulators, in order of first appearance,
    are ``dict.fromkeys(result.values())``.
    """
    requests = list(dict.fromkeys(requests))
    unknown = sorted({r.statistic for r in requests} - ACCUMULATORS.keys())
    if unknown:
        raise ValueError(f"no accumulator for statistic(s) {unknown}; known: {sorted(ACCUMULATORS)}")
    result: dict[ActivationRequest, Accumulator] = {}
    shared: dict[str, Accumulator] = {}
    for request in requests:
        cls = ACCUMULATORS[request.statistic]
        if cls.shared:
            if request.statistic not in shared:
                shared[request.statistic] = cls.build([r for r in requests if r.statistic == request.statistic], context)
            result[request] = shared[request.statistic]
        else:
            result[request] = cls.build([request], context)
    return result
