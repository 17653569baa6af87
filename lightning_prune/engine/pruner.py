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
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_prune._model import preserved_training_modes
from lightning_prune.engine.allocation import (
    ALLOCATIONS,
    Allocation,
    Plan,
    RoundTo,
    TargetUnreachableError,
    max_reduction,
    plan_pruning,
)
from lightning_prune.engine.attention import (
    HEAD_MODES,
    SyncedHandle,
    find_attention,
    head_groups,
    head_projection_layers,
    head_widths,
    width_attribute_modules,
)
from lightning_prune.engine.companions import (
    Companion,
    as_companions,
    averaged_submodules,
    capture_companion_inputs,
    check_companion_shapes,
    cut_companion,
)
from lightning_prune.engine.correction import (
    CORRECTIONS,
    DEFAULT_RIDGE,
    GCV,
    GRAM_ROWS_PER_BATCH,
    apply_least_squares,
    check_ridge,
    correction_requests,
    width_losses_from_grams,
)
from lightning_prune.engine.cost import Cost, CostModel, cost_from_positions, profile
from lightning_prune.engine.graph import ChannelGroup, build_dependency_graph, discover_groups
from lightning_prune.engine.huggingface import sync_configs
from lightning_prune.engine.latency import AUTO_MULTIPLES, LatencyEstimator, fastest_multiple
from lightning_prune.engine.optimizer import prepare_optimizer_remap
from lightning_prune.engine.probe import GraphSnapshot, UnprunableGroupWarning, find_unprunable_groups, unprunable_message
from lightning_prune.engine.protocol import Criterion, ScoringContext
from lightning_prune.engine.scope import Scope, classify_group, default_scope, resolve_scope
from lightning_prune.engine.surgery import ModuleSnapshot, ParameterChange, apply_plan, unrecorded_changes
from lightning_prune.engine.targets import Target, check_fraction
from lightning_prune.engine.tp_adapter import TracedGraph

__all__ = ["Analysis", "ChannelPruner", "Correction", "PruningError", "StepResult", "check_finite", "layer_widths"]

#: ``correction`` of :class:`ChannelPruner`: ``"none"`` (selection only) or ``"least_squares"``.
Correction = Literal["none", "least_squares"]


class PruningError(RuntimeError):
    """A pruning step failed; the model and optimizers were left as they were."""


def _structure(model: nn.Module) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Identity and shape of every parameter: what an analysis of the model depends on."""
    return tuple((id(p), tuple(p.shape)) for p in model.parameters())


@dataclass
class Analysis:
    """The prunable structure of a model at one moment: traced once, used by everything that needs
    the groups until the model's structure changes (the collector's requests, the criterion, the
    allocation, the surgery)."""

    graph: TracedGraph
    groups: list[ChannelGroup]
    cost_model: CostModel
    cost: Cost
    refused: dict[str, str] = field(default_factory=dict)  #: root layer -> why its group cannot be cut
    signature: Any = None  #: shapes of the model's outputs on the example inputs
    structure: tuple[Any, ...] = ()  #: parameter identities and shapes when analysed

    def describes(self, model: nn.Module) -> bool:
        """Whether ``model`` still has the parameters (same objects, same shapes) it was analysed with."""
        return bool(self.structure) and self.structure == _structure(model)


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
    surgery: list[list[Any]] = field(default_factory=list)  #: history [layer, is_out, idxs]: replayable
    recalibration_seconds: float = 0.0  #: wall time of the ``recalibrate`` call (BN statistics), inside the step
    latency_predicted: float | None = None  #: seconds the latency model predicted for the kept plan
    latency_measured: float | None = None  #: seconds measured on the pruned model (``after.latency``)
    #: every timing of the latency correction, in order: [planning target, predicted seconds, measured
    #: seconds]; a plan timed again (the kept plan, once a re-plan has run) has a row per timing
    latency_tries: list[list[float]] = field(default_factory=list)
    #: the multiple the kept widths snap to (``round_to="auto"`` resolved): one for every group, or
    #: root layer name -> multiple (None: any width) when the per-group multiples were fastest
    round_to: RoundTo = None
    #: ``round_to="auto"`` timed at this step: candidate ("none", "4", ..., "groups" for the per-group
    #: multiples) -> whole-model seconds cut with it, relative to the step's start (empty when the step
    #: did not choose)
    round_to_trials: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Scored:
    """What a step plans from, whatever the target or multiple it tries: its groups' scores and width
    losses, and the dense model's cost and widths."""

    scores: Sequence[torch.Tensor]
    width_losses: Any
    per_mac: bool
    dense: Cost
    original_widths: Mapping[str, int] | None


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer, and the inner width (heads x head width) of every
    attention module, by qualified name."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            widths[name] = int(module.out_features)
    for name, width in head_widths(model).items():
        widths.setdefault(name, width)
    return widths


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _layer_of(parameter_name: str) -> str:
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


def _head_entries(groups: Sequence[ChannelGroup], removed: Mapping[int, Sequence[int]]) -> list[list[Any]]:
    """Surgery records of the head cuts of a plan (torch-pruning's history does not see them)."""
    entries = []
    for index, channels in removed.items():
        handle = groups[index].handle
        handle = handle.inner if isinstance(handle, SyncedHandle) else handle
        entry = getattr(handle, "entry", None)
        if channels and entry is not None:
            entries.append(entry(channels))
    return entries


def _finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each tensor is all finite, with one transfer to the host per device."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    if len({f.device for f in flags}) == 1:
        return [bool(v) for v in torch.stack(flags).tolist()]
    return [bool(f) for f in flags]


def check_finite(groups: Sequence[ChannelGroup], context: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`PruningError` when a parameter of the groups' slices, or a collected activation
    statistic (``context["activations"]``), holds NaN or inf: scores computed from them would be
    meaningless. Names the first such parameter's layer (in group order) or the first statistic's
    module (in collection order). One device-to-host transfer for the parameters, one for the
    statistics."""
    params: dict[int, tuple[str, torch.Tensor]] = {}
    for group in groups:
        for piece in group.slices:
            params.setdefault(id(piece.param), (piece.name, piece.param))
    named = list(params.values())
    if named:
        for (name, _p), ok in zip(named, _finite_flags([p for _, p in named])):
            if not ok:
                raise PruningError(
                    f"non-finite weights (NaN or inf) in layer '{_layer_of(name)}' (parameter '{name}') before the "
                    "pruning step: the training has diverged (lower the learning rate, clip gradients, check the "
                    "data); nothing was pruned, model and optimizers left unchanged"
                )
    store = (context or {}).get("activations")
    named_tensors = getattr(store, "named_tensors", None)
    if named_tensors is None:
        return
    stats = list(named_tensors())
    if stats:
        for (request, field_name, _t), ok in zip(stats, _finite_flags([t for _r, _n, t in stats])):
            if not ok:
                raise PruningError(
                    f"non-finite activations (NaN or inf) at module '{request.module}' ({request.site} "
                    f"{field_name} statistic collected before the pruning step): the model produces inf/NaN there "
                    "(diverged training, an overflow in reduced precision, or bad inputs); nothing was pruned, model "
                    "and optimizers left unchanged"
                )


class ChannelPruner:
    """Scores, allocates and cuts channels of a model, one atomic step at a time.

    Every argument is validated here, once, with a message naming it.

    Args:
        criterion: the scoring method, a :class:`~lightning_prune.engine.protocol.Criterion`
            (``lightning_prune.get_criterion("l1")`` resolves a registered name). Anything else
            raises ``TypeError``.
        allocation: ``"uniform"`` (same fraction in every group) or ``"global"`` (one ranking).
            Default ``"uniform"``; another value raises ``ValueError``.
        max_layer_ratio: largest fraction of a group's original width that may be removed, in (0, 1).
            Default 0.9; outside (0, 1) raises ``ValueError``.
        round_to: kept widths are multiples of this (None, the default: any width). ``"auto"``: the
            multiple that is fast on the latency device. With a target that is not latency (and
            ``measure_round_to``, True by default), the first step with a cut times the model cut with
            free widths, with every candidate multiple that the targets seen by :meth:`fit_round_to`
            can reach, and with a multiple per group read from each group's costliest layer
            (:meth:`~lightning_prune.engine.latency.LatencyEstimator.group_multiples`), and keeps the
            fastest (:meth:`_time_round_to`); otherwise the multiple the
            latency tables show (:meth:`~lightning_prune.engine.latency.LatencyEstimator.fast_multiple`,
            found when the model is first analysed; None when no multiple is faster). Anything else:
            ``ValueError``.
        ignored_layers: layers (qualified names or modules) whose output channels are never pruned.
            Default none. Other types raise ``TypeError``; a name the model lacks raises
            ``ValueError`` when the model is analysed, naming close matches.
        forward_fn / output_transform / customized_pruners: passed to torch-pruning's tracing
            (models with unusual call signatures or outputs, layers torch-pruning does not know).
        probe: before planning, cut one channel of every group on trial and put it back; groups
            whose cut breaks the model (couplings torch-pruning's graph does not describe) are
            kept at full width with an :class:`UnprunableGroupWarning` naming their layers.
        correction: ``"least_squares"``: after the surgery every consumer of a pruned group absorbs
            the ridge least-squares reconstruction of the removed channels from the kept ones
            (:mod:`lightning_prune.engine.correction`; needs the consumers' Grams in
            ``context["activations"]``, see :meth:`correction_requests`); ``"none"``: plain selection;
            None (default): the criterion's own (``criterion.default_correction``: least squares for
            ``"interpolative_decomposition"``, else the criterion's :meth:`correct`, a no-op by default).
        correction_ridge: ridge of the correction, relative to the mean diagonal of each consumer's
            Gram, or ``"gcv"``: chosen per consumer by generalised cross-validation from its Gram and row
            count (:func:`~lightning_prune.engine.correction.gcv_ridge`; the step's ``corrections`` record
            the ridges). None (default): the criterion's ``ridge`` attribute if it is a number, else
            ``"gcv"``. A fixed ridge on a Gram of no more rows than kept channels warns
            (:class:`~lightning_prune.engine.correction.CorrectionWarning`). ``ValueError`` for anything
            but a number >= 0, ``"gcv"`` or None.
        residual_widths: with the least-squares correction, choose widths by the share of each
            consumer's input energy the correction leaves (per group and width, for the criterion's top
            channels, from the consumers' Grams, summed over consumers), smallest loss per MAC saved
            first, instead of ``allocation``, for criteria without width losses of their own. Default
            False (the criterion's allocation). ``ValueError`` when True and the correction resolves to
            ``"none"``.
        criterion_widths: let a criterion with a width rule of its own
            (:meth:`~lightning_prune.engine.protocol.Criterion.width_losses`: ``"discriminant_information"``,
            ``"interpolative_decomposition"``, ``"pca_gm"``) choose how many channels each group keeps.
            Default True. False: the criterion only ranks the channels inside each group and
            ``allocation`` (or ``residual_widths``) chooses the widths, an ablation that separates which
            channels a method keeps from how many per layer. Not a bool: ``TypeError``.
        latency: a :class:`~lightning_prune.engine.latency.LatencyEstimator`: every analysis then builds a
            :class:`~lightning_prune.engine.latency.LatencyCostModel` (costs carry ``latency``) and every
            step measures the pruned model. Needed by ``Target("latency", ...)``; created with defaults
            when ``round_to="auto"``. Default None. Another type: ``TypeError``.
        latency_tolerance: with a latency target, how far (fraction of the dense latency) the measured
            reduction may miss the target before the step re-plans. Default 0.02; outside [0, 1):
            ``ValueError``.
        latency_corrections: at most this many re-plans per step: the model is restored to the step's
            start and re-planned with the planning target moved by the measured miss (the scores are
            reused), the plan closest to the target is kept. Once a re-plan has run, the kept plan is timed
            again (at most this many times too) and judged by its re-measurements, so that a lucky
            timing does not decide. Default 5; not an integer >= 0: ``ValueError``.
        scope: which widths may be cut (:mod:`lightning_prune.engine.scope`): ``"mlp"`` (feed-forward
            hidden widths, and every width that is neither heads nor the token width), ``"heads"``
            (whole attention heads), ``"embedding"`` (the token width), ``"all"``, or a combination
            (``"mlp+heads"``, ``["mlp", "embedding"]``). Default None: ``"mlp+heads"`` for a
            transformer (a model with an attention module), ``"all"`` otherwise. An unknown word raises
            ``ValueError`` naming the allowed ones; another type ``TypeError``.
        head_pruning: ``"heads"`` (default): attention heads are removed whole; ``"head_dims"``: every
            head keeps but loses the same channels (narrower heads). Anything else: ``ValueError``.
        uniform_per_type: every group of the same kind and original width keeps the same width (e.g.
            the same number of heads and the same feed-forward width in every layer), so that a
            Hugging Face ``config`` can express the pruned model. Default False.
    """

    def __init__(
        self,
        criterion: Criterion,
        *,
        allocation: Allocation = "uniform",
        max_layer_ratio: float = 0.9,
        round_to: int | Literal["auto"] | None = None,
        ignored_layers: Sequence[str | nn.Module] = (),
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        customized_pruners: Mapping[Any, Any] | None = None,
        probe: bool = True,
        correction: Correction | None = None,
        correction_ridge: float | str | None = None,
        residual_widths: bool = False,
        criterion_widths: bool = True,
        latency: LatencyEstimator | None = None,
        latency_tolerance: float = 0.02,
        latency_corrections: int = 5,
        scope: Scope = None,
        head_pruning: Literal["heads", "head_dims"] = "heads",
        uniform_per_type: bool = False,
    ) -> None:
        if not isinstance(criterion, Criterion):
            raise TypeError(
                f"criterion must be a Criterion instance, got {type(criterion).__name__}: {criterion!r}; "
                "resolve a registered name with lightning_prune.get_criterion(name)"
            )
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)} or None, got {allocation!r}")
        if not isinstance(criterion_widths, bool):
            raise TypeError(f"criterion_widths must be True or False, got {criterion_widths!r}")
        if round_to is not None and round_to != "auto" and (
            isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
        ):
            raise ValueError(f"round_to must be a positive integer, 'auto' or None, got {round_to!r}")
        if latency is not None and not isinstance(latency, LatencyEstimator):
            raise TypeError(f"latency must be a LatencyEstimator or None, got {type(latency).__name__}")
        tolerance_ok = isinstance(latency_tolerance, (int, float)) and not isinstance(latency_tolerance, bool)
        if not tolerance_ok or not 0 <= latency_tolerance < 1:
            raise ValueError(f"latency_tolerance must be a number in [0, 1), got {latency_tolerance!r}")
        if isinstance(latency_corrections, bool) or not isinstance(latency_corrections, int) or latency_corrections < 0:
            raise ValueError(f"latency_corrections must be an integer >= 0, got {latency_corrections!r}")
        self.latency = latency if latency is not None or round_to != "auto" else LatencyEstimator()
        self.latency_tolerance = float(latency_tolerance)
        self.latency_corrections = latency_corrections
        self._auto_round_to: RoundTo = None
        self._auto_resolved = False
        self._auto_limit: int | None = max(AUTO_MULTIPLES)  #: the largest multiple every target seen can reach
        self._round_to_measured = False
        #: ``round_to="auto"`` with a MACs or parameter target: the first step times its cut at every
        #: candidate multiple (False: the tables' multiple; e.g. under DDP, where each process would time its own)
        self.measure_round_to = True
        for layer in ignored_layers:
            if not isinstance(layer, (str, nn.Module)):
                raise TypeError(f"ignored_layers must hold layer names or modules, got {type(layer).__name__}: {layer!r}")
        if correction is not None and correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)} or None, got {correction!r}")
        correction_ridge = check_ridge(correction_ridge, "correction_ridge")
        self.scope = resolve_scope(scope)
        if head_pruning not in HEAD_MODES:
            raise ValueError(f"head_pruning must be one of {', '.join(HEAD_MODES)}, got {head_pruning!r}")
        self.head_pruning = head_pruning
        if not isinstance(uniform_per_type, bool):
            raise TypeError(f"uniform_per_type must be True or False, got {uniform_per_type!r}")
        self.uniform_per_type = uniform_per_type
        self.correction = correction
        if not isinstance(residual_widths, bool):
            raise TypeError(f"residual_widths must be True or False, got {residual_widths!r}")
        self.residual_widths = residual_widths
        self.correction_ridge = correction_ridge
        self.criterion = criterion
        if residual_widths and self.resolved_correction != "least_squares":
            raise ValueError(
                "residual_widths=True chooses widths by what the least-squares correction leaves, but correction "
                f"resolves to {self.resolved_correction!r} for {type(criterion).__name__}: pass correction='least_squares'"
            )
        self.allocation = allocation
        self.criterion_widths = criterion_widths
        self.max_layer_ratio = check_fraction("max_layer_ratio", max_layer_ratio)
        self.round_to = round_to
        self.ignored_layers = list(ignored_layers)
        self.forward_fn = forward_fn
        self.output_transform = output_transform
        self.customized_pruners = dict(customized_pruners or {})
        self.probe = probe

    @property
    def effective_round_to(self) -> RoundTo:
        """``round_to`` resolved: an integer, None, or with ``"auto"`` (once the model has been analysed)
        possibly a multiple per group (root layer name -> multiple or None)."""
        if isinstance(self.round_to, int):
            return self.round_to
        return self._auto_round_to if self.round_to == "auto" else None

    @property
    def resolved_correction(self) -> Correction:
        """``correction``, or the criterion's ``default_correction`` when it is None."""
        if self.correction is not None:
            return self.correction
        own = getattr(self.criterion, "default_correction", "none")
        return "least_squares" if own == "least_squares" else "none"

    @property
    def ridge(self) -> float | str:
        """The correction's ridge (relative to the mean diagonal of each consumer's Gram), or ``"gcv"``."""
        if self.correction_ridge is not None:
            return self.correction_ridge
        own = getattr(self.criterion, "ridge", None)  # a number, "gcv" or None (None and "gcv": GCV)
        return float(own) if isinstance(own, (int, float)) and not isinstance(own, bool) else GCV

    @property
    def width_ridge(self) -> float:
        """The ridge of the width losses (:func:`width_losses_from_grams`): :attr:`ridge`, or the
        default floor when that is ``"gcv"`` (chosen per consumer only once the kept set is known)."""
        ridge = self.ridge
        return DEFAULT_RIDGE if ridge == GCV else float(ridge)

    def correction_requests(self, groups: Sequence[ChannelGroup], model: nn.Module) -> list[Any]:
        """The ``"gram"`` requests the least-squares correction reads (one per consumer of every group);
        empty when the correction is off."""
        if self.resolved_correction != "least_squares":
            return []
        rows = getattr(self.criterion, "rows_per_batch", GRAM_ROWS_PER_BATCH)
        return correction_requests(groups, model, rows if isinstance(rows, int) and rows > 0 else GRAM_ROWS_PER_BATCH)

    def resolve_ignored(self, model: nn.Module) -> list[nn.Module]:
        """``ignored_layers`` as modules of ``model``.

        Raises:
            ValueError: a name the model does not have (with close names), or a module outside it.
        """
        named = dict(model.named_modules())
        modules = []
        for layer in self.ignored_layers:
            if isinstance(layer, nn.Module):
                if not any(layer is m for m in named.values()):
                    raise ValueError(f"ignored_layers holds a {type(layer).__name__} that is not part of the model")
                modules.append(layer)
            elif layer in named:
                modules.append(named[layer])
            else:
                close = [n for n in named if n and (layer in n or n in layer)][:5]
                hint = f" Did you mean one of {close}?" if close else ""
                raise ValueError(f"ignored_layers: the model has no layer named '{layer}'.{hint}")
        return modules

    def analyse(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        measured: float | None = None,
        latency_rest: tuple[float, float, float] | None = None,
    ) -> Analysis:
        """Trace ``model`` and find its channel groups and cost (model left unchanged).

        Three forward passes: the trace, one that measures layer positions and output shapes, and
        the trial surgery of :func:`~lightning_prune.engine.probe.find_unprunable_groups`. With a
        ``latency`` estimator, also the latency tables (measured or cached), one timing of the model
        (unless ``measured``, its latency in seconds, is given) and one of the model with every group cut
        to half its width on trial, then restored (unless ``latency_rest``, the ``(scale, c0, c1)`` of
        :class:`~lightning_prune.engine.latency.LatencyCostModel`, is given); ``round_to="auto"`` is
        resolved then.
        """
        ignored = self.resolve_ignored(model)
        with preserved_training_modes(model):
            graph = build_dependency_graph(
                model,
                example_inputs,
                forward_fn=self.forward_fn,
                output_transform=self.output_transform,
                customized_pruners=self.customized_pruners,
            )
        refused: dict[str, str] = {}
        groups = discover_groups(model, graph, ignored_modules=ignored, refused=refused)
        groups = self._scoped_groups(model, groups, ignored, refused)
        positions, signature = profile(model, example_inputs)
        if self.probe and groups:
            bad = find_unprunable_groups(model, graph, groups, lambda: profile(model, example_inputs)[1], signature)
            for g in groups:
                if g.index in bad:
                    refused[g.root_name] = f"{bad[g.index]}; coupled layers: {_names(g.module_names)}"
            groups = [dataclasses.replace(g, index=i) for i, g in enumerate(g for g in groups if g.index not in bad)]
        if refused:
            warnings.warn(unprunable_message(refused), UnprunableGroupWarning, stacklevel=1)
        cost_model: CostModel
        if self.latency is not None:
            with preserved_training_modes(model):
                trial = None
                if latency_rest is None and groups:
                    trial = self._latency_trial(model, graph, groups, example_inputs)
                latency_model = self.latency.cost_model(
                    model, groups, example_inputs, positions=positions, max_layer_ratio=self.max_layer_ratio,
                    measured=measured, trial=trial, rest=latency_rest,
                )
                if self.round_to == "auto" and not self._auto_resolved:
                    self._auto_round_to = self.latency.fast_multiple(model, example_inputs, latency_model.layers)
                    self._auto_resolved = True
            cost_model = latency_model
        else:
            cost_model = CostModel(model, groups, positions=positions)
        return Analysis(
            graph=graph,
            groups=groups,
            cost_model=cost_model,
            cost=cost_model.current,
            refused=refused,
            signature=signature,
            structure=_structure(model),
        )

    def _latency_trial(
        self, model: nn.Module, graph: TracedGraph, groups: Sequence[ChannelGroup], example_inputs: Any
    ) -> tuple[list[int], float] | None:
        """Cut every group to half its width (within the caps) on trial, time the model, restore it
        (graph state included); None when the trial cut fails."""
        assert self.latency is not None
        counts = []
        snapshot = GraphSnapshot(model, graph)
        try:
            with torch.no_grad():
                for group in groups:
                    low = max(1, math.ceil((1.0 - self.max_layer_ratio) * group.positions - 1e-9))
                    kept = max(low, group.positions // 2)
                    counts.append((group.positions - kept) * group.unit)
                    if kept < group.positions:
                        group.prune(group.channels_of_positions(list(range(kept, group.positions))))
            seconds = self.latency.measure(model, example_inputs)
        except ValueError:
            raise  # a bad latency_fn
        except Exception:  # noqa: BLE001 - without a trial the rest is taken as fixed
            return None
        finally:
            snapshot.restore()
        return counts, seconds
    def scope_of(self, model: nn.Module) -> frozenset[str]:
        """The kinds of groups pruned in ``model`` (``scope``, or its default for this model)."""
        if self.scope is not None:
            return self.scope
        transformer = bool(find_attention(model)) or any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        return default_scope(transformer)

    def _scoped_groups(
        self, model: nn.Module, groups: list[ChannelGroup], ignored: Sequence[nn.Module], refused: dict[str, str]
    ) -> list[ChannelGroup]:
        """torch-pruning's groups classified, plus the attention-head groups, restricted to the scope
        (out-of-scope groups are dropped silently, also from ``refused``)."""
        scope = self.scope_of(model)
        sites = [s for s in find_attention(model) if s.module not in ignored]
        names = {m: n for n, m in model.named_modules()}
        if sites:  # torch-pruning's groups over q/k/v outputs are superseded by the head groups
            head_layers = {names[m] for m in head_projection_layers(sites)}
            groups = [g for g in groups if not any(p.is_output and p.name.rpartition(".")[0] in head_layers for p in g.slices)]
            for name in head_layers:
                refused.pop(name, None)
        blocks = [s.name.rpartition(".")[0] for s in find_attention(model)] or None
        kinds = {g.root_name: classify_group(g, model, blocks) for g in groups}
        for root in [r for r in refused if r in kinds and kinds[r] not in scope]:
            del refused[root]
        kept = [dataclasses.replace(g, kind=kinds[g.root_name]) for g in groups if kinds[g.root_name] in scope]
        if "heads" in scope:
            ignored_set = set(ignored)
            sites = [s for s in sites if not any(p.layer in ignored_set for p in s.family.projections(s.module))]
            if "embedding" in scope:  # torch-pruning cuts these heads' inner width with the token width
                sites = [s for s in sites if s.family.owns_inner_width]
            kept += head_groups(model, sites, whole_heads=self.head_pruning == "heads")
        if width_attribute_modules(model):
            kept = [dataclasses.replace(g, handle=SyncedHandle(g.handle, model)) for g in kept]
        return [dataclasses.replace(g, index=i) for i, g in enumerate(kept)]

    def fit_round_to(
        self, analysis: Analysis, target: Target, dense: Cost, original_widths: Mapping[str, int] | None = None
    ) -> RoundTo:
        """With ``round_to="auto"``: keep the multiple chosen so far only if ``target`` stays reachable
        with it (within 0.02), else the largest smaller candidate that keeps it reachable, else None (a
        narrow model cannot snap to 16 and still lose half its MACs). The largest reachable multiple is
        remembered: the candidates a step times never exceed it, so a fit that checked its final target
        here first never has to change multiple later. Per-group multiples are kept while they reach
        the target, else capped at it one by one (the candidates are powers of two, so every width
        the largest reachable multiple allows stays allowed). Returns the multiple now in force; any
        other ``round_to`` is returned as it is."""
        if self.round_to != "auto":
            return self.effective_round_to
        for multiple in [m for m in sorted(AUTO_MULTIPLES, reverse=True) if self._auto_limit and m <= self._auto_limit]:
            reachable = max_reduction(
                analysis.groups, analysis.cost_model, target, dense,
                max_layer_ratio=self.max_layer_ratio, round_to=multiple, original_widths=original_widths,
            )
            if reachable >= target.value - 0.02:
                self._auto_limit = multiple
                break
        else:
            self._auto_limit = None
        chosen = self._auto_round_to
        if isinstance(chosen, Mapping):  # per-group multiples stay as they are while they reach the target
            reachable = max_reduction(
                analysis.groups, analysis.cost_model, target, dense,
                max_layer_ratio=self.max_layer_ratio, round_to=chosen, original_widths=original_widths,
            )
            if reachable >= target.value - 0.02:
                return chosen
        self._auto_round_to = _capped(chosen, self._auto_limit)
        return self._auto_round_to

    def keep_round_to(self, multiple: RoundTo) -> None:
        """Fix ``round_to="auto"``'s multiple (e.g. the one a resumed fit's first step chose): nothing is
        measured or read from the tables for it any more. ``multiple``: a positive integer, None, or a
        mapping of root layer names to such values (per-group multiples)."""
        values = list(multiple.values()) if isinstance(multiple, Mapping) else [multiple]
        if isinstance(multiple, Mapping) and not all(isinstance(k, str) for k in multiple):
            raise ValueError(f"multiple: a mapping's keys must be root layer names, got {list(multiple)!r}")
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"multiple must be a positive integer or None (or a mapping of layer names to them), got {multiple!r}"
                )
        self._auto_round_to = dict(multiple) if isinstance(multiple, Mapping) else multiple
        self._auto_resolved = self._round_to_measured = True

    def _measures_round_to(self, target: Target) -> bool:
        return (
            self.round_to == "auto" and self.latency is not None and self.measure_round_to
            and not self._round_to_measured and target.kind != "latency"
        )

    def _plan(
        self, analysis: Analysis, scored: _Scored, target: Target, round_to: RoundTo, tolerance: float = 0.02
    ) -> Plan:
        """:func:`~lightning_prune.engine.allocation.plan_pruning` with this pruner's settings."""
        return plan_pruning(
            analysis.groups, scored.scores, analysis.cost_model, target, scored.dense,
            allocation=self.allocation, max_layer_ratio=self.max_layer_ratio, round_to=round_to,
            original_widths=scored.original_widths, normalize_scores=not self.criterion.comparable_across_layers,
            width_losses=scored.width_losses, losses_per_mac=scored.per_mac, tolerance=tolerance,
            ties=self._ties(analysis.groups, scored.original_widths) if self.uniform_per_type else None,
            at_least=isinstance(round_to, Mapping),  # per-group multiples: coarse events, never short
        )

    def _time_round_to(
        self, model: nn.Module, example_inputs: Any, target: Target, analysis: Analysis, scored: _Scored
    ) -> dict[str, float]:
        """``round_to="auto"`` with a MACs or parameter target, at the first step with a cut: the step's
        plan with free widths and with every candidate multiple that reaches the target (within 0.02),
        each cut on trial, then all timed interleaved with the step's start
        (:meth:`~lightning_prune.engine.latency.LatencyEstimator.compare`, in the ``latency_fn``'s
        runtime when it has one); :func:`~lightning_prune.engine.latency.fastest_multiple` keeps one for
        the rest of the fit (a coarser multiple only when faster than the finer ones by more than the
        estimator's ``precision``). The tables of single layers miss what whole models pay for unaligned
        widths (layout reorders between layers). A further candidate, ``"groups"``, snaps each group to
        the multiple its own costliest layer shows (:meth:`~lightning_prune.engine.latency.LatencyEstimator.group_multiples`;
        timed when the groups disagree): it is kept only when faster than the chosen multiple by more
        than that precision. Returns candidate -> seconds relative to the start; the model is left at
        the start, its graph state included."""
        assert self.latency is not None
        start = GraphSnapshot(model, analysis.graph)
        begin = ModuleSnapshot(model)
        candidates: dict[int | None | str, RoundTo] = {
            m: m for m in [None, *sorted(m for m in AUTO_MULTIPLES if self._auto_limit and m <= self._auto_limit)]
        }
        layers = getattr(analysis.cost_model, "layers", None)
        if layers:
            per_group = self.latency.group_multiples(model, analysis.groups, layers, self.max_layer_ratio)
            grouped = _capped(per_group, self._auto_limit)
            if isinstance(grouped, Mapping) and len(set(grouped.values())) > 1:
                candidates[GROUPS] = grouped
        cuts: dict[int | None | str, ModuleSnapshot] = {}
        try:
            for label, round_to in candidates.items():
                try:
                    plan = self._plan(analysis, scored, target, round_to)
                except TargetUnreachableError:
                    continue
                if plan.empty:
                    return {}  # nothing to cut at this step: the next one chooses
                if plan.reduction < target.value - 0.02:
                    continue
                with torch.no_grad():
                    apply_plan(analysis.groups, plan.removed)
                cuts[label] = ModuleSnapshot(model)
                start.restore()
            ratios = self.latency.compare(model, example_inputs, [begin.restore, *(c.restore for c in cuts.values())])
        finally:
            start.restore()
        times = dict(zip(cuts, ratios[1:]))
        margin = self.latency.precision or 0.01
        uniform = {m: t for m, t in times.items() if not isinstance(m, str)}
        chosen: int | None | str = fastest_multiple(uniform, margin) if uniform or GROUPS not in times else GROUPS
        if GROUPS in times and chosen != GROUPS and times[GROUPS] < times[chosen] * (1.0 - margin):
            chosen = GROUPS
        self.keep_round_to(candidates[chosen])
        return {("none" if m is None else str(m)): float(t) for m, t in times.items()}

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
            round_to=self.effective_round_to,
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
        analysis: Analysis | None = None,
        companions: Sequence[nn.Module | Companion] = (),
        recalibrate: Callable[[nn.Module], Any] | None = None,
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
            analysis: an analysis of ``model`` made earlier (e.g. the one the activation requests came
                from); used when the model's structure has not changed since, else the model is
                analysed afresh.
            companions: modules structurally identical to ``model`` (averaged copies: SWA's deep copy,
                an ``AveragedModel``'s ``module``), or :class:`~lightning_prune.engine.companions.Companion`
                objects for copies of a submodule; they get the same cut (the step's surgery replayed on
                them: kept channels selected, buffers included, no weight correction) inside the atomic
                section. ``AveragedModel`` submodules of ``model`` are companions without being listed.
                Their parameters never enter ``optimizers``.
            recalibrate: called with the model after the surgery, the correction and the checks,
                inside the atomic section (e.g. re-estimating BatchNorm statistics,
                :func:`~lightning_prune.engine.recalibration.recalibrate_batchnorm`); it must replace
                buffers rather than write into them, so that a failure after it can be undone.

        Raises:
            PruningError: anything failed; model, optimizers and companions are unchanged. Among
                others: a parameter of the analysed groups, or an activation statistic in
                ``context["activations"]``, holds NaN or inf (the message names the first layer or
                module; checked before scoring, see :func:`check_finite`).
        """
        started = time.perf_counter()
        snapshot = ModuleSnapshot(model)
        params_before = list(model.parameters())
        try:
            extra = as_companions(companions)
        except TypeError as error:
            raise PruningError(str(error)) from error
        snapshots = [ModuleSnapshot(c.module) for c in extra]
        try:
            with torch.inference_mode(False):
                inner = averaged_submodules(model)
                followers = inner + extra
                self._check_optimizers_exclude(optimizers, followers)
                follower_inputs = capture_companion_inputs(model, example_inputs, followers) if followers else []
                if analysis is None or not analysis.describes(model):
                    analysis = self.analyse(model, example_inputs)
                if not analysis.groups:
                    reason = "".join(f"; '{k}': {v}" for k, v in analysis.refused.items())
                    raise PruningError(f"the model has no prunable channel group left{reason}")
                check_finite(analysis.groups, context)
                self.fit_round_to(analysis, target, dense or analysis.cost, original_widths)
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
                    width_losses = self.criterion.width_losses(analysis.groups, scoring) if self.criterion_widths else None
                per_mac = self.criterion.width_losses_per_mac
                if width_losses is None and self._uses_residual_widths(scoring):
                    width_losses = width_losses_from_grams(analysis.groups, scores, scoring.activations, model, self.width_ridge)
                    per_mac = True
                scored = _Scored(scores, width_losses, per_mac, dense or analysis.cost, original_widths)
                round_to_trials: dict[str, float] = {}
                if self._measures_round_to(target):
                    round_to_trials = self._time_round_to(model, example_inputs, target, analysis, scored)
                plan = self._plan(analysis, scored, target, self.effective_round_to)
                if plan_hook is not None:
                    plan = plan_hook(plan)
                before = analysis.cost
                changes = apply_plan(analysis.groups, plan.removed) if not plan.empty else {}
                corrections = self._correct(analysis.groups, plan.removed, changes, scoring) if changes else {}
                surgery = analysis.graph.pruning_history() + _head_entries(analysis.groups, plan.removed)
                after = self._check(model, example_inputs, params_before, changes, plan, analysis.signature) or analysis.cost
                tries: list[list[float]] = []
                if self.latency is not None:
                    measured = self._paired(model, example_inputs, snapshot, before) if changes else before.latency
                    assert measured is not None
                    predicted = plan.predicted.latency if plan.predicted is not None else None
                    tries.append([target.value, float(predicted if predicted is not None else measured), measured])
                    if target.kind == "latency":
                        hit = self._hit_latency(
                            model, example_inputs, target, analysis, scored, scoring, params_before, snapshot,
                            plan_hook, tries, (plan, changes, corrections, surgery, after),
                        )
                        plan, changes, corrections, surgery, after, analysis, measured = hit
                    after = dataclasses.replace(after, latency=measured)
                for follower, inputs in zip(followers, follower_inputs):
                    cut_companion(follower, inputs, surgery, output_transform=self.output_transform)
                    check_companion_shapes(model, follower)
                recalibration_seconds = 0.0
                if recalibrate is not None:
                    started_recalibration = time.perf_counter()
                    recalibrate(model)
                    recalibration_seconds = time.perf_counter() - started_recalibration
                remaps = [prepare_optimizer_remap(opt, changes) for opt in optimizers]
        except Exception as error:
            snapshot.restore()
            for saved in snapshots:
                saved.restore()
            if isinstance(error, PruningError):
                raise
            raise PruningError(f"pruning step failed, model, optimizers and companions left unchanged: {error}") from error
        for remap in remaps:
            remap.commit()
        sync_configs(model)
        return StepResult(
            plan=plan,
            before=before,
            after=after,
            changes=changes,
            widths=layer_widths(model),
            seconds=time.perf_counter() - started,
            num_groups=len(analysis.groups),
            corrections=corrections,
            surgery=surgery,
            recalibration_seconds=recalibration_seconds,
            latency_predicted=None if plan.predicted is None else plan.predicted.latency,
            latency_measured=after.latency,
            latency_tries=tries,
            round_to=self.effective_round_to,
            round_to_trials=round_to_trials,
        )

    def _hit_latency(
        self,
        model: nn.Module,
        example_inputs: Any,
        target: Target,
        first: Analysis,
        scored: _Scored,
        scoring: ScoringContext,
        params_before: Sequence[nn.Parameter],
        snapshot: ModuleSnapshot,
        plan_hook: Callable[[Plan], Plan] | None,
        tries: list[list[float]],
        done: tuple[Plan, dict[nn.Parameter, ParameterChange], dict[str, str], list[list[Any]], Cost],
    ) -> tuple[Plan, dict[nn.Parameter, ParameterChange], dict[str, str], list[list[Any]], Cost, Analysis, float]:
        """The latency correction: while the measured reduction misses ``target`` by more than
        ``latency_tolerance``, restore the model to the step's start and re-plan with the planning
        target moved by the miss (secant steps after the first; at most ``latency_corrections`` times),
        and keep the plan closest to the target. Returns its plan, cut, analysis and measured seconds.
        Runs inside the step's atomic section.

        Every timing is noisy, so choosing the plan whose measurement came closest to the target favours
        plans measured lucky (0.497x in the step, 0.52-0.55x on re-timing: ResNet-56 at batch 64 on a
        shared CPU). So once a correction has run, the plan chosen on a single measurement is timed again
        (at most ``latency_corrections`` times per step), and a plan measured more than once is judged by
        its re-measurements only, not by the one that got it chosen; each timing is a row of ``tries``."""
        dense_seconds = scored.dense.latency
        assert self.latency is not None and dense_seconds is not None
        # per plan: its planning target, the plan, its cut (changes, corrections, surgery, cost, analysis)
        plans: list[tuple[float, Plan, tuple[Any, ...]]] = [(target.value, done[0], (*done[1:], first))]
        owner = [0]  # the plan each row of ``tries`` times
        current = 0  # the plan the model is cut to
        replans = confirmations = 0

        def seconds(i: int) -> float:
            timed = [row[2] for row, j in zip(tries, owner) if j == i]
            return sum(timed[1:]) / (len(timed) - 1) if len(timed) > 1 else timed[0]

        def reached(i: int) -> float:
            return 1.0 - seconds(i) / dense_seconds

        def measure(i: int) -> None:
            nonlocal current
            if current != i:  # redo plan i's cut (same groups, same plan)
                snapshot.restore()
                analysis = self._reanalyse(model, example_inputs, first)
                plans[i] = (plans[i][0], plans[i][1], (*self._cut(model, example_inputs, analysis, plans[i][1], params_before,
                                                                    scoring), analysis))
                current = i
            planning, plan, cut = plans[i]
            measured = self._paired(model, example_inputs, snapshot, first.cost) if cut[0] else first.cost.latency
            assert measured is not None and plan.predicted is not None and plan.predicted.latency is not None
            tries.append([planning, float(plan.predicted.latency), float(measured)])
            owner.append(i)

        while True:
            best = min(range(len(plans)), key=lambda i: (abs(target.value - reached(i)), -i))
            if len(plans) > 1 and owner.count(best) == 1 and confirmations < self.latency_corrections:
                measure(best)  # chosen on one measurement among several: time it again before trusting it
                confirmations += 1
                continue
            latest = plans[-1][1]
            if abs(target.value - reached(best)) <= self.latency_tolerance or replans >= self.latency_corrections or latest.empty:
                break
            # the planning target follows the measured miss: by the miss itself after the first plan, then
            # by the secant through the closest plans on either side of the target if any, else the last two
            planning, miss, slope = plans[-1][0], target.value - reached(len(plans) - 1), 1.0
            if len(plans) > 1:
                points = [(plans[i][0], reached(i)) for i in range(len(plans))]
                below = [t for t in points if t[1] < target.value]
                above = [t for t in points if t[1] >= target.value]
                if below and above:
                    (p0, r0), (p1, r1) = max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])
                else:
                    (p0, r0), (p1, r1) = points[-2], points[-1]
                if abs(r1 - r0) > 1e-9 and (p1 - p0) / (r1 - r0) > 0:
                    slope = (p1 - p0) / (r1 - r0)
                    planning, miss = p1, target.value - r1
            planning = min(max(planning + slope * miss, target.value - 0.25, 1e-6), target.value + 0.25, 0.999)
            snapshot.restore()
            analysis = self._reanalyse(model, example_inputs, first)
            plan = self._plan(analysis, scored, Target("latency", planning), self.effective_round_to, tolerance=1.0)
            if plan_hook is not None:
                plan = plan_hook(plan)
            plans.append((planning, plan, (*self._cut(model, example_inputs, analysis, plan, params_before, scoring), analysis)))
            current = len(plans) - 1
            replans += 1
            measure(current)
        if current != best:  # redo the best plan's cut (same groups, same plan)
            snapshot.restore()
            analysis = self._reanalyse(model, example_inputs, first)
            plan = plans[best][1]
            cut = self._cut(model, example_inputs, analysis, plan, params_before, scoring)
            return (plan, *cut, analysis, seconds(best))
        return (plans[best][1], *plans[best][2], seconds(best))

    def _paired(self, model: nn.Module, example_inputs: Any, start: ModuleSnapshot, before: Cost) -> float:
        """The cut model's seconds on the scale of the analysis' measurement of the step's start model:
        ``before.latency`` times the ratio cut / start, the two timed interleaved (the model switched
        between ``start`` and the cut by restoring snapshots: no copy), so that a machine whose speed
        changed since the analysis, or drifts while timing, does not move the result. Leaves the cut."""
        assert self.latency is not None
        if before.latency is None:
            return self.latency.measure(model, example_inputs)
        cut = ModuleSnapshot(model)
        return self.latency.relative(model, example_inputs, start.restore, cut.restore) * before.latency

    def _reanalyse(self, model: nn.Module, example_inputs: Any, first: Analysis) -> Analysis:
        """A fresh analysis of the restored model (its latency known: the step's start), checked to
        have the same groups as ``first`` so that the step's scores still apply."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnprunableGroupWarning)
            rest = getattr(first.cost_model, "rest", None)
            analysis = self.analyse(model, example_inputs, measured=first.cost.latency, latency_rest=rest)
        if [(g.root_name, g.size) for g in analysis.groups] != [(g.root_name, g.size) for g in first.groups]:
            raise PruningError("the model's channel groups changed when it was analysed again for the latency correction")
        return analysis

    def _cut(
        self,
        model: nn.Module,
        example_inputs: Any,
        analysis: Analysis,
        plan: Plan,
        params_before: Sequence[nn.Parameter],
        scoring: ScoringContext,
    ) -> tuple[dict[nn.Parameter, ParameterChange], dict[str, str], list[list[Any]], Cost]:
        """Surgery, weight correction and checks of ``plan`` (as in :meth:`step`)."""
        changes = apply_plan(analysis.groups, plan.removed) if not plan.empty else {}
        corrections = self._correct(analysis.groups, plan.removed, changes, scoring) if changes else {}
        surgery = analysis.graph.pruning_history() + _head_entries(analysis.groups, plan.removed)
        after = self._check(model, example_inputs, params_before, changes, plan, analysis.signature) or analysis.cost
        return changes, corrections, surgery, after
    @staticmethod
    def _ties(groups: Sequence[ChannelGroup], original_widths: Mapping[str, int] | None) -> list[Any]:
        """``uniform_per_type``: groups of one kind, unit and original width keep one width."""
        widths = original_widths or {}
        return [(g.kind, g.unit, g.size, max(g.size, int(widths.get(g.root_name, g.size)))) for g in groups]

    def _uses_residual_widths(self, scoring: ScoringContext) -> bool:
        if self.resolved_correction != "least_squares" or scoring.activations is None:
            return False
        return self.residual_widths

    def _correct(
        self,
        groups: Sequence[ChannelGroup],
        removed: Mapping[int, Sequence[int]],
        changes: Mapping[nn.Parameter, ParameterChange],
        scoring: ScoringContext,
    ) -> dict[str, str]:
        """The weight correction after the surgery (see ``correction``)."""
        if self.resolved_correction == "least_squares":
            if scoring.activations is None:
                raise PruningError(
                    "correction='least_squares' needs the Grams of the consumers' inputs: collect "
                    "ChannelPruner.correction_requests(groups, model) and pass context={'activations': store}"
                )
            return apply_least_squares(groups, removed, changes, scoring.activations, model=scoring.model, ridge=self.ridge)
        if self.correction is None:
            return self.criterion.correct(groups, removed, changes, scoring)
        return {}

    @staticmethod
    def _check_optimizers_exclude(optimizers: Sequence[torch.optim.Optimizer], followers: Sequence[Companion]) -> None:
        """An averaged copy's parameters in the model's optimizer would be trained, and left behind by
        the remap: refuse."""
        held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        for follower in followers:
            if any(id(p) in held for p in follower.module.parameters()):
                raise PruningError(
                    f"an optimizer holds parameters of {follower.describe()}: an averaged copy must not be trained; "
                    "build the optimizer from the model's own parameters (e.g. self.net.parameters())"
                )

    @staticmethod
    def _check(
        model: nn.Module,
        example_inputs: Any,
        params_before: Sequence[nn.Parameter],
        changes: Mapping[nn.Parameter, ParameterChange],
        plan: Plan,
        signature: Any,
    ) -> Cost | None:
        """Verify the surgery (all changes recorded, output unchanged, cost as planned); return the cost."""
        stray = unrecorded_changes(params_before, model, changes)
        if stray:
            raise PruningError(f"parameters replaced outside the recorded surgery: {stray[:5]}")
        if not changes:
            return None
        positions, after_signature = profile(model, example_inputs)
        if after_signature != signature:
            raise PruningError(
                f"pruning changed the model's output from {signature} to {after_signature}; "
                "add the layer that produces the output to ignored_layers"
            )
        measured = cost_from_positions(model, positions)
        if plan.predicted is not None and CostModel.relative_error(plan.predicted, measured) > 1e-6:
            raise PruningError(
                f"the pruned model costs {measured}, the plan predicted {plan.predicted}: a layer is pruned "
                "in a way torch-pruning's graph did not describe (register a custom pruner or ignore it)"
            )
        return measured


#: the ``round_to_trials`` entry of the per-group multiples (``round_to="auto"``)
GROUPS = "groups"


def _capped(round_to: RoundTo, limit: int | None) -> RoundTo:
    """``round_to`` with every multiple at most ``limit`` (None: no multiple is reachable, any width)."""
    if isinstance(round_to, Mapping):
        return {name: None if m is None or limit is None else min(m, limit) for name, m in round_to.items()}
    if round_to is None or limit is None:
        return None
    return min(round_to, limit)
