"""Weight averaging through pruning: the averaged copies get the same cut and the average goes on
over the kept channels. Each average is checked against one computed independently, in NumPy, from
the parameter values recorded along the fit and the kept indices of each step."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch.optim.swa_utils import AveragedModel

from lightning_prune import StructuredPruningCallback, load_pruned
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

try:
    from lightning.pytorch.callbacks import EMAWeightAveraging
except ImportError:  # older Lightning: WeightAveraging with an EMA avg_fn
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_avg_fn

    def EMAWeightAveraging(decay):  # noqa: N802 - stands in for the class
        return WeightAveraging(avg_fn=get_ema_avg_fn(decay))


X = torch.randn(4, 1, 8, 8)


def _trainer(callbacks, epochs, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3, limit_val_batches=1, **kw)


def _model(epochs=4):
    return ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1), max_epochs=epochs)


def _params(module):
    return {n: p.detach().cpu().numpy().copy() for n, p in module.named_parameters()}


def _capture_cuts(cb):
    """Wrap every pruner's step: per step, parameter name -> [(dim, kept indices), ...]."""
    cuts = []
    for pruner in cb._pruners:
        original = pruner.step

        def step(model, *args, _original=original, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            result = _original(model, *args, **kwargs)
            cuts.append({names[id(old)]: [(d, k.numpy()) for d, k in c.ops] for old, c in result.changes.items()})
            return result

        pruner.step = step
    return cuts


def _cut(arrays, ops):
    out = dict(arrays)
    for name, selections in ops.items():
        for dim, keep in selections:
            out[name] = np.take(out[name], keep, axis=dim)
    return out


class _Record(L.Callback):
    def __init__(self, hook):
        self.hook, self.values = hook, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook == "batch":
            self.values.append((trainer.current_epoch, _params(pl_module)))

    def on_train_epoch_start(self, trainer, pl_module):
        if self.hook == "epoch":
            self.values.append((trainer.current_epoch, _params(pl_module)))


def test_ema_after_pruning_equals_an_independent_ema_over_the_kept_channels():
    L.seed_everything(0)
    decay = 0.8
    model = _model()
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0, 1], verbose=False)
    cuts = _capture_cuts(cb)
    record = _Record("batch")
    ema = EMAWeightAveraging(decay=decay)
    trainer = _trainer([record, cb, ema], 3)
    trainer.fit(model, DigitsDataModule())
    assert len(cb.history) == 2 and len(cuts) == 2

    # By hand: EMA of the recorded values; at each prune (after the last batch of epochs 0 and 1)
    # the dense average is sliced with the step's kept indices, then the EMA goes on.
    average = None
    prunes = iter(cuts)
    last_epoch = 0
    for epoch, values in record.values:
        if epoch != last_epoch:
            average = _cut(average, next(prunes))
            last_epoch = epoch
        average = values if average is None else {n: decay * average[n] + (1 - decay) * values[n] for n in values}
    averaged = _params(ema._average_model.module)
    assert averaged.keys() == average.keys()
    for name in average:
        assert averaged[name].shape == average[name].shape, name
        np.testing.assert_allclose(averaged[name], average[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # the model ends with the average (WeightAveraging copies it at the end of fit)
    for name, value in _params(model).items():
        np.testing.assert_array_equal(value, averaged[name])
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_swa_with_steps_before_and_after_swa_start_ends_with_the_average_over_the_kept_channels():
    L.seed_everything(0)
    model = _model(epochs=4)
    cb = StructuredPruningCallback("fpgm", target_flops_reduction=0.5, epochs=[0, 2], verbose=False)
    cuts = _capture_cuts(cb)
    record = _Record("epoch")
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)  # averages at the start of epochs 1, 2, 3
    _trainer([record, cb, swa], 4).fit(model, DigitsDataModule())
    assert [r.epoch for r in cb.history] == [0, 2]

    average, n = None, 0
    for epoch, values in record.values:
        if epoch == 3:  # the prune at the end of epoch 2 comes after 2 updates of the average
            average = _cut(average, cuts[1])
        if 1 <= epoch <= 3:
            average = values if average is None else {k: average[k] + (values[k] - average[k]) / (n + 1) for k in values}
            n += 1
    assert n == 3 and int(swa.n_averaged) == 3
    final = _params(model)
    assert final.keys() == average.keys()
    for name in average:
        assert final[name].shape == average[name].shape, name
        np.testing.assert_allclose(final[name], average[name], rtol=1e-5, atol=1e-6, err_msg=name)


class _WithEMA(ImageClassifier):
    """A module that owns an AveragedModel of its network, updated after every optimizer step."""

    def __init__(self, **kw):
        super().__init__(SmallResNet(widths=(8, 16), blocks_per_stage=1), **kw)
        self.ema = AveragedModel(self.net, multi_avg_fn=None)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)


def test_an_averaged_model_the_module_owns_is_cut_and_not_counted(tmp_path):
    L.seed_everything(0)
    model = _WithEMA()
    cb = StructuredPruningCallback("l1", target_params_reduction=0.5, epochs=[0], verbose=False)
    cuts = _capture_cuts(cb)
    record = _Record("batch")
    trainer = _trainer([record, cb], 2, default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule())
    # the target is met on the network itself: the averaged copy is not counted
    assert abs(cb.history[0].params_reduction - 0.5) <= 0.02
    assert not any(name.startswith("ema") for step in cuts for name in step)  # never part of the plan
    # independent running mean (AveragedModel's default) of net's values, sliced at the prune
    average, n, last_epoch = None, 0, 0
    for epoch, values in record.values:
        net = {k[len("net."):]: v for k, v in values.items() if k.startswith("net.")}
        if epoch != last_epoch:
            average = _cut(average, {k[len("net."):]: v for k, v in cuts[0].items()})
            last_epoch = epoch
        average = net if average is None else {k: average[k] + (net[k] - average[k]) / (n + 1) for k in net}
        n += 1
    assert int(model.ema.n_averaged) == n == 6
    got = _params(model.ema.module)
    for name in average:
        np.testing.assert_allclose(got[name], average[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # and the checkpoint loads, averaged copy included
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_pruned(_WithEMA, path)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


class _BadEMA(ImageClassifier):
    def __init__(self):
        super().__init__(SmallResNet(widths=(8, 16), blocks_per_stage=1))
        self.ema = AveragedModel(SmallResNet(widths=(4, 4), blocks_per_stage=1))


def test_an_averaged_model_of_something_else_is_refused_at_setup():
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0], verbose=False)
    with pytest.raises(ValueError, match="AveragedModel 'ema'.*load_pruned"):
        _trainer([cb], 1).fit(_BadEMA(), DigitsDataModule())


def test_an_optimizer_training_the_averaged_copy_is_refused_before_training():
    class Trains(_WithEMA):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0], verbose=False)
    with pytest.raises(ValueError, match="optimizer holds parameters of AveragedModel 'ema'"):
        _trainer([cb], 1).fit(Trains(), DigitsDataModule())


def test_resume_with_ema_ends_like_the_uninterrupted_run(tmp_path):
    def run(callbacks, ckpt=None):
        L.seed_everything(0)
        model = _model(epochs=3)
        cb = StructuredPruningCallback("l2", target_flops_reduction=0.5, epochs=[0, 1], verbose=False)
        ema = EMAWeightAveraging(decay=0.7)
        _trainer([cb, ema, *callbacks], 3).fit(model, DigitsDataModule(), ckpt_path=ckpt)
        return model, ema

    reference, ref_ema = run([])

    class Save(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
                trainer.should_stop = True

    run([Save()])
    resumed, ema = run([], ckpt=tmp_path / "epoch0.ckpt")
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(ref_ema._average_model.state_dict().items(), ema._average_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_failed_step_restores_model_optimizer_and_companions():
    import copy

    from lightning_prune import ChannelPruner, PruningError, Target, get_criterion

    torch.manual_seed(0)
    net = SmallResNet(widths=(8, 16), blocks_per_stage=1)
    good = copy.deepcopy(net)
    bad = SmallResNet(widths=(8,), blocks_per_stage=1)  # not a copy: its cut fails after good's
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (net, good)]
    params = [list(m.parameters()) for m in (net, good)]
    groups = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(PruningError, match="companions left unchanged"):
        ChannelPruner(get_criterion("l1")).step(net, X, Target("flops", 0.5), optimizers=[opt], companions=[good, bad])
    for module, saved, objects in zip((net, good), before, params):
        assert all(a is b for a, b in zip(module.parameters(), objects))
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    assert [list(g["params"]) for g in opt.param_groups] == groups
    # and with the good companion alone the copy follows the model
    ChannelPruner(get_criterion("l1")).step(net, X, Target("flops", 0.5), optimizers=[opt], companions=[good])
    assert {n: p.shape for n, p in good.named_parameters()} == {n: p.shape for n, p in net.named_parameters()}
    assert all(torch.equal(a, b) for a, b in zip(good.state_dict().values(), net.state_dict().values()))
