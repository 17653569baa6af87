"""``"discriminant_information"`` (``"di"``): Hou & Kung, ICPR 2020.

``docs/criteria.md`` section "Discriminant information". On a layer's pooled features ``X (N x C)`` (a
transformer's ``(batch, tokens, features)`` activation pooled over the tokens by ``token_pooling``)::

    S_bar = X~^T X~ / N                                 (centred scatter, per sample)
    S_B   = sum_c N_c (mu_c - mu)(mu_c - mu)^T / N       (between-class scatter, per sample)
    DI    = tr( (S_bar + rho I)^-1 S_B )

DI never decreases when a channel is added; a channel's influence is the drop when it alone is
removed, all at once by the closed form ``Delta_c = (G S_B G)_cc / G_cc`` with
``G = (S_bar + rho I)^-1``. The scatters are divided by N so that ``rho`` (default 1e-4) is relative
to the per-sample covariance, whatever the number of samples.

Only class counts, class sums, the feature sum and ``X^T X`` are needed: the collector streams them
(O(C^2) memory per layer, float64), so DI uses every sample of the window. Classes absent from
the window contribute nothing.

Widths: DI values are not comparable across layers, so the allocation uses, per layer, the
fraction of the layer's DI lost when it keeps its ``k`` best channels (nested subsets in the
criterion's order, all evaluated exactly from one Cholesky factor, see :func:`di_curve`), divided by the fraction of
the model's MACs the removal saves; the cheapest step (least DI lost per MAC saved) goes first,
until the target is met. ``greedy=True`` orders channels by repeated removal of the least
influential one (recomputing the influences after each removal, O(C^4) per layer) instead of the
one-shot closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_prune.collection.collector import ClassMoments
from lightning_prune.collection.requests import ActivationRequest, Pooling, TokenPooling, check_token_pooling
from lightning_prune.criteria.base import Criterion, Requirements, ScoringContext
from lightning_prune.criteria.pls_vip import root_request
from lightning_prune.criteria.registry import register_criterion
from lightning_prune.engine.graph import ChannelGroup

__all__ = [
    "DiscriminantInformation",
    "di_curve",
    "discriminant_information",
    "greedy_removal_order",
    "leave_one_out_drops",
    "scatter_matrices",
]


def scatter_matrices(moments: ClassMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_bar, S_B)`` per sample, float64, from streamed class moments."""
    counts = moments.counts.double()
    n = counts.sum().clamp_min(1.0)
    mean = moments.total.double() / n
    s_bar = moments.scatter.double() / n - torch.outer(mean, mean)
    present = counts > 0
    class_means = moments.class_sums.double()[present] / counts[present, None]
    diff = class_means - mean
    s_b = (diff.T * (counts[present] / n)) @ diff
    return s_bar, s_b


def _inverse(s_bar: torch.Tensor, rho: float) -> torch.Tensor:
    eye = torch.eye(s_bar.shape[0], dtype=torch.float64)
    return torch.linalg.inv(s_bar.double() + rho * eye)


def discriminant_information(s_bar: torch.Tensor, s_b: torch.Tensor, rho: float) -> float:
    """``tr((S_bar + rho I)^-1 S_B)``."""
    ridged = s_bar.double() + rho * torch.eye(s_bar.shape[0], dtype=torch.float64)
    return float(torch.trace(torch.linalg.solve(ridged, s_b.double())))


def leave_one_out_drops(s_bar: torch.Tensor, s_b: torch.Tensor, rho: float) -> torch.Tensor:
    """``DI(all) - DI(all without c)`` for every channel ``c``: ``(G S_B G)_cc / G_cc``."""
    g = _inverse(s_bar, rho)
    return torch.diagonal(g @ s_b.double() @ g) / torch.diagonal(g)


def greedy_removal_order(s_bar: torch.Tensor, s_b: torch.Tensor, rho: float) -> list[int]:
    """Channels in the order of repeated removal of the least influential one (first removed first)."""
    remaining = list(range(s_bar.shape[0]))
    order = []
    while len(remaining) > 1:
        idx = torch.tensor(remaining)
        drops = leave_one_out_drops(s_bar[idx][:, idx], s_b[idx][:, idx], rho)
        order.append(remaining.pop(int(torch.argmin(drops))))
    return order + remaining


def di_curve(s_bar: torch.Tensor, s_b: torch.Tensor, rho: float, removal_order: Sequence[int]) -> torch.Tensor:
    """``curve[k]`` = DI of the ``k`` channels left after removing ``removal_order`` front to back.

    ``curve[C]`` is the full DI, ``curve[0] = 0``. With the channels permuted so that the first
    removed sits last, every curve point is a *leading* block: for ``A = S_bar + rho I = L L^T``
    (Cholesky), the leading ``k x k`` block of ``A`` is ``L_k L_k^T`` and the leading block of
    ``L^-1`` is ``L_k^-1``, so ``DI_k = tr(A_k^-1 S_B,k)`` is the sum of the first ``k`` diagonal
    entries of ``Z = L^-1 S_B L^-T``. One factorisation and two triangular solves give the whole
    curve: O(C^3) in BLAS-3 calls, no per-removal loop. When ``A`` is not numerically positive
    definite (large activations: ``S_bar``'s cancellation exceeds ``rho``) the curve comes from
    rank-one downdates of ``A^-1`` instead, as exact, a few times slower.
    """
    c = s_bar.shape[0]
    first = [int(i) for i in list(removal_order)[: c - 1]]
    rest = sorted(set(range(c)) - set(first))  # the channel never removed (or all, if order is short)
    perm = torch.tensor((first + rest)[::-1])  # the first removed sits last
    a = s_bar.double()[perm][:, perm] + rho * torch.eye(c, dtype=torch.float64)
    sb = s_b.double()[perm][:, perm]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # not numerically positive definite (S_bar's cancellation beat rho)
        return _curve_by_downdates(a, sb)
    w = torch.linalg.solve_triangular(chol, sb, upper=False)  # L^-1 S_B
    z_t = torch.linalg.solve_triangular(chol, w.T, upper=False)  # L^-1 (L^-1 S_B)^T = Z^T
    curve = torch.zeros(c + 1, dtype=torch.float64)
    curve[1:] = torch.cumsum(torch.diagonal(z_t), 0)
    return curve


def _curve_by_downdates(a: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """The same curve for any invertible ``a`` (permuted as in :func:`di_curve`): ``G = a^-1`` loses
    its last row and column per removal by an in-place rank-one Schur downdate, and ``tr(G S_B)``
    is updated alongside; O(C^2) per removal."""
    c = a.shape[0]
    g = torch.linalg.inv(a)
    curve = torch.zeros(c + 1, dtype=torch.float64)
    total = float((g * sb).sum())  # tr(G S_B) = sum(G * S_B), both symmetric
    curve[c] = total
    for m in range(c - 1, 0, -1):  # drop position m, m channels stay
        col, pivot = g[:m, m].clone(), float(g[m, m])
        # the kept block's sum before the downdate, then minus col^T S_B col / pivot after it
        total -= 2.0 * float(col @ sb[:m, m]) + pivot * float(sb[m, m])
        total -= float(col @ (sb[:m, :m] @ col)) / pivot
        g[:m, :m].addr_(col, col, alpha=-1.0 / pivot)
        curve[m] = total
    return curve


@register_criterion("discriminant_information", "di")
class DiscriminantInformation(Criterion):
    """Importance = the drop in the layer's discriminant information when the channel is removed.

    Args:
        rho: ridge added to the per-sample centred scatter (> 0). Default 1e-4.
        pooling: ``"max"`` or ``"avg"`` (default) global pooling of each channel over the positions
            of its feature map. Another value raises ``ValueError``.
        token_pooling: how a token sequence ``(batch, tokens, features)`` (a batch-first
            transformer's linear layers) becomes one feature row per sample: ``"avg"`` or ``"max"``
            over the tokens, or ``"cls"``, the class token (the first token). None (default): the
            same as ``pooling`` (the mean over the tokens). Another value raises ``ValueError``.
        greedy: rank by repeated removal of the least influential channel (O(C^4) per layer)
            instead of the one-shot leave-one-out drops. Default False.
        num_classes: number of classes; default: the width of the model's output on the example
            inputs (classification logits). Labels outside ``[0, num_classes)`` raise at the prune.

    Example::

        StructuredPruningCallback("di", target_flops_reduction=0.4, criterion_kwargs={"token_pooling": "cls"})
    """

    requirements = Requirements(activations=True, labels=True)
    default_allocation = "uniform"
    width_losses_per_mac = True

    def __init__(
        self,
        rho: float = 1e-4,
        pooling: Pooling = "avg",
        greedy: bool = False,
        num_classes: int | None = None,
        token_pooling: TokenPooling | None = None,
    ) -> None:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 or None, got {num_classes!r}")
        check_token_pooling(token_pooling, none="the same as pooling")
        self.rho = float(rho)
        self.pooling = pooling
        self.token_pooling = token_pooling
        self.greedy = bool(greedy)
        self.num_classes = num_classes
        self._orders: dict[str, list[int]] = {}

    def activation_requests(self, groups: Sequence[ChannelGroup]) -> list[ActivationRequest]:
        return [
            root_request(
                g, statistic="class_moments", pooling=self.pooling, num_classes=self.num_classes or 0,
                token_pooling=self.token_pooling,
            )
            for g in groups
        ]

    def _matrices(self, group: ChannelGroup, request: ActivationRequest, context: ScoringContext):
        if context.activations is None:
            raise ValueError("discriminant_information needs collected activations; use it through StructuredPruningCallback")
        return scatter_matrices(context.activations.class_moments(request))

    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        scores = []
        self._orders = {}
        for group, request in zip(groups, self.activation_requests(groups)):
            s_bar, s_b = self._matrices(group, request, context)
            if self.greedy:
                order = greedy_removal_order(s_bar, s_b, self.rho)
                score = torch.empty(group.size, dtype=torch.float64)
                score[torch.tensor(order)] = torch.arange(group.size, dtype=torch.float64)
            else:
                score = leave_one_out_drops(s_bar, s_b, self.rho)
                order = torch.argsort(score, stable=True).tolist()
            self._orders[group.root_name] = order
            scores.append(score)
        return scores

    def width_losses(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        losses = []
        for group, request in zip(groups, self.activation_requests(groups)):
            s_bar, s_b = self._matrices(group, request, context)
            order = self._orders.get(group.root_name) or torch.argsort(leave_one_out_drops(s_bar, s_b, self.rho)).tolist()
            curve = di_curve(s_bar, s_b, self.rho, order)
            full = curve[-1] if curve[-1] > 0 else torch.tensor(1.0, dtype=torch.float64)
            lost = 1.0 - curve / full
            kept_channels = (torch.arange(group.positions + 1) * group.unit).clamp_max(group.size)
            losses.append(lost[kept_channels])
        return losses
