"""The pruning engine over torch-pruning's dependency graph: groups, costs, allocation, surgery."""

from lightning_prune.engine.allocation import Plan, Target, TargetUnreachableError, plan_pruning
from lightning_prune.engine.cost import Cost, CostModel, count_cost
from lightning_prune.engine.graph import ChannelGroup, ParamSlice, build_dependency_graph, discover_groups
from lightning_prune.engine.optimizer import UnsupportedOptimizerStateError, prepare_optimizer_remap
from lightning_prune.engine.pruner import Analysis, ChannelPruner, PruningError, StepResult, layer_widths
from lightning_prune.engine.surgery import ModuleSnapshot, ParameterChange, apply_plan

__all__ = [
    "Analysis",
    "ChannelGroup",
    "ChannelPruner",
    "Cost",
    "CostModel",
    "ModuleSnapshot",
    "ParamSlice",
    "ParameterChange",
    "Plan",
    "PruningError",
    "StepResult",
    "Target",
    "TargetUnreachableError",
    "UnsupportedOptimizerStateError",
    "apply_plan",
    "build_dependency_graph",
    "count_cost",
    "discover_groups",
    "layer_widths",
    "plan_pruning",
    "prepare_optimizer_remap",
]
