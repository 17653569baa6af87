"""Helpers shared by the benchmark scripts (``benchmark_compare.py``, ``benchmark_performance.py``).

Not part of the library: the model and trainer every benchmark uses, test accuracy, interleaved CPU
latency, mean ± std formatting, the machine description and the output files.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_prune import available_criteria, get_criterion
from lightning_prune.models import ImageClassifier, SmallResNet

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# Lightning's per-fit banners and the single-process data loader hints would drown the progress lines.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

_START = time.perf_counter()


def log(message: str) -> None:
    """One progress line, flushed at once, with the seconds since the script started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def criteria_names() -> list[str]:
    """Every registered criterion once (aliases such as ``di``/``pls`` resolve to their canonical name)."""
    names: list[str] = []
    for name in available_criteria():
        canonical = get_criterion(name).name or name
        if canonical not in names:
            names.append(canonical)
    return names


def add_common_arguments(parser: argparse.ArgumentParser, smoke_help: str) -> None:
    """``--threads``, ``--smoke``, ``--out``, ``--accelerator`` and ``--devices``, the same in every script."""
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see README)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every fit: cpu (default), gpu, auto")
    parser.add_argument("--devices", type=int, default=1, help="devices per fit (default 1)")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT} (smoke: benchmark_results/smoke)")


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """``--malloc``, in the scripts that time models on the CPU."""
    parser.add_argument(
        "--malloc", choices=("retain", "default"), default="retain",
        help="retain (default): glibc keeps freed memory for reuse (lightning_prune.engine.heap), so that timings do not "
             "depend on what the process ran before; default: glibc as it comes",
    )


def setup_malloc(mode: str) -> dict[str, Any]:
    """Apply ``--malloc`` before anything is timed; what was applied, for the results."""
    from lightning_prune.engine.heap import retain_freed_memory

    applied = retain_freed_memory() if mode == "retain" else False
    if mode == "retain" and not applied:
        log("--malloc retain: no glibc here (or it refused); the allocator is as it comes")
    return {"mode": mode, "applied": applied}


def output_dir(args: argparse.Namespace) -> Path:
    """Where a run writes: ``--out``, else ``examples/results`` (smoke: ``benchmark_results/smoke``)."""
    return args.out or (Path("benchmark_results/smoke") if args.smoke else DEFAULT_OUT)


def setup_threads(threads: int) -> int:
    """Intra-op threads for every measurement (recorded in the results)."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def make_model(epochs: int, lr: float = 0.05) -> ImageClassifier:
    """The digits benchmark model: SmallResNet (32, 64, 128), one block per stage, in ImageClassifier."""
    return ImageClassifier(SmallResNet(widths=(32, 64, 128), blocks_per_stage=1), lr=lr, max_epochs=epochs)


#: Where every benchmark fit runs (``--accelerator`` / ``--devices`` of the scripts) and how much of an
#: epoch it trains (``--limit-train-batches``).
TRAINER = {"accelerator": "cpu", "devices": 1, "limit_train_batches": 1.0}


def set_trainer(accelerator: str = "cpu", devices: int = 1, limit_train_batches: float = 1.0) -> None:
    """Every later :func:`make_trainer` fits on ``accelerator`` with ``devices``."""
    TRAINER.update(accelerator=accelerator, devices=devices, limit_train_batches=limit_train_batches)


def device() -> torch.device:
    """The device the benchmark's fits run on (for evaluations and latency outside Lightning)."""
    if TRAINER["accelerator"] in ("gpu", "cuda") or (TRAINER["accelerator"] == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_trainer(epochs: int, callbacks: Sequence[L.Callback] = (), limit_train_batches: float | None = None) -> L.Trainer:
    """Trainer without validation, logger, checkpoints or progress bar (the same for every run), on the
    accelerator of :data:`TRAINER` (``limit_train_batches``: this fit's, instead of :data:`TRAINER`'s)."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator=TRAINER["accelerator"],
        devices=TRAINER["devices"],
        limit_train_batches=TRAINER["limit_train_batches"] if limit_train_batches is None else limit_train_batches,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def accuracy(model: nn.Module, loader: Iterable, limit_batches: int | None = None) -> float:
    """Top-1 accuracy on ``loader`` (its first ``limit_batches`` batches when given) in eval mode, on
    :func:`device` (the model's mode and device are restored)."""
    was = model.training
    where = next(model.parameters()).device
    run_on = device()
    model.eval().to(run_on)
    correct = total = 0
    with torch.no_grad():
        for index, (x, y) in enumerate(loader):
            if limit_batches is not None and index >= limit_batches:
                break
            x, y = x.to(run_on), y.to(run_on)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train(was).to(where)
    return correct / total


def nonzero_params(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


def latency_ms(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    rounds: int = 15,
    budget_s: float = 0.03,
) -> dict[str, dict[str, float]]:
    """Median latency (ms per forward, on :func:`device`) of every model at every batch size, interleaved.

    Each round times every model once per batch size (``calls`` back-to-back forwards, calibrated
    on the first model so that one timing lasts about ``budget_s``), in an order rotated by one
    model per round; the result is the median over rounds. Eval mode, ``torch.inference_mode``, on
    copies (the models themselves keep their training modes).
    """
    names = list(models)
    run_on = device()
    sync = torch.cuda.synchronize if run_on.type == "cuda" else (lambda: None)
    nets = {n: copy.deepcopy(models[n]).eval().to(run_on) for n in names}
    result: dict[str, dict[str, float]] = {n: {} for n in names}
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, *input_shape, device=run_on)
            for net in nets.values():  # warm-up
                net(x)
                net(x)
            sync()
            start = time.perf_counter()
            nets[names[0]](x)
            sync()
            calls = max(1, min(200, round(budget_s / max(1e-6, time.perf_counter() - start))))
            samples: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    net = nets[name]
                    sync()
                    start = time.perf_counter()
                    for _ in range(calls):
                        net(x)
                    sync()
                    samples[name].append((time.perf_counter() - start) / calls * 1e3)
            for name in names:
                result[name][str(batch)] = statistics.median(samples[name])
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float], kind: str = "pct", digits: int | None = None) -> str:
    """``mean ± std`` of ``values``: ``pct`` (fractions as %), ``x`` (ratios), or plain numbers."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, std = mean_std(values)
    if kind == "pct":
        d = 1 if digits is None else digits
        text, err = f"{mean * 100:.{d}f}%", f"{std * 100:.{d}f}"
    elif kind == "x":
        d = 2 if digits is None else digits
        text, err = f"{mean:.{d}f}x", f"{std:.{d}f}"
    else:
        d = 2 if digits is None else digits
        text, err = f"{mean:.{d}f}", f"{std:.{d}f}"
    return text if len(values) == 1 else f"{text} ± {err}"


def machine() -> dict[str, Any]:
    """What ran the benchmark (CPU model, cores, versions, threads used)."""
    import torch_pruning

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": L.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "?"),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def replace_between_markers(path: Path, start: str, end: str, text: str) -> bool:
    """Put ``text`` between the lines ``start`` and ``end`` of ``path`` (README tables).

    Returns False, and leaves the file untouched, when a marker is missing.
    """
    content = path.read_text()
    i, j = content.find(start), content.find(end)
    if i < 0 or j < i:
        return False
    path.write_text(content[: i + len(start)] + "\n" + text + content[j:])
    return True


def refresh_readme(readme: Path | None, start: str, end: str, text: str) -> None:
    """``--readme``: put ``text`` between the markers of ``readme`` and say what happened."""
    if readme is None:
        return
    if replace_between_markers(readme, start, end, text):
        log(f"updated {readme}")
    else:
        log(f"{readme}: markers {start} / {end} not found, left untouched")


def write_outputs(out: Path, stem: str, result: Mapping[str, Any], table: str) -> None:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
