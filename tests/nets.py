"""Small test networks shared by the engine and criteria tests (not a test module).

Every constructor is deterministic given ``seed``: the weights are drawn from a private
``torch.Generator`` (not the global RNG), and every BatchNorm gets random scales, shifts and
running statistics so that no two channels are alike (the tests match channels by value).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "ConcatNet",
    "DepthwiseNet",
    "GroupedNet",
    "MLP",
    "ResidualNet",
    "image_inputs",
    "randomize",
]


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter and BN buffer of ``module`` with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:  # normalisation scales: positive, spread out
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.running_mean.copy_(0.1 * torch.randn(sub.running_mean.shape, generator=gen))
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=gen))
    return module


def image_inputs(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded ``(batch, 1, 8, 8)`` input batch."""
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or 1x1 conv-BN with ``stride``)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _conv_bn(cin, cout, k=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResidualNet(nn.Module):
    """Stem conv-BN-ReLU, an identity-shortcut block, a stride-2 projection block, pool, linear head.

    Input ``(N, 1, 8, 8)``, 10 classes. ``widths = (stem, block1_mid, block2_mid, block2_out)``;
    the stem width is also block 1's output width (identity shortcut).

    Coupled channel sets (one pruning group each):

    * ``stem.0``/``stem.1`` with ``block1.conv2``/``block1.bn2`` (the identity addition),
    * ``block1.conv1``/``block1.bn1``,
    * ``block2.conv1``/``block2.bn1``,
    * ``block2.conv2``/``block2.bn2`` with ``block2.shortcut.0``/``block2.shortcut.1`` (the projection addition).
    """

    PRODUCERS = (
        ("stem.0", "stem.1", "block1.conv2", "block1.bn2"),
        ("block1.conv1", "block1.bn1"),
        ("block2.conv1", "block2.bn1"),
        ("block2.conv2", "block2.bn2", "block2.shortcut.0", "block2.shortcut.1"),
    )

    def __init__(self, seed: int = 0, widths: Sequence[int] = (16, 12, 20, 24), num_classes: int = 10) -> None:
        super().__init__()
        c0, m1, m2, c2 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        self.block1 = BasicBlock(c0, m1, c0, stride=1)
        self.block2 = BasicBlock(c0, m2, c2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c2, num_classes)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block2(self.block1(x))
        return self.head(self.flatten(self.pool(x)))

    example_inputs = staticmethod(image_inputs)


class ConcatNet(nn.Module):
    """Two conv branches concatenated along channels, then a conv, pool and linear head."""

    def __init__(self, seed: int = 0, widths: Sequence[int] = (8, 12, 16), num_classes: int = 10) -> None:
        super().__init__()
        a, b, c = widths
        self.branch_a = nn.Sequential(nn.Conv2d(1, a, 3, 1, 1), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(1, b, 3, 1, 1), nn.ReLU())
        self.merge = nn.Conv2d(a + b, c, 3, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = torch.relu(self.merge(x))
        return self.head(torch.flatten(self.pool(x), 1))

    example_inputs = staticmethod(image_inputs)


class DepthwiseNet(nn.Module):
    """conv-BN-ReLU -> depthwise conv (groups = channels)-BN-ReLU -> pointwise conv -> pool -> linear."""

    def __init__(self, seed: int = 0, widths: Sequence[int] = (16, 24), num_classes: int = 10) -> None:
        super().__init__()
        c, p = widths
        self.conv = _conv_bn(1, c)
        self.depthwise = _conv_bn(c, c, groups=c)
        self.pointwise = nn.Conv2d(c, p, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(p, num_classes)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.pointwise(x))
        return self.head(torch.flatten(self.pool(x), 1))

    example_inputs = staticmethod(image_inputs)


class GroupedNet(nn.Module):
    """conv-BN-ReLU -> grouped conv (``groups`` = 4)-BN-ReLU -> conv -> pool -> linear."""

    GROUPS = 4

    def __init__(self, seed: int = 0, widths: Sequence[int] = (16, 24, 12), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = widths
        assert c1 % self.GROUPS == 0 and c2 % self.GROUPS == 0
        self.conv1 = _conv_bn(1, c1)
        self.grouped = _conv_bn(c1, c2, groups=self.GROUPS)
        self.conv3 = nn.Conv2d(c2, c3, 3, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c3, num_classes)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.conv3(x))
        return self.head(torch.flatten(self.pool(x), 1))

    example_inputs = staticmethod(image_inputs)


class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear on ``(N, in_features)`` inputs."""

    def __init__(self, seed: int = 0, widths: Sequence[int] = (16, 32, 24, 10)) -> None:
        super().__init__()
        d_in, h1, h2, d_out = widths
        self.fc1 = nn.Linear(d_in, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, d_out)
        self.in_features = d_in
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def example_inputs(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, self.in_features, generator=torch.Generator().manual_seed(seed))
