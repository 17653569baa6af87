"""Channel surgery: cut the planned channels for real, recording every parameter change.

torch-pruning replaces each cut parameter by a new ``nn.Parameter``. The optimizer, the DDP
wrapper and anything else holding the old object must be told: :func:`apply_plan` returns, for
each old parameter, the new one and the exact index selections that produced it
(:class:`ParameterChange`), so that per-parameter state can be cut the same way.

:class:`ModuleSnapshot` makes a step atomic: it keeps references to every module's parameters,
buffers and attributes (torch-pruning never mutates a tensor in place, it only rebinds), and
:meth:`ModuleSnapshot.restore` puts them all back if anything fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.engine.graph import ChannelGroup
from lightning_prune.engine.tp_adapter import cut_parameter, intercept_parameter_pruning

__all__ = ["ModuleSnapshot", "ParameterChange", "apply_plan"]

_CONTAINERS = ("_parameters", "_buffers", "_modules")


@dataclass
class ParameterChange:
    """``new == old.index_select(dim_1, keep_1).index_select(dim_2, keep_2)...`` for ``ops``."""

    old: nn.Parameter
    new: nn.Parameter
    ops: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Cut ``tensor`` (shaped like :attr:`old`) the way the parameter was cut."""
        for dim, keep in self.ops:
            tensor = tensor.index_select(dim, keep.to(tensor.device))
        return tensor


class ModuleSnapshot:
    """References to the whole state of a module tree, restorable after a failed surgery."""

    def __init__(self, model: nn.Module) -> None:
        self._saved = []
        for module in model.modules():
            attrs = {k: v for k, v in vars(module).items() if k not in _CONTAINERS}
            self._saved.append(
                (module, dict(module._parameters), dict(module._buffers), dict(module._modules), attrs)
            )
        self._classes = [(module, type(module)) for module in model.modules()]  # a head cut may switch it

    def restore(self) -> None:
        for module, cls in self._classes:
            if type(module) is not cls:
                module.__class__ = cls
        for module, params, buffers, modules, attrs in self._saved:
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            module._modules.clear()
            module._modules.update(modules)
            for key in [k for k in vars(module) if k not in _CONTAINERS and k not in attrs]:
                delattr(module, key)
            vars(module).update(attrs)


def apply_plan(groups: Sequence[ChannelGroup], removed: Mapping[int, Sequence[int]]) -> dict[nn.Parameter, ParameterChange]:
    """Remove ``removed[g]`` root channels from each group ``g``; return the parameter changes.

    Not atomic by itself: callers wrap it with a :class:`ModuleSnapshot`.
    """
    changes: dict[nn.Parameter, ParameterChange] = {}
    origin: dict[int, nn.Parameter] = {}

    def record(pruner: Any, weight: nn.Parameter, keep: list[int], dim: int) -> nn.Parameter:
        new = cut_parameter(pruner, weight, keep, dim)
        new.requires_grad_(weight.requires_grad)  # torch-pruning's new Parameter would unfreeze frozen layers
        base = origin.get(id(weight), weight)
        change = changes.get(base)
        if change is None:
            change = changes[base] = ParameterChange(old=base, new=new)
        change.ops.append((dim, torch.as_tensor(list(keep), dtype=torch.long)))
        change.new = new
        origin[id(new)] = base
        return new

    with intercept_parameter_pruning(record), torch.no_grad():
        for index, channels in removed.items():
            if channels:
                groups[index].prune(channels)
    return changes


def unrecorded_changes(before: Sequence[nn.Parameter], model: nn.Module, changes: Mapping[nn.Parameter, Any]) -> list[str]:
    """Names of parameters that were replaced without passing through :func:`apply_plan`'s record."""
    known_new = {id(c.new) for c in changes.values()}
    old = {id(p) for p in before}
    return [name for name, p in model.named_parameters() if id(p) not in old and id(p) not in known_new]
