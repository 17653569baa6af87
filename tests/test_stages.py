"""Several stages in one fit: a criterion per step, several pruning callbacks in one Trainer, and
resume / load_pruned replaying every stage's steps in the order they ran."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_prune import StructuredPruningCallback, load_pruned, restore_pruned_structure
from lightning_prune.checkpoint import STATE_MARKER, callback_state, callback_states
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

X = torch.randn(5, 1, 8, 8)


def _trainer(tmp_path, callbacks, epochs):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3, limit_val_batches=1,
                     default_root_dir=tmp_path)


def _net():
    return SmallResNet(widths=(8, 16), blocks_per_stage=1)


def _model():
    return ImageClassifier(_net(), max_epochs=4)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_a_criterion_per_step_is_validated_against_the_step_count():
    with pytest.raises(ValueError, match=r"criterion lists 1 criteria for 2 pruning step"):
        StructuredPruningCallback(["l1"], target_flops_reduction=0.5, epochs=[0, 1])
    with pytest.raises(ValueError, match=r"criterion lists 3 criteria for 2 pruning step"):
        StructuredPruningCallback(["l1", "fpgm", "l2"], target_flops_reduction=0.5, epochs=[1], prune_on_train_start=True)
    cb = StructuredPruningCallback(["l1", "fpgm", "l1"], target_flops_reduction=0.5, epochs=[0, 1, 2])
    assert [c.name for c in cb.criteria] == ["l1", "fpgm", "l1"]
    assert len(cb._pruners) == 2  # one pruner per distinct criterion, built once


def test_two_stage_fit_resumed_from_the_middle_replays_both_stages_exactly(tmp_path):
    def run(callbacks, ckpt=None):
        L.seed_everything(0)
        model = _model()
        cb = StructuredPruningCallback(["pca_gm", "fpgm"], target_flops_reduction=0.5, epochs=[0, 2], collect_batches=2,
                                       verbose=False)
        _trainer(tmp_path, [cb, *callbacks], 4).fit(model, DigitsDataModule(), ckpt_path=ckpt)
        return model, cb

    reference, ref_cb = run([])
    assert [r.criterion for r in ref_cb.history] == ["pca_gm", "fpgm"]
    assert ref_cb.history[0].samples and ref_cb.history[1].samples is None  # activations for pca_gm only
    assert [r.order for r in ref_cb.history] == [0, 1]

    class Stop(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
                trainer.should_stop = True

    run([Stop()])
    resumed, cb = run([], ckpt=tmp_path / "epoch1.ckpt")
    assert [(r.epoch, r.criterion) for r in cb.history] == [(0, "pca_gm"), (2, "fpgm")]
    _same(reference, resumed)


def _two_callbacks():
    # listed in the opposite order to the one they prune in: the replay must follow the run, not the list
    late = StructuredPruningCallback("fpgm", target_flops_reduction=0.5, epochs=[2], name="late", verbose=False)
    early = StructuredPruningCallback("l1", target_flops_reduction=0.3, epochs=[0], name="early", verbose=False)
    return late, early


def test_two_callbacks_in_one_trainer_and_load_pruned_of_the_final_checkpoint(tmp_path):
    L.seed_everything(0)
    late, early = _two_callbacks()
    assert late.state_key != early.state_key
    model = _model()
    trainer = _trainer(tmp_path, [late, early], 4)
    trainer.fit(model, DigitsDataModule())
    assert [r.order for r in early.history] == [0] and [r.order for r in late.history] == [1]
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert set(callback_states(saved)) == {late.state_key, early.state_key}
    assert [r["order"] for r in callback_state(saved)["history"]] == [0, 1]

    loaded = load_pruned(ImageClassifier, path, net=_net())
    model.eval()
    assert torch.equal(loaded(X), model(X))
    _same(loaded, model)


def test_two_callbacks_resumed_between_the_stages_end_like_the_uninterrupted_run(tmp_path):
    def run(callbacks, ckpt=None):
        L.seed_everything(0)
        model = _model()
        _trainer(tmp_path, [*_two_callbacks(), *callbacks], 4).fit(model, DigitsDataModule(), ckpt_path=ckpt)
        return model

    reference = run([])

    class Stop(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:  # after both stages: the resume replays both, in order
                trainer.save_checkpoint(tmp_path / "epoch2.ckpt")
                trainer.should_stop = True

    run([Stop()])
    _same(reference, run([], ckpt=tmp_path / "epoch2.ckpt"))


def test_two_unnamed_callbacks_collide_and_named_ones_do_not():
    with pytest.raises(RuntimeError, match="state_key"):  # Lightning refuses them when the Trainer is built
        L.Trainer(callbacks=[StructuredPruningCallback("l1", channel_ratio=0.3),
                             StructuredPruningCallback("l2", channel_ratio=0.3, epochs=[1])])
    with pytest.raises(ValueError, match="name must be"):
        StructuredPruningCallback("l1", channel_ratio=0.3, name="")
    assert StructuredPruningCallback("l1", channel_ratio=0.3).state_key == "StructuredPruningCallback"


def test_state_key_collision_is_refused_in_setup(tmp_path):
    class Keyed(StructuredPruningCallback):
        @property
        def state_key(self):
            return "StructuredPruningCallback"

    a = StructuredPruningCallback("l1", channel_ratio=0.3, epochs=[0])
    b = Keyed("l2", channel_ratio=0.3, epochs=[0])
    trainer = _trainer(tmp_path, [], 1)
    trainer.callbacks.extend([a, b])  # added after the Trainer was built: only setup can tell
    with pytest.raises(ValueError, match="share the state key 'StructuredPruningCallback'.*name="):
        trainer.fit(_model(), DigitsDataModule())


class MyPruning(StructuredPruningCallback):
    """A subclass: its state key is its own class name."""


def test_a_subclass_with_its_own_state_key_loads_with_load_pruned(tmp_path):
    L.seed_everything(0)
    cb = MyPruning("l1", target_flops_reduction=0.5, epochs=[0], verbose=False)
    model = _model()
    trainer = _trainer(tmp_path, [cb], 1)
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "sub.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert list(saved["callbacks"]) == ["MyPruning"] and saved["callbacks"]["MyPruning"][STATE_MARKER]
    loaded = load_pruned(ImageClassifier, path, net=_net())
    _same(loaded, model)
    # and a resume into a fresh dense model finds it too
    cb2 = MyPruning("l1", target_flops_reduction=0.5, epochs=[0], verbose=False)
    fresh = _model()
    _trainer(tmp_path, [cb2], 2).fit(fresh, DigitsDataModule(), ckpt_path=path)
    assert len(cb2.history) == 1


def test_old_checkpoints_without_marker_or_order_still_load(tmp_path):
    L.seed_everything(0)
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0, 1], verbose=False)
    model = _model()
    trainer = _trainer(tmp_path, [cb], 2)
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "new.ckpt"
    trainer.save_checkpoint(path)
    old = torch.load(path, weights_only=True)
    state = old["callbacks"]["StructuredPruningCallback"]
    del state[STATE_MARKER], state["name"]
    for record in state["history"]:
        del record["order"]
    torch.save(old, tmp_path / "old.ckpt")
    loaded = load_pruned(ImageClassifier, tmp_path / "old.ckpt", net=_net())
    _same(loaded, model)
    fresh = ImageClassifier(_net())
    restore_pruned_structure(fresh, tmp_path / "old.ckpt")
    fresh.load_state_dict(old["state_dict"])
    cb2 = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0, 1], verbose=False)
    _trainer(tmp_path, [cb2], 3).fit(ImageClassifier(_net(), max_epochs=4), DigitsDataModule(), ckpt_path=tmp_path / "old.ckpt")
    assert [r.epoch for r in cb2.history] == [0, 1] and cb2.history[0].order is None
