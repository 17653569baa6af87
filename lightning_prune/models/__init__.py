"""Reference models: the demo's small CNN, the papers' CIFAR ResNets and VGG-16, a digits-sized ViT, a classifier module."""

from lightning_prune.models.cifar_resnet import CifarResNet, resnet56, resnet110
from lightning_prune.models.classifier import ImageClassifier
from lightning_prune.models.resnet import SmallResNet
from lightning_prune.models.vgg import CifarVGG, vgg16_bn_cifar
from lightning_prune.models.vit import VisionTransformer

__all__ = [
    "CifarResNet",
    "CifarVGG",
    "ImageClassifier",
    "SmallResNet",
    "VisionTransformer",
    "resnet56",
    "resnet110",
    "vgg16_bn_cifar",
]
