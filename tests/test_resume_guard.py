"""A pruned checkpoint resumed into a freshly built dense model is refused with a clear message."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_prune import StructuredPruningCallback
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet
from lightning_prune.reporting import plot_widths


def _trainer(tmp_path, callbacks, max_epochs):
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=3,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )


def _model():
    return ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1), max_epochs=3)


def test_pruned_checkpoint_into_dense_model_is_refused_before_weights_load(tmp_path):
    L.seed_everything(0)
    trainer = _trainer(tmp_path, [StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0])], 2)
    model = _model()
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)

    fresh = _model()
    dense_weights = {k: v.clone() for k, v in fresh.state_dict().items()}
    trainer = _trainer(tmp_path, [StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0])], 3)
    with pytest.raises(ValueError, match="pruned in 1 step"):
        trainer.fit(fresh, DigitsDataModule(), ckpt_path=path)
    # nothing half-loaded: the fresh model still has its own dense weights
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, dense_weights[k]), k


def test_resuming_into_the_pruned_model_itself_is_allowed(tmp_path):
    L.seed_everything(0)
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0])
    trainer = _trainer(tmp_path, [cb], 2)
    model = _model()
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    cb2 = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0])
    trainer = _trainer(tmp_path, [cb2], 3)
    trainer.fit(model, DigitsDataModule(), ckpt_path=path)
    assert trainer.current_epoch == 3
    assert len(cb2.history) == 1  # the step already done is not redone


def test_widths_plot_is_written(tmp_path):
    L.seed_everything(0)
    cb = StructuredPruningCallback("l2", target_flops_reduction=0.4, epochs=[0])
    model = _model()
    from lightning_prune.engine import layer_widths

    dense = layer_widths(model)
    _trainer(tmp_path, [cb], 1).fit(model, DigitsDataModule())
    out = tmp_path / "widths.png"
    plot_widths(cb.history, dense, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_fit_keeps_the_dense_reference_for_the_steps_still_due(tmp_path):
    """Stop after the first of two steps, resume into the pruned model: the second step aims at the
    dense model's MACs, not at the pruned model's."""
    L.seed_everything(0)
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.6, epochs=[0, 2])
    model = _model()
    x = torch.randn(2, 1, 8, 8)
    from lightning_prune import count_cost

    dense = count_cost(model, x)
    path = tmp_path / "half.ckpt"

    class StopAfterEpoch1(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.save_checkpoint(path)
                trainer.should_stop = True

    _trainer(tmp_path, [cb, StopAfterEpoch1()], 4).fit(model, DigitsDataModule())
    assert len(cb.history) == 1
    cb2 = StructuredPruningCallback("l1", target_flops_reduction=0.6, epochs=[0, 2])
    _trainer(tmp_path, [cb2], 4).fit(model, DigitsDataModule(), ckpt_path=path)
    assert [r.epoch for r in cb2.history] == [0, 2]
    final = count_cost(model, x)
    assert abs((1 - final.macs / dense.macs) - 0.6) <= 0.02
