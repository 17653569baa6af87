"""Getting model inputs (and labels) out of the batches users' dataloaders yield."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_prune._tree import tree_map

__all__ = ["default_input_fn", "default_label_fn", "detach", "slice_batch", "to_device"]

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "pixel_values", "input_ids")


def default_input_fn(batch: Any) -> Any:
    """The model input of a batch: a tensor as is, the first item of a tuple/list, or a dict's input key.

    Dict batches are looked up under ``"x"``, ``"input"``, ``"inputs"``, ``"image"``, ``"images"``,
    ``"features"``, ``"pixel_values"`` or ``"input_ids"``.

    Raises:
        ValueError: when no input can be found (pass ``input_fn`` or ``example_inputs``).
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise ValueError(
        f"cannot find the model input in a batch of type {type(batch).__name__}"
        + (f" with keys {list(batch)}" if isinstance(batch, Mapping) else "")
        + "; pass input_fn=lambda batch: ... or example_inputs=... to StructuredPruningCallback"
    )


_LABEL_KEYS = ("label", "labels", "y", "target", "targets")


def default_label_fn(batch: Any) -> torch.Tensor | None:
    """The labels of a batch: the second item of a tuple/list, or a dict's ``"label"``, ``"labels"``,
    ``"y"``, ``"target"`` or ``"targets"``; None when there is none."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in _LABEL_KEYS:
            if key in batch and isinstance(batch[key], torch.Tensor):
                return batch[key]
    return None


def slice_batch(inputs: Any, size: int) -> Any:
    """The first ``size`` samples of every tensor in ``inputs`` (nested tuples, lists and dicts)."""
    return tree_map(lambda t: t[:size] if t.dim() else t, inputs)


def to_device(inputs: Any, device: torch.device) -> Any:
    """Move every tensor in ``inputs`` to ``device`` (detached, so never an inference tensor)."""
    return tree_map(lambda t: t.detach().clone().to(device), inputs)


def detach(inputs: Any) -> Any:
    """``inputs`` with every tensor detached (no copy)."""
    return tree_map(torch.Tensor.detach, inputs)
