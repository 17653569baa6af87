"""Least-squares weight correction: the consumers of a pruned group absorb what the removed channels
carried, reconstructed from the kept ones.

For a consumer that reads activation ``Z`` (rows = samples x positions, one column per channel of
the group; ``G = Z^T Z`` streamed by the ``"gram"`` statistic) and a kept set ``S`` (removed set
``R``), the interpolation matrix ``T`` (``k x C``) with ``Z ~ Z[:, S] T`` is

    T[:, S] = I,    T[:, R] = (G_SS + lambda I)^-1 G_SR,

the minimiser of ``||Z_S T - Z||_F^2 + lambda ||T[:, R]||_F^2``: kept channels pass through
unchanged, each removed channel is its ridge least-squares reconstruction from the kept ones (the
interpolative decomposition's ``T = [I, R11^-1 R12] P^T`` when ``lambda = 0`` and ``S`` is a
pivot prefix). ``lambda = ridge * trace(G) / C`` (relative to the mean diagonal of ``G``).

``ridge="gcv"`` chooses ``lambda`` per consumer by generalised cross-validation, from the Gram and its
row count alone (:func:`gcv_ridge`): a Gram of fewer rows than kept channels (a late stage of a net fed
small images, a short window) fits its rows exactly with a tiny ridge, and the consumer then
amplifies whatever the model sees next; GCV raises ``lambda`` until the fit generalises.

The consumer then computes on the pruned input what it computed on the dense one, as closely as
``Z`` allows: ``W' = W x_in T`` over its input-channel axis (``W'[o, s] = sum_c T[s, c] W[o, c]``),
``W_fc (T kron I_r)^T`` for a linear reading a flattened, channel-major map. Every consumer gets
its own ``T`` from the activation *it* reads, so residual streams are corrected too (each block
reads the stream at a different point). Bias terms do not change.

Pure functions (``pivoted_cholesky``, ``ridge_interpolation``, ``reconstruction_residual``,
``absorb_columns``), the per-consumer requests (:func:`correction_requests`) and the applier
(:func:`apply_least_squares`) that the pruner calls inside its atomic section.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_prune.collection import ActivationRequest
from lightning_prune.collection.accumulators import GramStatistic
from lightning_prune.engine.graph import ChannelGroup, ParamSlice

__all__ = [
    "CORRECTIONS",
    "CorrectionWarning",
    "DEFAULT_RIDGE",
    "GRAM_ROWS_PER_BATCH",
    "Consumer",
    "absorb_columns",
    "apply_least_squares",
    "check_ridge",
    "consumers_of",
    "correction_requests",
    "find_gram",
    "gcv_ridge",
    "ordered_residuals",
    "pivoted_cholesky",
    "reconstruction_residual",
    "ridge_interpolation",
    "width_losses_from_grams",
]

#: The values of ``correction``: ``"none"`` (plain selection) or ``"least_squares"``.
CORRECTIONS = ("none", "least_squares")
#: Default ridge, relative to the mean diagonal of the consumer's Gram (a numerical safeguard for
#: dead or collinear kept channels, small enough to leave exact reconstructions exact).
DEFAULT_RIDGE = 1e-6
#: Rows sampled per batch for a Gram request (the Gram is O(C^2) whatever the rows). Folding ``M`` rows
#: of ``C`` channels costs ``M C^2`` multiply-adds, against ``~27 M C^2`` for the 3x3 convolution that reads
#: them (forward and backward): 512 keeps collection on every step within a few percent of the training
#: step on the benchmark models, and a window of a few dozen batches still gives far more rows than channels.
GRAM_ROWS_PER_BATCH = 512
#: ``ridge="gcv"``: the ridge is chosen per consumer by generalised cross-validation (:func:`gcv_ridge`)
GCV = "gcv"
#: :func:`gcv_ridge` searches relative ridges from the floor up to this (``T_R`` is then near 0: the
#: correction falls back to about plain selection), at ``GCV_POINTS`` log-spaced values
GCV_CEILING = 1e2
GCV_POINTS = 57


class CorrectionWarning(UserWarning):
    """A least-squares correction that may not carry the model to new data: a fixed ridge on a Gram of
    no more rows than kept channels (the reconstruction fits those rows exactly)."""


# ---------------------------------------------------------------------------------------------- linear algebra
def pivoted_cholesky(gram: Any, tol: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy (diagonally) pivoted Cholesky of a Gram matrix ``G = Z^T Z``.

    At step ``k`` the channel with the largest residual diagonal (the largest norm of its column
    after projecting out the ``k`` chosen ones) is chosen: in exact arithmetic the pivots of the
    column-pivoted QR ``Z P = Q R`` (Businger-Golub), computed from ``G`` alone.

    Args:
        gram: ``(C, C)`` symmetric positive semi-definite matrix.
        tol: residual diagonals at or below ``tol * max(diag(G))`` count as zero; the channels left
            then follow in decreasing order of their residual diagonal, without further updates.

    Returns:
        ``(pivots, r, residual)``: the channel order; the upper-triangular ``r`` (``C x C``, in
        pivot order) with ``r^T r = G[p][:, p]`` (up to the truncation), equal to QR's ``R`` up to
        the signs of its rows; ``residual[k]`` (``C + 1`` entries) the trace of the Schur
        complement after ``k`` pivots, ``||Z - Z_S Z_S^+ Z||_F^2`` for ``S`` = the first ``k``.
    """
    g = np.array(gram, dtype=np.float64)
    c = g.shape[0]
    if g.shape != (c, c):
        raise ValueError(f"pivoted_cholesky needs a square matrix, got shape {g.shape}")
    g = (g + g.T) / 2
    pivots = np.arange(c)
    d = np.diag(g).copy()
    r = np.zeros((c, c))
    residual = np.zeros(c + 1)
    threshold = tol * max(float(d.max(initial=0.0)), 0.0)
    for k in range(c):
        residual[k] = float(np.clip(d[k:], 0.0, None).sum())
        j = k + int(np.argmax(d[k:]))
        if j != k:
            pivots[[k, j]] = pivots[[j, k]]
            d[[k, j]] = d[[j, k]]
            g[[k, j], :] = g[[j, k], :]
            g[:, [k, j]] = g[:, [j, k]]
            r[:k, [k, j]] = r[:k, [j, k]]
        if d[k] <= threshold or d[k] <= 0.0:
            order = k + np.argsort(-d[k:], kind="stable")
            pivots[k:] = pivots[order]
            tail = np.clip(d[order], 0.0, None)
            residual[k:c] = np.cumsum(tail[::-1])[::-1]
            break
        r[k, k] = np.sqrt(d[k])
        r[k, k + 1 :] = (g[k, k + 1 :] - r[:k, k] @ r[:k, k + 1 :]) / r[k, k]
        d[k + 1 :] -= r[k, k + 1 :] ** 2
    residual[c] = 0.0
    return pivots, r, residual


def _ridge(gram: np.ndarray, ridge: float) -> float:
    c = gram.shape[0]
    return float(ridge) * float(np.trace(gram)) / max(1, c)


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # singular without ridge: the minimum-norm solution
        return np.linalg.lstsq(a, b, rcond=None)[0]


def check_ridge(value: Any, argument: str) -> float | str | None:
    """``value`` as a ridge setting: None, a number >= 0 (as a float) or ``"gcv"``; else ``ValueError``
    naming ``argument``."""
    if value is None or value == GCV:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{argument} must be a number >= 0, 'gcv' or None, got {value!r}")
    return float(value)


def gcv_ridge(
    gram: Any,
    kept: Sequence[int],
    rows: int,
    floor: float = DEFAULT_RIDGE,
    ceiling: float = GCV_CEILING,
    points: int = GCV_POINTS,
) -> float:
    """The relative ridge (as :func:`ridge_interpolation` takes it) that minimises generalised
    cross-validation of reconstructing the removed channels from the kept ones, from the Gram alone.

    With ``G_SS = V diag(d) V^T``, ``B = V^T G_SR`` and ``lambda = ridge * trace(G) / C``, summed over the
    removed channels (one ridge regression each, sharing the hat matrix ``H`` of the kept ones):

        RSS(lambda) = tr(G_RR) - sum_ij B_ij^2 (d_i + 2 lambda) / (d_i + lambda)^2,
        df(lambda) = tr H = sum_i d_i / (d_i + lambda),
        GCV(lambda) = n RSS(lambda) / (n - df(lambda))^2,

    ``n = rows`` (the rows behind the Gram), over ``points`` log-spaced ridges in ``[floor, ceiling]``
    (the smallest ridge wins ties, so an exact reconstruction stays exact). Rows sampled from one image
    are correlated, so ``n`` overstates the independent rows and the choice errs on the small side.

    Args:
        gram: ``(C, C)`` Gram ``Z^T Z``.
        kept: the kept channels ``S``.
        rows: ``n``, the number of rows folded into ``gram``.
        floor / ceiling: the range of relative ridges searched (``floor`` 0 starts at 1e-12).
        points: ridges tried.

    Returns:
        The relative ridge; ``floor`` when nothing is removed or kept, ``ceiling`` when every ridge
        tried leaves ``n - df <= 0``.
    """
    g = np.asarray(gram, dtype=np.float64)
    c = g.shape[0]
    kept = [int(k) for k in kept]
    removed = sorted(set(range(c)) - set(kept))
    scale = float(np.trace(g)) / max(1, c)
    if not removed or not kept or scale <= 0:
        return float(floor)
    d, v = np.linalg.eigh(g[np.ix_(kept, kept)])
    d = np.clip(d, 0.0, None)[:, None]
    b2 = ((v.T @ g[np.ix_(kept, removed)]) ** 2).sum(1, keepdims=True)
    ridges = np.logspace(np.log10(max(float(floor), 1e-12)), np.log10(ceiling), points)[None, :]
    lam = ridges * scale
    rss = np.clip(np.trace(g[np.ix_(removed, removed)]) - np.sum(b2 * (d + 2 * lam) / (d + lam) ** 2, axis=0), 0.0, None)
    spare = float(rows) - np.sum(d / (d + lam), axis=0)
    score = np.where(spare > 0, float(rows) * rss / np.where(spare > 0, spare, 1.0) ** 2, np.inf)
    if not np.isfinite(score).any():
        return float(ceiling)
    return float(ridges[0, int(np.argmin(score))])  # argmin: the first (smallest ridge) of equal scores


def ridge_interpolation(gram: Any, kept: Sequence[int], ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """``T`` (``len(kept) x C``, rows in the order of ``kept``) with ``Z ~ Z[:, kept] T``:
    ``T[:, kept] = I`` and ``T[:, removed] = (G_SS + lambda I)^-1 G_S,removed``,
    ``lambda = ridge * trace(G) / C``."""
    g = np.asarray(gram, dtype=np.float64)
    c = g.shape[0]
    kept = [int(k) for k in kept]
    removed = sorted(set(range(c)) - set(kept))
    t = np.zeros((len(kept), c))
    t[np.arange(len(kept)), kept] = 1.0
    if removed and kept:
        lam = _ridge(g, ridge)
        g_ss = g[np.ix_(kept, kept)] + lam * np.eye(len(kept))
        t[:, removed] = _solve(g_ss, g[np.ix_(kept, removed)])
    return t


def reconstruction_residual(gram: Any, kept: Sequence[int], ridge: float = DEFAULT_RIDGE, corrected: bool = True) -> float:
    """``||Z - Z_S T||_F^2 / ||Z||_F^2`` from the Gram alone (``T`` of :func:`ridge_interpolation`).

    Without correction (selection only) the removed channels are simply lost: the share of the
    energy they carried, ``sum_{c removed} G_cc / trace(G)``.
    """
    g = np.asarray(gram, dtype=np.float64)
    total = float(np.trace(g))
    if total <= 0:
        return 0.0
    kept = [int(k) for k in kept]
    removed = sorted(set(range(g.shape[0])) - set(kept))
    if not removed:
        return 0.0
    if not corrected or not kept:
        return float(sum(g[c, c] for c in removed)) / total
    t = ridge_interpolation(g, kept, ridge)[:, removed]
    g_sr = g[np.ix_(kept, removed)]
    g_ss = g[np.ix_(kept, kept)]
    # ||Z_R - Z_S T_R||^2 = tr(G_RR) - 2 tr(T_R^T G_SR) + tr(T_R^T G_SS T_R)
    err = float(np.trace(g[np.ix_(removed, removed)]) - 2 * np.sum(t * g_sr) + np.sum(t * (g_ss @ t)))
    return max(err, 0.0) / total


# ---------------------------------------------------------------------------------------------- consumers
@dataclass(frozen=True)
class Consumer:
    """One layer that reads a group's channels (its input-channel slice), and how it can absorb ``T``.

    Attributes:
        slice: the consumer's input-channel slice of the group.
        module: qualified name of the consumer layer.
        columns: the consumer's input entries carrying the group's channels, channel-major
            (channel ``j`` owns ``columns[j * r:(j + 1) * r]``).
        per_channel: ``r``, entries per channel (1, or the positions of a flattened map).
        reason: why the consumer cannot absorb ``T`` (None: it can).
        request: the ``"gram"`` request of the activation it reads (None when it cannot absorb).
    """

    slice: ParamSlice
    module: str
    columns: tuple[int, ...]
    per_channel: int
    reason: str | None
    request: ActivationRequest | None


def _columns(s: ParamSlice, channels: int) -> tuple[tuple[int, ...], int] | None:
    """The slice's entries channel-major and the entries per channel, or None when they do not split evenly."""
    if not s.addressable or not s.idxs or len(s.idxs) % channels:
        return None
    counts = np.bincount(np.asarray(s.root_idxs, dtype=np.int64), minlength=channels)
    if counts.shape[0] != channels or not (counts == counts[0]).all():
        return None
    order = sorted(range(len(s.idxs)), key=lambda i: s.root_idxs[i])  # stable: positions keep their order
    return tuple(int(s.idxs[i]) for i in order), len(s.idxs) // channels


def consumers_of(
    group: ChannelGroup, model: nn.Module | None = None, rows_per_batch: int = GRAM_ROWS_PER_BATCH
) -> list[Consumer]:
    """Every weight that reads the group's channels (input-channel slices of conv and linear layers),
    with the Gram request of the activation it reads, or why it cannot absorb ``T``.

    Without ``model`` the layer types are judged from the parameters alone (a ``weight`` of 2 or
    more dimensions read on axis 1: linear, or convolution when it has more); with it, from the modules.
    """
    modules = dict(model.named_modules()) if model is not None else None
    result = []
    for s in group.slices:
        if s.is_output or s.param.dim() < 2:
            continue
        name, attr = s.name.rsplit(".", 1) if "." in s.name else ("", s.name)
        reason = None
        layout = _columns(s, group.size)
        module: Any = None
        if modules is not None:
            module = modules.get(name)
            conv = isinstance(module, nn.modules.conv._ConvNd)
            supported = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and attr == "weight"
        else:
            conv = s.param.dim() > 2
            supported = attr == "weight"
        if not supported:
            reason = f"'{s.name}' is not the weight of a conv or linear layer"
        elif getattr(module, "groups", 1) != 1:
            reason = f"'{name}' is a grouped convolution (T would mix its groups)"
        elif isinstance(module, nn.modules.conv._ConvNd) and getattr(module, "transposed", False):
            reason = f"'{name}' is a transposed convolution"
        elif s.dim != 1:
            reason = f"'{name}' reads the channels on weight axis {s.dim}"
        elif layout is None or (conv and layout[1] != 1):
            reason = f"'{name}' reads the channels through a reshape that does not split them evenly"
        if reason is not None or layout is None:
            result.append(Consumer(s, name, (), 1, reason or "unsupported", None))
            continue
        columns, r = layout
        index = () if columns == tuple(range(s.dep_channels)) else columns
        request = ActivationRequest(
            name, site="input", statistic="gram", rows_per_batch=rows_per_batch, channels=group.size, channel_index=index
        )
        result.append(Consumer(s, name, columns, r, None, request))
    return result


def correction_requests(
    groups: Sequence[ChannelGroup], model: nn.Module, rows_per_batch: int = GRAM_ROWS_PER_BATCH
) -> list[ActivationRequest]:
    """The ``"gram"`` request of every consumer that can absorb ``T``, for every group (deduplicated)."""
    requests = [c.request for g in groups for c in consumers_of(g, model, rows_per_batch) if c.request is not None]
    return list(dict.fromkeys(requests))


def _key(request: ActivationRequest) -> tuple[Any, ...]:
    return (
        request.module, request.site, request.statistic, request.channel_dim, request.channels, request.channel_index,
        request.token_pooling,
    )


def find_gram(store: Any, request: ActivationRequest) -> GramStatistic | None:
    """The collected Gram of ``request`` in an :class:`~lightning_prune.collection.ActivationStore`
    (the same activation collected with another ``rows_per_batch`` counts), or None."""
    if store is None:
        return None
    table = store.table("gram")
    if request in table:
        return table[request]
    key = _key(request)
    for other, value in table.items():
        if _key(other) == key:
            return value
    return None


# ---------------------------------------------------------------------------------------------- the applier
def absorb_columns(
    weight: torch.Tensor, t: torch.Tensor, dim: int, columns: Sequence[int], channels: int, kept: Sequence[int]
) -> torch.Tensor:
    """``weight`` (old coordinates) with the kept channels' input entries replaced by ``W x_dim (T kron I_r)``.

    ``columns`` are the entries of axis ``dim`` that carry the ``channels`` channels, channel-major
    (``r = len(columns) / channels`` per channel; empty: the whole axis); ``t`` is ``len(kept) x
    channels``. The removed channels' entries are left as they are (the surgery's selection drops
    them); entries of other channels (another branch of a concatenation) are untouched.
    """
    moved = weight.movedim(dim, 0)
    cols = torch.as_tensor(list(columns) if columns else range(moved.shape[0]), dtype=torch.long, device=weight.device)
    r = cols.numel() // channels
    rest = moved.shape[1:]
    block = moved.index_select(0, cols).reshape(channels, -1)  # (C, r * rest)
    absorbed = t.to(device=block.device, dtype=block.dtype) @ block  # (k, r * rest)
    kept_index = torch.as_tensor(list(kept), dtype=torch.long, device=weight.device)
    kept_cols = cols.view(channels, r).index_select(0, kept_index).reshape(-1)
    out = moved.clone()
    out[kept_cols] = absorbed.reshape(kept_index.numel() * r, *rest)
    return out.movedim(0, dim)


def _summary(done: Sequence[str], skipped: Sequence[str], ridges: Sequence[float] = ()) -> str:
    if not done:
        return "selection only: " + "; ".join(skipped)
    note = f"interpolation absorbed by {len(done)} consumer(s)"
    if ridges:
        note += " (GCV ridge " + ", ".join(f"{r:.2g}" for r in ridges) + ")"
    return note + (f"; selection only for {'; '.join(skipped)}" if skipped else "")


def apply_least_squares(
    groups: Sequence[ChannelGroup],
    removed: Mapping[int, Sequence[int]],
    changes: Mapping[Any, Any],
    activations: Any,
    model: nn.Module,
    ridge: float | str = DEFAULT_RIDGE,
) -> dict[str, str]:
    """Let every consumer of every pruned group absorb its ``T`` (after :func:`~lightning_prune.engine.surgery.apply_plan`).

    ``changes`` maps old parameter -> :class:`~lightning_prune.engine.surgery.ParameterChange`;
    the corrections are computed on the old weights, in old coordinates (consumers read by several
    groups, as in a concatenation, absorb each group's ``T`` in its own columns), then cut with the
    surgery's recorded selections into the new parameters (new tensors: the step stays atomic).

    ``ridge``: relative to each consumer's mean Gram diagonal, or ``"gcv"`` (:func:`gcv_ridge` per
    consumer, from its Gram and row count).

    Returns a note per pruned group root: ``"interpolation absorbed by N consumer(s)"`` (with
    ``"gcv"``, followed by the ridges chosen), with the consumers left to selection and why, or
    ``"selection only: ..."``.
    """
    notes: dict[str, str] = {}
    work: dict[Any, torch.Tensor] = {}
    underdetermined: list[str] = []
    for index, channels in removed.items():
        if not channels:
            continue
        group = groups[index]
        kept = sorted(set(range(group.size)) - {int(c) for c in channels})
        consumers = consumers_of(group, model)
        if not consumers:
            notes[group.root_name] = "selection only: no consumer layer to absorb T"
            continue
        done: list[str] = []
        skipped: list[str] = []
        chosen: list[float] = []
        for consumer in consumers:
            if consumer.reason is not None or consumer.request is None:
                skipped.append(consumer.reason or consumer.module)
                continue
            stat = find_gram(activations, consumer.request)
            if stat is None:
                skipped.append(f"'{consumer.module}': no Gram collected for its input")
                continue
            gram = stat.gram.detach().double().cpu().numpy()
            if gram.shape != (group.size, group.size):
                skipped.append(f"'{consumer.module}' reads {gram.shape[0]} channels, the group has {group.size}")
                continue
            if ridge == GCV:
                chosen.append(gcv_ridge(gram, kept, stat.count))
            elif stat.count <= len(kept):
                underdetermined.append(f"'{consumer.module}' ({stat.count} rows, {len(kept)} kept channels)")
            t = torch.from_numpy(ridge_interpolation(gram, kept, chosen[-1] if ridge == GCV else float(ridge)))
            old = consumer.slice.param
            if old not in changes:
                raise RuntimeError(f"consumer '{consumer.slice.name}' of group '{group.root_name}' was not cut by the surgery")
            base = work[old] if old in work else old.detach().double().clone()
            work[old] = absorb_columns(base, t, consumer.slice.dim, consumer.columns, group.size, kept)
            done.append(consumer.module)
        notes[group.root_name] = _summary(done, skipped, chosen)
    if underdetermined:
        shown = "; ".join(underdetermined[:5]) + (f"; and {len(underdetermined) - 5} more" if len(underdetermined) > 5 else "")
        warnings.warn(
            f"least-squares correction with a fixed ridge ({ridge:g}) on Grams of no more rows than kept channels: {shown}. "
            "with so few rows T can fit them exactly and take the model further from the dense one on new data than "
            "no correction; "
            "pass correction_ridge='gcv' (interpolative_decomposition: ridge='gcv') or collect more batches",
            CorrectionWarning,
            stacklevel=2,
        )
    with torch.no_grad():
        for old, corrected in work.items():
            change = changes[old]
            change.new.copy_(change.apply(corrected).to(change.new.dtype))
    return notes


# ---------------------------------------------------------------------------------------------- widths
def ordered_residuals(gram: Any, order: Sequence[int], ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """``residual[k]``: the relative error ``||Z - Z_S T||_F^2 / ||Z||_F^2`` left when the first ``k``
    channels of ``order`` stay and the consumer absorbs ``T``, for every ``k`` (``C + 1`` entries).

    Computed as ``(tr(G_RR) - tr(G_RS (G_SS + lambda I)^-1 G_SR)) / tr(G)``, the trace of the Schur
    complement, from one Cholesky of ``G + lambda I`` in the given (not pivoted) order, O(C^3) for
    all ``k`` at once. It is the minimum of the ridge objective ``||Z - Z_S T||_F^2 + lambda ||T_R||_F^2``
    (relative): exactly the error without ridge, the error plus ``lambda ||T_R||_F^2`` with one.
    """
    g = np.asarray(gram, dtype=np.float64)
    c = g.shape[0]
    total = float(np.trace(g))
    out = np.zeros(c + 1)
    if total <= 0 or c == 0:
        return out
    perm = np.asarray(list(order), dtype=np.int64)
    lam = _ridge(g, ridge)
    a = g[np.ix_(perm, perm)] + lam * np.eye(c)
    d = np.diag(a).copy()
    r = np.zeros((c, c))
    for k in range(c):
        out[k] = max(float(d[k:].sum()) - lam * (c - k), 0.0) / total
        if d[k] <= 0:
            out[k + 1 :] = [max(float(d[j:].sum()) - lam * (c - j), 0.0) / total for j in range(k + 1, c + 1)]
            break
        r[k, k] = np.sqrt(d[k])
        r[k, k + 1 :] = (a[k, k + 1 :] - r[:k, k] @ r[:k, k + 1 :]) / r[k, k]
        d[k + 1 :] -= r[k, k + 1 :] ** 2
    out[c] = 0.0
    return out


def width_losses_from_grams(
    groups: Sequence[ChannelGroup],
    scores: Sequence[torch.Tensor],
    activations: Any,
    model: nn.Module,
    ridge: float = DEFAULT_RIDGE,
) -> list[torch.Tensor]:
    """Per group, the loss of keeping ``k`` positions (``positions + 1`` entries) when the criterion's
    top-``k`` stay and the consumers absorb ``T``: the share of each consumer's input energy the
    reconstruction leaves, ``||Z - Z_S T||_F^2 / ||Z||_F^2`` (from its Gram), summed over the consumers
    that absorb ``T`` (each receives its own error). A group none of whose consumers can absorb ``T``
    (no Gram collected) is charged the fraction of its channels dropped. Non-increasing in ``k``, 0 at
    full width. Energies, not their square roots: they add over the network, so the allocation that
    spends them per MAC spreads the cut, where summed norms (concave in the energy) favour emptying
    one group after another.
    """
    losses = []
    for group, score in zip(groups, scores):
        block = group.positions
        position_score = score.detach().double().cpu().reshape(group.channel_groups, block).mean(0)
        ranked = [int(p) for p in torch.argsort(position_score, descending=True, stable=True)]
        order = [g * block + p for p in ranked for g in range(group.channel_groups)]
        residuals: list[np.ndarray] = []
        for consumer in consumers_of(group, model):
            stat = None if consumer.request is None else find_gram(activations, consumer.request)
            if stat is None or tuple(stat.gram.shape) != (group.size, group.size):
                continue
            gram = stat.gram.detach().double().cpu().numpy()
            residuals.append(ordered_residuals(gram, order, ridge))
        if residuals:
            error = np.clip(np.sum(residuals, axis=0), 0.0, None)
        else:
            error = 1.0 - np.arange(group.size + 1) / group.size
        error = np.maximum.accumulate(error[::-1])[::-1]
        kept = np.minimum(np.arange(block + 1) * group.unit, group.size)
        losses.append(torch.from_numpy(error[kept].copy()))
    return losses
