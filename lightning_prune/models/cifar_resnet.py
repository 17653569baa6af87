"""The CIFAR ResNets of He et al. 2016 (ResNet-20/32/44/56/110: ``6n + 2`` layers, 3 stages 16/32/64).

"Deep Residual Learning for Image Recognition", section 4.2: a 3x3 stem conv with 16 channels,
three stages of ``n`` basic blocks each (16, 32, 64 channels on 32x32, 16x16, 8x8 maps; the first
block of stages 2 and 3 has stride 2), global average pooling and one linear layer.

Shortcuts: **option B** of the paper, a 1x1 convolution + BatchNorm projection where the shape
changes (two blocks of the network), identity elsewhere. The paper's CIFAR models use option A
(zero-padded identity, no parameters); B is what torch-pruning's CIFAR ResNets use, and it lets
torch-pruning couple the channels of every residual sum of a stage (with option A the padding is a
tensor operation it cannot map). B adds 2.7K parameters and 0.26M MACs per sample to ResNet-56
(0.856M parameters, 125.75M MACs at 32x32).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.models.resnet import BasicBlock

__all__ = ["CifarResNet", "resnet56", "resnet110"]

_STAGE_WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with basic blocks and 1x1 projection shortcuts (option B).

    Inputs are ``(N, 3, H, W)`` images (32x32 for CIFAR; any size works thanks to the global
    pooling); the output is ``(N, num_classes)`` logits. Convolutions are initialised with
    Kaiming-normal (fan out), BatchNorm with weight 1 and bias 0, as in torchvision.

    Args:
        depth: number of weighted layers, ``6n + 2`` (20, 32, 44, 56, 110, ...). Default 56.
        num_classes: output classes. Default 10.
        in_channels: input channels. Default 3.

    Raises:
        ValueError: ``depth`` is not of the form ``6n + 2`` with ``n >= 1``.
    """

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, _STAGE_WIDTHS[0], 3, 1, 1, bias=False), nn.BatchNorm2d(_STAGE_WIDTHS[0]), nn.ReLU()
        )
        channels = _STAGE_WIDTHS[0]
        stages = []
        for index, width in enumerate(_STAGE_WIDTHS):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride=2 if index > 0 and block == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage): 0.856M parameters, 125.75M MACs at 32x32.

    Args:
        num_classes: output classes. Default 10.
    """
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage): 1.73M parameters, 253.1M MACs at 32x32.

    Args:
        num_classes: output classes. Default 10.
    """
    return CifarResNet(110, num_classes)
