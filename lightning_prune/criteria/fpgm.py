"""``"fpgm"``: geometric-median redundancy (He et al., CVPR 2019; ``docs/criteria.md`` section "Baselines")."""

from __future__ import annotations

import torch

from lightning_prune.criteria._slices import combine_layer_scores, filter_matrices
from lightning_prune.criteria.base import GroupCriterion, ScoringContext
from lightning_prune.criteria.registry import register_criterion
from lightning_prune.engine.graph import ChannelGroup

__all__ = ["FPGM", "geometric_median_scores", "pairwise_distances"]


#: Pairs whose squared distance is below this fraction of ``|a|^2 + |b|^2`` are recomputed from their
#: differences: above it the Gram shortcut's cancellation error is below ~1e-10 of the distance.
_CANCELLATION = 1e-6
_CHUNK_ELEMENTS = 1 << 22  # bound on the temporary differences of the recomputed pairs


def pairwise_distances(filters: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``filters`` in float64, exact where it matters.

    The rows are centred (distances do not change), the distances come from the Gram matrix (one
    BLAS product), and the pairs close enough for ``|a|^2 + |b|^2 - 2ab`` to cancel, near-duplicate
    filters, which are FPGM's point, are recomputed from the differences of the given rows.
    """
    rows = filters.double()
    mean = rows.mean(0, keepdim=True)
    x = rows - mean
    sq = (x * x).sum(1)
    # what the squared distance is computed relative to: the centred norms, and the mean that the
    # centring rounded against
    norms = sq[:, None] + sq[None, :]
    d2 = norms - 2.0 * (x @ x.T)
    scale = norms + 2.0 * float((mean * mean).sum())
    i, j = torch.nonzero(torch.triu(d2 <= _CANCELLATION * scale, diagonal=1), as_tuple=True)
    d = d2.clamp_min_(0.0).sqrt_()
    d.fill_diagonal_(0.0)
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, i.numel(), step):
        a, b = i[start : start + step], j[start : start + step]
        exact = (rows[a] - rows[b]).norm(dim=1)  # the given rows: centring rounds them
        d[a, b] = exact
        d[b, a] = exact
    return d


def geometric_median_scores(filters: torch.Tensor) -> torch.Tensor:
    """``s_i = sum_j ||W_i - W_j||_2`` for the rows ``W_i`` of ``filters`` (float64).

    Filters with the smallest sums lie nearest the layer's geometric median: the others can stand
    in for them, so they are the most replaceable.
    """
    return pairwise_distances(filters).sum(1)


@register_criterion("fpgm")
class FPGM(GroupCriterion):
    """Importance = a channel's summed distance to the other filters of each producing layer.

    Computed per layer on the output-side filters (as :class:`~lightning_prune.criteria.norm.LpNorm`
    chooses them), each layer's sums divided by their mean, then averaged over the layers.
    """

    def score_group(self, group: ChannelGroup, context: ScoringContext) -> torch.Tensor:
        sums = [geometric_median_scores(m) for m in filter_matrices(group)]
        return combine_layer_scores(sums, group.size)
