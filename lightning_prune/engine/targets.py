"""What a pruning step aims at: a reduction of one measured quantity relative to the dense model.

Each kind of target is one :class:`TargetKind` subclass that knows how to measure a model (or the
plan of one, evaluated without surgery by the cost model) and how to name itself. Adding a kind is
one subclass here, registered in :data:`TARGET_KINDS`, plus the callback argument that selects it.

=============  ==============================  ==========================================
kind           callback argument               amount measured
=============  ==============================  ==========================================
``"flops"``    ``target_flops_reduction``      MACs per sample of the whole model
``"params"``   ``target_params_reduction``     parameters of the whole model
``"channels"`` ``channel_ratio``               output channels of the prunable groups
``"latency"``  ``target_latency_reduction``    measured seconds per forward pass
=============  ==============================  ==========================================

The latency of a plan comes from :class:`~lightning_prune.engine.latency.LatencyCostModel`
(``Cost.latency``); a cost without one cannot be measured against a latency target.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lightning_prune.engine.cost import Cost

__all__ = ["TARGET_KINDS", "Target", "TargetKind", "TargetKindName", "check_fraction", "target_from_arguments"]

TargetKindName = Literal["flops", "params", "channels", "latency"]


class TargetKind(abc.ABC):
    """One measurable quantity a target reduces.

    Attributes:
        name: the kind's name in :class:`Target` and in step records.
        argument: the :class:`~lightning_prune.StructuredPruningCallback` argument that selects it.
        noun: how messages name the quantity.
    """

    name: ClassVar[str]
    argument: ClassVar[str]
    noun: ClassVar[str]

    @abc.abstractmethod
    def amount(self, cost: Cost, channels: int) -> float:
        """The quantity for a model (or a plan) of cost ``cost`` keeping ``channels`` prunable channels."""

    def reduction(self, cost: Cost, channels: int, dense: Cost, dense_channels: int) -> float:
        """The fraction of the dense model's amount that is gone."""
        return 1.0 - self.amount(cost, channels) / max(1.0, self.amount(dense, dense_channels))


class _Flops(TargetKind):
    name, argument, noun = "flops", "target_flops_reduction", "MACs"

    def amount(self, cost: Cost, channels: int) -> float:
        return float(cost.macs)


class _Params(TargetKind):
    name, argument, noun = "params", "target_params_reduction", "parameters"

    def amount(self, cost: Cost, channels: int) -> float:
        return float(cost.params)


class _Channels(TargetKind):
    name, argument, noun = "channels", "channel_ratio", "prunable channels"

    def amount(self, cost: Cost, channels: int) -> float:
        return float(channels)


class _Latency(TargetKind):
    name, argument, noun = "latency", "target_latency_reduction", "measured latency"

    def amount(self, cost: Cost, channels: int) -> float:
        if cost.latency is None:
            raise ValueError("a latency target needs costs with a latency (a LatencyCostModel, see engine/latency.py)")
        return float(cost.latency)

    def reduction(self, cost: Cost, channels: int, dense: Cost, dense_channels: int) -> float:
        return 1.0 - self.amount(cost, channels) / self.amount(dense, dense_channels)


#: Every kind of target, by name.
TARGET_KINDS: dict[str, TargetKind] = {kind.name: kind for kind in (_Flops(), _Params(), _Channels(), _Latency())}


@dataclass(frozen=True)
class Target:
    """A reduction relative to the dense model: ``value`` of the MACs, parameters or channels.

    Example::

        Target("flops", 0.5)  # remove half of the dense model's MACs
    """

    kind: TargetKindName
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}")

    @property
    def metric(self) -> TargetKind:
        """The quantity this target reduces."""
        return TARGET_KINDS[self.kind]

    def describe(self) -> str:
        return f"{self.value:.1%} of the {self.metric.noun}"


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1), or a ``ValueError`` naming the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    return float(value)


def target_from_arguments(arguments: Mapping[str, float | None]) -> Target:
    """The one target among the callback's target arguments (``{argument name: value or None}``).

    Raises:
        ValueError: none or several are given, or the value is not a fraction in (0, 1).
    """
    by_argument = {kind.argument: kind for kind in TARGET_KINDS.values()}
    given = {name: value for name, value in arguments.items() if value is not None}
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of {', '.join(by_argument)}; "
            f"got {', '.join(f'{k}={v}' for k, v in given.items()) or 'none'}"
        )
    name, value = next(iter(given.items()))
    return Target(by_argument[name].name, check_fraction(name, value))  # type: ignore[arg-type]  # names come from TARGET_KINDS
