"""Discriminant information: closed form vs brute force, streaming vs batch, planted signal, a fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_prune.collection import ActivationCollector, ActivationRequest, ClassMoments
from lightning_prune.criteria.discriminant_information import (
    di_curve,
    greedy_removal_order,
    leave_one_out_drops,
    scatter_matrices,
)

RHO = 1e-3


def _numpy_di(x: np.ndarray, y: np.ndarray, channels, rho=RHO) -> float:
    """DI from raw features, written from the definition (per-sample scatters)."""
    x = x[:, list(channels)]
    n = len(x)
    mu = x.mean(0)
    xc = x - mu
    s_bar = xc.T @ xc / n
    s_b = np.zeros_like(s_bar)
    for c in np.unique(y):
        d = x[y == c].mean(0) - mu
        s_b += (y == c).sum() * np.outer(d, d) / n
    return float(np.trace(np.linalg.solve(s_bar + rho * np.eye(len(channels)), s_b)))


def _moments(x: np.ndarray, y: np.ndarray, k: int) -> ClassMoments:
    t = torch.from_numpy(x)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y), k).double()
    return ClassMoments(onehot.sum(0), onehot.T @ t, t.sum(0), t.T @ t)


def _data(seed=0, n=400, c=8, k=4, informative=(2, 5)):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, c))
    x[:, list(informative)] += 1.5 * rng.standard_normal((k, len(informative)))[y]
    return x, y


def test_closed_form_equals_brute_force_leave_one_out():
    x, y = _data()
    s_bar, s_b = scatter_matrices(_moments(x, y, 4))
    drops = leave_one_out_drops(s_bar, s_b, RHO).numpy()
    full = _numpy_di(x, y, range(8))
    brute = np.array([full - _numpy_di(x, y, [j for j in range(8) if j != c]) for c in range(8)])
    np.testing.assert_allclose(drops, brute, rtol=1e-8, atol=1e-10)


def test_planted_class_separation_gets_the_highest_influence():
    x, y = _data(informative=(2, 5))
    s_bar, s_b = scatter_matrices(_moments(x, y, 4))
    drops = leave_one_out_drops(s_bar, s_b, RHO)
    assert set(torch.topk(drops, 2).indices.tolist()) == {2, 5}


def test_di_curve_equals_brute_force_nested_subsets():
    x, y = _data(c=7)
    s_bar, s_b = scatter_matrices(_moments(x, y, 4))
    order = [6, 0, 3, 1, 4, 2, 5]
    curve = di_curve(s_bar, s_b, RHO, order).numpy()
    for kept in range(1, 8):
        channels = order[7 - kept :]
        assert curve[kept] == pytest.approx(_numpy_di(x, y, channels), rel=1e-8)
    assert curve[0] == 0


def test_greedy_order_removes_the_least_influential_each_time():
    x, y = _data(c=6)
    s_bar, s_b = scatter_matrices(_moments(x, y, 4))
    order = greedy_removal_order(s_bar, s_b, RHO)
    remaining = list(range(6))
    for removed in order[:-1]:  # brute force: the channel whose removal costs the least DI
        costs = {c: _numpy_di(x, y, remaining) - _numpy_di(x, y, [r for r in remaining if r != c]) for c in remaining}
        assert removed == min(costs, key=costs.get)
        remaining.remove(removed)


def test_streamed_moments_equal_the_batch_computation_and_absent_classes_are_harmless():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU())
    request = ActivationRequest("0", statistic="class_moments", pooling="avg", num_classes=6)
    collector = ActivationCollector(model, [request])
    collector.attach()
    feats, labels = [], []
    for _ in range(5):
        x, y = torch.randn(7, 2, 6, 6), torch.randint(0, 4, (7,))  # classes 4 and 5 never occur
        collector.begin_batch(y)
        model(x)
        collector.end_batch()
        feats.append(model[0](x).detach().mean((2, 3)).double())  # the conv's output, as requested
        labels.append(y)
    moments = collector.store().class_moments(request)
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    np.testing.assert_allclose(moments.scatter.numpy(), x.T @ x, rtol=1e-5)
    np.testing.assert_allclose(moments.total.numpy(), x.sum(0), rtol=1e-5)
    np.testing.assert_array_equal(moments.counts.numpy(), np.bincount(y, minlength=6))
    s_bar, s_b = scatter_matrices(moments)
    drops = leave_one_out_drops(s_bar, s_b, RHO)
    assert torch.isfinite(drops).all()
    full = _numpy_di(x, y, range(5))
    brute = [full - _numpy_di(x, y, [j for j in range(5) if j != c]) for c in range(5)]
    np.testing.assert_allclose(drops.numpy(), brute, rtol=1e-4, atol=1e-8)


def test_near_singular_scatter_stays_finite():
    x, y = _data(c=5, informative=(1, 2))
    x = np.column_stack([x, x[:, 2], 0.0 * x[:, 0]])  # a duplicated and a constant channel
    s_bar, s_b = scatter_matrices(_moments(x, y, 4))
    drops = leave_one_out_drops(s_bar, s_b, 1e-4)
    assert torch.isfinite(drops).all()
    assert drops[6] == pytest.approx(0.0, abs=1e-8)  # the constant channel carries nothing


def test_labels_outside_num_classes_are_reported():
    model = nn.Sequential(nn.Linear(3, 4))
    collector = ActivationCollector(model, [ActivationRequest("0", statistic="class_moments", num_classes=3)])
    collector.attach()
    collector.begin_batch(torch.tensor([0, 1, 5]))
    model(torch.randn(3, 3))
    collector.end_batch()
    with pytest.raises(ValueError, match="num_classes"):
        collector.store()


def test_di_curve_without_a_cholesky_factor_equals_brute_force():
    """S_bar + rho I indefinite (cancellation in S_bar beyond rho): the downdate path, same curve."""
    rng = np.random.default_rng(3)
    c = 6
    q, _ = np.linalg.qr(rng.standard_normal((c, c)))
    s_bar = q @ np.diag([2.0, 1.0, 0.5, 0.3, -5e-3, 0.2]) @ q.T  # one eigenvalue below -rho
    m = rng.standard_normal((3, c))
    s_b = m.T @ m
    order = [4, 1, 5, 0, 3, 2]
    curve = di_curve(torch.from_numpy(s_bar), torch.from_numpy(s_b), RHO, order).numpy()
    a = s_bar + RHO * np.eye(c)
    for kept in range(1, c + 1):
        idx = order[c - kept :]
        expected = np.trace(np.linalg.solve(a[np.ix_(idx, idx)], s_b[np.ix_(idx, idx)]))
        assert curve[kept] == pytest.approx(expected, rel=1e-8, abs=1e-10)
