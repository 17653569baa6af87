"""What the image data modules share: the per-epoch shuffle, the ``fake`` stand-in, the held-out
validation split, the loaders and the torchvision import."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lightning_prune.data.fake import FakeImageDataset

__all__ = ["EpochShuffle"]


class EpochShuffle(Sampler[int]):
    """A shuffle seeded by ``seed + epoch`` (Lightning calls ``set_epoch``): a resumed fit sees the
    same order in each epoch as an uninterrupted one."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """``size``, ``seed`` and ``epoch``: all the order depends on."""
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what :meth:`state_dict` returned (the next ``__iter__`` gives the saved epoch's order)."""
        self.size, self.seed, self.epoch = int(state["size"]), int(state["seed"]), int(state["epoch"])

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


def _torchvision(owner: str) -> Any:
    try:
        import torchvision
    except ImportError as error:  # pragma: no cover - torchvision is installed with the test extra
        raise ImportError(f"{owner} needs torchvision: pip install torchvision (or use fake=True)") from error
    return torchvision


def _split_order(size: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation of ``range(size)`` cut in two: ``held_out`` validation indices, the rest for training."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:held_out], order[held_out:]


class _VisionDataModule(pl.LightningDataModule):
    """Base of the image data modules (not public): subclasses say how to build the real splits.

    A subclass sets :attr:`num_classes` (in ``__init__`` or as a class attribute), gives the
    stand-in's image shape (:attr:`fake_shape`), and implements :meth:`_real_splits` (the
    ``train`` / ``val`` / ``test`` datasets read from disk, raising when they are missing) and
    usually ``prepare_data`` (download or check). The base holds the common arguments, builds the
    ``fake`` stand-in (:class:`~lightning_prune.data.fake.FakeImageDataset`: training ``fake_size``
    samples, validation and test ``max(1, fake_size // 4)``), the seeded held-out validation split
    (:meth:`_hold_out`) and the loaders (training reshuffled per epoch by :class:`EpochShuffle`,
    evaluation in order). ``setup`` builds the splits once.
    """

    #: Per-channel mean and standard deviation the images are normalised with (subclasses set them).
    mean: ClassVar[tuple[float, ...]] = ()
    std: ClassVar[tuple[float, ...]] = ()
    #: The stand-in's test split is its validation split (ImageNet: validation and test both read ``val/``).
    _fake_test_is_val: ClassVar[bool] = False

    num_classes: int

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        num_workers: int,
        fake: bool,
        fake_size: int,
        seed: int,
        eval_batch_size: int | None,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.fake = fake
        self.fake_size = fake_size
        self.seed = seed
        self.eval_batch_size = eval_batch_size or batch_size
        self._splits: dict[str, Dataset] = {}

    @property
    def root(self) -> Path:
        """``data_dir`` with ``~`` expanded: the folder the data set's files are looked for in."""
        return Path(self.data_dir).expanduser()

    @property
    def fake_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the stand-in's images (the real images' shape after the transforms)."""
        raise NotImplementedError

    def _real_splits(self) -> dict[str, Dataset]:
        """The ``train``, ``val`` and ``test`` datasets read from disk (raising when they are missing)."""
        raise NotImplementedError

    def _fake_splits(self) -> dict[str, Dataset]:
        held_out = max(1, self.fake_size // 4)
        shape = self.fake_shape
        splits: dict[str, Dataset] = {
            "train": FakeImageDataset(self.fake_size, shape, self.num_classes, seed=self.seed),
            "val": FakeImageDataset(held_out, shape, self.num_classes, seed=self.seed + 1),
        }
        splits["test"] = (
            splits["val"] if self._fake_test_is_val else FakeImageDataset(held_out, shape, self.num_classes, seed=self.seed + 2)
        )
        return splits

    def _hold_out(self, train: Dataset, val_source: Dataset, held_out: int) -> tuple[Subset, Subset]:
        """Split the training images: ``held_out`` of them (seeded by ``seed``) read from
        ``val_source`` (the same images with the evaluation transform), the others from ``train``.

        Returns:
            ``(train subset, validation subset)``; their ``indices`` are disjoint and cover ``train``.
        """
        val_indices, train_indices = _split_order(len(train), held_out, self.seed)  # type: ignore[arg-type]  # map-style datasets have len
        return Subset(train, train_indices), Subset(val_source, val_indices)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        self._splits = self._fake_splits() if self.fake else self._real_splits()

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self._splits[split]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,  # type: ignore[arg-type]  # map-style: has len
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
