"""StructuredPruningCallback: remove channels for real in the middle of ``Trainer.fit``."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_prune._batch import default_input_fn, default_label_fn, detach, slice_batch, to_device
from lightning_prune.checkpoint import STATE_VERSION, callback_state, restore_pruned_structure
from lightning_prune.collection import ActivationCollector
from lightning_prune.criteria import Criterion, get_criterion
from lightning_prune.engine import ChannelPruner, Cost, Plan, Target, layer_widths
from lightning_prune.engine.allocation import ALLOCATIONS, Allocation
from lightning_prune.engine.cost import call_model
from lightning_prune.engine.graph import preserved_training_modes
from lightning_prune.reporting import PruningRecord, format_count, summary_table
from lightning_prune.schedules import SCHEDULES, Schedule, ScheduleName, cumulative_targets

__all__ = ["StructuredPruningCallback"]

_EXAMPLE_SAMPLES = 2
_START_PASS_BATCHES = 32


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    return float(value)


_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


@contextlib.contextmanager
def _uncompiled(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run the original (uncompiled) methods of a module given to fit as ``torch.compile(model)``.

    Tracing, cost counting and masking hooks need the eager forward. On exit the methods are
    compiled afresh, so the pruned shapes get a new graph (one recompilation per prune).
    """
    ctx = getattr(pl_module, "_compiler_ctx", None)
    if not ctx:
        yield
        return
    for name in _COMPILED_METHODS:
        setattr(pl_module, name, ctx[f"original_{name}"])
    try:
        yield
    finally:
        for name in _COMPILED_METHODS:
            setattr(pl_module, name, ctx["dynamo_ctx"](ctx[f"original_{name}"]))


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what a ``train_dataloader`` returned (one loader, a dict or a list)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()))
    if isinstance(loaders, (list, tuple)):
        return loaders[0]
    return loaders


class StructuredPruningCallback(Callback):
    r"""Structured (channel) pruning during ``fit``: the weakest channels are removed for real.

    At the end of each epoch listed in ``epochs`` (and, optionally, once at the start of training)
    the callback traces the model with torch-pruning's dependency graph, scores every group of
    coupled channels with ``criterion``, chooses widths that meet the schedule's target for that
    step and cuts the channels from every coupled layer (convolutions, norms, residual partners,
    consumers). The existing optimizers are pointed at the new parameters with their state
    (momentum, Adam moments) cut to the kept channels, so the LR schedule, checkpoints and loggers
    carry on untouched, and training fine-tunes the slimmer model.

    Example::

        import lightning as L
        from lightning_prune import StructuredPruningCallback

        pruning = StructuredPruningCallback(criterion="l1", target_flops_reduction=0.5, epochs=[4, 8, 12])
        trainer = L.Trainer(max_epochs=30, callbacks=[pruning])
        trainer.fit(model, datamodule)  # ~50% fewer MACs, fine-tuned after each step

    A pre-trained model is pruned once before the first training step, then fine-tuned::

        StructuredPruningCallback("l1", target_flops_reduction=0.5, prune_on_train_start=True)

    Args:
        criterion: a registered name (``lightning_prune.available_criteria()``: ``"l1"``,
            ``"l2"``, ``"fpgm"``, ``"random"``, ...) or a :class:`~lightning_prune.criteria.Criterion`
            instance. Default ``"l1"``. Unknown names raise ``ValueError`` listing the valid ones.
        target_flops_reduction: fraction of the dense model's MACs to remove, in (0, 1).
        target_params_reduction: fraction of the dense model's parameters to remove, in (0, 1).
        channel_ratio: fraction of the prunable channels to remove, in (0, 1).
            Exactly one of the three targets must be given (``ValueError`` otherwise). The final
            model meets it within 2 percentage points (MACs and parameters of the whole model, see
            :mod:`lightning_prune.engine.cost`).
        epochs: epochs (0-based, as ``trainer.current_epoch``) at whose end a pruning step runs.
            Default: ``[0]``, one step after the first epoch (``[]`` when
            ``prune_on_train_start``). Must be sorted, unique, non-negative and below
            ``max_epochs`` (checked in ``setup``).
        schedule: how the target is spread over the steps: ``"linear"`` (default),
            ``"geometric"`` (the same fraction of what remains at each step, as in the PLS paper),
            ``"agp"`` (cubic), or a callable ``f(i, n, final)`` (see :mod:`lightning_prune.schedules`).
        prune_on_train_start: also prune once before the first training step (for pre-trained
            models: prune, then fine-tune). Counts as the first step of the schedule. Default False.
        allocation: ``"uniform"`` (every group loses the same fraction) or ``"global"`` (one
            ranking across layers; scores are normalised per group unless the criterion's scores
            are comparable across layers). Default None: the criterion's preference
            (``"global"`` for ``"pls_vip"``, ``"uniform"`` otherwise). Criteria with their own width
            rule (``"pca_gm"``) ignore it.
        max_layer_ratio: largest fraction of a group's original width that may be removed, in
            (0, 1). Default 0.9. A layer never loses its last channel.
        ignored_layers: layers (qualified names or modules) whose output channels are never pruned.
            The layer producing the model's output is never pruned, without being listed. An unknown
            name raises ``ValueError`` in ``setup``.
        round_to: kept widths are multiples of this (e.g. 8 for tensor cores). Default None.
            Must be a positive integer.
        example_inputs: inputs for tracing the model; default: the first two samples of the
            first training batch (extracted with ``input_fn``).
        input_fn: maps a training batch to the model's input. Default: the batch itself if a
            tensor, its first item if a tuple/list, else the ``"x"``/``"input"``/``"image"``... key.
            A model with several inputs gets them from a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``): e.g. ``input_fn=lambda b: (b["image"], b["mask"])``.
        output_transform: maps the model's output to the tensor of predictions (logits), for
            models that return a dict, a tuple or an output object. It is used to trace the model
            and wherever the output is read (the class count of ``"di"``, the loss of
            ``"filter_ensembles"``). Outputs that are dicts, tuples or lists of tensors are traced
            whole, so that every output keeps its shape (layers producing any output are never
            pruned); other output objects are traced through ``output_transform``. Default None:
            the output is used as it is.
        label_fn: maps a training batch to its labels, for criteria that need them (``"pls_vip"``).
            Default: the second item of a tuple/list, or the ``"label"``/``"labels"``/``"y"``/
            ``"target"`` key of a dict. A criterion that needs labels raises ``ValueError`` when it
            finds none.
        collect_batches: for criteria that need activations: collect during the last
            ``collect_batches`` batches of the epoch that ends with a pruning step (default None:
            the whole epoch); for the start-of-training step, the length of the dedicated
            collection pass (default 32 batches).
        max_samples: samples kept for per-sample statistics (a uniform reservoir over the window).
            Default 2048. Memory does not grow with the data set or the number of epochs.
        criterion_kwargs: keyword arguments for a criterion given by name.
        seed: seeds the generator that sampling criteria (``"random"``) draw from. Default 0.
        verbose: print one line per step and a summary table at the end of fit (rank 0). Default True.

    Attributes:
        history: one :class:`~lightning_prune.reporting.PruningRecord` per completed step.
        dense_cost: MACs per sample and parameters of the model before pruning.

    Raises:
        ValueError / TypeError: at construction or in ``setup``, before any training step, for any
            invalid argument, an unreachable target or a model without prunable layers.
        lightning_prune.engine.PruningError: when a step fails during fit (the model and optimizers
            are left exactly as they were before the step).
    """

    def __init__(
        self,
        criterion: str | Criterion = "l1",
        *,
        target_flops_reduction: float | None = None,
        target_params_reduction: float | None = None,
        channel_ratio: float | None = None,
        epochs: int | Sequence[int] | None = None,
        schedule: ScheduleName | Schedule = "linear",
        prune_on_train_start: bool = False,
        allocation: Allocation | None = None,
        max_layer_ratio: float = 0.9,
        ignored_layers: Sequence[str | nn.Module] = (),
        round_to: int | None = None,
        example_inputs: Any = None,
        input_fn: Callable[[Any], Any] | None = None,
        output_transform: Callable[[Any], torch.Tensor] | None = None,
        label_fn: Callable[[Any], Any] | None = None,
        collect_batches: int | None = None,
        max_samples: int = 2048,
        criterion_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.criterion = get_criterion(criterion, **dict(criterion_kwargs or {}))
        self.target = self._parse_target(target_flops_reduction, target_params_reduction, channel_ratio)
        self.epochs = self._parse_epochs(epochs, prune_on_train_start)
        self.prune_on_train_start = bool(prune_on_train_start)
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} or a callable, got '{schedule}'")
        self.schedule = schedule
        self.step_targets = cumulative_targets(self.target.value, self.num_steps, schedule)
        if allocation is not None and allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)} or None, got {allocation!r}")
        self.allocation = allocation or getattr(self.criterion, "default_allocation", "uniform")
        self.max_layer_ratio = _check_fraction("max_layer_ratio", max_layer_ratio)
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
        self.round_to = round_to
        for layer in ignored_layers:
            if not isinstance(layer, (str, nn.Module)):
                raise TypeError(f"ignored_layers must hold layer names or modules, got {type(layer).__name__}: {layer!r}")
        self.ignored_layers = list(ignored_layers)
        self.example_inputs = example_inputs
        self.input_fn = input_fn or default_input_fn
        if output_transform is not None and not callable(output_transform):
            raise TypeError(f"output_transform must be a callable (output -> tensor) or None, got {output_transform!r}")
        self.output_transform = output_transform
        self.label_fn = label_fn or default_label_fn
        if collect_batches is not None and (isinstance(collect_batches, bool) or not isinstance(collect_batches, int) or collect_batches < 1):
            raise ValueError(f"collect_batches must be a positive integer or None, got {collect_batches!r}")
        self.collect_batches = collect_batches
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
            raise ValueError(f"max_samples must be an integer >= 2, got {max_samples!r}")
        self.max_samples = max_samples
        self.seed = int(seed)
        self.verbose = verbose

        self.history: list[PruningRecord] = []
        self.dense_cost: Cost | None = None
        self._original_widths: dict[str, int] = {}
        self._pruner: ChannelPruner | None = None
        self._example: Any = None
        self._collector: ActivationCollector | None = None
        self._window_start: int | None = None
        self._cached_batches: deque[tuple[Any, Any]] = deque(maxlen=self._heldout_size)

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _parse_target(flops: float | None, params: float | None, channels: float | None) -> Target:
        given = {
            name: value
            for name, value in (
                ("target_flops_reduction", flops),
                ("target_params_reduction", params),
                ("channel_ratio", channels),
            )
            if value is not None
        }
        if len(given) != 1:
            raise ValueError(
                "give exactly one of target_flops_reduction, target_params_reduction, channel_ratio; "
                f"got {', '.join(f'{k}={v}' for k, v in given.items()) or 'none'}"
            )
        name, value = next(iter(given.items()))
        kind = {"target_flops_reduction": "flops", "target_params_reduction": "params", "channel_ratio": "channels"}[name]
        return Target(kind, _check_fraction(name, value))  # type: ignore[arg-type]

    @staticmethod
    def _parse_epochs(epochs: int | Sequence[int] | None, on_start: bool) -> list[int]:
        if epochs is None:
            return [] if on_start else [0]
        values = [epochs] if isinstance(epochs, int) and not isinstance(epochs, bool) else list(epochs)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"epochs must hold non-negative integers (0-based epoch indices), got {epochs!r}")
        if values != sorted(set(values)):
            raise ValueError(f"epochs must be sorted and unique, got {epochs!r}; e.g. epochs={sorted(set(values))}")
        if not values and not on_start:
            raise ValueError("epochs is empty and prune_on_train_start is False: no pruning step would run")
        return values

    @property
    def num_steps(self) -> int:
        """Total number of pruning steps (the start-of-training step included)."""
        return len(self.epochs) + int(self.prune_on_train_start)

    @property
    def steps_done(self) -> int:
        return len(self.history)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.epochs and self.epochs[-1] >= max_epochs:
            raise ValueError(
                f"epochs={self.epochs} reaches beyond max_epochs={max_epochs}: epochs are 0-based, the last one "
                f"that can end is {max_epochs - 1}"
            )
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel", "XLA")):
            raise ValueError(
                f"StructuredPruningCallback cannot prune under {strategy}: it shards or wraps parameters, so their "
                "channels cannot be cut in place. Use a single-device or DDP-style strategy"
            )
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ValueError(
                f"StructuredPruningCallback supports multi-process training with DDP strategies only, got {strategy} "
                f"(world_size={trainer.world_size})"
            )
        self._guard_resume(pl_module)
        if next(pl_module.parameters(), None) is not None:
            with _uncompiled(pl_module):
                self._prepare(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pruner is None:  # model built in configure_model: analyse it now
            with _uncompiled(pl_module):
                self._prepare(trainer, pl_module)

    @property
    def needs_activations(self) -> bool:
        req = self.criterion.requirements
        return bool(req.activations or (req.labels and not req.forward_passes))

    @property
    def needs_forward_passes(self) -> bool:
        return bool(self.criterion.requirements.forward_passes)

    @property
    def _heldout_size(self) -> int:
        return int(getattr(self.criterion, "num_batches", 4))

    def _pending(self, epoch: int) -> bool:
        return epoch in self.epochs and not any(r.epoch == epoch for r in self.history)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prune_on_train_start and self.steps_done == 0:
            if self.needs_activations:
                with _uncompiled(pl_module):
                    self._collection_pass(trainer, pl_module)
            if self.needs_forward_passes and not self._validation_batches(trainer):
                loader = _first_loader(trainer.train_dataloader)
                for index, batch in enumerate(loader):
                    if index >= self._heldout_size:
                        break
                    self._cache_batch(trainer.strategy.batch_to_device(batch))
            self._prune(trainer, pl_module, epoch=-1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window_start = None
        if (self.needs_activations or self.needs_forward_passes) and self._pending(trainer.current_epoch):
            total = trainer.num_training_batches
            if self.collect_batches is None or not math.isfinite(total):
                self._window_start = 0
            else:
                self._window_start = max(0, int(total) - self.collect_batches)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._window_start is None or batch_idx < self._window_start or not self.needs_activations:
            return
        if self._collector is None:
            with _uncompiled(pl_module):
                self._collector = self._new_collector(trainer, pl_module)
            self._collector.attach()
        self._collector.begin_batch(self._labels_of(batch))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._collector is not None and self._collector.attached:
            self._collector.end_batch()
        if self.needs_forward_passes and self._window_start is not None and batch_idx >= self._window_start:
            self._cache_batch(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._pending(epoch):
            self._prune(trainer, pl_module, epoch=epoch)
        self._window_start = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_collector()
        self._cached_batches.clear()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.verbose and self.history and self.dense_cost is not None:
            rank_zero_info("Structured pruning summary\n" + self.summary())

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loads with ``torch.load(weights_only=True)``): the steps done with their surgery,
        the dense reference and the example inputs (to replay the surgery on a fresh model)."""
        return {
            "version": STATE_VERSION,
            "history": [r.to_dict() for r in self.history],
            "example_inputs": to_device(self._example, torch.device("cpu")) if self._example is not None else None,
            "dense": None if self.dense_cost is None else {"macs": self.dense_cost.macs, "params": self.dense_cost.params},
            "original_widths": dict(self._original_widths),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [PruningRecord.from_dict(r) for r in state_dict.get("history", [])]
        if state_dict.get("dense"):
            self.dense_cost = Cost(**state_dict["dense"])
            self._original_widths = dict(state_dict.get("original_widths", {}))

    # ------------------------------------------------------------------ the work
    def _guard_resume(self, pl_module: pl.LightningModule) -> None:
        """Restore a checkpoint's pruned structure on the model before its weights load.

        Lightning loads the weights before any callback hook runs, so this wraps the module's
        ``on_load_checkpoint`` (called just before the weights load): if the checkpoint records
        pruning steps the model does not have yet (a freshly built dense model), they are replayed.
        A record that does not fit raises ``ValueError`` naming the layer, model untouched.
        """
        original = pl_module.on_load_checkpoint
        if getattr(original, "_lightning_prune_guard", False):
            return

        def restore_then_load(checkpoint: dict[str, Any]) -> Any:
            state = callback_state(checkpoint)
            history = state.get("history", []) if state else []
            if history:
                saved = history[-1]["widths"]
                if any(layer_widths(pl_module).get(n) != w for n, w in saved.items()):
                    inputs = state.get("example_inputs")
                    inputs = self._inputs_for_model(pl_module, inputs if inputs is not None else self._example)
                    restore_pruned_structure(pl_module, state, inputs, None if self.output_transform is None else self._traceable)
                    differing = [n for n, w in saved.items() if layer_widths(pl_module).get(n) != w]
                    if differing:
                        raise ValueError(
                            f"after replaying the checkpoint's {len(history)} pruning step(s), layer '{differing[0]}' has "
                            f"{layer_widths(pl_module).get(differing[0])} channels, the checkpoint {saved[differing[0]]}"
                        )
            return original(checkpoint)

        restore_then_load._lightning_prune_guard = True  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = restore_then_load  # type: ignore[method-assign]

    def summary(self) -> str:
        """The table of completed steps (empty string before the first one)."""
        if self.dense_cost is None:
            return ""
        return summary_table(self.history, self.dense_cost.macs, self.dense_cost.params)

    def _resolve_ignored(self, pl_module: pl.LightningModule) -> list[nn.Module]:
        named = dict(pl_module.named_modules())
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

    def _example_from_data(self, trainer: pl.Trainer) -> Any:
        try:
            batch = next(iter(_first_loader(trainer.fit_loop._data_source.dataloader())))
        except Exception as error:
            raise ValueError(
                "could not take example inputs from the training dataloader "
                f"({type(error).__name__}: {error}); pass example_inputs=... to StructuredPruningCallback"
            ) from error
        if self.criterion.requirements.labels:
            self._labels_of(batch)  # fail before training when the labels cannot be found
        return self.input_fn(batch)

    def _inputs_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return trainer.precision_plugin.convert_input(self._inputs_for_model(pl_module, self._example))

    @staticmethod
    def _inputs_for_model(pl_module: pl.LightningModule, inputs: Any) -> Any:
        return to_device(inputs, pl_module.device)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ignored = self._resolve_ignored(pl_module)
        self._pruner = ChannelPruner(
            self.criterion,
            allocation=self.allocation,  # type: ignore[arg-type]
            max_layer_ratio=self.max_layer_ratio,
            round_to=self.round_to,
            ignored_layers=ignored,
            output_transform=None if self.output_transform is None else self._traceable,
        )
        example = self.example_inputs if self.example_inputs is not None else self._example_from_data(trainer)
        self._example = slice_batch(example, _EXAMPLE_SAMPLES) if self.example_inputs is None else example
        try:
            analysis = self._pruner.analyse(pl_module, self._inputs_for(trainer, pl_module))
        except Exception as error:
            raise ValueError(
                f"torch-pruning could not trace the model with the example inputs ({type(error).__name__}: {error}); "
                "check example_inputs / input_fn"
            ) from error
        if not analysis.groups:
            refused = "".join(f"\n  - '{name}': {why}" for name, why in analysis.refused.items())
            raise ValueError(
                f"{type(pl_module).__name__} has no prunable layer: no convolution or linear layer whose output "
                "channels can be removed (the output layer and ignored_layers are never pruned)"
                + (f"; refused:{refused}" if refused else "")
            )
        if self.steps_done == 0:
            self.dense_cost = analysis.cost
            self._original_widths = layer_widths(pl_module)
        reachable = self._pruner.max_reduction(analysis, self.target, self.dense_cost, self._original_widths)
        if reachable < self.target.value - 0.02:
            raise ValueError(
                f"the target ({self.target.describe()}) is unreachable: with max_layer_ratio={self.max_layer_ratio}, "
                f"round_to={self.round_to} and {len(ignored)} ignored layer(s) at most {reachable:.1%} can be removed"
            )

    def _labels_of(self, batch: Any) -> torch.Tensor | None:
        if not self.criterion.requirements.labels:
            return None
        labels = self.label_fn(batch)
        if labels is None:
            raise ValueError(
                f"criterion '{self.criterion.name}' needs labels but label_fn found none in a batch of type "
                f"{type(batch).__name__}; pass label_fn=lambda batch: ... to StructuredPruningCallback"
            )
        return torch.as_tensor(labels)

    def _new_collector(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ActivationCollector:
        assert self._pruner is not None
        analysis = self._pruner.analyse(pl_module, self._inputs_for(trainer, pl_module))
        requests = self.criterion.activation_requests(analysis.groups)
        return ActivationCollector(
            pl_module,
            requests,
            max_samples=self.max_samples,
            seed=self.seed + self.steps_done,
            num_classes=self._output_width(trainer, pl_module),
        )

    def _output_width(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """Width of the model's output on the example inputs (the class count of a classifier)."""
        with preserved_training_modes(pl_module), torch.no_grad():
            pl_module.eval()
            output = self._predictions(call_model(pl_module, self._inputs_for(trainer, pl_module)))
        return int(output.shape[-1]) if isinstance(output, torch.Tensor) and output.dim() == 2 else None

    def _traceable(self, output: Any) -> Any:
        """What torch-pruning traces: every output when it can walk them (tensors, dicts, lists, tuples),
        so that no layer producing any of them is pruned; otherwise ``output_transform(output)``."""
        if isinstance(output, (torch.Tensor, Mapping, list, tuple)):
            return output
        return self._predictions(output)

    def _predictions(self, output: Any) -> Any:
        return self.output_transform(output) if self.output_transform is not None else output

    def _cache_batch(self, batch: Any) -> None:
        """Keep a training batch (inputs, labels; detached, on its device) as a held-out batch."""
        labels = self._labels_of(batch)
        self._cached_batches.append((detach(self.input_fn(batch)), labels.detach()))

    def _validation_batches(self, trainer: pl.Trainer) -> list[tuple[Any, Any]]:
        """The first held-out batches of the validation loader, if the fit has one."""
        loaders = trainer.val_dataloaders
        if not loaders:
            return []
        loader = _first_loader(loaders)
        batches = []
        try:
            for index, batch in enumerate(loader):
                if index >= self._heldout_size:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                batches.append((self.input_fn(batch), self._labels_of(batch)))
        except TypeError:  # a loader without length/iteration support
            return []
        return batches

    def _forward_fn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[Callable], float]:
        batches = self._validation_batches(trainer) or list(self._cached_batches)
        if not batches:
            raise ValueError(
                f"criterion '{self.criterion.name}' needs held-out batches but there is no validation loader and "
                "no training batch was cached before the step"
            )

        def evaluate(loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> float:
            with preserved_training_modes(pl_module), torch.no_grad():
                pl_module.eval()
                losses = []
                for inputs, labels in batches:
                    with trainer.precision_plugin.forward_context():
                        losses.append(loss_fn(self._predictions(call_model(pl_module, inputs)), labels).float())
                loss = torch.stack(losses).mean()
                if trainer.world_size > 1:  # every rank's held-out batches: the same outcome on all ranks
                    loss = trainer.strategy.reduce(loss, reduce_op="mean")
                return float(loss)  # one sync per evaluation, none per training step

        return evaluate

    def _drop_collector(self) -> None:
        if self._collector is not None:
            self._collector.detach()
            self._collector = None

    def _collection_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A dedicated pass (eval mode, no gradient) over training batches, before the first step."""
        from tqdm.auto import tqdm

        loader = _first_loader(trainer.train_dataloader)
        batches = self.collect_batches or _START_PASS_BATCHES
        total = min(batches, len(loader)) if hasattr(loader, "__len__") else batches
        self._collector = collector = self._new_collector(trainer, pl_module)
        collector.attach()
        show = self.verbose and trainer.is_global_zero
        with preserved_training_modes(pl_module), torch.no_grad():
            pl_module.eval()
            progress = tqdm(total=total, desc="lightning-prune: collecting activations", disable=not show, leave=False)
            for index, batch in enumerate(loader):
                if index >= total:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                collector.begin_batch(self._labels_of(batch))
                with trainer.precision_plugin.forward_context():
                    call_model(pl_module, self.input_fn(batch))
                collector.end_batch()
                progress.update()
            progress.close()
        collector.detach()

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        assert self._pruner is not None and self.dense_cost is not None
        context: dict[str, Any] = {}
        if self.needs_activations:
            if self._collector is None or self._collector.batches == 0:
                self._drop_collector()
                raise ValueError(
                    f"criterion '{self.criterion.name}' needs activations but none were collected before the step at "
                    f"epoch {epoch}; check collect_batches and that the epoch has training batches"
                )
            self._collector.synchronize()  # all ranks' data, identical statistics on every rank
            store = self._collector.store()
            self._collector.detach()  # the step's own forward passes (tracing, costs) are not data
            context = {"activations": store, "labels": store.labels}
        try:
            with _uncompiled(pl_module):
                if self.needs_forward_passes:
                    context["forward"] = self._forward_fn(trainer, pl_module)
                self._prune_step(trainer, pl_module, epoch, context)
        finally:
            self._drop_collector()  # statistics are indexed by the old channels: never reused
            self._cached_batches.clear()

    def _prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, context: dict[str, Any]) -> None:
        index = self.steps_done
        target = Target(self.target.kind, self.step_targets[index])
        generator = torch.Generator().manual_seed(self.seed + index)
        result = self._pruner.step(
            pl_module,
            self._inputs_for(trainer, pl_module),
            target,
            dense=self.dense_cost,
            original_widths=self._original_widths,
            optimizers=trainer.optimizers,
            context=context,
            generator=generator,
            step_index=index,
            plan_hook=self._broadcast_plan(trainer),
        )
        self._rewrap_distributed(trainer, pl_module)
        flops_reduction, params_reduction = result.after.reduction_from(self.dense_cost)
        record = PruningRecord(
            step=index,
            epoch=epoch,
            criterion=self.criterion.name or type(self.criterion).__name__,
            target_kind=target.kind,
            target=target.value,
            macs_before=result.before.macs,
            macs_after=result.after.macs,
            params_before=result.before.params,
            params_after=result.after.params,
            flops_reduction=flops_reduction,
            params_reduction=params_reduction,
            widths=result.widths,
            seconds=result.seconds,
            corrections=result.corrections,
            surgery=result.surgery,
            samples=context["activations"].samples_seen if "activations" in context else None,
        )
        self.history.append(record)
        self._log(trainer, record)

    @staticmethod
    def _broadcast_plan(trainer: pl.Trainer) -> Callable[[Plan], Plan] | None:
        """Under DDP, every rank cuts rank 0's plan (the statistics are already identical on all ranks;
        this guards against floating-point ties broken differently)."""
        if trainer.world_size == 1:
            return None

        def broadcast(plan: Plan) -> Plan:
            plan.removed = trainer.strategy.broadcast(plan.removed, src=0)
            return plan

        return broadcast

    @staticmethod
    def _rewrap_distributed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The DDP wrapper still points at the old parameters: wrap the pruned module again."""
        strategy = trainer.strategy
        if trainer.world_size > 1 and isinstance(strategy, DDPStrategy):
            strategy.model = pl_module
            strategy.configure_ddp()

    def _log(self, trainer: pl.Trainer, record: PruningRecord) -> None:
        metrics = {
            "prune/macs": float(record.macs_after),
            "prune/params": float(record.params_after),
            "prune/flops_reduction": record.flops_reduction,
            "prune/params_reduction": record.params_reduction,
            "prune/seconds": record.seconds,
            "prune/step": float(record.step + 1),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.verbose:
            when = "train start" if record.epoch < 0 else f"end of epoch {record.epoch}"
            rank_zero_info(
                f"[lightning-prune] step {record.step + 1}/{self.num_steps} ({when}, {record.criterion}): "
                f"MACs {format_count(record.macs_before)} -> {format_count(record.macs_after)} "
                f"(-{record.flops_reduction:.1%} vs dense), params {format_count(record.params_after)} "
                f"(-{record.params_reduction:.1%}), {record.seconds:.2f}s"
            )
        if record.macs_after == record.macs_before and record.step + 1 < self.num_steps:
            rank_zero_warn(f"pruning step {record.step + 1} removed nothing (the schedule's target was already met)")
