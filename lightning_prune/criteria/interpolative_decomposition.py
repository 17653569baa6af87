"""``"interpolative_decomposition"`` (``"id"``): Chee, Renz, Damle, De Sa, NeurIPS 2022.

``docs/criteria.md`` section "Interpolative decomposition". ``Z`` is the activation the group's
consumers read (after BN, ReLU and pooling), as rows ``(N*H*W) x C`` (a uniform reservoir of at
most ``max_rows`` rows).
A column-pivoted QR ``Z P = Q R`` orders the channels (first pivots are kept first). For the
channels ``S`` that stay, the interpolation matrix ``T`` (``k x C``) with ``Z ~ Z[:, S] T`` is the
least-squares solution ``T = Z[:, S]^+ Z``, which for ``S`` = the first ``k`` pivots is exactly
ID's ``[I_k, R11^-1 R12] P^T``.

**Weight correction.** The producer keeps rows ``S`` (weights, bias, BN statistics: the
surgery's selection), and every consumer absorbs ``T`` over its input-channel axis:
``W_next <- W_next x_1 T`` (``W'[o, s] = sum_c T[s, c] W[o, c]``) for conv and linear consumers,
``W_fc <- W_fc (T kron I_r)^T`` for a linear reading a flattened (channel-major) feature map, so the
pruned network computes what the dense one did, as closely as the decomposition allows, before
any fine-tuning. ``T`` cannot pass through a residual sum: a group with several producers
(residual partners), or whose consumers read the channels through a concatenation or a grouped
convolution, is pruned by selection only, and the step's record says so.

**Widths.** Keeping ``k`` channels costs the relative error it leaves in the activation the
consumers read: the decomposition's residual ``||R_22||_F / ||R||_F`` where the consumers absorb
``T``, the norm of the dropped channels where the group is pruned by selection only (the paper
prunes only the correctable, block-internal layers; this keeps residual groups from looking as
cheap as correctable ones). The allocation removes, step by step, the width with the smallest
error per MAC saved until the target is met.
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
from lightning_prune.engine.graph import ChannelGroup, ParamSlice

__all__ = ["InterpolativeDecomposition", "interpolation_matrix", "pivoted_qr", "reconstruction_errors"]


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


def _weight_slices(group: ChannelGroup, output: bool) -> list[ParamSlice]:
    return [s for s in group.slices if s.is_output == output and s.param.dim() >= 2]


def _channel_major(s: ParamSlice, channels: int) -> bool:
    """The consumer reads the group's channels directly (r = 1) or as a channel-major flattened map."""
    if not s.addressable or s.dep_channels % channels or list(s.idxs) != list(range(s.dep_channels)):
        return False
    r = s.dep_channels // channels
    return list(s.root_idxs) == [i // r for i in range(s.dep_channels)]


def _group_columns(s: ParamSlice) -> tuple[int, ...]:
    """The consumer's input entries that carry the group's channels, channel-major; () when that is all
    of them in order (or the slice does not index the input directly, as for a grouped convolution)."""
    if not s.addressable:
        return ()
    order = sorted(range(len(s.idxs)), key=lambda i: s.root_idxs[i])  # stable: positions keep their order
    columns = tuple(int(s.idxs[i]) for i in order)
    return () if columns == tuple(range(s.dep_channels)) else columns


def _absorb(weight: torch.Tensor, t: torch.Tensor, dim: int, channels: int) -> torch.Tensor:
    """``W x_dim (T kron I_r)``: contract ``T`` (``k x C``) with ``weight``'s input axis ``dim``.

    A flattened input of ``C * r`` features (channel-major) is viewed as ``(C, r)`` first, which is
    ``W_fc (T kron I_r)^T`` for conv -> flatten -> linear.
    """
    moved = weight.movedim(dim, 0)
    rest = moved.shape[1:]
    per_channel = moved.reshape(channels, -1)  # (C, r * rest)
    absorbed = t.to(per_channel.dtype) @ per_channel  # (k, r * rest)
    return absorbed.reshape(t.shape[0] * (moved.shape[0] // channels), *rest).movedim(0, dim)


@register_criterion("interpolative_decomposition", "id")
class InterpolativeDecomposition(Criterion):
    """Keep the channels a pivoted QR of the consumed activation picks; consumers absorb the rest.

    Args:
        max_rows: activation rows kept per group (uniform reservoir). Default 4096.
        rows_per_batch: rows sampled per training batch. Default 256.
    """

    requirements = Requirements(activations=True)
    width_losses_per_mac = True

    def __init__(self, max_rows: int = 4096, rows_per_batch: int = 256) -> None:
        if max_rows < 2 or rows_per_batch < 1:
            raise ValueError(f"max_rows must be >= 2 and rows_per_batch >= 1, got {max_rows}, {rows_per_batch}")
        self.max_rows = int(max_rows)
        self.rows_per_batch = int(rows_per_batch)
        self._qr: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ which tensor
    def _consumers(self, group: ChannelGroup) -> list[ParamSlice]:
        return _weight_slices(group, output=False)

    def _request(self, group: ChannelGroup) -> ActivationRequest:
        consumers = self._consumers(group)
        if consumers:  # the activation the (first) consumer reads, a flattened map viewed per channel
            first = consumers[0]
            return ActivationRequest(
                first.name.rsplit(".", 1)[0], site="input", statistic="rows", rows_per_batch=self.rows_per_batch,
                max_rows=self.max_rows, channels=group.size, channel_index=_group_columns(first),
            )
        return ActivationRequest(group.root_name, statistic="rows", rows_per_batch=self.rows_per_batch, max_rows=self.max_rows)

    def activation_requests(self, groups: Sequence[ChannelGroup]) -> list[ActivationRequest]:
        return [self._request(g) for g in groups]

    def _rows(self, group: ChannelGroup, context: ScoringContext) -> np.ndarray:
        if context.activations is None:
            raise ValueError("interpolative_decomposition needs collected activations; use it through StructuredPruningCallback")
        z = context.activations.rows(self._request(group)).detach().double().cpu().numpy()
        if z.shape[1] != group.size:
            raise ValueError(
                f"the activation read by the consumers of '{group.root_name}' has {z.shape[1]} channels, the group "
                f"{group.size}: its consumers read it through a reshape; use another criterion for this model"
            )
        return z

    # ------------------------------------------------------------------ scores and widths
    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        scores = []
        self._qr = {}
        for group in groups:
            r, pivots = pivoted_qr(self._rows(group, context))
            self._qr[group.root_name] = (r, pivots)
            score = torch.empty(group.size, dtype=torch.float64)
            score[torch.from_numpy(pivots.astype(np.int64))] = torch.arange(group.size, 0, -1, dtype=torch.float64)
            scores.append(score)
        return scores

    def width_losses(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        losses = []
        for group in groups:
            z = self._rows(group, context)
            r, pivots = self._qr.get(group.root_name) or pivoted_qr(z)
            corrected = self._selection_only_reason(group, context.model) is None
            error = reconstruction_errors(z, r, pivots, corrected)
            error = np.maximum.accumulate(error[::-1])[::-1]  # non-increasing in k (numerical safety)
            kept = np.minimum(np.arange(group.positions + 1) * group.channel_groups, group.size)
            losses.append(torch.from_numpy(error[kept].copy()))
        return losses

    # ------------------------------------------------------------------ weight correction
    def _selection_only_reason(self, group: ChannelGroup, model: nn.Module) -> str | None:
        producers = {s.name.rsplit(".", 1)[0] for s in _weight_slices(group, output=True)}
        if len(producers) != 1:
            return f"selection only: {len(producers)} producers summed (residual), T cannot pass the sum"
        consumers = self._consumers(group)
        if not consumers:
            return "selection only: no consumer layer to absorb T"
        modules = dict(model.named_modules())
        for s in consumers:
            module = modules.get(s.name.rsplit(".", 1)[0])
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or getattr(module, "groups", 1) != 1:
                return f"selection only: consumer '{s.name}' is a grouped or unsupported layer"
            if not _channel_major(s, group.size):
                return f"selection only: consumer '{s.name}' reads the channels through a concatenation or a reshape"
        return None

    def correct(
        self,
        groups: Sequence[ChannelGroup],
        removed: Mapping[int, Sequence[int]],
        changes: Mapping[Any, Any],
        context: ScoringContext,
    ) -> dict[str, str]:
        notes = {}
        for index, channels in removed.items():
            group = groups[index]
            if not channels:
                continue
            reason = self._selection_only_reason(group, context.model)
            if reason:
                notes[group.root_name] = reason
                continue
            kept = sorted(set(range(group.size)) - set(channels))
            t = torch.from_numpy(interpolation_matrix(self._rows(group, context), kept))
            consumers = self._consumers(group)
            with torch.no_grad():
                for s in consumers:
                    change = changes[s.param]
                    corrected = change.old.detach().double()
                    for dim, keep in change.ops:
                        if dim == s.dim:  # this group's input-channel cut: absorb T instead of selecting
                            corrected = _absorb(corrected, t, dim, group.size)
                        else:
                            corrected = corrected.index_select(dim, keep)
                    change.new.copy_(corrected.to(change.new.dtype))
            notes[group.root_name] = f"interpolation absorbed by {len(consumers)} consumer(s)"
        return notes
