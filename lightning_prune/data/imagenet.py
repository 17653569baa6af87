"""ImageNet-style folders of images (torchvision ``ImageFolder``), or a generated stand-in of the same shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_prune.data.digits import EpochShuffle
from lightning_prune.data.fake import FakeImageDataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageNetDataModule"]

#: Per-channel mean and standard deviation of the ImageNet training images (torchvision's values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as error:  # pragma: no cover - torchvision is installed with the test extra
        raise ImportError("ImageNetDataModule needs torchvision: pip install torchvision (or use fake=True)") from error
    return torchvision


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet (ILSVRC-2012) or any data set laid out as ``data_dir/train/<class>/<image>`` and
    ``data_dir/val/<class>/<image>``, read with torchvision's ``ImageFolder``.

    ImageNet cannot be downloaded automatically (it needs an account at image-net.org); its
    validation images must be sorted into one folder per class, as for torchvision's reference
    scripts. Transforms are the standard ones: training ``RandomResizedCrop(image_size)`` and a
    random horizontal flip; evaluation ``Resize(resize_size)`` then ``CenterCrop(image_size)``;
    both normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`. Batches are
    ``(images (N, 3, image_size, image_size) float32, labels (N,) int64)``. Validation and test
    both read ``val/`` (ImageNet's test labels are not public).

    With ``fake=True`` a generated stand-in (:class:`~lightning_prune.data.fake.FakeImageDataset`:
    ``image_size`` images, ``num_classes`` classes, random labels) replaces every split and nothing
    is read: for smoke runs of a configuration (a small ``image_size`` makes them fast).

    Args:
        data_dir: folder with ``train/`` and ``val/``. Default ``"data/imagenet"``.
        batch_size: training batch size. Default 256.
        num_workers: loader worker processes. Default 8.
        image_size: side of the (cropped) images the model sees. Default 224.
        resize_size: side the shorter edge is resized to before the evaluation centre crop.
            Default: ``image_size * 256 / 224`` rounded (256 for 224).
        num_classes: number of classes; the folders must hold exactly this many. Default 1000.
        fake: use the generated stand-in instead of the folders. Default False.
        fake_size: training samples of the stand-in; its validation and test sets have
            ``max(1, fake_size // 4)``. Default 1024.
        seed: seed of the training shuffle (reshuffled per epoch, reproducibly) and of the
            stand-in. Default 0.
        eval_batch_size: batch size of the validation and test loaders. Default: ``batch_size``.

    Raises:
        FileNotFoundError: (in ``prepare_data`` / ``setup``) ``train/`` or ``val/`` is missing; the
            message names the folder and the ``fake`` switch.
        ValueError: the folders hold another number of classes than ``num_classes``, or ``train/``
            and ``val/`` name different classes.
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int | None = None,
        num_classes: int = 1000,
        fake: bool = False,
        fake_size: int = 1024,
        seed: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or image_size < 1 or num_classes < 1 or fake_size < 1:
            raise ValueError(
                "need batch_size, image_size, num_classes, fake_size >= 1 and num_workers >= 0, got "
                f"{batch_size}, {image_size}, {num_classes}, {fake_size}, {num_workers}"
            )
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.resize_size = resize_size or round(image_size * 256 / 224)
        self.num_classes = num_classes
        self.fake = fake
        self.fake_size = fake_size
        self.seed = seed
        self.eval_batch_size = eval_batch_size or batch_size
        self._splits: dict[str, Dataset] = {}

    @property
    def root(self) -> Path:
        """The folder holding ``train/`` and ``val/``."""
        return Path(self.data_dir).expanduser()

    def _check_folders(self) -> None:
        for split in ("train", "val"):
            folder = self.root / split
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"ImageNet folder not found: '{folder}' does not exist. ImageNetDataModule expects "
                    f"'{self.root}/train/<class>/<image>' and '{self.root}/val/<class>/<image>' (ImageNet cannot be "
                    "downloaded automatically: get ILSVRC-2012 from image-net.org and sort val/ into class folders). "
                    "Point data_dir (--data.data_dir) at it, or pass fake=True (--data.fake true) for a generated "
                    "stand-in of the same shape"
                )

    def prepare_data(self) -> None:
        if not self.fake:
            self._check_folders()

    def _transforms(self) -> tuple[Any, Any]:
        t = _torchvision().transforms
        normalize = t.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train = t.Compose([t.RandomResizedCrop(self.image_size), t.RandomHorizontalFlip(), t.ToTensor(), normalize])
        evaluation = t.Compose([t.Resize(self.resize_size), t.CenterCrop(self.image_size), t.ToTensor(), normalize])
        return train, evaluation

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        if self.fake:
            held_out = max(1, self.fake_size // 4)
            shape = (3, self.image_size, self.image_size)
            self._splits = {
                "train": FakeImageDataset(self.fake_size, shape, self.num_classes, seed=self.seed),
                "val": FakeImageDataset(held_out, shape, self.num_classes, seed=self.seed + 1),
            }
            self._splits["test"] = self._splits["val"]
            return
        self._check_folders()
        folder = _torchvision().datasets.ImageFolder
        train_tf, eval_tf = self._transforms()
        train = folder(str(self.root / "train"), transform=train_tf)
        val = folder(str(self.root / "val"), transform=eval_tf)
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"'{self.root / 'train'}' holds {len(train.classes)} class folders but num_classes={self.num_classes}; "
                "pass --data.num_classes (and the model's num_classes) to match"
            )
        if val.classes != train.classes:
            missing = sorted(set(train.classes) ^ set(val.classes))[:5]
            raise ValueError(
                f"'{self.root / 'train'}' and '{self.root / 'val'}' hold different class folders (e.g. {missing}); "
                "the labels would not match"
            )
        self._splits = {"train": train, "val": val, "test": val}

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self._splits[split]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,  # type: ignore[arg-type]
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
