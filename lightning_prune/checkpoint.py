"""Pruned checkpoints: restore the pruned structure on a freshly built (dense) model.

A checkpoint written during or after pruning holds the callback's state (plain data, loads with
``torch.load(weights_only=True)``): per step, the surgery as torch-pruning history entries
``[layer name, is output channels, channel indices]`` (:attr:`PruningRecord.surgery`), and the
example inputs used for tracing. Replaying the steps in order on the dense model reproduces the
pruned structure exactly; then the weights load.

* Resuming ``trainer.fit(model, ckpt_path=...)`` with a fresh dense model: the callback does this
  by itself, before the weights load (:func:`install_resume_guard` wraps the module's
  ``on_load_checkpoint``).
* Inference: :func:`load_pruned` is the counterpart of ``LightningModule.load_from_checkpoint``.
* A plain ``nn.Module``: :func:`restore_pruned_structure`.

A record that does not fit the model (another architecture, a missing layer) raises a
``ValueError`` naming the layer, and the model is left as it was: never half-pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_prune._batch import to_device
from lightning_prune.engine.companions import (
    Companion,
    as_companions,
    averaged_submodules,
    capture_companion_inputs,
    check_companion_shapes,
    cut_companion,
)
from lightning_prune.engine.graph import build_dependency_graph
from lightning_prune.engine.pruner import layer_widths
from lightning_prune.engine.surgery import ModuleSnapshot
from lightning_prune.engine.tp_adapter import replay_history

__all__ = [
    "CALLBACK_STATE_KEY",
    "STATE_MARKER",
    "STATE_VERSION",
    "callback_state",
    "callback_states",
    "install_resume_guard",
    "load_pruned",
    "replay_surgery",
    "restore_pruned_structure",
]

CALLBACK_STATE_KEY = "StructuredPruningCallback"
STATE_VERSION = 2
#: The field that marks a callback state as ours, whatever its key (subclasses, ``name=``).
STATE_MARKER = "lightning_prune"

_M = TypeVar("_M", bound=nn.Module)


def _is_ours(key: str, value: Any) -> bool:
    if not isinstance(value, Mapping):
        return False
    if value.get(STATE_MARKER):
        return True
    return key.startswith(CALLBACK_STATE_KEY) and "history" in value  # written before the marker existed


def callback_states(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every lightning-prune callback state in a Lightning checkpoint, by state key.

    States are recognised by their content (the :data:`STATE_MARKER` field), so a subclass with its
    own ``state_key`` or a callback with a ``name`` is found; states written before the marker existed
    are recognised by the key prefix ``"StructuredPruningCallback"``.
    """
    return {str(k): dict(v) for k, v in checkpoint.get("callbacks", {}).items() if _is_ours(str(k), v)}


def _order(record: Mapping[str, Any]) -> int:
    order = record.get("order")
    return int(order) if order is not None else int(record.get("step", 0))


def merge_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One state holding every callback's steps in the order they ran (records' ``order``; records
    without one, from before several callbacks were supported, by their ``step``)."""
    if not states:
        return None
    if len(states) == 1:
        return dict(states[0])
    records = sorted(
        ((_order(r), i, j, r) for i, s in enumerate(states) for j, r in enumerate(s.get("history", []))),
        key=lambda t: t[:3],
    )
    orders = [o for o, *_ in records]
    if len(set(orders)) != len(orders):
        raise ValueError(
            "the checkpoint holds pruning steps of several callbacks with the same order; it cannot tell in which "
            "order to replay them (were the callbacks' records written by an older version?)"
        )
    first = records[0][1] if records else 0
    inputs = states[first].get("example_inputs")
    if inputs is None:
        inputs = next((s.get("example_inputs") for s in states if s.get("example_inputs") is not None), None)
    merged = dict(states[first])
    merged.update(history=[r for *_, r in records], example_inputs=inputs)
    return merged


def callback_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pruning state of a Lightning checkpoint, or None: the callback's state, or, when several
    lightning-prune callbacks ran, one state with all their steps merged in the order they ran."""
    return merge_states(list(callback_states(checkpoint).values()))


def replay_surgery(
    model: nn.Module,
    example_inputs: Any,
    steps: Sequence[Sequence[Sequence[Any]]],
    output_transform: Callable[[Any], torch.Tensor] | None = None,
    companions: Sequence[nn.Module | Companion] = (),
) -> None:
    """Apply recorded surgery, step by step, to ``model`` (atomic: all steps or none).

    ``output_transform`` is the callback's, for models whose output torch-pruning cannot trace as is.
    ``companions`` (copies of the model, e.g. averaged ones) get the same cut, step by step; so do the
    ``torch.optim.swa_utils.AveragedModel`` submodules of ``model``.

    Raises:
        ValueError: a layer of the record is missing from the model, or the record does not fit
            it; the model (and every companion) is left exactly as it was.
    """
    extra = as_companions(companions)
    snapshots = [ModuleSnapshot(model)] + [ModuleSnapshot(c.module) for c in extra]
    names = dict(model.named_modules())
    try:
        for index, step in enumerate(steps):
            for name, _is_out, _idxs in step:
                if name not in names:
                    raise ValueError(f"pruning step {index + 1} names layer '{name}', which the model does not have")
            followers = averaged_submodules(model) + extra
            inputs = capture_companion_inputs(model, example_inputs, followers) if followers else []
            replay_history(build_dependency_graph(model, example_inputs, output_transform=output_transform), step)
            for follower, follower_inputs in zip(followers, inputs):
                cut_companion(follower, follower_inputs, step, output_transform=output_transform)
                check_companion_shapes(model, follower)
    except ValueError:
        for snapshot in snapshots:
            snapshot.restore()
        raise
    except Exception as error:
        for snapshot in snapshots:
            snapshot.restore()
        layer = _failing_layer(error, steps)
        raise ValueError(
            f"the pruning record does not fit this model{f' at layer {layer!r}' if layer else ''} "
            f"({type(error).__name__}: {error}); was the checkpoint written for another architecture?"
        ) from error


def _failing_layer(error: Exception, steps: Sequence[Sequence[Sequence[Any]]]) -> str | None:
    text = str(error)
    for step in steps:
        for name, _o, _i in step:
            if name and name in text:
                return name
    return steps[0][0][0] if steps and steps[0] else None


def _steps_and_inputs(state: Mapping[str, Any]) -> tuple[list[list[list[Any]]], Any]:
    history = state.get("history", [])
    steps = [record.get("surgery", []) for record in history]
    if any(not s for s in steps) and history:
        raise ValueError("the pruning record has no surgery entries (written by an older version?); cannot restore it")
    return steps, state.get("example_inputs")


def restore_pruned_structure(
    model: _M,
    source: str | Path | Mapping[str, Any],
    example_inputs: Any = None,
    output_transform: Callable[[Any], torch.Tensor] | None = None,
    companions: Sequence[nn.Module | Companion] = (),
) -> _M:
    """Give a dense ``model`` the pruned structure recorded in ``source`` (weights not loaded).

    Every pruning callback's steps are replayed, in the order they ran. ``AveragedModel`` submodules
    of ``model``, and ``companions`` (dense copies of the model), get the same cut.

    Args:
        model: a freshly built, dense model (a LightningModule or any ``nn.Module`` whose layer names
            match the ones the pruning recorded).
        source: a checkpoint path, a loaded checkpoint dict, or the callback's state dict.
        example_inputs: inputs for tracing; default: the ones stored in the record.
        output_transform: output -> tensor, for models returning objects torch-pruning cannot trace
            (the callback's ``output_transform``); default None.
        companions: copies of the model to cut the same way (e.g. an averaging callback's copy).
    """
    loaded: Mapping[str, Any] = (
        torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, Path)) else source
    )
    state = callback_state(loaded) if "callbacks" in loaded else loaded
    if state is None:
        raise ValueError("no StructuredPruningCallback state in this checkpoint: it was not pruned by lightning-prune")
    steps, stored_inputs = _steps_and_inputs(state)
    inputs = example_inputs if example_inputs is not None else stored_inputs
    if inputs is None:
        raise ValueError("the record holds no example inputs; pass example_inputs=...")
    replay_surgery(model, inputs, steps, output_transform, companions)
    return model


def load_pruned(module_class: type[_M], ckpt_path: str | Path, *args: Any, map_location: Any = "cpu", **init_kwargs: Any) -> _M:
    """Build ``module_class(*args, **init_kwargs)``, restore its pruned structure, load the weights.

    The counterpart of ``LightningModule.load_from_checkpoint`` for pruned checkpoints; the module
    is returned in eval mode, ready for inference. Hyper-parameters saved in the checkpoint are used
    for arguments not given.

    Example::

        model = load_pruned(ImageClassifier, "last.ckpt", net=SmallResNet())
    """
    checkpoint = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.update(init_kwargs)
    try:
        model = module_class(*args, **hparams)
    except TypeError:  # hyper-parameters the class does not take
        model = module_class(*args, **init_kwargs)
    restore_pruned_structure(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def install_resume_guard(
    module: Any,
    example_inputs: Callable[[], Any],
    output_transform: Callable[[Any], Any] | None = None,
    companions: Callable[[], Sequence[nn.Module | Companion]] | None = None,
) -> None:
    """Restore a checkpoint's pruned structure on ``module`` before its weights load (idempotent).

    Lightning loads the weights before any callback hook runs, so this wraps the module's
    ``on_load_checkpoint`` (called just before the weights load): if the checkpoint records
    pruning steps the model does not have yet (a freshly built dense model), they are replayed:
    the steps of every lightning-prune callback of the checkpoint, once, in the order they ran (the
    first callback's ``setup`` installs the guard; the others find it installed). A record that does
    not fit raises ``ValueError`` naming the layer, model untouched.

    Args:
        module: the LightningModule being fitted.
        example_inputs: returns tracing inputs for when the checkpoint stores none.
        output_transform: the callback's traceable output transform (None: the output as is).
        companions: returns the averaged copies to cut with the model (called when replaying, after
            every callback's ``setup``, so the averaging callbacks' copies exist by then).
    """
    original = module.on_load_checkpoint
    if getattr(original, "_lightning_prune_guard", False):
        return

    def restore_then_load(checkpoint: dict[str, Any]) -> Any:
        state = callback_state(checkpoint)
        history = state.get("history", []) if state else []
        if state and history:
            saved = history[-1]["widths"]
            if any(layer_widths(module).get(n) != w for n, w in saved.items()):
                inputs = state.get("example_inputs")
                inputs = to_device(inputs if inputs is not None else example_inputs(), _device_of(module))
                restore_pruned_structure(
                    module, state, inputs, output_transform, list(companions()) if companions is not None else ()
                )
                differing = [n for n, w in saved.items() if layer_widths(module).get(n) != w]
                if differing:
                    raise ValueError(
                        f"after replaying the checkpoint's {len(history)} pruning step(s), layer '{differing[0]}' has "
                        f"{layer_widths(module).get(differing[0])} channels, the checkpoint {saved[differing[0]]}"
                    )
        return original(checkpoint)

    restore_then_load._lightning_prune_guard = True  # type: ignore[attr-defined]  # marks the wrapper
    module.on_load_checkpoint = restore_then_load  # an instance attribute: Lightning looks it up with getattr


def _device_of(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
