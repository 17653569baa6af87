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
from lightning_prune.collection.requests import ActivationRequest
from lightning_prune.collection.statistics import (
    covariance_from_sums,
    pool_channels,
    reservoir_merge,
    sample_rows,
)

__all__ = [
    "ACCUMULATORS",
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
    "build_accumulators",
    "covariance_from_sums",
    "pool_channels",
    "reservoir_merge",
    "sample_rows",
]
