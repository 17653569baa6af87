"""What the callback needs to know about the Trainer it runs in: strategies, compiled modules, DDP,
validation inside the fit."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer import call

from lightning_prune.engine.allocation import Plan

__all__ = [
    "broadcast_plan",
    "check_strategy",
    "evaluation_metrics",
    "float_metrics",
    "preserved_random_state",
    "rewrap_distributed",
    "uncompiled",
    "validate_in_fit",
]

_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")
_SHARDING = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


def check_strategy(trainer: pl.Trainer) -> None:
    """Refuse strategies whose parameters cannot be cut in place (``ValueError`` naming the strategy)."""
    strategy = type(trainer.strategy).__name__
    if any(name in strategy for name in _SHARDING):
        raise ValueError(
            f"StructuredPruningCallback cannot prune under {strategy}: it shards or wraps parameters, so their "
            "channels cannot be cut in place. Use a single-device or DDP-style strategy"
        )
    if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
        raise ValueError(
            f"StructuredPruningCallback supports multi-process training with DDP strategies only, got {strategy} "
            f"(world_size={trainer.world_size})"
        )


@contextlib.contextmanager
def uncompiled(pl_module: pl.LightningModule) -> Iterator[None]:
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


def broadcast_plan(trainer: pl.Trainer) -> Callable[[Plan], Plan] | None:
    """Under DDP, every rank cuts rank 0's plan (the statistics are already identical on all ranks;
    this guards against floating-point ties broken differently)."""
    if trainer.world_size == 1:
        return None

    def broadcast(plan: Plan) -> Plan:
        plan.removed = trainer.strategy.broadcast(plan.removed, src=0)
        return plan

    return broadcast


def rewrap_distributed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The DDP wrapper still points at the old parameters: wrap the pruned module again."""
    strategy: Any = trainer.strategy
    if trainer.world_size > 1 and isinstance(strategy, DDPStrategy):
        strategy.model = pl_module
        strategy.configure_ddp()


def float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (``trainer.callback_metrics``) as plain floats."""
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                values[key] = float(value.detach().cpu().item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return values


def evaluation_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """At the end of an evaluation run: the callback metrics that run produced (not the training
    metrics that ``trainer.callback_metrics`` also holds)."""
    results = trainer._results  # the running evaluation loop's own results
    if results is None:
        return float_metrics(trainer.callback_metrics)
    return float_metrics(results.metrics(False)["callback"])


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore the global random states (torch CPU and initialised CUDA devices, NumPy, Python) on
    exit: what runs inside (e.g. creating a DataLoader iterator draws a base seed) leaves the
    random streams of training as they were."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def validate_in_fit(trainer: pl.Trainer) -> bool:
    """Run the fit's validation loop now, from a training hook, as Lightning's training epoch loop does
    when it validates (``_TrainingEpochLoop.on_advance_end``): stage set to validating, gradients
    freed, the val loop run, then the training stage and the logger connector's loop state put back.
    Metrics reach ``trainer.callback_metrics`` and the loggers; callbacks' ``on_validation_*`` hooks
    run (a ``ModelCheckpoint`` saving at validation end may save). The global random state is kept.
    Returns whether a validation epoch ran (False when the loop had nothing to run)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    connector = trainer._logger_connector
    first_loop_iter = connector._first_loop_iter
    with preserved_random_state():
        trainer.validating = True
        try:
            if not epoch_loop._should_accumulate():
                call._call_lightning_module_hook(trainer, "on_validation_model_zero_grad")
            outputs = epoch_loop.val_loop.run()
        finally:
            trainer.training = True
            connector._first_loop_iter = first_loop_iter
    return bool(outputs)
