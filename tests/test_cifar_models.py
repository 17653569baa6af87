"""The papers' CIFAR networks: sizes against the published numbers, structure, and pruning through residuals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune import ChannelPruner, Target, count_cost, get_criterion
from lightning_prune.models import CifarResNet, CifarVGG, resnet56, resnet110, vgg16_bn_cifar

X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize(
    ("build", "params", "macs"),
    [
        # published: ResNet-56 0.85M / 125M, ResNet-110 1.7M / 253M (He et al. 2016, option A shortcuts;
        # option B adds 2.7K parameters and 0.26M MACs), CIFAR VGG-16 15M / 313M
        (resnet56, 0.85e6, 125e6),
        (resnet110, 1.7e6, 253e6),
        (vgg16_bn_cifar, 15.0e6, 313e6),
    ],
)
def test_sizes_match_the_published_numbers(build, params, macs):
    cost = count_cost(build(), X)
    assert cost.params == pytest.approx(params, rel=0.02)
    assert cost.macs == pytest.approx(macs, rel=0.01)


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_resnet_has_6n_plus_2_weighted_layers_and_two_projections(depth):
    model = CifarResNet(depth, num_classes=7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    one = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(three) + 1 == depth  # the 3x3 convolutions and the final linear layer
    assert [(c.in_channels, c.out_channels, c.stride) for c in one] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    assert sorted({c.out_channels for c in three}) == [16, 32, 64]
    assert model(X).shape == (2, 7)


@pytest.mark.parametrize("depth", [0, 55, 57, True, 8.0])
def test_resnet_rejects_other_depths(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth)


def test_vgg16_layout():
    model = vgg16_bn_cifar(num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 100)]
    assert model(X).shape == (2, 100)


def test_vgg_other_sizes_and_bad_cfg():
    assert CifarVGG([8, "M", 16, "M"], num_classes=3, image_size=16)(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="positive integers or 'M'"):
        CifarVGG([8, "N"])
    with pytest.raises(ValueError, match="too many max-pools"):
        CifarVGG([8, "M", "M"], image_size=2)


def test_projection_shortcuts_couple_every_residual_of_a_stage():
    model = resnet56()
    analysis = ChannelPruner(get_criterion("l1")).analyse(model, X)
    stage2 = next(g for g in analysis.groups if "stage2.0.shortcut.0" in g.module_names)
    assert {f"stage2.{i}.conv2" for i in range(9)} <= set(stage2.module_names)
    assert not any(name.startswith("stage3.") and name.endswith("conv2") for name in stage2.module_names)
    assert stage2.size == 32


@pytest.mark.parametrize("build", [resnet56, vgg16_bn_cifar])
def test_half_the_macs_can_be_cut(build):
    torch.manual_seed(0)
    model = build()
    dense = count_cost(model, X)
    expected = model.eval()(X).shape
    ChannelPruner(get_criterion("l1")).step(model, X, Target("flops", 0.5))
    pruned = count_cost(model, X)
    assert 1 - pruned.macs / dense.macs == pytest.approx(0.5, abs=0.02)
    assert model(X).shape == expected
