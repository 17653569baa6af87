"""Functional cores of the collected statistics: pooling, reservoir merge, covariance from sums."""

from __future__ import annotations

import torch

__all__ = ["covariance_from_sums", "pool_channels", "reservoir_merge"]


def pool_channels(x: torch.Tensor, pooling: str, channel_dim: int = 1) -> torch.Tensor:
    """``(N, C, *rest)`` (or channels at ``channel_dim``) -> ``(N, C)`` by max or mean over ``rest``."""
    x = x.detach()  # no autograd graph for the statistics
    if x.dim() > 2:
        if channel_dim % x.dim() != 1:
            x = x.movedim(channel_dim, 1)
        dims = tuple(range(2, x.dim()))
        x = x.amax(dim=dims) if pooling == "max" else x.mean(dim=dims)
    return x if x.dtype == torch.float32 else x.float()


def reservoir_merge(
    keys: torch.Tensor, new_keys: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into ``cat(keys, new_keys)``) of the ``capacity`` largest keys, and those keys.

    With i.i.d. uniform keys per sample this keeps a uniform random subset of all samples seen
    (sampling without replacement), whatever their number: memory is bounded by ``capacity``.
    Runs on the keys' device with no host synchronisation.
    """
    all_keys = torch.cat([keys, new_keys])
    if all_keys.numel() <= capacity:
        return torch.arange(all_keys.numel(), device=all_keys.device), all_keys
    top, index = torch.topk(all_keys, capacity, sorted=False)
    return index, top


def covariance_from_sums(count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """Covariance (population, float64) from the streamed ``sum x``, ``sum x x^T`` and row count."""
    n = count.double().clamp_min(1.0)
    mean = total.double() / n
    return outer.double() / n - torch.outer(mean, mean)
