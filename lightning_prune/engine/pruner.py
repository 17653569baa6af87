"""One pruning step, end to end, independent of Lightning.

:class:`ChannelPruner` traces the model, scores its channel groups with a criterion, allocates
widths to meet a target, cuts the channels and points the optimizers at the new parameters. The
step is atomic: if anything fails (scoring, allocation, surgery, the post-surgery checks, the
optimizer remap) model and optimizers are exactly as before and the error is re-raised as
:class:`PruningError`.

It is what :class:`~lightning_prune.StructuredPruningCallback` drives inside ``fit``, and what a
plain-PyTorch user can call directly::

    import torch
    from torch import nn
    from lightning_prune.criteria import get_criterion
    from lightning_prune.engine import ChannelPruner, Target

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x = torch.randn(2, 3, 16, 16)
    pruner = ChannelPruner(get_criterion("l1"))
    result = pruner.step(model, x, Target("flops", 0.5))
    print(result.before.macs, "->", result.after.macs)
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.criteria.base import Criterion, ScoringContext
from lightning_prune.engine.allocation import ALLOCATIONS, Allocation, Plan, Target, max_reduction, plan_pruning
from lightning_prune.engine.cost import Cost, CostModel, call_model, count_cost
from lightning_prune.engine.graph import (
    ChannelGroup,
    build_dependency_graph,
    discover_groups,
    preserved_training_modes,
)
from lightning_prune.engine.optimizer import prepare_optimizer_remap
from lightning_prune.engine.probe import UnprunableGroupWarning, find_unprunable_groups, unprunable_message
from lightning_prune.engine.surgery import ModuleSnapshot, ParameterChange, apply_plan, unrecorded_changes

__all__ = ["Analysis", "ChannelPruner", "PruningError", "StepResult", "layer_widths"]


class PruningError(RuntimeError):
    """A pruning step failed; the model and optimizers were left as they were."""


@dataclass
class Analysis:
    """The prunable structure of a model at one moment."""

    graph: Any
    groups: list[ChannelGroup]
    cost_model: CostModel
    cost: Cost
    refused: dict[str, str] = field(default_factory=dict)  #: root layer -> why its group cannot be cut


@dataclass
class StepResult:
    """What one step did."""

    plan: Plan
    before: Cost
    after: Cost
    changes: dict[nn.Parameter, ParameterChange] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    num_groups: int = 0
    corrections: dict[str, str] = field(default_factory=dict)  #: per group root: how its weights were corrected
    surgery: list[list] = field(default_factory=list)  #: torch-pruning history [layer, is_out, idxs]: replayable


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer, by qualified name."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            widths[name] = int(module.out_features)
    return widths


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _output_signature(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, Mapping):
        return {k: _output_signature(v) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return [_output_signature(v) for v in output]
    return type(output).__name__


def _run_signature(model: nn.Module, example_inputs: Any) -> Any:
    with preserved_training_modes(model), torch.no_grad():
        model.eval()
        return _output_signature(call_model(model, example_inputs))


class ChannelPruner:
    """Scores, allocates and cuts channels of a model, one atomic step at a time.

    Args:
        criterion: the scoring method: a :class:`Criterion` or a registered name (``"l1"``, ...).
            An unknown name raises ``ValueError`` listing the valid ones.
        allocation: ``"uniform"`` (same fraction in every group) or ``"global"`` (one ranking).
        max_layer_ratio: largest fraction of a group's original width that may be removed, in (0, 1).
        round_to: kept widths are multiples of this (None: any width).
        ignored_layers: modules whose output channels are never pruned.
        forward_fn / output_transform / customized_pruners: passed to torch-pruning's tracing
            (models with unusual call signatures or outputs, layers torch-pruning does not know).
        probe: before planning, cut one channel of every group on trial and put it back; groups
            whose cut breaks the model (couplings torch-pruning's graph does not describe) are
            kept at full width with an :class:`UnprunableGroupWarning` naming their layers.
    """

    def __init__(
        self,
        criterion: Criterion | str,
        *,
        allocation: Allocation = "uniform",
        max_layer_ratio: float = 0.9,
        round_to: int | None = None,
        ignored_layers: Sequence[nn.Module] = (),
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], torch.Tensor] | None = None,
        customized_pruners: Mapping[Any, Any] | None = None,
        probe: bool = True,
    ) -> None:
        from lightning_prune.criteria import get_criterion  # the registry imports every criterion

        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        if not 0.0 < max_layer_ratio < 1.0:
            raise ValueError(f"max_layer_ratio must be in (0, 1), got {max_layer_ratio!r}")
        self.criterion = get_criterion(criterion)
        self.allocation = allocation
        self.max_layer_ratio = max_layer_ratio
        self.round_to = round_to
        self.ignored_layers = list(ignored_layers)
        self.forward_fn = forward_fn
        self.output_transform = output_transform
        self.customized_pruners = dict(customized_pruners or {})
        self.probe = probe

    def analyse(self, model: nn.Module, example_inputs: Any) -> Analysis:
        """Trace ``model`` and find its channel groups and cost (model left unchanged)."""
        graph = build_dependency_graph(
            model,
            example_inputs,
            forward_fn=self.forward_fn,
            output_transform=self.output_transform,
            customized_pruners=self.customized_pruners,
        )
        refused: dict[str, str] = {}
        groups = discover_groups(model, graph, ignored_modules=self.ignored_layers, refused=refused)
        if self.probe and groups:
            bad = find_unprunable_groups(model, graph, groups, lambda: _run_signature(model, example_inputs))
            refused.update({g.root_name: f"{bad[g.index]}; coupled layers: {_names(g.module_names)}" for g in groups if g.index in bad})
            groups = [dataclasses.replace(g, index=i) for i, g in enumerate(g for g in groups if g.index not in bad)]
        if refused:
            warnings.warn(unprunable_message(refused), UnprunableGroupWarning, stacklevel=1)
        cost_model = CostModel(model, groups, example_inputs)
        return Analysis(graph=graph, groups=groups, cost_model=cost_model, cost=cost_model.current, refused=refused)

    def max_reduction(
        self, analysis: Analysis, target: Target, dense: Cost, original_widths: Mapping[str, int] | None = None
    ) -> float:
        """The largest reduction of ``target``'s metric the caps allow from ``analysis``'s state."""
        return max_reduction(
            analysis.groups,
            analysis.cost_model,
            target,
            dense,
            max_layer_ratio=self.max_layer_ratio,
            round_to=self.round_to,
            original_widths=original_widths,
        )

    def step(
        self,
        model: nn.Module,
        example_inputs: Any,
        target: Target,
        *,
        dense: Cost | None = None,
        original_widths: Mapping[str, int] | None = None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        context: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        step_index: int = 0,
        plan_hook: Callable[[Plan], Plan] | None = None,
    ) -> StepResult:
        """Prune ``model`` in place until it meets ``target`` (cumulative, relative to ``dense``).

        Args:
            model: the model, pruned in place.
            example_inputs: inputs the model accepts (on the model's device).
            target: the cumulative reduction to reach.
            dense: cost of the unpruned model (default: the model as it is now).
            original_widths: root layer name -> dense width, for ``max_layer_ratio``.
            optimizers: optimizers to point at the new parameters (state cut to the kept channels).
            context: extra fields for the :class:`ScoringContext` (activations, labels, forward, ...).
            generator: seeded generator for sampling criteria.
            step_index: index of this step, passed to the criterion.
            plan_hook: applied to the plan before the surgery (e.g. broadcast it from rank 0 so that
                every process cuts the same channels).

        Raises:
            PruningError: anything failed; model and optimizers are unchanged.
        """
        started = time.perf_counter()
        snapshot = ModuleSnapshot(model)
        params_before = list(model.parameters())
        try:
            with torch.inference_mode(False):
                analysis = self.analyse(model, example_inputs)
                if not analysis.groups:
                    reason = "".join(f"; '{k}': {v}" for k, v in analysis.refused.items())
                    raise PruningError(f"the model has no prunable channel group left{reason}")
                signature = _run_signature(model, example_inputs)
                scoring = ScoringContext(
                    model=model,
                    example_inputs=example_inputs,
                    graph=analysis.graph,
                    generator=generator if generator is not None else torch.Generator().manual_seed(0),
                    step=step_index,
                    **dict(context or {}),
                )
                with preserved_training_modes(model):
                    scores = self.criterion.score(analysis.groups, scoring)
                    width_losses = self.criterion.width_losses(analysis.groups, scoring)
                plan = plan_pruning(
                    analysis.groups,
                    scores,
                    analysis.cost_model,
                    target,
                    dense or analysis.cost,
                    allocation=self.allocation,
                    max_layer_ratio=self.max_layer_ratio,
                    round_to=self.round_to,
                    original_widths=original_widths,
                    normalize_scores=not self.criterion.comparable_across_layers,
                    width_losses=width_losses,
                    losses_per_mac=self.criterion.width_losses_per_mac,
                )
                if plan_hook is not None:
                    plan = plan_hook(plan)
                changes = apply_plan(analysis.groups, plan.removed) if not plan.empty else {}
                corrections = self.criterion.correct(analysis.groups, plan.removed, changes, scoring) if changes else {}
                surgery = [[str(n), bool(o), [int(i) for i in idxs]] for n, o, idxs in analysis.graph.pruning_history()]
                after = self._check(model, example_inputs, params_before, changes, plan, signature) or analysis.cost
                remaps = [prepare_optimizer_remap(opt, changes) for opt in optimizers]
        except Exception as error:
            snapshot.restore()
            if isinstance(error, PruningError):
                raise
            raise PruningError(f"pruning step failed, model and optimizers left unchanged: {error}") from error
        for remap in remaps:
            remap.commit()
        return StepResult(
            plan=plan,
            before=analysis.cost,
            after=after,
            changes=changes,
            widths=layer_widths(model),
            seconds=time.perf_counter() - started,
            num_groups=len(analysis.groups),
            corrections=corrections,
            surgery=surgery,
        )

    @staticmethod
    def _check(model, example_inputs, params_before, changes, plan, signature) -> Cost | None:
        """Verify the surgery (all changes recorded, output unchanged, cost as planned); return the cost."""
        stray = unrecorded_changes(params_before, model, changes)
        if stray:
            raise PruningError(f"parameters replaced outside the recorded surgery: {stray[:5]}")
        if not changes:
            return None
        after_signature = _run_signature(model, example_inputs)
        if after_signature != signature:
            raise PruningError(
                f"pruning changed the model's output from {signature} to {after_signature}; "
                "add the layer that produces the output to ignored_layers"
            )
        measured = count_cost(model, example_inputs)
        if plan.predicted is not None and CostModel.relative_error(plan.predicted, measured) > 1e-6:
            raise PruningError(
                f"the pruned model costs {measured}, the plan predicted {plan.predicted}: a layer is pruned "
                "in a way torch-pruning's graph did not describe (register a custom pruner or ignore it)"
            )
        return measured
