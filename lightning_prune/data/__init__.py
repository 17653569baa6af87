"""Data modules: digits (no download), CIFAR-10, Fashion-MNIST, ImageNet folders, and a generated stand-in."""

from lightning_prune.data.cifar import CIFAR10DataModule
from lightning_prune.data.digits import DigitsDataModule
from lightning_prune.data.fake import FakeImageDataset
from lightning_prune.data.fashion_mnist import FashionMNISTDataModule
from lightning_prune.data.imagenet import ImageNetDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "FakeImageDataset", "FashionMNISTDataModule", "ImageNetDataModule"]
