"""lightning-prune: structured pruning inside any PyTorch Lightning fit.

One callback, :class:`StructuredPruningCallback`, removes the weakest channels for real during
``Trainer.fit`` (coupled channels handled by torch-pruning's dependency graph) and training goes
on with the same optimizer, schedule, checkpoints and loggers.
"""

from lightning_prune.callback import StructuredPruningCallback
from lightning_prune.checkpoint import load_pruned, restore_pruned_structure, restores_pruned_checkpoints
from lightning_prune.criteria import (
    Criterion,
    GroupCriterion,
    Requirements,
    ScoringContext,
    available_criteria,
    get_criterion,
    register_criterion,
)
from lightning_prune.engine import ChannelPruner, Cost, PruningError, Target, count_cost
from lightning_prune.engine.correction import CorrectionWarning
from lightning_prune.engine.huggingface import ConfigCannotDescribeWarning
from lightning_prune.reporting import PruningRecord
from lightning_prune.schedules import cumulative_targets

__version__ = "0.1.0"

__all__ = [
    "ChannelPruner",
    "ConfigCannotDescribeWarning",
    "CorrectionWarning",
    "Cost",
    "Criterion",
    "GroupCriterion",
    "PruningError",
    "PruningRecord",
    "Requirements",
    "ScoringContext",
    "StructuredPruningCallback",
    "Target",
    "__version__",
    "available_criteria",
    "count_cost",
    "cumulative_targets",
    "get_criterion",
    "load_pruned",
    "register_criterion",
    "restore_pruned_structure",
    "restores_pruned_checkpoints",
]
