"""Linear filter ensembles: regression, masking, planted channels, budget, seeding, batched evaluation."""

from __future__ import annotations

import contextlib
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nets import MLP, ConcatNet, ResidualNet
from torch import nn

from lightning_prune.collection.feeding import HeldoutEvaluation
from lightning_prune.criteria import ScoringContext, get_criterion
from lightning_prune.criteria.filter_ensembles import (
    MAX_PASS_ELEMENTS,
    MAX_PASS_ELEMENTS_CPU,
    MAX_PASS_SAMPLES,
    MAX_PASS_SAMPLES_CPU,
    channel_masking,
    per_sample_loss,
    ridge_coefficients,
)
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


# ---------------------------------------------------------------------------------------------- batched evaluation
_TRAINER = SimpleNamespace(world_size=1, precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))


def _heldout(model, batches):
    """The callback's held-out evaluation on ``batches``, without a Trainer (one process, full precision)."""
    return HeldoutEvaluation(_TRAINER, model, batches, lambda out: out)


def _batched_case(name):
    """(model, held-out batches): BatchNorm + residual sums, concatenation, BN after a concatenation, linear layers."""
    gen = torch.Generator().manual_seed(7)
    if name == "mlp":
        model = MLP()
        shape = (model.in_features,)
    elif name == "dense_concat":
        torch.manual_seed(0)
        model = _DenseConcat()
        with torch.no_grad():
            model.norm.running_mean.uniform_(-0.2, 0.2)
            model.norm.running_var.uniform_(0.5, 1.5)
            model.norm.bias.uniform_(0.5, 1.0)
        shape = (1, 6, 6)
    else:
        model = {"residual": ResidualNet, "concat": ConcatNet}[name]()
        shape = (1, 8, 8)
    classes = 3 if name == "dense_concat" else 10
    batches = [(torch.randn(b, *shape, generator=gen), torch.randint(0, classes, (b,), generator=gen)) for b in (8, 5)]
    return model.eval(), batches


def _groups(model, batches):
    graph = build_dependency_graph(model, batches[0][0][:2])
    return graph, discover_groups(model, graph)


@pytest.mark.parametrize("name", ["residual", "concat", "dense_concat", "mlp"])
def test_batched_masks_give_the_losses_of_one_mask_at_a_time(name):
    model, batches = _batched_case(name)
    graph, groups = _groups(model, batches)
    sizes = [g.size for g in groups]
    masks = get_criterion("filter_ensembles", max_evaluations=12).sample_masks(sizes, torch.Generator().manual_seed(0))
    evaluation = _heldout(model, batches)
    single = []
    for mask in masks:  # the reference: one mask, one pass, the mean-reduced loss per batch
        with channel_masking(groups, model, graph, list(torch.split(mask, sizes))):
            single.append(evaluation(nn.functional.cross_entropy))
    single = torch.tensor(single, dtype=torch.float64)
    assert single.std() > 1e-3  # the masks matter: the comparison is not trivially equal
    for per_pass in (12, 5):  # all masks in one pass, and uneven chunks
        batched = []
        for start in range(0, 12, per_pass):
            chunk = masks[start : start + per_pass]
            with channel_masking(groups, model, graph, list(torch.split(chunk, sizes, dim=1))):
                batched.append(evaluation.evaluate_batched(per_sample_loss(nn.functional.cross_entropy), len(chunk)))
        torch.testing.assert_close(torch.cat(batched).double(), single, rtol=1e-5, atol=1e-7)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def _context(model, batches, seed, forward=None):
    graph, groups = _groups(model, batches)
    forward = forward or _heldout(model, batches)
    ctx = ScoringContext(model=model, example_inputs=batches[0][0][:2], graph=graph,
                         generator=torch.Generator().manual_seed(seed), forward=forward)
    return groups, ctx


@pytest.mark.parametrize("fit", ["joint", "per_layer"])
def test_batched_scores_match_unbatched_and_repeat_exactly(fit):
    model, batches = _batched_case("residual")
    make = lambda per_pass: get_criterion("filter_ensembles", max_evaluations=40, fit=fit, masks_per_pass=per_pass, progress=False)  # noqa: E731
    runs = {}
    for key, per_pass in (("one", 1), ("auto", None), ("auto again", None), ("seven", 7)):
        criterion = make(per_pass)
        groups, ctx = _context(model, batches, seed=3)
        runs[key] = (criterion.score(groups, ctx), criterion.evaluations, criterion.passes)
    assert runs["one"][1:] == (40, 40)
    assert runs["auto"][1:] == (40, 2)  # 32 masks x 8 samples fill the CPU's 256-sample pass, then 8
    assert runs["seven"][1:] == (40, math.ceil(40 / 7))  # the budget holds with a last, shorter pass
    assert all(torch.equal(p, q) for p, q in zip(runs["auto"][0], runs["auto again"][0]))
    scale = max(float(s.abs().max()) for s in runs["one"][0])
    for key in ("auto", "seven"):
        for p, q in zip(runs[key][0], runs["one"][0]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-5 * scale)
    groups, ctx = _context(model, batches, seed=4)
    other = make(None).score(groups, ctx)
    assert not all(torch.allclose(p, q) for p, q in zip(other, runs["auto"][0]))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_masks_per_pass_is_validated(bad):
    with pytest.raises(ValueError, match="masks_per_pass"):
        get_criterion("filter_ensembles", masks_per_pass=bad)


def test_masks_per_pass_rule():
    criterion = get_criterion("filter_ensembles")
    forward = SimpleNamespace(evaluate_batched=lambda *a: None, batch_samples=64, sample_elements=64)
    assert criterion.pass_size(forward) == MAX_PASS_SAMPLES_CPU // 64 == 4  # the digits benchmark's batches on the CPU
    forward.batch_samples, forward.sample_elements = 1, 4
    assert criterion.pass_size(forward) == 256  # never above the budget (or the CPU's 256 samples)
    forward.device_type = "cuda"
    assert criterion.pass_size(forward) == 256  # never above the budget
    forward.batch_samples = 64
    assert criterion.pass_size(forward) == MAX_PASS_SAMPLES // 64 == 16
    del forward.device_type
    forward.batch_samples, forward.sample_elements = 128, 28 * 28  # Fashion-MNIST batches on the CPU
    assert criterion.pass_size(forward) == MAX_PASS_ELEMENTS_CPU // (128 * 28 * 28) == 2
    forward.device_type = "cuda"  # the accelerator's bound: up to the sample cap
    assert criterion.pass_size(forward) == MAX_PASS_SAMPLES // 128 == 8
    forward.batch_samples, forward.sample_elements = 32, 3 * 224 * 224
    assert criterion.pass_size(forward) == max(1, MAX_PASS_ELEMENTS // (32 * 3 * 224 * 224)) == 3
    forward.device_type = "cpu"
    assert criterion.pass_size(forward) == 1
    forward.batch_samples = 4096
    assert criterion.pass_size(forward) == 1
    assert get_criterion("filter_ensembles", masks_per_pass=300).pass_size(forward) == 256
    assert get_criterion("filter_ensembles", masks_per_pass=5).pass_size(forward) == 5
    assert get_criterion("filter_ensembles", masks_per_pass=5).pass_size(lambda loss_fn: 0.0) == 1  # a plain callable


def test_a_loss_that_does_not_split_per_sample_falls_back_to_one_mask_per_pass():
    from torchmetrics.classification import MulticlassAccuracy

    model, batches = _batched_case("residual")
    evaluation = _heldout(model, batches)
    batched_calls = []
    user_loss = lambda out, y: nn.functional.cross_entropy(out, y) + 0.0  # noqa: E731

    class Spy:
        """The held-out evaluation, its batched calls recorded."""

        batch_samples, sample_elements = evaluation.batch_samples, evaluation.sample_elements

        def __call__(self, loss_fn):
            return evaluation(loss_fn)

        def evaluate_batched(self, per_sample_loss_fn, repeats):
            batched_calls.append(repeats)
            return evaluation.evaluate_batched(per_sample_loss_fn, repeats)

    for loss_fn in (user_loss, MulticlassAccuracy(num_classes=10)):
        with pytest.warns(UserWarning, match="does not split per sample"):
            criterion = get_criterion("filter_ensembles", max_evaluations=10, loss_fn=loss_fn, masks_per_pass=4, progress=False)
        groups, ctx = _context(model, batches, seed=0, forward=Spy())
        criterion.score(groups, ctx)
        assert (criterion.evaluations, criterion.passes) == (10, 10) and not batched_calls
    # the fallback gives what the batched default gives, for the same loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fallback = get_criterion("filter_ensembles", max_evaluations=10, loss_fn=user_loss, progress=False)
    default = get_criterion("filter_ensembles", max_evaluations=10, progress=False)
    groups, ctx = _context(model, batches, seed=0, forward=Spy())
    batched = default.score(groups, ctx)
    assert default.passes == 1 and len(batched_calls) == 1
    groups, ctx = _context(model, batches, seed=0, forward=Spy())
    for p, q in zip(fallback.score(groups, ctx), batched):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_per_sample_cross_entropy_keeps_the_mean_over_valid_labels():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=gen), torch.tensor([0, 3, -100, 1, -100, 2])
    losses = per_sample_loss(nn.functional.cross_entropy)(logits.repeat(3, 1), labels.repeat(3))
    torch.testing.assert_close(losses.view(3, 6).mean(1), nn.functional.cross_entropy(logits, labels).expand(3))
    soft = torch.softmax(torch.randn(6, 4, generator=gen), 1)
    torch.testing.assert_close(per_sample_loss(nn.functional.cross_entropy)(logits, soft).mean(), nn.functional.cross_entropy(logits, soft))
    assert per_sample_loss(lambda o, y: nn.functional.cross_entropy(o, y)) is None


def test_batched_masking_refuses_a_batch_that_is_not_whole_blocks():
    model, batches = _batched_case("residual")
    graph, groups = _groups(model, batches)
    masks = [torch.ones(3, g.size) for g in groups]
    with channel_masking(groups, model, graph, masks), torch.no_grad(), pytest.raises(ValueError, match="stacked blocks"):
        model(torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match="same number of rows"), channel_masking(groups, model, graph, [torch.ones(2 + i, g.size) for i, g in enumerate(groups)]):
        pass
