"""Point an existing optimizer at the pruned parameters, keeping its state.

Rebuilding the optimizer after a prune loses momentum and Adam moments and restarts the LR
schedule; keeping the old one silently freezes every pruned layer (``docs/integration.md``
section "The optimizer keeps the old parameters").
Here the *same* optimizer object gets the new parameters in its ``param_groups``, and every
per-parameter state tensor shaped like the old parameter (``momentum_buffer``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, Adagrad's ``sum``, ...) is cut exactly as the parameter was.
Scalar state (``step``) is kept. Any other state shape is refused, before anything is changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lightning_prune.engine.surgery import ParameterChange

__all__ = ["OptimizerRemap", "UnsupportedOptimizerStateError", "prepare_optimizer_remap"]


class UnsupportedOptimizerStateError(RuntimeError):
    """The optimizer keeps state that cannot be cut per channel (e.g. a flat L-BFGS history)."""


@dataclass
class OptimizerRemap:
    """A prepared, not yet applied, remap of one optimizer. :meth:`commit` cannot fail."""

    optimizer: torch.optim.Optimizer
    param_lists: list[list[nn.Parameter]]
    state: dict[nn.Parameter, dict[str, Any]]

    def commit(self) -> None:
        for group, params in zip(self.optimizer.param_groups, self.param_lists):
            group["params"] = params
        self.optimizer.state.clear()
        self.optimizer.state.update(cast(dict[torch.Tensor, Any], self.state))


def _cut_state(optimizer: torch.optim.Optimizer, key: str, value: Any, change: ParameterChange) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape == change.old.shape:
        return change.apply(value)
    raise UnsupportedOptimizerStateError(
        f"{type(optimizer).__name__} keeps state '{key}' of shape {tuple(value.shape)} for a parameter of shape "
        f"{tuple(change.old.shape)}; lightning-prune can only cut state shaped like its parameter. "
        "Use an optimizer with per-parameter state (SGD, Adam, AdamW, RMSprop, Adagrad, ...)."
    )


def prepare_optimizer_remap(
    optimizer: torch.optim.Optimizer, changes: Mapping[nn.Parameter, ParameterChange]
) -> OptimizerRemap:
    """Compute the new ``param_groups`` and state of ``optimizer`` for ``changes``, without applying them."""
    param_lists = [[changes[p].new if p in changes else p for p in group["params"]] for group in optimizer.param_groups]
    state: dict[nn.Parameter, dict[str, Any]] = {}
    with torch.no_grad():
        for key, values in optimizer.state.items():
            param = cast(nn.Parameter, key)  # optimizers key their state by the parameters they hold
            change = changes.get(param)
            if change is None:
                state[param] = values
            else:
                state[change.new] = {k: _cut_state(optimizer, k, v, change) for k, v in values.items()}
    return OptimizerRemap(optimizer=optimizer, param_lists=param_lists, state=state)
