"""Calling a model the way the library does: inputs unpacked as torch-pruning does, modes restored."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune._tree import leaves, tree_map

__all__ = ["batch_size_of", "call_model", "eval_forward", "evaluating", "output_signature", "preserved_training_modes"]


@contextlib.contextmanager
def preserved_training_modes(model: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule on exit, whatever happened inside."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` the way torch-pruning does: tuples/lists are unpacked, dicts are keywords."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients inside; every submodule's train/eval mode restored on exit."""
    with preserved_training_modes(model), torch.no_grad():
        model.eval()
        yield


def eval_forward(model: nn.Module, inputs: Any, context: Callable[[], Any] | None = None) -> Any:
    """One forward pass under :func:`evaluating`; ``context`` (e.g. the precision plugin's
    ``forward_context``) wraps the call when given."""
    with evaluating(model), context() if context is not None else contextlib.nullcontext():
        return call_model(model, inputs)


def batch_size_of(inputs: Any) -> int:
    """Batch size of the first tensor found in ``inputs``."""
    for leaf in leaves(inputs):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0]) if leaf.dim() else 1
    return 1


def output_signature(output: Any) -> Any:
    """Shapes of every tensor of an output (containers kept, other leaves by type name), for comparisons."""
    return tree_map(lambda t: tuple(t.shape), output, other=lambda leaf: type(leaf).__name__)
