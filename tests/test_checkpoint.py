"""Pruned checkpoints: resume into a fresh dense model, interrupted-run equality, load_pruned, errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from crash import SaveThenCrash

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


def test_pruned_checkpoint_resumes_into_a_freshly_built_dense_model(tmp_path):
    L.seed_everything(0)
    trainer = _trainer(tmp_path, [StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0])], 2)
    model = _model()
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)  # plain data only
    record = saved["callbacks"]["StructuredPruningCallback"]
    assert record["version"] == 2 and record["history"][0]["surgery"]
    assert all(isinstance(name, str) and name in dict(model.named_modules()) for name, _, _ in record["history"][0]["surgery"])

    fresh = _model()
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0])
    trainer = _trainer(tmp_path, [cb], 3)
    trainer.fit(fresh, DigitsDataModule(), ckpt_path=path)
    assert trainer.current_epoch == 3 and len(cb.history) == 1  # the step already done is not redone
    assert {n: p.shape for n, p in fresh.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}


def test_interrupted_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    def run(callbacks, ckpt=None, model=None):
        L.seed_everything(0)
        model = model or _model()
        cb = StructuredPruningCallback("l2", target_flops_reduction=0.5, epochs=[0, 2])
        _trainer(tmp_path, [cb, *callbacks], 4).fit(model, DigitsDataModule(), ckpt_path=ckpt)
        return model, cb

    reference, _ = run([])

    with pytest.raises(RuntimeError, match="simulated crash"):
        run([SaveThenCrash(tmp_path)])
    L.seed_everything(123)  # a different process state: the resume must not depend on it
    resumed, cb = run([], ckpt=tmp_path / "epoch1.ckpt", model=_model())
    assert [r.epoch for r in cb.history] == [0, 2]
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_pruned_rebuilds_the_module_for_inference(tmp_path):
    from lightning_prune import load_pruned

    L.seed_everything(0)
    trainer = _trainer(tmp_path, [StructuredPruningCallback("fpgm", target_flops_reduction=0.4, epochs=[0])], 2)
    model = _model()
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_pruned(ImageClassifier, path, net=SmallResNet(widths=(8, 16), blocks_per_stage=1))
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))


def test_a_record_that_does_not_fit_names_the_layer_and_loads_nothing(tmp_path):
    from lightning_prune import load_pruned

    L.seed_everything(0)
    trainer = _trainer(tmp_path, [StructuredPruningCallback("l1", target_flops_reduction=0.4, epochs=[0])], 1)
    trainer.fit(_model(), DigitsDataModule())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    other = SmallResNet(widths=(8,), blocks_per_stage=1)  # no second stage
    other_model = ImageClassifier(other)
    before = {k: v.clone() for k, v in other_model.state_dict().items()}
    with pytest.raises(ValueError, match="net.stages.1"):
        from lightning_prune import restore_pruned_structure

        restore_pruned_structure(other_model, path)
    after = other_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="net.stages.1"):
        load_pruned(ImageClassifier, path, net=SmallResNet(widths=(8,), blocks_per_stage=1))


def test_plain_module_structure_from_a_step_record():
    from lightning_prune import ChannelPruner, Target, get_criterion, restore_pruned_structure

    torch.manual_seed(0)
    net = SmallResNet(widths=(8, 16), blocks_per_stage=1)
    x = torch.randn(2, 1, 8, 8)
    result = ChannelPruner(get_criterion("l1")).step(net, x, Target("flops", 0.5))
    fresh = SmallResNet(widths=(8, 16), blocks_per_stage=1)
    restore_pruned_structure(fresh, {"history": [{"surgery": result.surgery}], "example_inputs": x})
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh.eval()(x), net.eval()(x))


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
