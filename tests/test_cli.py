"""The ``lightning-prune`` command line and the data modules its configurations use.

Every file of ``examples/configs/`` runs in-process through ``main([...])`` on the generated
stand-in (``--data.fake true``), with tiny sizes and the pruning epochs moved into a short fit; the
expected criterion, target and schedule are read from the YAML file itself.
"""

from __future__ import annotations

import urllib.error
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from torch import nn

from lightning_prune import StructuredPruningCallback, count_cost, get_criterion
from lightning_prune.cli import PruningCLI, main
from lightning_prune.data import CIFAR10DataModule, FakeImageDataset, ImageNetDataModule
from lightning_prune.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from lightning_prune.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from lightning_prune.schedules import cumulative_targets

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"

#: Fake data, tiny batches, no logger / checkpoint / progress bar.
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

_ONE_BATCH = ["--data.fake_size=8", "--data.batch_size=8"]

#: Per config: the pruning epochs moved into a short fit (as many steps as the config has), and
#: what keeps the run short on CPU.
_SMOKE: dict[str, dict[str, Any]] = {
    # one training batch per epoch (the CLI reads --trainer.limit_train_batches=1 as 1.0, i.e. 100%:
    # Lightning-AI/pytorch-lightning#21259)
    "cifar10_resnet56_pls_vip_5steps.yaml": {"epochs": [0, 1, 2, 3, 4], "extra": _ONE_BATCH},
    "cifar10_resnet56_pls_vip_8steps.yaml": {"epochs": [0, 1, 2, 3, 4, 5, 6, 7], "extra": _ONE_BATCH},
    "cifar10_resnet56_filter_ensembles.yaml": {
        "epochs": [0, 1, 2],
        "extra": ['--pruning.criterion_kwargs={"max_evaluations": 8, "num_batches": 1, "progress": false}'],
    },
    "cifar10_resnet56_id.yaml": {"epochs": [0]},
    "cifar10_vgg16_id.yaml": {"epochs": [0]},
    # Slow criteria get a narrower stand-in of the same family (the configs' real networks are checked by
    # test_configs_build_the_papers_networks_on_real_data): FPGM's exact pairwise distances cost ~2.5 s per
    # 512-filter layer of VGG-16 on one CPU thread (15 s per step), a half-width VGG-16 8x less;
    # discriminant information's width curve costs ~2 minutes per step for ResNet-50's 2,048-channel residual
    # group on CPU, ResNet-18's 512 channels a few seconds.
    "cifar10_vgg16_pca_gm.yaml": {
        "epochs": [0, 1, 2],
        "extra": ["--model.init_args.net.init_args.cfg=[32, 32, M, 64, 64, M, 128, 128, 128, M, 256, 256, 256, M, 256, 256, 256, M]"],
    },
    "imagenet_resnet50_di.yaml": {
        "epochs": [0],
        "extra": ["--data.image_size=64", "--model.init_args.net=torchvision.models.resnet18"],
    },
}

#: The papers' setups (docs/criteria.md): criterion, target kind and value, number of pruning steps.
_PAPERS = {
    "cifar10_resnet56_pls_vip_5steps.yaml": ("pls_vip", "channels", 1 - 0.9**5, 5),  # 10% of what remains, 5x
    "cifar10_resnet56_pls_vip_8steps.yaml": ("pls_vip", "channels", 1 - 0.9**8, 8),
    "cifar10_resnet56_filter_ensembles.yaml": ("filter_ensembles", "flops", 0.64, None),  # -64% FLOPs
    "cifar10_resnet56_id.yaml": ("id", "flops", 0.51, 1),
    "cifar10_vgg16_id.yaml": ("id", "flops", 0.51, 1),  # 93.62% at -51% FLOPs, one shot
    "cifar10_vgg16_pca_gm.yaml": ("pca_gm", "flops", 1 - 1 / 18.56, None),  # 18.56x fewer operations
    "imagenet_resnet50_di.yaml": ("di", "flops", 0.44, None),  # -44% FLOPs
}

#: Parameters of the network each config builds (the papers' models, default settings).
_PAPER_PARAMS = {"resnet56": 0.85e6, "vgg16": 15.0e6, "resnet50": 25.6e6}


@pytest.fixture(autouse=True)
def _program_name_only(monkeypatch):
    """``main`` reads ``sys.argv`` when given no arguments: pytest's own must not leak in."""
    monkeypatch.setattr("sys.argv", ["lightning-prune"])


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """scipy / scikit-learn linear algebra on one thread: on a busy 2-core machine, OpenBLAS's
    spinning threads made a 4096 x 64 pivoted QR 45x slower (0.94 s instead of 0.02 s)."""
    import scipy.linalg  # noqa: F401  (load the BLAS libraries before limiting them)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def _target(pruning: dict[str, Any]) -> tuple[str, float]:
    kinds = {"target_flops_reduction": "flops", "target_params_reduction": "params", "channel_ratio": "channels"}
    given = [(kinds[k], float(pruning[k])) for k in kinds if pruning.get(k) is not None]
    assert len(given) == 1, f"a config must give exactly one target, got {given}"
    return given[0]


def _run(args: list[str]) -> PruningCLI:
    cli = main(args, return_cli=True)
    assert cli is not None
    return cli


def _conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def test_every_config_has_a_smoke_run_and_a_paper():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(_SMOKE) == sorted(_PAPERS)


@pytest.mark.parametrize("name", sorted(_PAPERS))
def test_configs_state_the_papers_setups(name):
    criterion, kind, value, steps = _PAPERS[name]
    config = _yaml(name)
    pruning = config["pruning"]
    assert get_criterion(pruning["criterion"]).name == get_criterion(criterion).name
    got_kind, got_value = _target(pruning)
    assert got_kind == kind and got_value == pytest.approx(value, abs=5e-4)
    epochs = pruning["epochs"]
    assert steps is None or len(epochs) == steps
    if kind == "channels":  # the same fraction of the remaining channels at every step
        assert pruning["schedule"] == "geometric" and pruning["allocation"] == "global"
    # pruning starts once the dense schedule is over and every step leaves fine-tuning epochs after it
    assert epochs == sorted(set(epochs)) and epochs[-1] < config["trainer"]["max_epochs"] - 1
    assert epochs[0] >= max(config["lr_scheduler"]["init_args"]["milestones"])
    assert config["data"]["init_args"]["fake"] is False


@pytest.mark.parametrize("name", sorted(_SMOKE))
def test_config_runs_on_fake_data_and_prunes(name, tmp_path):
    smoke = _SMOKE[name]
    config = _yaml(name)
    pruning = config["pruning"]
    epochs = smoke["epochs"]
    overrides = [
        *_FAST,
        f"--trainer.max_epochs={epochs[-1] + 1}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--pruning.epochs={epochs}",
        *smoke.get("extra", []),
    ]
    reference = main(["--config", str(CONFIGS / name), *overrides], run=False, return_cli=True)
    assert reference is not None
    cli = _run(["fit", "--config", str(CONFIGS / name), *overrides])
    callback = cli.pruning
    assert isinstance(callback, StructuredPruningCallback)

    # the YAML's pruning setup reached the callback
    assert type(callback.criterion) is type(get_criterion(pruning["criterion"]))
    overridden = set()
    for arg in smoke.get("extra", []):
        if arg.startswith("--pruning.criterion_kwargs="):
            overridden = set(yaml.safe_load(arg.split("=", 1)[1]))
    for key, value in (pruning.get("criterion_kwargs") or {}).items():
        if key not in overridden:
            assert getattr(callback.criterion, key) == value, key
    kind, value = _target(pruning)
    assert (callback.target.kind, callback.target.value) == (kind, pytest.approx(value))
    assert callback.schedule == pruning.get("schedule", "linear")
    if pruning.get("allocation"):
        assert callback.allocation == pruning["allocation"]
    for key in ("collect_batches", "max_layer_ratio", "prune_on_train_start", "round_to", "max_samples"):
        if key in pruning:
            assert getattr(callback, key) == pruning[key], key
    assert callback.epochs == epochs

    # every step ran, the fit went on to the end, and the model is really smaller
    assert len(callback.history) == len(epochs)
    assert cli.trainer.current_epoch == epochs[-1] + 1
    x = next(iter(cli.datamodule.val_dataloader()))[0][:2]
    before, after = count_cost(reference.model, x), count_cost(cli.model, x)
    assert after.macs < before.macs and after.params < before.params
    assert _conv_channels(cli.model) < _conv_channels(reference.model)
    for layer in pruning.get("ignored_layers", []):  # e.g. PLS: the residual widths stay
        assert cli.model.get_submodule(layer).out_channels == reference.model.get_submodule(layer).out_channels
    if kind == "flops":
        assert 1 - after.macs / before.macs == pytest.approx(value, abs=0.02)
    with torch.no_grad():
        assert cli.model.eval()(x).shape == reference.model.eval()(x).shape


@pytest.mark.parametrize("name", sorted(_SMOKE))
def test_configs_build_the_papers_networks_on_real_data(name):
    cli = main(["--config", str(CONFIGS / name), "--trainer.logger=false"], run=False, return_cli=True)
    assert cli is not None
    assert cli.datamodule.fake is False
    params = sum(p.numel() for p in cli.model.parameters())
    paper = next(v for k, v in _PAPER_PARAMS.items() if k in name)
    assert params == pytest.approx(paper, rel=0.02)


def test_command_line_overrides_reach_the_callback(tmp_path):
    cli = _run(
        [
            "fit",
            "--config",
            str(CONFIGS / "cifar10_resnet56_id.yaml"),
            *_FAST,
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--pruning.criterion=l1",
            "--pruning.criterion_kwargs=null",  # the config's kwargs are the ID criterion's
            "--pruning.target_flops_reduction=0.3",
            "--pruning.epochs=[0,1]",
            "--pruning.schedule=agp",
            "--pruning.max_layer_ratio=0.8",
            "--pruning.verbose=false",
        ]
    )
    callback = cli.pruning
    assert callback is not None
    assert callback.criterion.name == "l1"
    assert (callback.target.kind, callback.target.value) == ("flops", 0.3)
    assert callback.epochs == [0, 1] and callback.schedule == "agp" and callback.max_layer_ratio == 0.8
    assert callback.verbose is False
    assert [r.epoch for r in callback.history] == [0, 1]
    assert callback.history[-1].flops_reduction == pytest.approx(0.3, abs=0.02)


def test_criterion_kwargs_on_the_command_line_merge_with_the_config():
    cli = main(
        ["--config", str(CONFIGS / "cifar10_resnet56_id.yaml"), "--trainer.logger=false", '--pruning.criterion_kwargs={"max_rows": 100}'],
        run=False,
        return_cli=True,
    )
    assert cli is not None and cli.pruning is not None
    assert (cli.pruning.criterion.max_rows, cli.pruning.criterion.rows_per_batch) == (100, 256)


def test_a_criterion_instance_by_class_path():
    cli = main(
        [
            "--config",
            str(CONFIGS / "cifar10_resnet56_pls_vip_5steps.yaml"),
            "--trainer.logger=false",
            "--pruning.criterion_kwargs=null",
            '--pruning.criterion={"class_path": "lightning_prune.criteria.pls_vip.PLSVIP", "init_args": {"n_components": 3}}',
        ],
        run=False,
        return_cli=True,
    )
    assert cli is not None and cli.pruning is not None
    assert type(cli.pruning.criterion).__name__ == "PLSVIP" and cli.pruning.criterion.n_components == 3


def test_an_onnxruntime_latency_fn_by_class_path():
    cli = main(
        [
            "--config",
            str(CONFIGS / "cifar10_resnet56_pls_vip_5steps.yaml"),
            "--trainer.logger=false",
            "--pruning.channel_ratio=null",
            "--pruning.target_latency_reduction=0.3",
            '--pruning.latency_fn={"class_path": "lightning_prune.engine.OnnxRuntimeLatency", '
            '"init_args": {"intra_op_num_threads": 1, "graph_optimization": "basic"}}',
        ],
        run=False,
        return_cli=True,
    )
    assert cli is not None and cli.pruning is not None
    latency_fn = cli.pruning.latency.latency_fn
    assert type(latency_fn).__name__ == "OnnxRuntimeLatency" and latency_fn.graph_optimization == "basic"
    assert cli.pruning.latency.layer_timer == latency_fn.layer_timer  # its tables are onnxruntime's too


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--pruning.not_an_argument=1", "unrecognized arguments: --pruning.not_an_argument"),
        ("--pruning.max_layer_ratio=lots", 'Parser key "pruning.max_layer_ratio"'),
        ("--pruning.epochs=soon", 'Parser key "pruning.epochs"'),
        ("--data.fake=maybe", "fake"),
        ("--pruning.schedule=cubic", "Literal['linear', 'geometric', 'agp']"),
        ("--pruning.allocation=greedy", "Literal['uniform', 'global']"),
    ],
)
def test_a_bad_option_exits_with_jsonargparse_error(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "cifar10_resnet56_id.yaml"), option])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_schedule_by_dotted_path_and_allocation_by_name():
    cli = main(
        [
            "--config", str(CONFIGS / "cifar10_resnet56_id.yaml"), "--trainer.logger=false",
            "--pruning.schedule=lightning_prune.schedules._geometric", "--pruning.allocation=global",
            "--pruning.epochs=[10,20,30]",
        ],
        run=False,
        return_cli=True,
    )  # fmt: skip
    assert cli is not None and cli.pruning is not None
    assert callable(cli.pruning.schedule) and cli.pruning.allocation == "global"
    assert cli.pruning.step_targets == pytest.approx(cumulative_targets(0.51, 3, "geometric"))
    assert cli.pruning.step_targets != pytest.approx(cumulative_targets(0.51, 3, "linear"))


def test_a_criterion_kwarg_the_criterion_does_not_take_is_named():
    with pytest.raises(ValueError, match=r"criterion_kwargs \['rank'\].*'id'.*max_rows"):
        main(["--config", str(CONFIGS / "cifar10_resnet56_id.yaml"), '--pruning.criterion_kwargs={"rank": 3}'], run=False)


def test_an_unknown_criterion_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown criterion 'nope'.*pls_vip"):
        main(
            ["--config", str(CONFIGS / "cifar10_resnet56_id.yaml"), "--pruning.criterion=nope", "--pruning.criterion_kwargs=null"],
            run=False,
        )


def test_missing_data_fails_before_training_naming_the_folder_and_the_switches(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "cifar10_resnet56_id.yaml"),
                f"--data.data_dir={missing}",
                "--data.download=false",
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert str(missing) in str(error.value) and "--data.fake true" in str(error.value)
    assert not missing.exists()


def test_console_script_and_help(monkeypatch, capsys):
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("lightning-prune") == "lightning_prune.cli:main"
    monkeypatch.setattr("sys.argv", ["lightning-prune", "fit", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--pruning.criterion" in out and "--pruning.target_flops_reduction" in out


# ---------------------------------------------------------------------------------- data modules
def test_fake_images_are_reproducible_and_shaped():
    data = FakeImageDataset(5, (3, 8, 6), num_classes=4, seed=1)
    image, label = data[3]
    assert image.shape == (3, 8, 6) and image.dtype == torch.float32 and 0 <= label < 4
    assert torch.equal(data[3][0], image) and torch.equal(data[-2][0], image)
    assert not torch.equal(FakeImageDataset(5, (3, 8, 6), 4, seed=2)[3][0], image)
    assert not torch.equal(data[2][0], image)
    with pytest.raises(IndexError):
        data[5]


@pytest.mark.parametrize("module", ["cifar", "imagenet"])
def test_fake_switch_never_touches_disk(module, tmp_path):
    missing = tmp_path / "absent"
    if module == "cifar":
        dm = CIFAR10DataModule(str(missing), batch_size=4, num_workers=0, fake=True, fake_size=12, download=True)
        shape, classes = (3, 32, 32), 10
    else:
        dm = ImageNetDataModule(str(missing), batch_size=4, num_workers=0, image_size=40, fake=True, fake_size=12)
        shape, classes = (3, 40, 40), 1000
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, *shape) and labels.dtype == torch.int64 and int(labels.max()) < classes
    assert len(dm.train_dataloader().dataset) == 12 and len(dm.val_dataloader().dataset) == 3
    assert not missing.exists()


def test_cifar_missing_without_download_names_the_folder_and_switches(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path), download=False)
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as error:
            call()
        text = str(error.value)
        assert str(tmp_path / "cifar-10-batches-py") in text
        assert "--data.download true" in text and "--data.fake true" in text


def test_cifar_download_failure_says_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match=r"could not download CIFAR-10.*no network.*--data.fake true"):
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()


class _StubCIFAR(torch.utils.data.Dataset):
    """Stands in for torchvision's CIFAR10 file reading: ``size`` 32x32 PIL images, label = index % 10."""

    size = 40

    def __init__(self, root: str, train: bool = True, transform: Any = None, download: bool = False) -> None:
        self.train, self.transform = train, transform
        rng = np.random.default_rng(0 if train else 1)
        self.images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(self.size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.images[index]), index % 10


def test_cifar_val_split_holds_out_unaugmented_training_images(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _StubCIFAR)
    dm = CIFAR10DataModule(str(tmp_path), num_workers=0, val_split=0.25, download=False, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    assert len(val) == 10 and len(train) == 30
    assert set(val.indices).isdisjoint(train.indices) and set(val.indices) | set(train.indices) == set(range(40))
    assert torch.equal(val[0][0], val[0][0])  # evaluation transform: deterministic
    draws = [train[0][0] for _ in range(8)]  # random crop with padding and flip
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert draws[0].shape == (3, 32, 32)
    # normalised with the CIFAR statistics: the stored image maps back exactly
    raw = torch.from_numpy(np.array(_StubCIFAR("", True).images[val.indices[0]])).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    assert torch.allclose(val[0][0], expected, atol=1e-5)
    # without val_split, validation is the test set
    plain = CIFAR10DataModule(str(tmp_path), num_workers=0, download=False)
    plain.setup("fit")
    assert plain.val_dataloader().dataset.train is False and len(plain.train_dataloader().dataset) == 40


def _image_folder(root: Path, classes: tuple[str, ...], per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (int(rng.integers(40, 80)), int(rng.integers(40, 80)), 3)
                Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i}.png")
    Image.new("RGB", (50, 70), (255, 255, 255)).save(root / "val" / classes[0] / "white.png")


def test_imagenet_reads_an_image_folder(tmp_path):
    classes = ("cat", "dog", "fish")
    _image_folder(tmp_path, classes)
    dm = ImageNetDataModule(str(tmp_path), batch_size=4, num_workers=0, image_size=32, num_classes=3)
    assert dm.resize_size == 37
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1, 2}
    val = dm.val_dataloader().dataset
    assert len(dm.train_dataloader().dataset) == 9 and len(val) == 10 and val.classes == list(classes)
    white = next(i for i, (path, _) in enumerate(val.samples) if path.endswith("white.png"))
    image, label = val[white]
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert label == 0 and image.shape == (3, 32, 32)
    assert torch.allclose(image, expected[:, None, None].expand(3, 32, 32), atol=1e-5)
    assert torch.equal(val[1][0], val[1][0])


def test_imagenet_class_count_and_missing_folders(tmp_path):
    _image_folder(tmp_path, ("a", "b"))
    with pytest.raises(ValueError, match="holds 2 class folders but num_classes=1000"):
        ImageNetDataModule(str(tmp_path), num_workers=0).setup("fit")
    missing = tmp_path / "imagenet"
    (missing / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        ImageNetDataModule(str(missing)).prepare_data()
    assert str(missing / "val") in str(error.value) and "--data.fake true" in str(error.value)


def test_a_criterion_kwargs_mapping_on_the_command_line_is_rewritten_key_by_key():
    from lightning_prune.cli import merged_kwargs_arguments

    flag = "--pruning.criterion_kwargs"
    assert merged_kwargs_arguments([f'{flag}={{"max_rows": 100, "ridge": 0.5}}', "--x=1"]) == [
        f"{flag}.max_rows=100", f"{flag}.ridge=0.5", "--x=1"
    ]
    assert merged_kwargs_arguments([flag, "{rows_per_batch: 8}"]) == [f"{flag}.rows_per_batch=8"]
    assert merged_kwargs_arguments([f"{flag}=null", flag, "[1]"]) == [f"{flag}=null", flag, "[1]"]  # the parser decides
