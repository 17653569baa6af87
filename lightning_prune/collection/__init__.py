"""Activation collection: hooks on the training forward passes, bounded-memory statistics."""

from lightning_prune.collection.collector import ActivationCollector, ActivationStore, ClassMoments
from lightning_prune.collection.requests import ActivationRequest
from lightning_prune.collection.statistics import covariance_from_sums, pool_channels, reservoir_merge

__all__ = [
    "ActivationCollector",
    "ActivationRequest",
    "ActivationStore",
    "ClassMoments",
    "covariance_from_sums",
    "pool_channels",
    "reservoir_merge",
]
