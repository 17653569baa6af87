"""The dependency graph: which channels are coupled, and which parameter slices each one owns.

Everything here sits on top of torch-pruning's :class:`~torch_pruning.DependencyGraph`. It adds
three things the pruning engine needs and torch-pruning does not offer:

* tracing that leaves the model as it found it (torch-pruning's tracing switches every submodule
  to eval mode and never switches back, see ``docs/integration.md`` section
  "Tracing leaves the model in eval mode");
* :class:`ChannelGroup`, a frozen description of one set of coupled channels (a conv, its BN, the
  residual partners, the consumers' input channels) with the parameter slices each channel owns;
* the exclusion of groups that would change the model's output shape (the classifier's outputs).
"""

from __future__ import annotations

import contextlib
import copy
import math
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


@contextlib.contextmanager
def _tolerant_reshape_mapping() -> Iterator[None]:
    """Let torch-pruning's tracing survive reshapes it cannot map (e.g. a channel shuffle).

    torch-pruning derives an index mapping for a reshape from the channel counts on both sides and
    divides one by the other; a reshape that splits the channel axis (``view(b, g, c // g, h, w)``)
    makes it divide by zero and abort the whole trace. Such a reshape is left without a mapping;
    the groups built across it are then caught by the trial surgery of
    :func:`~lightning_prune.engine.probe.find_unprunable_groups` and kept at full width.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def tolerant(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except ArithmeticError:
            pass

    index_mapping.update_reshape_index_mapping = tolerant
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


class _ReshapeRecorder(torch.overrides.TorchFunctionMode):
    """Records input and output shapes of every reshape-like call during tracing, by grad_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[Any, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        grad_fn = getattr(result, "grad_fn", None)
        if grad_fn is not None and isinstance(result, torch.Tensor):
            name = grad_fn.name().lower()
            source = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if ("view" in name or "reshape" in name) and source is not None:
                self.shapes[grad_fn] = (tuple(source.shape), tuple(result.shape))
        return result


def _mappable_reshape(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether torch-pruning's reshape mapping describes this reshape correctly.

    It does for reshapes that keep the batch and channel axes (only trailing axes change) and for a
    flatten of everything after the batch axis (``(B, C, H, W) -> (B, C*H*W)``).
    """
    if len(before) < 2 or len(after) < 2 or before[0] != after[0]:
        return len(before) == len(after) and before == after
    if before[1] == after[1]:
        return True
    return len(after) == 2 and after[1] == math.prod(before[1:])


def _cut_unmappable_ops(graph: tp.DependencyGraph, shapes: Mapping[Any, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """Turn operations torch-pruning would map wrongly into barriers: reshapes other than a flatten
    or a reshape of the trailing axes (a channel shuffle's ``view``), and concatenations or splits
    whose channel sizes it could not infer (it then couples their inputs as if element-wise).

    Their dependencies are removed, so no group is built across them, and they are listed in
    ``graph.lp_barriers`` (node -> description) so that :func:`discover_groups` refuses the groups
    that reach one.
    """
    barriers: dict[Any, str] = {}
    for node in graph.module2node.values():
        if node.type in (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT):
            sizes = getattr(node.module, "concat_sizes" if node.type == tp.ops.OPTYPE.CONCAT else "split_sizes", None)
            if sizes is None or any(size is None for size in sizes):
                barriers[node] = f"{node.grad_fn.name() if node.grad_fn is not None else 'concat/split'} of unknown channel sizes"
            continue
        if node.type != tp.ops.OPTYPE.RESHAPE:
            continue
        if node.grad_fn not in shapes:
            continue  # a view made inside another operation (e.g. linear on 3-d input): torch-pruning's own rule
        before, after = shapes[node.grad_fn]
        if not _mappable_reshape(before, after):
            barriers[node] = f"{node.grad_fn.name()} {before} -> {after}"
    for node in barriers:
        node.dependencies = []
        for other in node.inputs + node.outputs:
            other.dependencies = [d for d in other.dependencies if d.target is not node]
    graph.lp_barriers = barriers  # type: ignore[attr-defined]


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
    with (
        preserved_training_modes(model),
        torch.inference_mode(False),
        torch.enable_grad(),
        _all_requiring_grad(frozen),
        _tolerant_reshape_mapping(),
    ):
        graph = tp.DependencyGraph()
        recorder = _ReshapeRecorder()
        outputs: set[Any] = set()

        def record_outputs(output: Any) -> Any:
            traced = output_transform(output) if output_transform is not None else output
            for tensor in tp.utils.flatten_as_list(traced):
                if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                    outputs.add(tensor.grad_fn)
            return traced

        with recorder:
            graph.build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=forward_fn,
                output_transform=record_outputs,
                customized_pruners=dict(customized_pruners or {}),
                verbose=False,
            )
        _cut_unmappable_ops(graph, recorder.shapes)
    graph.lp_output_grad_fns = outputs  # type: ignore[attr-defined]
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
        with _tolerant_reshape_mapping():
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
    """Nodes whose result is a model output: graph leaves, and intermediate results that are also
    returned (an embedding returned next to the logits it feeds)."""
    returned = getattr(graph, "lp_output_grad_fns", set())
    return {node for node in graph.module2node.values() if not node.outputs or node.grad_fn in returned}


def discover_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    *,
    ignored_modules: Sequence[nn.Module] = (),
    root_module_types: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear),
    refused: dict[str, str] | None = None,
) -> list[ChannelGroup]:
    """All prunable channel groups of ``model``.

    A group is left out when one of its out-channel dependencies reaches an ignored module, or
    produces the model's output (pruning it would change the output shape). Layers whose group
    torch-pruning fails to build are left out too, and reported in ``refused`` (layer name ->
    error) when a dict is given.
    """
    module_names = {m: n for n, m in model.named_modules()}
    param_names = {p: n for n, p in model.named_parameters()}
    outputs = _output_nodes(graph)
    groups: list[ChannelGroup] = []
    for tp_group in _root_groups(graph, module_names, list(ignored_modules), root_module_types, refused):
        root_dep = tp_group[0].dep
        root = root_dep.target.module
        size = graph.get_out_channels(root)
        if not size or size < 2:
            continue
        barrier = _barrier_reached(graph, tp_group)
        if barrier is not None:
            if refused is not None:
                coupled = [module_names[i.dep.target.module] for i in tp_group if i.dep.target.module in module_names]
                coupled = list(dict.fromkeys(coupled))
                refused[module_names.get(root, str(root))] = (
                    f"its channels reach an operation torch-pruning cannot map ({barrier}); coupled layers: "
                    + ", ".join(coupled[:6])
                    + (", ..." if len(coupled) > 6 else "")
                )
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
                if isinstance(target, nn.MultiheadAttention):  # every head keeps the same width
                    channel_groups = max(channel_groups, int(target.num_heads))
                elif pruner is not None and not _is_depthwise(target):
                    getter = pruner.get_out_channel_groups if is_out else pruner.get_in_channel_groups
                    channel_groups = max(channel_groups, int(getter(target) or 1))
            plain = [int(i) for i in tp._helpers.to_plain_idxs(idxs)]
            roots = [int(r) for r in item.root_idxs]
            dep_channels = _dep_channels(graph, dep, is_out)
            if not isinstance(target, nn.Parameter) and target not in module_names:
                continue  # torch-pruning's own operator nodes (concat, split, reshape): no parameters
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


def _barrier_reached(graph: tp.DependencyGraph, tp_group: Any) -> str | None:
    """Description of a reshape barrier (see :func:`_cut_unmappable_reshapes`) next to the group."""
    barriers = getattr(graph, "lp_barriers", {})
    if not barriers:
        return None
    for item in tp_group:
        node = item.dep.target
        if node.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR):
            # A layer's output channels meet what follows it, its input channels what precedes it.
            neighbours = node.outputs if graph.is_out_channel_pruning_fn(item.dep.handler) else node.inputs
        else:  # depthwise convs, norms, element-wise and joining operations pass channels straight through
            neighbours = node.inputs + node.outputs
        for neighbour in neighbours:
            if neighbour in barriers:
                return barriers[neighbour]
    return None


def _root_groups(
    graph: tp.DependencyGraph,
    module_names: Mapping[nn.Module, str],
    ignored: list[nn.Module],
    root_module_types: tuple[type, ...],
    refused: dict[str, str] | None,
) -> Iterator[Any]:
    """torch-pruning's ``get_all_groups``, one root at a time, so that one root it cannot follow
    (an index mapping that fails on an exotic reshape or split) refuses that root, not the model."""
    ignored = ignored + list(graph.IGNORED_LAYERS_IN_TRACING)
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if module in ignored or module in visited or not isinstance(module, root_module_types):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            with _tolerant_reshape_mapping():
                group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
        except Exception as error:  # noqa: BLE001 - torch-pruning's index mappings fail in many ways
            if refused is not None:
                refused[module_names.get(module, str(module))] = (
                    f"torch-pruning could not follow its channels ({type(error).__name__}: {error})"
                )
            continue
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                prunable = prunable and dep.target.module not in ignored
        if prunable:
            yield group


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
