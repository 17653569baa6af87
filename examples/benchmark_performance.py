"""Benchmark: what pruning costs and what it buys, on CPU, measured side by side in one run.

1. Collection overhead of every criterion that reads activations, two ways (interleaved, min and median
   over repeats; goal: at most 3% more):
   a. per training step, worst case: the criterion's hooks collecting on every step against the same
      steps with no hook, alternating step by step (medians per mode, and the median ratio of
      adjacent pairs with its interquartile range), one row per ``--overhead-data``: the digits model
      (a 12-14 ms step) and the Fashion-MNIST ResNet-20 (batch 128, a 0.2-0.3 s step), both by default;
   b. per fit: a whole fit with the hooks collecting on every step (no pruning, so the model stays the
      same) against the same fit with no callback. The callback itself only collects in the epoch
      before a pruning step, so this is its worst case.
2. Inference latency of pruned against dense models, next to the MAC ratio: the digits model
   (SmallResNet) and the CIFAR ResNet-56 (``lightning_prune.models.resnet56``), each pruned by ``l1`` to
   every target with the engine (``ChannelPruner``; latency does not depend on the weights' values),
   batch 1 and 64, all models of one architecture timed interleaved (median of rounds).
3. Memory the collector holds for one fit's statistics at 1x and 4x the data (digits repeated 4 times,
   ``DigitsDataModule(repeat=4)``): after every training batch the tensors reachable from the collector
   are walked (every distinct storage counted once at its full size, the model's own parameters not
   included) and the peak is kept; ``ActivationCollector.nbytes()`` (the library's own accounting) is
   reported beside it. This is the collector's device memory; the process RSS is not used (the CPU
   allocator caches freed blocks, so RSS deltas mostly measure the allocator).
4. Prune-step time vs one training epoch, every registered criterion at its default settings on the
   digits benchmark model (one step to -50% MACs at the start of a fit, the step's own seconds from
   its record: scoring, allocation and surgery; the activation criteria's collection is not in it,
   since during training it rides on the epoch's forward passes), against the median training epoch
   of the same model (epochs after the first of a dense fit); median over ``--repeats``, criteria
   interleaved. ``filter_ensembles`` twice: ``masks_per_pass=1`` (one mask per forward pass, as before
   batching) and the default (masks stacked along the batch). ``--step-data fashion-mnist`` measures the
   same on the comparison benchmark's model (CIFAR ResNet-20 on Fashion-MNIST, batch 128): there a whole
   epoch (430 batches) is estimated as the median of 20 timed training batches times the batches per
   epoch, each step is followed by 2 training batches, and the activation criteria collect over 20
   batches (``collect_batches=20``) before it.

    python examples/benchmark_performance.py [--targets 0.3 0.5 0.7 0.9] [--repeats 5] [--out examples/results]
    python examples/benchmark_performance.py --sections prune_step --repeats 3   # one section only
    python examples/benchmark_performance.py --smoke --out /tmp/smoke      # CI

Writes ``performance.json`` and ``performance.md`` under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _bench import (
    add_common_arguments,
    add_malloc_argument,
    criteria_names,
    latency_ms,
    log,
    machine,
    make_model,
    make_trainer,
    output_dir,
    refresh_readme,
    setup_malloc,
    setup_threads,
    write_outputs,
)
from torch import nn

from lightning_prune import StructuredPruningCallback, Target, count_cost, get_criterion
from lightning_prune.collection import ActivationCollector
from lightning_prune.data import DigitsDataModule, FashionMNISTDataModule
from lightning_prune.engine import ChannelPruner
from lightning_prune.models import CifarResNet, ImageClassifier, SmallResNet, resnet56

#: suffix of a criterion name in ``--criteria`` that also collects what ``correction="least_squares"`` reads
CORRECTED = "+least_squares"
COLLECTING = ["pls_vip", "pca_gm", "discriminant_information", "interpolative_decomposition", "l1" + CORRECTED]
NUM_CLASSES = 10
SECTIONS = ("overhead", "latency", "memory", "prune_step")
#: what the overhead table calls the model of each ``--overhead-data``
OVERHEAD_MODELS = {
    "digits": "the digits model (SmallResNet 32/64/128, batch 64)",
    "fashion-mnist": "the Fashion-MNIST ResNet-20 (batch 128)",
}
#: the unbatched filter ensembles next to the default, in the prune-step section
FE_UNBATCHED = "filter_ensembles (masks_per_pass=1)"


# ---------------------------------------------------------------------------------------------- 1. overhead
def new_collector(model: nn.Module, criterion: str, example: torch.Tensor) -> ActivationCollector:
    """The collector the callback would build for ``criterion`` (same requests and defaults); with the
    :data:`CORRECTED` suffix, also the Gram matrices the least-squares correction reads."""
    name = criterion.removesuffix(CORRECTED)
    crit = get_criterion(name)
    pruner = ChannelPruner(crit, correction="least_squares" if criterion.endswith(CORRECTED) else None)
    groups = pruner.analyse(model, example).groups
    requests = list(crit.activation_requests(groups))
    requests += [r for r in pruner.correction_requests(groups, model) if r not in requests]
    return ActivationCollector(model, requests, num_classes=NUM_CLASSES)


def step_overhead(criterion: str, repeats: int, seed: int, steps: int = 30, bench: StepBench | None = None) -> dict[str, Any]:
    """Median time of a training step with the criterion's hooks collecting vs without (interleaved);
    on ``bench``'s model and data (default: the digits benchmark model)."""
    torch.manual_seed(seed)
    net = (bench.model(1) if bench is not None else make_model(1)).net
    datamodule = bench.datamodule(seed) if bench is not None else DigitsDataModule(seed=seed)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    collector = new_collector(net, criterion, x[:2])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step(collect: bool) -> None:
        if collect:
            collector.begin_batch(y)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        if collect:
            collector.end_batch()

    # Every step timed on its own, hooks on and off alternating step by step (the order flips every
    # pair): on a shared or virtualised CPU the speed drifts by 10-30% over seconds, which blocks of
    # steps per mode would read as overhead; adjacent steps see the same machine.
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for mode in ("off", "on") * 3:  # warm-up, both modes
        collector.attach() if mode == "on" else collector.detach()
        step(mode == "on")
    for i in range(repeats * steps):
        for mode in (("off", "on") if i % 2 else ("on", "off")):
            collector.attach() if mode == "on" else collector.detach()
            start, start_cpu = time.perf_counter(), time.process_time()
            step(mode == "on")
            times[mode].append((time.perf_counter() - start) * 1e3)
            cpu[mode].append((time.process_time() - start_cpu) * 1e3)
    collector.detach()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    pairs = sorted(a / b for a, b in zip(times["on"], times["off"]))
    return {
        "ms_per_step_without": off,
        "ms_per_step_collecting": on,
        "ratio": on / off,
        "min_ratio": min(times["on"]) / min(times["off"]),
        # median over adjacent (on, off) pairs of their ratio, and its interquartile range
        "pair_ratio": statistics.median(pairs),
        "pair_ratio_iqr": (pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]),
        # CPU time of this process: what other jobs on a shared machine disturb least
        "cpu_ratio": statistics.median(cpu["on"]) / statistics.median(cpu["off"]),
        "samples_ms": times,
        "samples_cpu_ms": cpu,
    }


class CollectEveryStep(L.Callback):
    """The criterion's collector attached for the whole fit (the callback's worst case).

    ``probe(collector)``, when given, runs after every training batch (memory accounting).
    """

    def __init__(self, criterion: str, probe=None) -> None:
        self.criterion = criterion
        self.probe = probe
        self.collector: ActivationCollector | None = None

    def on_train_start(self, trainer, pl_module):
        x = next(iter(trainer.train_dataloader))[0][:2]
        self.collector = new_collector(pl_module, self.criterion, x)
        self.collector.attach()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.collector.begin_batch(batch[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.collector.end_batch()
        if self.probe is not None:
            self.probe(self.collector)

    def on_train_end(self, trainer, pl_module):
        self.collector.store()
        if self.probe is not None:
            self.probe(self.collector)
        self.collector.detach()


def timed_fit(epochs: int, callbacks: list, seed: int, repeat: int = 1) -> float:
    L.seed_everything(seed, verbose=False)
    model = make_model(epochs)
    start = time.perf_counter()
    make_trainer(epochs, callbacks).fit(model, DigitsDataModule(seed=seed, repeat=repeat))
    return time.perf_counter() - start


def fit_overhead(criteria: list[str], epochs: int, repeats: int, seed: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"none": [], **{c: [] for c in criteria}}
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
        "ratio": {k: med[k] / med["none"] for k in criteria},
        "min_ratio": {k: best[k] / best["none"] for k in criteria},
    }


# ---------------------------------------------------------------------------------------------- 2. latency
def pruned_latency(name: str, dense: nn.Module, input_shape: tuple[int, ...], targets: list[float], rounds: int) -> dict[str, Any]:
    example = torch.randn(2, *input_shape)
    dense.eval()
    dense_cost = count_cost(dense, example)
    models: dict[str, nn.Module] = {"dense": dense}
    rows = []
    for target in targets:
        model = copy.deepcopy(dense)
        row: dict[str, Any] = {"target": target}
        try:
            result = ChannelPruner(get_criterion("l1")).step(model, example, Target("flops", target))
            cost = count_cost(model, example)
            row.update(
                ok=True,
                macs=cost.macs,
                params=cost.params,
                macs_ratio=cost.macs / dense_cost.macs,
                params_ratio=cost.params / dense_cost.params,
                prune_seconds=result.seconds,
            )
            models[f"{target:.0%}"] = model
        except Exception as error:  # recorded, not hidden
            row.update(ok=False, error=f"{type(error).__name__}: {error}")
        rows.append(row)
    latency = latency_ms(models, input_shape, rounds=rounds)
    for row in rows:
        if row["ok"]:
            key = f"{row['target']:.0%}"
            row["latency_ms"] = latency[key]
            row["latency_ratio"] = {b: latency[key][b] / latency["dense"][b] for b in latency["dense"]}
        log(
            f"latency {name} -{row['target']:.0%}: "
            + (f"MACs x{row['macs_ratio']:.2f}, batch 1 x{row['latency_ratio']['1']:.2f}, batch 64 x{row['latency_ratio']['64']:.2f}"
               if row["ok"] else f"FAILED {row['error']}")
        )
    return {
        "input_shape": list(input_shape),
        "dense": {"macs": dense_cost.macs, "params": dense_cost.params, "latency_ms": latency["dense"]},
        "rows": rows,
    }


def resnet56_latency(targets: list[float], rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return pruned_latency("resnet56", resnet56(), (3, 32, 32), targets, rounds)


# ---------------------------------------------------------------------------------------------- 3. memory
def held_bytes(collector: ActivationCollector) -> int:
    """Bytes of every distinct tensor storage reachable from the collector's attributes (the model excluded)."""
    storages: set[int] = set()
    total = 0
    stack: list[Any] = [v for k, v in vars(collector).items() if k != "model"]
    visited: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited or isinstance(obj, (nn.Module, str, int, float, bool, type(None))):
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


def collection_memory(criterion: str, repeat: int, seed: int) -> dict[str, Any]:
    peak = {"walked": 0, "nbytes": 0}

    def probe(collector: ActivationCollector) -> None:
        peak["walked"] = max(peak["walked"], held_bytes(collector))
        peak["nbytes"] = max(peak["nbytes"], collector.nbytes())

    callback = CollectEveryStep(criterion, probe)
    seconds = timed_fit(1, [callback], seed, repeat=repeat)
    collector = callback.collector
    return {
        "repeat": repeat,
        "samples": collector.samples_seen,
        "batches": collector.batches,
        "peak_bytes": peak["walked"],
        "peak_nbytes_reported": peak["nbytes"],
        "final_bytes": held_bytes(collector),
        "statistics": sorted({r.statistic for r in collector.requests}),
        "fit_seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------- 4. prune step
class EpochTimer(L.Callback):
    """Wall seconds of every training epoch (start to end of the epoch's hooks)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._start)


class BatchTimer(L.Callback):
    """Wall seconds of every training batch (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)


@dataclass(frozen=True)
class StepBench:
    """The model and data of the prune-step section (``--step-data``)."""

    name: str
    title: str
    model: Callable[[int], ImageClassifier]  #: epochs -> dense model
    datamodule: Callable[[int], L.LightningDataModule]  #: seed -> data
    #: a full epoch is timed (digits) or estimated as median batch x batches per epoch (None: full epoch)
    timed_batches: int | None = None
    #: the fit around each step: training batches after it, and the activation window of the criteria
    limit_train_batches: float | int = 1.0
    collect_batches: int | None = None
    #: overhead: steps per mode and repeat of the per-step measurement (fewer on a longer step)
    overhead_steps: int = 60


def step_bench(name: str, data_dir: Path, seed: int) -> StepBench:
    if name == "digits":
        return StepBench("digits", "the digits benchmark model", make_model, lambda s: DigitsDataModule(seed=s))
    return StepBench(
        "fashion-mnist",
        "the Fashion-MNIST benchmark model (CIFAR ResNet-20, 1-channel stem, batch 128)",
        lambda epochs: ImageClassifier(CifarResNet(depth=20, in_channels=1), max_epochs=epochs),
        lambda s: FashionMNISTDataModule(data_dir=str(data_dir), seed=s, batch_size=128, num_workers=0),
        timed_batches=24,
        limit_train_batches=2,
        collect_batches=20,
        overhead_steps=20,
    )


def training_epoch_seconds(bench: StepBench, seed: int) -> tuple[list[float], str]:
    """Seconds of training epochs of a dense fit of ``bench``'s model, and how they were obtained."""
    L.seed_everything(seed, verbose=False)
    if bench.timed_batches is None:  # whole epochs: every one after the first
        timer = EpochTimer()
        make_trainer(4, [timer]).fit(bench.model(4), bench.datamodule(seed))
        return timer.seconds[1:], "median of epochs after the first of a dense fit"
    datamodule = bench.datamodule(seed)
    datamodule.setup("fit")
    per_epoch = len(datamodule.train_dataloader())
    batches = BatchTimer()
    make_trainer(1, [batches], limit_train_batches=bench.timed_batches).fit(bench.model(1), datamodule)
    batch = statistics.median(batches.seconds[4:])  # after 4 warm-up batches
    how = f"median training batch ({batch:.3f} s, batches 5-{bench.timed_batches}) x {per_epoch} batches per epoch"
    return [batch * per_epoch], how


def prune_step_seconds(bench: StepBench, criterion: str, kwargs: dict[str, Any] | None, seed: int) -> float:
    """The seconds of one pruning step (-50% MACs, at the start of a short fit), from its record."""
    L.seed_everything(seed, verbose=False)
    pruning = StructuredPruningCallback(
        criterion, target_flops_reduction=0.5, prune_on_train_start=True, verbose=False, seed=seed, criterion_kwargs=kwargs,
        collect_batches=bench.collect_batches,
    )
    make_trainer(1, [pruning], limit_train_batches=bench.limit_train_batches).fit(bench.model(1), bench.datamodule(seed))
    return pruning.history[0].seconds


def prune_step_vs_epoch(criteria: list[str], repeats: int, seed: int, smoke: bool, bench: StepBench) -> dict[str, Any]:
    """Step seconds of every criterion (default settings; progress bars off) against one training epoch."""
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in criteria:
        kwargs: dict[str, Any] = {"progress": False} if name == "filter_ensembles" else {}
        if name == "filter_ensembles" and smoke:
            kwargs["max_evaluations"] = 16
        if name == "filter_ensembles" and bench.name == "digits":
            runs[FE_UNBATCHED] = (name, {**kwargs, "masks_per_pass": 1})
        runs[name] = (name, kwargs)
    steps: dict[str, list[float]] = {label: [] for label in runs}
    epochs: list[float] = []
    how = ""
    prune_step_seconds(bench, "l1", None, seed)  # warm-up
    for _ in range(repeats):
        found, how = training_epoch_seconds(bench, seed)
        epochs += found
        for label, (name, kwargs) in runs.items():
            steps[label].append(prune_step_seconds(bench, name, kwargs or None, seed))
            log(f"prune step {label}: {steps[label][-1]:.3f} s")
    epoch = statistics.median(epochs)
    rows = {}
    for label, samples in steps.items():
        step = statistics.median(samples)
        rows[label] = {"criterion": runs[label][0], "kwargs": runs[label][1], "samples": samples}
        rows[label].update(step_seconds=step, ratio=step / epoch)
        log(f"prune step {label}: {step:.3f} s, x{step / epoch:.2f} of an epoch ({epoch:.3f} s)")
    result = {
        "data": bench.name, "model": bench.title, "epoch_seconds": epoch, "epoch_how": how, "epoch_samples": epochs,
        "repeats": repeats, "target_flops_reduction": 0.5, "rows": rows,
    }
    if FE_UNBATCHED in rows:
        result["filter_ensembles_speedup"] = rows[FE_UNBATCHED]["step_seconds"] / rows["filter_ensembles"]["step_seconds"]
    return result


# ---------------------------------------------------------------------------------------------- report
README_START = "<!-- benchmark-performance:start -->"
README_END = "<!-- benchmark-performance:end -->"


def markdown(result: dict[str, Any]) -> str:
    criteria = result["config"]["criteria"]
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}. "
        f"Wall time of the run: {result['wall_seconds'] / 60:.1f} min.",
    ]
    if "step_overhead" in result:
        fit = result["fit_overhead"]
        med = fit["median_seconds"]
        lines += ["", "| collection overhead | " + " | ".join(criteria) + " |", "|---|" + "---|" * len(criteria)]
        for data, steps in result["step_overhead"].items():
            model = OVERHEAD_MODELS.get(data, data)
            lines.append(
                f"| per training step of {model}, every step collecting (ms without -> with) | "
                + " | ".join(
                    f"{steps[c]['ms_per_step_without']:.2f} -> {steps[c]['ms_per_step_collecting']:.2f} "
                    f"(median **{steps[c]['ratio']:.3f}x**, min {steps[c]['min_ratio']:.3f}x"
                    + (f", adjacent pairs {steps[c]['pair_ratio']:.3f}x [{steps[c]['pair_ratio_iqr'][0]:.3f}, "
                       f"{steps[c]['pair_ratio_iqr'][1]:.3f}])" if "pair_ratio" in steps[c] else ")")
                    for c in criteria
                )
                + " |"
            )
        lines.append(
            f"| whole fit of the digits model ({fit['epochs']} epochs), every step collecting vs no callback "
            f"({med['none']:.2f} s) | "
            + " | ".join(f"{med[c]:.2f} s (median **{fit['ratio'][c]:.3f}x**, min {fit['min_ratio'][c]:.3f}x)" for c in criteria)
            + " |"
        )
    if "latency" in result:
        lines += [
            "",
            "Inference latency, pruned (l1) vs dense, ms per forward (median of interleaved rounds), next to the MAC ratio:",
            "",
            "| model | MACs removed | MACs (x dense) | params (x dense) | batch 1: ms (x dense) | batch 64: ms (x dense) |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in result["latency"].items():
            d = entry["dense"]
            lines.append(
                f"| {name} {tuple(entry['input_shape'])} | dense | {d['macs'] / 1e6:.2f}M | {d['params'] / 1e3:.1f}k "
                f"| {d['latency_ms']['1']:.3f} | {d['latency_ms']['64']:.2f} |"
            )
            for row in entry["rows"]:
                if not row["ok"]:
                    lines.append(f"| {name} | target {row['target']:.0%} **failed**: {row['error']} | | | | |")
                    continue
                lines.append(
                    f"| {name} | {1 - row['macs_ratio']:.1%} (target {row['target']:.0%}) | {row['macs_ratio']:.2f}x | {row['params_ratio']:.2f}x "
                    f"| {row['latency_ms']['1']:.3f} ({row['latency_ratio']['1']:.2f}x) | {row['latency_ms']['64']:.2f} ({row['latency_ratio']['64']:.2f}x) |"
                )
    if "collection_memory" in result:
        lines += [
            "",
            "Memory the collector holds during one epoch of collection (peak after any training batch; tensors reachable "
            "from the collector, each storage once; the library's own `nbytes()` in brackets):",
            "",
            "| criterion | statistics | 1x data | 4x data | 4x / 1x |",
            "|---|---|---|---|---|",
        ]
        for crit, mem in result["collection_memory"].items():
            one, four = mem["1x"], mem["4x"]
            lines.append(
                f"| {crit} | {', '.join(one['statistics'])} | {one['peak_bytes'] / 2**20:.2f} MiB [{one['peak_nbytes_reported'] / 2**20:.2f}], "
                f"{one['samples']:,} samples | {four['peak_bytes'] / 2**20:.2f} MiB [{four['peak_nbytes_reported'] / 2**20:.2f}], "
                f"{four['samples']:,} samples | {four['peak_bytes'] / one['peak_bytes']:.2f}x |"
            )
    if "prune_step" in result:
        step = result["prune_step"]
        lines += [
            "",
            f"Prune-step time vs one training epoch ({step['epoch_seconds']:.3f} s; {step.get('epoch_how', 'median')}) of "
            f"{step.get('model', 'the digits benchmark model')}, "
            f"every criterion at its default settings, one step to -{step['target_flops_reduction']:.0%} MACs "
            f"(median of {step['repeats']}):",
            "",
            "| criterion | step seconds | epoch seconds | step / epoch |",
            "|---|---|---|---|",
        ]
        for label, row in step["rows"].items():
            lines.append(f"| {label} | {row['step_seconds']:.3f} | {step['epoch_seconds']:.3f} | **{row['ratio']:.2f}x** |")
        if "filter_ensembles_speedup" in step:
            lines += ["", f"`filter_ensembles`, masks stacked along the batch vs one mask per pass: {step['filter_ensembles_speedup']:.1f}x faster."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--criteria", nargs="+", default=COLLECTING, help="criteria that collect activations")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overhead-epochs", type=int, default=8)
    parser.add_argument("--latency-rounds", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser, "one criterion, one target, one repeat, one epoch")
    add_malloc_argument(parser)
    parser.add_argument("--readme", type=Path, default=None, help="also put the tables between the README's markers")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure (default: all)")
    parser.add_argument("--step-data", choices=("digits", "fashion-mnist"), default="digits",
                        help="prune_step: the model and data (fashion-mnist: the comparison's ResNet-20; see the module doc)")
    parser.add_argument("--overhead-data", nargs="+", choices=("digits", "fashion-mnist"), default=["digits", "fashion-mnist"],
                        help="overhead: the per-step measurement's models and data, each a row (the whole-fit one stays on "
                             "digits; --smoke: the first only)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="fashion-mnist: where torchvision's layout is")
    args = parser.parse_args(argv)
    if args.smoke:
        args.criteria, args.targets = args.criteria[:1], [0.5]
        args.repeats, args.overhead_epochs, args.latency_rounds = 1, 1, 2
        args.overhead_data = args.overhead_data[:1]
    args.criteria = [
        (get_criterion(c.removesuffix(CORRECTED)).name or c) + (CORRECTED if c.endswith(CORRECTED) else "") for c in args.criteria
    ]
    args.step_criteria = ["l1", "filter_ensembles"] if args.smoke else criteria_names()
    args.out = output_dir(args)
    setup_threads(args.threads)
    malloc = setup_malloc(args.malloc)
    started = time.perf_counter()
    sections = set(args.sections)

    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "malloc": malloc,
    }
    if "overhead" in sections:
        result["step_overhead"] = {}
        for data in args.overhead_data:
            bench = step_bench(data, args.data_dir, args.seed)
            result["step_overhead"][data] = {}
            for crit in args.criteria:
                steps = 5 if args.smoke else bench.overhead_steps
                measured = step_overhead(crit, args.repeats, args.seed, steps, bench)
                result["step_overhead"][data][crit] = measured
                log(f"step overhead {data} {crit}: x{measured['ratio']:.3f}")
        result["fit_overhead"] = fit_overhead(args.criteria, args.overhead_epochs, args.repeats, args.seed)
        log("fit overhead: " + ", ".join(f"{c} x{r:.3f}" for c, r in result["fit_overhead"]["ratio"].items()))
    if "latency" in sections:
        torch.manual_seed(args.seed)
        result["latency"] = {
            "digits SmallResNet": pruned_latency("digits", SmallResNet(widths=(32, 64, 128), blocks_per_stage=1), (1, 8, 8), args.targets, args.latency_rounds),
            "CIFAR ResNet-56": resnet56_latency(args.targets, args.latency_rounds),
        }
    if "memory" in sections:
        result["collection_memory"] = {}
        for crit in args.criteria:
            result["collection_memory"][crit] = {f"{r}x": collection_memory(crit, r, args.seed) for r in (1, 4)}
            mem = result["collection_memory"][crit]
            log(f"collection memory {crit}: {mem['1x']['peak_bytes'] / 2**20:.2f} MiB at 1x, {mem['4x']['peak_bytes'] / 2**20:.2f} MiB at 4x")
    if "prune_step" in sections:
        bench = step_bench(args.step_data, args.data_dir, args.seed)
        result["prune_step"] = prune_step_vs_epoch(args.step_criteria, args.repeats, args.seed, args.smoke, bench)
    result["wall_seconds"] = time.perf_counter() - started
    table = markdown(result)
    write_outputs(args.out, "performance", result, table)
    print(table)
    log(f"wrote {args.out / 'performance.json'}, {args.out / 'performance.md'}")
    if sections == set(SECTIONS):
        refresh_readme(args.readme, README_START, README_END, table + "\n")
    elif args.readme is not None:
        log(f"{args.readme}: left untouched (--readme needs every section)")
    return result


if __name__ == "__main__":
    main()
