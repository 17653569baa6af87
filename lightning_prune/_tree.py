"""Nested inputs and outputs (tensors inside tuples, lists and dicts): one walker for all of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["leaves", "tensors", "tree_map"]


def tree_map(fn: Callable[[torch.Tensor], Any], data: Any, other: Callable[[Any], Any] | None = None) -> Any:
    """``data`` with ``fn`` applied to every tensor inside nested mappings, tuples and lists.

    Containers keep their type (a mapping becomes a ``dict``); other leaves are returned as they
    are, or mapped by ``other`` when given.
    """
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return {k: tree_map(fn, v, other) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(tree_map(fn, v, other) for v in data)
    return other(data) if other is not None else data


def leaves(data: Any) -> Iterator[Any]:
    """Every leaf of nested mappings, tuples and lists, depth first, in order."""
    if isinstance(data, Mapping):
        for value in data.values():
            yield from leaves(value)
    elif isinstance(data, (tuple, list)):
        for value in data:
            yield from leaves(value)
    else:
        yield data


def tensors(data: Any) -> list[torch.Tensor]:
    """The tensors among the leaves of ``data`` (nested mappings, tuples and lists), in order."""
    return [leaf for leaf in leaves(data) if isinstance(leaf, torch.Tensor)]
