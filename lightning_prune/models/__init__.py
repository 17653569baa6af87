"""Reference models used by the demo, the tests and the benchmarks."""

from lightning_prune.models.classifier import ImageClassifier
from lightning_prune.models.resnet import SmallResNet

__all__ = ["ImageClassifier", "SmallResNet"]
