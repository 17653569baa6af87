"""Weight criteria (l1, l2, fpgm) against NumPy references written from their definitions,
the random criterion's seeding, the registry, and a user criterion driving a real pruning step.

Reference definitions (independent of the library's code):

* the *producers* of a channel group are the layers whose output is the channel: the convs /
  linears writing it and the BatchNorms scaling it (biases are not used). For the test nets they
  are written out by hand (``ResidualNet.PRODUCERS``), not read from the library's groups;
* a producer's rows are its weight, one flattened row per output channel;
* l1 / l2: per-producer score = Lp norm of each row, divided by the mean of that producer's
  scores; the channel score = mean over producers;
* fpgm: per-producer score ``s_i = sum_j ||W_i - W_j||_2``, normalised and averaged the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import MLP, ResidualNet, image_inputs
from torch import nn

from lightning_prune.criteria import (
    Criterion,
    GroupCriterion,
    ScoringContext,
    available_criteria,
    get_criterion,
    register_criterion,
)
from lightning_prune.engine import ChannelPruner, Target, build_dependency_graph, discover_groups


# ------------------------------------------------------------------------------ references
def _rows(model: nn.Module, layer: str) -> np.ndarray:
    weight = dict(model.named_modules())[layer].weight.detach().double().numpy()
    return weight.reshape(weight.shape[0], -1)


def _lp_layer(rows: np.ndarray, p: float) -> np.ndarray:
    return np.array([np.sum(np.abs(r) ** p) ** (1.0 / p) for r in rows])


def _fpgm_layer(rows: np.ndarray) -> np.ndarray:
    n = rows.shape[0]
    return np.array([sum(np.sqrt(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n)) for i in range(n)])


def reference_scores(model: nn.Module, producers: tuple[str, ...], criterion: str) -> np.ndarray:
    per_layer = []
    for layer in producers:
        rows = _rows(model, layer)
        if criterion == "l1":
            s = _lp_layer(rows, 1.0)
        elif criterion == "l2":
            s = _lp_layer(rows, 2.0)
        else:
            s = _fpgm_layer(rows)
        per_layer.append(s / s.mean())
    return np.mean(per_layer, axis=0)


def _context(model, x, graph, seed=0):
    return ScoringContext(
        model=model, example_inputs=x, graph=graph, generator=torch.Generator().manual_seed(seed)
    )


def _scored_groups(model, x, criterion_name):
    graph = build_dependency_graph(model, x)
    groups = discover_groups(model, graph)
    scores = get_criterion(criterion_name).score(groups, _context(model, x, graph))
    return groups, scores


def _match_groups(groups, producer_sets):
    """For each hand-written producer set, the one library group whose root is in it."""
    matched = []
    for producers in producer_sets:
        hits = [i for i, g in enumerate(groups) if g.root_name in producers]
        assert len(hits) == 1, f"expected exactly one group rooted in {producers}, got {[groups[i].root_name for i in hits]}"
        matched.append(hits[0])
    assert sorted(matched) == list(range(len(groups))), "the library found groups the reference does not know"
    return matched


MLP_PRODUCERS = (("fc1",), ("fc2",))


# ------------------------------------------------------------------------------ weight criteria
@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weight_criteria_match_numpy_on_residual_net(criterion, seed):
    model = ResidualNet(seed=seed)
    x = image_inputs()
    groups, scores = _scored_groups(model, x, criterion)
    assert len(scores) == len(groups)
    for producers, gi in zip(ResidualNet.PRODUCERS, _match_groups(groups, ResidualNet.PRODUCERS)):
        expected = reference_scores(model, producers, criterion)
        got = scores[gi].detach().double().numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=0, err_msg=f"group {producers}")


def test_coupled_residual_group_averages_all_four_producers():
    """The stem group is written by stem conv + BN and block1's conv2 + BN: all four count, equally.

    Scaling one producer's weights by a constant must not change the scores (per-layer
    normalisation; a power of two keeps the float32 weights exact), but replacing it by other values
    must (it takes part in the mean).
    """
    model = ResidualNet(seed=3)
    x = image_inputs()
    producers = ResidualNet.PRODUCERS[0]
    groups = discover_groups(model, build_dependency_graph(model, x))
    gi = _match_groups(groups, ResidualNet.PRODUCERS)[0]

    def stem_scores():
        return _scored_groups(model, x, "l1")[1][gi].double().numpy()

    base = stem_scores()
    np.testing.assert_allclose(base, reference_scores(model, producers, "l1"), rtol=1e-10)
    with torch.no_grad():
        model.block1.conv2.weight.mul_(8.0)
    np.testing.assert_allclose(stem_scores(), base, rtol=1e-10)
    with torch.no_grad():
        model.block1.bn2.weight.copy_(torch.linspace(0.1, 3.0, model.block1.bn2.weight.numel()))
    changed = stem_scores()
    assert not np.allclose(changed, base)
    np.testing.assert_allclose(changed, reference_scores(model, producers, "l1"), rtol=1e-10)


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_weight_criteria_match_numpy_on_mlp(criterion):
    model = MLP(seed=2)
    x = model.example_inputs()
    groups, scores = _scored_groups(model, x, criterion)
    for producers, gi in zip(MLP_PRODUCERS, _match_groups(groups, MLP_PRODUCERS)):
        np.testing.assert_allclose(
            scores[gi].detach().double().numpy(), reference_scores(model, producers, criterion), rtol=1e-10, atol=0
        )


@pytest.mark.parametrize("rows", [12, 40])
def test_geometric_median_scores_exact_for_near_duplicate_filters(rows):
    """FPGM exists to find near-duplicate filters: their distance sums must stay exact in float64,
    whatever the number of filters (a layer with more than 25 filters included)."""
    from lightning_prune.criteria import geometric_median_scores

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 27, generator=gen, dtype=torch.float64)
    filters = base + 1e-7 * torch.randn(rows, 27, generator=gen, dtype=torch.float64)
    expected = _fpgm_layer(filters.numpy())
    got = geometric_median_scores(filters).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    assert list(np.argsort(got)) == list(np.argsort(expected))


def test_l1_orders_channels_by_filter_magnitude():
    """A planted tiny filter gets the lowest score of its group, a planted huge one the highest."""
    model = MLP(seed=4)
    with torch.no_grad():
        model.fc1.weight[5].mul_(1e-3)
        model.fc1.weight[9].mul_(1e3)
    groups, scores = _scored_groups(model, model.example_inputs(), "l1")
    gi = _match_groups(groups, MLP_PRODUCERS)[0]
    assert int(torch.argmin(scores[gi])) == 5
    assert int(torch.argmax(scores[gi])) == 9


# ------------------------------------------------------------------------------ random criterion
def test_random_criterion_is_seeded_by_the_context_generator():
    model = ResidualNet(seed=0)
    x = image_inputs()
    graph = build_dependency_graph(model, x)
    groups = discover_groups(model, graph)
    crit = get_criterion("random")
    a = crit.score(groups, _context(model, x, graph, seed=0))
    b = crit.score(groups, _context(model, x, graph, seed=0))
    c = crit.score(groups, _context(model, x, graph, seed=1))
    assert [s.shape[0] for s in a] == [g.size for g in groups]
    for sa, sb in zip(a, b):
        assert torch.equal(sa, sb)
    for sa, sc in zip(a, c):
        assert not torch.equal(sa, sc)
        assert bool(((sa >= 0) & (sa < 1)).all())


# ------------------------------------------------------------------------------ registry
def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_criterion("no-such-criterion")
    message = str(info.value)
    assert "no-such-criterion" in message
    for name in ("l1", "l2", "fpgm", "random"):
        assert name in available_criteria()
        assert name in message


@pytest.mark.parametrize("bad", [3, None, 1.5, nn.Linear(2, 2), ["l1"]])
def test_non_string_non_criterion_raises_type_error(bad):
    with pytest.raises(TypeError):
        get_criterion(bad)


def test_names_resolve_to_the_right_criteria():
    for name in ("l1", "l2", "fpgm", "random"):
        crit = get_criterion(name)
        assert isinstance(crit, Criterion)
        assert crit.name == name
    assert get_criterion("L1").name == "l1"  # case-insensitive
    instance = get_criterion("l2")
    assert get_criterion(instance) is instance


class _IndexOrder(GroupCriterion):
    """Scores channel ``c`` as ``c``: the lowest indices are the least important."""

    def score_group(self, group, context):
        return torch.arange(group.size, dtype=torch.float64)


_USER_NAME = "test-index-order"
if _USER_NAME not in available_criteria():
    register_criterion(_USER_NAME)(_IndexOrder)


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError):
        register_criterion("l1")(_IndexOrder)
    assert type(get_criterion("l1")).__name__ == "L1Norm"


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_user_registered_criterion_drives_a_pruning_step(allocation):
    """The channels removed are exactly the lowest-indexed ones of every group (from BN scales)."""
    model = ResidualNet(seed=5)
    x = image_inputs()
    crit = get_criterion(_USER_NAME)
    assert isinstance(crit, _IndexOrder)
    bn_of_group = ["stem.1", "block1.bn1", "block2.bn1", "block2.bn2"]
    modules = dict(model.named_modules())
    before = {name: modules[name].weight.detach().clone() for name in bn_of_group}
    result = ChannelPruner(crit, allocation=allocation).step(model, x, Target("channels", 0.4))
    assert not result.plan.empty
    modules = dict(model.named_modules())
    pruned_any = False
    for name in bn_of_group:
        old, new = before[name], modules[name].weight.detach()
        kept = new.numel()
        pruned_any |= kept < old.numel()
        assert torch.equal(new, old[old.numel() - kept :]), f"{name} did not keep its highest-indexed channels"
    assert pruned_any
    assert model(x).shape == (2, 10)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(2, 40),
    dim=st.integers(1, 30),
    offset=st.floats(0.0, 1e4),
    gap=st.sampled_from([0.0, 1e-9, 1e-6, 1e-3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_pairwise_distances_are_exact_for_near_duplicates_far_from_the_mean(rows, dim, offset, gap, seed):
    """Two far-apart clusters (centring cannot help) with near-duplicate pairs at every scale: every
    distance matches a NumPy difference-by-difference computation."""
    from lightning_prune.criteria.fpgm import pairwise_distances

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim))
    x[: rows // 2] += offset  # one cluster far from the other
    x[1] = x[0] + gap * rng.standard_normal(dim)
    expected = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    got = pairwise_distances(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-300)
    assert np.all(np.diag(got) == 0)
