"""The criterion protocol: what the pruning engine asks of a scoring method.

It lives with the engine, below every criterion: the engine imports no criterion and no
registry; criteria import these types (and the engine's channel groups) for real.

A criterion turns channel groups into importance scores, one tensor per group with one entry per
channel (higher = more important). It declares what it needs in :class:`Requirements`; the
callback provides it through the :class:`ScoringContext`: the model and its dependency graph
always; collected activations, labels and a way to run extra forward passes when asked for.

Two base classes cover most criteria:

* :class:`Criterion`: scores all groups at once (a criterion fitting one model over the whole
  network, such as PLS + VIP, overrides :meth:`Criterion.score`);
* :class:`GroupCriterion`: scores each group on its own (:meth:`GroupCriterion.score_group`).

Example, a criterion that keeps the channels whose filters have the largest mean value::

    import torch
    from lightning_prune.criteria import GroupCriterion, register_criterion

    @register_criterion("mean_weight")
    class MeanWeight(GroupCriterion):
        def score_group(self, group, context):
            rows = [s.per_channel(group.size) for s in group.slices if s.is_output]
            return torch.stack([r.mean(1) for r in rows if r is not None]).mean(0)

    # StructuredPruningCallback(criterion="mean_weight", ...) or criterion=MeanWeight()
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_prune.collection import ActivationRequest, ActivationStore
from lightning_prune.engine.allocation import Allocation
from lightning_prune.engine.graph import ChannelGroup
from lightning_prune.engine.tp_adapter import TracedGraph

__all__ = ["Criterion", "GroupCriterion", "Progress", "Requirements", "ScoringContext", "no_progress", "tqdm_progress"]

#: ``progress(total, description)``: a context manager that yields ``update(advance=1)``; how long
#: scoring work reports progress (the callback passes one that follows the Trainer's progress bar).
Progress = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]


def _ignore(advance: int = 1) -> None:
    return None


@contextlib.contextmanager
def no_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A :data:`Progress` that shows nothing."""
    yield _ignore


@contextlib.contextmanager
def tqdm_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A :data:`Progress` drawn by tqdm (outside a Trainer)."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, leave=False) as bar:
        yield bar.update


@dataclass(frozen=True)
class Requirements:
    """What a criterion needs beyond the weights.

    Attributes:
        activations: pooled activations of the prunable layers, collected during training.
        labels: the labels of the collected samples (implies ``activations``).
        forward_passes: a callable to run extra (masked) forward passes on held-out batches.
    """

    activations: bool = False
    labels: bool = False
    forward_passes: bool = False

    @property
    def collects_activations(self) -> bool:
        """Whether the callback collects activation statistics before each step (labels alone, without
        held-out forward passes, are collected with the activations)."""
        return bool(self.activations or (self.labels and not self.forward_passes))


@dataclass
class ScoringContext:
    """Everything a criterion may use to score one pruning step.

    Attributes:
        model: the model being pruned (in its current, possibly already pruned, shape).
        example_inputs: inputs that the model accepts (used for tracing).
        graph: the traced dependency graph of ``model``.
        generator: a seeded CPU generator; criteria that sample must draw from it.
        step: index of the pruning step (0 for the first).
        activations: collected statistics, when the criterion requires them.
        labels: labels of the collected samples, when required.
        forward: runs the model on held-out batches, when ``forward_passes`` is required: a callable
            ``forward(loss_fn) -> float`` (the mean loss over the batches, the same on every rank). The
            callback passes a :class:`~lightning_prune.collection.feeding.HeldoutEvaluation`, which also
            has ``evaluate_batched(per_sample_loss_fn, repeats)`` (each batch repeated ``repeats``
            times in one pass, one mean loss per block) and the held-out sizes; a plain callable is
            enough for criteria that only call it.
        progress: how long work shows progress (None: the criterion decides, e.g. its own tqdm bar).
        extras: free-form data for user criteria.
    """

    model: nn.Module
    example_inputs: Any
    graph: TracedGraph
    generator: torch.Generator
    step: int = 0
    activations: ActivationStore | None = None
    labels: torch.Tensor | None = None
    forward: Callable[..., float] | None = None
    progress: Progress | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Criterion(abc.ABC):
    """Base class of all criteria. Subclasses set :attr:`name` and implement :meth:`score`.

    Attributes:
        name: the registry name (set by :func:`~lightning_prune.criteria.register_criterion`).
        requirements: what the callback must collect for this criterion.
        comparable_across_layers: True when scores of different groups share one scale (a
            global model such as PLS); otherwise a global ranking first divides each group's scores
            by their mean magnitude.
        default_allocation: the allocation used when the callback is given none.
        width_losses_per_mac: the allocation divides each width step's loss by the MACs it saves
            (cheapest loss per MAC first) instead of using the loss itself.
        default_correction: the weight correction used when the pruner is given none:
            ``"none"`` (default: the criterion's :meth:`correct`, a no-op unless overridden) or
            ``"least_squares"`` (:mod:`lightning_prune.engine.correction`).
        heldout_batches: how many held-out batches ``context.forward`` evaluates (criteria with
            ``requirements.forward_passes``); the callback keeps that many.
    """

    name: ClassVar[str] = ""
    requirements: ClassVar[Requirements] = Requirements()
    comparable_across_layers: ClassVar[bool] = False
    default_allocation: ClassVar[Allocation] = "uniform"
    width_losses_per_mac: ClassVar[bool] = False
    default_correction: ClassVar[str] = "none"

    @property
    def heldout_batches(self) -> int:
        """Held-out batches the criterion's forward passes need (default 4)."""
        return 4

    def activation_requests(self, groups: Sequence[ChannelGroup]) -> list[ActivationRequest]:
        """The statistics to collect for ``groups`` (only called when ``requirements.activations``).

        The callback collects them during the window before each step and passes the result as
        ``context.activations`` (an :class:`~lightning_prune.collection.ActivationStore`, looked up
        with the same requests).
        """
        return []

    def correct(
        self,
        groups: Sequence[ChannelGroup],
        removed: Mapping[int, Sequence[int]],
        changes: Mapping[Any, Any],
        context: ScoringContext,
    ) -> dict[str, str]:
        """Optional: adjust the pruned weights after the surgery (e.g. let consumers absorb the removed
        channels), inside the step's atomic section. ``removed`` maps group index -> removed root
        channels, ``changes`` old parameter -> :class:`~lightning_prune.engine.surgery.ParameterChange`.
        Returns a note per group root (kept in the step's record). Default: no correction.
        """
        return {}

    def width_losses(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor] | None:
        """Optional: what each group loses at each width, to drive the allocation.

        Return one tensor per group with ``group.positions + 1`` entries: entry ``k`` is the loss of
        keeping ``k`` positions (non-increasing in ``k``, 0 at full width). Losses must be
        comparable across groups: the allocation then shrinks, step by step, the group whose next
        width loses least, until the target is met (overriding ``"uniform"``/``"global"``).
        """
        return None

    @classmethod
    def has_width_rule(cls) -> bool:
        """Whether the criterion chooses widths itself (it overrides :meth:`width_losses`), so that
        ``allocation`` has no effect unless ``criterion_widths=False``."""
        return cls.width_losses is not Criterion.width_losses

    @abc.abstractmethod
    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        """One importance tensor per group, ``group.size`` entries each; higher is more important."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class GroupCriterion(Criterion):
    """A criterion that scores each channel group independently."""

    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        return [self.score_group(group, context) for group in groups]

    @abc.abstractmethod
    def score_group(self, group: ChannelGroup, context: ScoringContext) -> torch.Tensor:
        """Importance of each of ``group.size`` channels."""
