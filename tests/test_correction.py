"""Least-squares correction: the streamed Gram, pivoted Cholesky vs SciPy's pivoted QR, T and the
corrected weights vs a NumPy ridge solution, exact dependence through residual streams, BN
recalibration, atomicity and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import qr

from lightning_prune.collection import ActivationCollector, ActivationRequest, GramSums, SharedGenerator
from lightning_prune.engine.correction import pivoted_cholesky, reconstruction_residual, ridge_interpolation


# ---------------------------------------------------------------------------------------------- the Gram
@pytest.mark.parametrize("batches", [1, 5, 40])  # 40: past the float32 -> float64 flush
def test_streamed_gram_equals_the_batch_computation(batches):
    gen = torch.Generator().manual_seed(0)
    request = ActivationRequest("conv", statistic="gram", rows_per_batch=10_000)
    acc = GramSums(request, generator=SharedGenerator(0))
    rows = []
    for _ in range(batches):
        x = torch.randn(6, 4, 3, 3, generator=gen) + 0.5
        acc.update(request, x)
        rows.append(x.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy())
    z = np.concatenate(rows)
    stat = acc.compute()
    np.testing.assert_allclose(stat.gram.numpy(), z.T @ z, rtol=1e-5, atol=1e-4)  # float32 within 32 batches
    np.testing.assert_allclose(stat.total.numpy(), z.sum(0), rtol=1e-5, atol=1e-4)
    assert stat.count == z.shape[0] and acc.rows_seen() == {request: z.shape[0]}
    centred = z - z.mean(0)
    np.testing.assert_allclose(stat.centred().numpy(), centred.T @ centred, rtol=1e-5, atol=1e-3)
    assert stat.gram.dtype == torch.float64


def test_gram_of_a_flattened_map_and_of_one_branch_of_a_concatenation():
    """Through the collector: a linear reading a flattened (N, C*r) map gets the (N*r) x C rows' Gram;
    ``channel_index`` picks one branch's columns."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5 * 4, 3))
    flat = ActivationRequest("1", site="input", statistic="gram", rows_per_batch=10_000, channels=5)
    branch = ActivationRequest("1", site="input", statistic="gram", rows_per_batch=10_000, channels=2,
                               channel_index=tuple(range(8, 16)))  # channels 2 and 3, r = 4 each
    collector = ActivationCollector(model, [flat, branch])
    collector.attach()
    xs = [torch.randn(7, 5, 4) for _ in range(3)]
    for x in xs:
        collector.begin_batch()
        model(x)
        collector.end_batch()
    store = collector.store()
    z = torch.cat(xs).permute(0, 2, 1).reshape(-1, 5).double()  # rows: sample x position
    torch.testing.assert_close(store.gram(flat).gram, z.T @ z, rtol=1e-6, atol=1e-4)
    zb = z[:, 2:4]
    torch.testing.assert_close(store.gram(branch).gram, zb.T @ zb, rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------------------------------------- pivoted Cholesky
@pytest.mark.parametrize("seed", range(5))
def test_pivoted_cholesky_pivots_equal_scipys_pivoted_qr(seed):
    rng = np.random.default_rng(seed)
    c = 12
    z = rng.standard_normal((300, c)) @ np.diag(rng.uniform(0.2, 3.0, c)) @ (np.eye(c) + 0.3 * rng.standard_normal((c, c)))
    _q, r_qr, p_qr = qr(z, mode="economic", pivoting=True)
    pivots, r, residual = pivoted_cholesky(z.T @ z)
    np.testing.assert_array_equal(pivots, p_qr)
    np.testing.assert_allclose(np.abs(r), np.abs(r_qr), rtol=1e-8, atol=1e-8)  # R up to the signs of its rows
    for k in range(c + 1):
        assert residual[k] == pytest.approx(float((r_qr[k:, k:] ** 2).sum()), rel=1e-8, abs=1e-8)


def test_pivoted_cholesky_of_a_rank_deficient_gram_stops_and_orders_the_rest():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 3))
    z = np.hstack([base, base @ rng.standard_normal((3, 2))])  # rank 3, 5 columns
    pivots, _r, residual = pivoted_cholesky(z.T @ z, tol=1e-10)
    assert sorted(pivots.tolist()) == list(range(5))
    assert residual[3] == pytest.approx(0.0, abs=1e-6 * residual[0]) and residual[5] == 0.0


# ---------------------------------------------------------------------------------------------- T
def test_ridge_interpolation_and_its_residual_equal_numpy():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((500, 7)) @ rng.standard_normal((7, 7))
    g = z.T @ z
    kept, removed = [0, 2, 3, 6], [1, 4, 5]
    ridge = 1e-2
    lam = ridge * np.trace(g) / 7
    t = ridge_interpolation(g, kept, ridge)
    # NumPy reference: per removed channel, argmin ||Z_S t - z_c||^2 + lam ||t||^2 on the rows themselves
    zs = z[:, kept]
    expected = np.linalg.solve(zs.T @ zs + lam * np.eye(4), zs.T @ z[:, removed])
    np.testing.assert_allclose(t[:, removed], expected, rtol=1e-10)
    np.testing.assert_array_equal(t[:, kept], np.eye(4))  # kept channels pass through
    error = np.linalg.norm(z - zs @ t) ** 2 / np.linalg.norm(z) ** 2
    assert reconstruction_residual(g, kept, ridge) == pytest.approx(error, rel=1e-8)
    dropped = (z[:, removed] ** 2).sum() / (z**2).sum()
    assert reconstruction_residual(g, kept, ridge, corrected=False) == pytest.approx(dropped, rel=1e-10)


# ---------------------------------------------------------------------------------------------- the applier
import copy  # noqa: E402

from nets import ResidualNet, image_inputs  # noqa: E402
from test_engine import World, train_steps  # noqa: E402
from torch import nn  # noqa: E402

from lightning_prune.criteria import GroupCriterion, get_criterion  # noqa: E402
from lightning_prune.engine import ChannelPruner, PruningError, Target, build_dependency_graph, discover_groups  # noqa: E402


def _collect(model, requests, batches):
    collector = ActivationCollector(model, requests)
    collector.attach()
    with torch.no_grad():
        for x in batches:
            collector.begin_batch()
            model(x)
            collector.end_batch()
    collector.detach()
    return collector.store()


def _grams(model, pruner, x, batches=None):
    groups = discover_groups(model, build_dependency_graph(model, x[:2]))
    return _collect(model, pruner.correction_requests(groups, model), batches or [x])


class _Fixed(GroupCriterion):
    """Scores from a dict (group root -> scores); every other group by its index order."""

    def __init__(self, scores):
        self.scores = scores

    def score_group(self, group, context):
        if group.root_name in self.scores:
            return torch.as_tensor(self.scores[group.root_name], dtype=torch.float64)
        return torch.arange(group.size, 0, -1, dtype=torch.float64)


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).eval()


@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
def test_t_and_the_corrected_weights_equal_a_numpy_ridge_solution(criterion):
    model = _conv_net()
    dense = copy.deepcopy(model)
    x = torch.randn(64, 3, 8, 8)  # 4096 rows: all of them in the Gram
    ridge = 1e-2  # large enough to matter
    pruner = ChannelPruner(get_criterion(criterion), ignored_layers=[model[3]], max_layer_ratio=0.95,
                           correction="least_squares", correction_ridge=ridge)
    store = _grams(model, pruner, x)
    result = pruner.step(model, x[:2], Target("channels", 3 / 8), context={"activations": store})
    assert result.corrections == {"0": "interpolation absorbed by 1 consumer(s)"}
    dense_w = dense[0].weight.detach()
    kept = sorted(int(torch.argmin((dense_w - w).abs().sum((1, 2, 3)))) for w in model[0].weight.detach())
    assert len(kept) == 5
    removed = sorted(set(range(8)) - set(kept))
    with torch.no_grad():  # independent: the rows the consumer reads, then the ridge normal equations
        z = dense[:3](x).permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    g = z.T @ z
    lam = ridge * np.trace(g) / 8
    zs = z[:, kept]
    t = np.zeros((5, 8))
    t[np.arange(5), kept] = 1
    t[:, removed] = np.linalg.solve(zs.T @ zs + lam * np.eye(5), zs.T @ z[:, removed])
    request = next(r for r in pruner.correction_requests(discover_groups(dense, build_dependency_graph(dense, x[:2])), dense)
                   if r.module == "3")
    np.testing.assert_allclose(store.gram(request).gram.numpy(), g, rtol=1e-5, atol=1e-3)  # the streamed Gram
    np.testing.assert_allclose(ridge_interpolation(store.gram(request).gram.numpy(), kept, ridge), t, rtol=1e-5, atol=1e-7)
    expected = np.einsum("sc,ocij->osij", t, dense[3].weight.detach().double().numpy())
    np.testing.assert_allclose(model[3].weight.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[3].bias, dense[3].bias)  # biases do not change


def _plant(model: ResidualNet, c: int, d: int, a: float) -> None:
    """Stream channel ``c`` = ``a`` x channel ``d`` at every point of the first residual stream: the stem's
    and block 1's conv2 filters are copied, their BNs' affine parameters scaled (a > 0 passes the ReLUs)."""
    with torch.no_grad():
        for conv, bn in ((model.stem[0], model.stem[1]), (model.block1.conv2, model.block1.bn2)):
            conv.weight[c] = conv.weight[d]
            bn.running_mean[c] = bn.running_mean[d]
            bn.running_var[c] = bn.running_var[d]
            bn.weight[c] = a * bn.weight[d]
            bn.bias[c] = a * bn.bias[d]


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_planted_dependent_channels_pruned_from_a_residual_stream_leave_the_output_unchanged(criterion):
    """Through BN, ReLU and two residual additions, no fine-tuning: every consumer of the stream (block 1's
    conv1 reads it after the stem, block 2's conv1 and shortcut after block 1) absorbs its own T."""
    model = ResidualNet(seed=0).eval()
    planted = {3: (0, 2.0), 7: (1, 0.5), 12: (5, 1.5)}
    for c, (d, a) in planted.items():
        _plant(model, c, d, a)
    x = torch.randn(128, 1, 8, 8)
    with torch.no_grad():
        reference = model(x)
    scores = torch.ones(16)
    scores[list(planted)] = 0.0  # the criterion's choice: drop exactly the planted channels
    outputs = {}
    for correction in ("least_squares", "none"):
        net = copy.deepcopy(model)
        crit = _Fixed({"stem.0": scores}) if criterion == "l1" else _Fixed({"stem.0": scores + 0.01 * torch.rand(16)})
        pruner = ChannelPruner(crit, ignored_layers=[net.block1.conv1, net.block2.conv1, net.block2.conv2],
                               max_layer_ratio=0.5, correction=correction)
        store = _grams(net, pruner, x)
        result = pruner.step(net, x[:2], Target("channels", 3 / 16), context={"activations": store})
        assert net.stem[0].out_channels == 13
        outputs[correction] = (net, result)
    net, result = outputs["least_squares"]
    assert result.corrections == {"stem.0": "interpolation absorbed by 3 consumer(s)"}
    with torch.no_grad():
        after = net(x)
        plain = outputs["none"][0](x)
    assert float((after - reference).norm() / reference.norm()) < 1e-4
    assert float((plain - reference).norm() / reference.norm()) > 1e-2  # without correction it does change


def test_a_weight_criterion_without_grams_cannot_correct_and_the_step_is_undone():
    model = ResidualNet(seed=0)
    x = image_inputs()
    world = World(model, None, x)
    with pytest.raises(PruningError, match="Grams"):
        ChannelPruner(get_criterion("l1"), correction="least_squares").step(model, x, Target("flops", 0.3))
    world.assert_unchanged(model, x)
