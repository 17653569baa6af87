"""``"fpgm"``: geometric-median redundancy (He et al., CVPR 2019; ``shared/criteria.md`` section 5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_prune.criteria._slices import combine_layer_scores, filter_matrices
from lightning_prune.criteria.base import GroupCriterion, ScoringContext
from lightning_prune.criteria.registry import register_criterion

if TYPE_CHECKING:
    from lightning_prune.engine.graph import ChannelGroup

__all__ = ["FPGM", "geometric_median_scores"]


def geometric_median_scores(filters: torch.Tensor) -> torch.Tensor:
    """``s_i = sum_j ||W_i - W_j||_2`` for the rows ``W_i`` of ``filters`` (float64).

    Filters with the smallest sums lie nearest the layer's geometric median: the others can stand
    in for them, so they are the most replaceable.
    """
    filters = filters.double()
    # exact differences (not the |a|^2 + |b|^2 - 2ab shortcut): near-duplicate filters are the point
    return torch.cdist(filters, filters, compute_mode="donot_use_mm_for_euclid_dist").sum(1)


@register_criterion("fpgm")
class FPGM(GroupCriterion):
    """Importance = a channel's summed distance to the other filters of each producing layer.

    Computed per layer on the output-side filters (as :class:`~lightning_prune.criteria.norm.LpNorm`
    chooses them), each layer's sums divided by their mean, then averaged over the layers.
    """

    def score_group(self, group: ChannelGroup, context: ScoringContext) -> torch.Tensor:
        sums = [geometric_median_scores(m) for m in filter_matrices(group)]
        return combine_layer_scores(sums, group.size)
