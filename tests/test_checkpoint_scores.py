"""Checkpoints carry the scores of the weights they hold (validate_after_prune), and the step records say
which metrics are from before and after the step."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_prune import PruningRecord, StructuredPruningCallback, load_pruned
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

_QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}
_EVAL = {**_QUIET, "enable_checkpointing": False}


def _net():
    return SmallResNet(widths=(8, 16), blocks_per_stage=1)


def _model():
    return ImageClassifier(_net(), max_epochs=4)


def _pruning(**kwargs):
    kwargs.setdefault("epochs", [0, 2])
    return StructuredPruningCallback("l1", target_flops_reduction=0.5, verbose=False, **kwargs)


def _fit(tmp_path, callbacks, max_epochs=4, **trainer_kwargs):
    L.seed_everything(0)
    model = _model()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        limit_train_batches=8,  # enough training that a step visibly changes the validation loss
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **_QUIET,
        **trainer_kwargs,
    )
    trainer.fit(model, DigitsDataModule())
    return trainer, model


def _checkpointing(tmp_path, **kwargs):
    return ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1, filename="{epoch}-{val_loss:.4f}", **kwargs
    )


def _val_loss(model):
    results = L.Trainer(**_EVAL).validate(model, DigitsDataModule(), verbose=False)
    return results[0]["val_loss"]


def _reloaded_val_loss(path):
    return _val_loss(load_pruned(ImageClassifier, path, net=_net()))


def _named_score(path):
    return float(re.search(r"val_loss=([0-9.]+)\.ckpt$", Path(path).name).group(1))


def _mismatches(checkpointing):
    """Checkpoints whose reloaded score is not the one they were saved under (file name and best_k_models)."""
    assert checkpointing.best_k_models, "no checkpoint was saved"
    wrong = {}
    for path, score in checkpointing.best_k_models.items():
        actual = _reloaded_val_loss(path)
        if actual != pytest.approx(_named_score(path), rel=1e-3, abs=1e-4) or actual != pytest.approx(float(score), rel=1e-5):
            wrong[Path(path).name] = actual
    return wrong


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize(
    ("checkpoint_kwargs", "trainer_kwargs", "epochs"),
    [
        ({}, {}, [0, 2]),  # saves at train epoch end, after the prune
        ({"save_on_train_epoch_end": False}, {}, [0, 2]),  # saves at validation end, before the prune
        ({}, {"check_val_every_n_epoch": 2}, [0, 1]),  # a prune at an epoch without validation, one with
        ({"every_n_epochs": 2}, {}, [1, 2]),
    ],
    ids=["default", "save_on_validation_end", "check_val_every_2", "every_2_epochs"],
)
def test_every_checkpoint_reloads_to_the_score_it_was_saved_under(tmp_path, checkpoint_kwargs, trainer_kwargs, epochs):
    checkpointing = _checkpointing(tmp_path, **checkpoint_kwargs)
    pruning = _pruning(epochs=epochs)
    _fit(tmp_path, [pruning, checkpointing], **trainer_kwargs)
    assert len(pruning.history) == 2
    assert _mismatches(checkpointing) == {}
    assert _reloaded_val_loss(checkpointing.best_model_path) == pytest.approx(float(checkpointing.best_model_score), rel=1e-5)


def test_without_validate_after_prune_the_pruning_epoch_checkpoint_is_mislabelled(tmp_path):
    """The old behaviour, kept by validate_after_prune=False: the file of each pruning epoch holds the pruned
    weights under the dense model's score."""
    checkpointing = _checkpointing(tmp_path)
    _fit(tmp_path, [_pruning(validate_after_prune=False), checkpointing])
    wrong = _mismatches(checkpointing)
    assert sorted(name.split("-")[0] for name in wrong) == ["epoch=0", "epoch=2"]


def test_post_step_validation_changes_no_training_weight(tmp_path):
    """Training is the same with or without the post-step validation pass (random state restored), even with
    a train loader that shuffles with the global generator."""

    class Shuffled(DigitsDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(self._splits["train"], batch_size=64, shuffle=True)

    def run(validate):
        L.seed_everything(0)
        model = _model()
        trainer = L.Trainer(max_epochs=3, callbacks=[_pruning(epochs=[0, 1], validate_after_prune=validate)],
                            limit_train_batches=3, default_root_dir=tmp_path, **_EVAL)
        trainer.fit(model, Shuffled())
        return model.state_dict()

    with_pass, without = run(True), run(False)
    assert with_pass.keys() == without.keys()
    assert all(torch.equal(with_pass[k], without[k]) for k in with_pass)


def _current_val_loss(module):
    """The validation loss of the module's weights right now (what self.log's epoch mean computes)."""
    data = DigitsDataModule()
    data.setup()
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.val_dataloader():
            total += float(torch.nn.functional.cross_entropy(module(x), y, reduction="sum"))
            count += len(y)
    for m, mode in modes:
        m.training = mode
    return total / count


class _CheckedEarlyStopping(EarlyStopping):
    """Records, at every check, the monitored value and the validation loss of the weights at that moment."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checks = []

    def _run_early_stopping_check(self, trainer):
        monitored = float(trainer.callback_metrics["val_loss"])
        self.checks.append((trainer.current_epoch, monitored, _current_val_loss(trainer.lightning_module)))
        super()._run_early_stopping_check(trainer)


@pytest.mark.parametrize("check_val_every_n_epoch", [1, 2])
def test_early_stopping_and_best_checkpoint_use_the_scores_of_their_weights(tmp_path, check_val_every_n_epoch):
    checkpointing = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    stopping = _CheckedEarlyStopping(monitor="val_loss", patience=3)
    pruning = _pruning(epochs=[0, 1, 2])
    _fit(tmp_path, [pruning, stopping, checkpointing], max_epochs=5, check_val_every_n_epoch=check_val_every_n_epoch)
    # every value EarlyStopping judged was the score of the weights the model had when it judged it
    assert {epoch for epoch, _, _ in stopping.checks} >= {0, 1, 2}
    for epoch, monitored, actual in stopping.checks:
        assert monitored == pytest.approx(actual, rel=1e-4), epoch
    best = float(checkpointing.best_model_score)
    assert float(stopping.best_score) == pytest.approx(best, rel=1e-6)
    assert _reloaded_val_loss(checkpointing.best_model_path) == pytest.approx(best, rel=1e-5)
    # ckpt_path="best"'s file on a fresh dense model, the callback in the Trainer: the same score
    fresh = L.Trainer(callbacks=[_pruning(epochs=[0, 1, 2])], **_EVAL)
    results = fresh.validate(_model(), DigitsDataModule(), ckpt_path=checkpointing.best_model_path, verbose=False)
    assert results[0]["val_loss"] == pytest.approx(best, rel=1e-5)


def test_the_record_says_which_metrics_are_before_and_after_the_step(tmp_path):
    checkpointing = _checkpointing(tmp_path, save_on_train_epoch_end=False)  # keeps the dense file of epoch 0
    pruning = _pruning(epochs=[0, 2])
    _fit(tmp_path, [pruning, checkpointing])
    files = {Path(p).name.split("-")[0]: p for p in checkpointing.best_k_models}
    first = pruning.history[0]
    # before: the dense model's validation of epoch 0 (the file saved at validation end holds that model)
    assert first.metrics_before["val_loss"] == pytest.approx(_reloaded_val_loss(files["epoch=0"]), rel=1e-5)
    assert "train_loss" in first.metrics_before
    # after: the pruned model's validation, and only what that validation produced
    after = first.metrics_after
    assert after is not None and set(after) == {"val_loss", "val_acc"}
    assert after["val_loss"] != first.metrics_before["val_loss"]
    # the records stored in a later checkpoint carry both
    state = torch.load(files["epoch=3"], weights_only=True)["callbacks"]["StructuredPruningCallback"]
    stored = [PruningRecord.from_dict(r) for r in state["history"]]
    assert [(r.metrics_before, r.metrics_after) for r in stored] == [
        (r.metrics_before, r.metrics_after) for r in pruning.history
    ]


def test_post_step_validation_score_is_the_checkpointed_pruned_model_score(tmp_path):
    checkpointing = _checkpointing(tmp_path)  # default: saves at train epoch end, after the step's validation
    pruning = _pruning(epochs=[0, 2])
    _fit(tmp_path, [pruning, checkpointing])
    files = {Path(p).name.split("-")[0]: p for p in checkpointing.best_k_models}
    for record in pruning.history:
        path = files[f"epoch={record.epoch}"]
        assert record.metrics_after is not None
        assert _reloaded_val_loss(path) == pytest.approx(record.metrics_after["val_loss"], rel=1e-5)


def test_start_of_training_step_records_no_post_step_validation(tmp_path):
    pruning = StructuredPruningCallback("l1", target_flops_reduction=0.3, prune_on_train_start=True, verbose=False)
    _fit(tmp_path, [pruning], max_epochs=1, enable_checkpointing=False)
    assert pruning.history[0].epoch == -1 and pruning.history[0].metrics_after is None


def test_records_written_before_the_metrics_fields_still_load():
    old = {
        "step": 0, "epoch": 0, "criterion": "l1", "target_kind": "flops", "target": 0.5, "macs_before": 10,
        "macs_after": 5, "params_before": 10, "params_after": 6, "flops_reduction": 0.5, "params_reduction": 0.4,
        "widths": {"a": 4}, "seconds": 0.1, "corrections": {}, "surgery": [["a", True, [0]]], "samples": None,
    }
    record = PruningRecord.from_dict(old)
    assert record.metrics_before == {} and record.metrics_after is None
    assert PruningRecord.from_dict(record.to_dict()) == record
