"""The pruning engine over torch-pruning's dependency graph: groups, targets, costs, allocation, surgery.

Layering, bottom up: :mod:`~lightning_prune.engine.tp_adapter` (the only module that talks to
torch-pruning), :mod:`~lightning_prune.engine.graph` (channel groups), :mod:`~lightning_prune.engine.cost`
(and :mod:`~lightning_prune.engine.latency`, the measured-latency model, with
:mod:`~lightning_prune.engine.onnxruntime_latency`, a ``latency_fn`` that times onnxruntime, and
:mod:`~lightning_prune.engine.heap`, reproducible CPU timings under glibc) and
:mod:`~lightning_prune.engine.targets`, :mod:`~lightning_prune.engine.allocation`,
:mod:`~lightning_prune.engine.protocol` (what a criterion provides), :mod:`~lightning_prune.engine.surgery`,
:mod:`~lightning_prune.engine.optimizer`, :mod:`~lightning_prune.engine.probe` and
:mod:`~lightning_prune.engine.pruner`. The engine imports no criterion and no registry.
"""

from lightning_prune.engine.allocation import Plan, TargetUnreachableError, plan_pruning
from lightning_prune.engine.cost import Cost, CostModel, count_cost
from lightning_prune.engine.graph import ChannelGroup, ParamSlice, build_dependency_graph, discover_groups
from lightning_prune.engine.heap import retain_freed_memory
from lightning_prune.engine.latency import LatencyCostModel, LatencyEstimator
from lightning_prune.engine.onnxruntime_latency import OnnxRuntimeLatency
from lightning_prune.engine.optimizer import UnsupportedOptimizerStateError, prepare_optimizer_remap
from lightning_prune.engine.protocol import Criterion, GroupCriterion, Requirements, ScoringContext
from lightning_prune.engine.pruner import Analysis, ChannelPruner, PruningError, StepResult, layer_widths
from lightning_prune.engine.surgery import ModuleSnapshot, ParameterChange, apply_plan
from lightning_prune.engine.targets import TARGET_KINDS, Target, TargetKind
from lightning_prune.engine.tp_adapter import TracedGraph

__all__ = [
    "TARGET_KINDS",
    "Analysis",
    "ChannelGroup",
    "ChannelPruner",
    "Cost",
    "CostModel",
    "Criterion",
    "GroupCriterion",
    "LatencyCostModel",
    "LatencyEstimator",
    "ModuleSnapshot",
    "OnnxRuntimeLatency",
    "ParamSlice",
    "ParameterChange",
    "Plan",
    "PruningError",
    "Requirements",
    "ScoringContext",
    "StepResult",
    "Target",
    "TargetKind",
    "TargetUnreachableError",
    "TracedGraph",
    "UnsupportedOptimizerStateError",
    "apply_plan",
    "build_dependency_graph",
    "count_cost",
    "discover_groups",
    "layer_widths",
    "plan_pruning",
    "prepare_optimizer_remap",
    "retain_freed_memory",
]
