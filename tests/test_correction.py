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
