"""Non-finite weights or activation statistics before a step: PruningError naming the layer, nothing changed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_prune import ChannelPruner, PruningError, Target, get_criterion
from lightning_prune.collection import ActivationCollector
from lightning_prune.models import SmallResNet


def _trained_sgd(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(x).sum().backward()
    optimizer.step()
    return optimizer


def _snapshot(model, optimizer):
    params = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [list(g["params"]) for g in optimizer.param_groups]
    return params, state, groups


def _assert_unchanged(model, optimizer, snapshot):
    params, state, groups = snapshot
    assert [(n, p) for n, p, _ in params] == list(model.named_parameters())  # same objects
    for _n, p, value in params:
        assert torch.equal(p.detach().nan_to_num(), value.nan_to_num()) and p.shape == value.shape
    assert [list(g["params"]) for g in optimizer.param_groups] == groups
    assert {id(p): s for p, s in optimizer.state.items()}.keys() == state.keys()
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


def test_a_nan_weight_raises_pruning_error_naming_the_layer_model_and_optimizer_untouched():
    torch.manual_seed(0)
    net = SmallResNet(widths=(8, 16), blocks_per_stage=1)
    x = torch.rand(2, 1, 8, 8)
    optimizer = _trained_sgd(net, x)
    layer, module = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)][1]
    with torch.no_grad():
        module.weight[0, 0, 0, 0] = float("nan")
    snapshot = _snapshot(net, optimizer)
    with pytest.raises(PruningError, match=rf"non-finite weights .* in layer '{re.escape(layer)}'"):
        ChannelPruner(get_criterion("l1")).step(net, x, Target("flops", 0.5), optimizers=[optimizer])
    _assert_unchanged(net, optimizer, snapshot)


class _Overflow(nn.Module):
    """Finite weights, infinite activations: the second convolution overflows float32 (the first does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        with torch.no_grad():
            self.features[2].bias.fill_(1e38)
            self.features[2].weight.fill_(1e38)

    def forward(self, x):
        return self.head(self.features(x))


def test_non_finite_activations_raise_pruning_error_naming_the_module_model_untouched():
    torch.manual_seed(0)
    model = _Overflow()
    x = torch.rand(4, 1, 8, 8) + 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pruner = ChannelPruner(get_criterion("pca_gm"))
    analysis = pruner.analyse(model, x)
    collector = ActivationCollector(model, pruner.criterion.activation_requests(analysis.groups))
    collector.attach()
    collector.begin_batch(torch.tensor([0, 1, 2, 3]))
    model(x)
    collector.end_batch()
    collector.detach()
    store = collector.store()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(PruningError, match=r"non-finite activations .* at module 'features\.2'"):
        pruner.step(model, x, Target("flops", 0.3), optimizers=[optimizer], analysis=analysis,
                    context={"activations": store, "labels": store.labels})
    _assert_unchanged(model, optimizer, snapshot)
