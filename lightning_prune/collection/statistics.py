"""Functional cores of the collected statistics: pooling, row sampling, reservoir merge, covariance from sums."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["covariance_from_sums", "pool_channels", "reservoir_merge", "sample_rows"]


def pool_channels(x: torch.Tensor, pooling: str, channel_dim: int = 1) -> torch.Tensor:
    """``(N, C, *rest)`` (or channels at ``channel_dim``) -> ``(N, C)`` by max or mean over ``rest``."""
    x = x.detach()  # no autograd graph for the statistics
    if x.dim() > 2:
        if channel_dim % x.dim() != 1:
            x = x.movedim(channel_dim, 1)
        dims = tuple(range(2, x.dim()))
        x = x.amax(dim=dims) if pooling == "max" else x.mean(dim=dims)
    return x if x.dtype == torch.float32 else x.float()


def sample_rows(
    x: torch.Tensor,
    channel_dim: int,
    rows_per_batch: int,
    *,
    channels: int = 0,
    column_index: torch.Tensor | None = None,
    generator: torch.Generator | Callable[[torch.device], torch.Generator] | None = None,
) -> torch.Tensor:
    """Up to ``rows_per_batch`` rows (sample x position) of ``x``, one column per channel, float32.

    Args:
        x: an activation with its channels at ``channel_dim``.
        channel_dim: the channel dimension of ``x``.
        rows_per_batch: rows drawn uniformly (with replacement: a sample, then a position) when
            ``x`` has more; all rows, in order, otherwise.
        channels: when > 0 and ``x`` is 2-D with another width, ``x`` is a flattened feature map
            (channel-major) viewed as ``(N, channels, r)``: each channel's ``r`` positions are rows.
        column_index: entries of ``channel_dim`` to keep first (on ``x``'s device), e.g. one
            branch's slice of a concatenation.
        generator: the generator of the draws, or a function of the device returning it (called
            only when rows are subsampled); None uses the global generator.

    Returns:
        ``(M, C)`` float32 rows, ``M = min(rows_per_batch, N * positions)``.
    """
    dim = channel_dim
    x = x.detach()
    if column_index is not None:  # the observed channels' part of a wider input (a concatenation)
        x = x.index_select(dim, column_index)
    if channels and x.dim() == 2 and x.shape[1] != channels:
        x = x.reshape(x.shape[0], channels, -1)  # flattened feature map: channel-major
        dim = 1
    if x.dim() > 2 and dim % x.dim() != 1:
        x = x.movedim(dim, 1)
    flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)  # (N, C, positions)
    n, c, positions = flat.shape
    k = rows_per_batch
    if n * positions > k:
        gen = generator(x.device) if callable(generator) else generator
        samples = torch.randint(n, (k,), generator=gen, device=x.device)
        where = torch.randint(positions, (k,), generator=gen, device=x.device)
        rows = flat[samples, :, where]
    else:
        rows = flat.transpose(1, 2).reshape(-1, c)
    return rows if rows.dtype == torch.float32 else rows.float()


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
