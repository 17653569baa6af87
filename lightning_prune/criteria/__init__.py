"""Pruning criteria: the protocol, the registry and the built-in criteria."""

from lightning_prune.criteria.base import Criterion, GroupCriterion, Requirements, ScoringContext

# Built-in criteria register themselves on import.
from lightning_prune.criteria.discriminant_information import DiscriminantInformation
from lightning_prune.criteria.filter_ensembles import LinearFilterEnsembles
from lightning_prune.criteria.fpgm import FPGM, geometric_median_scores
from lightning_prune.criteria.interpolative_decomposition import InterpolativeDecomposition
from lightning_prune.criteria.norm import L1Norm, L2Norm, LpNorm
from lightning_prune.criteria.pca_gm import PCAGeometricMedian
from lightning_prune.criteria.pls_vip import PLSVIP
from lightning_prune.criteria.random import RandomCriterion
from lightning_prune.criteria.registry import available_criteria, get_criterion, register_criterion

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
