"""scikit-learn's handwritten digits (1,797 8x8 images, shipped with scikit-learn) as a DataModule."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.data._vision import EpochShuffle  # re-exported: it lived here first

__all__ = ["DigitsDataModule", "EpochShuffle"]


class DigitsDataModule(pl.LightningDataModule):
    """Digits split into train / val / test (stratified, seeded), images scaled to [0, 1].

    Batches are ``(images (N, 1, 8, 8) float32, labels (N,) int64)``.

    Args:
        batch_size: training batch size.
        val_fraction / test_fraction: shares of the 1,797 images held out.
        seed: seed of the split and of the training shuffle (reshuffled per epoch, reproducibly).
        repeat: repeat the training set this many times per epoch (a larger data set for
            memory and speed measurements).
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        repeat: int = 1,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.repeat = repeat
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None]
        y = digits.target.astype(np.int64)
        held = self.val_fraction + self.test_fraction
        x_tr, x_ho, y_tr, y_ho = train_test_split(x, y, test_size=held, stratify=y, random_state=self.seed)
        x_va, x_te, y_va, y_te = train_test_split(
            x_ho, y_ho, test_size=self.test_fraction / held, stratify=y_ho, random_state=self.seed
        )
        if self.repeat > 1:
            x_tr, y_tr = np.concatenate([x_tr] * self.repeat), np.concatenate([y_tr] * self.repeat)
        self._splits = {
            "train": TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
            "val": TensorDataset(torch.from_numpy(x_va), torch.from_numpy(y_va)),
            "test": TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        }

    def train_dataloader(self) -> DataLoader:
        train = self._splits["train"]
        return DataLoader(train, batch_size=self.batch_size, sampler=EpochShuffle(len(train), self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["val"], batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=256)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
