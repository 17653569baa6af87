"""Filter-norm criteria ``"l1"`` and ``"l2"`` (Li et al., ICLR 2017), combined over coupled layers."""

from __future__ import annotations

from lightning_prune.criteria._slices import combine_layer_scores, filter_matrices
from lightning_prune.criteria.base import GroupCriterion, ScoringContext
from lightning_prune.criteria.registry import register_criterion
from lightning_prune.engine.graph import ChannelGroup

__all__ = ["LpNorm", "L1Norm", "L2Norm"]


class LpNorm(GroupCriterion):
    """Importance = the Lp norm of a channel's filter, averaged over the layers that produce it.

    For every layer in the group whose *output* is the channel (the conv or linear filter, the
    BatchNorm/LayerNorm scale; not biases), the per-channel norm ``||w_c||_p`` is divided by that
    layer's mean norm; the channel's score is the mean over layers. Per-layer normalisation keeps a
    conv's filters and a BN's scales on one scale before they are combined.

    Args:
        p: the norm's order (> 0). Default 1.
    """

    def __init__(self, p: float = 1.0) -> None:
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p!r}")
        self.p = float(p)

    def score_group(self, group: ChannelGroup, context: ScoringContext):
        norms = [m.abs().pow(self.p).sum(1).pow(1.0 / self.p) for m in filter_matrices(group)]
        return combine_layer_scores(norms, group.size)


@register_criterion("l1")
class L1Norm(LpNorm):
    """``"l1"``: :class:`LpNorm` with ``p=1``."""

    def __init__(self) -> None:
        super().__init__(p=1.0)


@register_criterion("l2")
class L2Norm(LpNorm):
    """``"l2"``: :class:`LpNorm` with ``p=2``."""

    def __init__(self) -> None:
        super().__init__(p=2.0)
