"""Pruning criteria: the protocol, the registry and the built-in criteria."""

from lightning_prune.criteria.base import Criterion, GroupCriterion, Requirements, ScoringContext
from lightning_prune.criteria.registry import available_criteria, get_criterion, register_criterion

# Built-in criteria register themselves on import.
from lightning_prune.criteria.discriminant_information import DiscriminantInformation  # noqa: E402
from lightning_prune.criteria.filter_ensembles import LinearFilterEnsembles  # noqa: E402
from lightning_prune.criteria.fpgm import FPGM, geometric_median_scores  # noqa: E402
from lightning_prune.criteria.interpolative_decomposition import InterpolativeDecomposition  # noqa: E402
from lightning_prune.criteria.norm import L1Norm, L2Norm, LpNorm  # noqa: E402
from lightning_prune.criteria.pca_gm import PCAGeometricMedian  # noqa: E402
from lightning_prune.criteria.pls_vip import PLSVIP  # noqa: E402
from lightning_prune.criteria.random import RandomCriterion  # noqa: E402

__all__ = [
    "Criterion",
    "DiscriminantInformation",
    "FPGM",
    "GroupCriterion",
    "InterpolativeDecomposition",
    "L1Norm",
    "L2Norm",
    "LinearFilterEnsembles",
    "LpNorm",
    "PCAGeometricMedian",
    "PLSVIP",
    "RandomCriterion",
    "Requirements",
    "ScoringContext",
    "available_criteria",
    "geometric_median_scores",
    "get_criterion",
    "register_criterion",
]
