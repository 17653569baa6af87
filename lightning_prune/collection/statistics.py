"""Functional cores of the collected statistics: pooling (over positions or tokens), row sampling,
reservoir merge, covariance from sums."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["covariance_from_sums", "is_token_sequence", "pool_channels", "pool_tokens", "reservoir_merge", "sample_rows"]


def is_token_sequence(x: torch.Tensor, channel_dim: int) -> bool:
    """Whether ``x`` is a batch-first token sequence ``(batch, tokens, features)``: 3-D, channels last."""
    return x.dim() == 3 and channel_dim % 3 == 2


def pool_tokens(x: torch.Tensor, token_pooling: str) -> torch.Tensor:
    """``(N, T, F)`` -> ``(N, F)``: ``"avg"`` the mean over the ``T`` tokens, ``"max"`` their maximum,
    ``"cls"`` the class token (token 0).

    Raises:
        ValueError: ``x`` is not 3-D, or ``token_pooling`` is another value.
    """
    if x.dim() != 3:
        raise ValueError(f"pool_tokens needs a (batch, tokens, features) tensor, got shape {tuple(x.shape)}")
    if token_pooling == "avg":
        return x.mean(dim=1)
    if token_pooling == "max":
        return x.amax(dim=1)
    if token_pooling == "cls":
        return x[:, 0]
    raise ValueError(f"token_pooling must be 'avg', 'max' or 'cls', got {token_pooling!r}")


def pool_channels(
    x: torch.Tensor, pooling: str, channel_dim: int = 1, token_pooling: str | None = None
) -> torch.Tensor:
    """``(N, C, *rest)`` (or channels at ``channel_dim``) -> ``(N, C)`` by max or mean over ``rest``.

    A token sequence (:func:`is_token_sequence`) is reduced by ``token_pooling``
    (:func:`pool_tokens`) when it is given; otherwise its tokens are pooled like any positions.
    """
    x = x.detach()  # no autograd graph for the statistics
    if token_pooling is not None and is_token_sequence(x, channel_dim):
        x = pool_tokens(x, token_pooling)
    elif x.dim() > 2:
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
    token_pooling: str | None = None,
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
        token_pooling: when given and ``x`` is a token sequence (:func:`is_token_sequence`), the
            tokens are first reduced to one row per sample (:func:`pool_tokens`); None (default):
            every token of every sample is a row, drawn like the positions of a feature map.

    Returns:
        ``(M, C)`` float32 rows, ``M = min(rows_per_batch, N * positions)``.
    """
    dim = channel_dim
    x = x.detach()
    if token_pooling is not None and is_token_sequence(x, dim):
        x, dim = pool_tokens(x, token_pooling), 1
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
