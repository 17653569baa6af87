"""CIFAR-10 (torchvision) with the standard augmentation, or a generated stand-in of the same shape."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from lightning_prune.data._vision import _torchvision, _VisionDataModule

__all__ = ["CIFAR10DataModule", "CIFAR10_MEAN", "CIFAR10_STD"]

#: Per-channel mean and standard deviation of the 50,000 CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_FOLDER = "cifar-10-batches-py"  # what torchvision's CIFAR10 extracts under its root
_NUM_CLASSES = 10
_OWNER = "CIFAR10DataModule"


class CIFAR10DataModule(_VisionDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images, 32x32 RGB, 10 classes.

    Training images get the standard augmentation of the ResNet paper (He et al. 2016): a random
    32x32 crop of the image padded by 4 pixels, a random horizontal flip; every image is
    normalised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`. Batches are
    ``(images (N, 3, 32, 32) float32, labels (N,) int64)``.

    Validation uses the test set by default (``val_split=0``), as the pruning papers report test
    accuracy; ``val_split > 0`` holds out that fraction of the training images instead (seeded,
    without augmentation). ``test_dataloader`` is always the test set.

    With ``fake=True`` a generated stand-in (:class:`~lightning_prune.data.fake.FakeImageDataset`:
    same shapes, 10 classes, random labels) replaces every split and nothing is read or downloaded:
    for smoke runs of a configuration.

    Args:
        data_dir: folder holding (or receiving) torchvision's ``cifar-10-batches-py``. Default ``"data"``.
        batch_size: training batch size. Default 128.
        num_workers: loader worker processes. Default 4.
        download: download the data set into ``data_dir`` when it is missing (in ``prepare_data``,
            once per node). Default True.
        fake: use the generated stand-in instead of CIFAR-10. Default False.
        fake_size: training samples of the stand-in; its validation and test sets have
            ``max(1, fake_size // 4)``. Default 1024.
        val_split: fraction of the training images held out for validation, in [0, 1); 0 (default)
            validates on the test set.
        seed: seed of the training shuffle (reshuffled per epoch, reproducibly), of the
            ``val_split`` split and of the stand-in. Default 0.
        eval_batch_size: batch size of the validation and test loaders. Default: ``batch_size``.

    Raises:
        FileNotFoundError: (in ``prepare_data`` / ``setup``) the data set is missing and
            ``download`` is False; the message names the folder and the switches.
        RuntimeError: the download failed (no network); the message says what to do instead.
    """

    mean = CIFAR10_MEAN
    std = CIFAR10_STD

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = True,
        fake: bool = False,
        fake_size: int = 1024,
        val_split: float = 0.0,
        seed: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split!r}")
        if batch_size < 1 or num_workers < 0 or fake_size < 1:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0 and fake_size >= 1, got {batch_size}, {num_workers}, {fake_size}"
            )
        super().__init__(data_dir, batch_size, num_workers, fake, fake_size, seed, eval_batch_size)
        self.download = download
        self.val_split = val_split
        self.num_classes = _NUM_CLASSES

    @property
    def fake_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _missing(self) -> FileNotFoundError:
        return FileNotFoundError(
            f"CIFAR-10 not found: '{self.root / _FOLDER}' does not exist. Pass download=True "
            "(--data.download true) to download it into data_dir, point data_dir (--data.data_dir) at the folder "
            f"that holds '{_FOLDER}', or pass fake=True (--data.fake true) for a generated stand-in of the same shape"
        )

    def prepare_data(self) -> None:
        if self.fake or (self.root / _FOLDER).is_dir():
            return
        if not self.download:
            raise self._missing()
        datasets = _torchvision(_OWNER).datasets
        try:
            for train in (True, False):
                datasets.CIFAR10(str(self.root), train=train, download=True)
        except Exception as error:
            raise RuntimeError(
                f"could not download CIFAR-10 into '{self.root}' ({type(error).__name__}: {error}). Without network "
                f"access, copy the extracted '{_FOLDER}' folder there (--data.data_dir), or pass fake=True "
                "(--data.fake true) for a generated stand-in"
            ) from error

    def _transforms(self) -> tuple[Any, Any]:
        t = _torchvision(_OWNER).transforms
        normalize = t.Normalize(self.mean, self.std)
        train = t.Compose([t.RandomCrop(32, padding=4), t.RandomHorizontalFlip(), t.ToTensor(), normalize])
        return train, t.Compose([t.ToTensor(), normalize])

    def _real_splits(self) -> dict[str, Dataset]:
        if not (self.root / _FOLDER).is_dir():
            raise self._missing()
        cifar = _torchvision(_OWNER).datasets.CIFAR10
        train_tf, eval_tf = self._transforms()
        root = str(self.root)
        test = cifar(root, train=False, transform=eval_tf)
        train = cifar(root, train=True, transform=train_tf)
        val: Dataset = test
        if self.val_split > 0:
            held_out = max(1, round(self.val_split * len(train)))
            train, val = self._hold_out(train, cifar(root, train=True, transform=eval_tf), held_out)
        return {"train": train, "val": val, "test": test}
