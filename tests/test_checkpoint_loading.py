"""Pruned checkpoints loaded through ckpt_path (validate/test/predict with the callback in the Trainer) and
load_from_checkpoint (decorated and undecorated classes)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_prune import StructuredPruningCallback, load_pruned, restores_pruned_checkpoints
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

_QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}
_EVAL = {**_QUIET, "enable_checkpointing": False}


def _net():
    return SmallResNet(widths=(8, 16), blocks_per_stage=1)


def _model():
    return ImageClassifier(_net(), max_epochs=4)


def _pruning(epochs):
    return StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=epochs, verbose=False)


def _fit(tmp_path, callbacks, max_epochs):
    L.seed_everything(0)
    model = _model()
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, limit_train_batches=3, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, **_QUIET)
    trainer.fit(model, DigitsDataModule())
    return trainer, model


@pytest.fixture(scope="module")
def pruned_checkpoints(tmp_path_factory):
    """One fit with steps at the end of epochs 0 and 1: the files of epoch 0 (one step) and 1 (two steps)."""
    tmp_path = tmp_path_factory.mktemp("pruned")
    checkpointing = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    _fit(tmp_path, [_pruning(epochs=[0, 1]), checkpointing], max_epochs=2)
    return {"one_step": tmp_path / "epoch=0.ckpt", "two_steps": tmp_path / "epoch=1.ckpt"}


def test_validate_test_predict_with_ckpt_path_restore_the_pruned_structure(pruned_checkpoints):
    path = pruned_checkpoints["two_steps"]
    reference = load_pruned(ImageClassifier, path, net=_net())
    expected_val = L.Trainer(**_EVAL).validate(reference, DigitsDataModule(), verbose=False)[0]
    expected_test = L.Trainer(**_EVAL).test(reference, DigitsDataModule(), verbose=False)[0]
    expected_pred = torch.cat(L.Trainer(**_EVAL).predict(reference, DigitsDataModule()))

    def trainer():
        return L.Trainer(callbacks=[_pruning(epochs=[0, 1])], **_EVAL)

    assert trainer().validate(_model(), DigitsDataModule(), ckpt_path=path, verbose=False)[0] == expected_val
    assert trainer().test(_model(), DigitsDataModule(), ckpt_path=path, verbose=False)[0] == expected_test
    predictions = trainer().predict(_model(), DigitsDataModule(), ckpt_path=path)
    assert torch.equal(torch.cat(predictions), expected_pred)


def test_ckpt_path_replays_only_the_steps_the_model_lacks(pruned_checkpoints):
    model = load_pruned(ImageClassifier, pruned_checkpoints["one_step"], net=_net())
    expected = L.Trainer(**_EVAL).validate(
        load_pruned(ImageClassifier, pruned_checkpoints["two_steps"], net=_net()), DigitsDataModule(), verbose=False
    )
    trainer = L.Trainer(callbacks=[_pruning(epochs=[0, 1])], **_EVAL)
    assert trainer.validate(model, DigitsDataModule(), ckpt_path=pruned_checkpoints["two_steps"], verbose=False) == expected


def test_a_module_pruned_further_than_the_checkpoint_names_load_pruned(pruned_checkpoints):
    model = load_pruned(ImageClassifier, pruned_checkpoints["two_steps"], net=_net())
    trainer = L.Trainer(callbacks=[_pruning(epochs=[0, 1])], **_EVAL)
    with pytest.raises(ValueError, match="load_pruned"):
        trainer.validate(model, DigitsDataModule(), ckpt_path=pruned_checkpoints["one_step"], verbose=False)


def test_a_dense_checkpoint_into_a_pruned_module_names_load_pruned(tmp_path):
    """E.g. ckpt_path="best" after a fit whose best file was written before the first step."""
    checkpointing = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer, model = _fit(tmp_path, [_pruning(epochs=[1]), checkpointing], max_epochs=2)
    with pytest.raises(ValueError, match="load_pruned"):
        trainer.validate(model, DigitsDataModule(), ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)


def test_image_classifier_load_from_checkpoint_equals_load_pruned(pruned_checkpoints):
    path = pruned_checkpoints["two_steps"]
    loaded = ImageClassifier.load_from_checkpoint(path, net=_net(), weights_only=True).eval()
    reference = load_pruned(ImageClassifier, path, net=_net())
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), reference(x))


class _Undecorated(L.LightningModule):
    """A plain LightningModule, not decorated (like a user's own)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_undecorated_module_load_from_checkpoint_fails_as_lightning_does_and_decorating_fixes_it(tmp_path):
    """No library code runs in load_from_checkpoint of an undecorated class: torch's size mismatch (documented in
    the README, with load_pruned and restores_pruned_checkpoints as the ways out)."""
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=1, callbacks=[_pruning(epochs=[0])], limit_train_batches=2, **_EVAL)
    model = _Undecorated(_net())
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _Undecorated.load_from_checkpoint(path, net=_net(), weights_only=True)

    decorated = restores_pruned_checkpoints(type("Decorated", (_Undecorated,), {}))
    loaded = decorated.load_from_checkpoint(path, net=_net(), weights_only=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert load_pruned(_Undecorated, path, net=_net()).state_dict().keys() == loaded.state_dict().keys()
