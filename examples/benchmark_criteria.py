"""Benchmark: collection overhead and the criteria side by side on the digits model.

Everything is measured in one run, on one machine, side by side:

1. Collection overhead, two ways:
   a. per training step, worst case: the criterion's hooks collecting on every step (no
      pruning, the model stays the same) against the same steps with no hook, interleaved;
   b. per fit: a whole fit with the hooks collecting on every step (no pruning, so the model
      is the same) against the same fit with no callback (the callback itself only collects in
      the epoch before each step, so this is its worst case).
   Runs are interleaved; min and median over repeats. Goal: at most 3% more.
2. Criteria at the same MACs reductions (30, 50, 70%): one dense model is trained once; each
   criterion prunes a copy at the start of a fine-tuning fit (``prune_on_train_start``, with a dedicated
   collection pass for activation criteria). Reported: test accuracy right after the prune
   (before any fine-tuning), after fine-tuning, and the prune-step time, also as a multiple of one
   training epoch of the dense model (``filter_ensembles`` at its default budget).

    python examples/benchmark_criteria.py [--targets 0.3 0.5 0.7] [--repeats 5] [--out benchmark_results]

Writes ``criteria.json`` and ``criteria.md`` under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from lightning_prune import StructuredPruningCallback, count_cost, get_criterion
from lightning_prune.collection import ActivationCollector
from lightning_prune.data import DigitsDataModule
from lightning_prune.engine import ChannelPruner
from lightning_prune.models import ImageClassifier, SmallResNet

CRITERIA = ["l1", "random", "fpgm", "pls_vip", "pca_gm", "di", "id", "filter_ensembles"]


def make_model(epochs: int) -> ImageClassifier:
    return ImageClassifier(SmallResNet(widths=(32, 64, 128), blocks_per_stage=1), lr=0.05, max_epochs=epochs)


def trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def step_overhead(criterion: str, repeats: int, seed: int) -> dict:
    """Median time of a training step with the criterion's hooks collecting vs without (interleaved)."""
    torch.manual_seed(seed)
    net = make_model(1).net
    datamodule = DigitsDataModule(seed=seed)
    datamodule.setup()
    x, y = next(iter(datamodule.train_dataloader()))
    groups = ChannelPruner(get_criterion("l1")).analyse(net, x[:2]).groups
    collector = ActivationCollector(net, get_criterion(criterion).activation_requests(groups))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step(collect: bool) -> None:
        if collect:
            collector.begin_batch(y)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        if collect:
            collector.end_batch()

    times = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            collector.attach() if mode == "on" else collector.detach()
            for _ in range(3):
                step(mode == "on")
            start = time.perf_counter()
            for _ in range(30):
                step(mode == "on")
            times[mode].append((time.perf_counter() - start) / 30 * 1e3)
    collector.detach()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "ms_per_step_without": off,
        "ms_per_step_collecting": on,
        "ratio": on / off,
        "min_ratio": min(times["on"]) / min(times["off"]),
        "samples_ms": times,
    }


def timed_fit(epochs: int, callbacks: list, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    model = make_model(epochs)
    start = time.perf_counter()
    trainer(epochs, callbacks).fit(model, DigitsDataModule(seed=seed))
    return time.perf_counter() - start


class CollectEveryStep(L.Callback):
    """The criterion's collector attached for the whole fit (the callback's worst case)."""

    def __init__(self, criterion: str) -> None:
        self.criterion = get_criterion(criterion)
        self.collector: ActivationCollector | None = None

    def on_train_start(self, trainer, pl_module):
        x = next(iter(trainer.train_dataloader))[0][:2]
        groups = ChannelPruner(self.criterion).analyse(pl_module, x).groups
        self.collector = ActivationCollector(pl_module, self.criterion.activation_requests(groups))
        self.collector.attach()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.collector.begin_batch(batch[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.collector.end_batch()

    def on_train_end(self, trainer, pl_module):
        self.collector.store()
        self.collector.detach()


def fit_overhead(epochs: int, repeats: int, seed: int) -> dict:
    runs: dict[str, list[float]] = {"none": [], "pls_vip": [], "pca_gm": []}
    timed_fit(1, [], seed)  # warm-up
    for _ in range(repeats):
        for name in runs:
            runs[name].append(timed_fit(epochs, [] if name == "none" else [CollectEveryStep(name)], seed))
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    return {
        "epochs": epochs,
        "fit_seconds": runs,
        "median_seconds": med,
        "min_seconds": best,
        "ratio": {k: med[k] / med["none"] for k in ("pls_vip", "pca_gm")},
        "min_ratio": {k: best[k] / best["none"] for k in ("pls_vip", "pca_gm")},
    }


def accuracy(model: torch.nn.Module, datamodule: DigitsDataModule) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train(was)
    return correct / total


class AccuracyAfterPrune(L.Callback):
    def __init__(self, datamodule):
        self.datamodule = datamodule
        self.value = None

    def on_train_start(self, trainer, pl_module):  # runs after the pruning callback's on_train_start
        self.value = accuracy(pl_module, self.datamodule)


def compare(targets: list[float], dense_epochs: int, finetune_epochs: int, seed: int) -> tuple[dict, list[dict]]:
    L.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(seed=seed)
    datamodule.setup()
    dense = make_model(dense_epochs)
    start = time.perf_counter()
    trainer(dense_epochs, []).fit(dense, datamodule)
    epoch_seconds = (time.perf_counter() - start) / dense_epochs
    x = torch.randn(2, 1, 8, 8)
    dense_cost = count_cost(dense, x)
    dense_row = {
        "accuracy": accuracy(dense, datamodule),
        "macs": dense_cost.macs,
        "params": dense_cost.params,
        "epoch_seconds": epoch_seconds,
    }
    rows = []
    for target, name in [(t, c) for t in targets for c in CRITERIA]:
        L.seed_everything(seed, verbose=False)
        model = copy.deepcopy(dense)
        model.hparams.max_epochs = finetune_epochs
        model.hparams.lr = 0.01
        kwargs = {"progress": False} if name == "filter_ensembles" else None
        pruning = StructuredPruningCallback(
            name, target_flops_reduction=target, prune_on_train_start=True, verbose=False, seed=seed, criterion_kwargs=kwargs
        )
        probe = AccuracyAfterPrune(datamodule)
        start = time.perf_counter()
        trainer(finetune_epochs, [pruning, probe]).fit(model, datamodule)
        total = time.perf_counter() - start
        cost = count_cost(model, x)
        record = pruning.history[0]
        rows.append(
            {
                "criterion": name,
                "target": target,
                "flops_reduction": 1 - cost.macs / dense_cost.macs,
                "params_reduction": 1 - cost.params / dense_cost.params,
                "accuracy_before_finetune": probe.value,
                "accuracy_after_finetune": accuracy(model, datamodule),
                "prune_step_seconds": record.seconds,
                "prune_step_epochs": record.seconds / epoch_seconds,
                "finetune_fit_seconds": total,
            }
        )
    return dense_row, rows


def markdown(result: dict) -> str:
    steps = result["step_overhead"]
    fit = result["fit_overhead"]
    med = fit["median_seconds"]
    lines = [
        "| collection overhead | pls_vip | pca_gm |",
        "|---|---|---|",
        "| per training step, every step collecting (ms without -> with) | "
        + " | ".join(
            f"{steps[c]['ms_per_step_without']:.2f} -> {steps[c]['ms_per_step_collecting']:.2f} "
            f"(median **{steps[c]['ratio']:.3f}x**, min {steps[c]['min_ratio']:.3f}x)"
            for c in ("pls_vip", "pca_gm")
        )
        + " |",
        f"| whole fit ({fit['epochs']} epochs), every step collecting vs no callback ({med['none']:.2f} s) | "
        + " | ".join(
            f"{med[c]:.2f} s (median **{fit['ratio'][c]:.3f}x**, min {fit['min_ratio'][c]:.3f}x)" for c in ("pls_vip", "pca_gm")
        )
        + " |",
        "",
        f"Dense: test accuracy {result['dense']['accuracy']:.2%}, {result['dense']['macs']:,} MACs, {result['dense']['params']:,} params, "
        f"{result['dense']['epoch_seconds']:.2f} s per training epoch. "
        f"Each criterion prunes a copy of it at the start of a {result['finetune_epochs']}-epoch fine-tuning fit.",
        "",
        "| target | criterion | MACs removed | params removed | acc. before fine-tuning | acc. after fine-tuning | prune step (s) | prune step (epochs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["criteria"]:
        lines.append(
            f"| {r['target']:.0%} | {r['criterion']} | {r['flops_reduction']:.1%} | {r['params_reduction']:.1%} | {r['accuracy_before_finetune']:.2%} "
            f"| {r['accuracy_after_finetune']:.2%} | {r['prune_step_seconds']:.3f} | {r['prune_step_epochs']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overhead-epochs", type=int, default=8)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
    args = parser.parse_args()

    result = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "targets": args.targets,
        "finetune_epochs": args.finetune_epochs,
        "step_overhead": {c: step_overhead(c, 4 * args.repeats, args.seed) for c in ("pls_vip", "pca_gm")},
        "fit_overhead": fit_overhead(args.overhead_epochs, args.repeats, args.seed),
    }
    result["dense"], result["criteria"] = compare(args.targets, args.dense_epochs, args.finetune_epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "criteria.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "criteria.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
