"""Benchmark: collection overhead and the criteria side by side on the digits model.

Everything is measured in one run, on one machine, side by side:

1. Collection overhead: fit time with activation hooks collecting on *every* training step
   (``pls_vip``'s pooled reservoir, ``pca_gm``'s streaming covariance; no pruning, so the model
   stays the same) against the same fit with no callback. Runs are interleaved and repeated;
   medians are reported. Goal: at most 3% more.
2. Criteria at the same MACs reduction: one dense model is trained once; each criterion prunes
   a copy at the start of a fine-tuning fit (``prune_on_train_start``, with a dedicated
   collection pass for activation criteria). Reported: test accuracy right after the prune
   (before any fine-tuning), after fine-tuning, the prune-step time and the collection time.

    python examples/benchmark_criteria.py [--target 0.5] [--repeats 3] [--out benchmark_results]

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

CRITERIA = ["l1", "random", "fpgm", "pls_vip", "pca_gm"]


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


class CollectEveryStep(L.Callback):
    """Attaches the criteria's collectors for the whole fit (the worst case: every step collects)."""

    def __init__(self, criteria: list[str]) -> None:
        self.criteria = [get_criterion(c) for c in criteria]
        self.collectors: list[ActivationCollector] = []

    def on_train_start(self, trainer, pl_module):
        x = next(iter(trainer.train_dataloader))[0][:2]
        groups = ChannelPruner(self.criteria[0]).analyse(pl_module, x).groups
        for criterion in self.criteria:
            collector = ActivationCollector(pl_module, criterion.activation_requests(groups))
            collector.attach()
            self.collectors.append(collector)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for c in self.collectors:
            c.begin_batch(batch[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for c in self.collectors:
            c.end_batch()

    def on_train_end(self, trainer, pl_module):
        for c in self.collectors:
            c.store()
            c.detach()


def timed_fit(epochs: int, callbacks: list, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    model = make_model(epochs)
    start = time.perf_counter()
    trainer(epochs, callbacks).fit(model, DigitsDataModule(seed=seed))
    return time.perf_counter() - start


def overhead(epochs: int, repeats: int, seed: int) -> dict:
    plain, collecting = [], []
    timed_fit(1, [], seed)  # warm-up
    for _ in range(repeats):
        plain.append(timed_fit(epochs, [], seed))
        collecting.append(timed_fit(epochs, [CollectEveryStep(["pls_vip", "pca_gm"])], seed))
    return {
        "fit_seconds_no_callback": plain,
        "fit_seconds_collecting_every_step": collecting,
        "median_ratio": statistics.median(collecting) / statistics.median(plain),
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


def compare(target: float, dense_epochs: int, finetune_epochs: int, seed: int) -> tuple[dict, list[dict]]:
    L.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(seed=seed)
    datamodule.setup()
    dense = make_model(dense_epochs)
    trainer(dense_epochs, []).fit(dense, datamodule)
    x = torch.randn(2, 1, 8, 8)
    dense_cost = count_cost(dense, x)
    dense_row = {"accuracy": accuracy(dense, datamodule), "macs": dense_cost.macs, "params": dense_cost.params}
    rows = []
    for name in CRITERIA:
        L.seed_everything(seed, verbose=False)
        model = copy.deepcopy(dense)
        model.hparams.max_epochs = finetune_epochs
        model.hparams.lr = 0.01
        pruning = StructuredPruningCallback(name, target_flops_reduction=target, prune_on_train_start=True, verbose=False, seed=seed)
        probe = AccuracyAfterPrune(datamodule)
        start = time.perf_counter()
        trainer(finetune_epochs, [pruning, probe]).fit(model, datamodule)
        total = time.perf_counter() - start
        cost = count_cost(model, x)
        record = pruning.history[0]
        rows.append(
            {
                "criterion": name,
                "flops_reduction": 1 - cost.macs / dense_cost.macs,
                "params_reduction": 1 - cost.params / dense_cost.params,
                "accuracy_before_finetune": probe.value,
                "accuracy_after_finetune": accuracy(model, datamodule),
                "prune_step_seconds": record.seconds,
                "finetune_fit_seconds": total,
            }
        )
    return dense_row, rows


def markdown(result: dict) -> str:
    o = result["overhead"]
    lines = [
        f"Collection overhead ({result['overhead_epochs']} epochs, median of {len(o['fit_seconds_no_callback'])}): "
        f"no callback {statistics.median(o['fit_seconds_no_callback']):.2f} s, collecting every step "
        f"{statistics.median(o['fit_seconds_collecting_every_step']):.2f} s, ratio **{o['median_ratio']:.3f}**",
        "",
        f"Dense: test accuracy {result['dense']['accuracy']:.2%}, {result['dense']['macs']:,} MACs, {result['dense']['params']:,} params. "
        f"Target: {result['target']:.0%} of the MACs removed at the start of a {result['finetune_epochs']}-epoch fine-tuning fit.",
        "",
        "| criterion | MACs removed | params removed | acc. before fine-tuning | acc. after fine-tuning | prune step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["criteria"]:
        lines.append(
            f"| {r['criterion']} | {r['flops_reduction']:.1%} | {r['params_reduction']:.1%} | {r['accuracy_before_finetune']:.2%} "
            f"| {r['accuracy_after_finetune']:.2%} | {r['prune_step_seconds']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-epochs", type=int, default=3)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
    args = parser.parse_args()

    result = {
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "target": args.target,
        "overhead_epochs": args.overhead_epochs,
        "finetune_epochs": args.finetune_epochs,
        "overhead": overhead(args.overhead_epochs, args.repeats, args.seed),
    }
    result["dense"], result["criteria"] = compare(args.target, args.dense_epochs, args.finetune_epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "criteria.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "criteria.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
