"""``"pca_gm"``: widths from PCA of activations, channels chosen by geometric median (Ahmed et al., 2022).

``docs/criteria.md`` section "PCA + geometric median". Stage 1 (widths): per layer, PCA of the activations reshaped to
``(N*H*W, C)``; the layer needs ``k`` channels where ``k`` is the smallest number of components
explaining ``variance_threshold`` of the variance. Stage 2 (which channels): FPGM, the filters
nearest the layer's geometric median go first.

Meeting the overall target: a single variance threshold, common to every layer, is chosen so
that the model meets the target: every layer is cut to the smallest width that keeps that
fraction of its variance. The allocation does this by shrinking, step by step, the layer whose
next width loses the least explained variance. ``variance_threshold`` gives the widths reported in
:attr:`PCAGeometricMedian.pca_widths` (what PCA alone would keep at that threshold); the target's
effective threshold may be lower or higher.

Activations are the root layer's output; only their channel covariance is collected (streamed
over rows, ``rows_per_batch`` sampled per batch), O(C^2) memory per layer. On a transformer, a
linear layer's ``(batch, tokens, features)`` activation gives one row per token by default (the
tokens are the positions, as the next layer reads them); ``token_pooling`` pools them to one row
per sample instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_prune.collection.requests import ActivationRequest, TokenPooling, check_token_pooling
from lightning_prune.criteria.base import Criterion, Requirements, ScoringContext
from lightning_prune.criteria.fpgm import FPGM
from lightning_prune.criteria.pls_vip import root_request
from lightning_prune.criteria.registry import register_criterion
from lightning_prune.engine.graph import ChannelGroup

__all__ = ["PCAGeometricMedian", "explained_variance_curve", "pca_width"]


def explained_variance_curve(covariance: torch.Tensor) -> torch.Tensor:
    """``curve[k]`` = fraction of the variance explained by the first ``k`` principal components (k = 0..C)."""
    eig = torch.linalg.eigvalsh(covariance.double()).flip(0).clamp_min(0.0)
    total = eig.sum()
    curve = torch.cat([torch.zeros(1, dtype=torch.float64), eig.cumsum(0)])
    return curve / total if total > 0 else torch.ones_like(curve)


def pca_width(covariance: torch.Tensor, variance_threshold: float) -> int:
    """The smallest ``k >= 1`` whose components explain at least ``variance_threshold`` of the variance."""
    curve = explained_variance_curve(covariance)
    reached = torch.nonzero(curve >= variance_threshold - 1e-12).flatten()
    return max(1, int(reached[0])) if reached.numel() else covariance.shape[0]


@register_criterion("pca_gm", "pca")
class PCAGeometricMedian(Criterion):
    """PCA decides how many channels each layer keeps; FPGM decides which.

    Args:
        variance_threshold: fraction of variance the PCA widths keep (reported), in (0, 1].
            Default 0.999.
        rows_per_batch: activation rows (sample x position) sampled per batch for the covariance.
            Default 512.
        token_pooling: how a token sequence ``(batch, tokens, features)`` (a batch-first
            transformer's linear layers) gives covariance rows: None (default): every token of every
            sample is a row, like the positions of a feature map; ``"avg"`` or ``"max"`` over the
            tokens, or ``"cls"`` (the class token, the first): one row per sample. Another value
            raises ``ValueError``.

    Attributes:
        pca_widths: after a step, root layer -> the width PCA at ``variance_threshold`` gives.

    Example::

        StructuredPruningCallback("pca_gm", target_flops_reduction=0.4, criterion_kwargs={"token_pooling": "avg"})
    """

    requirements = Requirements(activations=True)

    def __init__(
        self, variance_threshold: float = 0.999, rows_per_batch: int = 512, token_pooling: TokenPooling | None = None
    ) -> None:
        if not 0.0 < variance_threshold <= 1.0:
            raise ValueError(f"variance_threshold must be in (0, 1], got {variance_threshold!r}")
        check_token_pooling(token_pooling, none="every token is a row")
        self.variance_threshold = float(variance_threshold)
        self.rows_per_batch = int(rows_per_batch)
        self.token_pooling = token_pooling
        self.pca_widths: dict[str, int] = {}
        self._fpgm = FPGM()

    def activation_requests(self, groups: Sequence[ChannelGroup]) -> list[ActivationRequest]:
        return [
            root_request(g, statistic="covariance", rows_per_batch=self.rows_per_batch, token_pooling=self.token_pooling)
            for g in groups
        ]

    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        return self._fpgm.score(groups, context)

    def width_losses(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        store = context.activations
        if store is None:
            raise ValueError("pca_gm needs collected activations; use it through StructuredPruningCallback")
        losses = []
        self.pca_widths = {}
        for group, request in zip(groups, self.activation_requests(groups)):
            covariance = store.covariance(request).cpu()
            curve = explained_variance_curve(covariance)
            self.pca_widths[group.root_name] = pca_width(covariance, self.variance_threshold)
            kept_channels = torch.arange(group.positions + 1) * group.unit
            losses.append(1.0 - curve[kept_channels.clamp_max(group.size)])
        return losses
