"""FashionMNISTDataModule: the real idx files (Debian's ``dataset-fashion-mnist``), the layouts it
searches, the seeded split, the per-epoch shuffle across a resume, the missing-data error, the
stand-in, and the ``lightning-prune`` command line.

The real-data tests take the files from the ``fashion_mnist_dir`` fixture (tests/conftest.py): in
CI (``CI=true``) missing files fail them, elsewhere they are skipped naming the apt package.
Expected values are computed here from the raw gzip files with NumPy, not through the module.
"""

from __future__ import annotations

import gzip
import urllib.error
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

from lightning_prune import count_cost
from lightning_prune.cli import main
from lightning_prune.data import FashionMNISTDataModule
from lightning_prune.data import fashion_mnist as fm
from lightning_prune.data.digits import EpochShuffle as DigitsEpochShuffle
from lightning_prune.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, read_idx
from lightning_prune.models import ImageClassifier

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist_resnet20_l1.yaml"
_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _raw(folder: Path, name: str, header: int) -> np.ndarray:
    """A gzipped idx file's payload, read without the module (the header length is given here)."""
    return np.frombuffer(gzip.open(folder / f"{name}.gz").read(), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def raw(fashion_mnist_dir):
    return {
        "train_images": _raw(fashion_mnist_dir, _NAMES[0], 16).reshape(60000, 28, 28),
        "train_labels": _raw(fashion_mnist_dir, _NAMES[1], 8),
        "test_images": _raw(fashion_mnist_dir, _NAMES[2], 16).reshape(10000, 28, 28),
        "test_labels": _raw(fashion_mnist_dir, _NAMES[3], 8),
    }


@pytest.fixture
def cached_reads(monkeypatch):
    """Each idx file decompressed once per test: several modules set up on the same files stay fast."""
    cache: dict[Path, np.ndarray] = {}
    original = fm.read_idx

    def cached(path):
        path = Path(path).resolve()
        if path not in cache:
            cache[path] = original(path)
        return cache[path]

    monkeypatch.setattr(fm, "read_idx", cached)
    return cache


def _module(system_dir, tmp_path, **kwargs) -> FashionMNISTDataModule:
    kwargs.setdefault("num_workers", 0)
    dm = FashionMNISTDataModule(str(tmp_path / "empty"), system_dir=str(system_dir), download=False, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _normalised(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255)[:, None]
    return (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]


# ------------------------------------------------------------------------------------ real files
def test_reads_the_real_files_counts_shapes_labels_and_normalisation(fashion_mnist_dir, raw, tmp_path):
    # the raw files themselves: 60,000 / 10,000 images, 6,000 / 1,000 per class
    assert np.bincount(raw["train_labels"], minlength=10).tolist() == [6000] * 10
    assert np.bincount(raw["test_labels"], minlength=10).tolist() == [1000] * 10
    # the hard-coded statistics are the training pixels' (to the 4 digits given)
    pixels = raw["train_images"].astype(np.float64) / 255
    assert FASHION_MNIST_MEAN[0] == pytest.approx(pixels.mean(), abs=5e-5)
    assert FASHION_MNIST_STD[0] == pytest.approx(pixels.std(), abs=5e-5)

    dm = _module(fashion_mnist_dir, tmp_path, val_split=0, batch_size=256)
    train, val, test = (dm._splits[s] for s in ("train", "val", "test"))
    assert (len(train), len(test)) == (60000, 10000) and val is test
    assert np.bincount(train.labels.numpy(), minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.labels.numpy(), minlength=10).tolist() == [1000] * 10
    assert np.array_equal(train.labels.numpy(), raw["train_labels"]) and np.array_equal(test.labels.numpy(), raw["test_labels"])
    assert train.images.dtype == torch.uint8 and np.array_equal(train.images.numpy(), raw["train_images"])

    image, label = test[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == raw["test_labels"][7]
    assert torch.allclose(image, _normalised(raw["test_images"][7:8])[0], atol=1e-6)
    images, labels = next(iter(dm.test_dataloader()))  # batches are fetched and transformed whole
    assert images.shape == (256, 1, 28, 28) and labels.dtype == torch.int64
    assert torch.allclose(images, _normalised(raw["test_images"][:256]), atol=1e-6)
    assert torch.equal(labels, torch.from_numpy(raw["test_labels"][:256].astype(np.int64)))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (256, 1, 28, 28) and images.dtype == torch.float32 and int(labels.max()) < 10


def test_training_augmentation_is_a_padded_crop_and_flip(fashion_mnist_dir, raw, tmp_path, cached_reads):
    dm = _module(fashion_mnist_dir, tmp_path, val_split=0)
    train = dm._splits["train"]
    draws = torch.stack([train[3][0] for _ in range(16)])
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # every draw is one of the 5 x 5 shifts of the zero-padded image, mirrored or not
    padded = np.pad(raw["train_images"][3], 2)
    candidates = [padded[t : t + 28, s : s + 28] for t in range(5) for s in range(5)]
    candidates = _normalised(np.stack(candidates + [c[:, ::-1] for c in candidates]))
    for draw in draws:
        assert (candidates - draw).abs().amax(dim=(1, 2, 3)).min() < 1e-6
    plain = _module(fashion_mnist_dir, tmp_path, val_split=0, augment=False)._splits["train"]
    assert torch.equal(plain[3][0], plain[3][0])
    assert torch.allclose(plain[3][0], _normalised(raw["train_images"][3:4])[0], atol=1e-6)


def test_torchvision_layout_plain_files_and_the_search_order(fashion_mnist_dir, raw, tmp_path, cached_reads):
    # torchvision's layout, two files un-gzipped: read without the system folder
    folder = tmp_path / "data" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for name in _NAMES[:2]:
        (folder / f"{name}.gz").symlink_to(fashion_mnist_dir / f"{name}.gz")
    for name in _NAMES[2:]:
        (folder / name).write_bytes(gzip.open(fashion_mnist_dir / f"{name}.gz").read())
    dm = FashionMNISTDataModule(str(tmp_path / "data"), num_workers=0, download=False, system_dir=None, val_split=0)
    assert dm.find_files()["test"] == (folder / _NAMES[2], folder / _NAMES[3])
    dm.setup("fit")
    assert len(dm._splits["train"]) == 60000 and np.array_equal(dm._splits["test"].images.numpy(), raw["test_images"])

    # the four files directly in data_dir; data_dir comes before the system folder
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in _NAMES:
        (flat / f"{name}.gz").symlink_to(fashion_mnist_dir / f"{name}.gz")
    dm = FashionMNISTDataModule(str(flat), system_dir=str(fashion_mnist_dir))
    assert dm.search_dirs == [flat / "FashionMNIST" / "raw", flat, fashion_mnist_dir]
    assert dm.find_files()["train"][0] == flat / f"{_NAMES[0]}.gz"
    # an incomplete folder does not count: the next one is used
    (flat / f"{_NAMES[3]}.gz").unlink()
    assert dm.find_files()["train"][0] == fashion_mnist_dir / f"{_NAMES[0]}.gz"


def test_download_goes_through_torchvision_into_its_layout(fashion_mnist_dir, tmp_path, monkeypatch, cached_reads):
    calls = []

    class FakeDownloader:  # torchvision's FashionMNIST(download=True): files into <root>/FashionMNIST/raw
        def __init__(self, root, train=True, download=False, **kwargs):
            calls.append((root, train, download))
            folder = Path(root) / "FashionMNIST" / "raw"
            folder.mkdir(parents=True, exist_ok=True)
            for name in _NAMES[:2] if train else _NAMES[2:]:
                (folder / f"{name}.gz").symlink_to(fashion_mnist_dir / f"{name}.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownloader)
    dm = FashionMNISTDataModule(str(tmp_path), num_workers=0, system_dir=None)
    dm.prepare_data()
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    dm.prepare_data()  # found now: no second download
    assert len(calls) == 2
    dm.setup("fit")
    assert (len(dm._splits["train"]), len(dm._splits["val"])) == (55000, 5000)


# ------------------------------------------------------------------------------------- the split
def test_validation_split_is_seeded_disjoint_and_covering(fashion_mnist_dir, raw, tmp_path, cached_reads):
    def split(**kwargs):
        dm = _module(fashion_mnist_dir, tmp_path, **kwargs)
        return dm._splits["train"], dm._splits["val"]

    train, val = split(seed=0)
    assert (len(train), len(val)) == (55000, 5000)  # default: 5,000 held out
    assert set(val.indices).isdisjoint(train.indices) and set(val.indices) | set(train.indices) == set(range(60000))
    again_train, again_val = split(seed=0)
    assert again_val.indices == val.indices and again_train.indices == train.indices
    other_train, other_val = split(seed=1)
    assert other_val.indices != val.indices and set(other_val.indices) != set(val.indices)
    assert set(other_val.indices).isdisjoint(other_train.indices) and len(set(other_val.indices) | set(other_train.indices)) == 60000
    # held-out images are the raw training images, unaugmented
    image, label = val[0]
    assert label == raw["train_labels"][val.indices[0]] and torch.equal(val[0][0], image)
    assert torch.allclose(image, _normalised(raw["train_images"][val.indices[0] : val.indices[0] + 1])[0], atol=1e-6)
    # a fraction, and the test set as validation
    assert len(split(val_split=0.1)[1]) == 6000
    _, test_as_val = split(val_split=0)
    assert len(test_as_val) == 10000


@pytest.mark.parametrize("bad", [-1, 60000, 1.0, -0.5, True])
def test_bad_val_split_is_refused(bad):
    with pytest.raises(ValueError, match="val_split"):
        FashionMNISTDataModule(val_split=bad)


# ------------------------------------------------------------------------------- epoch shuffle
def _order(dm: FashionMNISTDataModule, epoch: int) -> list[int]:
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_shuffle_is_reproducible_and_survives_a_state_dict_round_trip(tmp_path):
    def module(seed):
        dm = FashionMNISTDataModule(str(tmp_path), num_workers=0, fake=True, fake_size=64, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = module(0), module(0), module(1)
    assert isinstance(a.train_dataloader().sampler, DigitsEpochShuffle)  # the shared sampler, still importable from digits
    assert _order(a, 0) == _order(b, 0) and _order(a, 3) == _order(b, 3)
    assert _order(a, 0) != _order(a, 1) and _order(a, 0) != _order(c, 0)
    assert sorted(_order(a, 2)) == list(range(64))
    assert _order(a, 0) == _order(a, 0)  # the order of an epoch does not depend on how often it was drawn

    sampler = a.train_dataloader().sampler
    sampler.set_epoch(5)
    state = sampler.state_dict()
    assert state == {"size": 64, "seed": 0, "epoch": 5}
    fresh = module(0).train_dataloader().sampler
    assert list(fresh) != list(sampler)
    fresh.load_state_dict(state)
    assert list(fresh) == list(sampler) == _order(b, 5)


class _SeenBatches(L.Callback):
    """The stand-in's images are fixed per index: their sums name the samples each epoch saw, in order."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch[0].flatten(1).sum(1).tolist())


def test_a_resumed_fit_sees_the_same_order_as_an_uninterrupted_one(tmp_path):
    def fit(max_epochs, ckpt=None):
        L.seed_everything(0)
        seen = _SeenBatches()
        trainer = L.Trainer(
            max_epochs=max_epochs, accelerator="cpu", callbacks=[seen], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3, limit_val_batches=1,
            num_sanity_val_steps=0, default_root_dir=tmp_path,
        )  # fmt: skip
        model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), max_epochs=3)
        dm = FashionMNISTDataModule(str(tmp_path / "absent"), batch_size=4, num_workers=0, fake=True, fake_size=32, seed=7)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return trainer, seen.seen

    _, whole = fit(3)
    assert len(whole) == 3 and whole[0] != whole[1] != whole[2]
    trainer, first = fit(2)
    path = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(path)
    _, resumed = fit(3, ckpt=str(path))
    assert first == {0: whole[0], 1: whole[1]} and resumed == {2: whole[2]}
    assert not (tmp_path / "absent").exists()


# ------------------------------------------------------------------------- missing data, fake
def test_missing_data_fails_in_setup_naming_both_ways(tmp_path):
    nowhere, nosystem = tmp_path / "nowhere", tmp_path / "no-system"
    for download in (False, True):  # setup never downloads: prepare_data does
        dm = FashionMNISTDataModule(str(nowhere), download=download, system_dir=str(nosystem))
        calls = [dm.prepare_data, dm.setup] if not download else [dm.setup]
        for call in calls:
            with pytest.raises(FileNotFoundError) as error:
                call()
            text = str(error.value)
            assert "apt-get install dataset-fashion-mnist" in text
            assert "download=True" in text and "--data.download true" in text and "--data.fake true" in text
            assert str(nowhere / "FashionMNIST" / "raw") in text and str(nosystem) in text
    assert not nowhere.exists()


def test_download_failure_names_the_apt_package(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(RuntimeError, match=r"could not download Fashion-MNIST.*no network.*apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(str(tmp_path), system_dir=None, download=True).prepare_data()


def test_fake_stand_in_needs_no_files(tmp_path):
    missing = tmp_path / "absent"
    dm = FashionMNISTDataModule(str(missing), batch_size=4, num_workers=0, fake=True, fake_size=12, system_dir=str(missing))
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 28, 28) and labels.dtype == torch.int64 and int(labels.max()) < 10
    assert len(dm.train_dataloader().dataset) == 12 and len(dm.val_dataloader().dataset) == 3
    assert len(dm.test_dataloader().dataset) == 3 and dm.num_classes == 10
    assert not missing.exists()


def test_read_idx_checks_the_header_and_the_length(tmp_path):
    good = tmp_path / "a-idx3-ubyte"
    good.write_bytes(bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6)))
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    zipped = tmp_path / "a-idx3-ubyte.gz"
    zipped.write_bytes(gzip.compress(good.read_bytes()))
    assert read_idx(zipped).tolist() == [[0, 1, 2], [3, 4, 5]]
    short = tmp_path / "short"
    short.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match="its idx header"):
        read_idx(short)
    text = tmp_path / "text"
    text.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(text)


# ------------------------------------------------------------------------------- command line
_FAST = [
    "--data.fake=true",
    "--data.fake_size=16",
    "--data.batch_size=4",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _program_name_only(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-prune"])


def test_the_command_line_prunes_on_the_fashion_mnist_stand_in(tmp_path):
    cli = main(
        [
            "fit",
            "--model=lightning_prune.models.ImageClassifier",
            "--model.net=lightning_prune.models.CifarResNet",
            "--model.net.depth=8",
            "--model.net.in_channels=1",
            "--data", "lightning_prune.data.FashionMNISTDataModule",
            "--data.fake", "true",
            *_FAST,
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--pruning.criterion=l1",
            "--pruning.target_flops_reduction=0.3",
            "--pruning.epochs=[0]",
        ],
        return_cli=True,
    )  # fmt: skip
    assert cli is not None and isinstance(cli.datamodule, FashionMNISTDataModule) and cli.datamodule.fake
    callback = cli.pruning
    assert callback is not None and len(callback.history) == 1 and cli.trainer.current_epoch == 2
    assert callback.history[0].flops_reduction == pytest.approx(0.3, abs=0.03)
    x = next(iter(cli.datamodule.val_dataloader()))[0]
    assert x.shape == (4, 1, 28, 28) and cli.model.eval()(x).shape == (4, 10)


def test_val_split_from_the_command_line_is_a_count_or_a_fraction():
    base = ["--model=lightning_prune.models.ImageClassifier", "--model.net=lightning_prune.models.CifarResNet",
            "--data=lightning_prune.data.FashionMNISTDataModule", "--trainer.logger=false",
            "--pruning.target_flops_reduction=0.3"]  # fmt: skip
    for given, expected in (("1000", 1000), ("0.1", 0.1), ("0", 0)):
        cli = main([*base, f"--data.val_split={given}"], run=False, return_cli=True)
        assert cli is not None
        assert cli.datamodule.val_split == expected and type(cli.datamodule.val_split) is type(expected)


def test_the_example_config_builds_resnet20_and_runs_on_the_stand_in(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    assert config["data"]["init_args"]["fake"] is False and config["model"]["init_args"]["net"]["init_args"]["in_channels"] == 1
    built = main(["--config", str(CONFIG), "--trainer.logger=false"], run=False, return_cli=True)
    assert built is not None and isinstance(built.datamodule, FashionMNISTDataModule)
    assert built.datamodule.system_dir == fm.FASHION_MNIST_SYSTEM_DIR and built.datamodule.val_split == 5000
    assert sum(p.numel() for p in built.model.parameters()) == pytest.approx(0.27e6, rel=0.03)  # ResNet-20, option B

    cli = main(
        ["fit", "--config", str(CONFIG), *_FAST, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
         "--pruning.epochs=[0]"],
        return_cli=True,
    )  # fmt: skip
    assert cli is not None and cli.pruning is not None and len(cli.pruning.history) == 1
    x = next(iter(cli.datamodule.val_dataloader()))[0][:2]
    before, after = count_cost(built.model, x), count_cost(cli.model, x)
    assert 1 - after.macs / before.macs == pytest.approx(0.5, abs=0.03)
