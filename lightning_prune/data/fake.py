"""A generated stand-in for an image data set: same shapes and classes, no disk, no network."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["FakeImageDataset"]

_SEED_STRIDE = 1_000_003  # a prime: sample i of seed s and sample j of seed t never share a stream


class FakeImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """``size`` samples ``(image, label)``: standard-normal images (as normalised real images are)
    and uniform labels, each drawn from its own seeded generator.

    Sample ``i`` is the same on every call, in every worker and on every rank; nothing is held in
    memory. The labels carry no information about the images: the data set exercises shapes,
    loaders and pruning, not accuracy.

    Args:
        size: number of samples.
        image_shape: ``(channels, height, width)`` of every image.
        num_classes: labels are drawn from ``0 .. num_classes - 1``.
        seed: seed of the whole data set (different seeds give different samples). Default 0.

    Raises:
        ValueError: ``size < 1``, ``num_classes < 1`` or a non-positive image dimension.
    """

    def __init__(self, size: int, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> None:
        if size < 1 or num_classes < 1 or len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(
                f"need size >= 1, num_classes >= 1 and a (C, H, W) image shape, got {size}, {num_classes}, {image_shape}"
            )
        self.size = int(size)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        index %= self.size
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + index)
        image = torch.randn(self.image_shape, generator=generator)
        label = int(torch.randint(self.num_classes, (), generator=generator))
        return image, label
