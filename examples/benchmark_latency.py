"""Latency you can aim at: measured-latency targets and hardware-aligned widths, side by side.

Sections (one run, ``--sections`` picks some):

1. ``latency``: CIFAR ResNet-56 (32 px), torchvision ResNet-18 and MobileNetV2 (64 px), at batch 1 and
   64 on this machine's CPU (``--accelerator gpu`` for a GPU): the dense model, then (l1, from the same
   random initialisation) ``target_latency_reduction=0.5``, ``target_flops_reduction=0.5`` with default
   widths and with ``round_to="auto"`` (the step times its cut with free widths and with every multiple
   that reaches the target, and keeps the fastest). Every pruned model is timed *interleaved* with the dense one,
   in a pair of its own (rounds in rotated order, median over rounds): the latency ratio, the MAC ratio, latency gain / MAC
   gain, the latency model's prediction error, and the time to build the tables (cold, then cached).
2. ``onnxruntime``: ``target_latency_reduction=0.5`` aimed at onnxruntime (``OnnxRuntimeLatency`` as the
   ``latency_fn``: the model exported to ONNX at every measurement) against the same target aimed at
   eager PyTorch, and ``target_flops_reduction=0.5`` with default widths and with ``round_to="auto"`` timed
   in onnxruntime, on the same models and batch sizes; every pruned model timed in onnxruntime
   and in eager PyTorch, each interleaved with the dense model.
3. ``tables``: the time to build the latency tables of ResNet-18 and ResNet-50 (64 px, batch 64), cold
   (empty cache) and cached.
4. ``accuracy``: at equal measured latency, accuracy of a latency-targeted model vs a MACs-targeted
   one (MACs target searched so that its latency, timed interleaved with the latency-targeted model,
   matches within 2%), after the same fine-tune, 3 seeds. ``--accuracy-data fashion-mnist`` (default):
   a SmallResNet (16, 32, 64) with two blocks per stage on Fashion-MNIST, a quarter of each training
   epoch (3 epochs, then 2 of fine-tuning), ``target_latency_reduction=0.5``; ``digits``: the digits
   SmallResNet at 0.3 (its latency model at batch 64 allows about 40%).

The CPU is shared with other work: timings are noisy; interleaving and medians are used, and the
numbers are what one run measured. Writes ``latency.json``, ``latency.md`` and ``latency.png``.

    python examples/benchmark_latency.py            # ~20 min on a 2-core CPU
    python examples/benchmark_latency.py --smoke    # seconds: tiny models, one batch size
    python examples/benchmark_latency.py --models heldout --sections latency,onnxruntime  # other models
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from lightning_prune import StructuredPruningCallback, count_cost, get_criterion  # noqa: E402
from lightning_prune.data import DigitsDataModule, FashionMNISTDataModule  # noqa: E402
from lightning_prune.engine import ChannelPruner, Target  # noqa: E402
from lightning_prune.engine.latency import LatencyEstimator, time_interleaved  # noqa: E402
from lightning_prune.engine.onnxruntime_latency import OnnxRuntimeLatency  # noqa: E402
from lightning_prune.models import ImageClassifier, SmallResNet  # noqa: E402
from lightning_prune.models.cifar_resnet import resnet56  # noqa: E402


def interleaved_ms(models: dict[str, nn.Module], shape, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per model: median and minimum over ``rounds`` of the ms per forward, the models timed in turn in
    each round (rotated order), each sample filling about 50 ms with back-to-back calls."""
    run_on = _bench.device()
    sync = torch.cuda.synchronize if run_on.type == "cuda" else (lambda: None)
    nets = {n: copy.deepcopy(m).eval().to(run_on) for n, m in models.items()}
    x = torch.randn(batch, *shape, device=run_on)
    names = list(nets)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        calls = {}
        for name, net in nets.items():
            for _ in range(3):
                net(x)
            sync()
            started = time.perf_counter()
            net(x)
            sync()
            calls[name] = max(1, min(500, round(0.05 / max(1e-6, time.perf_counter() - started))))
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                started = time.perf_counter()
                for _ in range(calls[name]):
                    nets[name](x)
                sync()
                samples[name].append((time.perf_counter() - started) / calls[name] * 1e3)
    return {n: {"median": statistics.median(v), "min": min(v)} for n, v in samples.items()}


#: ``--models``: the models the latency sections run on
MODEL_SETS = ("benchmark", "heldout")
_MODEL_SET = {"name": "benchmark"}


def _models(smoke: bool) -> dict[str, tuple[Any, tuple[int, int, int]]]:
    """The latency sections' models: the benchmark set, or with ``--models heldout`` torchvision models
    the latency code was not developed on (ResNet-34, ResNet-50, ShuffleNetV2 x1.0, 64 px)."""
    if smoke:
        return {"SmallResNet": (lambda: SmallResNet(widths=(16, 32), blocks_per_stage=1, in_channels=3), (3, 32, 32))}
    import torchvision

    if _MODEL_SET["name"] == "heldout":
        return {
            "ResNet-34 (64 px)": (lambda: torchvision.models.resnet34(num_classes=10), (3, 64, 64)),
            "ResNet-50 (64 px)": (lambda: torchvision.models.resnet50(num_classes=10), (3, 64, 64)),
            "ShuffleNetV2 x1.0 (64 px)": (lambda: torchvision.models.shufflenet_v2_x1_0(num_classes=10), (3, 64, 64)),
        }

    return {
        "ResNet-56 (32 px)": (lambda: resnet56(10), (3, 32, 32)),
        "ResNet-18 (64 px)": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
        "MobileNetV2 (64 px)": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64)),
    }


def _estimator(batch: int, cache: Path, smoke: bool, table_seconds: float, latency_fn: Any = None) -> LatencyEstimator:
    quick = {"model_repeats": 3, "sample_seconds": 0.005, "precision": None} if smoke else {}
    return LatencyEstimator(batch_size=batch, device=_bench.device(), cache_dir=cache, table_seconds=table_seconds,
                            repeats=3 if not smoke else 2, levels=2 if not smoke else 1, latency_fn=latency_fn, **quick)


def _prune(make, shape, target: Target, estimator: LatencyEstimator, round_to: Any = None) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = make().to(_bench.device())
    x = torch.randn(2, *shape, device=_bench.device())
    allocation = "global" if target.kind == "latency" else "uniform"
    pruner = ChannelPruner(get_criterion("l1"), allocation=allocation, latency=estimator, round_to=round_to)
    result = pruner.step(model, x, target)
    return model, {"result": result, "round_to": pruner.effective_round_to,
                   "in_step_interval": estimator.last_interval, "in_step_rounds": estimator.last_rounds}


def _configurations(smoke: bool, cache_root: Path) -> Iterator[tuple[str, Any, Any, int, Path, float, nn.Module, torch.Tensor]]:
    """Every (model, batch size) of the latency sections: name, constructor, input shape, batch, its
    table cache, its table budget, the dense model (seed 0) and example inputs."""
    for name, (make, shape) in _models(smoke).items():
        for batch in (8,) if smoke else (1, 64):
            torch.manual_seed(0)
            dense = make().to(_bench.device())
            x = torch.randn(2, *shape, device=_bench.device())
            budget = 2.0 if smoke else (20.0 if batch == 1 else 45.0)
            yield name, make, shape, batch, cache_root / f"{name}-{batch}".replace(" ", "_"), budget, dense, x


def latency_section(smoke: bool, cache_root: Path) -> list[dict[str, Any]]:
    rows = []
    for name, make, shape, batch, cache, budget, dense, x in _configurations(smoke, cache_root):
        cold = _estimator(batch, cache, smoke, budget)
        started = time.perf_counter()
        ChannelPruner(get_criterion("l1"), latency=cold).analyse(dense, x)
        cold_s = time.perf_counter() - started
        cached = _estimator(batch, cache, smoke, budget)
        started = time.perf_counter()
        ChannelPruner(get_criterion("l1"), latency=cached).analyse(dense, x)
        cached_s = time.perf_counter() - started
        _bench.log(f"{name} batch {batch}: tables {cold_s:.1f}s cold ({cold.measured_points} points), "
                   f"{cached_s:.1f}s cached ({cached.measured_points} measured)")
        est = _estimator(batch, cache, smoke, budget)
        variants = {
            "latency 0.5": (Target("latency", 0.5), None),
            "MACs 0.5": (Target("flops", 0.5), None),
            "MACs 0.5, round_to=auto": (Target("flops", 0.5), "auto"),
        }
        pruned, info = {}, {}
        for label, (target, round_to) in list(variants.items()):
            try:
                pruned[label], info[label] = _prune(make, shape, target, est, round_to)
            except Exception as error:  # a latency target the caps and fixed costs make unreachable
                _bench.log(f"  {label}: {error}")
                rows.append({"model": name, "batch": batch, "variant": label, "error": str(error)})
                del variants[label]
                continue
            _bench.log(f"  {label}: in-step {info[label]['result'].latency_tries}, last timing "
                       f"{info[label]['in_step_rounds']} rounds, 95% interval {info[label]['in_step_interval']}")
        # each pruned model in its own pair with the dense one: rotating all four at once lets the
        # others' cache footprints into each sample (one run: 0.80x for a pair that times 0.65-0.69x)
        timed = {}
        for label in pruned:
            pair = interleaved_ms({"dense": dense, label: pruned[label]}, shape, batch, rounds=25 if not smoke else 3)
            timed[label] = pair[label]
            timed[label]["dense"] = pair["dense"]
        dense_macs = count_cost(dense, x).macs
        # where the dense time goes (latency model): what widths cannot buy bounds the gain
        dense_analysis = ChannelPruner(get_criterion("l1"), latency=est).analyse(dense, x)
        model_of_dense, num_groups = dense_analysis.cost_model, len(dense_analysis.groups)
        parts_dense = model_of_dense.breakdown([0] * num_groups)
        for label in variants:
            result = info[label]["result"]
            ms = timed[label]["median"]
            macs_ratio = result.after.macs / dense_macs
            latency_ratio = ms / timed[label]["dense"]["median"]
            min_ratio = timed[label]["min"] / timed[label]["dense"]["min"]
            predicted = result.latency_predicted
            counts = [len(result.plan.removed.get(i, ())) for i in range(num_groups)]
            parts = model_of_dense.breakdown(counts)
            # the layers' time cut exactly in proportion to the MACs, the rest as the latency model says
            bound = (parts_dense["layers"] * macs_ratio + parts["fixed"] + parts["activations"]) / sum(parts_dense.values())
            rows.append({
                "model": name, "batch": batch, "variant": label, "dense_ms": timed[label]["dense"]["median"], "pruned_ms": ms,
                "latency_ratio": latency_ratio, "latency_ratio_of_minima": min_ratio, "macs_ratio": macs_ratio,
                "gain_over_mac_gain": (1 / latency_ratio) / (1 / macs_ratio),
                "predicted_ms": None if predicted is None else 1000 * predicted,
                "in_step_measured_ms": None if result.latency_measured is None else 1000 * result.latency_measured,
                "in_step_dense_ms": None if result.before.latency is None else 1000 * result.before.latency,
                "prediction_error": None if predicted is None or result.latency_measured is None
                else predicted / result.latency_measured - 1,
                "tries": len(result.latency_tries), "round_to": info[label]["round_to"],
                "in_step_interval": info[label]["in_step_interval"], "in_step_rounds": info[label]["in_step_rounds"],
                "dense_share_fixed": parts_dense["fixed"] / sum(parts_dense.values()),
                "dense_share_activations": parts_dense["activations"] / sum(parts_dense.values()),
                "ideal_latency_ratio": bound, "ideal_gain_over_mac_gain": macs_ratio / bound,
                "tables_cold_s": cold_s, "tables_cached_s": cached_s, "table_points": cold.measured_points,
                "round_to_trials": result.round_to_trials,
                "cached_points_measured": cached.measured_points,
            })
            _bench.log(f"  {label}: latency {latency_ratio:.2f}x, MACs {macs_ratio:.2f}x, "
                       f"gain/MAC gain {rows[-1]['gain_over_mac_gain']:.2f}, round_to={round_to_label(info[label]['round_to'])}")
    return rows


def interleaved_onnxruntime(latency: OnnxRuntimeLatency, models: dict[str, nn.Module], shape, batch: int,
                            rounds: int) -> dict[str, float]:
    """Per model: the median over ``rounds`` of ms per ``session.run``, every model exported once and
    its session timed in turn in each round (rotated order)."""
    x = torch.randn(batch, *shape)
    runs = []
    for model in models.values():
        session, feeds = latency.session(copy.deepcopy(model).cpu(), x)
        runs.append(lambda session=session, feeds=feeds: session.run(None, feeds))
    samples = time_interleaved(runs, torch.device("cpu"), rounds=rounds, min_sample_seconds=0.05)
    return {name: 1e3 * statistics.median(row[i] for row in samples) for i, name in enumerate(models)}


def onnxruntime_section(smoke: bool, cache_root: Path) -> list[dict[str, Any]]:
    """``target_latency_reduction=0.5`` aimed at onnxruntime (:class:`OnnxRuntimeLatency` as ``latency_fn``:
    its layer tables, and the step's start and cut timed interleaved in onnxruntime) against the same
    target aimed at eager PyTorch, and a MACs target with default widths and ``round_to="auto"`` timed in
    onnxruntime; every pruned model timed in onnxruntime and in eager PyTorch (interleaved
    with the dense model)."""
    rows = []
    for name, make, shape, batch, cache, budget, dense, x in _configurations(smoke, cache_root):
        ort = OnnxRuntimeLatency(repeats=3 if smoke else 9, min_sample_seconds=0.005 if smoke else 0.05)
        variants = {  # label: target, latency_fn (onnxruntime: its tables too), round_to
            "aimed at onnxruntime": (Target("latency", 0.5), ort, None),
            "aimed at eager torch": (Target("latency", 0.5), None, None),
            "MACs 0.5": (Target("flops", 0.5), ort, None),
            "MACs 0.5, round_to=auto (onnxruntime)": (Target("flops", 0.5), ort, "auto"),
        }
        for label, (target, latency_fn, round_to) in variants.items():
            estimator = _estimator(batch, cache, smoke, budget, latency_fn)
            started = time.perf_counter()
            try:
                pruned, info = _prune(make, shape, target, estimator, round_to)
            except Exception as error:
                _bench.log(f"{name} batch {batch} {label}: {error}")
                rows.append({"model": name, "batch": batch, "variant": label, "error": str(error)})
                continue
            step_s = time.perf_counter() - started
            in_ort = interleaved_onnxruntime(ort, {"dense": dense, "pruned": pruned}, shape, batch,
                                             rounds=3 if smoke else 25)
            eager = interleaved_ms({"dense": dense, "pruned": pruned}, shape, batch, rounds=3 if smoke else 25)
            result = info["result"]
            rows.append({
                "model": name, "batch": batch, "variant": label, "step_s": step_s,
                "ort_dense_ms": in_ort["dense"], "ort_pruned_ms": in_ort["pruned"],
                "ort_ratio": in_ort["pruned"] / in_ort["dense"],
                "eager_dense_ms": eager["dense"]["median"], "eager_pruned_ms": eager["pruned"]["median"],
                "eager_ratio": eager["pruned"]["median"] / eager["dense"]["median"],
                "macs_ratio": result.after.macs / count_cost(dense, x).macs, "tries": len(result.latency_tries),
                "round_to": info["round_to"], "round_to_trials": result.round_to_trials,
                "predicted_ratio": None if result.latency_predicted is None or result.before.latency is None
                else result.latency_predicted / result.before.latency,
                "in_step_interval": info["in_step_interval"], "in_step_rounds": info["in_step_rounds"],
                "table_points": estimator.measured_points, "table_s": estimator.table_time,
                "in_step_ratio": None if result.latency_measured is None or result.before.latency is None
                else result.latency_measured / result.before.latency,
            })
            _bench.log(f"{name} batch {batch} {label}: onnxruntime {rows[-1]['ort_ratio']:.2f}x, eager "
                       f"{rows[-1]['eager_ratio']:.2f}x, MACs {rows[-1]['macs_ratio']:.2f}x, {step_s:.0f} s")
    return rows


def tables_section(smoke: bool, cache_root: Path) -> list[dict[str, Any]]:
    import torchvision

    rows = []
    nets = {"ResNet-18": torchvision.models.resnet18, "ResNet-50": torchvision.models.resnet50}
    if smoke:
        nets = {"SmallResNet": lambda num_classes: SmallResNet(widths=(8, 16), blocks_per_stage=1, in_channels=3)}
    batch, size, budget = (4, 16, 2.0) if smoke else (64, 64, 60.0)
    for name, make in nets.items():
        model = make(num_classes=10).to(_bench.device())
        x = torch.randn(2, 3, size, size, device=_bench.device())
        cache = cache_root / f"tables-{name}"
        times = []
        for _ in range(2):
            est = _estimator(batch, cache, smoke, budget)
            started = time.perf_counter()
            ChannelPruner(get_criterion("l1"), latency=est).analyse(model, x)
            times.append((time.perf_counter() - started, est.measured_points, est.cached_points, est.table_time))
        rows.append({"model": name, "batch": batch, "pixels": size, "budget_s": budget,
                     "cold_s": times[0][0], "cold_points": times[0][1], "cold_table_s": times[0][3],
                     "cached_s": times[1][0], "cached_measured": times[1][1], "cached_read": times[1][2]})
        _bench.log(f"tables {name}: cold {times[0][0]:.1f}s ({times[0][1]} points, {times[0][3]:.1f}s timing), "
                   f"cached {times[1][0]:.1f}s ({times[1][1]} measured)")
    return rows


def _accuracy_setup(data: str, data_dir: Path, smoke: bool) -> dict[str, Any]:
    """Model, data and shapes of the accuracy section: the digits SmallResNet, or on Fashion-MNIST a
    SmallResNet (16, 32, 64) with two blocks per stage on a quarter of each training epoch."""
    if data == "fashion-mnist":
        def datamodule(seed: int) -> Any:
            return FashionMNISTDataModule(data_dir=str(data_dir), seed=seed, batch_size=128, num_workers=0,
                                          download=False)

        def model(epochs: int) -> ImageClassifier:
            net = SmallResNet(widths=(16, 32, 64), blocks_per_stage=2, in_channels=1)
            return ImageClassifier(net, lr=0.05, max_epochs=epochs)

        return {"datamodule": datamodule, "model": model, "shape": (1, 28, 28), "target": 0.5,
                "limit_train_batches": 0.02 if smoke else 0.25, "epochs": (1, 1) if smoke else (3, 2),
                "label": "Fashion-MNIST, SmallResNet(16, 32, 64) x 2 blocks per stage, a quarter of each training epoch"}
    if smoke:
        def model(epochs: int) -> ImageClassifier:
            return ImageClassifier(SmallResNet(widths=(16, 32), blocks_per_stage=1), lr=0.05, max_epochs=epochs)
    else:
        model = _bench.make_model
    return {"datamodule": lambda seed: DigitsDataModule(seed=seed), "model": model, "shape": (1, 8, 8),
            "target": 0.3, "limit_train_batches": 0.1 if smoke else 1.0, "epochs": (1, 1) if smoke else (3, 3),
            "label": "digits (scikit-learn), SmallResNet(32, 64, 128)"}


def accuracy_section(smoke: bool, cache_root: Path, data: str = "digits", data_dir: Path = Path("data")) -> list[dict[str, Any]]:
    setup = _accuracy_setup(data, data_dir, smoke)
    seeds = (0,) if smoke else (0, 1, 2)
    pre_epochs, tune_epochs = setup["epochs"]
    shape, datamodule = setup["shape"], setup["datamodule"]
    batch = 64
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        _bench.TRAINER["limit_train_batches"] = setup["limit_train_batches"]
        base = setup["model"](pre_epochs + tune_epochs)
        _bench.make_trainer(pre_epochs).fit(base, datamodule(seed))
        dm = datamodule(seed)
        dm.setup("fit")
        x = next(iter(dm.train_dataloader()))[0][:2].to(_bench.device())
        cache = cache_root / f"accuracy-{data}"

        lat_model = copy.deepcopy(base)
        lat_cb = StructuredPruningCallback("l1", target_latency_reduction=setup["target"], prune_on_train_start=True,
                                           latency_batch_size=batch, latency_cache_dir=str(cache), verbose=False)
        if smoke:
            assert lat_cb.latency is not None
            lat_cb.latency.model_repeats, lat_cb.latency.sample_seconds = 3, 0.005
        _bench.make_trainer(tune_epochs, [lat_cb]).fit(lat_model, datamodule(seed))

        # the MACs target whose latency matches the latency-targeted model's: each candidate timed
        # interleaved with that model (ratio of medians), secant on the flops target, on copies
        tries: list[tuple[float, float]] = []
        flops = setup["target"]
        for _ in range(2 if smoke else 6):
            trial = copy.deepcopy(base)
            ChannelPruner(get_criterion("l1")).step(trial, x, Target("flops", flops))
            pair = interleaved_ms({"goal": lat_model, "trial": trial}, shape, batch, rounds=3 if smoke else 9)
            tries.append((flops, pair["trial"]["median"] / pair["goal"]["median"]))
            if abs(tries[-1][1] - 1.0) < 0.02:
                break
            below = [t for t in tries if t[1] < 1.0]  # faster than the goal: too many MACs removed
            above = [t for t in tries if t[1] >= 1.0]
            if below and above:  # the secant through the closest tries on either side
                (f0, t0), (f1, t1) = max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])
            else:
                (f0, t0), (f1, t1) = tries[-2:] if len(tries) >= 2 else (tries[-1], tries[-1])
            if t1 != t0:
                flops = f1 + (1.0 - t1) * (f1 - f0) / (t1 - t0)
            else:
                flops = flops + 0.1 if tries[-1][1] > 1.0 else flops - 0.1
            flops = min(max(flops, 0.05), 0.9)
        flops = min(tries, key=lambda t: abs(t[1] - 1.0))[0]
        mac_model = copy.deepcopy(base)
        mac_cb = StructuredPruningCallback("l1", target_flops_reduction=flops, prune_on_train_start=True, verbose=False)
        _bench.make_trainer(tune_epochs, [mac_cb]).fit(mac_model, datamodule(seed))
        timed = interleaved_ms({"latency": lat_model, "macs": mac_model, "dense": base}, shape, batch,
                               rounds=3 if smoke else 9)
        test = datamodule(seed)
        test.setup("test")
        row = {
            "seed": seed, "flops_target_of_macs_model": flops, "search": tries,
            "acc_latency_targeted": _bench.accuracy(lat_model, test.test_dataloader()),
            "acc_macs_targeted": _bench.accuracy(mac_model, test.test_dataloader()),
            "acc_dense_before_fine_tune": _bench.accuracy(base, test.test_dataloader()),
            "latency_ratio_latency_targeted": timed["latency"]["median"] / timed["dense"]["median"],
            "latency_ratio_macs_targeted": timed["macs"]["median"] / timed["dense"]["median"],
            "macs_reduction_latency_targeted": lat_cb.history[-1].flops_reduction,
            "macs_reduction_macs_targeted": mac_cb.history[-1].flops_reduction,
        }
        rows.append(row)
        _bench.log(f"accuracy seed {seed}: latency-targeted {row['acc_latency_targeted']:.2%} "
                   f"({row['latency_ratio_latency_targeted']:.2f}x), MACs-targeted {row['acc_macs_targeted']:.2%} "
                   f"({row['latency_ratio_macs_targeted']:.2f}x)")
    return rows


def _table(result: dict[str, Any]) -> str:
    lines = []
    if result.get("latency"):
        lines += [
            "| model | batch | variant | latency pruned/dense (interleaved: medians; minima) | the step's own measurement | "
            "MACs | latency gain / MAC gain | "
            "bound: latency gain / MAC gain with layers as fast as their MACs (fixed, activation share) | "
            "predicted vs measured (in step) | tries | round_to | tables cold / cached |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["latency"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['error'][:140]} | | | | | | | | |")
                continue
            error = "—" if r["prediction_error"] is None else f"{r['prediction_error']:+.1%}"
            measured, start = r.get("in_step_measured_ms"), r.get("in_step_dense_ms")
            in_step = "—" if not measured or not start else f"{measured / start:.2f}x"
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['variant']} | "
                f"{r['latency_ratio']:.2f}x; {r['latency_ratio_of_minima']:.2f}x "
                f"({r['pruned_ms']:.2f} / {r['dense_ms']:.2f} ms) | {in_step} | {r['macs_ratio']:.2f}x | "
                f"{r['gain_over_mac_gain']:.2f} | "
                f"{r['ideal_gain_over_mac_gain']:.2f} ({r['dense_share_fixed']:.0%}, {r['dense_share_activations']:.0%}) | "
                f"{error} | {r['tries']} | {round_to_label(r['round_to'])} | {r['tables_cold_s']:.1f} s / {r['tables_cached_s']:.1f} s |"
            )
    if result.get("onnxruntime"):
        lines += ["", "| model | batch | variant (latency: target_latency_reduction=0.5) | onnxruntime pruned/dense (ms) | "
                  "eager torch pruned/dense (ms) | the step's own measurement | MACs | "
                  "onnxruntime latency gain / MAC gain | round_to | tries | step |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["onnxruntime"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['error'][:140]} | | | | | | | |")
                continue
            in_step = "—" if r["in_step_ratio"] is None else f"{r['in_step_ratio']:.2f}x"
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ort_ratio']:.2f}x "
                f"({r['ort_pruned_ms']:.2f} / {r['ort_dense_ms']:.2f}) | {r['eager_ratio']:.2f}x "
                f"({r['eager_pruned_ms']:.2f} / {r['eager_dense_ms']:.2f}) | {in_step} | {r['macs_ratio']:.2f}x | "
                f"{r['macs_ratio'] / r['ort_ratio']:.2f} | {round_to_label(r.get('round_to'))} | {r['tries']} | {r['step_s']:.0f} s |"
            )
    for section, runtime in (("latency", "eager torch"), ("onnxruntime", "onnxruntime")):
        lines += _trials_table([r for r in result.get(section) or [] if r.get("round_to_trials")], runtime)
    if result.get("tables"):
        lines += ["", "| model | batch, px | budget | cold | points | cached | measured when cached |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in result["tables"]:
            lines.append(f"| {r['model']} | {r['batch']}, {r['pixels']} | {r['budget_s']:.0f} s | {r['cold_s']:.1f} s | "
                         f"{r['cold_points']} | {r['cached_s']:.1f} s | {r['cached_measured']} |")
    if result.get("accuracy"):
        acc = result["accuracy"]
        lines += ["", "| seed | accuracy latency-targeted | accuracy MACs-targeted | latency ratio (lat / MACs) "
                  "| MACs removed (lat / MACs) |",
                  "|---:|---:|---:|---:|---:|"]
        for r in acc:
            lines.append(
                f"| {r['seed']} | {r['acc_latency_targeted']:.2%} | {r['acc_macs_targeted']:.2%} | "
                f"{r['latency_ratio_latency_targeted']:.2f}x / {r['latency_ratio_macs_targeted']:.2f}x | "
                f"{r['macs_reduction_latency_targeted']:.1%} / {r['macs_reduction_macs_targeted']:.1%} |"
            )
        lines.append(
            f"| mean | {_bench.fmt([r['acc_latency_targeted'] for r in acc], digits=2)} | "
            f"{_bench.fmt([r['acc_macs_targeted'] for r in acc], digits=2)} | | |"
        )
    return "\n".join(lines)


def round_to_label(round_to: Any) -> str:
    """A table cell for a step's ``round_to``: the multiple, or per group how many groups took which."""
    if not isinstance(round_to, dict):
        return str(round_to)
    counts: dict[str, int] = {}
    for multiple in round_to.values():
        key = "any" if multiple is None else str(multiple)
        counts[key] = counts.get(key, 0) + 1
    return "per group (" + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + ")"


def _trials_table(rows: list[dict[str, Any]], runtime: str) -> list[str]:
    """What ``round_to="auto"`` timed at its step: the whole model cut with free widths, with each
    candidate multiple that reaches the target and with the per-group multiples ("groups"), relative
    to the dense model (interleaved in the step)."""
    if not rows:
        return []
    candidates = ["none", "4", "8", "16", "32", "groups"]
    lines = ["", f"round_to=\"auto\", {runtime}: the step's cut at each candidate, timed against the dense model "
             "(interleaved, medians of ratios; — = that multiple cannot reach the target)", "",
             "| model | batch | " + " | ".join(f"round_to={c}" for c in candidates) + " | kept |",
             "|---|---:|" + "---:|" * (len(candidates) + 1)]
    for r in rows:
        trials = r["round_to_trials"]
        cells = [f"{trials[c]:.2f}x" if c in trials else "—" for c in candidates]
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + f" | {round_to_label(r['round_to'])} |")
    return lines


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _bench.log("matplotlib missing: no plot")
        return None
    return plt


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"latency 0.5": "o", "MACs 0.5": "s", "MACs 0.5, round_to=auto": "^"}
    for r in rows:
        if "error" in r:
            continue
        ax.scatter(r["macs_ratio"], r["latency_ratio"], marker=markers.get(r["variant"], "x"))
        ax.annotate(f"{r['model'].split(' ')[0]} b{r['batch']}", (r["macs_ratio"], r["latency_ratio"]), fontsize=6)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="latency = MACs")
    for label, marker in markers.items():
        ax.scatter([], [], marker=marker, color="gray", label=label)
    ax.set_xlabel("MACs (pruned / dense)")
    ax.set_ylabel("measured latency (pruned / dense)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_onnxruntime(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency in onnxruntime (pruned / dense) per model and batch: aimed at onnxruntime vs at eager torch."""
    plt = _pyplot()
    if plt is None:
        return
    ok = [r for r in rows if "error" not in r and r["variant"].startswith("aimed at")]
    configs = list(dict.fromkeys(f"{r['model'].split(' ')[0]} b{r['batch']}" for r in ok))
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (variant, color) in enumerate((("aimed at onnxruntime", "tab:blue"), ("aimed at eager torch", "tab:gray"))):
        values = {f"{r['model'].split(' ')[0]} b{r['batch']}": r["ort_ratio"] for r in ok if r["variant"] == variant}
        xs = [i + (k - 0.5) * 0.38 for i in range(len(configs))]
        ax.bar(xs, [values.get(c, 0.0) for c in configs], width=0.38, color=color, label=variant)
    ax.axhspan(0.47, 0.53, color="tab:green", alpha=0.15, label="target 0.5 ± 0.03")
    ax.set_xticks(range(len(configs)), configs, fontsize=8)
    ax.set_ylabel("onnxruntime latency, pruned / dense")
    ax.set_title("target_latency_reduction=0.5, timed in onnxruntime", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _has_fashion(data_dir: Path) -> bool:
    """Whether Fashion-MNIST's files are there (the smoke run falls back to digits without them)."""
    try:
        dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, num_workers=0)
        dm.prepare_data()
        return True
    except FileNotFoundError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _bench.add_common_arguments(parser, "tiny models and one seed: a few seconds (the test suite runs it)")
    _bench.add_malloc_argument(parser)
    parser.add_argument("--sections", default="latency,onnxruntime,tables,accuracy",
                        help="comma-separated sections to run")
    parser.add_argument("--accuracy-data", choices=("digits", "fashion-mnist"), default="fashion-mnist",
                        help="the accuracy section's data (default fashion-mnist; digits for a quick run)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="fashion-mnist: torchvision's layout (Debian's files are found too)")
    parser.add_argument("--models", choices=MODEL_SETS, default="benchmark",
                        help="latency sections' models: benchmark (ResNet-56, ResNet-18, MobileNetV2) or heldout "
                             "(ResNet-34, ResNet-50, ShuffleNetV2 x1.0)")
    parser.add_argument("--cache", type=Path, default=None, help="latency-table cache (default: a fresh temporary folder)")
    args = parser.parse_args()
    threads = _bench.setup_threads(args.threads)
    malloc = _bench.setup_malloc(args.malloc)
    _MODEL_SET["name"] = args.models
    _bench.set_trainer(args.accelerator, args.devices)
    out = _bench.output_dir(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    cache_root = args.cache or Path(tempfile.mkdtemp(prefix="latency-cache-"))
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": _bench.machine(), "threads": threads, "smoke": args.smoke,
                              "device": str(_bench.device()), "models": args.models, "malloc": malloc, "note": "CPU shared with other work: interleaved medians"}
    if "latency" in sections:
        result["latency"] = latency_section(args.smoke, cache_root)
    if "onnxruntime" in sections:
        result["onnxruntime"] = onnxruntime_section(args.smoke, cache_root)
    if "tables" in sections:
        result["tables"] = tables_section(args.smoke, cache_root)
    if "accuracy" in sections:
        data = args.accuracy_data
        if args.smoke and data == "fashion-mnist" and not _has_fashion(args.data_dir):
            _bench.log("smoke: no Fashion-MNIST files (apt-get install dataset-fashion-mnist): the accuracy section on digits")
            data = "digits"
        result["accuracy"] = accuracy_section(args.smoke, cache_root, data, args.data_dir)
        result["accuracy_data"] = _accuracy_setup(data, args.data_dir, args.smoke)["label"]
    result["seconds"] = time.perf_counter() - started
    table = _table(result)
    print(table)
    _bench.write_outputs(out, "latency", result, table)
    if result.get("latency"):
        _plot(result["latency"], out / "latency.png")
    if result.get("onnxruntime"):
        _plot_onnxruntime(result["onnxruntime"], out / "latency_onnxruntime.png")
    _bench.log(f"wrote {out}/latency.json, latency.md, latency.png in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
