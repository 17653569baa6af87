"""What the callback needs to know about the Trainer it runs in: strategies, compiled modules, DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

from lightning_prune.engine.allocation import Plan

__all__ = ["broadcast_plan", "check_strategy", "rewrap_distributed", "uncompiled"]

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
