"""Data modules that need no download."""

from lightning_prune.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
