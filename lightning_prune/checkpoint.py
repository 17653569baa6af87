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
from lightning_prune.engine.graph import build_dependency_graph
from lightning_prune.engine.pruner import layer_widths
from lightning_prune.engine.surgery import ModuleSnapshot
from lightning_prune.engine.tp_adapter import replay_history

__all__ = [
    "CALLBACK_STATE_KEY",
    "STATE_VERSION",
    "callback_state",
    "install_resume_guard",
    "load_pruned",
    "replay_surgery",
    "restore_pruned_structure",
]

CALLBACK_STATE_KEY = "StructuredPruningCallback"
STATE_VERSION = 2

_M = TypeVar("_M", bound=nn.Module)


def callback_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pruning callback's state in a Lightning checkpoint, or None."""
    for key, value in checkpoint.get("callbacks", {}).items():
        if key.startswith(CALLBACK_STATE_KEY):
            return value
    return None


def replay_surgery(
    model: nn.Module,
    example_inputs: Any,
    steps: Sequence[Sequence[Sequence[Any]]],
    output_transform: Callable[[Any], torch.Tensor] | None = None,
) -> None:
    """Apply recorded surgery, step by step, to ``model`` (atomic: all steps or none).

    ``output_transform`` is the callback's, for models whose output torch-pruning cannot trace as is.

    Raises:
        ValueError: a layer of the record is missing from the model, or the record does not fit
            it; the model is left exactly as it was.
    """
    snapshot = ModuleSnapshot(model)
    names = dict(model.named_modules())
    try:
        for index, step in enumerate(steps):
            for name, _is_out, _idxs in step:
                if name not in names:
                    raise ValueError(f"pruning step {index + 1} names layer '{name}', which the model does not have")
            replay_history(build_dependency_graph(model, example_inputs, output_transform=output_transform), step)
    except ValueError:
        snapshot.restore()
        raise
    except Exception as error:
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
) -> _M:
    """Give a dense ``model`` the pruned structure recorded in ``source`` (weights not loaded).

    Args:
        model: a freshly built, dense model (a LightningModule or any ``nn.Module`` whose layer names
            match the ones the pruning recorded).
        source: a checkpoint path, a loaded checkpoint dict, or the callback's state dict.
        example_inputs: inputs for tracing; default: the ones stored in the record.
        output_transform: output -> tensor, for models returning objects torch-pruning cannot trace
            (the callback's ``output_transform``); default None.
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
    replay_surgery(model, inputs, steps, output_transform)
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
) -> None:
    """Restore a checkpoint's pruned structure on ``module`` before its weights load (idempotent).

    Lightning loads the weights before any callback hook runs, so this wraps the module's
    ``on_load_checkpoint`` (called just before the weights load): if the checkpoint records
    pruning steps the model does not have yet (a freshly built dense model), they are replayed.
    A record that does not fit raises ``ValueError`` naming the layer, model untouched.

    Args:
        module: the LightningModule being fitted.
        example_inputs: returns tracing inputs for when the checkpoint stores none.
        output_transform: the callback's traceable output transform (None: the output as is).
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
                restore_pruned_structure(module, state, inputs, output_transform)
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
