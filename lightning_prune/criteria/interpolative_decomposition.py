"""``"interpolative_decomposition"`` (``"id"``): Chee, Renz, Damle, De Sa, NeurIPS 2022.

``docs/criteria.md`` section "Interpolative decomposition". ``Z`` is the activation a consumer of
the group reads (after BN, ReLU and pooling), as rows ``(N*H*W) x C``; what is collected is its
streamed Gram matrix ``G = Z^T Z`` (statistic ``"gram"``, O(C^2) memory, every row of every batch
up to ``rows_per_batch``), one per consumer.

**Selection.** A column-pivoted QR ``Z P = Q R`` orders the channels (first pivots kept first). Its
pivots are those of the greedy pivoted Cholesky of ``G``
(:func:`~lightning_prune.engine.correction.pivoted_cholesky`), so no rows need to be kept. When
several consumers read the group (a residual stream read at several points, a layer read by a
block and its shortcut), their Grams, each divided by its trace, are summed.

**Weight correction** is the engine's least-squares correction
(:mod:`lightning_prune.engine.correction`) with this selection: the producer keeps rows ``S``, and
every consumer absorbs ``T`` with ``T[:, S] = I`` and ``T[:, R] = (G_SS + lambda I)^-1 G_SR`` from
*its own* Gram, over its input-channel axis (``W_fc (T kron I_r)^T`` for a linear reading a
flattened map). For ``S`` = a pivot prefix and ``lambda -> 0`` this is ID's ``[I_k, R11^-1 R12] P^T``.
Residual groups are corrected too (every consumer of the stream reads it at its own point);
grouped or unsupported consumers are left to selection and the step's record says so.

**Widths.** Keeping ``k`` channels costs the share of the consumed activation's energy it leaves
unexplained: the decomposition's squared relative residual ``||R_22||_F^2 / ||R||_F^2`` (the trace of
the pivoted Cholesky's Schur complement over that of ``G``) where the consumers absorb ``T``, the
dropped channels' share of ``trace(G)`` where the group is pruned by selection only; a group that ``n``
consumers read (a residual stream, a layer and its shortcut) is charged ``n`` times that, once per
consumer that receives it. The allocation removes, step by step, the width with the smallest loss per
MAC saved until the target is met, so it minimises the summed energy lost over the network. Two
earlier rules concentrated the cut: charging a stream once made the streams of the high-resolution
stages look cheapest, and charging the relative error itself (its square root) made one deep cut
look cheaper than several shallow ones of the same total energy (``sqrt`` is concave), so the
allocation took groups one after another to the ``max_layer_ratio`` cap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_prune.collection.requests import ActivationRequest
from lightning_prune.criteria.base import Criterion, Requirements, ScoringContext
from lightning_prune.criteria.registry import register_criterion
from lightning_prune.engine.correction import (
    GCV,
    GRAM_ROWS_PER_BATCH,
    apply_least_squares,
    check_ridge,
    consumers_of,
    find_gram,
    pivoted_cholesky,
    ridge_interpolation,
)
from lightning_prune.engine.graph import ChannelGroup

__all__ = [
    "InterpolativeDecomposition",
    "gram_reconstruction_errors",
    "interpolation_matrix",
    "pivoted_cholesky",
    "pivoted_qr",
    "reconstruction_errors",
    "ridge_interpolation",
]


def pivoted_qr(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(R, pivots)`` of the column-pivoted QR ``Z P = Q R`` (scipy, float64, R is ``min(M, C) x C``)."""
    from scipy.linalg import qr

    r, pivots = qr(np.asarray(z, dtype=np.float64), mode="r", pivoting=True)
    return r, pivots


def reconstruction_errors(z: np.ndarray, r: np.ndarray, pivots: np.ndarray, corrected: bool) -> np.ndarray:
    """``error[k]``: relative Frobenius error of the activation when the first ``k`` pivots stay.

    With correction (consumers absorb ``T``) it is the interpolative decomposition's residual,
    ``||R[k:, k:]||_F / ||R||_F`` (``Z - Z_S T = Q_2 R_22``). Without (selection only), the dropped
    channels are simply lost: ``||Z[:, dropped]||_F / ||Z||_F``.
    """
    c = z.shape[1]
    if corrected:
        sq = np.zeros(c + 1)
        for k in range(c):
            sq[k] = float((r[k:, k:] ** 2).sum())
        total = float((r**2).sum())
    else:
        col = (np.asarray(z, dtype=np.float64) ** 2).sum(0)[pivots]
        sq = np.append(np.cumsum(col[::-1])[::-1], 0.0)
        total = float(col.sum())
    return np.sqrt(sq / total) if total > 0 else np.zeros(c + 1)


def interpolation_matrix(z: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """``T`` (``len(kept) x C``) minimising ``||Z[:, kept] T - Z||``; rows follow ``kept``."""
    z = np.asarray(z, dtype=np.float64)
    t, *_ = np.linalg.lstsq(z[:, list(kept)], z, rcond=None)
    return t


def gram_reconstruction_errors(gram: np.ndarray, corrected: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(pivots, error)`` from a Gram ``G = Z^T Z`` alone: the pivoted-Cholesky order and
    ``error[k]``, the relative Frobenius error when the first ``k`` pivots stay (``C + 1`` entries).

    With correction it is the decomposition's residual ``sqrt(trace(Schur_k) / trace(G))``
    (``= ||R[k:, k:]||_F / ||R||_F``); without, the norm of the dropped channels,
    ``sqrt(sum_{dropped} G_cc / trace(G))``.
    """
    g = np.asarray(gram, dtype=np.float64)
    pivots, _r, residual = pivoted_cholesky(g)
    total = float(np.trace(g))
    if total <= 0:
        return pivots, np.zeros(g.shape[0] + 1)
    if corrected:
        sq = residual
    else:
        col = np.diag(g)[pivots]
        sq = np.append(np.cumsum(col[::-1])[::-1], 0.0)
    return pivots, np.sqrt(np.clip(sq, 0.0, None) / total)


@register_criterion("interpolative_decomposition", "id")
class InterpolativeDecomposition(Criterion):
    """Keep the channels a pivoted QR of the consumed activation picks (from its Gram); consumers absorb the rest.

    Args:
        max_rows: unused since the Gram statistic replaced the row reservoir (the Gram is O(C^2)
            whatever the rows); accepted so that existing configurations still load.
        rows_per_batch: rows sampled per training batch into each Gram. Default 512.
        ridge: ridge of ``T``, relative to the mean diagonal of the consumer's Gram. Default None
            (``"gcv"``): chosen per consumer by generalised cross-validation
            (:func:`~lightning_prune.engine.correction.gcv_ridge`); where the Gram holds far more rows
            than channels it stays near the floor and ``T`` is the paper's. ``1e-6``
            (:data:`~lightning_prune.engine.correction.DEFAULT_RIDGE`): the paper's
            ``T = R11^+ R12`` exactly, with a numerical safeguard; on a Gram of no more rows than
            kept channels (small images, short windows) it fits those rows exactly, and a
            :class:`~lightning_prune.engine.correction.CorrectionWarning` says so. The callback's
            ``correction_ridge`` overrides it.
    """

    requirements = Requirements(activations=True)
    width_losses_per_mac = True
    default_correction = "least_squares"

    def __init__(
        self, max_rows: int = 4096, rows_per_batch: int = GRAM_ROWS_PER_BATCH, ridge: float | str | None = None
    ) -> None:
        if max_rows < 2 or rows_per_batch < 1:
            raise ValueError(f"max_rows must be >= 2 and rows_per_batch >= 1, got {max_rows}, {rows_per_batch}")
        ridge = check_ridge(ridge, "ridge")
        self.max_rows = int(max_rows)
        self.rows_per_batch = int(rows_per_batch)
        self.ridge = ridge
        self._order: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
        self._consumers: dict[str, int] = {}  #: group root -> consumers whose Gram was found

    # ------------------------------------------------------------------ which tensors
    def _root_request(self, group: ChannelGroup) -> ActivationRequest:
        module, site = group.observation
        return ActivationRequest(module, site=site, statistic="gram", rows_per_batch=self.rows_per_batch)

    def _requests(self, group: ChannelGroup, model: nn.Module | None) -> tuple[list[ActivationRequest], bool]:
        """The Gram requests the selection reads (every absorbing consumer's input, else the root's
        output) and whether every consumer absorbs ``T``."""
        consumers = consumers_of(group, model, self.rows_per_batch)
        requests = [c.request for c in consumers if c.request is not None]
        corrected = bool(consumers) and all(c.request is not None for c in consumers)
        return (requests or [self._root_request(group)]), corrected

    def activation_requests(self, groups: Sequence[ChannelGroup]) -> list[ActivationRequest]:
        return list(dict.fromkeys(r for g in groups for r in self._requests(g, None)[0]))

    def _gram(self, group: ChannelGroup, context: ScoringContext) -> tuple[np.ndarray, bool]:
        """The selection's Gram: the consumers' Grams, each divided by its trace, summed (so its trace
        is the number of consumers whose Gram is non-zero)."""
        if context.activations is None:
            raise ValueError("interpolative_decomposition needs collected activations; use it through StructuredPruningCallback")
        requests, corrected = self._requests(group, context.model)
        total = np.zeros((group.size, group.size))
        found = False
        consumers = 0
        for request in requests:
            stat = find_gram(context.activations, request)
            if stat is None:
                continue
            g = stat.gram.detach().double().cpu().numpy()
            if g.shape != (group.size, group.size):
                raise ValueError(
                    f"the activation read by the consumers of '{group.root_name}' has {g.shape[0]} channels, the group "
                    f"{group.size}: its consumers read it through a reshape; use another criterion for this model"
                )
            trace = float(np.trace(g))
            total += g / trace if trace > 0 else g
            found = True
            consumers += 1
        if not found:
            raise KeyError(f"no collected Gram for group '{group.root_name}' ({[r.module for r in requests]})")
        self._consumers[group.root_name] = consumers
        return total, corrected

    # ------------------------------------------------------------------ scores and widths
    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        scores = []
        self._order, self._consumers = {}, {}
        for group in groups:
            g, corrected = self._gram(group, context)
            pivots, error = gram_reconstruction_errors(g, corrected)
            self._order[group.root_name] = (pivots, error, corrected)
            score = torch.empty(group.size, dtype=torch.float64)
            score[torch.from_numpy(pivots.astype(np.int64))] = torch.arange(group.size, 0, -1, dtype=torch.float64)
            scores.append(score)
        return scores

    def width_losses(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        losses = []
        for group in groups:
            cached = self._order.get(group.root_name)
            if cached is None:
                g, corrected = self._gram(group, context)
                cached = (*gram_reconstruction_errors(g, corrected), corrected)
            energy = np.maximum.accumulate(cached[1][::-1] ** 2)[::-1]  # non-increasing in k (numerical safety)
            energy = energy * self._consumers.get(group.root_name, 1)  # every consumer receives the error
            kept = np.minimum(np.arange(group.positions + 1) * group.unit, group.size)
            losses.append(torch.from_numpy(energy[kept].copy()))
        return losses

    # ------------------------------------------------------------------ weight correction
    def _selection_only_reason(self, group: ChannelGroup, model: nn.Module) -> str | None:
        """Why no consumer of ``group`` can absorb ``T`` (None: at least one can)."""
        consumers = consumers_of(group, model, self.rows_per_batch)
        if not consumers:
            return "selection only: no consumer layer to absorb T"
        if all(c.request is None for c in consumers):
            return "selection only: " + "; ".join(c.reason or c.module for c in consumers)
        return None

    def correct(
        self,
        groups: Sequence[ChannelGroup],
        removed: Mapping[int, Sequence[int]],
        changes: Mapping[Any, Any],
        context: ScoringContext,
    ) -> dict[str, str]:
        """The engine's least-squares correction (each consumer absorbs ``T`` from its own Gram)."""
        ridge = GCV if self.ridge is None else self.ridge
        return apply_least_squares(groups, removed, changes, context.activations, context.model, ridge)

