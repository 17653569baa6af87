"""The criterion protocol, as criteria and users import it (defined with the engine:
:mod:`lightning_prune.engine.protocol`)."""

from lightning_prune.engine.protocol import Criterion, GroupCriterion, Requirements, ScoringContext

__all__ = ["Criterion", "GroupCriterion", "Requirements", "ScoringContext"]
