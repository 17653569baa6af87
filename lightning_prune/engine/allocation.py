"""Width allocation: how many channels each group keeps, and which ones.

Every admissible shrink of a group (one position, or a block when ``round_to`` asks for
multiples) is a *removal event*. Events are put in one order, then the shortest prefix of that
order that meets the target is taken, found by bisection on the exact :class:`CostModel`:

* ``"uniform"``: events ordered by the fraction of the group removed after them, so that every
  group loses the same fraction of its original width (to within one channel);
* ``"global"``: events ordered by the (per-group normalised) scores of the channels they remove,
  one ranking across layers.

With a latency target (``Target("latency", ...)`` and a
:class:`~lightning_prune.engine.latency.LatencyCostModel`), ``"global"`` events (and width-loss events)
are ordered by *importance per second saved*: the normalised scores (or the width loss) of what the
group has lost after the event, divided by the seconds the latency tables say the group's layers save
(both counted from the current width, running maximum), so the budget goes where it costs the least
importance per second; the prefix is then chosen on the latency model like any other metric.

Inside a group the lowest-scored positions always go first. Caps: a group keeps at least
``1 - max_layer_ratio`` of its *original* width and never fewer than one position. The chosen
prefix is the one whose reduction is closest to the target among the two that bracket it, so
the error is at most half the cost of one event. With ``at_least``, a prefix that falls short by
more than ``tolerance`` is not taken: the later events follow in order as long as each keeps the
reduction within ``tolerance`` above the target (a group whose next block would overshoot stops
there), else the longer bracketing prefix is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from lightning_prune.engine.cost import Cost, CostModel
from lightning_prune.engine.graph import ChannelGroup
from lightning_prune.engine.targets import Target

__all__ = [
    "ALLOCATIONS", "Allocation", "Plan", "RoundTo", "Target", "TargetUnreachableError",
    "max_reduction", "multiple_of", "plan_pruning",
]

Allocation = Literal["uniform", "global"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)  #: the valid ``allocation`` names
#: What kept widths snap to: one multiple for every group, one per group (root layer name -> multiple,
#: None or a missing name: any width), or None (any width).
RoundTo = int | Mapping[str, int | None] | None


def multiple_of(group: ChannelGroup, round_to: RoundTo) -> int | None:
    """The multiple ``group``'s kept width snaps to under ``round_to`` (None: any width)."""
    if isinstance(round_to, Mapping):
        return round_to.get(group.root_name)
    return round_to


class TargetUnreachableError(ValueError):
    """The caps (``max_layer_ratio``, ``round_to``, ignored layers) do not allow the target."""


@dataclass
class Plan:
    """What one pruning step removes: root-channel indices per group index."""

    removed: dict[int, list[int]] = field(default_factory=dict)
    predicted: Cost | None = None
    reduction: float = 0.0  #: the achieved value of the target's metric (predicted)

    @property
    def empty(self) -> bool:
        return not any(self.removed.values())


@dataclass(frozen=True)
class _Event:
    key: float
    group: int
    order: int
    kept_positions: int


def _allowed_widths(group: ChannelGroup, original_size: int, max_layer_ratio: float, round_to: RoundTo) -> list[int]:
    """Admissible kept-position counts, descending, starting with the current width."""
    multiple = multiple_of(group, round_to)
    g = group.unit
    current = group.positions
    min_channels = max(g, math.ceil((1.0 - max_layer_ratio) * original_size - 1e-9))
    min_positions = max(1, math.ceil(min_channels / g))
    allowed = [current]
    for kept in range(current - 1, min_positions - 1, -1):
        if multiple and (kept * g) % multiple:
            continue
        allowed.append(kept)
    return allowed


def _position_scores(group: ChannelGroup, scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().double().flatten().cpu()
    if scores.numel() != group.size:
        raise ValueError(
            f"criterion returned {scores.numel()} scores for group '{group.root_name}' of {group.size} channels"
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"criterion returned non-finite scores for group '{group.root_name}'")
    return group.position_scores(scores)


def _events(
    groups: Sequence[ChannelGroup],
    position_scores: Sequence[torch.Tensor],
    original_sizes: Sequence[int],
    allocation: Allocation,
    max_layer_ratio: float,
    round_to: RoundTo,
    normalize: bool,
    width_losses: Sequence[torch.Tensor] | None = None,
    macs_per_channel: Sequence[float] | None = None,
    seconds_saved: Callable[[int, int], float] | None = None,
) -> tuple[list[_Event], list[torch.Tensor]]:
    events: list[_Event] = []
    orders: list[torch.Tensor] = []
    for gi, (group, pos_scores, original) in enumerate(zip(groups, position_scores, original_sizes)):
        order = torch.argsort(pos_scores, stable=True)  # lowest score first
        orders.append(order)
        widths = _allowed_widths(group, original, max_layer_ratio, round_to)
        ranked = pos_scores[order]
        if normalize:
            scale = ranked.abs().mean()
            ranked = ranked / scale if scale > 0 else ranked
        running = -math.inf
        for k in range(1, len(widths)):
            if seconds_saved is not None:  # importance per second saved, both from the current width
                removed = group.positions - widths[k]
                if width_losses is not None:
                    lost = float(width_losses[gi][widths[k]]) - float(width_losses[gi][group.positions])
                else:
                    lost = float(ranked[:removed].sum())
                saved = seconds_saved(gi, removed * group.unit)
                running = max(running, lost / saved if saved > 0 else math.inf)
                key = running
            elif width_losses is not None:
                loss = float(width_losses[gi][widths[k]])
                if macs_per_channel is not None:  # loss added per MAC saved by this event
                    added = loss - float(width_losses[gi][widths[k - 1]])
                    saved = (widths[k - 1] - widths[k]) * group.unit * macs_per_channel[gi]
                    loss = added / saved if saved > 0 else math.inf
                running = max(running, loss)
                key = running
            elif allocation == "uniform":
                key = 1.0 - widths[k] * group.unit / original
            else:
                chunk = ranked[group.positions - widths[k - 1] : group.positions - widths[k]]
                running = max(running, float(chunk.mean()))
                key = running
            events.append(_Event(key=key, group=gi, order=k, kept_positions=widths[k]))
    events.sort(key=lambda e: (e.key, e.group, e.order))
    return events, orders


class _Prefix:
    """Evaluates the plan made of the first ``m`` events."""

    def __init__(self, groups, events, cost_model, target, dense, original_sizes, ties=None):
        self.groups = groups
        self.events = events
        self.cost_model = cost_model
        self.target = target
        self.dense = dense
        self.original_total = sum(original_sizes)
        self.ties = _tie_classes(ties) if ties is not None else []

    def kept(self, m: int) -> list[int]:
        kept = [g.positions for g in self.groups]
        for event in self.events[:m]:
            kept[event.group] = event.kept_positions
        return self.tied(kept)

    def tied(self, kept: list[int]) -> list[int]:
        for members in self.ties:  # tied groups all take the narrowest width any of them reached
            narrowest = min(kept[i] for i in members)
            for i in members:
                kept[i] = narrowest
        return kept

    def __call__(self, m: int) -> tuple[float, Cost, list[int]]:
        return self.evaluate(self.kept(m))

    def evaluate(self, kept: list[int]) -> tuple[float, Cost, list[int]]:
        removed = [(g.positions - k) * g.unit for g, k in zip(self.groups, kept)]
        cost = self.cost_model.evaluate(removed)
        kept_channels = sum(k * g.unit for g, k in zip(self.groups, kept))
        return self.target.metric.reduction(cost, kept_channels, self.dense, self.original_total), cost, kept


def _filled(prefix: _Prefix, start: int, target: float, tolerance: float) -> tuple[float, Cost, list[int]] | None:
    """The first ``start`` events, then the later ones in order while they keep the reduction at most
    ``tolerance`` above ``target``: a group whose next event would overshoot takes none of its later
    ones (its blocks are too coarse here), the others go on. The first plan that meets the target, or
    None when the events run out short of it."""
    kept = prefix.kept(start)
    blocked: set[int] = set()
    for event in prefix.events[start:]:
        if event.group in blocked:
            continue
        trial = list(kept)
        trial[event.group] = event.kept_positions
        value, cost, tied = prefix.evaluate(prefix.tied(trial))
        if value > target + tolerance:
            blocked.add(event.group)
            continue
        kept = trial
        if value >= target:
            return value, cost, tied
    return None


def _tie_classes(ties: Sequence[Hashable]) -> list[list[int]]:
    """Indices of the groups sharing each tie key (classes of two or more)."""
    classes: dict[Hashable, list[int]] = {}
    for index, key in enumerate(ties):
        classes.setdefault(key, []).append(index)
    return [members for members in classes.values() if len(members) > 1]


def _original_sizes(groups: Sequence[ChannelGroup], original_widths: Mapping[str, int] | None) -> list[int]:
    widths = original_widths or {}
    return [max(g.size, int(widths.get(g.root_name, g.size))) for g in groups]


def max_reduction(
    groups: Sequence[ChannelGroup],
    cost_model: CostModel,
    target: Target,
    dense: Cost,
    *,
    max_layer_ratio: float,
    round_to: RoundTo,
    original_widths: Mapping[str, int] | None = None,
) -> float:
    """The largest reduction of ``target``'s metric that the caps allow."""
    originals = _original_sizes(groups, original_widths)
    flat = [torch.zeros(g.positions) for g in groups]
    events, _ = _events(groups, flat, originals, "uniform", max_layer_ratio, round_to, False)
    prefix = _Prefix(groups, events, cost_model, target, dense, originals)
    return prefix(len(events))[0]


def plan_pruning(
    groups: Sequence[ChannelGroup],
    scores: Sequence[torch.Tensor],
    cost_model: CostModel,
    target: Target,
    dense: Cost,
    *,
    allocation: Allocation = "uniform",
    max_layer_ratio: float = 0.9,
    round_to: RoundTo = None,
    original_widths: Mapping[str, int] | None = None,
    normalize_scores: bool = True,
    width_losses: Sequence[torch.Tensor] | None = None,
    losses_per_mac: bool = False,
    tolerance: float = 0.02,
    ties: Sequence[Hashable] | None = None,
    at_least: bool = False,
) -> Plan:
    """Choose the channels to remove so that the model meets ``target`` (relative to ``dense``).

    Args:
        groups: the channel groups of the current model.
        scores: one importance tensor per group (higher = more important), ``group.size`` long.
        cost_model: the exact cost model of the current model.
        target: the cumulative reduction to reach, relative to ``dense``.
        dense: the cost of the unpruned model.
        allocation: ``"uniform"`` or ``"global"``.
        max_layer_ratio: largest fraction of a group's original width that may be removed.
        round_to: kept widths are multiples of this (a group may also stay untouched); a mapping
            gives each group's multiple by its root layer name (a name it lacks: any width).
        original_widths: root layer name -> width in the dense model (defaults to the current one).
        normalize_scores: divide each group's scores by their mean magnitude before a global
            ranking (for criteria whose scores are not comparable across layers).
        width_losses: per group, the loss of keeping ``k`` positions (``positions + 1`` entries);
            when given, events are ordered by it instead of by ``allocation`` (criteria with their
            own width rule, such as PCA).
        losses_per_mac: order width-loss events by the loss they add per MAC they save (each
            group's marginal MACs per channel, from ``cost_model``) instead of by the loss itself.
        tolerance: how far below the target the best plan may fall before it is an error.
        ties: one key per group, or None; groups with equal keys always keep the same number of
            positions (the narrowest any of them would keep), e.g. one width per layer type so that
            a model's configuration can describe it. The lowest-scored positions of each go.
        at_least: never fall short of the target by more than ``tolerance``: when the closer of the
            two bracketing prefixes does, later events fill the gap in order, skipping the groups
            whose next block would overshoot by more than ``tolerance`` (coarse events, such as
            multiples of 16 on a 64-wide residual stream, miss the target by up to half of one
            otherwise); failing that, the longer prefix. Default False: the closer one.

    Raises:
        TargetUnreachableError: when even removing everything the caps allow falls short.
    """
    if len(scores) != len(groups):
        raise ValueError(f"expected {len(groups)} score tensors, got {len(scores)}")
    originals = _original_sizes(groups, original_widths)
    position_scores = [_position_scores(g, s) for g, s in zip(groups, scores)]
    if width_losses is not None:
        if len(width_losses) != len(groups) or any(len(w) != g.positions + 1 for w, g in zip(width_losses, groups)):
            raise ValueError("width_losses must hold, per group, one loss per kept width 0..positions")
    macs_per_channel = None
    if width_losses is not None and losses_per_mac:
        current = cost_model.current.macs
        macs_per_channel = []
        for gi, group in enumerate(groups):
            removed = [0] * len(groups)
            removed[gi] = group.unit
            saved = current - cost_model.evaluate(removed).macs
            macs_per_channel.append(max(saved, 1) / group.unit / max(1, dense.macs))
    group_saving = getattr(cost_model, "group_saving", None)
    per_second = target.kind == "latency" and group_saving is not None and (allocation == "global" or width_losses is not None)
    events, orders = _events(
        groups,
        position_scores,
        originals,
        allocation,
        max_layer_ratio,
        round_to,
        normalize_scores and allocation == "global",
        width_losses,
        macs_per_channel,
        group_saving if per_second else None,
    )
    if ties is not None and len(ties) != len(groups):
        raise ValueError(f"ties must hold one key per group ({len(groups)}), got {len(ties)}")
    prefix = _Prefix(groups, events, cost_model, target, dense, originals, ties)

    lo_value, lo_cost, _ = prefix(0)
    if lo_value >= target.value:
        return Plan(predicted=lo_cost, reduction=lo_value)
    hi_value, _, _ = prefix(len(events))
    if hi_value < target.value - tolerance:
        raise TargetUnreachableError(
            f"cannot remove {target.describe()}: with max_layer_ratio={max_layer_ratio} and round_to={round_to} "
            f"at most {hi_value:.1%} can go. Lower the target, raise max_layer_ratio, or ignore fewer layers."
        )
    lo, hi = 0, len(events)  # value(lo) < target <= value(hi) (or hi is everything)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if prefix(mid)[0] >= target.value:
            hi = mid
        else:
            lo = mid
    candidates = [prefix(lo) + (lo,), prefix(hi) + (hi,)]
    value, cost, kept, _ = min(candidates, key=lambda c: (abs(c[0] - target.value), -c[3]))
    if at_least and value < target.value - tolerance:  # coarse events: fill the gap with finer ones
        value, cost, kept = _filled(prefix, lo, target.value, tolerance) or candidates[1][:3]

    plan = Plan(predicted=cost, reduction=value)
    for gi, (group, order, k) in enumerate(zip(groups, orders, kept)):
        if k < group.positions:
            drop = order[: group.positions - k].tolist()
            plan.removed[gi] = group.channels_of_positions(drop)
    return plan
