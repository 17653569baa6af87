"""Feeding a criterion from the fit's batches: labels, held-out batches, masked evaluations, and the
dedicated collection pass before a start-of-training step.

:class:`BatchFeeder` is what the callback delegates every batch-level job to. It knows how to get
inputs and labels out of a batch (``input_fn`` / ``label_fn``), how to read predictions from the
model's output (``output_transform``), keeps the held-out batches a criterion with forward passes
needs, and builds the evaluation function such a criterion calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_prune._batch import detach
from lightning_prune._model import call_model, eval_forward, evaluating
from lightning_prune.collection.collector import ActivationCollector

__all__ = ["BatchFeeder", "first_loader"]

#: Length of the dedicated collection pass of a start-of-training step, when collect_batches is None.
START_PASS_BATCHES = 32


def first_loader(loaders: Any) -> Any:
    """The first dataloader of what a ``*_dataloader`` hook returned (one loader, a dict or a list)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()))
    if isinstance(loaders, (list, tuple)):
        return loaders[0]
    return loaders


class BatchFeeder:
    """Inputs, labels and held-out batches for one criterion.

    Args:
        criterion_name: for messages.
        needs_labels: whether the criterion reads labels (a batch without them is an error).
        heldout_batches: how many held-out batches masked evaluations use.
        input_fn: batch -> model input.
        label_fn: batch -> labels (or None when the batch has none).
        output_transform: model output -> predictions (None: the output itself).
    """

    def __init__(
        self,
        criterion_name: str,
        *,
        needs_labels: bool,
        heldout_batches: int,
        input_fn: Callable[[Any], Any],
        label_fn: Callable[[Any], Any],
        output_transform: Callable[[Any], Any] | None,
    ) -> None:
        self.criterion_name = criterion_name
        self.needs_labels = needs_labels
        self.heldout_batches = heldout_batches
        self.input_fn = input_fn
        self.label_fn = label_fn
        self.output_transform = output_transform
        self._cached: deque[tuple[Any, Any]] = deque(maxlen=heldout_batches)

    # ------------------------------------------------------------------ outputs
    def predictions(self, output: Any) -> Any:
        """The predictions (logits) in a model output."""
        return self.output_transform(output) if self.output_transform is not None else output

    def traceable(self, output: Any) -> Any:
        """What torch-pruning traces: every output when it can walk them (tensors, dicts, lists, tuples),
        so that no layer producing any of them is pruned; otherwise ``output_transform(output)``."""
        if isinstance(output, (torch.Tensor, Mapping, list, tuple)):
            return output
        return self.predictions(output)

    def output_width(self, pl_module: pl.LightningModule, inputs: Any) -> int | None:
        """Width of the model's predictions on ``inputs`` (the class count of a classifier)."""
        output = self.predictions(eval_forward(pl_module, inputs))
        return int(output.shape[-1]) if isinstance(output, torch.Tensor) and output.dim() == 2 else None

    # ------------------------------------------------------------------ batches
    def labels_of(self, batch: Any) -> torch.Tensor | None:
        """The labels of a batch when the criterion needs them (``ValueError`` when there are none)."""
        if not self.needs_labels:
            return None
        labels = self.label_fn(batch)
        if labels is None:
            raise ValueError(
                f"criterion '{self.criterion_name}' needs labels but label_fn found none in a batch of type "
                f"{type(batch).__name__}; pass label_fn=lambda batch: ... to StructuredPruningCallback"
            )
        return torch.as_tensor(labels)

    def example_from(self, trainer: pl.Trainer) -> Any:
        """Model inputs taken from the first training batch (labels checked when needed)."""
        try:
            batch = next(iter(first_loader(trainer.fit_loop._data_source.dataloader())))
        except Exception as error:
            raise ValueError(
                "could not take example inputs from the training dataloader "
                f"({type(error).__name__}: {error}); pass example_inputs=... to StructuredPruningCallback"
            ) from error
        self.labels_of(batch)  # fail before training when the labels cannot be found
        return self.input_fn(batch)

    def cache(self, batch: Any) -> None:
        """Keep a training batch (inputs, labels; detached, on its device) as a held-out batch."""
        labels = self.labels_of(batch)
        self._cached.append((detach(self.input_fn(batch)), None if labels is None else labels.detach()))

    def cache_from_train_loader(self, trainer: pl.Trainer) -> None:
        """Keep the first training batches as held-out batches (when the fit has no validation loader)."""
        for index, batch in enumerate(first_loader(trainer.train_dataloader)):
            if index >= self.heldout_batches:
                break
            self.cache(trainer.strategy.batch_to_device(batch))

    def clear(self) -> None:
        """Forget the cached held-out batches."""
        self._cached.clear()

    def validation_batches(self, trainer: pl.Trainer) -> list[tuple[Any, Any]]:
        """The first held-out batches of the validation loader, if the fit has one."""
        loaders = trainer.val_dataloaders
        if not loaders:
            return []
        loader = first_loader(loaders)
        batches = []
        try:
            for index, batch in enumerate(loader):
                if index >= self.heldout_batches:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                batches.append((self.input_fn(batch), self.labels_of(batch)))
        except TypeError:  # a loader without length/iteration support
            return []
        return batches

    def evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[Callable[..., Any]], float]:
        """``evaluate(loss_fn) -> float``: the mean loss of the model on the held-out batches (validation
        batches, else the cached training batches), the same value on every rank."""
        batches = self.validation_batches(trainer) or list(self._cached)
        if not batches:
            raise ValueError(
                f"criterion '{self.criterion_name}' needs held-out batches but there is no validation loader and "
                "no training batch was cached before the step"
            )

        def evaluate(loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> float:
            with evaluating(pl_module):
                losses = []
                for inputs, labels in batches:
                    with trainer.precision_plugin.forward_context():
                        losses.append(loss_fn(self.predictions(call_model(pl_module, inputs)), labels).float())
                loss = torch.stack(losses).mean()
                if trainer.world_size > 1:  # every rank's held-out batches: the same outcome on all ranks
                    loss = trainer.strategy.reduce(loss, reduce_op="mean")
                return float(loss)  # one sync per evaluation, none per training step

        return evaluate

    def collection_pass(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        collector: ActivationCollector,
        batches: int | None,
        show: bool,
    ) -> None:
        """A dedicated pass (eval mode, no gradient) of ``collector`` over ``batches`` training batches
        (default 32), before the first step; a progress bar when ``show``."""
        from tqdm.auto import tqdm

        loader = first_loader(trainer.train_dataloader)
        wanted = batches or START_PASS_BATCHES
        total = min(wanted, len(loader)) if hasattr(loader, "__len__") else wanted
        collector.attach()
        with evaluating(pl_module):
            progress = tqdm(total=total, desc="lightning-prune: collecting activations", disable=not show, leave=False)
            for index, batch in enumerate(loader):
                if index >= total:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                collector.begin_batch(self.labels_of(batch))
                with trainer.precision_plugin.forward_context():
                    call_model(pl_module, self.input_fn(batch))
                collector.end_batch()
                progress.update()
            progress.close()
        collector.detach()
