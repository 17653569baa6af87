"""Attention-head pruning and ``scope`` on tiny transformers built from configs (no weights downloaded).

References are independent of the library: head counts are read from the weight shapes, MACs are
counted by ``torch.utils.flop_counter.FlopCounterMode`` (the matrix products of linear layers and
the convolutions: what the library's MACs count; the attention products are left out on both
sides), and a removed head is compared with the dense model whose head was zeroed by hand.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import ChannelPruner, Target, get_criterion
from lightning_prune.checkpoint import replay_surgery
from lightning_prune.engine.attention import HeadPrunedMultiheadAttention, cut_heads, find_attention
from lightning_prune.export import export_pruned

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from torchvision.models import VisionTransformer  # noqa: E402


class Logits(nn.Module):
    """Hugging Face model -> plain logits tensor (for exports and the FLOP counter)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32, num_labels=3,
    )
    return Logits(transformers.BertForSequenceClassification(config))


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100, n_positions=32, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1,
    )
    return Logits(transformers.GPT2ForSequenceClassification(config))


def _hf_vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
        num_labels=3,
    )
    return Logits(transformers.ViTForImageClassification(config))


def _timm_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5)  # 12 blocks, 3 heads of 64


def _torchvision_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=5)


def _tokens() -> torch.Tensor:
    return torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))


def _images(size: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def _q_rows(site_module: Any) -> int:
    """Rows of the query projection(s), read from the weights (independent of the attributes)."""
    m = site_module
    if hasattr(m, "self"):  # BERT
        return int(m.self.query.weight.shape[0])
    if hasattr(m, "q_proj"):  # HF ViT
        return int(m.q_proj.weight.shape[0])
    if hasattr(m, "c_attn"):  # GPT-2 Conv1D, weight (in, 3 * width)
        return int(m.c_attn.weight.shape[1]) // 3
    if hasattr(m, "qkv"):  # timm
        return int(m.qkv.weight.shape[0]) // 3
    return int(m.in_proj_weight.shape[0]) // 3  # nn.MultiheadAttention


def _o_columns(site_module: Any) -> int:
    m = site_module
    if hasattr(m, "self"):
        return int(m.output.dense.weight.shape[1])
    if hasattr(m, "o_proj"):
        return int(m.o_proj.weight.shape[1])
    if hasattr(m, "c_proj"):
        return int(m.c_proj.weight.shape[0])
    if hasattr(m, "proj"):
        return int(m.proj.weight.shape[1])
    return int(m.out_proj.weight.shape[1])


def _heads_attribute(site_module: Any) -> tuple[int, int]:
    m = site_module
    if hasattr(m, "self"):
        return int(m.self.num_attention_heads), int(m.self.attention_head_size)
    if hasattr(m, "num_attention_heads"):
        return int(m.num_attention_heads), int(m.head_dim)
    return int(m.num_heads), int(m.head_dim)


def _linear_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of the matrix products of linear layers and of convolutions (not the attention products).
    With gradients on, so that ``nn.MultiheadAttention`` takes its composite path (its inference fast
    path is one fused kernel the counter does not see into)."""
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model(x)
    counts = counter.get_flop_counts()["Global"]
    ops = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.convolution}
    return int(sum(v for k, v in counts.items() if k in ops))


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    heads: int


CASES = [
    Case("bert", _bert, _tokens, 4),
    Case("gpt2", _gpt2, _tokens, 4),
    Case("hf_vit", _hf_vit, _images(32), 4),
    Case("timm_vit_tiny", _timm_vit, _images(64), 3),
    Case("torchvision_vit", _torchvision_vit, _images(32), 4),
]


def _prune(model: nn.Module, x: torch.Tensor, target: float = 0.3, **kwargs: Any):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ChannelPruner(get_criterion("l1"), **kwargs).step(model, x, Target("flops", target))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_heads_are_pruned_with_the_attributes_and_the_macs(case: Case, tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    x = case.inputs()
    dense_out = model(x)
    dense_flops = _linear_flops(model, x)
    result = _prune(model, x)
    sites = find_attention(model)
    assert sites, "no attention module found"
    removed_heads = 0
    for site in sites:
        num_heads, head_dim = _heads_attribute(site.module)
        assert _q_rows(site.module) == num_heads * head_dim == _o_columns(site.module), site.name
        assert head_dim == 64 // 4 if case.heads == 4 else head_dim == 64  # whole heads: head width kept
        removed_heads += case.heads - num_heads
    assert removed_heads > 0
    out = model(x)
    assert out.shape == dense_out.shape
    measured = 1 - _linear_flops(model, x) / dense_flops
    assert abs(measured - 0.3) <= 0.02, measured
    assert abs(measured - (1 - result.after.macs / result.before.macs)) < 1e-6
    # a training step on the pruned model
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    nn.functional.cross_entropy(logits, torch.arange(len(x)) % logits.shape[-1]).backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model.eval()
    export_pruned(model, tmp_path / "model.pt2", x, format="torch_export")  # parity checked inside (atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_removing_a_zeroed_head_leaves_the_output_unchanged(case: Case) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    x = case.inputs()
    site = find_attention(model)[0]
    num_heads, head_dim = _heads_attribute(site.module)
    head = 1
    channels = list(range(head * head_dim, (head + 1) * head_dim))
    with torch.no_grad():  # zero the head's value rows and output columns by hand, per layout
        m = site.module
        width = num_heads * head_dim
        if hasattr(m, "self"):
            m.self.value.weight[channels] = 0
            m.self.value.bias[channels] = 0
            m.output.dense.weight[:, channels] = 0
        elif hasattr(m, "q_proj"):
            m.v_proj.weight[channels] = 0
            if m.v_proj.bias is not None:
                m.v_proj.bias[channels] = 0
            m.o_proj.weight[:, channels] = 0
        elif hasattr(m, "c_attn"):
            m.c_attn.weight[:, [2 * width + c for c in channels]] = 0
            m.c_attn.bias[[2 * width + c for c in channels]] = 0
            m.c_proj.weight[channels] = 0
        elif hasattr(m, "qkv"):
            m.qkv.weight[[2 * width + c for c in channels]] = 0
            m.qkv.bias[[2 * width + c for c in channels]] = 0
            m.proj.weight[:, channels] = 0
        else:
            m.in_proj_weight[[2 * width + c for c in channels]] = 0
            m.in_proj_bias[[2 * width + c for c in channels]] = 0
            m.out_proj.weight[:, channels] = 0
        zeroed = model(x)
        cut_heads(site, channels, whole_heads=True)
        assert _heads_attribute(site.module)[0] == num_heads - 1
        pruned = model(x)
    torch.testing.assert_close(pruned, zeroed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_pruned_multihead_attention_forward_matches_torch(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    q, k = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    attn_mask = torch.zeros(5, 7, dtype=torch.bool)
    attn_mask[1, :3] = True
    expected, expected_w = mha(q, k, k, key_padding_mask=padding, attn_mask=attn_mask)
    mha.scaling = 8**-0.5
    mha.__class__ = HeadPrunedMultiheadAttention
    got, got_w = mha(q, k, k, key_padding_mask=padding, attn_mask=attn_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w, expected_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_need_weights_false_uses_fused_attention_and_matches_torch(batch_first: bool, mask: str) -> None:
    """The need_weights=False path (ViTs' calls) runs torch's scaled_dot_product_attention: the same
    output as torch's own module, for no mask, a boolean or additive 2-D mask and a causal one."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 6, 32) if batch_first else torch.randn(6, 3, 32)
    kwargs: dict = {}
    if mask == "bool":
        kwargs["attn_mask"] = torch.zeros(6, 6, dtype=torch.bool)
        kwargs["attn_mask"][2, :4] = True
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(6, 6)
    elif mask == "causal":
        kwargs["attn_mask"] = torch.ones(6, 6, dtype=torch.bool).triu(1)
    expected, _ = mha(x, x, x, need_weights=False, **kwargs)
    unbatched, _ = mha(x[0] if batch_first else x[:, 0], x[0] if batch_first else x[:, 0], x[0] if batch_first else x[:, 0],
                       need_weights=False, **kwargs)  # fmt: skip
    mha.scaling = 8**-0.5
    mha.__class__ = HeadPrunedMultiheadAttention
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    spy = lambda *a, **k: calls.append(1) or fused(*a, **k)  # noqa: E731
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        got, weights = mha(x, x, x, need_weights=False, **kwargs)
        got_unbatched, _ = mha(x[0] if batch_first else x[:, 0], x[0] if batch_first else x[:, 0],
                               x[0] if batch_first else x[:, 0], need_weights=False, **kwargs)  # fmt: skip
    assert calls == [1, 1] and weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_unbatched, unbatched, atol=1e-5, rtol=1e-5)


def test_head_dims_option_narrows_every_head() -> None:
    model = _hf_vit().eval()
    x = _images(32)()
    _prune(model, x, scope="heads", head_pruning="head_dims", target=0.15)
    for site in find_attention(model):
        num_heads, head_dim = _heads_attribute(site.module)
        assert num_heads == 4 and _q_rows(site.module) == 4 * head_dim
    assert any(_heads_attribute(s.module)[1] < 16 for s in find_attention(model))
    assert model(x).shape == (4, 3)
    # narrowed heads keep their attention scale (1/sqrt(16)); a config-built model would not: explained
    assert any("scales attention by 0.25" in r for r in model.model.save_pretrained.lightning_prune_reasons)


def _widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_scope_mlp_changes_only_feed_forward_widths() -> None:
    model = _bert().eval()
    x = _tokens()
    dense = _widths(model)
    _prune(model, x, scope="mlp")
    changed = {n for n, s in _widths(model).items() if s != dense[n]}
    assert changed
    # only the feed-forward layers: intermediate rows and output.dense columns (never attention or the token width)
    assert all(".intermediate.dense." in n or (".output.dense.weight" in n and ".attention." not in n) for n in changed), changed
    assert all(_heads_attribute(s.module) == (4, 16) for s in find_attention(model))


def test_scope_embedding_prunes_the_token_width_of_torchvision_vit() -> None:
    model = _torchvision_vit().eval()
    x = _images(32)()
    _prune(model, x, scope="embedding", target=0.2)
    assert model.hidden_dim == model.conv_proj.out_channels < 64
    assert model.encoder.layers[0].self_attention.embed_dim == model.hidden_dim
    assert model(x).shape == (4, 5)


def test_default_scope_keeps_the_token_width_and_cnns_unchanged() -> None:
    model = _timm_vit().eval()
    x = _images(64)()
    _prune(model, x)
    assert model.patch_embed.proj.out_channels == 192 and model.norm.normalized_shape == (192,)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([8, 6, 6]), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))
    assert ChannelPruner(get_criterion("l1")).scope_of(cnn) == frozenset({"mlp", "heads", "embedding", "other"})


@pytest.mark.parametrize("scope", ["attention", ["mlp", "tokens"], ""])
def test_scope_is_validated_up_front(scope: Any) -> None:
    with pytest.raises(ValueError, match="scope must be one of mlp, heads, embedding, all"):
        ChannelPruner(get_criterion("l1"), scope=scope)
    with pytest.raises(TypeError, match="scope"):
        ChannelPruner(get_criterion("l1"), scope=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head_pruning must be one of heads, head_dims"):
        ChannelPruner(get_criterion("l1"), head_pruning="some")  # type: ignore[arg-type]
    from lightning_prune import StructuredPruningCallback

    with pytest.raises(ValueError, match="scope must be one of"):  # the callback, at construction
        StructuredPruningCallback("l1", target_flops_reduction=0.3, scope=scope)


REPLAYS = [(CASES[0], None), (CASES[3], None), (CASES[4], None), (CASES[4], "all")]


@pytest.mark.parametrize(("case", "scope"), REPLAYS, ids=["bert", "timm_vit_tiny", "torchvision_vit", "torchvision_vit_all"])
def test_head_surgery_replays_exactly_on_a_fresh_model(case: Case, scope: str | None) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    x = case.inputs()
    result = _prune(model, x, scope=scope, target=0.35)
    if scope is None:
        assert any(isinstance(e[1], str) for e in result.surgery)  # the head cuts are in the record
    else:  # the token width of torchvision's ViT, with its hard-coded hidden_dim
        assert model.hidden_dim < 64
    torch.manual_seed(1)
    fresh = case.build().eval()
    replay_surgery(fresh, x, [result.surgery])
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(find_attention(model), find_attention(fresh)):
        assert _heads_attribute(a.module) == _heads_attribute(b.module)
    assert getattr(fresh, "hidden_dim", None) == getattr(model, "hidden_dim", None)
    torch.testing.assert_close(fresh(x), model(x))


def test_the_package_never_imports_transformers_or_timm() -> None:
    """Families are recognised by class path; no module of the package imports either library (at
    any level: torch-pruning and lightning import them on their own when installed, so sys.modules
    cannot tell)."""
    import ast
    from pathlib import Path

    import lightning_prune

    offenders = []
    for path in Path(lightning_prune.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("transformers", "timm")]
    assert offenders == []


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["pls_vip", "discriminant_information"])
def test_activation_criteria_score_heads_by_their_outputs(criterion: str) -> None:
    """Planted signal: head 2 of every layer has zero value weights, so its output features (what the
    output projection reads) are constantly zero; every other head carries signal. An activation
    criterion must drop head 2 first (learning rate 0: the weights stay as planted)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune import StructuredPruningCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = _bert()
            with torch.no_grad():
                for layer in self.net.model.bert.encoder.layer:
                    layer.attention.self.value.weight[32:48] = 0
                    layer.attention.self.value.bias[32:48] = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, _i: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    ids = torch.randint(1, 100, (48, 12), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 0] % 3
    callback = StructuredPruningCallback(criterion, target_flops_reduction=0.08, epochs=[0], scope="heads", verbose=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Module(), DataLoader(TensorDataset(ids, labels), batch_size=16))
    cuts = [entry for entry in callback.history[0].surgery if entry[1] == "heads"]
    assert cuts and all(entry[2] == list(range(32, 48)) for entry in cuts), cuts


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=["bert", "torchvision_vit"])
def test_a_failed_head_step_restores_model_attributes_and_optimizer(case: Case) -> None:
    """A fault after the surgery (here in ``recalibrate``) puts back the weights, the attributes the
    forward reads, the module classes and the optimizer's parameters."""
    from lightning_prune import PruningError

    torch.manual_seed(0)
    model = case.build().eval()
    x = case.inputs()
    reference = model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = {s.name: (_heads_attribute(s.module), type(s.module)) for s in find_attention(model)}

    def fail(_model: nn.Module) -> None:
        assert any(_heads_attribute(s.module)[0] < case.heads for s in find_attention(_model))  # the cut happened
        raise RuntimeError("planted fault")

    with pytest.raises(PruningError, match="planted fault"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ChannelPruner(get_criterion("l1")).step(model, x, Target("flops", 0.3), optimizers=[optimizer], recalibrate=fail)
    assert {s.name: (_heads_attribute(s.module), type(s.module)) for s in find_attention(model)} == before
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in params]
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    torch.testing.assert_close(model(x), reference)


def test_an_averaged_copy_gets_the_same_head_cut() -> None:
    import copy

    torch.manual_seed(0)
    model = _timm_vit().eval()
    copy_ = copy.deepcopy(model)
    x = _images(64)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ChannelPruner(get_criterion("l1")).step(model, x, Target("flops", 0.3), companions=[copy_])
    assert [s.module.num_heads for s in find_attention(copy_)] == [s.module.num_heads for s in find_attention(model)]
    assert any(s.module.num_heads < 3 for s in find_attention(model))
    torch.testing.assert_close(copy_(x), model(x))  # same values: the copy was a copy of the model


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_filter_ensembles_masks_a_head_like_zeroing_it(case: Case) -> None:
    """``filter_ensembles`` masks a head group where the heads' outputs meet the output projection:
    the masked model equals the dense model whose head's output-projection columns are zeroed."""
    import copy

    from lightning_prune.criteria.filter_ensembles import channel_masking

    torch.manual_seed(0)
    model = case.build().eval()
    x = case.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = ChannelPruner(get_criterion("l1"), scope="heads").analyse(model, x)
    group = analysis.groups[0]
    head_dim = group.block
    mask = torch.ones(group.size)
    mask[head_dim : 2 * head_dim] = 0
    reference = copy.deepcopy(model)
    site = next(s for s in find_attention(reference) if s.name in group.module_names)
    with torch.no_grad():
        m = site.module
        out = m.output.dense if hasattr(m, "self") else getattr(m, "o_proj", None) or getattr(m, "proj", None)
        if hasattr(m, "c_proj"):
            m.c_proj.weight[head_dim : 2 * head_dim] = 0
        elif out is not None:
            out.weight[:, head_dim : 2 * head_dim] = 0
        else:
            m.out_proj.weight[:, head_dim : 2 * head_dim] = 0
        expected = reference(x)
        with channel_masking([group], model, analysis.graph, [mask]):
            masked = model(x)
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=1e-5)


def test_gpt2_feed_forward_widths_prune_with_the_heads() -> None:
    """transformers' Conv1D (weight (in, out)) gets a torch-pruning pruner of the library's."""
    model = _gpt2().eval()
    x = _tokens()
    _prune(model, x)
    for block in model.model.transformer.h:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        assert fc.weight.shape == (64, fc.nf) and proj.weight.shape == (fc.nf, 64) and fc.bias.shape == (fc.nf,)
    assert any(block.mlp.c_fc.nf < 128 for block in model.model.transformer.h)
    assert model.model.transformer.wte.embedding_dim == 64
