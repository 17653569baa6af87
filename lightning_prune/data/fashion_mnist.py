"""Fashion-MNIST (Zalando, 28x28 grey clothes, 10 classes) read from its idx files, or a generated stand-in."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_prune.data._vision import _torchvision, _VisionDataModule

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_SYSTEM_DIR",
    "FashionMNISTDataModule",
    "read_idx",
]

#: Mean and standard deviation of the 60,000 Fashion-MNIST training images' pixels, scaled to
#: [0, 1] (computed from ``train-images-idx3-ubyte.gz``: 0.286041, 0.353024).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

#: Where Debian's ``dataset-fashion-mnist`` package installs the four idx files (gzipped).
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

_FOLDER = "FashionMNIST"  # torchvision's FashionMNIST keeps its files in <root>/FashionMNIST/raw
_NUM_CLASSES = 10
_SIDE = 28
_OWNER = "FashionMNISTDataModule"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SIZES = {"train": 60_000, "test": 10_000}
_IDX_DTYPES: dict[int, np.dtype] = {  # idx type byte -> element type (big-endian)
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format, also Fashion-MNIST's), gzipped (``.gz``) or not.

    The header is two zero bytes, a type code (``0x08``: unsigned byte, ...), the number of
    dimensions, then each dimension as a big-endian 32-bit integer; the data follow, row-major.

    Args:
        path: the file.

    Returns:
        The array, shaped by the header's dimensions (``(60000, 28, 28)`` uint8 for training images).

    Raises:
        ValueError: the file is not an idx file, or is shorter or longer than its header says
            (the message names the file).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"'{path}' is not an idx file (header {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"'{path}' holds {len(raw)} bytes, its idx header {dims} says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class _ImageTransform:
    """uint8 images ``(B, 28, 28)`` -> normalised float32 ``(B, 1, 28, 28)``, a whole batch at once;
    with ``augment``, first a random 28x28 crop of each image zero-padded by ``padding`` pixels and a
    random horizontal flip of each (drawn from torch's global generator, as torchvision's random
    transforms are)."""

    def __init__(self, mean: float, std: float, augment: bool, padding: int = 2) -> None:
        self.mean, self.std, self.augment, self.padding = mean, std, augment, padding

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div_(255.0)
        if self.augment:
            n, p = x.shape[0], self.padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2, n))
            flip = torch.rand(n) < 0.5
            side = torch.arange(_SIDE)
            rows = (top[:, None] + side)[:, :, None]  # (n, 28, 1)
            cols = left[:, None] + torch.where(flip[:, None], side.flip(0), side)  # (n, 28), mirrored where flipped
            x = padded[torch.arange(n)[:, None, None], rows, cols[:, None, :]]
        return ((x - self.mean) / self.std)[:, None]


class _IdxImages(Dataset[tuple[torch.Tensor, int]]):
    """Images kept as one uint8 tensor ``(N, 28, 28)`` and labels ``(N,)``; the loaders fetch whole
    batches (``__getitems__``), transformed at once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: _ImageTransform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index][None])[0], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.transform(self.images[index]).unbind(0), self.labels[index].tolist()))


class FashionMNISTDataModule(_VisionDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 28x28 grey, 10
    classes of clothing (6,000 / 1,000 per class).

    The four idx files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or not) are read
    directly with :func:`read_idx` and kept in memory as uint8 tensors (47 MB); images are scaled
    to [0, 1] and normalised with :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD` per
    sample. Batches are ``(images (N, 1, 28, 28) float32, labels (N,) int64)``.

    The files are looked for, in this order, in ``data_dir/FashionMNIST/raw`` (what torchvision's
    ``FashionMNIST`` downloads), in ``data_dir`` itself, and in ``system_dir`` (default
    :data:`FASHION_MNIST_SYSTEM_DIR`, where Debian/Ubuntu's ``apt-get install
    dataset-fashion-mnist`` puts them); a folder counts only when it holds all four. If none does
    and ``download`` is True, ``prepare_data`` downloads them with torchvision into
    ``data_dir/FashionMNIST/raw``.

    Fashion-MNIST has no official validation set: ``val_split`` images (default 5,000, a twelfth)
    are held out of the training set, chosen by ``seed``, and read without augmentation; the
    other 55,000 are trained on. ``test_dataloader`` is always the 10,000 test images.

    With ``fake=True`` a generated stand-in (:class:`~lightning_prune.data.fake.FakeImageDataset`:
    1x28x28, 10 classes, random labels) replaces every split and nothing is read or downloaded:
    for smoke runs of a configuration.

    Args:
        data_dir: folder holding (or receiving) torchvision's ``FashionMNIST/raw``, or the four idx
            files themselves. Default ``"data"``.
        batch_size: training batch size. Default 128.
        num_workers: loader worker processes. Default 4.
        download: download the data set into ``data_dir`` with torchvision when neither
            ``data_dir`` nor ``system_dir`` holds it (in ``prepare_data``, once per node; needs
            network). Default True.
        system_dir: folder searched after ``data_dir``; None searches only ``data_dir``. Default
            :data:`FASHION_MNIST_SYSTEM_DIR` (``/usr/share/datasets/fashion-mnist``).
        fake: use the generated stand-in instead of Fashion-MNIST. Default False.
        fake_size: training samples of the stand-in; its validation and test sets have
            ``max(1, fake_size // 4)``. Default 1024.
        val_split: training images held out for validation: an int is a count (0 validates on the
            test set), a float in (0, 1) a fraction of the 60,000. Default 5000.
        augment: augment training images: a random 28x28 crop of the image zero-padded by 2 pixels
            and a random horizontal flip. False trains on the images as they are. Default True.
        seed: seed of the training shuffle (reshuffled per epoch, reproducibly), of the
            ``val_split`` split and of the stand-in. Default 0.
        eval_batch_size: batch size of the validation and test loaders. Default: ``batch_size``.

    Raises:
        ValueError: a bad size (``val_split`` negative, a float not below 1, or an int of 60,000 or
            more; ``batch_size`` or ``fake_size`` below 1; negative ``num_workers``), or (in
            ``setup``) an idx file that is truncated or holds another number of images.
        FileNotFoundError: (in ``prepare_data`` with ``download=False``, and in ``setup``) no
            searched folder holds the four files; the message names the folders and both ways to
            get them: ``apt-get install dataset-fashion-mnist`` or ``download=True``.
        RuntimeError: the download failed (no network); the message says what to do instead.
    """

    mean = FASHION_MNIST_MEAN
    std = FASHION_MNIST_STD

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = True,
        system_dir: str | None = FASHION_MNIST_SYSTEM_DIR,
        fake: bool = False,
        fake_size: int = 1024,
        val_split: int | float = 5000,
        augment: bool = True,
        seed: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        if isinstance(val_split, bool) or not (
            (isinstance(val_split, int) and 0 <= val_split < _SIZES["train"])
            or (isinstance(val_split, float) and 0.0 <= val_split < 1.0)
        ):
            raise ValueError(
                f"val_split must be an int in [0, {_SIZES['train']}) (images) or a float in [0, 1) (a fraction), "
                f"got {val_split!r}"
            )
        if batch_size < 1 or num_workers < 0 or fake_size < 1:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0 and fake_size >= 1, got {batch_size}, {num_workers}, {fake_size}"
            )
        super().__init__(data_dir, batch_size, num_workers, fake, fake_size, seed, eval_batch_size)
        self.download = download
        self.system_dir = system_dir
        self.val_split = val_split
        self.augment = augment
        self.num_classes = _NUM_CLASSES

    @property
    def fake_shape(self) -> tuple[int, int, int]:
        return (1, _SIDE, _SIDE)

    @property
    def search_dirs(self) -> list[Path]:
        """The folders searched for the four idx files, in order."""
        folders = [self.root / _FOLDER / "raw", self.root]
        if self.system_dir:
            folders.append(Path(self.system_dir).expanduser())
        return folders

    def find_files(self) -> dict[str, tuple[Path, Path]] | None:
        """``{"train": (images, labels), "test": (images, labels)}`` from the first searched folder
        that holds all four idx files (each gzipped or not), or None."""
        for folder in self.search_dirs:
            found: dict[str, tuple[Path, Path]] = {}
            for split, (images, labels) in _FILES.items():
                pair = _find(folder, images), _find(folder, labels)
                if pair[0] is None or pair[1] is None:
                    break
                found[split] = (pair[0], pair[1])
            else:
                return found
        return None

    def _missing(self) -> FileNotFoundError:
        searched = ", ".join(f"'{folder}'" for folder in self.search_dirs)
        names = ", ".join(f"{name}[.gz]" for pair in _FILES.values() for name in pair)
        return FileNotFoundError(
            f"Fashion-MNIST not found: none of {searched} holds all of {names}. Get it either way: "
            "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (installs the files in "
            f"{FASHION_MNIST_SYSTEM_DIR}, searched by default: --data.system_dir), or pass download=True "
            "(--data.download true: torchvision's downloader, needs network) to download it into data_dir "
            "(--data.data_dir); or pass fake=True (--data.fake true) for a generated stand-in of the same shape"
        )

    def prepare_data(self) -> None:
        if self.fake or self.find_files() is not None:
            return
        if not self.download:
            raise self._missing()
        datasets = _torchvision(_OWNER).datasets
        try:
            for train in (True, False):
                datasets.FashionMNIST(str(self.root), train=train, download=True)
        except Exception as error:
            raise RuntimeError(
                f"could not download Fashion-MNIST into '{self.root}' ({type(error).__name__}: {error}). Without "
                "network access, install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), copy the "
                "four idx files into data_dir (--data.data_dir), or pass fake=True (--data.fake true) for a "
                "generated stand-in"
            ) from error

    def _read(self, split: str, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_idx(images_path), read_idx(labels_path)
        size = _SIZES[split]
        if images.shape != (size, _SIDE, _SIDE) or images.dtype != np.uint8 or labels.shape != (size,):
            raise ValueError(
                f"Fashion-MNIST {split} files '{images_path}' and '{labels_path}' hold images {images.shape} and labels "
                f"{labels.shape}; expected ({size}, {_SIDE}, {_SIDE}) uint8 and ({size},)"
            )
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))

    def _real_splits(self) -> dict[str, Dataset]:
        files = self.find_files()
        if files is None:
            raise self._missing()
        (mean,), (std,) = self.mean, self.std
        evaluation = _ImageTransform(mean, std, augment=False)
        training = _ImageTransform(mean, std, augment=self.augment)
        train_images, train_labels = self._read("train", *files["train"])
        test = _IdxImages(*self._read("test", *files["test"]), evaluation)
        train: Dataset = _IdxImages(train_images, train_labels, training)
        val: Dataset = test
        if isinstance(self.val_split, int):
            held_out = self.val_split
        else:
            held_out = max(1, round(self.val_split * len(train_labels))) if self.val_split > 0 else 0
        if held_out > 0:
            train, val = self._hold_out(train, _IdxImages(train_images, train_labels, evaluation), held_out)
        return {"train": train, "val": val, "test": test}
