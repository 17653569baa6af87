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
from lightning_prune._model import batch_size_of, call_model, eval_forward, evaluating
from lightning_prune._tree import leaves, tree_map
from lightning_prune.collection.collector import ActivationCollector
from lightning_prune.engine.protocol import Progress

__all__ = ["BatchFeeder", "HeldoutEvaluation", "first_loader"]

#: Length of the dedicated collection pass of a start-of-training step, when collect_batches is None.
START_PASS_BATCHES = 32


def first_loader(loaders: Any) -> Any:
    """The first dataloader of what a ``*_dataloader`` hook returned (one loader, a dict or a list)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()))
    if isinstance(loaders, (list, tuple)):
        return loaders[0]
    return loaders


class HeldoutEvaluation:
    """The model's loss on the held-out batches, what ``ScoringContext.forward`` holds for a criterion
    with forward passes. Eval mode, no gradient, the precision plugin's forward context; under DDP
    each call reduces once (the mean over ranks), so every rank gets the same values.

    * ``evaluation(loss_fn) -> float``: ``loss_fn(predictions, labels)`` (a scalar per batch)
      averaged over the batches; one forward pass per batch.
    * ``evaluation.evaluate_batched(per_sample_loss_fn, repeats) -> tensor (repeats,)``: each batch
      repeated ``repeats`` times along dim 0 (every tensor of the inputs, and the labels) in one
      forward pass, for forward hooks that treat each block of the repeated batch differently (one
      channel mask per block, ``filter_ensembles``). ``per_sample_loss_fn(predictions, labels)``
      returns unreduced losses with the repeated batch as first dimension (e.g.
      ``cross_entropy(..., reduction="none")``); entry ``r`` is block ``r``'s mean, averaged over the
      batches: with identical blocks, the value ``evaluation(loss_fn)`` gives for the mean-reduced loss.
      Exact when the model treats samples independently in eval mode (BatchNorm then uses its
      running statistics); a model whose eval output depends on the rest of the batch would differ.

    Attributes:
        batches: the held-out ``(inputs, labels)`` pairs.
        batch_samples: samples in the largest held-out batch (the maximum over ranks).
        sample_elements: input elements (every tensor) per sample (the maximum over ranks), for sizing
            batched passes.
        device_type: the type of the device the passes run on (``"cpu"``, ``"cuda"``, ...).
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[tuple[Any, Any]],
        predictions: Callable[[Any], Any],
    ) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.batches = batches
        self.predictions = predictions
        samples = max(batch_size_of(inputs) for inputs, _ in batches)
        elements = max(
            sum(leaf[0].numel() for leaf in leaves(inputs) if isinstance(leaf, torch.Tensor) and leaf.dim())
            for inputs, _ in batches
        )
        if trainer.world_size > 1:  # pass sizes derived from these must agree on every rank
            sizes = trainer.strategy.reduce(torch.tensor([samples, elements], device=pl_module.device), reduce_op="max")
            samples, elements = (int(v) for v in sizes.tolist())
        self.batch_samples = samples
        self.sample_elements = elements
        self.device_type = next(  # where the batches (and so the passes) are
            (leaf.device.type for inputs, _ in batches for leaf in leaves(inputs) if isinstance(leaf, torch.Tensor)), "cpu"
        )

    def _reduce(self, value: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:  # every rank's held-out batches: the same outcome on all ranks
            value = self.trainer.strategy.reduce(value, reduce_op="mean")
        return value

    def __call__(self, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> float:
        with evaluating(self.pl_module):
            losses = []
            for inputs, labels in self.batches:
                with self.trainer.precision_plugin.forward_context():
                    losses.append(loss_fn(self.predictions(call_model(self.pl_module, inputs)), labels).float())
            return float(self._reduce(torch.stack(losses).mean()))  # one sync per evaluation, none per training step

    def evaluate_batched(
        self, per_sample_loss_fn: Callable[[Any, torch.Tensor | None], torch.Tensor], repeats: int
    ) -> torch.Tensor:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats!r}")

        def repeated(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat(repeats, *[1] * (tensor.dim() - 1)) if tensor.dim() and repeats > 1 else tensor

        with evaluating(self.pl_module):
            per_batch = []
            for inputs, labels in self.batches:
                with self.trainer.precision_plugin.forward_context():
                    outputs = self.predictions(call_model(self.pl_module, tree_map(repeated, inputs)))
                    losses = per_sample_loss_fn(outputs, None if labels is None else repeated(labels))
                samples = repeats * batch_size_of(inputs)
                if not isinstance(losses, torch.Tensor) or losses.dim() == 0 or losses.shape[0] != samples:
                    shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                    raise ValueError(f"per_sample_loss_fn must return one loss per sample ({samples} first), got {shape}")
                per_batch.append(losses.float().reshape(repeats, -1).mean(1))
            return self._reduce(torch.stack(per_batch).mean(0)).cpu()  # one sync per call


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

    def evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> HeldoutEvaluation:
        """The held-out evaluation of ``pl_module`` (validation batches, else the cached training
        batches): callable as ``evaluate(loss_fn) -> float``, batched by ``evaluate_batched``; the
        same values on every rank."""
        batches = self.validation_batches(trainer) or list(self._cached)
        if not batches:
            raise ValueError(
                f"criterion '{self.criterion_name}' needs held-out batches but there is no validation loader and "
                "no training batch was cached before the step"
            )
        return HeldoutEvaluation(trainer, pl_module, batches, self.predictions)

    def collection_pass(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        collector: ActivationCollector,
        batches: int | None,
        progress: Progress,
    ) -> None:
        """A dedicated pass (eval mode, no gradient) of ``collector`` over ``batches`` training batches
        (default 32), before the first step, reporting to ``progress``."""
        loader = first_loader(trainer.train_dataloader)
        wanted = batches or START_PASS_BATCHES
        total = min(wanted, len(loader)) if hasattr(loader, "__len__") else wanted
        collector.attach()
        with evaluating(pl_module), progress(total, "lightning-prune: collecting activations") as advance:
            for index, batch in enumerate(loader):
                if index >= total:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                collector.begin_batch(self.labels_of(batch))
                with trainer.precision_plugin.forward_context():
                    call_model(pl_module, self.input_fn(batch))
                collector.end_batch()
                advance(1)
        collector.detach()
