"""Benchmark: the least-squares correction's ridge when the Grams hold few rows, on torchvision models.

The correction reconstructs each removed channel from the kept ones, ``T = (G_SS + lambda I)^-1 G_SR``,
from the Gram of the activation a consumer reads. A Gram holds ``batches x batch size x positions``
rows: a late stage of a net fed small images (ResNet-18's last stage is 2 x 2 at 64 px) or a short
window gives it fewer rows than kept channels. A near-zero ridge (the default ``1e-6``) then fits those
rows exactly, and the consumer amplifies whatever the model sees next; ``correction_ridge="gcv"`` (the
default) chooses the ridge per consumer by generalised
cross-validation from the same Gram and its row count.

Per model (torchvision, built without weights, ``num_classes=10``): BatchNorm statistics are set from
``--batches`` generated batches (cumulative averages), the model goes to eval mode, and one
``ChannelPruner`` step of each of ``--criteria`` (default ``l1`` and ``interpolative_decomposition``) to
``--target`` MACs runs with the Grams (and the criterion's statistics) of those batches and BN
recalibration on them, for each variant:

* ``selection``: ``correction="none"`` (recalibration only);
* ``ridge 1e-6``: ``correction="least_squares", correction_ridge=1e-6`` (the default before GCV; the
  interpolative decomposition's paper ``T``);
* ``gcv``: ``correction="least_squares", correction_ridge="gcv"``.

Reported: the relative output error ``||f_pruned(x) - f_dense(x)|| / ||f_dense(x)||`` on 32 held-out
generated images (not seen by the Grams), the fewest Gram rows per kept channel over the consumers,
and the ridges GCV chose (median, max). Generated data through untrained nets: it measures the
correction's arithmetic (how well it carries the dense function to new inputs), not accuracy.

    python examples/benchmark_correction_ridge.py [--models resnet18 mobilenet_v2] [--batches 6 48] [--criteria l1]

Writes ``correction_ridge.json`` and ``correction_ridge.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_common_arguments, log, machine, output_dir, setup_threads, write_outputs  # noqa: E402
from torchvision_matrix import build_model  # noqa: E402

from lightning_prune import Target, get_criterion  # noqa: E402
from lightning_prune.collection import ActivationCollector  # noqa: E402
from lightning_prune.engine import ChannelPruner  # noqa: E402
from lightning_prune.engine.correction import find_gram  # noqa: E402
from lightning_prune.engine.recalibration import recalibrate_batchnorm  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "googlenet",
          "squeezenet1_1", "mnasnet1_0", "convnext_tiny"]
#: variant label -> (correction, correction_ridge)
VARIANTS: dict[str, tuple[str, float | str | None]] = {
    "selection": ("none", None),
    "ridge 1e-6": ("least_squares", 1e-6),
    "gcv": ("least_squares", "gcv"),
}
_GCV_NOTE = re.compile(r"GCV ridge ([^)]*)\)")


def _set_batchnorm_statistics(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Cumulative BN statistics of ``batches`` (an untrained net's defaults do not match its activations)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def run_model(
    name: str, image_size: int, batches: int, batch_size: int, target: float, criterion: str = "l1", seed: int = 0
) -> dict[str, Any]:
    """Every variant of ``criterion`` on one model; see the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(batch_size, 3, image_size, image_size, generator=gen) for _ in range(batches)]
    held = torch.randn(32, 3, image_size, image_size, generator=gen)
    dense = build_model(name, image_size, seed)
    _set_batchnorm_statistics(dense, data)
    with torch.no_grad():
        reference = dense(held)
    row: dict[str, Any] = {
        "model": name, "criterion": criterion, "batches": batches, "batch_size": batch_size, "image_size": image_size,
    }
    start = time.perf_counter()
    for label, (correction, ridge) in VARIANTS.items():
        model = copy.deepcopy(dense)
        crit = get_criterion(criterion)
        pruner = ChannelPruner(crit, correction=correction, correction_ridge=ridge)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = pruner.analyse(model, held[:2])
            requests = pruner.correction_requests(analysis.groups, model)
            scoring = [r for r in crit.activation_requests(analysis.groups) if r not in requests]  # what the criterion reads
            collector = ActivationCollector(model, [*scoring, *requests])
            collector.attach()
            with torch.no_grad():
                for batch in data:
                    collector.begin_batch()
                    model(batch)
                    collector.end_batch()
            collector.detach()
            store = collector.store()
            result = pruner.step(model, held[:2], Target("flops", target), context={"activations": store},
                                 recalibrate=lambda m: recalibrate_batchnorm(m, data))
        with torch.no_grad():
            out = model(held)
        row[label] = float((out - reference).norm() / reference.norm())
        if label == "gcv":
            chosen = [float(v) for note in (result.corrections or {}).values() for m in _GCV_NOTE.findall(note)
                      for v in m.split(", ")]
            row["gcv_ridges"] = {"median": statistics.median(chosen), "max": max(chosen)} if chosen else None
            grams = [g for g in (find_gram(store, r) for r in requests) if g is not None]
            row["min_rows_per_channel"] = min(g.count / g.gram.shape[0] for g in grams) if grams else None
        row[f"macs_removed {label}"] = result.after.reduction_from(result.before)[0]
    row["seconds"] = time.perf_counter() - start
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"One step to -{result['target']:.0%} MACs with BN recalibration, torchvision models without weights at "
        f"{result['image_size']} px, generated images; Grams from `batches` x {result['batch_size']} images. Relative "
        "output error vs the dense model on 32 held-out images (lower is better; bold: the best). "
        f"Machine: {m['cpu']}, torch {m['torch']}. Wall time: {result['wall_seconds'] / 60:.1f} min.",
        "",
        "| criterion | model | batches | Gram rows per channel (fewest) | selection | ridge 1e-6 | gcv "
        "| GCV ridges (median, max) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        errors = {label: row[label] for label in VARIANTS}
        best = min(errors.values())
        cells = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in errors.values()]
        ridges = row.get("gcv_ridges")
        chosen = f"{ridges['median']:.2g}, {ridges['max']:.2g}" if ridges else "-"
        rows = row.get("min_rows_per_channel")
        head = [row.get("criterion", "l1"), row["model"], str(row["batches"]), "-" if rows is None else f"{rows:.1f}"]
        lines.append("| " + " | ".join([*head, *cells, chosen]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--criteria", nargs="+", default=["l1", "interpolative_decomposition"])
    parser.add_argument("--batches", nargs="+", type=int, default=[6, 48], help="Gram windows to compare (default 6 48)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.3)
    add_common_arguments(parser, "one small model, one window, 32 px")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.image_size = ["resnet18"], [2], 32
    threads = setup_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for criterion in args.criteria:
        for name in args.models:
            for batches in args.batches:
                row = run_model(name, args.image_size, batches, args.batch_size, args.target, criterion)
                errors = ", ".join(f"{k} {row[k]:.3f}" for k in VARIANTS)
                log(f"{criterion}, {name} x {batches} batches: {errors} ({row['seconds']:.0f} s)")
                rows.append(row)
    result = {
        "machine": {**machine(), "threads": threads},
        "target": args.target, "image_size": args.image_size, "batch_size": args.batch_size,
        "rows": rows, "wall_seconds": time.perf_counter() - start,
    }
    table = markdown(result)
    print(table)
    write_outputs(output_dir(args), "correction_ridge", result, table)
    return result


if __name__ == "__main__":
    main()
