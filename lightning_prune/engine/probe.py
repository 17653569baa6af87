"""Which channel groups can really be cut: a trial surgery of one channel per group.

torch-pruning's graph is built from the autograd trace, and some operations defeat it without
an error: a channel shuffle (``view`` → ``transpose`` → ``view``) is read as the identity, a
concatenation along the sequence axis of a transformer is read as a channel concatenation, a
reshape that splits the channel axis gets no index mapping. A group built across such an
operation misses layers that are coupled to it, and cutting it gives a model that fails, or
returns a different shape, at its next forward pass.

:func:`find_unprunable_groups` finds those groups before anything is planned: it removes one
channel position from every group at once, runs the model, and puts everything back (model
and graph). If the trial fails, it bisects to the groups responsible. The groups it returns are
reported by name with the error they caused, and left at full width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune._model import preserved_training_modes
from lightning_prune.engine.graph import ChannelGroup
from lightning_prune.engine.surgery import ModuleSnapshot
from lightning_prune.engine.tp_adapter import TracedGraph

__all__ = ["UnprunableGroupWarning", "find_unprunable_groups", "unprunable_message"]


class UnprunableGroupWarning(UserWarning):
    """Some channel groups are left at full width because cutting them breaks the model."""


class _GraphSnapshot:
    """Model tensors and the graph's own state (operator sizes, history, node tables)."""

    def __init__(self, model: nn.Module, graph: TracedGraph) -> None:
        self._model = ModuleSnapshot(model)
        self._graph = graph.snapshot(model)

    def restore(self) -> None:
        self._model.restore()
        self._graph.restore()


def _trial(
    model: nn.Module,
    graph: TracedGraph,
    groups: Sequence[ChannelGroup],
    run: Callable[[], Any],
    signature: Any,
) -> str | None:
    """Cut one position of each group, run the model; the error (None if fine). Always restores."""
    snapshot = _GraphSnapshot(model, graph)
    try:
        with torch.no_grad():
            for group in groups:
                group.prune(group.channels_of_positions([group.positions - 1]))
        after = run()
        if after != signature:
            return f"the model's output changed from {signature} to {after}"
        return None
    except Exception as error:  # noqa: BLE001 - any failure of the trial is the answer
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {text}"[:300]
    finally:
        snapshot.restore()


def find_unprunable_groups(
    model: nn.Module,
    graph: TracedGraph,
    groups: Sequence[ChannelGroup],
    run: Callable[[], Any],
    signature: Any = None,
) -> dict[int, str]:
    """Indices of the groups whose cut breaks the model, with the error each caused.

    Args:
        model: the traced model (left exactly as it was).
        graph: its torch-pruning graph (left as it was, pruning history included).
        groups: candidate groups from :func:`~lightning_prune.engine.graph.discover_groups`.
        run: runs the model on its example inputs and returns a comparable output signature.
        signature: the signature of the model as it is, when known (saves one forward pass).

    Cost: one trial surgery and forward pass when every group is sound; about ``2 log2(n)`` more
    per faulty group otherwise.
    """
    bad: dict[int, str] = {}

    def blame(subset: list[ChannelGroup], error: str) -> None:
        """``subset`` fails with ``error``: find the groups responsible."""
        if len(subset) == 1:
            bad[subset[0].index] = error
            return
        half = len(subset) // 2
        halves = [(part, _trial(model, graph, part, run, signature)) for part in (subset[:half], subset[half:])]
        for part, part_error in halves:
            if part_error is not None:
                blame(part, part_error)
        if all(part_error is None for _, part_error in halves):
            # Each half is fine alone, the union is not: add groups one by one, blame those that break it.
            accepted: list[ChannelGroup] = []
            for group in subset:
                group_error = _trial(model, graph, accepted + [group], run, signature)
                if group_error is None:
                    accepted.append(group)
                else:
                    bad[group.index] = group_error

    with preserved_training_modes(model):
        model.eval()
        if signature is None:
            signature = run()
        error = _trial(model, graph, list(groups), run, signature) if groups else None
        if error is not None:
            blame(list(groups), error)
    return bad


def unprunable_message(refused: Mapping[str, str]) -> str:
    """One readable paragraph naming each refused layer, why, and what to do."""
    lines = "\n".join(f"  - '{name}': {why}" for name, why in refused.items())
    return (
        "The output channels of these layers are kept at full width: cutting them would break the model or "
        "change its output shape, because torch-pruning's dependency graph misses part of their coupling "
        "(typically a reshape, a channel shuffle, a concatenation along a non-channel axis, or a width "
        "hard-coded in forward):\n"
        f"{lines}\n"
        "To silence this, pass these layers in ignored_layers; to prune them, register a customized pruner "
        "for the operation (ChannelPruner(customized_pruners=...))."
    )


#: The trial-cut snapshot (model tensors and graph state), for other trial cuts of the engine.
GraphSnapshot = _GraphSnapshot
