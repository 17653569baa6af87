"""Benchmark: every criterion against the pruners a user would pick instead, on digits or Fashion-MNIST.

One run, one machine, everything side by side. Per seed the dense model is trained once; every method
then prunes a copy of it to each MACs target and the copy is fine-tuned with the same plain Lightning fit
(same epochs, learning rate, data order). Two data sets (``--data``):

* ``digits`` (default, the quick one): SmallResNet (32, 64, 128) on scikit-learn's 8x8 digits. A short
  fine-tune brings every method, random included, to 97-99%: it shows targets, speed and latency, not
  which criterion to choose;
* ``fashion-mnist``: a CIFAR-style ResNet (``--depth``, default 20: 3 stages of 3 basic blocks, 16/32/64
  channels, projection shortcuts) on Fashion-MNIST's 60,000 real 28x28 images (5,000 held out for
  validation, the 10,000 test images for the numbers). Debian's ``dataset-fashion-mnist`` files are used
  when present, else torchvision downloads them into ``--data-dir``. Here the criteria differ.

Methods:

* **lightning-prune**: every registered criterion (aliases once), ``StructuredPruningCallback(criterion,
  target_flops_reduction=t, prune_on_train_start=True)`` inside the fine-tuning fit (activation criteria
  get their dedicated collection pass);
* **torch-pruning** (``tp``): its own pruner as its README/benchmarks drive it, ``tp.pruner.BasePruner``
  (``MetaPruner``/``MagnitudePruner`` are aliases of it in 1.6) with ``tp.importance.MagnitudeImportance(p=1)``,
  *local* pruning (``global_pruning=False``: every layer loses the same channel fraction, like our ``l1``
  with its default uniform allocation), ``max_pruning_ratio=0.9`` (our ``max_layer_ratio``), the classifier
  ``fc`` ignored. The MACs target is reached the way torch-pruning's own benchmark does it
  (``progressive_pruning``): ``pruning_ratio=1.0`` over ``iterative_steps=400`` small steps, ``pruner.step()``
  until ``tp.utils.count_ops_and_params`` shows the target reached (first step at or past it; a channel is
  indivisible, so it may overshoot). Then the plain fine-tuning fit, no callback;
* **ModelPruning**: Lightning's ``ModelPruning(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=1,
  make_pruning_permanent=True)`` on the weight of every convolution (not the classifier, whose rows are
  the classes), ``amount`` = the fraction of convolution output channels that our ``l1`` run removed at the
  same target. ``ModelPruning`` prunes at epoch ends; here a subclass applies it once when training starts,
  then the same fine-tuning fit runs with the masks in place. It only masks: the measured MACs stay dense.

Reported per method, target and seed: test accuracy right after the prune and after fine-tuning, the
prune-step time, MACs and parameters (total and non-zero) measured on the final model with
``lightning_prune.count_cost``, and CPU latency at batch 1 and 64 (medians, all models of a seed and target
interleaved with the dense one). The Markdown table gives mean ± std over seeds.

    python examples/benchmark_compare.py [--seeds 0 1 2] [--targets 0.3 0.5 0.7 0.9] [--out examples/results]
    python examples/benchmark_compare.py --data fashion-mnist --targets 0.5 0.7 0.9 --accelerator gpu
    python examples/benchmark_compare.py --smoke --out /tmp/smoke     # CI: 1 seed, 1 target, 2 criteria
    python examples/benchmark_compare.py --smoke --data fashion-mnist  # CI: the same on a few real batches
    python examples/benchmark_compare.py --repair-grid --no-peers --seeds 0 --targets 0.5 --finetune-epochs 1

``--repair-grid`` runs every criterion with and without the least-squares correction
(``correction="least_squares"`` / ``"none"``) and with and without BN recalibration
(``recalibrate_bn``), as methods named ``"<criterion> [ls|plain, bn|nobn]"``; ``--no-peers`` leaves
out torch-pruning and ``ModelPruning``.

Writes ``compare.json``, ``compare.md``, ``compare_accuracy.png`` and ``compare_widths.png`` under ``--out``
(``compare_fashion_mnist.*`` for Fashion-MNIST). ``--accelerator`` / ``--devices`` choose where every fit,
evaluation and latency measurement runs, so the same command reproduces the tables on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch_pruning as tp
from _bench import (
    accuracy,
    add_common_arguments,
    criteria_names,
    fmt,
    latency_ms,
    log,
    machine,
    make_model,
    make_trainer,
    mean_std,
    nonzero_params,
    output_dir,
    refresh_readme,
    set_trainer,
    setup_threads,
    write_outputs,
)
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_prune import StructuredPruningCallback, Target, count_cost, get_criterion
from lightning_prune.data import DigitsDataModule, FashionMNISTDataModule
from lightning_prune.engine import ChannelPruner
from lightning_prune.models import CifarResNet, ImageClassifier

TP = "torch-pruning (l1, local)"
MP = "ModelPruning (ln_structured)"
PEERS = (TP, MP)
SMOKE_CRITERIA = ["l1", "pls_vip"]
#: ``--repair-grid`` variants: label -> callback arguments.
REPAIR_GRID: dict[str, dict[str, Any]] = {
    "plain, nobn": {"correction": "none", "recalibrate_bn": False},
    "ls, nobn": {"correction": "least_squares", "recalibrate_bn": False},
    "plain, bn": {"correction": "none", "recalibrate_bn": True},
    "ls, bn": {"correction": "least_squares", "recalibrate_bn": True},
}
#: Variants ``--repair-variants`` may also name (not in the default grid): ``rw`` = ``residual_widths``
#: (widths by what the correction leaves, instead of the criterion's allocation); ``uniform`` = the
#: criterion ranks channels inside each group, every group loses the same share (``criterion_widths=False``,
#: ``allocation="uniform"``): the criterion's selection without its allocation.
REPAIR_VARIANTS: dict[str, dict[str, Any]] = {
    **REPAIR_GRID,
    "ls+rw, bn": {"correction": "least_squares", "residual_widths": True, "recalibrate_bn": True},
    "ls, bn, uniform": {
        "correction": "least_squares", "recalibrate_bn": True, "criterion_widths": False, "allocation": "uniform",
    },
}


def _ridge_argument(text: str) -> float | str:
    """``--correction-ridge``: ``gcv`` or a number >= 0."""
    if text == "gcv":
        return text
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--correction-ridge must be gcv or a number >= 0, got {text!r}")
    return value


def variant_of(method: str) -> tuple[str, dict[str, Any]]:
    """``"l1 [ls, bn]"`` -> ``("l1", {"correction": ..., "recalibrate_bn": ...})``; a plain name -> defaults."""
    if method.endswith("]") and " [" in method:
        name, label = method[:-1].split(" [", 1)
        return name, dict(REPAIR_VARIANTS[label])
    return method, {}


@dataclass(frozen=True)
class DataSetup:
    """One benchmark data set: its data module, its dense model and how it is described."""

    name: str
    title: str
    input_shape: tuple[int, ...]
    datamodule: Callable[[int], Any]  #: seed -> data module
    model: Callable[[int, float], ImageClassifier]  #: (epochs, lr) -> dense model
    stem: str  #: output file stem


def data_setup(args: argparse.Namespace) -> DataSetup:
    """The ``--data`` choice as a :class:`DataSetup`."""
    if args.data == "digits":
        return DataSetup(
            name="digits",
            title="Digits, SmallResNet (32, 64, 128)",
            input_shape=(1, 8, 8),
            datamodule=lambda seed: DigitsDataModule(seed=seed),
            model=lambda epochs, lr: make_model(epochs, lr),
            stem="compare",
        )

    def fashion(seed: int) -> FashionMNISTDataModule:
        return FashionMNISTDataModule(data_dir=str(args.data_dir), seed=seed, batch_size=args.batch_size, num_workers=0)

    return DataSetup(
        name="fashion-mnist",
        title=f"Fashion-MNIST, CIFAR-style ResNet-{args.depth} (16/32/64, 1-channel stem)",
        input_shape=(1, 28, 28),
        datamodule=fashion,
        model=lambda epochs, lr: ImageClassifier(CifarResNet(depth=args.depth, in_channels=1), lr=lr, max_epochs=epochs),
        stem="compare_fashion_mnist",
    )


# ---------------------------------------------------------------------------------------------- helpers
class AccuracyAfterPrune(L.Callback):
    """Test accuracy when training starts: after every pruning callback listed before it has pruned."""

    def __init__(self, loader, limit_batches: int | None = None) -> None:
        self.loader = loader
        self.limit_batches = limit_batches
        self.value: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.value = accuracy(pl_module, self.loader, self.limit_batches)


class ModelPruningAtStart(ModelPruning):
    """Lightning's ``ModelPruning``, applied once when training starts instead of at epoch ends."""

    seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        self.apply_pruning(self.amount)
        self.seconds = time.perf_counter() - start

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # no further pruning
        pass

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass


def conv_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per convolution: (output channels, output channels whose weights are not all zero)."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            alive = int((module.weight.detach().flatten(1).abs().sum(1) > 0).sum())
            widths[name] = (int(module.out_channels), alive)
    return widths


def channels_removed(model: nn.Module, dense: dict[str, tuple[int, int]]) -> float:
    """Fraction of the dense model's convolution output channels that are gone or all zero."""
    alive = sum(w[1] for w in conv_widths(model).values())
    return 1.0 - alive / sum(w[0] for w in dense.values())


def measure(model: ImageClassifier, example: torch.Tensor, dense_cost) -> dict[str, Any]:
    cost = count_cost(model, example)
    nonzero = nonzero_params(model)
    return {
        "macs": cost.macs,
        "params": cost.params,
        "params_nonzero": nonzero,
        "flops_reduction": 1 - cost.macs / dense_cost.macs,
        "params_reduction": 1 - cost.params / dense_cost.params,
        "nonzero_params_reduction": 1 - nonzero / dense_cost.params,
    }


def finetune_copy(dense: ImageClassifier, args: argparse.Namespace) -> ImageClassifier:
    model = copy.deepcopy(dense)
    model.hparams.max_epochs = args.finetune_epochs
    model.hparams.lr = args.finetune_lr
    return model


def finetune(model: ImageClassifier, datamodule, callbacks: list, seed: int, epochs: int) -> float:
    frozen = [n for n, m in model.named_modules() if not m.training]
    if frozen:  # Lightning keeps module modes: BatchNorm would fine-tune frozen
        raise RuntimeError(f"the copy to fine-tune has modules in eval mode: {frozen[:3]}")
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    make_trainer(epochs, callbacks).fit(model, datamodule)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- methods
def run_ours(method, dense, datamodule, example, dense_cost, dense_convs, target, seed, args) -> dict[str, Any]:
    model = finetune_copy(dense, args)
    name, repair = variant_of(method)
    kwargs: dict[str, Any] | None = {"progress": False} if name == "filter_ensembles" else None
    if args.correction_ridge is not None:
        repair["correction_ridge"] = args.correction_ridge
    pruning = StructuredPruningCallback(
        name, target_flops_reduction=target, prune_on_train_start=True, verbose=False, seed=seed, criterion_kwargs=kwargs,
        **repair,
    )
    probe = AccuracyAfterPrune(datamodule.test_dataloader(), args.test_batches)
    fit_seconds = finetune(model, datamodule, [pruning, probe], seed, args.finetune_epochs)
    record = pruning.history[0]
    return {
        **measure(model, example, dense_cost),
        "channels_removed": channels_removed(model, dense_convs),
        "accuracy_after_prune": probe.value,
        "accuracy_after_finetune": accuracy(model, datamodule.test_dataloader(), args.test_batches),
        "prune_seconds": record.seconds,
        "recalibration_seconds": record.recalibration_seconds,
        "agreement": record.agreement,
        "fit_seconds": fit_seconds,
        "model": model,
    }


def run_torch_pruning(dense, datamodule, example, dense_cost, dense_convs, target, seed, args) -> dict[str, Any]:
    model = finetune_copy(dense, args)
    net = model.net.eval()
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        net,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=1.0,
        max_pruning_ratio=args.max_layer_ratio,
        iterative_steps=args.tp_steps,
        ignored_layers=[net.fc],
        global_pruning=False,
    )
    base, _ = tp.utils.count_ops_and_params(net, example)
    macs = base
    while 1 - macs / base < target and pruner.current_step < pruner.iterative_steps:
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(net, example)
    prune_seconds = time.perf_counter() - start
    net.train()  # Lightning keeps module modes: fine-tune in train mode like every other method
    tp_reduction = 1 - macs / base
    after_prune = accuracy(model, datamodule.test_dataloader(), args.test_batches)
    fit_seconds = finetune(model, datamodule, [], seed, args.finetune_epochs)
    row = {
        **measure(model, example, dense_cost),
        "channels_removed": channels_removed(model, dense_convs),
        "accuracy_after_prune": after_prune,
        "accuracy_after_finetune": accuracy(model, datamodule.test_dataloader(), args.test_batches),
        "prune_seconds": prune_seconds,
        "fit_seconds": fit_seconds,
        "tp_steps": pruner.current_step,
        "tp_channel_ratio": pruner.current_step / pruner.iterative_steps,
        "tp_counted_flops_reduction": tp_reduction,
        "model": model,
    }
    if tp_reduction < target:
        row["note"] = (
            f"target not reached: {tp_reduction:.1%} of tp-counted MACs after all {pruner.iterative_steps} steps "
            f"(max_pruning_ratio={args.max_layer_ratio})"
        )
    return row


def l1_channel_fraction(dense, example, target, args) -> float:
    """Convolution channel fraction our ``l1`` removes at ``target`` (used when l1 is not benchmarked)."""
    model = copy.deepcopy(dense)
    ChannelPruner(get_criterion("l1"), max_layer_ratio=args.max_layer_ratio, ignored_layers=[model.net.fc]).step(
        model, example, Target("flops", target)
    )
    return channels_removed(model, conv_widths(dense))


def run_model_pruning(amount, dense, datamodule, example, dense_cost, dense_convs, target, seed, args) -> dict[str, Any]:
    model = finetune_copy(dense, args)
    convs = [(m, "weight") for m in model.net.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    pruning = ModelPruningAtStart(
        pruning_fn="ln_structured",
        parameters_to_prune=convs,
        amount=amount,
        pruning_dim=0,
        pruning_norm=1,
        use_global_unstructured=False,  # its default (True) is for unstructured pruning only
        use_lottery_ticket_hypothesis=False,
        make_pruning_permanent=True,
        verbose=0,
    )
    probe = AccuracyAfterPrune(datamodule.test_dataloader(), args.test_batches)
    fit_seconds = finetune(model, datamodule, [pruning, probe], seed, args.finetune_epochs)
    leftover = [n for n, _ in model.named_buffers() if n.endswith("_mask")]
    if leftover:
        raise RuntimeError(f"ModelPruning left masks behind: {leftover[:3]}")
    return {
        **measure(model, example, dense_cost),
        "channels_removed": channels_removed(model, dense_convs),
        "amount": amount,
        "accuracy_after_prune": probe.value,
        "accuracy_after_finetune": accuracy(model, datamodule.test_dataloader(), args.test_batches),
        "prune_seconds": pruning.seconds,
        "fit_seconds": fit_seconds,
        "model": model,
    }


# ---------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    setup = data_setup(args)
    variants = args.repair_variants or list(REPAIR_GRID)
    ours = [f"{c} [{label}]" for c in args.criteria for label in variants] if args.repair_grid else list(args.criteria)
    methods = ours + list(args.peers)
    widths_target = min(args.targets, key=lambda t: abs(t - 0.5))
    result: dict[str, Any] = {
        "config": {
            "data": setup.name,
            "title": setup.title,
            "input_shape": list(setup.input_shape),
            "accelerator": args.accelerator,
            "devices": args.devices,
            "limit_train_batches": args.limit_train_batches,
            "test_batches": args.test_batches,
            "dense_lr": args.dense_lr,
            "seeds": args.seeds,
            "targets": args.targets,
            "criteria": ours,  # method names of lightning-prune runs (variants with --repair-grid)
            "peers": list(args.peers),
            "repair_grid": args.repair_grid,
            "dense_epochs": args.dense_epochs,
            "finetune_epochs": args.finetune_epochs,
            "finetune_lr": args.finetune_lr,
            "max_layer_ratio": args.max_layer_ratio,
            "correction_ridge": args.correction_ridge,  # None: the library's default
            "tp_steps": args.tp_steps,
            "latency_rounds": args.latency_rounds,
            "smoke": args.smoke,
        },
        "machine": machine(),
        "dense": [],
        "runs": [],
        "widths": {"seed": args.seeds[0], "target": widths_target, "dense": {}, "methods": {}},
    }
    total = len(args.seeds) * len(args.targets) * len(methods)
    done = 0
    for seed in args.seeds:
        L.seed_everything(seed, verbose=False)
        datamodule = setup.datamodule(seed)
        datamodule.setup()
        example = next(iter(datamodule.train_dataloader()))[0][:2]
        dense = setup.model(args.dense_epochs, args.dense_lr)
        start = time.perf_counter()
        make_trainer(args.dense_epochs).fit(dense, datamodule)
        epoch_seconds = (time.perf_counter() - start) / args.dense_epochs
        dense_cost = count_cost(dense, example)
        dense_convs = conv_widths(dense)
        dense_row = {
            "seed": seed,
            "accuracy": accuracy(dense, datamodule.test_dataloader(), args.test_batches),
            "macs": dense_cost.macs,
            "params": dense_cost.params,
            "epoch_seconds": epoch_seconds,
        }
        result["dense"].append(dense_row)
        log(f"seed {seed}: dense {dense_row['accuracy']:.2%}, {dense_cost.macs:,} MACs, {epoch_seconds:.2f} s/epoch")
        if seed == args.seeds[0]:
            result["widths"]["dense"] = {n: w[0] for n, w in dense_convs.items()}
        for target in args.targets:
            rows: list[dict[str, Any]] = []
            for method in methods:
                common = (dense, datamodule, example, dense_cost, dense_convs, target, seed, args)
                try:
                    if method == TP:
                        row = run_torch_pruning(*common)
                    elif method == MP:
                        l1 = next((r for r in rows if r["method"] == "l1" and r["ok"]), None)
                        amount = l1["channels_removed"] if l1 else l1_channel_fraction(dense, example, target, args)
                        row = run_model_pruning(amount, *common)
                    else:
                        row = run_ours(method, *common)
                    row["ok"] = True
                except Exception as error:  # recorded, not hidden: the table shows the failure
                    row = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                row.update(method=method, seed=seed, target=target)
                rows.append(row)
                done += 1
                if row["ok"]:
                    log(
                        f"[{done}/{total}] seed {seed} target {target:.0%} {method}: -{row['flops_reduction']:.1%} MACs, "
                        f"acc {row['accuracy_after_prune']:.2%} -> {row['accuracy_after_finetune']:.2%}, "
                        f"prune {row['prune_seconds']:.2f}s" + (f" ({row['note']})" if row.get("note") else "")
                    )
                else:
                    log(f"[{done}/{total}] seed {seed} target {target:.0%} {method}: FAILED {row['error']}")
            models = {"dense": dense.net, **{r["method"]: r["model"].net for r in rows if r["ok"]}}
            latency = latency_ms(models, setup.input_shape, rounds=args.latency_rounds)
            for row in rows:
                if row["ok"]:
                    row["latency_ms"] = latency[row["method"]]
                    row["dense_latency_ms"] = latency["dense"]
                    row["latency_ratio"] = {b: latency[row["method"]][b] / latency["dense"][b] for b in latency["dense"]}
                    if seed == args.seeds[0] and target == widths_target:
                        result["widths"]["methods"][row["method"]] = {n: w[1] for n, w in conv_widths(row["model"]).items()}
                    del row["model"]
            log(
                f"seed {seed} target {target:.0%}: latency measured ({len(models)} models interleaved, "
                f"dense {latency['dense']['1']:.3f} ms @1, {latency['dense']['64']:.2f} ms @64)"
            )
            result["runs"].extend(rows)
    result["summary"] = summarize(result)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every number, per target and method."""
    keys = [
        "flops_reduction",
        "params_reduction",
        "nonzero_params_reduction",
        "macs",
        "params",
        "params_nonzero",
        "channels_removed",
        "accuracy_after_prune",
        "accuracy_after_finetune",
        "prune_seconds",
    ]
    summary = []
    config = result["config"]
    for target in config["targets"]:
        for method in config["criteria"] + config["peers"]:
            rows = [r for r in result["runs"] if r["target"] == target and r["method"] == method]
            ok = [r for r in rows if r["ok"]]
            entry: dict[str, Any] = {"target": target, "method": method, "seeds": len(rows), "ok": len(ok)}
            for key in keys:
                entry[key] = mean_std([r[key] for r in ok])
            for batch in ("1", "64"):
                entry[f"latency_ms_{batch}"] = mean_std([r["latency_ms"][batch] for r in ok])
                entry[f"latency_ratio_{batch}"] = mean_std([r["latency_ratio"][batch] for r in ok])
            entry["errors"] = sorted({r["error"] for r in rows if not r["ok"]})
            entry["notes"] = sorted({r["note"] for r in ok if r.get("note")})
            summary.append(entry)
    return summary


#: config entries that may differ between runs merged by :func:`merge_results` (everything else must match)
MERGE_FREE = ("seeds",)


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same configuration on different seeds (e.g. one process per seed,
    on one machine or several): dense models and runs concatenated, seeds in order, the summary
    recomputed. ``wall_seconds`` becomes the longest run's and ``wall_seconds_each`` keeps every one.

    Raises:
        ValueError: no result, configurations that differ in anything but the seeds (the entry is
            named), or a seed present in two results.
    """
    if not results:
        raise ValueError("merge_results needs at least one result")
    first = results[0]["config"]
    for other in results[1:]:
        config = other["config"]
        differ = sorted(k for k in set(first) | set(config) if k not in MERGE_FREE and first.get(k) != config.get(k))
        if differ:
            raise ValueError(f"cannot merge runs whose configurations differ in {differ}: run them with the same arguments")
    seeds = [s for r in results for s in r["config"]["seeds"]]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"cannot merge: seed(s) {repeated} appear in more than one result")
    ordered = sorted(results, key=lambda r: min(r["config"]["seeds"]))
    merged: dict[str, Any] = {
        "config": {**first, "seeds": sorted(seeds)},
        "machine": ordered[0]["machine"],
        "dense": sorted((d for r in ordered for d in r["dense"]), key=lambda d: d["seed"]),
        "runs": [row for r in ordered for row in r["runs"]],
        "widths": ordered[0]["widths"],  # the smallest seed's, as a single run records them
        "wall_seconds": max(r["wall_seconds"] for r in ordered),
        # a result merged before keeps the times of the runs it came from
        "wall_seconds_each": [s for r in ordered for s in r.get("wall_seconds_each", [r["wall_seconds"]])],
    }
    merged["summary"] = summarize(merged)
    return merged


def repair_grid_table(results: Sequence[dict[str, Any]]) -> str:
    """The repair grid of several ``--repair-grid`` results (other variants, targets or criteria, the
    same dense models: same data, depth, dense epochs and seeds): per target and criterion, accuracy
    right after the step and after fine-tuning for each variant of :data:`REPAIR_GRID`, mean ± sample
    std over seeds (``(n=k)`` when fewer than every seed). A (target, method, seed) run in two results
    is refused: the grid would silently keep one of them.

    Raises:
        ValueError: no result, a result without ``--repair-grid``, results of other dense models, or
            a run present twice.
    """
    if not results:
        raise ValueError("repair_grid_table needs at least one result")
    keys = ("data", "depth", "dense_epochs", "dense_lr", "limit_train_batches", "test_batches", "finetune_epochs", "finetune_lr")
    first = results[0]["config"]
    for result in results:
        config = result["config"]
        if not config.get("repair_grid"):
            raise ValueError("repair_grid_table reads --repair-grid results only")
        differ = sorted(k for k in keys if config.get(k) != first.get(k))
        if differ:
            raise ValueError(f"cannot combine results of other dense models or fine-tuning: they differ in {differ}")
    cells: dict[tuple[float, str, str], dict[int, dict[str, float]]] = {}
    for result in results:
        for row in result["runs"]:
            if not row.get("ok"):
                continue
            name, _, variant = row["method"].partition(" [")
            per_seed = cells.setdefault((row["target"], name, variant.rstrip("]")), {})
            if row["seed"] in per_seed:
                raise ValueError(f"run {row['method']} at target {row['target']}, seed {row['seed']} appears twice")
            per_seed[row["seed"]] = row
    seeds = sorted({s for per_seed in cells.values() for s in per_seed})
    criteria = list(dict.fromkeys(name for _, name, _ in cells))
    variants = [v for v in REPAIR_GRID if any(key[2] == v for key in cells)]

    def cell(target: float, name: str, variant: str, key: str) -> str:
        rows = cells.get((target, name, variant), {})
        values = [100 * r[key] for r in rows.values()]
        if not values:
            return "—"
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.1f}{spread}" + ("" if len(values) == len(seeds) else f" (n={len(values)})")

    lines = [f"Repair grid, {first['data']}: test accuracy (%), mean ± std over seeds {seeds}; each cell: right after "
             f"the step / after the {first['finetune_epochs']}-epoch fine-tuning fit. plain = selection only, ls = "
             "least-squares correction; nobn = stale BatchNorm statistics, bn = recalibrated.", "",
             "| target | criterion | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for target in sorted({key[0] for key in cells}):
        for name in criteria:
            row = [f"{cell(target, name, v, 'accuracy_after_prune')} / {cell(target, name, v, 'accuracy_after_finetune')}"
                   for v in variants]
            lines.append(f"| -{target:.0%} | {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report
README_START = "<!-- benchmark-compare:start -->"
README_END = "<!-- benchmark-compare:end -->"
README_FASHION_START = "<!-- benchmark-compare-fashion-mnist:start -->"
README_FASHION_END = "<!-- benchmark-compare-fashion-mnist:end -->"


def readme_summary(result: dict[str, Any]) -> str:
    """The README's condensed view: accuracy after the prune -> after fine-tuning per target, then
    MACs, prune time and latency (x dense) per method; means over seeds (``compare.md`` has the rest)."""
    config = result["config"]
    targets, methods = config["targets"], config["criteria"] + config["peers"]
    rows = {(r["target"], r["method"]): r for r in result["summary"]}

    def mean(row: dict[str, Any] | None, key: str) -> float | None:
        value = row.get(key) if row and row.get("ok") else None
        return None if value is None or value[0] is None or math.isnan(value[0]) else value[0]

    def pct(value: float | None, digits: int = 1) -> str:
        return "—" if value is None else f"{value * 100:.{digits}f}"

    head = "| method | " + " | ".join(f"-{t:.0%} MACs: acc. (%) after prune → after fine-tuning" for t in targets) + " |"
    lines = [head, "|---|" + "---|" * len(targets)]
    for method in methods:
        cells = [f"{pct(mean(rows.get((t, method)), 'accuracy_after_prune'))} → "
                 f"{pct(mean(rows.get((t, method)), 'accuracy_after_finetune'))}" for t in targets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| method | " + " | ".join(f"-{t:.0%}: MACs removed, prune (s), latency b1 / b64 (x dense)" for t in targets) + " |",
              "|---|" + "---|" * len(targets)]
    for method in methods:
        cells = []
        for t in targets:
            row = rows.get((t, method))
            flops, seconds = mean(row, "flops_reduction"), mean(row, "prune_seconds")
            b1, b64 = mean(row, "latency_ratio_1"), mean(row, "latency_ratio_64")
            cells.append("—" if flops is None else f"{pct(flops)}%, {seconds:.2f} s, {b1:.2f} / {b64:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _partial_epochs(config: dict[str, Any]) -> str:
    limit = config.get("limit_train_batches", 1.0)
    return "" if limit in (None, 1, 1.0) else f"; every epoch trains on {limit:g} of the training batches"


def _accelerator(config: dict[str, Any], m: dict[str, Any]) -> str:
    accelerator = config.get("accelerator", "cpu")
    return "CPU" if accelerator == "cpu" else f"{accelerator} ({m.get('gpu', '?')}, {config.get('devices', 1)} device(s))"


def _wall_time(result: dict[str, Any]) -> str:
    each = result.get("wall_seconds_each", [result["wall_seconds"]])
    if len(each) == 1:
        return f"Wall time of the run: {result['wall_seconds'] / 60:.1f} min."
    return f"Merged from {len(each)} runs (one per seed group) of {', '.join(f'{s / 60:.1f}' for s in each)} min."


def markdown(result: dict[str, Any]) -> str:
    config, m = result["config"], result["machine"]
    dense = result["dense"]
    runs = result["runs"]
    n = len(config["seeds"])
    lines = [
        f"{config.get('title', 'Digits, SmallResNet (32, 64, 128)')}; {n} seed(s) ({', '.join(map(str, config['seeds']))}), "
        "mean ± std over seeds. "
        f"Dense: {config['dense_epochs']} epochs, test accuracy {fmt([d['accuracy'] for d in dense], digits=2)}, "
        f"{dense[0]['macs']:,} MACs, {dense[0]['params']:,} params, {fmt([d['epoch_seconds'] for d in dense], 'num')} s per epoch. "
        f"Every method prunes a copy of it, then the same {config['finetune_epochs']}-epoch fine-tuning fit "
        f"(SGD, lr {config['finetune_lr']}, cosine){_partial_epochs(config)}. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{_accelerator(config, m)}, {m['torch_threads']} torch "
        f"thread(s), torch {m['torch']}, lightning {m['lightning']}, torch-pruning {m['torch_pruning']}. "
        + _wall_time(result),
        "",
        "| target | method | MACs removed | params removed | non-zero params removed | acc. after prune | acc. after fine-tuning | prune step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def failed(row: dict[str, Any]) -> str:
        return f"**failed** on {row['seeds'] - row['ok']}/{row['seeds']} seed(s): {'; '.join(row['errors'])}"

    def pick(target, method, key):
        return [r[key] for r in runs if r["target"] == target and r["method"] == method and r["ok"]]

    for row in result["summary"]:
        t, meth = row["target"], row["method"]
        if not row["ok"]:
            lines.append(f"| {t:.0%} | {meth} | {failed(row)} | | | | | |")
            continue
        mark = "" if row["ok"] == row["seeds"] else f" ({failed(row)})"
        lines.append(
            f"| {t:.0%} | {meth}{mark} | {fmt(pick(t, meth, 'flops_reduction'))} | {fmt(pick(t, meth, 'params_reduction'))} "
            f"| {fmt(pick(t, meth, 'nonzero_params_reduction'))} | {fmt(pick(t, meth, 'accuracy_after_prune'), digits=2)} "
            f"| {fmt(pick(t, meth, 'accuracy_after_finetune'), digits=2)} | {fmt(pick(t, meth, 'prune_seconds'), 'num', 3)} |"
        )
    groups = {(r["seed"], r["target"]): r["dense_latency_ms"] for r in runs if r["ok"]}
    dense_lat = {b: [g[b] for g in groups.values()] for b in ("1", "64")}
    lines += [
        "",
        f"{'CPU' if config.get('accelerator', 'cpu') == 'cpu' else 'GPU'} latency (ms per forward, median of "
        f"{config['latency_rounds']} interleaved rounds; "
        f"dense: {fmt(dense_lat['1'], 'num', 3)} ms at batch 1, {fmt(dense_lat['64'], 'num', 3)} ms at batch 64), "
        "as measured and as a multiple of the dense model timed in the same rounds:",
        "",
        "| target | method | MACs (measured) | batch 1 (ms) | batch 1 (x dense) | batch 64 (ms) | batch 64 (x dense) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        t, meth = row["target"], row["method"]
        if not row["ok"]:
            continue
        lat = {b: [r["latency_ms"][b] for r in runs if r["target"] == t and r["method"] == meth and r["ok"]] for b in ("1", "64")}
        ratio = {b: [r["latency_ratio"][b] for r in runs if r["target"] == t and r["method"] == meth and r["ok"]] for b in ("1", "64")}
        macs = row["macs"][0]
        lines.append(
            f"| {t:.0%} | {meth} | {macs / 1e6:.3f}M | {fmt(lat['1'], 'num', 3)} | {fmt(ratio['1'], 'x')} "
            f"| {fmt(lat['64'], 'num', 3)} | {fmt(ratio['64'], 'x')} |"
        )
    notes = [f"- {row['method']} at {row['target']:.0%}: {note}" for row in result["summary"] for note in row["notes"]]
    tp_rows = [r for r in runs if r["method"] == TP and r["ok"]]
    if tp_rows:
        over = max(r["tp_counted_flops_reduction"] - r["target"] for r in tp_rows)
        notes.append(
            f"- {TP}: progressive steps stop at the first step at or past the target in tp's own MAC count "
            f"(which also counts BN/ReLU/pooling; at most {max(abs(r['tp_counted_flops_reduction'] - r['flops_reduction']) for r in tp_rows):.1%} "
            f"away from ours); largest overshoot {over:.1%} of the dense MACs."
        )
    mp_rows = [r for r in runs if r["method"] == MP and r["ok"]]
    if mp_rows:
        notes.append(
            f"- {MP}: masks only; measured MACs equal the dense model's in {sum(r['macs'] == d['macs'] for r in mp_rows for d in dense if d['seed'] == r['seed'])}"
            f"/{len(mp_rows)} runs, parameters stay {mp_rows[0]['params']:,} (zeros are counted as non-zero params removed). "
            "A zeroed convolution channel still feeds its BatchNorm's shift into the next layer."
        )
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def output_stem(config: dict[str, Any]) -> str:
    """File stem of a run's outputs: ``compare`` (digits) or ``compare_<data>``, ``_repair`` added for
    ``--repair-grid`` (which therefore never overwrites the comparison's files)."""
    data = config.get("data", "digits")
    stem = "compare" if data == "digits" else "compare_" + data.replace("-", "_")
    return stem + ("_repair" if config.get("repair_grid") else "")


def plot_repair(result: dict[str, Any], out: Path, stem: str) -> str:
    """``--repair-grid``: one column per variant (correction x recalibration), accuracy right after the
    prune (top) and after fine-tuning (bottom) against MACs, one colour per criterion in every panel."""
    import matplotlib.pyplot as plt

    config = result["config"]
    dense_macs = result["dense"][0]["macs"]
    variants = list(dict.fromkeys(m[:-1].split(" [", 1)[1] for m in config["criteria"] if m.endswith("]")))
    names = list(dict.fromkeys(m.split(" [", 1)[0] for m in config["criteria"]))
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(2, len(variants), figsize=(3.6 * len(variants), 6.4), sharex=True, sharey="row", squeeze=False)
    acc = [100 * d["accuracy"] for d in result["dense"]]
    for col, variant in enumerate(variants):
        for row, key in enumerate(("accuracy_after_prune", "accuracy_after_finetune")):
            ax = axes[row][col]
            for i, name in enumerate(names):
                rows = [r for r in result["summary"] if r["method"] == f"{name} [{variant}]" and r["ok"]]
                if rows:
                    ax.errorbar(
                        [100 * r["macs"][0] / dense_macs for r in rows], [100 * r[key][0] for r in rows],
                        yerr=[100 * (0 if math.isnan(r[key][1]) else r[key][1]) for r in rows],
                        label=name, color=colors[i % len(colors)], marker="o", capsize=2, markersize=3,
                    )
            ax.axhline(sum(acc) / len(acc), color="black", linewidth=0.8, linestyle=":")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"[{variant}]", fontsize=9)
            if col == 0:
                ax.set_ylabel("test accuracy (%), " + ("right after the prune" if row == 0 else f"after {config['finetune_epochs']} epoch(s)"))
            if row == 1:
                ax.set_xlabel("MACs, % of dense")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{config.get('title', 'Digits, SmallResNet')}: ls = least-squares correction, bn = BN recalibration; "
        f"mean ± std over {len(config['seeds'])} seed(s); dotted: dense",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / f"{stem}_variants.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["config"]
    methods = config["criteria"] + config["peers"]
    dense_macs = result["dense"][0]["macs"]
    colors = [c for k, c in enumerate(plt.get_cmap("tab10").colors) if k != 7]  # grey and black are the peers'
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=False)
    for ax, key, title in zip(
        axes, ("accuracy_after_prune", "accuracy_after_finetune"), ("right after the prune", f"after {config['finetune_epochs']} fine-tuning epoch(s)")
    ):
        for i, method in enumerate(methods):
            rows = [r for r in result["summary"] if r["method"] == method and r["ok"]]
            if not rows:
                continue
            x = [100 * r["macs"][0] / dense_macs for r in rows]
            y = [100 * r[key][0] for r in rows]
            err = [100 * (0 if math.isnan(r[key][1]) else r[key][1]) for r in rows]
            peer = method in PEERS
            ax.errorbar(
                x, y, yerr=err, label=method, marker="s" if peer else "o", linestyle="--" if peer else "-",
                color="black" if method == TP else "grey" if method == MP else colors[i % len(colors)], capsize=2, markersize=4,
            )
        acc = [100 * d["accuracy"] for d in result["dense"]]
        ax.axhline(sum(acc) / len(acc), color="black", linewidth=0.8, linestyle=":", label="dense")
        ax.set_xlabel("MACs, % of dense (measured)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Accuracy {title}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{config.get('title', 'Digits, SmallResNet')}: mean ± std over {len(config['seeds'])} seed(s)")
    fig.tight_layout()
    stem = output_stem(config)
    accuracy_png = out / f"{stem}_accuracy.png"
    fig.savefig(accuracy_png, dpi=110)
    plt.close(fig)

    widths = result["widths"]
    names = list(widths["dense"])
    shown = [m for m in methods if m in widths["methods"]]
    cols = 4
    rows_n = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 2.6 * rows_n), sharey=True, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, method in zip(axes.flat, shown):
        ax.set_visible(True)
        ax.bar(range(len(names)), [widths["dense"][n] for n in names], color="lightgrey", label="dense")
        ax.bar(range(len(names)), [widths["methods"][method].get(n, 0) for n in names], color="tab:blue", label="kept")
        ax.set_title(method, fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.removeprefix("net.") for n in names], rotation=70, fontsize=5)
    axes[0][0].set_ylabel("output channels")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(
        f"Convolution widths at the {widths['target']:.0%} MACs target, seed {widths['seed']} "
        "(ModelPruning: channels not all zero; its tensors keep the dense shape)",
        fontsize=9,
    )
    fig.tight_layout()
    widths_png = out / f"{stem}_widths.png"
    fig.savefig(widths_png, dpi=110)
    plt.close(fig)
    return [str(accuracy_png), str(widths_png)] + ([plot_repair(result, out, stem)] if config.get("repair_grid") else [])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="fashion-mnist: where torchvision's layout is")
    parser.add_argument("--depth", type=int, default=20, help="fashion-mnist: CIFAR ResNet depth, 6n+2 (default 20)")
    parser.add_argument("--batch-size", type=int, default=128, help="fashion-mnist: training batch size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=None, help="default: 0.3 0.5 0.7 0.9 (digits), 0.5 0.7 0.9")
    parser.add_argument("--criteria", nargs="+", default=None, help="default: every registered criterion")
    parser.add_argument("--dense-epochs", type=int, default=None, help="default: 8 (digits), 30 (fashion-mnist)")
    parser.add_argument("--dense-lr", type=float, default=None, help="default: 0.05 (digits), 0.1 (fashion-mnist)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: 3 (digits), 5 (fashion-mnist)")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--no-peers", action="store_true", help="only lightning-prune's criteria (no torch-pruning, no ModelPruning)")
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="fraction (or count) of training batches per epoch")
    parser.add_argument("--test-batches", type=int, default=None, help="evaluate on the first N test batches only (default: all)")
    parser.add_argument("--max-layer-ratio", type=float, default=0.9)
    parser.add_argument("--correction-ridge", type=_ridge_argument, default=None,
                        help="correction_ridge of every lightning-prune run: a number or gcv (default: the library's)")
    parser.add_argument("--tp-steps", type=int, default=400)
    parser.add_argument("--latency-rounds", type=int, default=15)
    parser.add_argument("--repair-grid", action="store_true", help="every criterion with/without correction and BN recalibration")
    parser.add_argument("--repair-variants", nargs="+", choices=list(REPAIR_VARIANTS), default=None,
                        help="--repair-grid: only these variants (default: all four)")
    add_common_arguments(parser, "1 seed, target 50%%, l1 + pls_vip + both peers, 1 epoch")
    parser.add_argument("--readme", type=Path, default=None, help=f"also put the summary between {README_START} / {README_END}")
    parser.add_argument("--grid-from-json", type=Path, nargs="+", default=None,
                        help="no run: the repair grid (every variant side by side) of several --repair-grid results "
                             "on the same dense models, written to <out>/<data stem>_repair_grid.md")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="no run: redo the tables, plots and README from compare.json files (several: runs of the same "
                             "arguments on different seeds, merged)")
    args = parser.parse_args(argv)
    if args.grid_from_json:
        results = [json.loads(path.read_text()) for path in args.grid_from_json]
        table = repair_grid_table(results)
        out = output_dir(args)
        stem = output_stem({**results[0]["config"], "repair_grid": False})
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}_repair_grid.md").write_text(table + "\n")
        print(table)
        log(f"wrote {out / (stem + '_repair_grid.md')}")
        return {"grid": table}
    fashion = args.data == "fashion-mnist"
    args.targets = args.targets or ([0.5, 0.7, 0.9] if fashion else [0.3, 0.5, 0.7, 0.9])
    args.dense_epochs = args.dense_epochs or (30 if fashion else 8)
    args.dense_lr = args.dense_lr or (0.1 if fashion else 0.05)
    args.finetune_epochs = args.finetune_epochs or (5 if fashion else 3)
    if args.smoke:
        args.seeds, args.targets = args.seeds[:1], [0.5]
        args.criteria = args.criteria or (["l1"] if fashion else SMOKE_CRITERIA)
        args.dense_epochs = args.finetune_epochs = 1
        args.latency_rounds = 3
        if fashion:  # the real files and the data path end to end on a few batches, not numbers
            args.depth, args.limit_train_batches, args.test_batches = 8, 3, 2
            args.no_peers, args.latency_rounds = True, 1
    args.peers = [] if args.no_peers else list(PEERS)
    args.criteria = [get_criterion(c).name or c for c in (args.criteria or criteria_names())]
    if "l1" not in args.criteria:
        log("note: l1 is not benchmarked; ModelPruning's amount comes from an l1 plan on a copy")
    args.out = output_dir(args)
    setup_threads(args.threads)
    limit = args.limit_train_batches
    set_trainer(args.accelerator, args.devices, int(limit) if limit > 1 else limit)

    result = merge_results([json.loads(path.read_text()) for path in args.from_json]) if args.from_json else run(args)
    table = markdown(result)
    stem = output_stem(result["config"])
    write_outputs(args.out, stem, result, table)
    pngs = plot(result, args.out)
    print(table)
    log(f"wrote {args.out / (stem + '.json')}, {args.out / (stem + '.md')}, {', '.join(pngs)}")
    if result["config"].get("repair_grid"):
        if args.readme is not None:
            log(f"{args.readme}: left untouched (the README summarises the comparison, not --repair-grid)")
    else:
        start, end = (README_START, README_END) if stem == "compare" else (README_FASHION_START, README_FASHION_END)
        refresh_readme(args.readme, start, end, readme_summary(result))
    return result


if __name__ == "__main__":
    main()
