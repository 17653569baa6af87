"""Activation criteria on token sequences ``(batch, tokens, features)``: pooling over the tokens (mean,
max, the class token), the interpolative decomposition on token rows with the least-squares
correction of the feed-forward output projection, and a digits-sized ViT pruned mid-fit.

References are independent of the library: NumPy pooling and covariances of the same arrays, a
planted label signal, a planted exactly dependent feature, a NumPy ridge solution on the same token
rows, and ``torch.utils.flop_counter.FlopCounterMode`` for the MACs.
"""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import StructuredPruningCallback, count_cost
from lightning_prune.collection import ActivationCollector, ActivationRequest, pool_channels, sample_rows
from lightning_prune.criteria import ScoringContext, get_criterion
from lightning_prune.data import DigitsDataModule
from lightning_prune.engine import ChannelPruner, Target, build_dependency_graph, discover_groups
from lightning_prune.models import ImageClassifier
from lightning_prune.models.vit import VisionTransformer

POOLINGS = {"avg": lambda a: a.mean(1), "max": lambda a: a.max(1), "cls": lambda a: a[:, 0]}


# ================================================================================ functional cores
@pytest.mark.parametrize("token_pooling", list(POOLINGS))
def test_tokens_are_pooled_like_numpy(token_pooling):
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((5, 7, 3)).astype(np.float32)
    expected = POOLINGS[token_pooling](tokens)
    for channel_dim in (2, -1):
        pooled = pool_channels(torch.from_numpy(tokens), "max", channel_dim, token_pooling)
        np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-5, atol=1e-7)
        rows = sample_rows(torch.from_numpy(tokens), channel_dim, 1000, token_pooling=token_pooling)
        np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-5, atol=1e-7)  # one row per sample


def test_without_token_pooling_tokens_are_positions():
    """None: pooled statistics pool the tokens with ``pooling``; rows are every token of every sample."""
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((4, 6, 3)).astype(np.float32)
    x = torch.from_numpy(tokens)
    np.testing.assert_allclose(pool_channels(x, "avg", -1).numpy(), tokens.mean(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pool_channels(x, "max", -1).numpy(), tokens.max(1), rtol=1e-6)
    np.testing.assert_array_equal(sample_rows(x, -1, 1000).numpy(), tokens.reshape(-1, 3))


def test_token_pooling_leaves_feature_maps_and_flat_features_alone():
    """A conv map (channels on dim 1) and a 2-D activation have no token axis: bit-identical results."""
    torch.manual_seed(0)
    maps, flat = torch.randn(4, 3, 5, 5), torch.randn(4, 6)
    for token_pooling in POOLINGS:
        assert torch.equal(pool_channels(maps, "max", 1, token_pooling), pool_channels(maps, "max", 1))
        assert torch.equal(pool_channels(flat, "avg", -1, token_pooling), flat)
        assert torch.equal(sample_rows(maps, 1, 1000, token_pooling=token_pooling), sample_rows(maps, 1, 1000))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ActivationRequest("fc", token_pooling="mean"), r"token_pooling must be 'avg'.*'max'.*'cls'.*got 'mean'"),
        (lambda: get_criterion("pls_vip", token_pooling="first"), r"token_pooling must be .*same as pooling.*'first'"),
        (lambda: get_criterion("di", token_pooling=0), r"token_pooling must be .*got 0"),
        (lambda: get_criterion("pca_gm", token_pooling="all"), r"token_pooling .*every token is a row.*'all'"),
        (lambda: StructuredPruningCallback("di", target_flops_reduction=0.3, criterion_kwargs={"token_pooling": "mean"}),
         r"token_pooling must be 'avg' \(mean over the tokens\).*got 'mean'"),
    ],
)
def test_a_bad_token_pooling_is_refused_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ================================================================================ collection through hooks
class TokenNet(nn.Module):
    """A feed-forward block on ``(batch, tokens, features)`` and a head on the class token (token 0)."""

    def __init__(self, dim: int = 4, hidden: int = 8, classes: int = 3, act: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act if act is not None else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.fc2(self.act(self.fc1(x))))[:, 0])


def _collect(model, requests, batches, labels=None, num_classes=None):
    collector = ActivationCollector(model, requests, num_classes=num_classes)
    collector.attach()
    for i, x in enumerate(batches):
        collector.begin_batch(None if labels is None else labels[i])
        with torch.no_grad():
            model(x)
        collector.end_batch()
    collector.detach()
    return collector.store()


def test_collector_pools_a_linear_layers_token_activation():
    """Hooked ``fc1`` output ``(batch, tokens, hidden)``: pooled, class moments and covariance per pooling,
    against NumPy on the same activation (captured by a hook of the test's own)."""
    torch.manual_seed(0)
    model = TokenNet().eval()
    batches = [torch.randn(16, 5, 4) for _ in range(3)]
    labels = [torch.randint(0, 3, (16,)) for _ in range(3)]
    seen: list[np.ndarray] = []
    handle = model.fc1.register_forward_hook(lambda m, i, o: seen.append(o.detach().double().numpy()))
    requests = [ActivationRequest("fc1", token_pooling=p) for p in POOLINGS]
    requests += [ActivationRequest("fc1", statistic="class_moments", token_pooling="cls", num_classes=3)]
    requests += [ActivationRequest("fc1", statistic="covariance", rows_per_batch=1000, token_pooling=p) for p in (None, "cls")]
    store = _collect(model, requests, batches, labels)
    handle.remove()
    acts, y = np.concatenate(seen), torch.cat(labels).numpy()
    for request in requests[:3]:  # the reservoir holds every sample (48 < max_samples), in its own order
        got = np.sort(store.pooled(request).double().numpy(), axis=0)
        np.testing.assert_allclose(got, np.sort(POOLINGS[request.token_pooling](acts), axis=0), rtol=1e-5, atol=1e-6)
    moments, cls = store.class_moments(requests[3]), acts[:, 0]
    np.testing.assert_allclose(moments.class_sums.numpy(), np.eye(3)[y].T @ cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments.scatter.numpy(), cls.T @ cls, rtol=1e-5, atol=1e-6)
    every_token = acts.reshape(-1, 8)
    for request, rows in zip(requests[4:], (every_token, cls)):
        np.testing.assert_allclose(store.covariance(request).numpy(), np.cov(rows, rowvar=False, bias=True), rtol=1e-5, atol=1e-7)
        assert store.rows_seen[request] == rows.shape[0]


def _planted_tokens(n: int = 400, tokens: int = 9, features: int = 6, seed: int = 0):
    """Feature 2 carries the label on the class token only (other tokens: loud noise); feature 4 carries
    it weakly on every token, so that the mean over the tokens finds feature 4 and the class token 2."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, tokens, features))
    x[:, 1:, 2] *= 4.0
    x[:, 0, 2] = 2.0 * y + 0.3 * rng.standard_normal(n)
    x[:, :, 4] += 0.5 * y[:, None]
    return torch.from_numpy(x).float(), torch.from_numpy(y)


@pytest.mark.parametrize("criterion", ["pls_vip", "discriminant_information"])
def test_the_class_token_signal_ranks_first_with_cls_pooling(criterion):
    """Through the registry (criterion kwargs), the collector's hooks and the real channel groups: with
    ``token_pooling="cls"`` the feature whose class-token value carries the label ranks first; pooled by
    the mean over the tokens, the feature that carries it weakly on every token does."""
    x, y = _planted_tokens()
    model = TokenNet(dim=6, hidden=6, act=nn.Identity()).eval()
    with torch.no_grad():  # fc1 passes the tokens through: its output is the planted activation
        model.fc1.weight.copy_(torch.eye(6))
        model.fc1.bias.zero_()
    groups = [g for g in discover_groups(model, build_dependency_graph(model, x[:2])) if g.root_name == "fc1"]
    ranking = {}
    for token_pooling in ("cls", "avg"):
        extra = {"num_classes": 3} if criterion == "discriminant_information" else {}
        crit = get_criterion(criterion, token_pooling=token_pooling, **extra)
        store = _collect(model, crit.activation_requests(groups), x.split(100), list(y.split(100)), num_classes=3)
        context = ScoringContext(model=model, example_inputs=x[:2], graph=None, generator=torch.Generator(), activations=store)
        (score,) = crit.score(groups, context)
        ranking[token_pooling] = int(score.argmax())
    assert ranking == {"cls": 2, "avg": 4}


# ================================================================================ interpolative decomposition
def _dependent_token_mlp() -> TokenNet:
    """Positive inputs and fc1 weights keep every ReLU active; hidden unit 5 = unit 1 + unit 3 exactly,
    the other units independent (12 input features and a bias for 8 units)."""
    torch.manual_seed(0)
    model = TokenNet(dim=12, hidden=8, act=nn.ReLU()).eval()
    with torch.no_grad():
        model.fc1.weight.uniform_(0.1, 1.0)
        model.fc1.bias.uniform_(0.0, 0.5)
        model.fc1.weight[5] = model.fc1.weight[1] + model.fc1.weight[3]
        model.fc1.bias[5] = model.fc1.bias[1] + model.fc1.bias[3]
    return model


def test_id_pivots_on_token_rows_drop_a_planted_dependent_feature_without_error():
    """fc2 reads every token: ID's Gram is over token rows; the exactly dependent hidden unit is
    rebuilt from the others by fc2's correction, so the output is the dense output."""
    model = _dependent_token_mlp()
    plain = copy.deepcopy(model)
    x = torch.rand(32, 6, 12)
    criterion = get_criterion("id")
    groups = discover_groups(model, build_dependency_graph(model, x[:2]))
    store = _collect(model, criterion.activation_requests(groups), [x])
    (request,) = [r for r in criterion.activation_requests(groups) if r.module == "fc2"]
    assert store.gram(request).count == 32 * 6  # one row per token of every sample
    with torch.no_grad():
        reference = model(x)
        hidden = model.act(model.fc1(x))
    dense_rows = hidden.reshape(-1, 8).numpy()
    pruner = ChannelPruner(criterion, ignored_layers=["fc2"])
    result = pruner.step(model, x[:2], Target("channels", 1 / 8), context={"activations": store})
    assert model.fc1.out_features == model.fc2.in_features == 7
    assert result.corrections == {"fc1": "interpolation absorbed by 1 consumer(s) (GCV ridge 1e-06)"}  # exact: the floor
    kept_rows = model.act(model.fc1(x)).detach().reshape(-1, 7).numpy()
    dropped = [c for c in range(8) if not any(np.allclose(dense_rows[:, c], kept_rows[:, k]) for k in range(7))]
    assert len(dropped) == 1 and dropped[0] in (1, 3, 5)
    with torch.no_grad():
        assert float((model(x) - reference).norm() / reference.norm()) < 1e-4
    # the same cut without the correction loses what the unit carried
    ChannelPruner(criterion, ignored_layers=["fc2"], correction="none").step(
        plain, x[:2], Target("channels", 1 / 8), context={"activations": store}
    )
    with torch.no_grad():
        assert float((plain(x) - reference).norm() / reference.norm()) > 1e-2


def test_ffn_output_projection_correction_matches_numpy_ridge_on_token_rows():
    """Random weights (no exact dependency): after removing 3 hidden units, fc2's weight is
    ``W_S + W_R T_R^T`` with ``T_R = (Z_S^T Z_S + lambda I)^-1 Z_S^T Z_R`` over every token row ``Z``."""
    torch.manual_seed(1)
    model = TokenNet(dim=4, hidden=8).eval()
    dense = copy.deepcopy(model)
    batches = [torch.randn(16, 5, 4) for _ in range(2)]
    ridge = 1e-3
    criterion = get_criterion("id", ridge=ridge)
    groups = discover_groups(model, build_dependency_graph(model, batches[0][:2]))
    store = _collect(model, criterion.activation_requests(groups), batches)
    pruner = ChannelPruner(criterion, ignored_layers=["fc2"])
    pruner.step(model, batches[0][:2], Target("channels", 3 / 8), context={"activations": store})
    # which hidden units stayed, matched by their fc1 rows; Z: every token row fc2 read, in NumPy
    dense_rows = dense.fc1.weight.detach().numpy()
    kept = [int(np.argmin(np.abs(dense_rows - w).sum(1))) for w in model.fc1.weight.detach().numpy()]
    removed = sorted(set(range(8)) - set(kept))
    assert len(set(kept)) == 5
    with torch.no_grad():
        z = torch.cat([dense.act(dense.fc1(b)) for b in batches]).reshape(-1, 8).double().numpy()
    g = z.T @ z
    lam = ridge * np.trace(g) / 8
    t_r = np.linalg.solve(z[:, kept].T @ z[:, kept] + lam * np.eye(5), z[:, kept].T @ z[:, removed])
    w = dense.fc2.weight.detach().double().numpy()
    expected = w[:, kept] + w[:, removed] @ t_r.T
    np.testing.assert_allclose(model.fc2.weight.detach().double().numpy(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.fc2.bias, dense.fc2.bias)


# ================================================================================ dict batches (as HF models use)
class _DictTokens(Dataset):
    def __init__(self, n: int = 96) -> None:
        x, y = _planted_tokens(n, tokens=5, features=6, seed=3)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs_embeds": self.x[i], "labels": self.y[i]}


class _DictModule(L.LightningModule):
    """A model called with keyword inputs and labels in a dict batch, as Hugging Face models are."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TokenNet(dim=6, hidden=16)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.net(inputs_embeds)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["inputs_embeds"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(("criterion", "kwargs"), [("pls_vip", {"token_pooling": "cls"}), ("di", {"token_pooling": "max"}),
                                                   ("pca_gm", {"token_pooling": "avg"}), ("id", None)])  # fmt: skip
def test_token_criteria_prune_a_dict_batch_model_in_a_fit(criterion, kwargs):
    L.seed_everything(0)
    model = _DictModule()
    x = {"inputs_embeds": torch.randn(2, 5, 6)}
    cb = StructuredPruningCallback(
        criterion, target_flops_reduction=0.3, epochs=[0], verbose=False, criterion_kwargs=kwargs,
        input_fn=lambda batch: {"inputs_embeds": batch["inputs_embeds"]}, ignored_layers=["net.fc2"],
    )
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, DataLoader(_DictTokens(), batch_size=16))
    assert [r.epoch for r in cb.history] == [0]
    assert model.net.fc1.out_features == model.net.fc2.in_features < 16
    dense = 2 * 5 * 6 * 16 + 6 * 3  # fc1 and fc2 over 5 tokens, the head once
    assert abs(1 - count_cost(model, x).macs / dense - 0.3) <= 0.02


# ================================================================================ digits ViT fit
def _linear_macs(module: nn.Module, x: torch.Tensor) -> float:
    """MACs per sample of the matrix products of linear layers and the patch convolution, counted by
    torch's own FlopCounterMode (``aten.mm``/``aten.addmm``/``aten.convolution``; the attention
    products, ``bmm``/SDPA, are left out as in the library's definition). Run with autograd on:
    ``nn.MultiheadAttention``'s fused inference kernel (eval mode without grad) is invisible to it."""
    with FlopCounterMode(display=False) as counter:
        module(x)
    ops = counter.get_flop_counts()["Global"]
    flops = sum(v for op, v in ops.items() if str(op).split(".")[1] in ("mm", "addmm", "convolution"))
    return flops / 2 / x.shape[0]


def test_vit_model_cost_matches_an_independent_count():
    vit = VisionTransformer().eval()
    x = torch.rand(3, 1, 8, 8)
    assert vit(x).shape == (3, 10)
    # by hand: patches 16 x 32 x 2 x 2; per block over 17 tokens: q/k/v 3 x 32 x 32, out 32 x 32,
    # fc1 and fc2 32 x 128 each; the head 32 x 10 once
    by_hand = 16 * 32 * 4 + 2 * 17 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 128) + 32 * 10
    assert count_cost(vit, x).macs == _linear_macs(vit, x) == by_hand == 420160
    with pytest.raises(ValueError, match=r"heads \(5\) must divide dim \(32\)"):
        VisionTransformer(heads=5)


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["pls_vip", "id"])
def test_digits_vit_pruned_mid_fit_to_40_percent_fewer_macs_trains_to_a_sane_accuracy(criterion):
    """16 epochs of AdamW; at the end of epoch 7 the MLP hidden widths are cut so that the model has
    40% fewer MACs (counted independently), then training goes on. Measured: see the CHANGELOG."""
    L.seed_everything(0)
    vit = VisionTransformer()
    model = ImageClassifier(vit, optimizer="adamw", lr=3e-3, weight_decay=0.05, max_epochs=16)
    x = torch.rand(4, 1, 8, 8)
    dense = _linear_macs(vit, x)
    kwargs = {"token_pooling": "cls"} if criterion == "pls_vip" else None
    cb = StructuredPruningCallback(criterion, target_flops_reduction=0.4, epochs=[7], verbose=False,
                                   scope="mlp", criterion_kwargs=kwargs)  # fmt: skip
    trainer = L.Trainer(max_epochs=16, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    dm = DigitsDataModule()
    trainer.fit(model, dm)
    widths = [block.mlp.fc1.out_features for block in vit.blocks]
    assert [r.epoch for r in cb.history] == [7] and all(w < 128 for w in widths)
    assert vit.patch_embed.out_channels == 32 and all((b.attn.embed_dim, b.attn.num_heads) == (32, 4) for b in vit.blocks)
    assert abs(1 - _linear_macs(vit, x) / dense - 0.4) <= 0.02
    accuracy = trainer.test(model, dm, verbose=False)[0]["test_acc"]
    print(f"{criterion}: widths {widths}, MACs -{1 - _linear_macs(vit, x) / dense:.1%}, test accuracy {accuracy:.3f}")
    assert accuracy > 0.85


# ================================================================================ command line
def test_token_pooling_reaches_the_criterion_from_the_command_line():
    from pathlib import Path

    from lightning_prune.cli import main

    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "cifar10_resnet56_pls_vip_5steps.yaml"
    args = ["--config", str(config), "--trainer.logger=false"]
    cli = main([*args, '--pruning.criterion_kwargs={"token_pooling": "cls"}'], run=False, return_cli=True)
    assert cli is not None and cli.pruning is not None
    assert (cli.pruning.criterion.token_pooling, cli.pruning.criterion.pooling) == ("cls", "max")
    with pytest.raises(ValueError, match=r"token_pooling must be .*got 'first'"):
        main([*args, '--pruning.criterion_kwargs={"token_pooling": "first"}'], run=False)
