"""The CIFAR VGG-16 of the pruning literature: 13 conv3x3-BN-ReLU layers and a small classifier.

The convolutional part is VGG-16's (Simonyan & Zisserman 2015) with BatchNorm after every
convolution and five 2x2 max-pools, so a 32x32 image ends as a 512-channel 1x1 map. The classifier
is the one common in CIFAR pruning code: ``Linear(512, 512) - BatchNorm1d - ReLU - Linear(512,
num_classes)`` (the papers in ``docs/criteria.md`` name no other variant). 14.99M parameters and 313.5M MACs
per 32x32 sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["VGG16_CFG", "CifarVGG", "vgg16_bn_cifar"]

#: Output channels of each conv layer, ``"M"`` for a 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 images: ``features`` (conv-BN-ReLU / max-pool per ``cfg``),
    flatten, ``classifier``.

    The classifier's input is the last conv width times the spatial size left after the pools
    (1x1 for 32x32 inputs and five pools). Convolutions are initialised with Kaiming-normal
    (fan out), BatchNorm with weight 1 and bias 0, linear layers with N(0, 0.01) and zero bias.

    Args:
        cfg: conv widths and ``"M"`` (max-pool) markers. Default :data:`VGG16_CFG`.
        num_classes: output classes. Default 10.
        in_channels: input channels. Default 3.
        hidden: width of the classifier's hidden layer. Default 512.
        image_size: input height and width, used to size the classifier's input. Default 32.

    Raises:
        ValueError: an entry of ``cfg`` is neither a positive integer nor ``"M"``, or the pools
            leave nothing of an ``image_size`` image.
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 512,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for entry in cfg:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            elif isinstance(entry, int) and not isinstance(entry, bool) and entry > 0:
                layers += [nn.Conv2d(channels, entry, 3, 1, 1, bias=False), nn.BatchNorm2d(entry), nn.ReLU()]
                channels = entry
            else:
                raise ValueError(f"cfg entries must be positive integers or 'M', got {entry!r}")
        if size < 1:
            raise ValueError(f"cfg has too many max-pools for {image_size}x{image_size} inputs")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels * size * size, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn_cifar(num_classes: int = 10) -> CifarVGG:
    """VGG-16 with BatchNorm for CIFAR (32x32): 14.99M parameters, 313.5M MACs per sample.

    Args:
        num_classes: output classes. Default 10.
    """
    return CifarVGG(VGG16_CFG, num_classes)
