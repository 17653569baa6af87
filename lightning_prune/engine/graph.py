"""The dependency graph: which channels are coupled, and which parameter slices each one owns.

Built on torch-pruning's dependency graph, reached only through
:mod:`lightning_prune.engine.tp_adapter`. This module adds what the pruning engine needs and
torch-pruning does not offer:

* tracing that leaves the model as it found it (torch-pruning's tracing switches every submodule
  to eval mode and never switches back, see ``docs/integration.md`` section
  "Tracing leaves the model in eval mode");
* :class:`ChannelGroup`, a frozen description of one set of coupled channels (a conv, its BN, the
  residual partners, the consumers' input channels) with the parameter slices each channel owns;
* the exclusion of groups that would change the model's output shape (the classifier's outputs)
  or that reach an operation torch-pruning cannot map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from lightning_prune._model import preserved_training_modes
from lightning_prune.engine.tp_adapter import TracedGraph, trace

__all__ = [
    "ChannelGroup",
    "ParamSlice",
    "TracedGraph",
    "build_dependency_graph",
    "discover_groups",
    "preserved_training_modes",
]


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    customized_pruners: Mapping[Any, Any] | None = None,
) -> TracedGraph:
    """Trace ``model`` (see :func:`~lightning_prune.engine.tp_adapter.trace`), leaving its train/eval
    modes intact."""
    with preserved_training_modes(model):
        return trace(
            model,
            example_inputs,
            forward_fn=forward_fn,
            output_transform=output_transform,
            customized_pruners=customized_pruners,
        )


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


class Cutter(Protocol):
    """Cuts root channels of one group from every layer it couples (a :class:`GroupHandle` for
    torch-pruning's groups, :class:`~lightning_prune.engine.attention.HeadHandle` for attention heads)."""

    def prune(self, channels: Sequence[int]) -> None: ...


#: What a group's channels are, structurally (see :mod:`lightning_prune.engine.scope`).
GroupKind = str


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels, pruned together.

    ``size`` channels are numbered in the coordinates of the root layer. Layers with channel
    groups (grouped convolutions, the heads of an attention whose head width is narrowed) force the
    same positions to be pruned in each of the ``channel_groups`` blocks; a ``block`` > 1 makes a
    position ``block`` consecutive channels (a whole attention head of ``head_dim`` channels). The
    pruning unit is a *position*: ``size // (channel_groups * block)`` of them, each worth
    :attr:`unit` channels.
    """

    index: int
    root_name: str  #: name of the layer whose output channels define the numbering
    size: int
    channel_groups: int
    slices: tuple[ParamSlice, ...]
    module_names: tuple[str, ...]  #: every module the group touches
    handle: Cutter  #: cuts the group's channels (torch-pruning's group, through the adapter)
    block: int = 1  #: consecutive channels per position (``head_dim`` for whole-head groups)
    kind: GroupKind = "mlp"  #: ``"mlp"``, ``"heads"``, ``"embedding"`` or ``"other"`` (the ``scope`` classes)
    #: (module, site) whose activation holds the channels; None: the root's output
    observed: tuple[str, Literal["output", "input"]] | None = None

    @property
    def observation(self) -> tuple[str, Literal["output", "input"]]:
        """Where activation criteria observe the group's channels: ``(module name, "output" | "input")``
        (the root's output, or for a head group the output projection's input: the heads' outputs)."""
        return self.observed if self.observed is not None else (self.root_name, "output")

    @property
    def positions(self) -> int:
        return self.size // (self.channel_groups * self.block)

    @property
    def unit(self) -> int:
        """Channels removed per position removed."""
        return self.channel_groups * self.block

    def channels_of_positions(self, positions: Sequence[int]) -> list[int]:
        """Root channel indices of the given positions, repeated in every channel group (each
        position's ``block`` consecutive channels)."""
        if self.block == 1:
            block = self.positions
            return sorted(g * block + p for g in range(self.channel_groups) for p in positions)
        per_group = self.size // self.channel_groups
        return sorted(
            g * per_group + p * self.block + j for g in range(self.channel_groups) for p in positions for j in range(self.block)
        )

    def position_scores(self, scores: Any) -> Any:
        """Per-channel scores (``size``) reduced to one per position: the mean over its channels."""
        if self.block == 1:
            return scores.view(self.channel_groups, self.positions).mean(0)
        return scores.view(self.channel_groups, self.positions, self.block).mean(dim=(0, 2))

    def prune(self, channels: Sequence[int]) -> None:
        """Remove ``channels`` (root coordinates) from every coupled layer."""
        self.handle.prune(channels)


def discover_groups(
    model: nn.Module,
    graph: TracedGraph,
    *,
    ignored_modules: Sequence[nn.Module] = (),
    root_module_types: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear),
    refused: dict[str, str] | None = None,
) -> list[ChannelGroup]:
    """All prunable channel groups of ``model``.

    A group is left out when one of its out-channel dependencies reaches an ignored module, or
    produces the model's output (pruning it would change the output shape). Layers whose group
    torch-pruning fails to build, or whose channels reach a barrier, are left out too, and reported
    in ``refused`` (layer name -> why) when a dict is given.
    """
    module_names = {m: n for n, m in model.named_modules()}
    param_names = {p: n for n, p in model.named_parameters()}
    groups: list[ChannelGroup] = []
    for raw in graph.root_groups(module_names, list(ignored_modules), root_module_types, refused):
        size = raw.size
        if not size or size < 2:
            continue
        if raw.barrier is not None:
            if refused is not None:
                coupled = [module_names[c.target] for c in raw.couplings if c.target in module_names]
                coupled = list(dict.fromkeys(coupled))
                refused[module_names.get(raw.root, str(raw.root))] = (
                    f"its channels reach an operation torch-pruning cannot map ({raw.barrier}); coupled layers: "
                    + ", ".join(coupled[:6])
                    + (", ..." if len(coupled) > 6 else "")
                )
            continue
        touches_output = False
        slices: list[ParamSlice] = []
        names: list[str] = []
        channel_groups = 1
        seen_dims: set[tuple[int, int]] = set()
        for coupling in raw.couplings:
            if coupling.reaches_output:
                touches_output = True
                break
            target = coupling.target
            if isinstance(target, nn.Module) and target in module_names:
                names.append(module_names[target])
                channel_groups = max(channel_groups, coupling.channel_groups())
            if not isinstance(target, nn.Parameter) and target not in module_names:
                continue  # torch-pruning's own operator nodes (concat, split, reshape): no parameters
            for param, dim in coupling.cut_dims():
                key = (id(param), dim)
                if key in seen_dims or param not in param_names:
                    continue
                seen_dims.add(key)
                slices.append(
                    ParamSlice(
                        name=param_names[param],
                        param=param,
                        dim=dim,
                        idxs=coupling.idxs,
                        root_idxs=coupling.root_idxs,
                        is_output=coupling.is_output,
                        dep_channels=coupling.dep_channels if coupling.dep_channels else param.shape[dim],
                    )
                )
        if touches_output or not slices:
            continue
        if size % channel_groups:
            continue
        groups.append(
            ChannelGroup(
                index=len(groups),
                root_name=module_names.get(raw.root, str(raw.root)),
                size=int(size),
                channel_groups=channel_groups,
                slices=tuple(slices),
                module_names=tuple(dict.fromkeys(names)),
                handle=raw.handle,
            )
        )
    return groups
