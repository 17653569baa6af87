"""Companions: copies of (a part of) the pruned model that must be cut the same way.

Weight averaging keeps a second copy of the model's tensors (an ``AveragedModel``, a deep copy for
SWA). After a prune that copy still has the dense shapes, so the first averaging update fails. A
*companion* is such a copy: a module structurally identical to the model (``prefix=""``) or to one
of its submodules (``prefix="net"``: a copy of ``model.net``). It is given the same cut as the
model by replaying the step's surgery (torch-pruning history, buffers such as BN running
statistics included) on its own dependency graph; its values are only selected (kept channels), so
an average continues over the kept channels.

``torch.optim.swa_utils.AveragedModel`` submodules of the model itself are found here
(:func:`averaged_submodules`); they are never part of the traced graph (the forward does not call
them), never counted in the model's cost (:func:`own_parameters`), and cut as companions.

Nothing here imports Lightning: the Lightning callbacks that hold averaged copies are found in
:mod:`lightning_prune.averaging`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_prune._batch import to_device
from lightning_prune._model import eval_forward
from lightning_prune.engine.attention import replay
from lightning_prune.engine.graph import build_dependency_graph

__all__ = [
    "Companion",
    "CompanionError",
    "as_companions",
    "averaged_part",
    "averaged_submodules",
    "capture_companion_inputs",
    "check_companion_shapes",
    "cut_companion",
    "own_parameters",
    "structure_signature",
]


class CompanionError(ValueError):
    """A companion does not match the model it should follow."""


@dataclass(frozen=True)
class Companion:
    """A copy of ``model`` (``prefix=""``) or of ``model.get_submodule(prefix)``, cut like it."""

    module: nn.Module
    prefix: str = ""
    name: str = ""  #: how to call it in messages (e.g. ``"StochasticWeightAveraging._average_model"``)

    def describe(self) -> str:
        return self.name or (f"the copy of '{self.prefix}'" if self.prefix else "a copy of the model")


def as_companions(items: Sequence[nn.Module | Companion]) -> list[Companion]:
    """Plain modules are copies of the whole model."""
    out = []
    for item in items:
        if isinstance(item, Companion):
            out.append(item)
        elif isinstance(item, nn.Module):
            out.append(Companion(item))
        else:
            raise TypeError(f"companions must hold nn.Module or Companion objects, got {type(item).__name__}")
    return out


def _averaged_paths(model: nn.Module) -> list[tuple[str, AveragedModel]]:
    """Outermost ``AveragedModel`` submodules of ``model`` (not ``model`` itself), by name."""
    found: list[tuple[str, AveragedModel]] = []
    for name, module in model.named_modules():
        if name and isinstance(module, AveragedModel) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def own_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """``model.parameters()`` without those of ``AveragedModel`` submodules (averaged copies are not the
    model: they cost nothing at inference and must not count towards a parameter target)."""
    inside = {id(p) for _, avg in _averaged_paths(model) for p in avg.parameters()}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in inside and id(p) not in seen:
            seen.add(id(p))
            yield p


def structure_signature(module: nn.Module) -> list[Any]:
    """Module types, parameter and buffer names and shapes: what two copies of a model share."""
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    return [type(m).__name__ for m in module.modules()] + [(n, tuple(t.shape)) for n, t in tensors]


def averaged_part(model: nn.Module, averaged: nn.Module, label: str, exclude: Sequence[str] = ()) -> str:
    """The name of the one submodule of ``model`` (outside ``exclude`` and any ``AveragedModel``) with the
    structure of ``averaged`` (module types, parameter and buffer names and shapes).

    Raises:
        CompanionError: no part, or several parts, match; the message names ``label`` and the way out.
    """
    skip = [p for p, _ in _averaged_paths(model)] + list(exclude)
    wanted = structure_signature(averaged)
    matches = [
        name
        for name, module in model.named_modules()
        if name
        and not any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in skip)
        and structure_signature(module) == wanted
    ]
    if len(matches) != 1:
        what = "no part of the model" if not matches else f"several parts of the model ({', '.join(matches[:4])})"
        raise CompanionError(
            f"{label} averages a module with the structure of {what}, so lightning-prune cannot cut it like the "
            "part it averages; average the module the model runs (e.g. AveragedModel(self.net)), or create the "
            "AveragedModel after pruning (e.g. in a separate fine-tuning fit that starts from "
            "lightning_prune.load_pruned)"
        )
    return matches[0]


def averaged_submodules(model: nn.Module) -> list[Companion]:
    """The ``AveragedModel`` submodules of ``model`` as companions of the part of ``model`` they average.

    The averaged part is found by structure (:func:`averaged_part`); call this while both have the
    same structure (before a step, or on a dense model).

    Raises:
        CompanionError: no part, or several parts, of the model match.
    """
    companions = []
    for path, avg in _averaged_paths(model):
        label = f"AveragedModel '{path}'"
        companions.append(Companion(avg.module, prefix=averaged_part(model, avg.module, label), name=label))
    return companions


def _forward_with_kwargs(module: nn.Module, inputs: Any) -> Any:
    args, kwargs = inputs
    return module(*args, **kwargs)


def capture_companion_inputs(
    model: nn.Module, example_inputs: Any, companions: Sequence[Companion]
) -> list[tuple[Any, Callable[[nn.Module, Any], Any] | None]]:
    """Tracing inputs for each companion, taken from ``model`` as it is now (call before the surgery).

    A copy of the whole model is traced with ``example_inputs``; a copy of ``model.<prefix>`` with
    what that submodule receives when the model runs on ``example_inputs`` (its first call), with a
    ``forward_fn`` when it takes keyword arguments.
    """
    prefixes = sorted({c.prefix for c in companions if c.prefix})
    seen: dict[str, tuple[Any, Callable[[nn.Module, Any], Any] | None]] = {}
    if prefixes:
        handles = []

        def catcher(prefix: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if prefix not in seen:
                    seen[prefix] = ((args, dict(kwargs)), _forward_with_kwargs) if kwargs else (args, None)

            return hook

        for prefix in prefixes:
            handles.append(model.get_submodule(prefix).register_forward_pre_hook(catcher(prefix), with_kwargs=True))
        try:
            eval_forward(model, example_inputs)
        finally:
            for handle in handles:
                handle.remove()
        missing = [p for p in prefixes if p not in seen]
        if missing:
            raise CompanionError(
                f"the averaged copy of '{missing[0]}' cannot be cut: the model's forward never calls '{missing[0]}'"
            )
    return [(example_inputs, None) if not c.prefix else seen[c.prefix] for c in companions]


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def check_companion_shapes(model: nn.Module, companion: Companion) -> None:
    """Every parameter and buffer of the companion has the shape of its counterpart in the model."""
    target = model.get_submodule(companion.prefix) if companion.prefix else model
    want = dict(itertools.chain(target.named_parameters(), target.named_buffers()))
    for name, tensor in itertools.chain(companion.module.named_parameters(), companion.module.named_buffers()):
        other = want.get(name)
        if other is not None and other.shape != tensor.shape:
            raise CompanionError(
                f"{companion.describe()}: '{name}' has shape {tuple(tensor.shape)} after the cut, the model "
                f"{tuple(other.shape)}; its channels are coupled to layers outside the copied part"
            )


def cut_companion(
    companion: Companion,
    inputs: tuple[Any, Callable[[nn.Module, Any], Any] | None],
    surgery: Sequence[Sequence[Any]],
    *,
    output_transform: Callable[[Any], Any] | None = None,
) -> None:
    """Replay ``surgery`` (one step's history, layer names of the model) on the companion, and on the
    ``AveragedModel`` submodules inside it. Not atomic by itself: callers snapshot the companion.

    Raises:
        CompanionError: the companion does not follow the model's structure.
    """
    prefix = companion.prefix
    if prefix:
        cut = len(prefix) + 1
        entries = [[n[cut:], o, i] for n, o, i in surgery if n.startswith(prefix + ".")]
    else:
        entries = [list(e) for e in surgery]
    module = companion.module
    names = dict(module.named_modules())
    for name, _o, _i in entries:
        if name not in names:
            raise CompanionError(f"{companion.describe()} has no layer '{name}': it is not a copy of the model")
    if not entries:
        return
    example, forward_fn = inputs
    example = to_device(example, _device_of(module))
    inner = averaged_submodules(module)
    inner_inputs = capture_companion_inputs(module, example, inner) if inner else []
    graph = build_dependency_graph(
        module, example, forward_fn=forward_fn, output_transform=None if prefix else output_transform
    )
    replay(graph, module, entries)
    for sub, sub_inputs in zip(inner, inner_inputs):
        cut_companion(sub, sub_inputs, entries)
        check_companion_shapes(module, sub)
