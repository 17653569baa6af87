"""ImageNet-style folders of images (torchvision ``ImageFolder``), or a generated stand-in of the same shape."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from lightning_prune.data._vision import _torchvision, _VisionDataModule

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageNetDataModule"]

#: Per-channel mean and standard deviation of the ImageNet training images (torchvision's values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_OWNER = "ImageNetDataModule"


class ImageNetDataModule(_VisionDataModule):
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

    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    _fake_test_is_val = True

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
        if batch_size < 1 or num_workers < 0 or image_size < 1 or num_classes < 1 or fake_size < 1:
            raise ValueError(
                "need batch_size, image_size, num_classes, fake_size >= 1 and num_workers >= 0, got "
                f"{batch_size}, {image_size}, {num_classes}, {fake_size}, {num_workers}"
            )
        super().__init__(data_dir, batch_size, num_workers, fake, fake_size, seed, eval_batch_size)
        self.image_size = image_size
        self.resize_size = resize_size or round(image_size * 256 / 224)
        self.num_classes = num_classes

    @property
    def fake_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

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
        t = _torchvision(_OWNER).transforms
        normalize = t.Normalize(self.mean, self.std)
        train = t.Compose([t.RandomResizedCrop(self.image_size), t.RandomHorizontalFlip(), t.ToTensor(), normalize])
        evaluation = t.Compose([t.Resize(self.resize_size), t.CenterCrop(self.image_size), t.ToTensor(), normalize])
        return train, evaluation

    def _real_splits(self) -> dict[str, Dataset]:
        self._check_folders()
        folder = _torchvision(_OWNER).datasets.ImageFolder
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
        return {"train": train, "val": val, "test": val}
