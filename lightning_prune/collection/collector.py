"""Activation collection from the training forward passes themselves.

:class:`ActivationCollector` attaches forward hooks for a list of
:class:`~lightning_prune.collection.requests.ActivationRequest` and routes every activation to the
request's :class:`~lightning_prune.collection.accumulators.Accumulator` (one class per statistic,
see :data:`~lightning_prune.collection.accumulators.ACCUMULATORS`), on the activations' device and
without any host synchronisation:

* ``"pooled"`` requests: per-sample pooled channel values in one *shared* reservoir of at most
  ``max_samples`` samples (uniform over all samples seen, the same samples for every layer, with
  their labels), so criteria that concatenate layers (PLS) see aligned rows;
* ``"covariance"`` requests: streaming channel sums and outer products over rows;
* ``"class_moments"`` requests: streaming class counts, class sums and ``X^T X``;
* ``"rows"`` requests: a uniform reservoir of activation rows;
* ``"gram"`` requests: the streamed Gram matrix ``Z^T Z`` of activation rows.

Memory is bounded by ``max_samples`` and ``C^2`` per layer, whatever the data set size or the
number of epochs. Hooks exist only between :meth:`attach` and :meth:`detach`. The result, an
:class:`ActivationStore`, is what criteria read through their scoring context.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune._tree import leaves
from lightning_prune.collection.accumulators import (
    Accumulator,
    AccumulatorContext,
    ClassMoments,
    GramStatistic,
    SharedGenerator,
    build_accumulators,
)
from lightning_prune.collection.requests import ActivationRequest

__all__ = ["ActivationCollector", "ActivationStore", "ClassMoments"]


def _channel_dim(request: ActivationRequest, module: nn.Module) -> int:
    if request.channel_dim is not None:
        return request.channel_dim
    if request.site == "output" and isinstance(module, nn.modules.conv._ConvNd):
        return 1
    if request.site == "input" and isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return 1
    return -1


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
        self._tables: dict[str, dict[ActivationRequest, Any]] = {
            "pooled": pooled,
            "covariance": covariances,
            "class_moments": class_moments or {},
            "rows": rows or {},
        }
        self.samples_seen = 0  #: training samples the statistics come from
        self.labels = labels
        self.rows_seen = rows_seen

    @classmethod
    def from_results(
        cls,
        results: Mapping[ActivationRequest, Any],
        *,
        labels: torch.Tensor | None = None,
        rows_seen: dict[ActivationRequest, int] | None = None,
        samples_seen: int = 0,
    ) -> ActivationStore:
        """A store of every request's computed statistic, filed under ``request.statistic``."""
        store = cls({}, {}, labels, dict(rows_seen or {}))
        for request, value in results.items():
            store._tables.setdefault(request.statistic, {})[request] = value
        store.samples_seen = samples_seen
        return store

    @property
    def num_samples(self) -> int:
        for value in self._tables["pooled"].values():
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

    def get(self, statistic: str, request: ActivationRequest | str) -> Any:
        """The computed ``statistic`` of ``request`` (a request, or a module name collected once)."""
        return self._find(self._tables.get(statistic, {}), request)

    def pooled(self, request: ActivationRequest | str) -> torch.Tensor:
        """``(N, C)`` pooled values of the reservoir's samples."""
        return self.get("pooled", request)

    def covariance(self, request: ActivationRequest | str) -> torch.Tensor:
        """``(C, C)`` float64 channel covariance over all rows seen."""
        return self.get("covariance", request)

    def rows(self, request: ActivationRequest | str) -> torch.Tensor:
        """``(M, C)`` activation rows, a uniform sample of at most ``max_rows`` of all rows seen."""
        return self.get("rows", request)

    def gram(self, request: ActivationRequest | str) -> GramStatistic:
        """Streamed ``Z^T Z``, ``Z^T 1`` and row count of the activation rows."""
        return self.get("gram", request)

    def table(self, statistic: str) -> dict[ActivationRequest, Any]:
        """Every collected value of ``statistic``, by request (a copy; empty when none)."""
        return dict(self._tables.get(statistic, {}))

    def class_moments(self, request: ActivationRequest | str) -> ClassMoments:
        """Streamed class counts, class sums, feature sum and ``X^T X`` of the pooled values."""
        return self.get("class_moments", request)

    def named_tensors(self) -> Iterator[tuple[ActivationRequest, str, torch.Tensor]]:
        """Every floating-point tensor of every statistic, as ``(request, field, tensor)`` (``field``:
        the statistic's name, or ``"class_moments.scatter"`` etc. for a statistic of several
        tensors), in collection order; labels excluded."""
        for statistic, table in self._tables.items():
            for request, value in table.items():
                if isinstance(value, torch.Tensor):
                    parts: list[tuple[str, Any]] = [(statistic, value)]
                elif dataclasses.is_dataclass(value):
                    parts = [(f"{statistic}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
                else:
                    parts = [(statistic, leaf) for leaf in leaves(value)]
                for name, tensor in parts:
                    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                        yield request, name, tensor


class ActivationCollector:
    """Hooks that accumulate the statistics of ``requests`` while attached.

    Args:
        model: the model whose modules are named in the requests.
        requests: what to collect.
        max_samples: reservoir capacity for pooled statistics (samples kept, all layers share them).
        seed: seed of the collector's own generator (sampling never touches the global RNG).
        num_classes: number of classes for ``"class_moments"`` requests that do not set theirs.

    Use: :meth:`attach`; per training batch :meth:`begin_batch` (with the labels) before the
    forward pass and :meth:`end_batch` after it; :meth:`store` at the prune; :meth:`detach`.
    Forward passes outside ``begin_batch``/``end_batch`` (validation inside the window, the
    pruner's own tracing) are not recorded.

    Each request's statistic is an :class:`~lightning_prune.collection.accumulators.Accumulator`;
    the collector resolves modules and channel dimensions, owns the hooks and the one generator
    every accumulator draws from (in hook order: reproducible), and routes each activation.
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
        self._handles: list[Any] = []
        self._generator = SharedGenerator(self.seed)
        self.reset()

    # -------------------------------------------------------------- state
    def reset(self) -> None:
        """Drop everything collected (statistics are indexed by the current channels)."""
        context = AccumulatorContext(self._channel_dims, self._generator, self.max_samples, self.num_classes)
        self._accumulators: dict[ActivationRequest, Accumulator] = build_accumulators(self.requests, context)
        self._batch_labels: torch.Tensor | None = None
        self._seen: set[ActivationRequest] = set()
        self._claims: dict[Any, tuple[weakref.ref, int, Accumulator]] = {}
        self._active = False
        self._batch_size = 0
        self.samples_seen = 0  #: training samples whose activations were collected (all ranks after synchronize)
        self.batches = 0

    @property
    def accumulators(self) -> list[Accumulator]:
        """The distinct accumulators, in the order of the requests."""
        return list(dict.fromkeys(self._accumulators.values()))

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
        self._seen, self._claims = set(), {}
        self._active = True
        for accumulator in self.accumulators:
            accumulator.begin_batch()

    def end_batch(self) -> None:
        """End the batch: the pooled reservoir keys and buffers it (amortised O(1) copies per sample)."""
        self._batch_labels, self._seen, self._claims, self._active = None, set(), {}, False
        self.batches += 1
        self.samples_seen += self._batch_size
        self._batch_size = 0
        for accumulator in self.accumulators:
            accumulator.end_batch()

    def _gen(self, device: torch.device) -> torch.Generator:
        return self._generator(device)

    def _make_hook(self, requests: list[ActivationRequest]):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._active:  # outside begin_batch/end_batch: validation, the pruner's own passes
                return
            with torch.no_grad():  # statistics only: no autograd record, no detach per request
                self._collect(requests, inputs, output)

        return hook

    def _collect(self, requests: list[ActivationRequest], inputs: tuple[Any, ...], output: Any) -> None:
        """Route a module call's activations to the accumulators of its ``requests``."""
        for request in requests:
            x = output if request.site == "output" else (inputs[0] if inputs else None)
            if not isinstance(x, torch.Tensor) or request in self._seen:
                continue  # a module called twice in one forward: the first call counts
            self._seen.add(request)
            self._batch_size = self._batch_size or int(x.shape[0])  # shape only: no sync
            accumulator = self._accumulators[request]
            if not self._shared(accumulator, x):
                accumulator.update(request, x, self._batch_labels)

    def _shared(self, accumulator: Accumulator, x: torch.Tensor) -> bool:
        """Whether ``accumulator`` shares the state of one that already folded in ``x`` in this batch
        (the same tensor object, unmodified since); otherwise it claims ``x`` for later readers."""
        key = accumulator.share_key()
        if key is None:
            return False
        claim = self._claims.get((key, id(x)))
        if claim is not None and claim[0]() is x and claim[1] == x._version:
            return accumulator.follow(claim[2])
        self._claims[(key, id(x))] = (weakref.ref(x), x._version, accumulator)  # a weak reference: x is not kept alive
        return False

    # -------------------------------------------------------------- distributed
    def synchronize(self) -> None:
        """Combine the statistics of every process (``torch.distributed``), in place, on all ranks.

        Each accumulator syncs (reservoirs are gathered and merged by their random keys, still a
        uniform sample of all the samples seen by all ranks; streamed sums are all-reduced) and
        ``samples_seen`` is summed. Every rank ends with identical statistics, so every rank makes
        the same pruning decision from all ranks' data. A no-op when torch.distributed is not
        initialised.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for accumulator in self.accumulators:  # first, so that no shared state is reduced twice
            accumulator.unshare()
        for accumulator in self.accumulators:
            accumulator.sync()
        samples = torch.tensor([float(self.samples_seen)])
        dist.all_reduce(samples)
        self.samples_seen = int(samples.item())

    # -------------------------------------------------------------- results
    def store(self) -> ActivationStore:
        """The statistics collected so far (the reservoir compacted to at most ``max_samples``)."""
        results: dict[ActivationRequest, Any] = {}
        rows_seen: dict[ActivationRequest, int] = {}
        labels = None
        for accumulator in self.accumulators:
            results.update(accumulator.results())
            rows_seen.update(accumulator.rows_seen())
            labels = accumulator.labels if labels is None else labels
        return ActivationStore.from_results(results, labels=labels, rows_seen=rows_seen, samples_seen=self.samples_seen)

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor the collector holds (for memory accounting)."""
        for accumulator in self.accumulators:
            yield from accumulator.tensors()

    def nbytes(self) -> int:
        return sum(accumulator.nbytes() for accumulator in self.accumulators)
