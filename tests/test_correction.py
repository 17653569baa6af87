"""Least-squares correction: the streamed Gram, pivoted Cholesky vs SciPy's pivoted QR, T and the
corrected weights vs a NumPy ridge solution, exact dependence through residual streams, BN
recalibration, atomicity and resume."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from crash import SaveThenCrash
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import qr

from lightning_prune.collection import ActivationCollector, ActivationRequest, GramSums, SharedGenerator
from lightning_prune.collection.accumulators import _Sums
from lightning_prune.engine.correction import (
    DEFAULT_RIDGE,
    GCV_CEILING,
    GCV_POINTS,
    CorrectionWarning,
    gcv_ridge,
    pivoted_cholesky,
    reconstruction_residual,
    ridge_interpolation,
)


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


@pytest.mark.parametrize("fold_rows", [1, 50, 4096])  # every batch, across batches, only when read
def test_rows_folded_in_batches_give_the_same_gram_and_never_see_a_later_in_place_change(fold_rows, monkeypatch):
    """Rows are kept and folded into the Gram several batches at a time; a linear layer's output is
    read by an in-place ReLU right after the hook, and the Gram is still that of the pre-ReLU rows."""
    monkeypatch.setattr(_Sums, "fold_rows", fold_rows)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(inplace=True))
    request = ActivationRequest("0", statistic="gram", rows_per_batch=10_000)
    collector = ActivationCollector(model, [request])
    collector.attach()
    xs = [torch.randn(7, 5) for _ in range(40)]  # past the float64 flush at 32 batches
    with torch.no_grad():
        for x in xs:
            collector.begin_batch()
            model(x)
            collector.end_batch()
        z = torch.cat([x @ model[0].weight.T + model[0].bias for x in xs]).double()
    assert (z < 0).any()  # the ReLU did change the rows in place
    stat = collector.store().gram(request)
    torch.testing.assert_close(stat.gram, z.T @ z, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(stat.total, z.sum(0), rtol=1e-6, atol=1e-4)
    assert stat.count == 7 * 40


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


# ---------------------------------------------------------------------------------------------- the ridge by GCV
def _gcv_on_rows(z: np.ndarray, kept: list[int], ridges: np.ndarray) -> np.ndarray:
    """Brute force on the rows themselves: the hat matrix of the kept columns, per relative ridge."""
    n, c = z.shape
    removed = sorted(set(range(c)) - set(kept))
    zs, zr = z[:, kept], z[:, removed]
    scale = np.trace(z.T @ z) / c
    scores = []
    for rel in ridges:
        hat = zs @ np.linalg.solve(zs.T @ zs + rel * scale * np.eye(len(kept)), zs.T)
        rss = np.linalg.norm(zr - hat @ zr) ** 2
        df = np.trace(hat)
        scores.append(n * rss / (n - df) ** 2 if n - df > 0 else np.inf)
    return np.asarray(scores)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(4, 60), channels=st.integers(3, 12), rank=st.integers(1, 12),
    noise=st.sampled_from([0.0, 0.05, 1.0]), seed=st.integers(0, 2**16),
)
def test_the_gcv_ridge_from_the_gram_is_the_brute_force_gcv_minimiser_on_the_rows(rows, channels, rank, noise, seed):
    """Fewer rows than kept channels included: the choice needs only the Gram and its row count."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, min(rank, channels))) @ rng.standard_normal((min(rank, channels), channels))
    z += noise * rng.standard_normal((rows, channels))
    kept = sorted(rng.choice(channels, size=int(rng.integers(1, channels)), replace=False).tolist())
    ridges = np.logspace(np.log10(DEFAULT_RIDGE), np.log10(GCV_CEILING), GCV_POINTS)
    brute = _gcv_on_rows(z, kept, ridges)
    chosen = gcv_ridge(z.T @ z, kept, rows)
    assert chosen in ridges
    best = brute.min()
    # the chosen ridge's brute-force score is the minimum (up to rounding: with 4 rows the Gram and the rows
    # disagree in the 6th digit where n - df is small)
    assert brute[int(np.argmin(np.abs(ridges - chosen)))] <= best * (1 + 1e-4) + 1e-12


def test_the_gcv_ridge_keeps_an_exact_reconstruction_exact_and_handles_the_edges():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 4))
    z = np.hstack([base, base @ rng.standard_normal((4, 3))])  # channels 4-6 are combinations of 0-3
    g = z.T @ z
    assert gcv_ridge(g, [0, 1, 2, 3], 200) == pytest.approx(DEFAULT_RIDGE)  # the floor: the fit is exact
    t = ridge_interpolation(g, [0, 1, 2, 3], gcv_ridge(g, [0, 1, 2, 3], 200))
    np.testing.assert_allclose(z[:, :4] @ t, z, atol=1e-4)
    assert gcv_ridge(g, list(range(7)), 200) == DEFAULT_RIDGE  # nothing removed
    assert gcv_ridge(g, [], 200) == DEFAULT_RIDGE  # nothing kept
    assert gcv_ridge(np.zeros((3, 3)), [0], 10) == DEFAULT_RIDGE  # no energy at all
    assert gcv_ridge(g, [0, 1, 2, 3], 2) == GCV_CEILING  # 2 rows, 4 kept: no ridge tried leaves n - df > 0
    assert gcv_ridge(g, [0, 1, 2, 3], 200, floor=0.0) == pytest.approx(1e-12)  # floor 0: the search starts at 1e-12


def test_with_fewer_rows_than_kept_channels_the_gcv_ridge_generalises_where_the_default_overfits():
    """A planted signal: 48 channels driven by 6 factors plus as much noise; the Gram holds 40 rows for
    36 kept channels. On fresh rows from the same source, the default ridge's reconstruction is worse
    than dropping the channels; GCV's is better than both."""
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((6, 48))

    def rows(n):
        return rng.standard_normal((n, 6)) @ mix + rng.standard_normal((n, 48))

    train, fresh = rows(40), rows(4000)
    g = train.T @ train
    kept = list(range(36))

    def fresh_error(ridge):
        t = ridge_interpolation(g, kept, ridge)
        return np.linalg.norm(fresh - fresh[:, kept] @ t) ** 2 / np.linalg.norm(fresh) ** 2

    dropped = (fresh[:, 36:] ** 2).sum() / (fresh**2).sum()
    chosen = gcv_ridge(g, kept, 40)
    assert chosen > 100 * DEFAULT_RIDGE
    assert fresh_error(DEFAULT_RIDGE) > dropped  # overfit: worse than no correction at all
    assert fresh_error(chosen) < 0.5 * dropped


# ---------------------------------------------------------------------------------------------- the applier
import copy  # noqa: E402

from nets import ResidualNet, image_inputs  # noqa: E402
from test_engine import World, train_steps  # noqa: E402
from torch import nn  # noqa: E402

from lightning_prune.criteria import GroupCriterion, get_criterion  # noqa: E402
from lightning_prune.engine import ChannelPruner, PruningError, Target, build_dependency_graph, discover_groups  # noqa: E402
from lightning_prune.engine.recalibration import recalibrate_batchnorm  # noqa: E402


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
    x = torch.randn(8, 3, 8, 8)  # 512 rows (GRAM_ROWS_PER_BATCH): all of them in the Gram
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


@pytest.mark.parametrize(("criterion", "ridge"), [("l1", None), ("random", None), ("l1", 1e-6)])  # None: GCV
def test_planted_dependent_channels_pruned_from_a_residual_stream_leave_the_output_unchanged(criterion, ridge):
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
                               max_layer_ratio=0.5, correction=correction, correction_ridge=ridge)
        store = _grams(net, pruner, x)
        result = pruner.step(net, x[:2], Target("channels", 3 / 16), context={"activations": store})
        assert net.stem[0].out_channels == 13
        outputs[correction] = (net, result)
    net, result = outputs["least_squares"]
    if ridge is not None:  # a fixed ridge
        assert result.corrections == {"stem.0": "interpolation absorbed by 3 consumer(s)"}
    else:  # exact dependence: GCV keeps the floor for every consumer
        assert result.corrections == {"stem.0": "interpolation absorbed by 3 consumer(s) (GCV ridge 1e-06, 1e-06, 1e-06)"}
    with torch.no_grad():
        after = net(x)
        plain = outputs["none"][0](x)
    assert float((after - reference).norm() / reference.norm()) < 1e-4
    assert float((plain - reference).norm() / reference.norm()) > 1e-2  # without correction it does change


def test_with_few_rows_the_gcv_ridge_corrects_where_the_default_ridge_makes_the_network_worse():
    """A late stage fed small inputs: the Grams hold 4 samples x 4 positions = 16 rows per batch, 48 rows
    in all, for 48 kept channels. Held-out inputs: a fixed ridge's
    correction takes the output further from the dense one than no correction; GCV brings it closer."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    batches = [torch.randn(4, 3, 2, 2) for _ in range(3)]
    with torch.no_grad():  # BN statistics of the data, then eval
        for b in batches * 4:
            net(b)
    net.eval()
    held = torch.randn(256, 3, 2, 2)
    with torch.no_grad():
        reference = net(held)
    errors, notes = {}, {}
    for correction, ridge in (("none", None), ("least_squares", 1e-6), ("least_squares", "gcv")):
        model = copy.deepcopy(net)
        pruner = ChannelPruner(get_criterion("l1"), ignored_layers=[model[0], model[6]], max_layer_ratio=0.5,
                               correction=correction, correction_ridge=ridge)
        store = _grams(model, pruner, batches[0], batches)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pruner.step(model, batches[0][:2], Target("channels", 0.25), context={"activations": store})
        warned = [str(w.message) for w in caught if issubclass(w.category, CorrectionWarning)]
        if ridge == 1e-6:  # the fixed ridge on as many rows as kept channels says so, naming the layer and the fix
            assert len(warned) == 1 and "'6' (48 rows, 48 kept channels)" in warned[0] and "correction_ridge='gcv'" in warned[0]
        else:
            assert not warned
        assert model[3].out_channels == 48
        with torch.no_grad():
            errors[correction, ridge] = float((model(held) - reference).norm() / reference.norm())
        notes[correction, ridge] = result.corrections.get("3", "")
    assert errors["least_squares", 1e-6] > errors["none", None]
    assert errors["least_squares", "gcv"] < errors["none", None]
    assert notes["least_squares", "gcv"].startswith("interpolation absorbed by 1 consumer(s) (GCV ridge ")


@pytest.mark.parametrize("bad", ["auto", -1.0, True, [1e-3]])
def test_a_bad_ridge_is_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match="correction_ridge must be a number >= 0, 'gcv' or None"):
        ChannelPruner(get_criterion("l1"), correction="least_squares", correction_ridge=bad)
    with pytest.raises(ValueError, match="ridge must be a number >= 0, 'gcv' or None"):
        get_criterion("interpolative_decomposition", ridge=bad)
    assert ChannelPruner(get_criterion("interpolative_decomposition", ridge="gcv")).ridge == "gcv"
    assert ChannelPruner(get_criterion("interpolative_decomposition")).ridge == "gcv"  # the default, ID included
    assert ChannelPruner(get_criterion("interpolative_decomposition", ridge=1e-6)).ridge == 1e-6  # the paper's T
    assert ChannelPruner(get_criterion("l1"), correction_ridge=0).ridge == 0.0


def test_a_weight_criterion_without_grams_cannot_correct_and_the_step_is_undone():
    model = ResidualNet(seed=0)
    x = image_inputs()
    world = World(model, None, x)
    with pytest.raises(PruningError, match="Grams"):
        ChannelPruner(get_criterion("l1"), correction="least_squares").step(model, x, Target("flops", 0.3))
    world.assert_unchanged(model, x)


# ---------------------------------------------------------------------------------------------- BN recalibration
def test_recalibrated_statistics_equal_an_independent_pass_over_the_same_batches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 5),
    )
    model.train()
    model[8].eval()
    old = {n: b for n, b in model.named_buffers()}
    old_values = {n: b.clone() for n, b in old.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [torch.randn(n, 2, 6, 6) + 1.0 for n in (5, 7, 4)]
    seen = recalibrate_batchnorm(model, batches)
    # by hand: BN1's inputs are conv1's outputs; BN2's inputs follow BN1 normalising with batch statistics
    bn1_in, bn2_in = [], []
    with torch.no_grad():
        for x in batches:
            h = model[0](x)
            bn1_in.append(h)
            mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
            h = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + model[1].eps)
            h = torch.relu(h * model[1].weight[None, :, None, None] + model[1].bias[None, :, None, None])
            bn2_in.append(model[4](h))  # dropout off
    for bn, inputs in ((model[1], bn1_in), (model[5], bn2_in)):
        rows = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in inputs]).double()
        torch.testing.assert_close(bn.running_mean.double(), rows.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), rows.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    assert seen == {"1": 16 * 36, "5": 16 * 36}
    # nothing written in place: the old buffers are the old values; no parameter, mode or momentum changed
    for n, b in old.items():
        assert torch.equal(b, old_values[n]), n
    assert model[1].running_mean is not old["1.running_mean"]
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    assert model.training and model[3].training and not model[8].training and model[5].momentum == 0.3
    assert model[1].track_running_stats and model[5].track_running_stats


@pytest.mark.parametrize("where", ["after_recalibration", "during_recalibration"])
def test_correction_and_recalibration_are_undone_by_a_fault_after_them(monkeypatch, where):
    import lightning_prune.engine.pruner as pruner_module

    model = ResidualNet(seed=0)
    x = image_inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, optimizer, 1)
    pruner = ChannelPruner(get_criterion("l1"), correction="least_squares")
    store = _grams(model, pruner, torch.randn(32, 1, 8, 8))
    world = World(model, optimizer, x)
    ran = {}

    def recalibrate(m):
        ran["seen"] = recalibrate_batchnorm(m, [torch.randn(8, 1, 8, 8) for _ in range(3)])
        if where == "during_recalibration":
            raise RuntimeError("injected fault inside the recalibration")

    def failing_remap(*args, **kwargs):
        raise RuntimeError("injected fault after the recalibration")

    monkeypatch.setattr(pruner_module, "prepare_optimizer_remap", failing_remap)
    with pytest.raises(PruningError, match="injected fault"):
        pruner.step(model, x, Target("flops", 0.4), optimizers=[optimizer], context={"activations": store},
                    recalibrate=recalibrate)
    assert ran["seen"]  # the recalibration really ran (and the correction before it)
    world.assert_unchanged(model, x)


# ---------------------------------------------------------------------------------------------- inside fit
import lightning as L  # noqa: E402

from lightning_prune import StructuredPruningCallback  # noqa: E402
from lightning_prune.data import DigitsDataModule  # noqa: E402
from lightning_prune.models import ImageClassifier, SmallResNet  # noqa: E402


def _fit_trainer(callbacks, epochs, tmp_path=None, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3, limit_val_batches=1,
                     default_root_dir=tmp_path, **kw)


def _classifier():
    return ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1), max_epochs=3)


def test_a_weight_criterion_with_least_squares_collects_grams_corrects_recalibrates_and_reports():
    L.seed_everything(0)
    model = _classifier()
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.4, epochs=[0], verbose=False,
                                   correction="least_squares", recalibrate_batches=3)
    assert cb.needs_activations  # weight-only criterion, but the correction needs the consumers' Grams
    trainer = _fit_trainer([cb], 1)
    trainer.fit(model, DigitsDataModule())
    record = cb.history[0]
    assert record.corrections and all(v.startswith("interpolation absorbed") for v in record.corrections.values())
    assert record.samples and record.recalibration_seconds > 0
    assert record.agreement is not None and 0.0 <= record.agreement <= 1.0
    assert float(trainer.callback_metrics["prune/agreement"]) == pytest.approx(record.agreement)
    restored = type(record).from_dict(record.to_dict())
    assert restored == record


def test_defaults_recalibrate_a_bn_model_and_do_not_correct_a_weight_criterion():
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.4, epochs=[0], verbose=False)
    assert cb.pruner.resolved_correction == "none" and not cb.needs_activations
    assert StructuredPruningCallback("id", target_flops_reduction=0.4).pruner.resolved_correction == "least_squares"
    assert StructuredPruningCallback("id", target_flops_reduction=0.4, correction="none").pruner.resolved_correction == "none"
    L.seed_everything(0)
    _fit_trainer([cb], 1).fit(_classifier(), DigitsDataModule())
    assert cb.history[0].recalibration_seconds > 0 and not cb.history[0].corrections
    with pytest.raises(ValueError, match="correction"):
        StructuredPruningCallback("l1", target_flops_reduction=0.4, correction="lsq")
    with pytest.raises(ValueError, match="recalibrate_batches"):
        StructuredPruningCallback("l1", target_flops_reduction=0.4, recalibrate_batches=0)


def test_residual_widths_through_the_callback_choose_non_uniform_widths_and_need_the_correction():
    with pytest.raises(ValueError, match="residual_widths.*correction='least_squares'"):
        StructuredPruningCallback("l1", target_flops_reduction=0.4, residual_widths=True)
    with pytest.raises(TypeError, match="residual_widths"):
        StructuredPruningCallback("l1", target_flops_reduction=0.4, correction="least_squares", residual_widths="yes")
    L.seed_everything(0)
    model = _classifier()
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0], verbose=False,
                                   correction="least_squares", residual_widths=True, recalibrate_batches=3)
    assert cb.pruner.residual_widths
    _fit_trainer([cb], 1).fit(model, DigitsDataModule())
    kept = {n: m.out_channels / dense[n] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    # l1's own allocation is uniform (every group keeps the same share, up to rounding); these differ
    assert max(kept.values()) - min(kept.values()) > 0.25, kept
    assert cb.history[0].flops_reduction == pytest.approx(0.5, abs=0.03)


def test_a_fault_after_correction_and_recalibration_inside_fit_leaves_model_and_optimizer_as_they_were(monkeypatch):
    import lightning_prune.engine.pruner as pruner_module

    def failing_remap(*args, **kwargs):
        raise RuntimeError("injected fault after recalibration")

    monkeypatch.setattr(pruner_module, "prepare_optimizer_remap", failing_remap)
    seen = {}

    class Before(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen["state"] = {k: (v, v.detach().clone()) for k, v in pl_module.state_dict(keep_vars=True).items()}
            opt = trainer.optimizers[0]
            seen["opt"] = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]}

    L.seed_everything(0)
    model = _classifier()
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.4, epochs=[0], verbose=False,
                                   correction="least_squares", recalibrate_bn=True, recalibrate_batches=2)
    trainer = _fit_trainer([Before(), cb], 2)
    with pytest.raises(PruningError, match="left unchanged"):
        trainer.fit(model, DigitsDataModule())
    now = model.state_dict(keep_vars=True)
    assert now.keys() == seen["state"].keys()
    for k, (ref, value) in seen["state"].items():
        assert now[k] is ref and torch.equal(now[k], value), k  # BN buffers included: same objects, same values
    opt = trainer.optimizers[0]
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in opt.state[p].items():
                assert torch.equal(v, seen["opt"][id(p)][k])


def test_an_interrupted_corrected_and_recalibrated_run_resumes_to_the_same_weights(tmp_path):
    def run(callbacks, ckpt=None, model=None):
        L.seed_everything(0)
        model = model or _classifier()
        cb = StructuredPruningCallback("l2", target_flops_reduction=0.5, epochs=[0, 2], verbose=False,
                                       correction="least_squares", recalibrate_batches=2)
        _fit_trainer([cb, *callbacks], 4, tmp_path).fit(model, DigitsDataModule(), ckpt_path=ckpt)
        return model, cb

    reference, ref_cb = run([])
    assert all(r.recalibration_seconds > 0 and r.corrections for r in ref_cb.history)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run([SaveThenCrash(tmp_path)])
    L.seed_everything(123)  # a different process state: the resume must not depend on it
    resumed, cb = run([], ckpt=tmp_path / "epoch1.ckpt", model=_classifier())
    assert [r.epoch for r in cb.history] == [0, 2]
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- widths from the residual
def test_ordered_residuals_equal_the_reconstruction_error_of_every_prefix():
    from lightning_prune.engine.correction import ordered_residuals

    rng = np.random.default_rng(5)
    z = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    g = z.T @ z
    order = [4, 1, 5, 0, 3, 2]
    res = ordered_residuals(g, order, 0.0)  # without ridge: exactly ||Z - Z_S T||^2 / ||Z||^2
    assert res[0] == pytest.approx(1.0) and res[6] == 0.0
    for k in range(1, 6):
        assert res[k] == pytest.approx(reconstruction_residual(g, order[:k], 0.0), rel=1e-8, abs=1e-12)
    ridge = 1e-3  # with one: the Schur form tr(G_RR) - tr(G_RS (G_SS + lambda I)^-1 G_SR), by NumPy
    lam = ridge * np.trace(g) / 6
    res = ordered_residuals(g, order, ridge)
    for k in range(1, 6):
        s_, r_ = order[:k], order[k:]
        schur = np.trace(g[np.ix_(r_, r_)]) - np.trace(g[np.ix_(r_, s_)] @ np.linalg.solve(g[np.ix_(s_, s_)] + lam * np.eye(k), g[np.ix_(s_, r_)]))
        assert res[k] == pytest.approx(schur / np.trace(g), rel=1e-8, abs=1e-12)


def test_with_correction_a_weight_criterion_allocates_by_the_residual_per_mac():
    from lightning_prune.engine.correction import width_losses_from_grams

    model = ResidualNet(seed=0).eval()
    x = torch.randn(64, 1, 8, 8)
    pruner = ChannelPruner(get_criterion("l1"), correction="least_squares", residual_widths=True)
    store = _grams(model, pruner, x)
    groups = pruner.analyse(model, x[:2]).groups
    scores = get_criterion("l1").score(groups, None)
    losses = width_losses_from_grams(groups, scores, store, model, 1e-6)
    for group, loss, score in zip(groups, losses, scores):
        assert loss.shape == (group.positions + 1,) and loss[-1] == 0 and bool((loss[:-1] >= loss[1:]).all())
        # keeping the top-k (by l1) leaves what the consumers' Grams say
        order = torch.argsort(score, descending=True, stable=True).tolist()
        k = group.size // 2
        consumers = [r for r in pruner.correction_requests([group], model)]
        expected = np.sum([reconstruction_residual(store.gram(r).gram.numpy(), order[:k], 1e-6) for r in consumers])
        assert float(loss[k]) == pytest.approx(expected, rel=1e-3)  # + lambda ||T_R||^2 in the loss
    uniform = ChannelPruner(get_criterion("l1"), correction="least_squares")  # default: the criterion's allocation
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    pruner.step(a, x[:2], Target("flops", 0.5), context={"activations": _grams(a, pruner, x)})
    uniform.step(b, x[:2], Target("flops", 0.5), context={"activations": _grams(b, uniform, x)})
    assert [m.weight.shape for m in a.modules() if isinstance(m, nn.Conv2d)] != [
        m.weight.shape for m in b.modules() if isinstance(m, nn.Conv2d)]  # the residual chose other widths


def _widths_after_one_step(criterion, **kwargs):
    L.seed_everything(0)
    model = _classifier()
    cb = StructuredPruningCallback(criterion, target_flops_reduction=0.5, epochs=[0], verbose=False,
                                   recalibrate_batches=2, **kwargs)
    _fit_trainer([cb], 1).fit(model, DigitsDataModule())
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return {n: m.out_channels for n, m in convs.items()}, {n: m.weight.detach().clone() for n, m in convs.items()}


@pytest.mark.parametrize("criterion", ["discriminant_information", "pca_gm", "interpolative_decomposition"])
def test_criterion_widths_false_leaves_the_widths_to_the_allocation_and_the_ranking_to_the_criterion(criterion):
    with pytest.raises(TypeError, match="criterion_widths"):
        StructuredPruningCallback(criterion, target_flops_reduction=0.5, criterion_widths="no")
    own, _ = _widths_after_one_step(criterion)
    # l1 has no width rule: its uniform allocation is the reference for "allocation decides the widths"
    uniform, l1_weights = _widths_after_one_step("l1", allocation="uniform")
    ablated, weights = _widths_after_one_step(criterion, allocation="uniform", criterion_widths=False)
    assert own != uniform  # the criterion's own width rule chooses other widths (else the test proves nothing)
    assert ablated == uniform
    # the same widths, other channels: which ones are kept is still the criterion's choice
    assert any(not torch.equal(weights[n], l1_weights[n]) for n in weights)


def test_criterion_widths_false_with_residual_widths_takes_the_widths_from_what_the_correction_leaves():
    uniform, _ = _widths_after_one_step("discriminant_information", allocation="uniform", criterion_widths=False)
    residual, _ = _widths_after_one_step(
        "discriminant_information", criterion_widths=False, correction="least_squares", residual_widths=True
    )
    own, _ = _widths_after_one_step("discriminant_information", correction="least_squares", residual_widths=True)
    assert residual != uniform
    # with its own width rule on, residual_widths does not apply to DI: the widths differ from the energies'
    assert own != residual


def test_an_allocation_that_a_criterion_with_its_own_width_rule_ignores_is_warned_about():
    with pytest.warns(UserWarning, match=r"allocation='global' has no effect.*criterion_widths=False"):
        StructuredPruningCallback("pca_gm", target_flops_reduction=0.5, allocation="global")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StructuredPruningCallback("pca_gm", target_flops_reduction=0.5, allocation="global", criterion_widths=False)
        StructuredPruningCallback("pca_gm", target_flops_reduction=0.5)
        StructuredPruningCallback("l1", target_flops_reduction=0.5, allocation="global")
