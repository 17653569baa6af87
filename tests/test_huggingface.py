"""Hugging Face round trips after pruning, per-layer-uniform widths, torchvision ViT-B/16's token
width, exports, and a Lightning fit of a BERT with dict batches (tiny models built from configs)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_prune import ChannelPruner, StructuredPruningCallback, Target, get_criterion, load_pruned
from lightning_prune.checkpoint import replay_surgery
from lightning_prune.engine.attention import find_attention
from lightning_prune.engine.huggingface import ConfigCannotDescribeWarning
from lightning_prune.export import export_pruned

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _bert_config() -> Any:
    return transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32, num_labels=3,
    )


def _vit_config() -> Any:
    return transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
        num_labels=3,
    )


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))}


def _step(model: nn.Module, x: Any, target: float = 0.3, **kwargs: Any):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = ChannelPruner(get_criterion("l1"), output_transform=lambda out: out.logits, **kwargs)
        return pruner.step(model, x, Target("flops", target))


def _reload(cls: Any, model: nn.Module, path: Any) -> nn.Module:
    model.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path).eval()


def test_bert_feed_forward_round_trips_through_save_pretrained(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config()).eval()
    x = _ids()
    _step(model, x, scope="mlp", uniform_per_type=True)
    widths = {m.intermediate.dense.out_features for m in model.bert.encoder.layer}
    assert len(widths) == 1 and widths != {128}
    assert model.config.intermediate_size == widths.pop()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigCannotDescribeWarning)
        reloaded = _reload(transformers.BertForSequenceClassification, model, tmp_path)
    torch.testing.assert_close(reloaded(**x).logits, model(**x).logits)


def test_vit_heads_and_feed_forward_round_trip(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(_vit_config()).eval()
    x = torch.randn(4, 3, 32, 32)
    _step(model, x, uniform_per_type=True, allocation="global")
    heads = {s.module.num_attention_heads for s in find_attention(model)}
    assert len(heads) == 1 and heads != {4}
    assert model.config.num_attention_heads == heads.pop() and model.config.head_dim == 16
    assert model.config.hidden_size == 64
    reloaded = _reload(transformers.ViTForImageClassification, model, tmp_path)
    torch.testing.assert_close(reloaded(x).logits, model(x).logits)


def test_widths_the_config_cannot_describe_are_explained_and_replayed(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config()).eval()
    x = _ids()
    result = _step(model, x, allocation="global", uniform_per_type=True, target=0.35)  # heads removed, token width kept
    assert any(s.module.self.num_attention_heads < 4 for s in find_attention(model))
    with pytest.warns(ConfigCannotDescribeWarning, match="derives the head width as hidden_size / num_attention_heads"):
        model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="mismatch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    torch.manual_seed(1)
    fresh = transformers.BertForSequenceClassification(_bert_config()).eval()
    replay_surgery(fresh, x, [result.surgery], output_transform=lambda out: out.logits)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(**x).logits, model(**x).logits)


def test_per_layer_widths_are_explained_and_uniform_per_type_equalises_them() -> None:
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(_vit_config()).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # make layer 0's feed-forward clearly stronger than layer 1's
        model.vit.layers[0].mlp.fc1.weight.mul_(5)
    _step(model, x, scope="mlp", allocation="global", target=0.25)
    widths = [layer.mlp.fc1.out_features for layer in model.vit.layers]
    assert widths[0] != widths[1]
    assert model.save_pretrained.lightning_prune_reasons[0].startswith("layers have different intermediate_size")
    torch.manual_seed(0)
    tied = transformers.ViTForImageClassification(_vit_config()).eval()
    with torch.no_grad():
        tied.vit.layers[0].mlp.fc1.weight.mul_(5)
    _step(tied, x, scope="mlp", allocation="global", target=0.25, uniform_per_type=True)
    widths = [layer.mlp.fc1.out_features for layer in tied.vit.layers]
    assert widths[0] == widths[1] < 128
    assert "save_pretrained" not in vars(tied)


def test_torchvision_vit_b_16_prunes_heads_and_its_token_width_is_no_longer_refused() -> None:
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = vit_b_16(image_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = ChannelPruner(get_criterion("l1"), scope="all").analyse(model, x)
    kinds = {g.kind for g in analysis.groups}
    assert "embedding" in kinds and "mlp" in kinds
    assert analysis.refused == {}, analysis.refused
    assert not [w for w in caught if "kept at full width" in str(w.message)]
    pruner = ChannelPruner(get_criterion("l1"))  # default scope: MLP and heads
    heads = pruner.analyse(model, x)
    assert {g.kind for g in heads.groups} == {"mlp", "heads"} and sum(g.kind == "heads" for g in heads.groups) == 12
    dense_flops, dense_shape = _linear_flops(model, x), model(x).shape
    pruner.step(model, x, Target("flops", 0.3), analysis=heads)
    for layer in model.encoder.layers:
        attention = layer.self_attention
        assert attention.in_proj_weight.shape[0] == 3 * attention.num_heads * 64 == 3 * attention.out_proj.in_features
    assert sum(12 - layer.self_attention.num_heads for layer in model.encoder.layers) > 0
    assert model.hidden_dim == 768 and model(x).shape == dense_shape
    assert abs(1 - _linear_flops(model, x) / dense_flops - 0.3) <= 0.02


def _linear_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of linear layers' matrix products and of convolutions, by torch's counter (grad on: the
    eval fast path of nn.MultiheadAttention is one fused op the counter does not see into)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model(x)
    ops = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.convolution}
    return int(sum(v for k, v in counter.get_flop_counts()["Global"].items() if k in ops))


def test_onnx_export_of_a_pruned_vit_reproduces_it(tmp_path: Any) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5, depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ChannelPruner(get_criterion("l1")).step(model, x, Target("flops", 0.3))
    assert any(s.module.num_heads < 3 for s in find_attention(model))
    export_pruned(model, tmp_path / "vit.onnx", x, format="onnx")  # raises unless outputs match (atol 1e-5)


class _Tokens(Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        label = i % 3
        ids = torch.randint(1, 100, (12,), generator=g)
        ids[0] = 1 + label  # a planted signal
        return {"input_ids": ids, "labels": torch.tensor(label)}


class _BertModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.BertForSequenceClassification(_bert_config())

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids)

    def training_step(self, batch: dict[str, torch.Tensor], _i: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["input_ids"]).logits, batch["labels"])

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.slow
def test_callback_prunes_bert_heads_in_a_fit_and_load_pruned_restores_it(tmp_path: Any) -> None:
    module = _BertModule()
    callback = StructuredPruningCallback(
        "l1", target_flops_reduction=0.3, epochs=[0], output_transform=lambda out: out.logits,
        input_fn=lambda batch: {"input_ids": batch["input_ids"]}, verbose=False,
    )
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(_Tokens(), batch_size=8))
    heads = [s.module.self.num_attention_heads for s in find_attention(module.model)]
    assert sum(4 - h for h in heads) > 0
    assert module.model.bert.embeddings.word_embeddings.embedding_dim == 64  # token width kept
    reduction = callback.history[-1].flops_reduction
    assert abs(reduction - 0.3) <= 0.02
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    restored = load_pruned(_BertModule, path)
    ids = _ids()["input_ids"]
    module.eval()
    torch.testing.assert_close(restored(ids).logits, module(ids).logits)
    # resume on a fresh dense module: the head cuts replay before the weights and the AdamW state load
    resumed, again = _BertModule(), StructuredPruningCallback(
        "l1", target_flops_reduction=0.3, epochs=[0], output_transform=lambda out: out.logits,
        input_fn=lambda batch: {"input_ids": batch["input_ids"]}, verbose=False,
    )
    L.Trainer(
        max_epochs=3, accelerator="cpu", callbacks=[again], logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path / "resumed",
    ).fit(resumed, DataLoader(_Tokens(), batch_size=8), ckpt_path=path)
    assert [s.module.self.num_attention_heads for s in find_attention(resumed.model)] == heads
    assert len(again.history) == 1
