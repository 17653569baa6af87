"""Demo: prune half the MACs of a residual CNN during fit on scikit-learn's digits (no download).

Two runs with the same seed and schedule: a dense baseline and the same fit with
``StructuredPruningCallback`` (two pruning steps, fine-tuning in between and after). Prints dense
vs pruned test accuracy, MACs, parameters and CPU latency (batch 1 and 64, measured side by side).

    python examples/digits_demo.py [--criterion l1] [--target 0.5] [--epochs 12]
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

from lightning_prune import StructuredPruningCallback, available_criteria, count_cost, get_criterion
from lightning_prune.data import DigitsDataModule
from lightning_prune.engine import layer_widths
from lightning_prune.models import ImageClassifier, SmallResNet
from lightning_prune.reporting import plot_widths


def latency_ms(model: torch.nn.Module, batch: int, repeats: int = 30) -> list[float]:
    x = torch.randn(batch, 1, 8, 8)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def fit(args: argparse.Namespace, callbacks: list) -> tuple[ImageClassifier, float, float]:
    L.seed_everything(args.seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=64, seed=args.seed)
    model = ImageClassifier(SmallResNet(widths=(32, 64, 128), blocks_per_stage=1), lr=0.05, max_epochs=args.epochs)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - started
    accuracy = trainer.test(model, datamodule, verbose=False)[0]["test_acc"]
    return model, accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criterion", default="l1", choices=available_criteria())
    parser.add_argument("--target", type=float, default=0.5, help="fraction of MACs to remove")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--allocation", default=None, choices=["uniform", "global"],
                        help="default: global; criteria with a width rule of their own (DI, ID, PCA+GM) use it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="also save a widths-per-layer plot (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    steps = [args.epochs // 4, args.epochs // 2]
    if args.allocation is None and not get_criterion(args.criterion).has_width_rule():
        args.allocation = "global"
    print(f"Dense baseline: {args.epochs} epochs on digits ...")
    dense, dense_acc, dense_time = fit(args, [])
    print(f"Pruned run: '{args.criterion}' removes {args.target:.0%} of the MACs at the end of epochs {steps} ...")
    pruning = StructuredPruningCallback(
        args.criterion, target_flops_reduction=args.target, epochs=steps, allocation=args.allocation, seed=args.seed
    )
    pruned, pruned_acc, pruned_time = fit(args, [pruning])

    x = torch.randn(2, 1, 8, 8)
    dense_cost, pruned_cost = count_cost(dense, x), count_cost(pruned, x)
    dense.eval(), pruned.eval()
    lat = {}
    for batch in (1, 64):  # interleaved, so both models see the same machine load
        d, p = [], []
        for _ in range(3):
            d += latency_ms(dense, batch)
            p += latency_ms(copy.deepcopy(pruned), batch)
        lat[batch] = (statistics.median(d), statistics.median(p))

    rows = [
        ("test accuracy", f"{dense_acc:.2%}", f"{pruned_acc:.2%}", f"{pruned_acc - dense_acc:+.2%}"),
        ("MACs / sample", f"{dense_cost.macs:,}", f"{pruned_cost.macs:,}", f"{pruned_cost.macs / dense_cost.macs:.2f}x"),
        ("parameters", f"{dense_cost.params:,}", f"{pruned_cost.params:,}", f"{pruned_cost.params / dense_cost.params:.2f}x"),
        ("latency batch 1 (ms)", f"{lat[1][0]:.3f}", f"{lat[1][1]:.3f}", f"{lat[1][1] / lat[1][0]:.2f}x"),
        ("latency batch 64 (ms)", f"{lat[64][0]:.3f}", f"{lat[64][1]:.3f}", f"{lat[64][1] / lat[64][0]:.2f}x"),
        ("fit time (s)", f"{dense_time:.1f}", f"{pruned_time:.1f}", f"{pruned_time / dense_time:.2f}x"),
    ]
    print()
    print(f"{'':<22}{'dense':>14}{'pruned':>14}{'pruned/dense':>14}")
    for name, a, b, c in rows:
        print(f"{name:<22}{a:>14}{b:>14}{c:>14}")
    print()
    print("Widths after pruning:", {k: v for k, v in pruning.history[-1].widths.items() if "shortcut" not in k})
    if args.plot:
        plot_widths(pruning.history, layer_widths(dense), str(args.plot))
        print(f"Widths plot written to {args.plot}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "criterion": args.criterion,
                    "target_flops_reduction": args.target,
                    "dense": {"accuracy": dense_acc, "macs": dense_cost.macs, "params": dense_cost.params},
                    "pruned": {"accuracy": pruned_acc, "macs": pruned_cost.macs, "params": pruned_cost.params},
                    "latency_ms": {str(b): {"dense": d, "pruned": p} for b, (d, p) in lat.items()},
                    "history": [r.to_dict() for r in pruning.history],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
