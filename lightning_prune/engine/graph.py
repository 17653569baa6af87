"""The dependency graph: which channels are coupled, and which parameter slices each one owns.

Everything here sits on top of torch-pruning's :class:`~torch_pruning.DependencyGraph`. It adds
three things the pruning engine needs and torch-pruning does not offer:

* tracing that leaves the model as it found it (torch-pruning's tracing switches every submodule
  to eval mode and never switches back, see ``shared/integration.md``);
* :class:`ChannelGroup`, a frozen description of one set of coupled channels (a conv, its BN, the
  residual partners, the consumers' input channels) with the parameter slices each channel owns;
* the exclusion of groups that would change the model's output shape (the classifier's outputs).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

__all__ = [
    "ChannelGroup",
    "ParamSlice",
    "build_dependency_graph",
    "discover_groups",
    "preserved_training_modes",
]


@contextlib.contextmanager
def preserved_training_modes(model: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule on exit, whatever happened inside."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _all_requiring_grad(frozen: Sequence[nn.Parameter]) -> Iterator[None]:
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    output_transform: Callable[[Any], torch.Tensor] | None = None,
    customized_pruners: Mapping[Any, BasePruningFunc] | None = None,
) -> tp.DependencyGraph:
    """Trace ``model`` into a torch-pruning dependency graph, leaving its train/eval modes intact.

    Tracing runs through autograd, so it is done with gradients enabled, outside inference mode
    (even when called from a validation hook) and with every parameter temporarily requiring
    gradients: a frozen layer would otherwise leave no autograd trace, and its coupling (through a
    residual addition, say) would be lost.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with preserved_training_modes(model), torch.inference_mode(False), torch.enable_grad(), _all_requiring_grad(frozen):
        graph = tp.DependencyGraph()
        graph.build_dependency(
            model,
            example_inputs=example_inputs,
            forward_fn=forward_fn,
            output_transform=output_transform,
            customized_pruners=dict(customized_pruners or {}),
            verbose=False,
        )
    return graph


@dataclass(frozen=True)
class ParamSlice:
    """The part of one parameter that a group's channels own.

    ``param.index_select(dim, idxs)`` are the entries of the group's channels, and ``root_idxs[i]``
    tells which root channel the ``i``-th selected index belongs to (a flatten before a linear layer
    maps one channel to many features; a concatenation shifts the indices).
    """

    name: str  #: qualified parameter name in the model
    param: nn.Parameter
    dim: int
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]
    is_output: bool  #: True when the slice is produced by the channel (filters, BN scales)
    dep_channels: int  #: channel count of the dependency's dimension (in dep coordinates)

    @property
    def removal_ratio(self) -> float:
        """Entries removed along ``dim`` per root channel removed."""
        per_root = len(self.idxs) / max(1, len(set(self.root_idxs)))
        return per_root * self.param.shape[self.dim] / max(1, self.dep_channels)

    @property
    def addressable(self) -> bool:
        """Whether ``idxs`` index ``param`` directly (false for the input side of a grouped conv)."""
        return self.param.shape[self.dim] == self.dep_channels

    def per_channel(self, num_channels: int) -> torch.Tensor | None:
        """The slice as a ``(num_channels, features)`` matrix, one row per root channel.

        Returns None when the slice cannot be split evenly into rows (not addressable, or root
        channels owning different numbers of entries).
        """
        if not self.addressable:
            return None
        counts = torch.bincount(torch.tensor(self.root_idxs), minlength=num_channels)
        if counts.numel() != num_channels or not bool((counts == counts[0]).all()) or counts[0] == 0:
            return None
        order = sorted(range(len(self.idxs)), key=lambda i: self.root_idxs[i])
        idx = torch.tensor([self.idxs[i] for i in order], device=self.param.device)
        selected = self.param.detach().index_select(self.dim, idx).movedim(self.dim, 0)
        return selected.reshape(num_channels, -1)


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels, pruned together.

    ``size`` channels are numbered in the coordinates of the root layer. Layers with channel
    groups (grouped convolutions) force the same positions to be pruned in each of the
    ``channel_groups`` blocks, so the pruning unit is a *position*: ``size // channel_groups`` of
    them, each worth ``channel_groups`` channels.
    """

    index: int
    root_name: str  #: name of the layer whose output channels define the numbering
    size: int
    channel_groups: int
    slices: tuple[ParamSlice, ...]
    module_names: tuple[str, ...]  #: every module the group touches
    tp_group: Any  #: the torch-pruning group with full indices (root dependency first)

    @property
    def positions(self) -> int:
        return self.size // self.channel_groups

    def channels_of_positions(self, positions: Sequence[int]) -> list[int]:
        """Root channel indices of the given positions, repeated in every channel group."""
        block = self.positions
        return sorted(g * block + p for g in range(self.channel_groups) for p in positions)

    def prune(self, channels: Sequence[int]) -> None:
        """Remove ``channels`` (root coordinates) from every coupled layer."""
        root = self.tp_group[0].dep
        graph = self.tp_group._DG
        graph.get_pruning_group(root.target.module, root.handler, list(channels)).prune()


# --------------------------------------------------------------------------------------------
# Which parameters a dependency cuts: asked of torch-pruning itself, not re-implemented per type.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _intercept_parameter_pruning(
    callback: Callable[[BasePruningFunc, nn.Parameter, list[int], int], nn.Parameter],
) -> Iterator[None]:
    """Route every parameter cut of torch-pruning through ``callback``.

    All of torch-pruning's layer pruners (conv, linear, norms, embeddings, attention, RNNs and
    unwrapped parameters) cut parameters through ``BasePruningFunc._prune_parameter_and_grad``;
    intercepting it tells which parameter is cut along which dimension, whatever the layer type.
    """
    original = BasePruningFunc._prune_parameter_and_grad

    def patched(self: BasePruningFunc, weight: nn.Parameter, keep_idxs: list[int], pruning_dim: int):
        return callback(self, weight, keep_idxs, pruning_dim)

    BasePruningFunc._prune_parameter_and_grad = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        BasePruningFunc._prune_parameter_and_grad = original  # type: ignore[method-assign]


def _shallow_proxy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares tensors but whose attribute writes do not reach it."""
    proxy = copy.copy(module)
    proxy._parameters = dict(module._parameters)  # type: ignore[assignment]
    proxy._buffers = dict(module._buffers)  # type: ignore[assignment]
    return proxy


def _probe_cut_dims(dep: Any) -> list[tuple[nn.Parameter, int]]:
    """Parameters (and dims) that ``dep``'s handler cuts, found by a no-op dry run."""
    target = dep.target.module
    seen: list[tuple[nn.Parameter, int]] = []

    def record(_pruner: BasePruningFunc, weight: nn.Parameter, _keep: list[int], dim: int) -> nn.Parameter:
        seen.append((weight, dim))
        return weight  # cut nothing

    handler = dep.handler
    owner = getattr(handler, "__self__", None)
    if owner is not None:
        owner.pruning_dim = dep.target.pruning_dim
    with _intercept_parameter_pruning(record), torch.no_grad():
        if isinstance(target, nn.Parameter):
            handler(target, [])
        elif isinstance(target, nn.Module):
            handler(_shallow_proxy(target), [])
    return seen


def _output_nodes(graph: tp.DependencyGraph) -> set[Any]:
    return {node for node in graph.module2node.values() if len(node.outputs) == 0}


def discover_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    *,
    ignored_modules: Sequence[nn.Module] = (),
    root_module_types: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear),
) -> list[ChannelGroup]:
    """All prunable channel groups of ``model``.

    A group is left out when one of its out-channel dependencies reaches an ignored module, or
    produces the model's output (pruning it would change the output shape).
    """
    module_names = {m: n for n, m in model.named_modules()}
    param_names = {p: n for n, p in model.named_parameters()}
    outputs = _output_nodes(graph)
    groups: list[ChannelGroup] = []
    for tp_group in graph.get_all_groups(ignored_layers=list(ignored_modules), root_module_types=root_module_types):
        root_dep = tp_group[0].dep
        root = root_dep.target.module
        size = graph.get_out_channels(root)
        if not size or size < 2:
            continue
        touches_output = False
        slices: list[ParamSlice] = []
        names: list[str] = []
        channel_groups = 1
        seen_dims: set[tuple[int, int]] = set()
        for item in tp_group:
            dep, idxs = item.dep, item.idxs
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            if is_out and dep.target in outputs:
                touches_output = True
                break
            target = dep.target.module
            if isinstance(target, nn.Module) and target in module_names:
                names.append(module_names[target])
                pruner = graph.get_pruner_of_module(target)
                if pruner is not None and not _is_depthwise(target):
                    getter = pruner.get_out_channel_groups if is_out else pruner.get_in_channel_groups
                    channel_groups = max(channel_groups, int(getter(target) or 1))
            plain = [int(i) for i in tp._helpers.to_plain_idxs(idxs)]
            roots = [int(r) for r in item.root_idxs]
            dep_channels = _dep_channels(graph, dep, is_out)
            for param, dim in _probe_cut_dims(dep):
                key = (id(param), dim)
                if key in seen_dims or param not in param_names:
                    continue
                seen_dims.add(key)
                slices.append(
                    ParamSlice(
                        name=param_names[param],
                        param=param,
                        dim=dim,
                        idxs=tuple(plain),
                        root_idxs=tuple(roots),
                        is_output=is_out,
                        dep_channels=dep_channels if dep_channels else param.shape[dim],
                    )
                )
        if touches_output or not slices:
            continue
        if size % channel_groups:
            continue
        groups.append(
            ChannelGroup(
                index=len(groups),
                root_name=module_names.get(root, str(root)),
                size=int(size),
                channel_groups=channel_groups,
                slices=tuple(slices),
                module_names=tuple(dict.fromkeys(names)),
                tp_group=tp_group,
            )
        )
    return groups


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _dep_channels(graph: tp.DependencyGraph, dep: Any, is_out: bool) -> int | None:
    target = dep.target.module
    if isinstance(target, nn.Parameter):
        return int(target.shape[dep.target.pruning_dim])
    try:
        value = graph.get_out_channels(target) if is_out else graph.get_in_channels(target)
    except Exception:  # pragma: no cover - exotic custom pruners
        return None
    return int(value) if value else None
