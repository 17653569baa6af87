"""Linear filter ensembles: regression, masking, planted channels, budget, seeding, a full fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_prune.criteria import ScoringContext, get_criterion
from lightning_prune.criteria.filter_ensembles import channel_masking, ridge_coefficients
from lightning_prune.data import DigitsDataModule
from lightning_prune.engine import build_dependency_graph, discover_groups


def _numpy_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Primal ridge with a free intercept: centre, then solve (X^T X + a I) b = X^T y."""
    xc, yc = x - x.mean(0), y - y.mean()
    return np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)


@pytest.mark.parametrize("samples,features", [(200, 30), (40, 90)])  # primal and dual branch
def test_ridge_matches_numpy(samples, features):
    rng = np.random.default_rng(features)
    x = (rng.random((samples, features)) < 0.7).astype(float)
    y = x @ rng.standard_normal(features) + 0.1 * rng.standard_normal(samples)
    got = ridge_coefficients(torch.from_numpy(x), torch.from_numpy(y), alpha=0.5).numpy()
    np.testing.assert_allclose(got, _numpy_ridge(x, y, 0.5), rtol=1e-8, atol=1e-10)


def test_ridge_recovers_additive_effects():
    rng = np.random.default_rng(0)
    x = (rng.random((2000, 8)) < 0.5).astype(float)
    effects = np.array([0.0, -1.0, 0.5, 0.0, 2.0, 0.0, -0.3, 1.0])
    y = 3.0 + x @ effects
    np.testing.assert_allclose(ridge_coefficients(torch.from_numpy(x), torch.from_numpy(y), 1e-6).numpy(), effects, atol=1e-5)


def _conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def test_masking_zeroes_channels_exactly_after_batchnorm():
    model = _conv_bn_net().eval()
    with torch.no_grad():
        model[1].bias.fill_(0.7)  # a masked conv output would still leave BN's shift behind
    x = torch.randn(3, 1, 6, 6)
    graph = build_dependency_graph(model, x)
    groups = discover_groups(model, graph)
    group = next(g for g in groups if g.root_name == "0")
    seen = {}
    handle = model[2].register_forward_hook(lambda m, i, o: seen.setdefault("relu_in", i[0].detach()))
    mask = torch.ones(6)
    mask[[1, 4]] = 0
    masks = [mask if g is group else torch.ones(g.size) for g in groups]
    with channel_masking(groups, model, graph, masks), torch.no_grad():
        model(x)
    handle.remove()
    assert torch.all(seen["relu_in"][:, [1, 4]] == 0)
    assert torch.all(seen["relu_in"][:, [0, 2, 3, 5]].abs().sum((0, 2, 3)) > 0)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


class _DenseConcat(nn.Module):
    """DenseNet's pattern: a BatchNorm normalises a concatenation, so a branch owns part of its width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(10)
        self.conv = nn.Conv2d(10, 5, 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("branch,offset", [("a", 0), ("b", 4)])
def test_masking_a_branch_that_owns_part_of_a_batchnorm_after_a_concatenation(branch, offset):
    torch.manual_seed(0)
    model = _DenseConcat().eval()
    with torch.no_grad():
        model.norm.bias.uniform_(0.5, 1.0)
    x = torch.randn(3, 1, 6, 6)
    graph = build_dependency_graph(model, x)
    groups = discover_groups(model, graph)
    group = next(g for g in groups if g.root_name == branch)
    mask = torch.ones(group.size)
    mask[1] = 0
    seen = {}
    handle = model.conv.register_forward_pre_hook(lambda m, i: seen.update(conv_in=i[0].detach()))
    with channel_masking(groups, model, graph, [mask if g is group else torch.ones(g.size) for g in groups]), torch.no_grad():
        model(x)
    handle.remove()
    with torch.no_grad():  # independent: the dense activation with that one channel zeroed
        expected = torch.relu(model.norm(torch.cat([model.a(x), model.b(x)], 1)))
    expected[:, offset + 1] = 0
    torch.testing.assert_close(seen["conv_in"], expected)


def _trained_mlp():
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=128)
    dm.setup()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x, y = next(iter(dm.val_dataloader()))
    return model.eval(), x, y


def _score(model, x, y, criterion, seed=0):
    graph = build_dependency_graph(model, x[:2])
    groups = discover_groups(model, graph)
    calls = []

    def forward(loss_fn):
        with torch.no_grad():
            calls.append(float(loss_fn(model(x), y)))
        return calls[-1]

    ctx = ScoringContext(model=model, example_inputs=x[:2], graph=graph, generator=torch.Generator().manual_seed(seed), forward=forward)
    return groups, criterion.score(groups, ctx), calls


def _ablation_increase(model, x, y, layer, unit) -> float:
    """Brute force: loss increase when hidden unit ``unit`` alone is switched off."""
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(x), y))
        saved = (layer.weight[unit].clone(), layer.bias[unit].clone())
        layer.weight[unit] = 0
        layer.bias[unit] = 0
        ablated = float(nn.functional.cross_entropy(model(x), y))
        layer.weight[unit], layer.bias[unit] = saved
    return ablated - base


def test_dead_channels_score_zero_and_the_channel_the_output_needs_most_scores_top():
    model, x, y = _trained_mlp()
    dead = [0, 1, 2]
    with torch.no_grad():
        model[1].weight[dead] = 0
        model[1].bias[dead] = 0
    criterion = get_criterion("filter_ensembles", max_evaluations=300, alpha=1.0, progress=False)
    groups, scores, calls = _score(model, x, y, criterion)
    (importance,) = scores
    assert len(calls) == 300 == criterion.evaluations
    # the estimates' standard error, from the residuals of an independent least-squares fit
    masks = criterion.sample_masks([24], torch.Generator().manual_seed(0)).numpy().astype(np.float64)
    outcomes = np.array(calls)
    design = np.column_stack([np.ones(len(outcomes)), masks])
    coef, *_ = np.linalg.lstsq(design, outcomes, rcond=None)
    resid = outcomes - design @ coef
    se = resid.std() / np.sqrt(len(outcomes) * 0.75 * 0.25)
    assert torch.all(importance[dead].abs() < 4 * se)  # no effect: zero within the noise
    # independent reference: single-channel ablation, one forward pass per channel
    ablation = np.array([_ablation_increase(model, x, y, model[1], u) for u in range(24)])
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    spearman = np.corrcoef(ranks(importance.numpy()), ranks(ablation))[0, 1]
    assert spearman > 0.7, spearman
    assert int(np.argmax(ablation)) in torch.topk(importance, 3).indices.tolist()
    assert importance.max() > 6 * se  # well above the noise


@pytest.mark.parametrize("fit", ["joint", "per_layer"])
def test_same_seed_same_decision_and_budget_respected(fit):
    model, x, y = _trained_mlp()
    make = lambda: get_criterion("filter_ensembles", max_evaluations=40, fit=fit, progress=False)  # noqa: E731
    _, a, calls_a = _score(model, x, y, make(), seed=3)
    _, b, calls_b = _score(model, x, y, make(), seed=3)
    _, c, _ = _score(model, x, y, make(), seed=4)
    assert len(calls_a) == len(calls_b) == 40
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_per_layer_fit_is_one_ridge_per_group_on_shared_outcomes():
    model = _conv_bn_net().eval()
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    criterion = get_criterion("filter_ensembles", max_evaluations=30, fit="per_layer", alpha=0.3, progress=False)
    outcomes = []

    def forward(loss_fn):
        with torch.no_grad():
            outcomes.append(float(loss_fn(model(x), y)))
        return outcomes[-1]

    graph = build_dependency_graph(model, x[:2])
    groups = discover_groups(model, graph)
    ctx = ScoringContext(model=model, example_inputs=x[:2], graph=graph, generator=torch.Generator().manual_seed(1), forward=forward)
    scores = criterion.score(groups, ctx)
    masks = criterion.sample_masks([g.size for g in groups], torch.Generator().manual_seed(1)).numpy().astype(np.float64)
    start = 0
    for g, s in zip(groups, scores):
        expected = -_numpy_ridge(masks[:, start : start + g.size], np.array(outcomes), 0.3)
        np.testing.assert_allclose(s.numpy(), expected, rtol=1e-8, atol=1e-12)
        start += g.size


def test_a_torchmetrics_metric_can_be_the_outcome():
    """Accuracy (higher is better) is negated: importance is still the damage a removal does."""
    from torchmetrics.classification import MulticlassAccuracy

    model, x, y = _trained_mlp()
    dead = [0, 1, 2]
    with torch.no_grad():
        model[1].weight[dead] = 0
        model[1].bias[dead] = 0
    criterion = get_criterion("filter_ensembles", max_evaluations=300, progress=False, loss_fn=MulticlassAccuracy(num_classes=10))
    _, (importance,), calls = _score(model, x, y, criterion)
    assert all(-1.0 <= c <= 0.0 for c in calls)  # negated accuracies
    ablation = np.array([_ablation_increase(model, x, y, model[1], u) for u in range(24)])
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(ranks(importance.numpy()), ranks(ablation))[0, 1] > 0.5
    assert importance[dead].abs().max() < importance.max() / 4


def test_a_loss_fn_that_is_neither_callable_nor_a_metric_is_refused():
    with pytest.raises(TypeError, match="loss_fn"):
        get_criterion("filter_ensembles", loss_fn=42)


class _LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: an ``nn.LayerNorm`` over the channels of a channels-first map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_masking_a_channels_first_layer_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), _LayerNorm2d(6), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.randn(2, 1, 8, 8)
    graph = build_dependency_graph(model, x)
    groups = discover_groups(model, graph)
    group = next(g for g in groups if g.root_name == "0")
    mask = torch.ones(6)
    mask[2] = 0
    seen = {}
    handle = model[2].register_forward_pre_hook(lambda m, i: seen.update(x=i[0].detach()))
    with channel_masking(groups, model, graph, [mask if g is group else torch.ones(g.size) for g in groups]), torch.no_grad():
        model(x)
    handle.remove()
    with torch.no_grad():
        expected = model[1](model[0](x))
    expected[:, 2] = 0
    torch.testing.assert_close(seen["x"], expected)
