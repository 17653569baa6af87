"""Every data-driven criterion through a whole Lightning fit on digits: target met, training goes on."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_prune import StructuredPruningCallback, count_cost
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

CRITERIA = {
    "pls_vip": None,
    "pca_gm": None,
    "di": None,
    "id": None,
    "filter_ensembles": {"max_evaluations": 32, "num_batches": 2, "progress": False},
}


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_fit_on_digits_reaches_target_and_trains_on(criterion):
    L.seed_everything(0)
    x = torch.randn(2, 1, 8, 8)
    model = ImageClassifier(SmallResNet(widths=(16, 32), blocks_per_stage=1), max_epochs=5)
    dense = count_cost(model, x)
    cb = StructuredPruningCallback(
        criterion, target_flops_reduction=0.5, epochs=[1, 2], verbose=False, criterion_kwargs=CRITERIA[criterion]
    )
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    dm = DigitsDataModule()
    trainer.fit(model, dm)
    assert [r.epoch for r in cb.history] == [1, 2]
    assert abs((1 - count_cost(model, x).macs / dense.macs) - 0.5) <= 0.02
    assert trainer.test(model, dm, verbose=False)[0]["test_acc"] > 0.9
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # no collection hook left behind
