"""Activation collection from the training forward passes themselves.

:class:`ActivationCollector` attaches forward hooks for a list of
:class:`~lightning_prune.collection.requests.ActivationRequest` and accumulates, on the
activations' device and without any host synchronisation:

* ``"pooled"`` requests: per-sample pooled channel values in one *shared* reservoir of at most
  ``max_samples`` samples (uniform over all samples seen, the same samples for every layer, with
  their labels), so criteria that concatenate layers (PLS) see aligned rows;
* ``"covariance"`` requests: streaming channel sums and outer products over rows.

Memory is bounded by ``max_samples`` and ``C^2`` per layer, whatever the data set size or the
number of epochs. Hooks exist only between :meth:`attach` and :meth:`detach`. The result, an
:class:`ActivationStore`, is what criteria read through their scoring context.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune.collection.requests import ActivationRequest
from lightning_prune.collection.statistics import covariance_from_sums, pool_channels, reservoir_merge

__all__ = ["ActivationCollector", "ActivationStore"]


def _channel_dim(request: ActivationRequest, module: nn.Module) -> int:
    if request.channel_dim is not None:
        return request.channel_dim
    if request.site == "output" and isinstance(module, nn.modules.conv._ConvNd):
        return 1
    if request.site == "input" and isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return 1
    return -1


class _CovarianceSums:
    """``sum x`` and ``sum x x^T`` over rows: float32 per batch (one ``addmm_``), flushed into float64
    every ``flush_every`` batches so that long windows keep float64 accuracy."""

    flush_every = 32

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.batches = 0
        self.total32 = torch.zeros(channels, device=device)
        self.outer32 = torch.zeros(channels, channels, device=device)
        self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        self.count += int(rows.shape[0])
        self.total32.add_(rows.sum(0))
        self.outer32.addmm_(rows.T, rows)
        self.batches += 1
        if self.batches % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        self.total += self.total32.double()
        self.outer += self.outer32.double()
        self.total32.zero_()
        self.outer32.zero_()

    def covariance(self) -> torch.Tensor:
        self.flush()
        return covariance_from_sums(torch.tensor(float(self.count)), self.total, self.outer)

    def tensors(self) -> list[torch.Tensor]:
        return [self.total32, self.outer32, self.total, self.outer]


@dataclass(frozen=True)
class ClassMoments:
    """Streamed per-class statistics of pooled features (float64): everything DI needs."""

    counts: torch.Tensor  #: (K,) samples per class
    class_sums: torch.Tensor  #: (K, C) feature sums per class
    total: torch.Tensor  #: (C,) feature sum
    scatter: torch.Tensor  #: (C, C) sum of x x^T


class _ClassMomentSums(_CovarianceSums):
    """:class:`_CovarianceSums` plus class counts and class sums (labels are one-hot encoded)."""

    def __init__(self, channels: int, classes: int, device: torch.device) -> None:
        super().__init__(channels, device)
        self.classes = classes
        self.counts = torch.zeros(classes, dtype=torch.float64, device=device)
        self.class_sums = torch.zeros(classes, channels, dtype=torch.float64, device=device)
        self.invalid = torch.zeros((), dtype=torch.long, device=device)

    def add_labelled(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(rows.device).long()
        self.invalid += ((labels < 0) | (labels >= self.classes)).sum()
        onehot = torch.nn.functional.one_hot(labels.clamp(0, self.classes - 1), self.classes).to(rows.dtype)
        self.counts += onehot.sum(0).double()
        self.class_sums += (onehot.T @ rows).double()
        self.add(rows)

    def moments(self) -> ClassMoments:
        if int(self.invalid):
            raise ValueError(
                f"{int(self.invalid)} collected label(s) fall outside [0, {self.classes}); "
                "pass num_classes= to the criterion (criterion_kwargs) or fix label_fn"
            )
        self.flush()
        return ClassMoments(self.counts, self.class_sums, self.total, self.outer)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + [self.counts, self.class_sums, self.invalid]


class ActivationStore:
    """Collected statistics, as handed to a criterion.

    Attributes:
        labels: labels of the reservoir's samples (``(N,)``), or None when none were given.
    """

    def __init__(
        self,
        pooled: dict[ActivationRequest, torch.Tensor],
        covariances: dict[ActivationRequest, torch.Tensor],
        labels: torch.Tensor | None,
        rows_seen: dict[ActivationRequest, int],
        class_moments: dict[ActivationRequest, ClassMoments] | None = None,
        rows: dict[ActivationRequest, torch.Tensor] | None = None,
    ) -> None:
        self._pooled = pooled
        self._covariances = covariances
        self._class_moments = class_moments or {}
        self._rows = rows or {}
        self.samples_seen = 0  #: training samples the statistics come from
        self.labels = labels
        self.rows_seen = rows_seen

    @property
    def num_samples(self) -> int:
        for value in self._pooled.values():
            return int(value.shape[0])
        return 0 if self.labels is None else int(self.labels.shape[0])

    def _find(self, table: dict[ActivationRequest, Any], request: ActivationRequest | str) -> Any:
        if isinstance(request, ActivationRequest):
            if request in table:
                return table[request]
        else:
            matches = [v for r, v in table.items() if r.module == request]
            if len(matches) == 1:
                return matches[0]
        raise KeyError(f"no collected statistic for {request!r}; collected: {[r.module for r in table]}")

    def pooled(self, request: ActivationRequest | str) -> torch.Tensor:
        """``(N, C)`` pooled values of the reservoir's samples."""
        return self._find(self._pooled, request)

    def covariance(self, request: ActivationRequest | str) -> torch.Tensor:
        """``(C, C)`` float64 channel covariance over all rows seen."""
        return self._find(self._covariances, request)

    def rows(self, request: ActivationRequest | str) -> torch.Tensor:
        """``(M, C)`` activation rows, a uniform sample of at most ``max_rows`` of all rows seen."""
        return self._find(self._rows, request)

    def class_moments(self, request: ActivationRequest | str) -> ClassMoments:
        """Streamed class counts, class sums, feature sum and ``X^T X`` of the pooled values."""
        return self._find(self._class_moments, request)


class ActivationCollector:
    """Hooks that accumulate the statistics of ``requests`` while attached.

    Args:
        model: the model whose modules are named in the requests.
        requests: what to collect.
        max_samples: reservoir capacity for pooled statistics (samples kept, all layers share them).
        seed: seed of the collector's own generator (sampling never touches the global RNG).

    Use: :meth:`attach`; per training batch :meth:`begin_batch` (with the labels) before the
    forward pass and :meth:`end_batch` after it; :meth:`store` at the prune; :meth:`detach`.
    Forward passes outside ``begin_batch``/``end_batch`` (validation inside the window, the
    pruner's own tracing) are not recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        requests: Sequence[ActivationRequest],
        *,
        max_samples: int = 2048,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        modules = dict(model.named_modules())
        missing = [r.module for r in requests if r.module not in modules]
        if missing:
            raise ValueError(f"activation requests name modules the model does not have: {missing}")
        self.model = model
        self.requests = list(dict.fromkeys(requests))
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self.num_classes = num_classes
        unsized = [r.module for r in requests if r.statistic == "class_moments" and not r.num_classes and not num_classes]
        if unsized:
            raise ValueError(f"class_moments requests need num_classes (on the request or the collector): {unsized}")
        self._modules = {r: modules[r.module] for r in self.requests}
        self._channel_dims = {r: _channel_dim(r, self._modules[r]) for r in self.requests}
        self._column_index: dict[tuple[ActivationRequest, torch.device], torch.Tensor] = {}  # channel_index on device
        self._handles: list[Any] = []
        self._generator: torch.Generator | None = None
        self.reset()

    # -------------------------------------------------------------- state
    def reset(self) -> None:
        """Drop everything collected (statistics are indexed by the current channels)."""
        self._keys: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._pooled: dict[ActivationRequest, torch.Tensor] = {}
        self._chunks: list[tuple[torch.Tensor, torch.Tensor | None, dict[ActivationRequest, torch.Tensor]]] = []
        self._pending_rows = 0
        self._cov: dict[ActivationRequest, _CovarianceSums] = {}
        self._moments: dict[ActivationRequest, _ClassMomentSums] = {}
        self._rows: dict[ActivationRequest, list[Any]] = {}
        self._rows_seen: dict[ActivationRequest, int] = {}
        self._batch_labels: torch.Tensor | None = None
        self._staged: dict[ActivationRequest, torch.Tensor] = {}
        self._seen: set[ActivationRequest] = set()
        self._active = False
        self._batch_size = 0
        self.samples_seen = 0  #: training samples whose activations were collected (all ranks after synchronize)
        self.batches = 0

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        by_module: dict[nn.Module, list[ActivationRequest]] = {}
        for request, module in self._modules.items():
            by_module.setdefault(module, []).append(request)
        for module, requests in by_module.items():
            self._handles.append(module.register_forward_hook(self._make_hook(requests)))

    def detach(self) -> None:
        """Remove every hook this collector registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -------------------------------------------------------------- per batch
    def begin_batch(self, labels: torch.Tensor | None = None) -> None:
        """Start a batch; ``labels`` (one per sample) are stored with the pooled samples."""
        self._batch_labels = None if labels is None else labels.detach()
        self._staged = {}
        self._seen = set()
        self._active = True

    def end_batch(self) -> None:
        """Move the batch's pooled values into the reservoir (amortised O(1) copies per sample)."""
        pooled, labels = self._staged, self._batch_labels
        self._staged, self._batch_labels, self._seen, self._active = {}, None, set(), False
        self.batches += 1
        self.samples_seen += self._batch_size
        self._batch_size = 0
        if not pooled:
            return
        n = next(iter(pooled.values())).shape[0]
        device = next(iter(pooled.values())).device
        keys = torch.rand(n, generator=self._gen(device), device=device)
        if labels is not None and labels.shape[0] != n:
            raise ValueError(f"label_fn returned {labels.shape[0]} labels for a batch of {n} samples")
        self._chunks.append((keys, labels, pooled))
        self._pending_rows += n
        if self._pending_rows >= 2 * self.max_samples:
            self._compact()

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def _compact(self) -> None:
        if not self._chunks:
            return
        old_keys = self._keys if self._keys is not None else self._chunks[0][0][:0]
        new_keys = torch.cat([c[0] for c in self._chunks])
        index, self._keys = reservoir_merge(old_keys, new_keys, self.max_samples)
        if all(c[1] is not None for c in self._chunks) and (old_keys.numel() == 0 or self._labels is not None):
            old = self._labels if self._labels is not None else self._chunks[0][1][:0]
            self._labels = torch.cat([old, *[c[1] for c in self._chunks]])[index]
        else:
            self._labels = None
        for request in self._chunks[0][2]:
            old = self._pooled.get(request)
            parts = ([old] if old is not None else []) + [c[2][request] for c in self._chunks]
            self._pooled[request] = torch.cat(parts)[index]
        self._chunks = []
        self._pending_rows = 0

    def _make_hook(self, requests: list[ActivationRequest]):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._active:  # outside begin_batch/end_batch: validation, the pruner's own passes
                return
            for request in requests:
                x = output if request.site == "output" else (inputs[0] if inputs else None)
                if not isinstance(x, torch.Tensor) or request in self._seen:
                    continue  # a module called twice in one forward: the first call counts
                self._seen.add(request)
                self._batch_size = self._batch_size or int(x.shape[0])  # shape only: no sync
                if request.statistic == "pooled":
                    self._staged[request] = pool_channels(x, request.pooling, self._channel_dims[request])
                elif request.statistic == "class_moments":
                    self._accumulate_class_moments(request, x)
                elif request.statistic == "rows":
                    self._accumulate_rows(request, x)
                else:
                    self._accumulate_covariance(request, x)

        return hook

    def _sample_rows(self, request: ActivationRequest, x: torch.Tensor) -> torch.Tensor:
        """Up to ``rows_per_batch`` rows (sample x position) of ``x``, one column per channel, float32."""
        dim = self._channel_dims[request]
        x = x.detach()
        if request.channel_index:  # the observed channels' part of a wider input (a concatenation)
            key = (request, x.device)
            if key not in self._column_index:  # one host-to-device copy per request, not per batch
                self._column_index[key] = torch.tensor(request.channel_index, device=x.device)
            x = x.index_select(dim, self._column_index[key])
        if request.channels and x.dim() == 2 and x.shape[1] != request.channels:
            x = x.reshape(x.shape[0], request.channels, -1)  # flattened feature map: channel-major
            dim = 1
        if x.dim() > 2 and dim % x.dim() != 1:
            x = x.movedim(dim, 1)
        flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)  # (N, C, positions)
        n, c, positions = flat.shape
        k = request.rows_per_batch
        if n * positions > k:
            gen = self._gen(x.device)
            samples = torch.randint(n, (k,), generator=gen, device=x.device)
            where = torch.randint(positions, (k,), generator=gen, device=x.device)
            rows = flat[samples, :, where]
        else:
            rows = flat.transpose(1, 2).reshape(-1, c)
        return rows if rows.dtype == torch.float32 else rows.float()

    def _accumulate_covariance(self, request: ActivationRequest, x: torch.Tensor) -> None:
        rows = self._sample_rows(request, x)
        sums = self._cov.get(request)
        if sums is None:
            sums = self._cov[request] = _CovarianceSums(rows.shape[1], rows.device)
        sums.add(rows)
        self._rows_seen[request] = self._rows_seen.get(request, 0) + int(rows.shape[0])

    def _accumulate_rows(self, request: ActivationRequest, x: torch.Tensor) -> None:
        rows = self._sample_rows(request, x)
        keys = torch.rand(rows.shape[0], generator=self._gen(rows.device), device=rows.device)
        reservoir = self._rows.setdefault(request, [keys[:0], rows[:0], 0])
        if reservoir[2] + rows.shape[0] >= 2 * request.max_rows:  # compact: amortised O(1) copies per row
            index, kept = reservoir_merge(reservoir[0], keys, request.max_rows)
            reservoir[:] = [kept, torch.cat([reservoir[1], rows])[index], 0]
        else:
            reservoir[:] = [torch.cat([reservoir[0], keys]), torch.cat([reservoir[1], rows]), reservoir[2] + rows.shape[0]]
        self._rows_seen[request] = self._rows_seen.get(request, 0) + int(rows.shape[0])

    def _accumulate_class_moments(self, request: ActivationRequest, x: torch.Tensor) -> None:
        if self._batch_labels is None:
            raise ValueError(f"class_moments of '{request.module}' need the batch labels (begin_batch(labels))")
        rows = pool_channels(x, request.pooling, self._channel_dims[request])
        sums = self._moments.get(request)
        if sums is None:
            classes = request.num_classes or int(self.num_classes or 0)
            sums = self._moments[request] = _ClassMomentSums(rows.shape[1], classes, rows.device)
        sums.add_labelled(rows, self._batch_labels)

    # -------------------------------------------------------------- distributed
    def synchronize(self) -> None:
        """Combine the statistics of every process (``torch.distributed``), in place, on all ranks.

        Reservoirs are gathered and merged by their random keys (still a uniform sample of all the
        samples seen by all ranks); streamed sums are all-reduced. Every rank ends with identical
        statistics, so every rank makes the same pruning decision from all ranks' data. A no-op
        when torch.distributed is not initialised.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        self._compact()
        local = {
            "keys": None if self._keys is None else self._keys.cpu(),
            "labels": None if self._labels is None else self._labels.cpu(),
            "pooled": {r: v.cpu() for r, v in self._pooled.items()},
            "rows": {r: (k.cpu(), v.cpu()) for r, (k, v, _) in self._rows.items()},
        }
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        if any(g["keys"] is not None for g in gathered):
            device = next(iter(self._pooled.values())).device
            keys = torch.cat([g["keys"] for g in gathered if g["keys"] is not None])
            index, self._keys = reservoir_merge(keys[:0], keys, self.max_samples)
            if all(g["labels"] is not None for g in gathered if g["keys"] is not None):
                self._labels = torch.cat([g["labels"] for g in gathered if g["keys"] is not None])[index].to(device)
            for request in self._pooled:
                self._pooled[request] = torch.cat([g["pooled"][request] for g in gathered if g["keys"] is not None])[index].to(device)
            self._keys = self._keys.to(device)
        for request, reservoir in self._rows.items():
            device = reservoir[1].device
            keys = torch.cat([g["rows"][request][0] for g in gathered])
            values = torch.cat([g["rows"][request][1] for g in gathered])
            index, kept = reservoir_merge(keys[:0], keys, request.max_rows)
            reservoir[:] = [kept.to(device), values[index].to(device), 0]
        for sums in [*self._cov.values(), *self._moments.values()]:
            sums.flush()
            for tensor in sums.tensors():
                dist.all_reduce(tensor)
            count = torch.tensor([float(sums.count)], device=sums.total.device)
            dist.all_reduce(count)
            sums.count = int(count.item())
        samples = torch.tensor([float(self.samples_seen)])
        dist.all_reduce(samples)
        self.samples_seen = int(samples.item())
        seen = {r: torch.tensor([float(n)]) for r, n in self._rows_seen.items()}
        for request, n in seen.items():
            dist.all_reduce(n)
            self._rows_seen[request] = int(n.item())

    # -------------------------------------------------------------- results
    def store(self) -> ActivationStore:
        """The statistics collected so far (the reservoir compacted to at most ``max_samples``)."""
        self._compact()
        covariances = {r: sums.covariance() for r, sums in self._cov.items()}
        moments = {r: sums.moments() for r, sums in self._moments.items()}
        rows = {}
        for request, (keys, values, _) in self._rows.items():
            index, _kept = reservoir_merge(keys[:0], keys, request.max_rows)
            rows[request] = values[index]
        store = ActivationStore(dict(self._pooled), covariances, self._labels, dict(self._rows_seen), moments, rows)
        store.samples_seen = self.samples_seen
        return store

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor the collector holds (for memory accounting)."""
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
        for sums in [*self._cov.values(), *self._moments.values()]:
            yield from sums.tensors()
        for keys, values, _ in self._rows.values():
            yield keys
            yield values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
