"""``"random"``: uniformly random scores, the baseline every criterion has to beat."""

from __future__ import annotations

import torch

from lightning_prune.criteria.base import GroupCriterion, ScoringContext
from lightning_prune.criteria.registry import register_criterion
from lightning_prune.engine.graph import ChannelGroup

__all__ = ["RandomCriterion"]


@register_criterion("random")
class RandomCriterion(GroupCriterion):
    """Scores drawn from ``U(0, 1)`` with the context's seeded generator (same seed, same pruning)."""

    comparable_across_layers = True

    def score_group(self, group: ChannelGroup, context: ScoringContext) -> torch.Tensor:
        return torch.rand(group.size, generator=context.generator, dtype=torch.float64)
