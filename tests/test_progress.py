"""Progress output follows the Trainer: no bar with enable_progress_bar=False, a bar otherwise."""

from __future__ import annotations

import lightning as L
import pytest
import tqdm.auto
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_prune import StructuredPruningCallback
from lightning_prune._progress import trainer_progress
from lightning_prune.data import DigitsDataModule
from lightning_prune.engine.protocol import no_progress, tqdm_progress
from lightning_prune.models import ImageClassifier, SmallResNet


class _CountingTqdm(tqdm.auto.tqdm):
    made: list[str] = []

    def __init__(self, *args, **kwargs):
        _CountingTqdm.made.append(kwargs.get("desc", ""))
        super().__init__(*args, **kwargs)


def _fit(criterion: str, enable_progress_bar: bool, kwargs=None) -> None:
    L.seed_everything(0)
    model = ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1), max_epochs=1)
    callback = StructuredPruningCallback(criterion, target_flops_reduction=0.3, prune_on_train_start=True, verbose=False,
                                         collect_batches=2, criterion_kwargs=kwargs)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=enable_progress_bar,
                        # the tqdm bar named: Lightning's default is the rich one whenever rich is installed
                        callbacks=[callback] + ([TQDMProgressBar()] if enable_progress_bar else []))
    trainer.fit(model, DigitsDataModule())


@pytest.mark.parametrize("criterion,kwargs,desc", [
    ("pca_gm", None, "lightning-prune: collecting activations"),
    ("filter_ensembles", {"max_evaluations": 8, "num_batches": 1}, "lightning-prune: filter ensembles"),
])
def test_pruning_work_shows_a_bar_only_when_the_trainer_does(monkeypatch, criterion, kwargs, desc):
    monkeypatch.setattr(tqdm.auto, "tqdm", _CountingTqdm)
    _CountingTqdm.made = []
    _fit(criterion, enable_progress_bar=False, kwargs=kwargs)
    assert not [d for d in _CountingTqdm.made if d.startswith("lightning-prune")]
    _fit(criterion, enable_progress_bar=True, kwargs=kwargs)
    assert desc in _CountingTqdm.made


def test_trainer_progress_follows_the_progress_bar_callback():
    assert trainer_progress(L.Trainer(enable_progress_bar=False, logger=False)) is no_progress
    assert trainer_progress(L.Trainer(callbacks=[TQDMProgressBar()], logger=False)) is tqdm_progress
    rich = trainer_progress(L.Trainer(callbacks=[RichProgressBar()], logger=False))
    assert rich is not tqdm_progress and rich is not no_progress
    with rich(3, "lightning-prune: test") as advance:  # a rich bar that runs
        advance(3)
