"""Architectures beyond plain conv nets: what torch-pruning cannot couple is refused by name, the
rest is pruned correctly; inputs and outputs users have (dict batches, several inputs, dict
outputs), Conv1d/Conv3d and MLP models inside a Lightning fit.

References are independent of the library: the pruned model is compared with the dense model whose
removed channels are disconnected by zeroing their consumers' input weights, and costs with a
hand count of the layers.
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_prune import StructuredPruningCallback, count_cost
from lightning_prune.criteria import get_criterion
from lightning_prune.engine import ChannelPruner, PruningError, Target
from lightning_prune.engine.probe import UnprunableGroupWarning


# ================================================================================ test models
class ShuffleBlock(nn.Module):
    """ShuffleNetV2's stride-1 unit: split, transform one half, concatenate, shuffle channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels),
            nn.Conv2d(channels, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat([x1, self.branch(x2)], dim=1)
        b, c, h, w = out.shape
        return out.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(ShuffleBlock(16), ShuffleBlock(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, class token concatenated on the sequence axis, one pre-norm MLP block.

    With ``fixed_width=True`` the forward reshapes with a stored width (``self.dim``), as
    torchvision's ViT does with ``hidden_dim``: the token width can then not be cut.
    """

    def __init__(self, dim: int = 16, hidden: int = 48, fixed_width: bool = False) -> None:
        super().__init__()
        self.dim, self.fixed_width = dim, fixed_width
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x)
        flat = patches.reshape(x.shape[0], self.dim, -1) if self.fixed_width else patches.flatten(2)
        tokens = flat.transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.mlp(tokens)
        return self.head(tokens[:, 0])


class AttentionViT(nn.Module):
    """Patch embedding, class token, one pre-norm ``nn.MultiheadAttention`` block and an MLP block;
    the token width is not hard-coded, so it can be cut (with every head keeping the same width)."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        h = self.norm(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(tokens)
        return self.head(tokens[:, 0])


class LayerScaleNet(nn.Module):
    """A residual block scaled by a free ``(C, 1, 1)`` parameter, as in ConvNeXt."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1))
        self.layer_scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.layer_scale * self.block(x)
        return self.fc(x.mean((2, 3)))


def _images(size: int = 16, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _step_with_plan(model: nn.Module, x: torch.Tensor, target: float):
    """Run one l1 step; return (result, {root layer name: removed root channels})."""
    pruner = ChannelPruner(get_criterion("l1"))
    groups = pruner.analyse(model, x).groups
    captured = {}

    def hook(plan):
        captured["plan"] = plan
        return plan

    result = pruner.step(model, x, Target("flops", target), plan_hook=hook)
    removed = {groups[g].root_name: sorted(c) for g, c in captured["plan"].removed.items() if c}
    return result, removed


# ============================================================== refusals and what is pruned
def test_channel_shuffle_is_refused_by_name_and_the_branches_are_pruned_exactly():
    torch.manual_seed(0)
    model = _randomize_bn(ShuffleNetTiny())
    dense = copy.deepcopy(model)
    x = _images()
    with pytest.warns(UnprunableGroupWarning) as record:
        analysis = ChannelPruner(get_criterion("l1")).analyse(model, x)
    message = str(record[0].message)
    # The channels that reach the shuffle's view are named, with the view that stops them.
    for layer in ("blocks.0.branch.5", "blocks.1.branch.5"):
        assert f"'{layer}'" in message and layer in analysis.refused
    assert "stem.0" in message  # coupled to block 0's output by the split/concatenation
    assert "(4, 16, 16, 16) -> (4, 2, 8, 16, 16)" in message and "ignored_layers" in message
    # Only each branch's inner width (1x1 conv -> depthwise -> 1x1 conv) is left to prune.
    inner = {name for g in analysis.groups for name in g.module_names}
    assert inner == {f"blocks.{b}.branch.{i}" for b in (0, 1) for i in (0, 1, 3, 4, 5)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprunableGroupWarning)
        result, removed = _step_with_plan(model, x, 0.3)
    assert abs(1 - result.after.macs / result.before.macs - 0.3) <= 0.02
    assert model.stem[0].out_channels == 16 and model.blocks[0].branch[5].out_channels == 8
    # Reference: the dense model with the removed hidden channels cut off at their consumer.
    with torch.no_grad():
        for b, block in enumerate(dense.blocks):
            channels = removed.get(f"blocks.{b}.branch.0", removed.get(f"blocks.{b}.branch.3", []))
            block.branch[5].weight[:, channels] = 0
        torch.testing.assert_close(model.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-5)


def test_token_width_is_pruned_with_the_class_token_when_the_forward_allows_it():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = _images()
    result, removed = _step_with_plan(model, x, 0.3)
    assert len(removed) == 2 and "mlp.1" in removed  # the token width group is rooted at patch or mlp.3
    width = model.patch.out_channels
    assert width < 16 and model.cls.shape == (1, 1, width) and model.mlp[0].normalized_shape == (width,)
    assert model.mlp[3].out_features == model.head.in_features == width
    assert abs(1 - result.after.macs / result.before.macs - 0.3) <= 0.02


def test_a_width_hard_coded_in_forward_is_refused_by_name_and_the_mlp_is_pruned_exactly():
    """The trial cut finds what the graph cannot see: ``reshape(n, self.dim, -1)`` fails once the
    token width changes, so that group is refused with the error; the MLP's hidden width is cut."""
    torch.manual_seed(0)
    model = TinyViT(fixed_width=True).eval()
    dense = copy.deepcopy(model)
    x = _images()
    with pytest.warns(UnprunableGroupWarning, match=r"'mlp.3': RuntimeError: .*; coupled layers: .*patch"):
        result, removed = _step_with_plan(model, x, 0.3)
    assert model.patch.out_channels == 16 and model.cls.shape == (1, 1, 16)
    assert set(removed) == {"mlp.1"} and model.mlp[1].out_features < 48
    assert abs(1 - result.after.macs / result.before.macs - 0.3) <= 0.02
    with torch.no_grad():  # reference: the dense model with the removed hidden units cut off
        dense.mlp[3].weight[:, removed["mlp.1"]] = 0
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)


def test_trial_cuts_leave_model_and_graph_exactly_as_they_were():
    """The probe cuts every group once and puts everything back, unwrapped parameters included
    (a layer scale is a graph node of its own); the real step afterwards cuts it consistently."""
    torch.manual_seed(0)
    model = LayerScaleNet().eval()
    x = _images()
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    pruner = ChannelPruner(get_criterion("l1"))
    analysis = pruner.analyse(model, x)
    assert analysis.graph.pruning_history() == [] and not analysis.refused
    for name, param in model.named_parameters():
        assert param is params[name][0] and torch.equal(param, params[name][1])
    reference = model(x)
    stream = next(g for g in analysis.groups if g.root_name == "stem")
    assert any(s.name == "layer_scale" for s in stream.slices)
    pruner.step(model, x, Target("flops", 0.4))
    assert model.layer_scale.shape[0] == model.stem.out_channels == model.block[2].out_channels
    assert model(x).shape == reference.shape


def test_no_prunable_group_left_names_every_refused_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(0), nn.Unflatten(0, (4, -1)), nn.Linear(8 * 14 * 14 * 4 // 4, 10))
    x = _images(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprunableGroupWarning)
        with pytest.raises(PruningError, match=r"no prunable channel group left; '0': .*cannot map \(ViewBackward0 \(4, 8, 14, 14\) -> \(6272,\)\)"):
            ChannelPruner(get_criterion("l1")).step(model, x, Target("flops", 0.3))


# ======================================================= user-facing inputs and outputs, in fit
class _DictData(Dataset):
    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (n,), generator=gen)
        self.images = torch.randn(n, 3, 12, 12, generator=gen) + self.labels.view(-1, 1, 1, 1) * 0.5
        self.meta = torch.randn(n, 5, generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "meta": self.meta[i], "target": self.labels[i]}


class _TwoInputsDictOutput(L.LightningModule):
    """forward(image, meta) -> {"logits", "embedding"}; batches are dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())  # fmt: skip
        self.meta = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.fuse = nn.Linear(64 + 16, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.cat([self.conv(image).mean((2, 3)), self.meta(meta)], dim=1)
        embedding = torch.relu(self.fuse(features))
        return {"logits": self.head(embedding), "embedding": embedding}

    def training_step(self, batch, _):
        return F.cross_entropy(self(batch["image"], batch["meta"])["logits"], batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(model: L.LightningModule, loader: DataLoader, callback: StructuredPruningCallback, epochs: int = 2) -> None:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, loader)


@pytest.mark.parametrize("criterion", ["l1", "di", "filter_ensembles"])
def test_dict_batches_two_inputs_and_dict_outputs(criterion):
    L.seed_everything(0)
    model = _TwoInputsDictOutput()
    loader = DataLoader(_DictData(), batch_size=16)
    batch = next(iter(loader))
    inputs = (batch["image"][:2], batch["meta"][:2])
    dense = count_cost(model, inputs)
    shapes = {k: v.shape for k, v in model(*inputs).items()}
    kwargs = {"max_evaluations": 16, "num_batches": 1, "progress": False} if criterion == "filter_ensembles" else None
    callback = StructuredPruningCallback(
        criterion,
        target_flops_reduction=0.4,
        epochs=[0],
        input_fn=lambda b: (b["image"], b["meta"]),
        output_transform=lambda out: out["logits"],
        criterion_kwargs=kwargs,
        verbose=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnprunableGroupWarning)  # the embedding is an output, not a refusal
        _fit(model, loader, callback)
    assert len(callback.history) == 1
    assert abs(1 - count_cost(model, inputs).macs / dense.macs - 0.4) <= 0.02
    assert {k: v.shape for k, v in model(*inputs).items()} == shapes  # both outputs keep their width
    assert model.head.in_features == model.fuse.out_features == model.head.in_features  # consistent
    assert model.fuse.out_features == 24  # the embedding is a model output: never pruned


def test_a_label_key_the_default_cannot_find_is_refused_before_training():
    class _Renamed(_DictData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {"image": item["image"], "meta": item["meta"], "cls": item["target"]}

    callback = StructuredPruningCallback("di", target_flops_reduction=0.3, input_fn=lambda b: (b["image"], b["meta"]),
                                         output_transform=lambda out: out["logits"], verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match="label_fn"):
        _fit(_TwoInputsDictOutput(), DataLoader(_Renamed(), batch_size=16), callback)


class _Generic(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


# Widths such that one channel is worth about 3% of the MACs: the allocation's error is at most half
# the cost of one removal, so the 2-point tolerance holds (with 16 channels one channel is 6%).
def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Conv1d(32, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 3))  # fmt: skip


def _conv3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
                         nn.Conv3d(32, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 3))  # fmt: skip


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))


_SHAPES = {"conv1d": (2, 40), "conv3d": (1, 6, 6, 6), "mlp": (12,)}
_NETS = {"conv1d": _conv1d, "conv3d": _conv3d, "mlp": _mlp}


@pytest.mark.parametrize("criterion", ["l1", "pca_gm", "id"])
@pytest.mark.parametrize("kind", list(_NETS))
def test_conv1d_conv3d_and_mlp_models(kind, criterion):
    L.seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=gen)
    x = torch.randn(96, *_SHAPES[kind], generator=gen) + y.view(-1, *[1] * len(_SHAPES[kind])).float()
    model = _Generic(_NETS[kind]())
    dense = count_cost(model, x[:2])
    callback = StructuredPruningCallback(criterion, target_flops_reduction=0.4, epochs=[0], verbose=False)
    _fit(model, DataLoader(TensorDataset(x, y), batch_size=16), callback)
    assert abs(1 - count_cost(model, x[:2]).macs / dense.macs - 0.4) <= 0.02
    assert model(x[:5]).shape == (5, 3)
    # Independent count: MACs of the pruned layers from their shapes alone.
    layers = [m for m in model.net if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.Linear))]
    positions = {"conv1d": 40, "conv3d": 6**3, "mlp": 1}[kind]
    hand = sum(m.weight.numel() * (1 if isinstance(m, nn.Linear) else positions) for m in layers)
    assert count_cost(model, x[:2]).macs == hand


# ================================================================================ attention MACs
class _CrossAttention(nn.Module):
    def __init__(self, kdim: int | None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, q, kv):
        return self.head(self.attn(q, kv, kv, need_weights=False)[0])


@pytest.mark.parametrize("kdim", [None, 8], ids=["packed", "separate"])
def test_attention_projections_are_counted_over_their_own_tokens(kdim):
    """Hand count: q and the output projection over the 5 query tokens, k and v over the 7 key tokens."""
    model = _CrossAttention(kdim)
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 7, kdim or 16))
    e, d = 16, kdim or 16
    expected = 5 * e * e + 7 * d * e + 7 * d * e + 5 * e * e + 5 * 16 * 3
    assert count_cost(model, inputs).macs == expected


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_attention_token_width_is_cut_by_whole_positions_of_every_head(allocation):
    """nn.MultiheadAttention's embed width is the token width: it is pruned one position of every
    head at a time (head_dim shrinks, num_heads stays), and the recorded surgery replays exactly."""
    from lightning_prune.checkpoint import replay_surgery

    torch.manual_seed(0)
    model = AttentionViT().eval()
    fresh = copy.deepcopy(model)
    x = _images(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnprunableGroupWarning)  # nothing is refused
        # scope="all": a transformer's default scope keeps the token width (mlp + heads)
        pruner = ChannelPruner(get_criterion("l1"), allocation=allocation, scope="all")
        result = pruner.step(model, x[:2], Target("flops", 0.3))
    e, attn = model.patch.out_channels, model.attn
    assert e < 64 and e % 4 == 0  # whole positions: one channel of every head
    assert attn.num_heads == 4 and attn.embed_dim == e and attn.head_dim * 4 == e
    assert attn.in_proj_weight.shape == (3 * e, e) and attn.out_proj.weight.shape == (e, e)
    assert model.cls.shape == (1, 1, e) and model.norm.normalized_shape == (e,) and model.head.in_features == e
    # the cost model and the hand count agree; one position (4 channels of the token width) is the unit
    tokens, hidden = 1 + 16, model.mlp[1].out_features
    hand = 16 * e * 3 * 16 + tokens * (3 * e * e + e * e + 2 * e * hidden) + e * 10
    assert result.after.macs == count_cost(model, x[:2]).macs == hand
    assert abs(1 - result.after.macs / result.before.macs - 0.3) <= 0.05
    model.train()
    model(x).sum().backward()  # trains
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    replay_surgery(fresh, x[:2], [result.surgery])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
