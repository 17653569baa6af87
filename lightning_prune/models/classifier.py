"""A plain LightningModule for image classification, with torchmetrics accuracy."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

from lightning_prune.checkpoint import restores_pruned_checkpoints

__all__ = ["ImageClassifier"]


@restores_pruned_checkpoints
class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around any backbone, SGD with momentum and cosine LR.

    Decorated with :func:`~lightning_prune.restores_pruned_checkpoints`: ``load_from_checkpoint``
    of a pruned checkpoint rebuilds the pruned structure
    (``ImageClassifier.load_from_checkpoint(path, net=SmallResNet(...))``).

    Args:
        net: the network (input -> logits).
        num_classes: number of classes.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        max_epochs: length of the cosine schedule (default: the trainer's ``max_epochs``).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        max_epochs: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: Any, metric: torchmetrics.Metric, stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", on_epoch=True, on_step=False)
        self.log(f"{stage}_acc", metric, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(1)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams  # AttributeDict: hyper-parameters by attribute
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {hp.optimizer!r}")
        epochs = hp.max_epochs or (self.trainer.max_epochs if self._trainer is not None else None) or 1
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
