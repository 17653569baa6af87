"""The callback inside real Lightning fits: optimizer, LR schedule, modes, precision, reporting, errors."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_prune import PruningError, StructuredPruningCallback, count_cost
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

X = torch.randn(2, 1, 8, 8)


def _model(optimizer="sgd", widths=(8, 16), epochs=4):
    return ImageClassifier(SmallResNet(widths=widths, blocks_per_stage=1), optimizer=optimizer, lr=0.02, max_epochs=epochs)


def _trainer(callbacks, epochs, **kw):
    kw.setdefault("limit_train_batches", 4)
    kw.setdefault("limit_val_batches", 1)
    kw.setdefault("logger", False)
    return L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


class _Recorder(L.Callback):
    """Records LRs, train modes and optimizer/model parameter identity along the fit."""

    def __init__(self):
        self.lrs, self.modes, self.same_params = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(all(m.training for m in pl_module.modules()))
        opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.same_params.append(opt_params == {id(p) for p in pl_module.parameters()})


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizer_follows_the_pruned_model_and_lr_schedule_is_unchanged(optimizer):
    L.seed_everything(0)
    plain = _Recorder()
    _trainer([plain], 4).fit(_model(optimizer), DigitsDataModule())
    L.seed_everything(0)
    rec = _Recorder()
    model = _model(optimizer)
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.4, epochs=[0, 1], verbose=False)
    _trainer([cb, rec], 4).fit(model, DigitsDataModule())
    assert len(cb.history) == 2
    assert rec.lrs == plain.lrs  # the schedule keeps its position (nothing rebuilt)
    assert all(rec.same_params)  # every training step after each prune sees the new parameters
    assert all(rec.modes)  # tracing never leaves a module in eval mode
    state = model.trainer.optimizers[0].state
    for p in model.parameters():  # state exists at the pruned shapes (momentum / moments kept, not reset)
        for value in state[p].values():
            if torch.is_tensor(value) and value.dim():
                assert value.shape == p.shape


def test_pruned_layers_keep_learning_and_loss_goes_down():
    L.seed_everything(0)
    model = _model(widths=(16, 32), epochs=8)
    cb = StructuredPruningCallback("l2", target_flops_reduction=0.5, epochs=[1], verbose=False)
    losses = []

    class Snap(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["train_loss"]))
            if trainer.current_epoch == 2:
                self.w = pl_module.net.stages[1][0].conv1.weight.detach().clone()

    snap = Snap()
    dm = DigitsDataModule()
    trainer = _trainer([cb, snap], 8, limit_train_batches=None, limit_val_batches=None)
    trainer.fit(model, dm)
    conv = model.net.stages[1][0].conv1
    assert conv.out_channels < 32 and conv.weight.shape == snap.w.shape
    assert not torch.equal(conv.weight, snap.w)  # not frozen after the prune
    assert losses[-1] < losses[2]  # fine-tuning after the prune lowers the loss
    assert trainer.test(model, dm, verbose=False)[0]["test_acc"] > 0.9


class _Manual(ImageClassifier):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize("setting", ["manual", "accumulate", "bf16"])
def test_manual_optimization_accumulation_and_bf16(setting):
    L.seed_everything(0)
    model = _Manual(SmallResNet(widths=(8, 16), blocks_per_stage=1)) if setting == "manual" else _model()
    dense = count_cost(model, X)
    cb = StructuredPruningCallback("fpgm", target_flops_reduction=0.4, epochs=[0], verbose=False)
    extra = {"accumulate_grad_batches": 2} if setting == "accumulate" else {"precision": "bf16-mixed"} if setting == "bf16" else {}
    trainer = _trainer([cb], 2, **extra)
    trainer.fit(model, DigitsDataModule())
    assert abs((1 - count_cost(model, X).macs / dense.macs) - 0.4) <= 0.02
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters()}


def test_reporting_logs_history_and_summary(tmp_path):
    L.seed_everything(0)
    cb = StructuredPruningCallback("l1", target_params_reduction=0.4, epochs=[0, 1], schedule="agp", verbose=False)
    logger = CSVLogger(tmp_path, name="run")
    _trainer([cb], 3, logger=logger).fit(_model(), DigitsDataModule())
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("prune/macs", "prune/params", "prune/flops_reduction", "prune/params_reduction", "prune/seconds"):
        assert sum(1 for r in rows if r.get(key)) == 2, key
    assert [r.epoch for r in cb.history] == [0, 1]
    # agp schedule: T * (1 - (1 - i/n)^3)
    assert [round(r.target, 9) for r in cb.history] == [round(0.4 * (1 - (1 - i / 2) ** 3), 9) for i in (1, 2)]
    for r in cb.history:
        assert r.params_after < r.params_before and r.seconds > 0 and r.widths["net.fc"] == 10
    assert cb.history[-1].params_reduction == pytest.approx(0.4, abs=0.02)
    table = cb.summary().splitlines()
    assert len(table) == 3 + len(cb.history)


def test_pruned_model_is_a_normal_model_afterwards(tmp_path):
    L.seed_everything(0)
    model = _model()
    dense_file = tmp_path / "dense.pt"
    torch.save(model.state_dict(), dense_file)
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0], verbose=False)
    dm = DigitsDataModule()
    trainer = _trainer([cb], 1)
    trainer.fit(model, dm)
    assert trainer.validate(model, dm, verbose=False)[0]["val_acc"] >= 0
    assert trainer.test(model, dm, verbose=False)[0]["test_acc"] >= 0
    predictions = trainer.predict(model, dm)
    assert sum(len(p) for p in predictions) == len(dm._splits["test"])
    pruned_file = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), pruned_file)
    assert pruned_file.stat().st_size < 0.75 * dense_file.stat().st_size
    state = torch.load(pruned_file, weights_only=True)
    assert state["net.stem.0.weight"].shape[0] == model.net.stem[0].out_channels < 8


def test_prune_on_train_start_prunes_before_the_first_training_step():
    L.seed_everything(0)
    widths = []

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            widths.append(pl_module.net.stem[0].out_channels)

    cb = StructuredPruningCallback("l1", target_flops_reduction=0.4, prune_on_train_start=True, verbose=False)
    _trainer([cb, FirstBatch()], 1).fit(_model(), DigitsDataModule())
    assert widths[0] < 8 and [r.epoch for r in cb.history] == [-1]


def test_failed_step_inside_fit_leaves_model_and_optimizer_as_they_were(monkeypatch):
    import lightning_prune.engine.pruner as pruner_module

    real = pruner_module.apply_plan

    def half_then_fail(groups, removed):
        first = next(iter(removed))
        real(groups, {first: removed[first]})
        raise RuntimeError("injected failure during surgery")

    monkeypatch.setattr(pruner_module, "apply_plan", half_then_fail)
    seen = {}

    class Before(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen["params"] = [(n, p, p.detach().clone()) for n, p in pl_module.named_parameters()]
            opt = trainer.optimizers[0]
            seen["opt_params"] = [p for g in opt.param_groups for p in g["params"]]
            seen["state"] = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in seen["opt_params"]}

    L.seed_everything(0)
    model = _model()
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.4, epochs=[0], verbose=False)
    trainer = _trainer([Before(), cb], 2)
    with pytest.raises(PruningError, match="left unchanged"):
        trainer.fit(model, DigitsDataModule())
    for (name, param), (old_name, old_param, old_value) in zip(model.named_parameters(), seen["params"]):
        assert name == old_name and param is old_param and torch.equal(param, old_value)
    opt = trainer.optimizers[0]
    assert [p for g in opt.param_groups for p in g["params"]] == seen["opt_params"]
    for p in seen["opt_params"]:
        for k, v in opt.state[p].items():
            assert torch.equal(v, seen["state"][id(p)][k])


# ----------------------------------------------------------------------------- bad input
class _NoTraining(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise AssertionError("a training step ran before the bad input was reported")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_flops_reduction": 0.0}, "target_flops_reduction"),
        ({"target_flops_reduction": 1.0}, "target_flops_reduction"),
        ({"target_params_reduction": -0.1}, "target_params_reduction"),
        ({"channel_ratio": 1.5}, "channel_ratio"),
        ({"target_flops_reduction": math.nan}, "target_flops_reduction"),
        ({"target_flops_reduction": 0.3, "channel_ratio": 0.3}, "exactly one"),
        ({}, "exactly one"),
        ({"target_flops_reduction": 0.3, "criterion": "l3"}, "l1"),
        ({"target_flops_reduction": 0.3, "epochs": [2, 1]}, "sorted"),
        ({"target_flops_reduction": 0.3, "epochs": [1, 1]}, "unique"),
        ({"target_flops_reduction": 0.3, "epochs": [-1]}, "non-negative"),
        ({"target_flops_reduction": 0.3, "round_to": -2}, "round_to"),
        ({"target_flops_reduction": 0.3, "round_to": 0}, "round_to"),
        ({"target_flops_reduction": 0.3, "allocation": "local"}, "allocation"),
        ({"target_flops_reduction": 0.3, "schedule": "cosine"}, "schedule"),
        ({"target_flops_reduction": 0.3, "max_layer_ratio": 1.0}, "max_layer_ratio"),
        ({"target_flops_reduction": 0.3, "ignored_layers": [3]}, "ignored_layers"),
        ({"target_flops_reduction": 0.3, "criterion": 42}, "criterion"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    criterion = kwargs.pop("criterion", "l1")
    with pytest.raises((ValueError, TypeError), match=match):
        StructuredPruningCallback(criterion, **kwargs)


class _Linear(ImageClassifier):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (StructuredPruningCallback("l1", target_flops_reduction=0.3, epochs=[3]), _model()), "max_epochs"),
        (lambda: (StructuredPruningCallback("l1", target_flops_reduction=0.3, ignored_layers=["net.stem.9"]), _model()), "net.stem.9"),
        (lambda: (StructuredPruningCallback("l1", target_flops_reduction=0.3), _Linear()), "no prunable layer"),
        (lambda: (StructuredPruningCallback("l1", target_flops_reduction=0.9, max_layer_ratio=0.2), _model()), "unreachable"),
    ],
)
def test_bad_setups_raise_before_the_first_training_step(make, match):
    callback, model = make()
    with pytest.raises(ValueError, match=match):
        _trainer([callback, _NoTraining()], 3).fit(model, DigitsDataModule())


def test_sharded_and_multi_process_strategies_are_refused_at_setup():
    from unittest.mock import MagicMock

    from lightning.pytorch.strategies import FSDPStrategy

    cb = StructuredPruningCallback("l1", target_flops_reduction=0.3)
    trainer = MagicMock(max_epochs=3, world_size=1)
    trainer.strategy = FSDPStrategy.__new__(FSDPStrategy)
    with pytest.raises(ValueError, match="FSDPStrategy"):
        cb.setup(trainer, _model(), "fit")
    trainer = MagicMock(max_epochs=3, world_size=2)
    with pytest.raises(ValueError, match="multi-process"):
        cb.setup(trainer, _model(), "fit")
