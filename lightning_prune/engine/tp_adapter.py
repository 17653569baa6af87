"""The one module that talks to torch-pruning.

Every use of torch-pruning's API, public or private, and both process-wide patches live here, so that
a torch-pruning upgrade touches this file alone. The rest of the library sees plain, typed objects:

* :class:`TracedGraph`: a traced model (torch-pruning's dependency graph, the operations that were
  turned into barriers, the nodes that produce model outputs) with the few questions the library
  asks of it (the pruning history, the modules downstream of a module, a restorable snapshot);
* :class:`RawGroup` / :class:`Coupling`: one set of coupled channels, as the list of layers and
  parameters it touches, with plain index lists; :mod:`lightning_prune.engine.graph` turns them into
  :class:`~lightning_prune.engine.graph.ChannelGroup`;
* :class:`GroupHandle`: cuts channels of one group;
* :func:`intercept_parameter_pruning`: routes every parameter cut through a callback (surgery
  records, dry runs);
* :func:`replay_history`: re-applies recorded surgery (checkpoints).

What torch-pruning gets wrong, and how it is handled here:

* tracing switches every submodule to eval mode and never switches back (the callers restore the
  modes, :func:`lightning_prune._model.preserved_training_modes`);
* a reshape that splits the channel axis (a channel shuffle) makes its index mapping divide by
  zero and abort the whole trace: :func:`tolerant_reshape_mapping` leaves such a reshape unmapped;
* reshapes it cannot map and concatenations or splits of unknown channel sizes are coupled as if
  element-wise: they become barriers (:attr:`TracedGraph.barriers`), and groups that reach one are
  refused by name.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

__all__ = [
    "Coupling",
    "GraphState",
    "GroupHandle",
    "ParameterCut",
    "RawGroup",
    "TracedGraph",
    "intercept_parameter_pruning",
    "replay_history",
    "tolerant_reshape_mapping",
    "trace",
]

#: ``callback(pruner, parameter, kept indices, dim) -> new parameter``: one parameter cut.
ParameterCut = Callable[[Any, nn.Parameter, list[int], int], nn.Parameter]


# --------------------------------------------------------------------------------------------
# Process-wide patches (each restored on exit)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tolerant_reshape_mapping() -> Iterator[None]:
    """Let torch-pruning's tracing survive reshapes it cannot map (e.g. a channel shuffle).

    torch-pruning derives an index mapping for a reshape from the channel counts on both sides and
    divides one by the other; a reshape that splits the channel axis (``view(b, g, c // g, h, w)``)
    makes it divide by zero and abort the whole trace. Such a reshape is left without a mapping;
    the groups built across it are then caught by the trial surgery of
    :func:`~lightning_prune.engine.probe.find_unprunable_groups` and kept at full width.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    original_concat = index_mapping.update_concat_index_mapping

    def tolerant(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except ArithmeticError:
            pass

    def tolerant_concat(graph: Any, node: Any) -> None:
        try:
            original_concat(graph, node)
        except TypeError:  # a channel size it could not infer (None): the concat becomes a barrier
            pass

    index_mapping.update_reshape_index_mapping = tolerant
    index_mapping.update_concat_index_mapping = tolerant_concat
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original
        index_mapping.update_concat_index_mapping = original_concat


@contextlib.contextmanager
def intercept_parameter_pruning(callback: ParameterCut) -> Iterator[None]:
    """Route every parameter cut of torch-pruning through ``callback``.

    All of torch-pruning's layer pruners (conv, linear, norms, embeddings, attention, RNNs and
    unwrapped parameters) cut parameters through ``BasePruningFunc._prune_parameter_and_grad``;
    intercepting it tells which parameter is cut along which dimension, whatever the layer type.
    ``callback`` may call :func:`cut_parameter` to perform the real cut.
    """
    original = BasePruningFunc._prune_parameter_and_grad

    def patched(self: BasePruningFunc, weight: nn.Parameter, keep_idxs: list[int], pruning_dim: int) -> nn.Parameter:
        return callback(self, weight, keep_idxs, pruning_dim)

    BasePruningFunc._prune_parameter_and_grad = patched  # the patch is the point
    try:
        yield
    finally:
        BasePruningFunc._prune_parameter_and_grad = original


def cut_parameter(pruner: Any, weight: nn.Parameter, keep: list[int], dim: int) -> nn.Parameter:
    """torch-pruning's own cut of ``weight`` (a new parameter keeping ``keep`` along ``dim``)."""
    return _ORIGINAL_CUT(pruner, weight, keep, dim)


_ORIGINAL_CUT = BasePruningFunc._prune_parameter_and_grad


def cut_through_interception(weight: nn.Parameter, keep: list[int], dim: int) -> nn.Parameter:
    """Cut ``weight`` as torch-pruning's layer pruners do, through :func:`intercept_parameter_pruning`
    when it is active (for cuts made outside torch-pruning's groups, e.g. attention heads)."""
    return BasePruningFunc._prune_parameter_and_grad(None, weight, keep, dim)


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


class _ReshapeRecorder(torch.overrides.TorchFunctionMode):
    """Records input and output shapes of every reshape-like call during tracing, by grad_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[Any, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
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

    It does for reshapes that keep the batch and channel axes (only trailing axes change), for a
    flatten of everything after the batch axis (``(B, C, H, W) -> (B, C*H*W)``), and for the
    token-major flatten of a channels-last sequence and back (``(B, T, C) <-> (B*T, C)``, as
    transformers' ``Conv1D`` does around its matrix product: the channel axis is untouched).
    """
    if _merges_tokens(before, after) or _merges_tokens(after, before):
        return True
    if len(before) < 2 or len(after) < 2 or before[0] != after[0]:
        return len(before) == len(after) and before == after
    if before[1] == after[1]:
        return True
    return len(after) == 2 and after[1] == math.prod(before[1:])


def _merges_tokens(sequence: tuple[int, ...], rows: tuple[int, ...]) -> bool:
    """``(B, T, C) -> (B*T, C)``: a 3-d channels-last sequence flattened to rows, channels kept."""
    return len(sequence) == 3 and len(rows) == 2 and sequence[2] == rows[1] and sequence[0] * sequence[1] == rows[0]


def _cut_unmappable_ops(
    graph: tp.DependencyGraph, shapes: Mapping[Any, tuple[tuple[int, ...], tuple[int, ...]]]
) -> dict[Any, str]:
    """Turn operations torch-pruning would map wrongly into barriers: reshapes other than a flatten
    or a reshape of the trailing axes (a channel shuffle's ``view``), and concatenations or splits
    whose channel sizes it could not infer (it then couples their inputs as if element-wise).

    Their dependencies are removed, so no group is built across them; the barriers are returned
    (node -> description) so that the groups that reach one are refused by name.
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
    return barriers


class _TransposedLinearPruner(BasePruningFunc):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)`` (``nx``,
    ``nf``), unknown to torch-pruning; registered for it automatically by :func:`trace`."""

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        weight: Any = layer.weight
        keep = sorted(set(range(int(weight.shape[1]))) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        weight: Any = layer.weight
        keep = sorted(set(range(int(weight.shape[0]))) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: Any) -> int:
        return int(layer.weight.shape[1])

    def get_in_channels(self, layer: Any) -> int:
        return int(layer.weight.shape[0])


def _is_transposed_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.") and hasattr(module, "nf")


def _automatic_pruners(model: nn.Module, given: Mapping[Any, Any]) -> dict[Any, Any]:
    """Pruners for layer types torch-pruning does not know but the library does (transformers' ``Conv1D``)."""
    found = {}
    for module in model.modules():
        if _is_transposed_linear(module) and type(module) not in given:
            found[type(module)] = _TransposedLinearPruner()
    return found


@dataclass
class TracedGraph:
    """A traced model: torch-pruning's dependency graph and what was learnt while tracing it.

    Attributes:
        dependency_graph: torch-pruning's :class:`~torch_pruning.DependencyGraph` (read it through
            the methods below; only this module touches it).
        barriers: graph nodes no group may cross (node -> what the operation is).
        output_grad_fns: autograd nodes of the tensors the model returns.
    """

    dependency_graph: tp.DependencyGraph
    barriers: dict[Any, str] = field(default_factory=dict)
    output_grad_fns: set[Any] = field(default_factory=set)
    extra_root_types: tuple[type, ...] = ()  #: layer types given an automatic pruner, roots like linear layers

    def pruning_history(self) -> list[list[Any]]:
        """What was cut through this graph: ``[layer name, is output channels, channel indices]`` entries."""
        return [[str(n), bool(o), [int(i) for i in idxs]] for n, o, idxs in self.dependency_graph.pruning_history()]

    def downstream_modules(self, module: nn.Module) -> list[Any]:
        """Modules (or parameters) reached from ``module``'s output through parameter-free operations
        (ReLU, dropout, ...); empty when ``module`` is not in the graph."""
        node = self.dependency_graph.module2node.get(module)
        if node is None:
            return []
        seen, stack, found = set(), list(node.outputs), []
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            found.append(current.module)
            if isinstance(current.module, nn.Module) and not any(True for _ in current.module.parameters(recurse=False)):
                stack.extend(current.outputs)
        return found

    def output_nodes(self) -> set[Any]:
        """Nodes whose result is a model output: graph leaves, and intermediate results that are also
        returned (an embedding returned next to the logits it feeds)."""
        graph = self.dependency_graph
        return {node for node in graph.module2node.values() if not node.outputs or node.grad_fn in self.output_grad_fns}

    def snapshot(self, model: nn.Module) -> GraphState:
        """The graph's own mutable state (for a trial surgery that must be undone)."""
        return GraphState(self, model)

    def root_groups(
        self,
        module_names: Mapping[Any, str],
        ignored: Sequence[nn.Module],
        root_module_types: tuple[type, ...],
        refused: dict[str, str] | None,
    ) -> Iterator[RawGroup]:
        """Every group of coupled channels rooted at a layer of ``root_module_types``, one root at a time,
        so that one root torch-pruning cannot follow (an index mapping that fails on an exotic reshape
        or split) refuses that root, not the model (``refused``: layer name -> why)."""
        graph = self.dependency_graph
        ignored = list(ignored) + list(graph.IGNORED_LAYERS_IN_TRACING)
        outputs = self.output_nodes()
        visited: set[nn.Module] = set()
        for module in list(graph.module2node):
            if module in ignored or module in visited or not isinstance(module, root_module_types + self.extra_root_types):
                continue
            pruner = graph.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            try:
                with tolerant_reshape_mapping():
                    channels = list(range(pruner.get_out_channels(module)))
                    group = graph.get_pruning_group(module, pruner.prune_out_channels, channels)
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
                yield self._raw_group(group, outputs)

    def _raw_group(self, group: Any, outputs: set[Any]) -> RawGroup:
        graph = self.dependency_graph
        root = group[0].dep.target.module
        couplings = []
        for item in group:
            dep = item.dep
            is_out = bool(graph.is_out_channel_pruning_fn(dep.handler))
            target = dep.target.module
            couplings.append(
                Coupling(
                    target=target,
                    is_output=is_out,
                    idxs=tuple(int(i) for i in tp._helpers.to_plain_idxs(item.idxs)),
                    root_idxs=tuple(int(r) for r in item.root_idxs),
                    dep_channels=_dep_channels(graph, dep, is_out),
                    reaches_output=is_out and dep.target in outputs,
                    _graph=graph,
                    _dep=dep,
                )
            )
        return RawGroup(
            root=root,
            size=graph.get_out_channels(root),
            barrier=self._barrier_reached(group),
            couplings=tuple(couplings),
            handle=GroupHandle(graph, group[0].dep),
        )

    def _barrier_reached(self, group: Any) -> str | None:
        """Description of a barrier next to the group, if any."""
        if not self.barriers:
            return None
        graph = self.dependency_graph
        for item in group:
            node = item.dep.target
            if node.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR):
                # A layer's output channels meet what follows it, its input channels what precedes it.
                neighbours = node.outputs if graph.is_out_channel_pruning_fn(item.dep.handler) else node.inputs
            else:  # depthwise convs, norms, element-wise and joining operations pass channels straight through
                neighbours = node.inputs + node.outputs
            for neighbour in neighbours:
                if neighbour in self.barriers:
                    return self.barriers[neighbour]
        return None


@contextlib.contextmanager
def _all_requiring_grad(frozen: Sequence[nn.Parameter]) -> Iterator[None]:
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    customized_pruners: Mapping[Any, Any] | None = None,
) -> TracedGraph:
    """Trace ``model`` into a torch-pruning dependency graph (the caller restores train/eval modes).

    Tracing runs through autograd, so it is done with gradients enabled, outside inference mode
    (even when called from a validation hook) and with every parameter temporarily requiring
    gradients: a frozen layer would otherwise leave no autograd trace, and its coupling (through a
    residual addition, say) would be lost.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with torch.inference_mode(False), torch.enable_grad(), _all_requiring_grad(frozen), tolerant_reshape_mapping():
        graph = tp.DependencyGraph()
        automatic = _automatic_pruners(model, customized_pruners or {})
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
                customized_pruners={**automatic, **dict(customized_pruners or {})},
                verbose=False,
            )
        barriers = _cut_unmappable_ops(graph, recorder.shapes)
    return TracedGraph(
        dependency_graph=graph, barriers=barriers, output_grad_fns=outputs, extra_root_types=tuple(automatic)
    )


# --------------------------------------------------------------------------------------------
# Groups in plain terms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coupling:
    """One layer (or parameter) a group's channels reach, with plain index lists.

    Attributes:
        target: the module or unwrapped parameter (torch-pruning's own operator nodes, such as a
            concatenation, are modules the model does not own).
        is_output: the group's channels are this target's *output* channels.
        idxs: the target's channel indices that belong to the group.
        root_idxs: for each of ``idxs``, the root channel it belongs to.
        dep_channels: the target's channel count along the cut dimension (None if unknown).
        reaches_output: the target produces a model output with these channels.
    """

    target: Any
    is_output: bool
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]
    dep_channels: int | None
    reaches_output: bool
    _graph: Any = field(repr=False, compare=False)
    _dep: Any = field(repr=False, compare=False)

    def channel_groups(self) -> int:
        """How many blocks the target splits its channels into (grouped convolutions, attention
        heads); 1 otherwise (depthwise convolutions prune position-wise)."""
        return _channel_groups(self._graph, self.target, self.is_output)

    def cut_dims(self) -> list[tuple[nn.Parameter, int]]:
        """Parameters (and dims) that cutting this coupling cuts, found by a no-op dry run of
        torch-pruning's own pruner for it (no per-layer-type table)."""
        dep = self._dep
        target = dep.target.module
        seen: list[tuple[nn.Parameter, int]] = []

        def record(_pruner: Any, weight: nn.Parameter, _keep: list[int], dim: int) -> nn.Parameter:
            seen.append((weight, dim))
            return weight  # cut nothing

        handler = dep.handler
        owner = getattr(handler, "__self__", None)
        if owner is not None:
            owner.pruning_dim = dep.target.pruning_dim
        with intercept_parameter_pruning(record), torch.no_grad():
            if isinstance(target, nn.Parameter):
                handler(target, [])
            elif isinstance(target, nn.Module):
                handler(_shallow_proxy(target), [])
        return seen


@dataclass(frozen=True)
class GroupHandle:
    """Cuts channels of one group (in root coordinates) from every coupled layer."""

    _graph: Any = field(repr=False)
    _root: Any = field(repr=False)

    def prune(self, channels: Sequence[int]) -> None:
        with tolerant_reshape_mapping():
            self._graph.get_pruning_group(self._root.target.module, self._root.handler, list(channels)).prune()


@dataclass(frozen=True)
class RawGroup:
    """One set of coupled channels as torch-pruning describes it."""

    root: nn.Module
    size: int | None
    barrier: str | None  #: a barrier the group reaches (it cannot be cut), else None
    couplings: tuple[Coupling, ...]
    handle: GroupHandle


def _shallow_proxy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares tensors but whose attribute writes do not reach it."""
    proxy = copy.copy(module)
    proxy._parameters = dict(module._parameters)
    proxy._buffers = dict(module._buffers)
    return proxy


def _is_depthwise(module: Any) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _channel_groups(graph: tp.DependencyGraph, target: Any, is_out: bool) -> int:
    if not isinstance(target, nn.Module):
        return 1
    if isinstance(target, nn.MultiheadAttention):  # every head keeps the same width
        return int(target.num_heads)
    pruner = graph.get_pruner_of_module(target)
    if pruner is None or _is_depthwise(target):
        return 1
    getter = pruner.get_out_channel_groups if is_out else pruner.get_in_channel_groups
    return int(getter(target) or 1)


def _dep_channels(graph: tp.DependencyGraph, dep: Any, is_out: bool) -> int | None:
    target = dep.target.module
    if isinstance(target, nn.Parameter):
        return int(target.shape[dep.target.pruning_dim])
    try:
        value = graph.get_out_channels(target) if is_out else graph.get_in_channels(target)
    except Exception:  # pragma: no cover - exotic custom pruners
        return None
    return int(value) if value else None


# --------------------------------------------------------------------------------------------
# Undo and replay
# --------------------------------------------------------------------------------------------


class GraphState:
    """The graph-internal state a cut changes: operator state (concat/split sizes, slice bounds), the
    pruning history, and the node and name tables of unwrapped parameters (pruning one rebinds the
    node, the node table and the name table to the new tensor). The model's own tensors are not
    included (:class:`~lightning_prune.engine.surgery.ModuleSnapshot` keeps those)."""

    def __init__(self, traced: TracedGraph, model: nn.Module) -> None:
        graph = traced.dependency_graph
        own = set(model.modules())
        self._ops = [
            (op, {k: copy.copy(v) for k, v in vars(op).items() if isinstance(v, (list, tuple, int, float))})
            for op in graph.module2node
            if isinstance(op, nn.Module) and op not in own
        ]
        self._graph = graph
        self._history = len(graph._pruning_history)
        self._module2node = dict(graph.module2node)
        self._node_modules = [(node, node.module) for node in graph.module2node.values()]
        self._param_to_name = dict(graph._param_to_name)

    def restore(self) -> None:
        for op, attrs in self._ops:
            vars(op).update({k: copy.copy(v) for k, v in attrs.items()})
        graph = self._graph
        del graph._pruning_history[self._history :]
        graph.module2node.clear()
        graph.module2node.update(self._module2node)
        for node, module in self._node_modules:
            node.module = module
        graph._param_to_name.clear()
        graph._param_to_name.update(self._param_to_name)


def replay_history(traced: TracedGraph, entries: Sequence[Sequence[Any]]) -> None:
    """Cut what ``entries`` (``[layer name, is output channels, channel indices]``) record."""
    with torch.no_grad(), tolerant_reshape_mapping():
        traced.dependency_graph.load_pruning_history([[n, bool(o), list(i)] for n, o, i in entries])
