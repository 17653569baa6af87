"""What a pruning step does besides the cut, inside ``fit``: least-squares weight correction,
BatchNorm recalibration, and the agreement of the predictions before and after the step.

:class:`StepRepair` holds the callback's settings (``correction``, ``correction_ridge``,
``recalibrate_bn``, ``recalibrate_batches``, ``measure_agreement``) and is the callback's one
collaborator for them:

* :meth:`StepRepair.requests`: the ``"gram"`` requests the correction reads (one per consumer of
  every group), added to the collection window, for weight-only criteria too;
* :meth:`StepRepair.prepare`: before the step, draws ``recalibrate_batches`` training batches (the
  global RNG is left as it was, so a resumed fit replays exactly) and records the predicted
  classes on them; returns a :class:`StepExtras` whose ``recalibrate`` the pruner calls inside its
  atomic section and whose :meth:`StepExtras.finish` fills in the record (agreement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune._model import call_model, evaluating
from lightning_prune.collection.feeding import BatchFeeder, first_loader
from lightning_prune.engine import ChannelGroup, ChannelPruner
from lightning_prune.engine.correction import find_gram
from lightning_prune.engine.recalibration import batchnorms, recalibrate_batchnorm
from lightning_prune.reporting import PruningRecord

__all__ = ["StepExtras", "StepRepair", "agreement", "predicted_classes"]


def predicted_classes(
    pl_module: nn.Module, batches: Sequence[Any], feeder: BatchFeeder, trainer: pl.Trainer | None = None
) -> torch.Tensor | None:
    """The argmax class of every sample of ``batches`` (eval mode, no gradient), or None when the
    model's predictions are not ``(N, classes)`` tensors."""
    out = []
    with evaluating(pl_module):
        for inputs in batches:
            if trainer is not None:
                with trainer.precision_plugin.forward_context():
                    pred = feeder.predictions(call_model(pl_module, inputs))
            else:
                pred = feeder.predictions(call_model(pl_module, inputs))
            if not isinstance(pred, torch.Tensor) or pred.dim() != 2:
                return None
            out.append(pred.argmax(1))
    return torch.cat(out) if out else None


def agreement(before: torch.Tensor | None, after: torch.Tensor | None, trainer: pl.Trainer | None = None) -> float | None:
    """Share of samples whose predicted class is the same in ``before`` and ``after`` (all ranks)."""
    if before is None or after is None or before.shape != after.shape or before.numel() == 0:
        return None
    counts = torch.tensor([float((before == after).sum()), float(before.numel())], dtype=torch.float64, device=before.device)
    if trainer is not None and trainer.world_size > 1:
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
    return float(counts[0] / counts[1])


@dataclass
class StepExtras:
    """What :meth:`StepRepair.prepare` drew for one step."""

    batches: list[Any] = field(default_factory=list)
    before: torch.Tensor | None = None
    recalibrate: Any = None  #: ``recalibrate(model)`` for the pruner's atomic section, or None
    repair: StepRepair | None = None

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: PruningRecord) -> None:
        """Fill in the record: the agreement of the predictions before and after the step."""
        repair = self.repair
        if repair is not None and repair.measure_agreement and self.before is not None:
            after = predicted_classes(pl_module, self.batches, repair.feeder, trainer)
            record.agreement = agreement(self.before, after, trainer)


class StepRepair:
    """Correction, BN recalibration and agreement settings of the callback (validated here).

    Args:
        pruner: the callback's pruner (it holds ``correction`` and ``correction_ridge``).
        feeder: the callback's batch feeder (inputs of a batch, predictions of an output).
        recalibrate_bn: re-estimate every BatchNorm's running statistics after each step; None:
            on when the model has BatchNorms.
        recalibrate_batches: training batches drawn per step for the recalibration and the agreement.
        measure_agreement: log ``prune/agreement`` (share of those batches' samples whose predicted
            class is unchanged by the step).
    """

    def __init__(
        self,
        pruner: ChannelPruner,
        feeder: BatchFeeder,
        *,
        recalibrate_bn: bool | None = None,
        recalibrate_batches: int = 20,
        measure_agreement: bool = True,
    ) -> None:
        if recalibrate_bn is not None and not isinstance(recalibrate_bn, bool):
            raise ValueError(f"recalibrate_bn must be True, False or None, got {recalibrate_bn!r}")
        if isinstance(recalibrate_batches, bool) or not isinstance(recalibrate_batches, int) or recalibrate_batches < 1:
            raise ValueError(f"recalibrate_batches must be a positive integer, got {recalibrate_batches!r}")
        self.pruner = pruner
        self.feeder = feeder
        self.recalibrate_bn = recalibrate_bn
        self.recalibrate_batches = recalibrate_batches
        self.measure_agreement = bool(measure_agreement)

    @property
    def corrects(self) -> bool:
        """Whether the step applies the least-squares correction (so Grams must be collected)."""
        return self.pruner.resolved_correction == "least_squares"

    def requests(self, groups: Sequence[ChannelGroup], model: nn.Module, collected: Sequence[Any] = ()) -> list[Any]:
        """The correction's Gram requests not already among ``collected`` (the criterion's own)."""

        class _Store:  # find_gram's view of the requests already collected
            def table(self, statistic: str) -> dict[Any, Any]:
                return {r: r for r in collected if r.statistic == statistic}

        return [r for r in self.pruner.correction_requests(groups, model) if find_gram(_Store(), r) is None]

    def recalibrates(self, model: nn.Module) -> bool:
        return bool(batchnorms(model)) if self.recalibrate_bn is None else self.recalibrate_bn

    def _draw(self, trainer: pl.Trainer) -> list[Any]:
        """``recalibrate_batches`` training batches (model inputs, on the device); the global RNG is untouched."""
        loader = first_loader(trainer.train_dataloader)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        batches = []
        with torch.random.fork_rng(devices=devices):
            for index, batch in enumerate(loader):
                if index >= self.recalibrate_batches:
                    break
                batches.append(self.feeder.input_fn(trainer.strategy.batch_to_device(batch)))
        return batches

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StepExtras:
        """Draw the step's batches and record the predictions before it (when either is on)."""
        recalibrate = self.recalibrates(pl_module)
        if not (recalibrate or self.measure_agreement):
            return StepExtras(repair=self)
        batches = self._draw(trainer)
        extras = StepExtras(batches=batches, repair=self)
        if self.measure_agreement:
            extras.before = predicted_classes(pl_module, batches, self.feeder, trainer)
        if recalibrate:

            def forward(model: nn.Module, inputs: Any) -> Any:
                with trainer.precision_plugin.forward_context():
                    return call_model(model, inputs)

            extras.recalibrate = lambda model: recalibrate_batchnorm(model, batches, forward)  # every rank: all-reduce
        return extras
