"""Which averaged copies a Trainer holds: the modules to cut along with the pruned model.

Weight averaging keeps a second copy of the model's tensors, at the dense shapes until someone cuts
it:

* ``StochasticWeightAveraging``: a deep copy of the LightningModule (``_average_model``), made in its
  ``setup``; at the end of fit its values are copied into the model (shapes must match);
* ``WeightAveraging`` / ``EMAWeightAveraging``: an ``AveragedModel`` of the LightningModule
  (``_average_model.module``), swapped in for validation and copied into the model at the end;
* any other callback holding a ``torch.optim.swa_utils.AveragedModel`` as an attribute;
* ``AveragedModel`` objects the LightningModule holds: as submodules (found and cut by the engine
  itself, :func:`lightning_prune.engine.companions.averaged_submodules`, so ``load_pruned`` cuts them
  too) or in plain attributes / lists / dicts that are not submodules (found here).

:func:`averaged_copies` returns them as :class:`~lightning_prune.engine.companions.Companion` objects
(the part of the model each one copies); :func:`check_averaging` refuses, with a message naming the
callback and the way out, a copy that does not follow the model's structure or whose parameters an
optimizer trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_prune.engine.companions import Companion, CompanionError, averaged_part, averaged_submodules, structure_signature

try:  # Lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - older Lightning: no WeightAveraging
    WeightAveraging = None  # type: ignore[assignment,misc]  # absent in this Lightning

__all__ = ["averaged_copies", "check_averaging"]


def _companion(pl_module: nn.Module, module: nn.Module, label: str) -> Companion:
    if structure_signature(module) == structure_signature(pl_module):
        return Companion(module, prefix="", name=label)
    return Companion(module, prefix=averaged_part(pl_module, module, label), name=label)


def _held(value: Any, depth: int = 0) -> Iterator[AveragedModel]:
    if isinstance(value, AveragedModel):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _held(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _held(item, depth + 1)


def _callback_copies(callback: Callback) -> Iterator[tuple[str, nn.Module]]:
    name = type(callback).__name__
    if isinstance(callback, StochasticWeightAveraging):
        average = getattr(callback, "_average_model", None)
        if isinstance(average, nn.Module):
            yield f"{name}'s averaged copy (_average_model)", average
        return
    if WeightAveraging is not None and isinstance(callback, WeightAveraging):
        average = getattr(callback, "_average_model", None)
        if isinstance(average, AveragedModel):
            yield f"{name}'s averaged copy (_average_model.module)", average.module
        return
    for attr, value in vars(callback).items():
        for average in _held(value):
            yield f"{name}.{attr} (an AveragedModel)", average.module


def averaged_copies(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Companion]:
    """The averaged copies to cut with ``pl_module``, except its ``AveragedModel`` submodules (the engine
    cuts those itself).

    Raises:
        CompanionError: a copy matches neither the whole model nor exactly one part of it.
    """
    from lightning_prune.callback import StructuredPruningCallback

    found: list[Companion] = []
    seen: set[int] = set()
    for callback in list(getattr(trainer, "callbacks", [])):
        if isinstance(callback, StructuredPruningCallback):
            continue
        for label, module in _callback_copies(callback):
            if id(module) not in seen:
                seen.add(id(module))
                found.append(_companion(pl_module, module, label))
    submodules = {id(m) for m in pl_module.modules()}
    for attr, value in vars(pl_module).items():
        if attr in ("_modules", "_parameters", "_buffers"):
            continue
        for average in _held(value):
            if id(average) not in submodules and id(average.module) not in seen:
                seen.add(id(average.module))
                found.append(_companion(pl_module, average.module, f"{type(pl_module).__name__}.{attr} (an AveragedModel)"))
    return found


def check_averaging(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizers: bool = False) -> None:
    """Refuse averaged copies that lightning-prune cannot keep in step with the model (``ValueError``).

    Args:
        optimizers: also check that no optimizer of the trainer holds a copy's parameters (once the
            optimizers exist: ``on_fit_start``).
    """
    try:
        copies = averaged_submodules(pl_module) + averaged_copies(trainer, pl_module)
    except CompanionError as error:
        raise ValueError(f"StructuredPruningCallback cannot prune alongside weight averaging here: {error}") from error
    if not optimizers:
        return
    held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    for copy in copies:
        if any(id(p) in held for p in copy.module.parameters()):
            raise ValueError(
                f"StructuredPruningCallback: an optimizer holds parameters of {copy.describe()}; an averaged copy must "
                "not be trained (and would keep its dense shapes in the optimizer). Build the optimizer from the "
                "model's own parameters, e.g. torch.optim.SGD(self.net.parameters(), ...)"
            )
