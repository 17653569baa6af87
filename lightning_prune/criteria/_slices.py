"""Per-channel views of a group's parameters, shared by the weight-based criteria."""

from __future__ import annotations

import torch

from lightning_prune.engine.graph import ChannelGroup


def filter_matrices(group: ChannelGroup) -> list[torch.Tensor]:
    """The channel's filters in every layer that produces it: one ``(size, features)`` float64 matrix each.

    Filters are the output-side weight slices (conv/linear weight rows, normalisation scales);
    biases are left out (they shift a channel, they do not scale it).
    """
    mats = []
    for s in group.slices:
        if not s.is_output or s.name.rsplit(".", 1)[-1].endswith("bias"):
            continue
        rows = s.per_channel(group.size)
        if rows is not None:
            mats.append(rows.double())
    return mats


def combine_layer_scores(per_layer: list[torch.Tensor], size: int) -> torch.Tensor:
    """Mean over layers of each layer's scores divided by that layer's mean (scale-free combination)."""
    normalised = []
    for scores in per_layer:
        mean = scores.abs().mean()
        normalised.append(scores / mean if mean > 0 else scores)
    if not normalised:
        return torch.zeros(size, dtype=torch.float64)
    return torch.stack(normalised).mean(0)
