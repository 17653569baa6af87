"""Activation collection: hooks on the training forward passes, bounded-memory statistics."""

from lightning_prune.collection.accumulators import (
    ACCUMULATORS,
    Accumulator,
    AccumulatorContext,
    ClassMoments,
    ClassMomentSums,
    CovarianceSums,
    GramStatistic,
    GramSums,
    PooledReservoir,
    PooledSamples,
    RowReservoir,
    SharedGenerator,
    build_accumulators,
)
from lightning_prune.collection.collector import ActivationCollector, ActivationStore
from lightning_prune.collection.requests import TOKEN_POOLINGS, ActivationRequest, TokenPooling, check_token_pooling
from lightning_prune.collection.statistics import (
    covariance_from_sums,
    is_token_sequence,
    pool_channels,
    pool_tokens,
    reservoir_merge,
    sample_rows,
)

__all__ = [
    "ACCUMULATORS",
    "TOKEN_POOLINGS",
    "Accumulator",
    "AccumulatorContext",
    "ActivationCollector",
    "ActivationRequest",
    "ActivationStore",
    "ClassMomentSums",
    "ClassMoments",
    "CovarianceSums",
    "GramStatistic",
    "GramSums",
    "PooledReservoir",
    "PooledSamples",
    "RowReservoir",
    "SharedGenerator",
    "TokenPooling",
    "build_accumulators",
    "check_token_pooling",
    "covariance_from_sums",
    "is_token_sequence",
    "pool_channels",
    "pool_tokens",
    "reservoir_merge",
    "sample_rows",
]
