"""StructuredPruningCallback: remove channels for real in the middle of ``Trainer.fit``.

The callback is Lightning glue only: it validates its arguments, decides when to collect
statistics and when to prune, and delegates the work: batches to
:class:`~lightning_prune.collection.feeding.BatchFeeder`, statistics to
:class:`~lightning_prune.collection.ActivationCollector`, the step to
:class:`~lightning_prune.engine.ChannelPruner`, resume to :mod:`lightning_prune.checkpoint`,
records and logging to :mod:`lightning_prune.reporting`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_prune._batch import default_input_fn, default_label_fn, slice_batch, to_device
from lightning_prune._model import batch_size_of
from lightning_prune._progress import trainer_progress
from lightning_prune._trainer import (
    broadcast_plan,
    check_strategy,
    evaluation_metrics,
    float_metrics,
    rewrap_distributed,
    uncompiled,
    validate_in_fit,
)
from lightning_prune.averaging import averaged_copies, check_averaging
from lightning_prune.checkpoint import STATE_MARKER, STATE_VERSION, install_resume_guard
from lightning_prune.collection import ActivationCollector
from lightning_prune.collection.feeding import BatchFeeder
from lightning_prune.criteria import Criterion, get_criterion
from lightning_prune.engine import Analysis, ChannelPruner, Cost, Target, layer_widths
from lightning_prune.engine.allocation import Allocation, RoundTo
from lightning_prune.engine.heap import history_dependent_timings
from lightning_prune.engine.latency import LatencyEstimator, ModelTimer
from lightning_prune.engine.targets import target_from_arguments
from lightning_prune.repair import StepRepair
from lightning_prune.reporting import PruningRecord, log_step, record_step, summary_table
from lightning_prune.schedules import SCHEDULES, Schedule, ScheduleName, cumulative_targets

__all__ = ["StructuredPruningCallback"]

_EXAMPLE_SAMPLES = 2


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

    Several stages in one fit: give ``criterion`` one entry per step (``criterion=["pca_gm", "fpgm"]``
    with two steps), or use several callbacks in one Trainer, each with its own ``name``; resume and
    :func:`~lightning_prune.load_pruned` replay every callback's steps in the order they ran.

    Weight averaging (``StochasticWeightAveraging``, ``WeightAveraging`` / ``EMAWeightAveraging``, and
    ``torch.optim.swa_utils.AveragedModel`` objects the LightningModule holds) is supported: each
    averaged copy gets the same cut as the model (:mod:`lightning_prune.averaging`), so the average
    goes on over the kept channels.

    Args:
        criterion: a registered name (``lightning_prune.available_criteria()``: ``"l1"``,
            ``"l2"``, ``"fpgm"``, ``"random"``, ...) or a :class:`~lightning_prune.criteria.Criterion`
            instance. Default ``"l1"``. Unknown names raise ``ValueError`` listing the valid ones.
            A sequence (exactly one entry per step, the start-of-training step included) gives step
            ``i`` the criterion ``criterion[i]``; its activation collection and held-out batches
            follow that step's criterion. Another length raises ``ValueError``.
        target_flops_reduction: fraction of the dense model's MACs to remove, in (0, 1).
        target_params_reduction: fraction of the dense model's parameters to remove, in (0, 1).
        channel_ratio: fraction of the prunable channels to remove, in (0, 1).
        target_latency_reduction: fraction of the dense model's *measured* latency to remove, in (0, 1)
            (see :mod:`lightning_prune.engine.latency`): measured in eval mode on ``latency_device`` at
            ``latency_batch_size`` (defaults: the model's device and the training batch size, the
            model's dtype), or by ``latency_fn``. Widths are planned on per-layer latency tables
            (measured once per layer shape, cached on disk), events ordered by importance per second
            saved (``allocation`` defaults to ``"global"``); after the cut the model is timed and, if it
            misses by more than ``latency_tolerance``, re-planned from the step's start with the target
            moved by the miss (at most 5 times, inside the atomic step). Timed on a Linux CPU with
            glibc's allocator as it comes, the ratios depend on what the process ran before: ``setup``
            warns, naming the fix (:func:`~lightning_prune.engine.heap.retain_freed_memory`).
            Exactly one of the four targets must be given (``ValueError`` otherwise). The final
            model meets a MACs, parameters or channels target within 2 percentage points (MACs and
            parameters of the whole model, see :mod:`lightning_prune.engine.cost`).
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
            rule (``"discriminant_information"``, ``"interpolative_decomposition"``, ``"pca_gm"``) ignore
            it, with a ``UserWarning`` when it is given, unless ``criterion_widths=False``.
        max_layer_ratio: largest fraction of a group's original width that may be removed, in
            (0, 1). Default 0.9. A layer never loses its last channel.
        ignored_layers: layers (qualified names or modules) whose output channels are never pruned.
            The layer producing the model's output is never pruned, without being listed. An unknown
            name raises ``ValueError`` in ``setup``.
        round_to: kept widths are multiples of this (e.g. 8 for tensor cores). Default None.
            Must be a positive integer or ``"auto"``: the multiple that is fast on the latency device.
            With a MACs, parameter or channel target, the first step cuts the model with free widths
            and with each multiple (4, 8, 16, 32) that the final target can reach, times the cuts
            interleaved (in ``latency_fn``'s runtime when given) and keeps the fastest for the whole
            fit (a coarser multiple only when faster than the finer ones by more than 1%). A further
            candidate gives each group the multiple its own costliest layer shows (``"groups"``,
            kept only when faster than the chosen multiple by more than 1%; :attr:`round_to` is then
            a dict of root layer name -> multiple). The record keeps what was timed
            (``round_to_trials``) and a resumed fit keeps the choice.
            With a latency target, and under DDP, the multiple whose staircase the per-layer tables
            show (None when none does).
        scope: which widths are pruned: ``"mlp"`` (feed-forward hidden widths), ``"heads"`` (whole
            attention heads), ``"embedding"`` (the token width), ``"all"``, or a combination
            (``"mlp+heads"``, ``["mlp", "embedding"]``). Default None: ``"mlp+heads"`` for a
            transformer (token width kept), ``"all"`` for any other model. An unknown word raises
            ``ValueError`` at construction, naming the allowed ones.
        head_pruning: ``"heads"`` (default, whole heads removed) or ``"head_dims"`` (every head
            narrowed by the same channels); another value raises ``ValueError``.
        uniform_per_type: every layer of one type keeps the same width (so that a Hugging Face
            ``config`` can describe the pruned model and ``save_pretrained`` / ``from_pretrained``
            round-trip). Default False; not a bool: ``TypeError``.
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
        correction: ``"least_squares"``: after the cut, every consumer of a pruned group (residual
            streams and concatenations included) absorbs the ridge least-squares reconstruction of the
            removed channels from the kept ones, ``T = (G_SS + lambda I)^-1 G_SR`` from the Gram of
            the activation it reads (collected during the window, for weight-only criteria too);
            ``"none"``: plain selection. Default None: the criterion's own (least squares for
            ``"interpolative_decomposition"``, none otherwise). See :mod:`lightning_prune.engine.correction`.
        correction_ridge: the correction's ridge, relative to the mean diagonal of each consumer's
            Gram, or ``"gcv"``: chosen per consumer by generalised cross-validation from its Gram and
            row count, which keeps the correction from fitting a Gram of few rows exactly (small
            images, late stages, short windows); the step's record lists the ridges. Default None: the
            criterion's ``ridge`` if it is a number, else ``"gcv"`` (``interpolative_decomposition``
            reproduces its paper's ``T`` exactly with ``correction_ridge=1e-6``). A fixed ridge on a
            Gram of no more rows than kept channels warns (``CorrectionWarning``). ``ValueError`` for
            anything but a number >= 0, ``"gcv"`` or None.
        residual_widths: with ``correction="least_squares"``, choose the widths by what the correction
            leaves unexplained: per group and width, the share of each consumer's input energy the
            reconstruction misses (from the same Grams), summed over the consumers, the smallest loss
            per MAC saved removed first, instead of ``allocation``. For criteria without a width rule
            of their own (all but ``interpolative_decomposition``, ``discriminant_information`` and
            ``pca_gm``, unless ``criterion_widths=False``). Default False. ``ValueError`` when True
            without the least-squares correction.
        criterion_widths: let a criterion with a width rule of its own (``"discriminant_information"``,
            ``"interpolative_decomposition"``, ``"pca_gm"``) choose how many channels each layer keeps.
            Default True. False: the criterion only ranks channels inside each group and ``allocation``
            (or ``residual_widths``) chooses the widths: an ablation that tells a method's selection
            from its allocation. Not a bool: ``TypeError``.
        recalibrate_bn: after each step, inside its atomic section, re-estimate the running
            statistics of every BatchNorm on ``recalibrate_batches`` training batches (no gradient,
            no weight change, other modules in eval mode, exact averages over all rows, all ranks
            combined). Default None: on when the model has BatchNorms.
        recalibrate_batches: training batches drawn per step for the recalibration and the
            agreement. Default 20.
        measure_agreement: log ``prune/agreement``, the share of those batches' samples whose
            predicted class is unchanged by the step (kept in the record). Default True.
        latency_fn: ``latency_fn(model, example_inputs) -> seconds`` measuring the whole model, e.g.
            :class:`~lightning_prune.engine.OnnxRuntimeLatency` (the model exported to ONNX and timed in
            onnxruntime at every measurement); ``example_inputs`` come at ``latency_batch_size`` on ``latency_device``.
            Called once in ``setup`` to validate it: raising, or returning anything but a finite positive
            number, is a ``ValueError`` naming ``latency_fn`` before training. Default None: timed forward
            passes (warm-up, then the median of repeats).
        latency_batch_size: batch size latency is measured at. Default None: the training batch size
            (that of ``example_inputs`` when given). Not a positive integer: ``ValueError``.
        latency_device: device latency (and the tables) are measured on, e.g. ``"cpu"`` while training
            on a GPU. Default None: the model's device.
        latency_tolerance: how far the measured latency reduction may miss ``target_latency_reduction``
            (fraction of the dense latency) before the step re-plans. Default 0.02; outside [0, 1):
            ``ValueError``.
        latency_cache_dir: folder of the latency tables' cache. Default None:
            ``$LIGHTNING_PRUNE_LATENCY_CACHE`` or ``~/.cache/lightning_prune/latency``.
        measure_latency: measure latency (dense model in ``setup``, the model after each step; logged as
            ``prune/latency_ms`` and ``prune/latency_ratio``) with a MACs, parameters or channels target.
            Default None: only with ``target_latency_reduction`` or ``round_to="auto"``.
        criterion_kwargs: keyword arguments for a criterion given by name (for each of them, when
            ``criterion`` lists several names).
        seed: seeds the generator that sampling criteria (``"random"``) draw from. Default 0.
        validate_after_prune: when the fit has validation, run one validation epoch right after each
            pruning step at an epoch's end, inside this callback's ``on_train_epoch_end``, so that
            ``trainer.callback_metrics`` and the loggers hold the pruned model's scores before
            ``ModelCheckpoint`` and ``EarlyStopping`` run their epoch-end logic. Every monitored
            value a checkpoint carries then describes the weights in that file, and
            ``EarlyStopping`` / ``ckpt_path="best"`` never use the dense model's score for the pruned
            weights. Cost: one validation epoch per pruning step (the start-of-training step needs
            none: nothing was validated yet). The global random state is restored after the pass, so
            training is the same with or without it. Default True. False restores the old
            behaviour, which is wrong at every pruning epoch: with the default ``ModelCheckpoint``
            settings the file written at that epoch's end holds the pruned weights under the dense
            model's validation score, which ``best_model_path``, ``save_top_k``, ``ckpt_path="best"``
            and ``EarlyStopping`` then use.
        verbose: print one line per step and a summary table at the end of fit (rank 0). Default True.
        name: distinguishes this callback's state in checkpoints (it goes into ``state_key``) from
            the other pruning callbacks of the same Trainer. Default None: the key is
            ``"StructuredPruningCallback"``, so two unnamed callbacks collide (Lightning refuses
            them when the Trainer is built; ``setup`` refuses any other collision).

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
        criterion: str | Criterion | Sequence[str | Criterion] = "l1",
        *,
        target_flops_reduction: float | None = None,
        target_params_reduction: float | None = None,
        channel_ratio: float | None = None,
        target_latency_reduction: float | None = None,
        epochs: int | Sequence[int] | None = None,
        schedule: ScheduleName | Schedule = "linear",
        prune_on_train_start: bool = False,
        allocation: Allocation | None = None,
        max_layer_ratio: float = 0.9,
        ignored_layers: Sequence[str | nn.Module] = (),
        round_to: int | Literal["auto"] | None = None,
        scope: str | Sequence[str] | None = None,
        head_pruning: Literal["heads", "head_dims"] = "heads",
        uniform_per_type: bool = False,
        example_inputs: Any = None,
        input_fn: Callable[[Any], Any] | None = None,
        output_transform: Callable[[Any], torch.Tensor] | None = None,
        label_fn: Callable[[Any], Any] | None = None,
        collect_batches: int | None = None,
        max_samples: int = 2048,
        correction: Literal["none", "least_squares"] | None = None,
        correction_ridge: float | str | None = None,
        residual_widths: bool = False,
        criterion_widths: bool = True,
        recalibrate_bn: bool | None = None,
        recalibrate_batches: int = 20,
        measure_agreement: bool = True,
        latency_fn: ModelTimer | None = None,
        latency_batch_size: int | None = None,
        latency_device: str | torch.device | None = None,
        latency_tolerance: float = 0.02,
        latency_cache_dir: str | None = None,
        measure_latency: bool | None = None,
        criterion_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        validate_after_prune: bool = True,
        verbose: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}")
        self.name = name
        self.target = target_from_arguments(
            {
                "target_flops_reduction": target_flops_reduction,
                "target_params_reduction": target_params_reduction,
                "channel_ratio": channel_ratio,
                "target_latency_reduction": target_latency_reduction,
            }
        )
        if measure_latency is not None and not isinstance(measure_latency, bool):
            raise TypeError(f"measure_latency must be True, False or None, got {measure_latency!r}")
        if latency_fn is not None and not callable(latency_fn):
            raise TypeError(f"latency_fn must be a callable (model, example_inputs) -> seconds or None, got {latency_fn!r}")
        timed = self.target.kind == "latency" or round_to == "auto" or bool(measure_latency)
        self.latency: LatencyEstimator | None = (
            LatencyEstimator(
                latency_fn=latency_fn, batch_size=latency_batch_size, device=latency_device, cache_dir=latency_cache_dir
            )
            if timed
            else None
        )
        self.epochs = self._parse_epochs(epochs, prune_on_train_start)
        self.prune_on_train_start = bool(prune_on_train_start)
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} or a callable, got '{schedule}'")
        self.schedule = schedule
        self.step_targets = cumulative_targets(self.target.value, self.num_steps, schedule)
        if output_transform is not None and not callable(output_transform):
            raise TypeError(f"output_transform must be a callable (output -> tensor) or None, got {output_transform!r}")
        # One criterion, feeder and pruner per distinct criterion, for the whole fit: allocation,
        # max_layer_ratio, round_to and ignored_layers are validated there, once.
        specs = self._parse_criteria(criterion, self.num_steps)
        self._slot_of_step: list[int] = []
        slots: dict[Any, int] = {}
        self._criteria: list[Criterion] = []
        self._feeders: list[BatchFeeder] = []
        self._pruners: list[ChannelPruner] = []
        self._repairs: list[StepRepair] = []  #: correction, BN recalibration and agreement, per criterion
        for spec in specs:
            key = ("name", spec) if isinstance(spec, str) else ("instance", id(spec))
            if key not in slots:
                slots[key] = len(self._criteria)
                chosen = get_criterion(spec, **dict(criterion_kwargs or {}))
                if allocation is not None and criterion_widths and chosen.has_width_rule():
                    rank_zero_warn(
                        f"allocation={allocation!r} has no effect: {type(chosen).__name__} chooses the widths by its own "
                        "rule; pass criterion_widths=False to let the allocation choose them",
                        category=UserWarning,
                    )
                feeder = BatchFeeder(
                    chosen.name or type(chosen).__name__,
                    needs_labels=chosen.requirements.labels,
                    heldout_batches=chosen.heldout_batches,
                    input_fn=input_fn or default_input_fn,
                    label_fn=label_fn or default_label_fn,
                    output_transform=output_transform,
                )
                self._criteria.append(chosen)
                self._feeders.append(feeder)
                self._pruners.append(
                    ChannelPruner(
                        chosen,
                        allocation=allocation or ("global" if self.target.kind == "latency" else chosen.default_allocation),
                        max_layer_ratio=max_layer_ratio,
                        round_to=round_to,
                        ignored_layers=ignored_layers,
                        output_transform=None if output_transform is None else self._feeders[0].traceable,
                        correction=correction,
                        correction_ridge=correction_ridge,
                        residual_widths=residual_widths,
                        criterion_widths=criterion_widths,
                        latency=self.latency,
                        latency_tolerance=latency_tolerance,
                        scope=scope,
                        head_pruning=head_pruning,
                        uniform_per_type=uniform_per_type,
                    )
                )
                self._repairs.append(
                    StepRepair(
                        self._pruners[-1], feeder, recalibrate_bn=recalibrate_bn, recalibrate_batches=recalibrate_batches,
                        measure_agreement=measure_agreement,
                    )
                )
            self._slot_of_step.append(slots[key])
        self.example_inputs = example_inputs
        self.output_transform = output_transform
        if collect_batches is not None and (
            isinstance(collect_batches, bool) or not isinstance(collect_batches, int) or collect_batches < 1
        ):
            raise ValueError(f"collect_batches must be a positive integer or None, got {collect_batches!r}")
        self.collect_batches = collect_batches
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
            raise ValueError(f"max_samples must be an integer >= 2, got {max_samples!r}")
        self.max_samples = max_samples
        self.seed = int(seed)
        if not isinstance(validate_after_prune, bool):
            raise TypeError(f"validate_after_prune must be True or False, got {validate_after_prune!r}")
        self.validate_after_prune = validate_after_prune
        self.verbose = verbose

        self.history: list[PruningRecord] = []
        self.dense_cost: Cost | None = None
        self._original_widths: dict[str, int] = {}
        self._example: Any = None
        self._num_classes: int | None = None
        self._analysis: Analysis | None = None  #: the current structure's analysis, until it changes
        #: widths and seconds of the model after this process' last step (its latency timed interleaved
        #: with the step's start, on the dense measurement's scale): the next analysis starts from it
        self._latency_now: tuple[dict[str, int], float] | None = None
        self._collector: ActivationCollector | None = None
        self._window_start: int | None = None
        self._prepared = False
        self._validating: PruningRecord | None = None  #: the step whose post-step validation is running

    # ------------------------------------------------------------------ arguments
    @staticmethod
    def _parse_criteria(criterion: Any, num_steps: int) -> list[Any]:
        if isinstance(criterion, (str, Criterion)) or not isinstance(criterion, Sequence):
            return [criterion] * max(1, num_steps)
        specs = list(criterion)
        if len(specs) != num_steps:
            raise ValueError(
                f"criterion lists {len(specs)} criteria for {num_steps} pruning step(s): give exactly one per step "
                "(the start-of-training step included, then one per entry of epochs), or a single criterion for all"
            )
        return specs

    @property
    def state_key(self) -> str:
        """``"StructuredPruningCallback"``, with the ``name`` when one is given."""
        return self._generate_state_key(name=self.name) if self.name is not None else super().state_key

    def _current_step(self) -> int:
        """The step that runs next (the last one once all are done)."""
        return min(self.steps_done, len(self._slot_of_step) - 1)

    @property
    def criteria(self) -> list[Criterion]:
        """The criterion of every step, in order."""
        return [self._criteria[slot] for slot in self._slot_of_step]

    @property
    def criterion(self) -> Criterion:
        """The criterion of the step that runs next."""
        return self._criteria[self._slot_of_step[self._current_step()]]

    @property
    def pruner(self) -> ChannelPruner:
        """The pruner of the step that runs next (one :class:`ChannelPruner` per distinct criterion)."""
        return self._pruners[self._slot_of_step[self._current_step()]]

    @property
    def repair(self) -> StepRepair:
        """Correction, BatchNorm recalibration and agreement of the step that runs next."""
        return self._repairs[self._slot_of_step[self._current_step()]]

    @property
    def feeder(self) -> BatchFeeder:
        """The batch feeder of the step that runs next (collection and held-out batches of its criterion)."""
        return self._feeders[self._slot_of_step[self._current_step()]]

    @property
    def allocation(self) -> Allocation:
        return self.pruner.allocation

    @property
    def max_layer_ratio(self) -> float:
        return self.pruner.max_layer_ratio

    @property
    def round_to(self) -> RoundTo:
        """The kept widths' multiple (``round_to="auto"`` resolved once the model was analysed; a dict
        of root layer name -> multiple when ``"auto"`` found one multiple per group fastest)."""
        return self.pruner.effective_round_to

    @property
    def ignored_layers(self) -> list[str | nn.Module]:
        return self.pruner.ignored_layers

    @staticmethod
    def _parse_epochs(epochs: int | Sequence[int] | None, on_start: bool) -> list[int]:
        if epochs is None:
            return [] if on_start else [0]
        values: list[Any] = [epochs] if isinstance(epochs, (int, bool)) else list(epochs)
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

    @property
    def needs_activations(self) -> bool:
        return self.criterion.requirements.collects_activations or self.repair.corrects

    @property
    def needs_forward_passes(self) -> bool:
        return bool(self.criterion.requirements.forward_passes)

    def _pending(self, epoch: int) -> bool:
        return epoch in self.epochs and not any(r.epoch == epoch for r in self.history)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # every stage: validate/test/predict(ckpt_path=...) restore the pruned structure before the weights load
        install_resume_guard(
            pl_module,
            lambda: self._example,
            None if self.output_transform is None else self._feeders[0].traceable,
            companions=lambda: averaged_copies(trainer, pl_module),
        )
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.epochs and self.epochs[-1] >= max_epochs:
            raise ValueError(
                f"epochs={self.epochs} reaches beyond max_epochs={max_epochs}: epochs are 0-based, the last one "
                f"that can end is {max_epochs - 1}"
            )
        check_strategy(trainer)
        self._check_state_keys(trainer)
        if next(pl_module.parameters(), None) is not None:
            check_averaging(trainer, pl_module)
            with uncompiled(pl_module):
                self._prepare(trainer, pl_module)

    def _check_state_keys(self, trainer: pl.Trainer) -> None:
        same = [cb for cb in _pruning_callbacks(trainer) if cb.state_key == self.state_key]
        if len(same) > 1:
            raise ValueError(
                f"{len(same)} pruning callbacks in this Trainer share the state key {self.state_key!r}, so their "
                "checkpointed steps would overwrite each other: give each a distinct name= (e.g. name='stage1', "
                "name='stage2')"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._prepared:  # model built in configure_model: analyse it now
            with uncompiled(pl_module):
                self._prepare(trainer, pl_module)
        check_averaging(trainer, pl_module, optimizers=True)  # every callback's copy exists by now

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.prune_on_train_start and self.steps_done == 0:
            if self.needs_activations:
                with uncompiled(pl_module):
                    self._collector = collector = self._new_collector(trainer, pl_module)
                    self.feeder.collection_pass(trainer, pl_module, collector, self.collect_batches, trainer_progress(trainer))
            if self.needs_forward_passes and not self.feeder.validation_batches(trainer):
                self.feeder.cache_from_train_loader(trainer)
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
            with uncompiled(pl_module):
                self._collector = self._new_collector(trainer, pl_module)
            self._collector.attach()
        self._collector.begin_batch(self.feeder.labels_of(batch))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._collector is not None and self._collector.attached:
            self._collector.end_batch()
        if self._window_start is not None and batch_idx >= self._window_start and self.needs_forward_passes:
            self.feeder.cache(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._pending(epoch):
            self._prune(trainer, pl_module, epoch=epoch)
        self._window_start = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs before ModelCheckpoint's (Lightning puts checkpoint callbacks last), so a checkpoint saved
        # at the end of the post-step validation already holds the step's metrics_after
        if self._validating is not None:
            self._validating.metrics_after = evaluation_metrics(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_collector()
        for feeder in self._feeders:
            feeder.clear()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.verbose and self.history and self.dense_cost is not None:
            rank_zero_info("Structured pruning summary\n" + self.summary())

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loads with ``torch.load(weights_only=True)``): the steps done with their surgery,
        the dense reference and the example inputs (to replay the surgery on a fresh model)."""
        return {
            STATE_MARKER: True,  # how checkpoint.py recognises our state, whatever the state key
            "version": STATE_VERSION,
            "name": self.name,
            "history": [r.to_dict() for r in self.history],
            "example_inputs": to_device(self._example, torch.device("cpu")) if self._example is not None else None,
            "dense": None
            if self.dense_cost is None
            else {"macs": self.dense_cost.macs, "params": self.dense_cost.params, "latency": self.dense_cost.latency},
            "original_widths": dict(self._original_widths),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [PruningRecord.from_dict(r) for r in state_dict.get("history", [])]
        self._keep_chosen_round_to()
        if state_dict.get("dense"):
            self.dense_cost = Cost(**state_dict["dense"])
            self._original_widths = dict(state_dict.get("original_widths", {}))

    def _keep_chosen_round_to(self) -> None:
        """``round_to="auto"``: the multiple a step chose by timing (its record's ``round_to_trials``)
        holds for every pruner of the fit, and for the rest of a resumed one."""
        chosen = next((r for r in self.history if r.round_to_trials), None)
        if chosen is not None:
            for pruner in self._pruners:
                if pruner.round_to == "auto":
                    pruner.keep_round_to(chosen.round_to)

    def summary(self) -> str:
        """The table of completed steps (empty string before the first one)."""
        if self.dense_cost is None:
            return ""
        return summary_table(self.history, self.dense_cost.macs, self.dense_cost.params)

    # ------------------------------------------------------------------ delegation
    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return trainer.precision_plugin.convert_input(to_device(self._example, pl_module.device))

    def _current_analysis(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, measured: float | None = None
    ) -> Analysis:
        """The analysis of the model as it is: made once per structure (setup, then after each step)."""
        if self._analysis is None or not self._analysis.describes(pl_module):
            if measured is None and self._latency_now is not None and self._latency_now[0] == layer_widths(pl_module):
                measured = self._latency_now[1]  # the last step's measurement, on the dense model's scale
            self._analysis = self.pruner.analyse(pl_module, self._inputs(trainer, pl_module), measured=measured)
        return self._analysis

    def _check_latency(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_size: int) -> float | None:
        """Set up the latency measurement (batch size, progress) and time the model once: a bad
        ``latency_fn`` fails here, before training, naming the argument."""
        if self.latency is None:
            return None
        if self.latency.batch_size is None:
            self.latency.batch_size = batch_size
        self.latency.progress = trainer_progress(trainer)
        _warn_if_history_dependent(self.latency, pl_module)
        if trainer.world_size > 1:  # each process measures its own latency: no per-process re-plans or choices
            for pruner in self._pruners:
                pruner.latency_corrections = 0
                pruner.measure_round_to = False
        return self.latency.measure(pl_module, self._inputs(trainer, pl_module))

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepared = True
        example = self.example_inputs if self.example_inputs is not None else self.feeder.example_from(trainer)
        self._example = slice_batch(example, _EXAMPLE_SAMPLES) if self.example_inputs is None else example
        self._pruners[0].resolve_ignored(pl_module)  # a bad name is reported as such, not as a tracing error
        measured = self._check_latency(trainer, pl_module, batch_size_of(example))
        try:
            analysis = self._current_analysis(trainer, pl_module, measured)
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
        assert self.dense_cost is not None
        self.pruner.fit_round_to(analysis, self.target, self.dense_cost, self._original_widths)  # "auto": a reachable multiple
        reachable = self.pruner.max_reduction(analysis, self.target, self.dense_cost, self._original_widths)
        if reachable < self.target.value - 0.02:
            raise ValueError(
                f"the target ({self.target.describe()}) is unreachable: with max_layer_ratio={self.max_layer_ratio}, "
                f"round_to={self.round_to} and {len(self.ignored_layers)} ignored layer(s) at most {reachable:.1%} can be removed"
            )
        if any(c.requirements.collects_activations for c in self._criteria):  # the class count, once
            self._num_classes = self.feeder.output_width(pl_module, self._inputs(trainer, pl_module))

    def _new_collector(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ActivationCollector:
        analysis = self._current_analysis(trainer, pl_module)
        own = self.criterion.activation_requests(analysis.groups) if self.criterion.requirements.collects_activations else []
        return ActivationCollector(
            pl_module,
            [*own, *self.repair.requests(analysis.groups, pl_module, own)],
            max_samples=self.max_samples,
            seed=self.seed + self.steps_done,
            num_classes=self._num_classes,
        )

    def _drop_collector(self) -> None:
        if self._collector is not None:
            self._collector.detach()
            self._collector = None

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        assert self.dense_cost is not None
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
        metrics_before = float_metrics(trainer.callback_metrics)
        try:
            with uncompiled(pl_module):
                if self.needs_forward_passes:
                    context["forward"] = self.feeder.evaluation(trainer, pl_module)
                context["progress"] = trainer_progress(trainer)
                self._step(trainer, pl_module, epoch, context)
        finally:
            self._drop_collector()  # statistics are indexed by the old channels: never reused
            for feeder in self._feeders:
                feeder.clear()
        record = self.history[-1]
        record.metrics_before = metrics_before
        if epoch >= 0 and self.validate_after_prune and trainer.enable_validation:
            self._validating = record
            try:
                validate_in_fit(trainer)
            finally:
                self._validating = None

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, context: dict[str, Any]) -> None:
        assert self.dense_cost is not None
        index = self.steps_done
        target = Target(self.target.kind, self.step_targets[index])
        criterion = self.criterion
        order = _steps_done_in(trainer)
        extras = self.repair.prepare(trainer, pl_module)  # batches for BN recalibration and agreement
        result = self.pruner.step(
            pl_module,
            self._inputs(trainer, pl_module),
            target,
            dense=self.dense_cost,
            original_widths=self._original_widths,
            optimizers=trainer.optimizers,
            context=context,
            generator=torch.Generator().manual_seed(self.seed + index),
            step_index=index,
            plan_hook=broadcast_plan(trainer),
            analysis=self._current_analysis(trainer, pl_module) if self.latency is not None else self._analysis,
            companions=averaged_copies(trainer, pl_module),
            recalibrate=extras.recalibrate,
        )
        self._analysis = None  # the structure changed: the next window analyses it afresh
        if result.latency_measured is not None:
            self._latency_now = (layer_widths(pl_module), result.latency_measured)
        rewrap_distributed(trainer, pl_module)
        record = record_step(
            result,
            step=index,
            epoch=epoch,
            criterion=criterion.name or type(criterion).__name__,
            target=target,
            dense=self.dense_cost,
            samples=context["activations"].samples_seen if "activations" in context else None,
            order=order,
        )
        extras.finish(trainer, pl_module, record)
        self.history.append(record)
        self._keep_chosen_round_to()
        log_step(trainer, record, self.num_steps, self.verbose)
        ratio = record.latency_ratio
        if target.kind == "latency" and ratio is not None and abs(1 - ratio - target.value) > self.pruner.latency_tolerance:
            rank_zero_warn(
                f"pruning step {index + 1} missed its latency target: measured {1 - ratio:.1%} of the dense latency "
                f"removed for a target of {target.value:.1%} (latency_tolerance={self.pruner.latency_tolerance}) "
                f"after {len(record.latency_tries)} timings; see the record's latency_tries"
            )


def _pruning_callbacks(trainer: pl.Trainer) -> list[StructuredPruningCallback]:
    callbacks: list[Any] = list(getattr(trainer, "callbacks", []))
    return [cb for cb in callbacks if isinstance(cb, StructuredPruningCallback)]


def _steps_done_in(trainer: pl.Trainer) -> int:
    """Pruning steps done by every pruning callback of the trainer: the next step's ``order``."""
    return sum(len(cb.history) for cb in _pruning_callbacks(trainer))


def _warn_if_history_dependent(latency: LatencyEstimator, model: nn.Module) -> None:
    """Warn when the steps will time eager forwards on a CPU whose allocator makes timings depend on the
    process's history (:func:`~lightning_prune.engine.heap.history_dependent_timings`)."""
    if latency.latency_fn is None and latency.timing_device(model).type == "cpu":
        why = history_dependent_timings()
        if why is not None:
            rank_zero_warn(why)
