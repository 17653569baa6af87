"""Pruned checkpoints: restore the pruned structure on a freshly built (dense) model.

A checkpoint written during or after pruning holds the callback's state (plain data, loads with
``torch.load(weights_only=True)``): per step, the surgery as torch-pruning history entries
``[layer name, is output channels, channel indices]`` (:attr:`PruningRecord.surgery`), and the
example inputs used for tracing. Replaying the steps in order on the dense model reproduces the
pruned structure exactly; then the weights load.

* Resuming ``trainer.fit(model, ckpt_path=...)`` with a fresh dense model: the callback does this
  by itself, before the weights load (:func:`install_resume_guard` wraps the module's
  ``on_load_checkpoint``).
* ``trainer.validate/test/predict(model, ckpt_path=...)`` with the callback in the Trainer: the
  same guard, installed in ``setup`` for every stage.
* Inference: :func:`load_pruned` is the counterpart of ``LightningModule.load_from_checkpoint``;
  a class decorated with :func:`restores_pruned_checkpoints` makes ``load_from_checkpoint`` itself
  work (``lightning_prune.models.ImageClassifier`` is).
* A plain ``nn.Module``: :func:`restore_pruned_structure`.

A record that does not fit the model (another architecture, a missing layer) raises a
``ValueError`` naming the layer, and the model is left as it was: never half-pruned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
from torch import nn

from lightning_prune._batch import to_device
from lightning_prune.engine.attention import replay
from lightning_prune.engine.companions import (
    Companion,
    as_companions,
    averaged_submodules,
    capture_companion_inputs,
    check_companion_shapes,
    cut_companion,
)
from lightning_prune.engine.graph import build_dependency_graph
from lightning_prune.engine.huggingface import sync_configs
from lightning_prune.engine.pruner import layer_widths
from lightning_prune.engine.surgery import ModuleSnapshot

__all__ = [
    "CALLBACK_STATE_KEY",
    "STATE_MARKER",
    "STATE_VERSION",
    "callback_state",
    "callback_states",
    "check_state_dict_fits",
    "install_resume_guard",
    "load_pruned",
    "replay_surgery",
    "restore_checkpoint_structure",
    "restore_pruned_structure",
    "restores_pruned_checkpoints",
    "steps_present",
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
            replay(build_dependency_graph(model, example_inputs, output_transform=output_transform), model, step)
            for follower, follower_inputs in zip(followers, inputs):
                cut_companion(follower, follower_inputs, step, output_transform=output_transform)
                check_companion_shapes(model, follower)
        sync_configs(model)
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


def steps_present(module: nn.Module, history: Sequence[Mapping[str, Any]]) -> int | None:
    """How many of ``history``'s steps ``module`` already has: the last record whose widths it has
    (0 when it has none of them, i.e. presumably dense); None when it is narrower than the
    checkpoint's final structure in some layer (pruned further, or another lineage): it cannot grow
    those channels back."""
    widths = layer_widths(module)
    for done in range(len(history), 0, -1):
        if all(widths.get(n) == w for n, w in history[done - 1]["widths"].items()):
            return done
    if history and any(n in widths and widths[n] < w for n, w in history[-1]["widths"].items()):
        return None
    return 0


def restore_checkpoint_structure(
    module: nn.Module,
    checkpoint: Mapping[str, Any],
    example_inputs: Callable[[], Any] | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    companions: Sequence[nn.Module | Companion] = (),
) -> int:
    """Give ``module`` the pruned structure a Lightning ``checkpoint`` records, if it lacks it.

    The steps ``module`` already has (matched by their recorded widths) are not replayed; the others
    are, in order. Returns the number of steps replayed (0: nothing to do, e.g. a dense checkpoint or
    a module that already has the structure).

    Raises:
        ValueError: the record does not fit the module (naming the layer; the module is left as it
            was), or the module is narrower than the checkpoint in some layer (already pruned
            further): build a fresh module with :func:`load_pruned`.
    """
    state = callback_state(checkpoint)
    history = list(state.get("history", [])) if state else []
    if not state or not history:
        return 0
    done = steps_present(module, history)
    if done is None:
        raise ValueError(
            f"this checkpoint holds a model after {len(history)} pruning step(s), but {type(module).__name__} has "
            "fewer channels in some layer (it was pruned further, or differently): channels cannot be added back in "
            "place. Build a fresh module from the checkpoint with lightning_prune.load_pruned(ModuleClass, ckpt_path, "
            "...) (or on a freshly built dense module, lightning_prune.restore_pruned_structure)"
        )
    if done == len(history):
        return 0
    inputs = state.get("example_inputs")
    if inputs is None and example_inputs is not None:
        inputs = example_inputs()
    if inputs is None:
        raise ValueError("the checkpoint's pruning record holds no example inputs to trace the model with")
    steps, _ = _steps_and_inputs({"history": history[done:]})
    replay_surgery(module, to_device(inputs, _device_of(module)), steps, output_transform, companions)
    saved = history[-1]["widths"]
    differing = [n for n, w in saved.items() if layer_widths(module).get(n) != w]
    if differing:
        raise ValueError(
            f"after replaying the checkpoint's {len(history)} pruning step(s), layer '{differing[0]}' has "
            f"{layer_widths(module).get(differing[0])} channels, the checkpoint {saved[differing[0]]}"
        )
    return len(history) - done


def check_state_dict_fits(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming :func:`load_pruned` when a checkpoint that went through pruning
    (it holds the callback's state) has weights of other shapes than ``module``'s: the raw
    ``load_state_dict`` error ("size mismatch") says nothing about pruning. Checkpoints without the
    callback's state are left to Lightning."""
    if callback_state(checkpoint) is None:
        return
    weights = checkpoint.get("state_dict", {})
    own = module.state_dict()
    for key, value in weights.items():
        mine = own.get(key)
        if isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor) and value.shape != mine.shape:
            raise ValueError(
                f"the checkpoint's '{key}' has shape {tuple(value.shape)}, {type(module).__name__}'s "
                f"{tuple(mine.shape)}: the checkpoint holds a pruned structure this module does not have. Load it "
                "with lightning_prune.load_pruned(ModuleClass, ckpt_path, ...), decorate the class with "
                "@lightning_prune.restores_pruned_checkpoints, or keep StructuredPruningCallback in the Trainer"
            )


def install_resume_guard(
    module: Any,
    example_inputs: Callable[[], Any],
    output_transform: Callable[[Any], Any] | None = None,
    companions: Callable[[], Sequence[nn.Module | Companion]] | None = None,
) -> None:
    """Restore a checkpoint's pruned structure on ``module`` before its weights load (idempotent).

    Lightning loads the weights before any callback hook runs, so this wraps the module's
    ``on_load_checkpoint`` (called just before the weights load, in ``fit``, ``validate``, ``test``
    and ``predict`` with ``ckpt_path``): if the checkpoint records pruning steps the model does not
    have yet (a freshly built dense model), they are replayed (:func:`restore_checkpoint_structure`):
    the steps of every lightning-prune callback of the checkpoint, once, in the order they ran (the
    first callback's ``setup`` installs the guard; the others find it installed). A record that does
    not fit raises ``ValueError`` naming the layer, model untouched; weights that still do not fit
    afterwards raise ``ValueError`` naming :func:`load_pruned`.

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
        restore_checkpoint_structure(
            module, checkpoint, example_inputs, output_transform, list(companions()) if companions is not None else ()
        )
        result = original(checkpoint)
        check_state_dict_fits(module, checkpoint)
        return result

    restore_then_load._lightning_prune_guard = True  # type: ignore[attr-defined]  # marks the wrapper
    module.on_load_checkpoint = restore_then_load  # an instance attribute: Lightning looks it up with getattr


_C = TypeVar("_C", bound=type)


@overload
def restores_pruned_checkpoints(cls: _C, /) -> _C: ...


@overload
def restores_pruned_checkpoints(
    cls: None = None, /, *, output_transform: Callable[[Any], Any] | None = None
) -> Callable[[_C], _C]: ...


def restores_pruned_checkpoints(
    cls: _C | None = None, /, *, output_transform: Callable[[Any], Any] | None = None
) -> _C | Callable[[_C], _C]:
    """Class decorator: ``load_from_checkpoint`` (and any ``ckpt_path`` load) of a pruned checkpoint
    works on the decorated LightningModule class, without the callback.

    ``LightningModule.load_from_checkpoint`` builds the module (dense), calls its
    ``on_load_checkpoint(checkpoint)`` and then loads the weights; no callback runs. The decorator
    wraps the class's ``on_load_checkpoint`` so that it first replays the checkpoint's recorded
    surgery (:func:`restore_checkpoint_structure`), then calls the original hook. Dense checkpoints
    load as before. Subclasses inherit it (unless they override ``on_load_checkpoint`` without
    calling ``super()``)::

        @restores_pruned_checkpoints
        class MyModule(L.LightningModule): ...

        model = MyModule.load_from_checkpoint("epoch=3.ckpt")     # pruned structure, pruned weights

    ``lightning_prune.models.ImageClassifier`` is decorated. ``output_transform`` (keyword form
    ``@restores_pruned_checkpoints(output_transform=...)``) is the callback's, for models whose
    output torch-pruning cannot trace as is.
    """

    def decorate(klass: _C) -> _C:
        original = klass.on_load_checkpoint  # type: ignore[attr-defined]
        if getattr(original, "_lightning_prune_restores", False):
            return klass

        @functools.wraps(original)
        def on_load_checkpoint(self: Any, checkpoint: dict[str, Any]) -> Any:
            restore_checkpoint_structure(self, checkpoint, None, output_transform)
            result = original(self, checkpoint)
            check_state_dict_fits(self, checkpoint)
            return result

        on_load_checkpoint._lightning_prune_restores = True  # type: ignore[attr-defined]  # marks the wrapper
        klass.on_load_checkpoint = on_load_checkpoint  # type: ignore[attr-defined]
        return klass

    return decorate if cls is None else decorate(cls)


def _device_of(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
