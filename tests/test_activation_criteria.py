"""Activation collection and the activation criteria (pls_vip, pca_gm), against independent references."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cross_decomposition import PLSRegression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import StructuredPruningCallback
from lightning_prune.collection import ActivationCollector, ActivationRequest, reservoir_merge
from lightning_prune.criteria import ScoringContext, get_criterion
from lightning_prune.criteria.pca_gm import pca_width
from lightning_prune.criteria.pls_vip import fit_pls_vip, vip_scores
from lightning_prune.data import DigitsDataModule
from lightning_prune.engine import build_dependency_graph, discover_groups
from lightning_prune.models import ImageClassifier, SmallResNet


# ----------------------------------------------------------------------------- PLS + VIP
def _numpy_vip(pls: PLSRegression) -> np.ndarray:
    """VIP written out term by term from the formula (docs/criteria.md section "PLS + VIP")."""
    w, t, q = pls.x_weights_, pls.x_scores_, pls.y_loadings_
    p, a_count = w.shape
    s = np.array([(t[:, a] @ t[:, a]) * (q[:, a] @ q[:, a]) for a in range(a_count)])
    vip = np.empty(p)
    for j in range(p):
        acc = sum(s[a] * (w[j, a] / np.linalg.norm(w[:, a])) ** 2 for a in range(a_count))
        vip[j] = np.sqrt(p * acc / s.sum())
    return vip


@pytest.mark.parametrize("n_components", [1, 2, 3])
def test_vip_matches_numpy_from_sklearn_fit(n_components):
    rng = np.random.default_rng(n_components)
    x = rng.standard_normal((120, 30))
    y = rng.integers(0, 4, 120)
    pls = PLSRegression(n_components=n_components, scale=True).fit(x, np.eye(4)[y])
    np.testing.assert_allclose(vip_scores(pls.x_weights_, pls.x_scores_, pls.y_loadings_), _numpy_vip(pls), rtol=1e-6)
    np.testing.assert_allclose(fit_pls_vip(x, y, n_components=n_components), _numpy_vip(pls), rtol=1e-6)


def test_vip_ranks_planted_label_channels_first():
    rng = np.random.default_rng(0)
    n, p, informative = 600, 40, [3, 11, 17, 29]
    y = rng.integers(0, 5, n)
    x = rng.standard_normal((n, p))
    x[:, informative] += 2.0 * rng.standard_normal((5, len(informative)))[y]
    vip = fit_pls_vip(x, y)
    assert set(np.argsort(-vip)[: len(informative)]) == set(informative)


def test_pls_vip_criterion_scores_groups_in_channel_order():
    """Through the criterion: the planted channels of one conv get the top VIP among all groups."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    x = torch.randn(2, 1, 6, 6)
    groups = discover_groups(model, build_dependency_graph(model, x))
    assert sorted(g.root_name for g in groups) == ["0", "2"]
    y = torch.randint(0, 3, (300,))
    feats = {"0": torch.randn(300, 8), "2": torch.randn(300, 6)}
    feats["2"][:, 4] += 3.0 * (y == 1).float() - 3.0 * (y == 2).float()

    class Store:
        labels = y

        def pooled(self, request):
            return feats[request.module]

    ctx = ScoringContext(model=model, example_inputs=x, graph=None, generator=torch.Generator(), activations=Store())
    scores = dict(zip([g.root_name for g in groups], get_criterion("pls_vip").score(groups, ctx)))
    assert scores["0"].shape == (8,) and scores["2"].shape == (6,)
    assert int(scores["2"].argmax()) == 4
    assert scores["2"][4] > scores["0"].max()


# ----------------------------------------------------------------------------- PCA + GM
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_pca_width_recovers_planted_rank(rank):
    rng = np.random.default_rng(rank)
    rows = rng.standard_normal((2000, rank)) @ rng.standard_normal((rank, 12))
    cov = torch.from_numpy(np.cov(rows, rowvar=False, bias=True))
    assert pca_width(cov, 0.999) == rank


def test_collected_covariance_of_rank_r_conv_gives_pca_width_r():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(10, 3) @ torch.randn(3, 6)).view(10, 6, 1, 1))  # rank 3
    model = nn.Sequential(conv, nn.ReLU())
    collector = ActivationCollector(model, [ActivationRequest("0", statistic="covariance", rows_per_batch=10_000)])
    collector.attach()
    for _ in range(4):
        collector.begin_batch()
        model(torch.randn(8, 6, 5, 5))
        collector.end_batch()
    cov = collector.store().covariance("0")
    assert pca_width(cov, 0.999) == 3


def test_streamed_covariance_equals_batch_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3))
    collector = ActivationCollector(model, [ActivationRequest("0", statistic="covariance", rows_per_batch=10_000)])
    collector.attach()
    outs = []
    for _ in range(3):
        collector.begin_batch()
        outs.append(model(torch.randn(4, 3, 6, 6)).detach())
        collector.end_batch()
    rows = torch.cat([o.permute(0, 2, 3, 1).reshape(-1, 5) for o in outs]).double().numpy()
    np.testing.assert_allclose(collector.store().covariance("0").numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-6, atol=1e-9)


def _numpy_fpgm(w: np.ndarray) -> np.ndarray:
    return np.array([sum(np.linalg.norm(w[i] - w[j]) for j in range(len(w))) for i in range(len(w))])


def test_fpgm_prunes_duplicated_filters_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    duplicated = [0, 1, 5, 6, 10, 11, 14, 15]
    with torch.no_grad():
        w = model[0].weight
        for a, b in zip(duplicated[::2], duplicated[1::2]):
            w[b] = w[a]
        model[0].bias.zero_()
    x = torch.randn(2, 16, 6, 6)
    groups = discover_groups(model, build_dependency_graph(model, x))
    group = next(g for g in groups if g.root_name == "0")
    ctx = ScoringContext(model=model, example_inputs=x, graph=None, generator=torch.Generator())
    scores = get_criterion("pca_gm").score([group], ctx)[0].numpy()
    reference = _numpy_fpgm(model[0].weight.detach().double().flatten(1).numpy())
    np.testing.assert_allclose(scores, reference / reference.mean(), rtol=1e-10)
    assert set(np.argsort(scores)[: len(duplicated)]) == set(duplicated)


# ----------------------------------------------------------------------------- the collector
def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from obj's attributes (an accounting independent of the collector's)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(k, seen) + _tensor_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("lightning_prune"):
        return _tensor_bytes(vars(obj), seen)
    return 0


def _collect_over(repeat: int, max_samples: int = 256) -> tuple[int, int]:
    dm = DigitsDataModule(batch_size=64, repeat=repeat)
    dm.setup()
    model = SmallResNet(widths=(8, 16), blocks_per_stage=1)
    requests = [ActivationRequest("stem.0", statistic="pooled"), ActivationRequest("stages.1.0.conv1", statistic="covariance")]
    collector = ActivationCollector(model, requests, max_samples=max_samples)
    collector.attach()
    peak = 0
    with torch.no_grad():
        for x, y in dm.train_dataloader():
            collector.begin_batch(y)
            model(x)
            collector.end_batch()
            peak = max(peak, _tensor_bytes(collector))
    store = collector.store()
    assert store.num_samples == max_samples and store.labels.shape == (max_samples,)
    return peak, _tensor_bytes(collector)


def test_collector_memory_does_not_grow_with_the_data():
    peak1, end1 = _collect_over(1)
    peak4, end4 = _collect_over(4)
    assert end4 == end1
    assert peak4 <= peak1 * 1.05
    # bound: 2 * max_samples buffered rows before compaction (+ one batch), plus C^2 statistics, plus
    # the covariance's rows kept until they are folded in (at most _Sums.fold_rows rows of 16 float32)
    from lightning_prune.collection.accumulators import _Sums

    assert peak4 < (3 * 256 + 64) * (8 * 4 + 8 + 4) + 3 * (16 * 16 * 8 + 16 * 8 + 8) + _Sums.fold_rows * 16 * 4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(1, 50))
def test_reservoir_keeps_the_largest_keys_of_everything_seen(chunks, capacity):
    gen = torch.Generator().manual_seed(sum(chunks) + capacity)
    all_keys = torch.rand(sum(chunks), generator=gen)
    kept_ids = torch.empty(0, dtype=torch.long)
    kept_keys = torch.empty(0)
    start = 0
    for size in chunks:
        new_keys, new_ids = all_keys[start : start + size], torch.arange(start, start + size)
        index, kept_keys = reservoir_merge(kept_keys, new_keys, capacity)
        kept_ids = torch.cat([kept_ids, new_ids])[index]
        start += size
    expected = set(torch.argsort(all_keys, descending=True)[:capacity].tolist())
    assert set(kept_ids.tolist()) == expected


def test_collection_makes_no_host_sync(monkeypatch):
    model = SmallResNet(widths=(8, 16), blocks_per_stage=1)
    requests = [ActivationRequest("stem.0", statistic="pooled", pooling="avg"), ActivationRequest("stages.0.0.conv1", statistic="covariance", rows_per_batch=16)]
    collector = ActivationCollector(model, requests, max_samples=8)
    collector.attach()
    batches = [(torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))) for _ in range(5)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation during collection")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, forbidden)
        with torch.no_grad():
            for x, y in batches:  # 30 samples > 2 * 8: compaction runs inside too
                collector.begin_batch(y)
                model(x)
                collector.end_batch()
    assert collector.store().num_samples == 8


# ----------------------------------------------------------------------------- in a fit
def _trainer(callbacks, max_epochs, **kw):
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


class _HookWatcher(L.Callback):
    """Counts forward hooks on the model at every training batch."""

    def __init__(self):
        self.counts: dict[tuple[int, int], int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counts[(trainer.current_epoch, batch_idx)] = sum(len(m._forward_hooks) for m in pl_module.modules())


def test_hooks_only_inside_the_collection_window():
    L.seed_everything(0)
    watcher = _HookWatcher()
    cb = StructuredPruningCallback("pls_vip", target_flops_reduction=0.3, epochs=[1], collect_batches=3, verbose=False)
    model = ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1))
    _trainer([cb, watcher], 3, limit_train_batches=8, limit_val_batches=1).fit(model, DigitsDataModule())
    for (epoch, batch), hooks in watcher.counts.items():
        assert (hooks > 0) == (epoch == 1 and batch >= 5), (epoch, batch, hooks)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert cb._collector is None


def test_prune_on_train_start_runs_a_dedicated_collection_pass():
    L.seed_everything(0)
    model = ImageClassifier(SmallResNet(widths=(16, 32), blocks_per_stage=1))
    cb = StructuredPruningCallback("pls_vip", target_flops_reduction=0.4, prune_on_train_start=True, collect_batches=4, verbose=False)
    _trainer([cb], 1, limit_train_batches=2, limit_val_batches=1).fit(model, DigitsDataModule())
    assert [r.epoch for r in cb.history] == [-1]
    assert abs(cb.history[0].flops_reduction - 0.4) <= 0.02
    assert all(m.training for m in model.modules())


def test_missing_labels_are_reported_before_training():
    data = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8)), batch_size=16)
    ran = []

    class Unlabelled(ImageClassifier):
        def training_step(self, batch, batch_idx):
            ran.append(batch_idx)
            return self(batch[0]).sum()

    cb = StructuredPruningCallback("pls_vip", target_flops_reduction=0.3, epochs=[0])
    with pytest.raises(ValueError, match="label_fn"):
        _trainer([cb], 1).fit(Unlabelled(SmallResNet(widths=(8, 16), blocks_per_stage=1)), data)
    assert ran == []


def test_pls_paper_preset_removes_ten_percent_of_the_remaining_channels_per_step():
    from lightning_prune.presets import pls_vip_paper

    L.seed_everything(0)
    model = ImageClassifier(SmallResNet(widths=(16, 32), blocks_per_stage=1))
    cb = StructuredPruningCallback(**pls_vip_paper(epochs=[0, 1, 2]), verbose=False)
    _trainer([cb], 3, limit_train_batches=4, limit_val_batches=1).fit(model, DigitsDataModule())
    # cumulative fraction of channels removed after step k: 1 - 0.9^k (the paper's schedule)
    assert [round(r.target, 6) for r in cb.history] == [round(1 - 0.9**k, 6) for k in (1, 2, 3)]
    # one representative layer per set of coupled channels of this architecture (identity shortcut in
    # stage 0 couples the stem with conv2; the projection shortcut of stage 1 couples conv2 with it)
    representatives = ["net.stem.0", "net.stages.0.0.conv1", "net.stages.1.0.conv1", "net.stages.1.0.conv2"]
    dense = {"net.stem.0": 16, "net.stages.0.0.conv1": 16, "net.stages.1.0.conv1": 32, "net.stages.1.0.conv2": 32}
    for k, record in enumerate(cb.history, start=1):
        assert record.widths["net.stem.0"] == record.widths["net.stages.0.0.conv2"]
        assert record.widths["net.stages.1.0.conv2"] == record.widths["net.stages.1.0.shortcut.0"]
        removed = 1 - sum(record.widths[n] for n in representatives) / sum(dense.values())
        assert abs(removed - (1 - 0.9**k)) < 0.04, (k, removed)


def test_input_site_requests_see_what_the_consumer_reads():
    """A request on a consumer's input gets the activation after BN, ReLU and pooling."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 1))
    model.eval()
    request = ActivationRequest("4", site="input", statistic="pooled", pooling="avg")
    collector = ActivationCollector(model, [request], max_samples=100)
    collector.attach()
    x = torch.randn(5, 2, 10, 10)
    collector.begin_batch()
    with torch.no_grad():
        model(x)
    collector.end_batch()
    with torch.no_grad():
        consumed = model[:4](x)  # what conv "4" reads
    got = collector.store().pooled(request)
    expected = consumed.mean(dim=(2, 3))
    assert got.shape == (5, 4)
    # the reservoir keeps the samples in another order: compare each channel's sorted values
    assert torch.allclose(torch.sort(got, dim=0).values, torch.sort(expected, dim=0).values, atol=1e-6)
    assert (got >= 0).all()  # after the ReLU


def test_forward_passes_outside_a_training_batch_are_not_recorded():
    """Validation inside the window and the pruner's own passes must not pollute the statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    cov_request = ActivationRequest("0", statistic="covariance", rows_per_batch=10_000)
    collector = ActivationCollector(model, [cov_request, ActivationRequest("0", statistic="pooled")], max_samples=50)
    collector.attach()
    x = torch.randn(4, 2, 3, 3)
    collector.begin_batch()
    model(x)
    collector.end_batch()
    model(100 + torch.randn(7, 2, 3, 3))  # e.g. a validation batch: far away, must be ignored
    store = collector.store()
    rows = model(x).detach().permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    np.testing.assert_allclose(store.covariance(cov_request).numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-6, atol=1e-9)
    assert store.num_samples == 4
