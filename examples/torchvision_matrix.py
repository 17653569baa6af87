"""The torchvision model matrix: every listed classification model x every criterion.

Each cell builds a torchvision model without weights (``num_classes=10``), wraps it in a minimal
LightningModule (cross-entropy, SGD with momentum) and runs a one-step ``Trainer.fit`` on generated
data with ``StructuredPruningCallback(criterion, target_flops_reduction=0.3,
prune_on_train_start=True)``: the model is pruned before the first training step, then trained for
that step. The cell then checks, independently of the library:

* the output shape on a fresh input is unchanged;
* the MACs reduction, counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
  linear layers, i.e. ``aten.convolution``/``mm``/``addmm``; the attention products ``bmm`` and
  scaled-dot-product attention are left out, as in the library's own definition), and the
  callback's own record (``history[-1].flops_reduction``) are both within 2 points of the target;
* a training step ran on the pruned model: the loss is finite, every parameter got a finite
  gradient, the first and last parameters changed (unless their gradient is exactly zero, as
  behind ViT's zero-initialised head) and the optimizer holds exactly the model's parameters.

Outcome per cell: ``ok``; ``refused`` (a ``PruningError`` or ``ValueError`` raised with a message,
recorded); ``FAIL`` (a failed check or any other exception, with the traceback's last lines).
Layers the library keeps at full width (``UnprunableGroupWarning``) are counted per cell.

    python examples/torchvision_matrix.py [--models resnet18 vit_b_16] [--criteria l1 fpgm]
        [--image-size 64] [--out benchmark_results] [--readme README.md]

Writes ``torchvision_matrix.json`` and ``torchvision_matrix.md`` under ``--out``; ``--readme``
replaces the text between ``<!-- torchvision-matrix:start -->`` and
``<!-- torchvision-matrix:end -->`` with the table (only when both markers exist).

The functions are importable (``tests/test_torchvision_models.py`` runs :func:`run_cell`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tvm

import lightning_prune
from lightning_prune import PruningError, StructuredPruningCallback, available_criteria, get_criterion
from lightning_prune.engine.probe import UnprunableGroupWarning

if str(Path(__file__).resolve().parent) not in sys.path:  # the benchmarks' shared helpers (examples/_bench.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import replace_between_markers  # noqa: E402

NUM_CLASSES = 10
TARGET = 0.3
TOLERANCE = 0.02
README_START = "<!-- torchvision-matrix:start -->"
README_END = "<!-- torchvision-matrix:end -->"


def _vit_b_16(image_size: int) -> nn.Module:
    return tvm.vit_b_16(weights=None, num_classes=NUM_CLASSES, image_size=image_size)


def _plain(builder: Callable[..., nn.Module], **kwargs: Any) -> Callable[[int], nn.Module]:
    return lambda image_size: builder(weights=None, num_classes=NUM_CLASSES, **kwargs)


#: model name -> builder(image_size); the issue's list, in its order.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": _plain(tvm.resnet18),
    "resnet50": _plain(tvm.resnet50),
    "resnext50_32x4d": _plain(tvm.resnext50_32x4d),
    "wide_resnet50_2": _plain(tvm.wide_resnet50_2),
    "mobilenet_v2": _plain(tvm.mobilenet_v2),
    "mobilenet_v3_small": _plain(tvm.mobilenet_v3_small),
    "mobilenet_v3_large": _plain(tvm.mobilenet_v3_large),
    "efficientnet_b0": _plain(tvm.efficientnet_b0),
    "regnet_x_400mf": _plain(tvm.regnet_x_400mf),
    "regnet_y_400mf": _plain(tvm.regnet_y_400mf),
    "densenet121": _plain(tvm.densenet121),
    "vgg11_bn": _plain(tvm.vgg11_bn),
    "squeezenet1_1": _plain(tvm.squeezenet1_1),
    "shufflenet_v2_x1_0": _plain(tvm.shufflenet_v2_x1_0),
    "mnasnet1_0": _plain(tvm.mnasnet1_0),
    "googlenet": _plain(tvm.googlenet, aux_logits=False, init_weights=True),
    "convnext_tiny": _plain(tvm.convnext_tiny),
    "vit_b_16": _vit_b_16,
}

#: small budgets for the criteria that have one (the matrix checks mechanics, not quality).
CRITERION_KWARGS: dict[str, dict[str, Any]] = {
    "filter_ensembles": {"max_evaluations": 32, "num_batches": 1, "progress": False},
}

#: aten ops counted as layer MACs by the independent counter (``FlopCounterMode`` counts 2 per MAC).
_LAYER_OPS = frozenset({"aten.convolution", "aten._convolution", "aten.mm", "aten.addmm"})


def criteria() -> list[str]:
    """Registered criteria, one name each (aliases such as ``"id"`` or ``"lfe"`` dropped)."""
    names: list[str] = []
    for name in available_criteria():
        canonical = get_criterion(name, **criterion_kwargs(name)).name or name
        if canonical not in names:
            names.append(canonical)
    return sorted(names)


def criterion_kwargs(criterion: str) -> dict[str, Any]:
    canonical = {"lfe": "filter_ensembles"}.get(criterion, criterion)
    return dict(CRITERION_KWARGS.get(canonical, {}))


def build_model(name: str, image_size: int, seed: int = 0) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](image_size)


class Classifier(L.LightningModule):
    """The smallest LightningModule around an image classifier: cross-entropy and SGD."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _StepProbe(L.Callback):
    """Snapshots, right before the first training step (after the start-of-fit prune), the first and
    last parameters and whether the optimizer holds exactly the model's parameters."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.optimizer_matches: bool | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.before:
            return
        params = list(pl_module.named_parameters())
        for name, param in (params[0], params[-1]):
            self.before[name] = param.detach().clone()
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.optimizer_matches = held == {id(p) for p in pl_module.parameters()}


def layer_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """MACs per sample of the convolutions and linear layers, counted with ``FlopCounterMode``
    (independent of the library's hook-based count), eval mode, no gradient."""
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel is invisible to the counter
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    counts = counter.get_flop_counts().get("Global", {})
    flops = sum(value for op, value in counts.items() if str(op) in _LAYER_OPS)
    return int(flops // (2 * inputs.shape[0]))


def _data(image_size: int, batches: int, batch_size: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    n = batches * batch_size
    x = torch.randn(n, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _refused_layers(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    names: list[str] = []
    for warning in caught:
        if issubclass(warning.category, UnprunableGroupWarning):
            for name in re.findall(r"^  - '([^']+)'", str(warning.message), flags=re.M):
                if name not in names:
                    names.append(name)
    return names


def run_cell(
    model_name: str,
    criterion: str,
    image_size: int = 64,
    *,
    target: float = TARGET,
    tolerance: float = TOLERANCE,
    batches: int = 2,
    batch_size: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Prune ``model_name`` with ``criterion`` at fit start and check the result (see the module
    docstring). Returns a JSON-able dict with ``outcome`` (``"ok"``, ``"refused"``, ``"FAIL"``),
    the reductions, timings and, for a refusal or failure, ``error``."""
    start = time.perf_counter()
    cell: dict[str, Any] = {
        "model": model_name,
        "criterion": criterion,
        "image_size": image_size,
        "target": target,
        "outcome": "FAIL",
        "reduction": None,  # the callback's record
        "measured_reduction": None,  # FlopCounterMode, independent
        "params_reduction": None,
        "macs_before": None,
        "macs_after": None,
        "prune_seconds": None,
        "seconds": None,
        "loss": None,
        "kept_full_width": [],
        "error": None,
    }
    caught: list[warnings.WarningMessage] = []
    try:
        L.seed_everything(seed, verbose=False)
        net = build_model(model_name, image_size, seed)
        module = Classifier(net)
        check = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            net.eval()
            shape_before = tuple(net(check).shape)
            net.train()
        cell["macs_before"] = layer_macs(net, check)

        pruning = StructuredPruningCallback(
            criterion,
            target_flops_reduction=target,
            prune_on_train_start=True,
            collect_batches=batches,
            criterion_kwargs=criterion_kwargs(criterion),
            seed=seed,
            verbose=False,
        )
        probe = _StepProbe()
        trainer = L.Trainer(
            max_steps=1,
            accelerator="cpu",
            devices=1,
            callbacks=[pruning, probe],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnprunableGroupWarning)
            trainer.fit(module, _data(image_size, batches, batch_size, seed))

        net = module.net
        problems: list[str] = []
        if len(pruning.history) != 1:
            problems.append(f"expected one pruning step, got {len(pruning.history)}")
        else:
            record = pruning.history[-1]
            cell["reduction"] = record.flops_reduction
            cell["params_reduction"] = record.params_reduction
            cell["prune_seconds"] = record.seconds
        with torch.no_grad():
            net.eval()
            shape_after = tuple(net(check).shape)
            net.train()
        if shape_after != shape_before:
            problems.append(f"output shape changed: {shape_before} -> {shape_after}")
        cell["macs_after"] = layer_macs(net, check)
        measured = 1.0 - cell["macs_after"] / max(1, cell["macs_before"])
        cell["measured_reduction"] = measured
        for label, value in (("callback", cell["reduction"]), ("FlopCounterMode", measured)):
            if value is not None and abs(value - target) > tolerance:
                problems.append(f"MACs reduction {value:.1%} ({label}) is not within {tolerance:.0%} of {target:.0%}")
        if trainer.global_step != 1 or not module.losses:
            problems.append(f"no training step ran (global_step={trainer.global_step})")
        else:
            cell["loss"] = module.losses[-1]
            if not math.isfinite(module.losses[-1]):
                problems.append(f"training loss is not finite: {module.losses[-1]}")
        if probe.optimizer_matches is False:
            problems.append("the optimizer does not hold exactly the pruned model's parameters")
        named = dict(module.named_parameters())
        for name, before in probe.before.items():
            param = named.get(name)
            if param is None or param.shape != before.shape:
                problems.append(f"parameter '{name}' changed shape in the training step")
            elif torch.equal(param.detach(), before) and (param.grad is None or param.grad.any()):
                # an all-zero gradient is legitimate: ViT's zero-initialised head blocks the first step's
                # gradient to every earlier parameter
                problems.append(f"parameter '{name}' did not change in the training step")
        no_grad = [n for n, p in named.items() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
        if no_grad:
            problems.append(f"{len(no_grad)} parameter(s) without a finite gradient, e.g. '{no_grad[0]}'")
        if problems:
            cell["error"] = "; ".join(problems)
        else:
            cell["outcome"] = "ok"
    except (PruningError, ValueError) as error:
        cell["outcome"] = "refused"
        cell["error"] = f"{type(error).__name__}: {error}"
    except Exception:  # noqa: BLE001 - every other failure is recorded, not raised
        cell["error"] = _tail(traceback.format_exc())
    cell["kept_full_width"] = _refused_layers(caught)
    cell["seconds"] = time.perf_counter() - start
    return cell


# ---------------------------------------------------------------------- reporting
def _cell_text(cell: dict[str, Any] | None, notes: dict[str, int]) -> str:
    if cell is None:
        return ""
    if cell["outcome"] == "ok":
        return f"{cell['reduction']:.1%}"
    key = cell["error"] or ""
    number = notes.setdefault(key, len(notes) + 1)
    return f"{cell['outcome']} [{number}]"


def markdown_table(cells: Sequence[dict[str, Any]], header: str = "") -> str:
    """Models x criteria, the callback's MACs reduction in each ``ok`` cell; refusals and failures
    numbered, with their messages below the table."""
    models = list(dict.fromkeys(c["model"] for c in cells))
    names = list(dict.fromkeys(c["criterion"] for c in cells))
    by_key = {(c["model"], c["criterion"]): c for c in cells}
    notes: dict[str, int] = {}
    lines = []
    if header:
        lines += [header, ""]
    lines.append("| model | " + " | ".join(f"`{n}`" for n in names) + " | kept at full width | time |")
    lines.append("|---|" + "---:|" * len(names) + "---|---:|")
    for model in models:
        row = [by_key.get((model, n)) for n in names]
        kept = max((len(c["kept_full_width"]) for c in row if c), default=0)
        seconds = sum(c["seconds"] for c in row if c)
        lines.append(
            f"| {model} | " + " | ".join(_cell_text(c, notes) for c in row) + f" | {kept or ''} | {seconds:.0f} s |"
        )
    if notes:
        lines.append("")
        for message, number in notes.items():
            text = " ".join(message.split())
            lines.append(f"[{number}] {text[:600]}{'...' if len(text) > 600 else ''}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def table_header(cells: Sequence[dict[str, Any]], image_size: int, total_seconds: float) -> str:
    ok = sum(c["outcome"] == "ok" for c in cells)
    return (
        f"MACs removed at fit start (target {TARGET:.0%}, tolerance {TOLERANCE * 100:.0f} points), "
        f"torchvision {torchvision.__version__.split('+')[0]} models built without weights, "
        f"{NUM_CLASSES} classes, {image_size}x{image_size} generated images, then one SGD step: "
        f"{ok}/{len(cells)} cells ok, {total_seconds / 60:.0f} min on {platform.machine()} CPU "
        f"(torch {torch.__version__.split('+')[0]}, {torch.get_num_threads()} thread(s)). "
        "\"kept at full width\": layers whose channels the library refuses to cut (named in an "
        "`UnprunableGroupWarning`); the rest of the model is pruned. "
        "Written by `python examples/torchvision_matrix.py --readme README.md`."
    )


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the matrix markers; False (file untouched) when a marker is missing."""
    return replace_between_markers(readme, README_START, README_END, table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--criteria", nargs="+", default=None, help="default: every registered criterion")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2, help="generated training batches (also collected)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.criteria or criteria()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    cells = []
    start = time.perf_counter()
    total = len(args.models) * len(names)
    for model in args.models:
        for criterion in names:
            cell = run_cell(model, criterion, args.image_size, batches=args.batches, batch_size=args.batch_size)
            cells.append(cell)
            shown = f"{cell['reduction']:.1%}" if cell["reduction"] is not None else "-"
            measured = f"{cell['measured_reduction']:.1%}" if cell["measured_reduction"] is not None else "-"
            error = "" if cell["outcome"] == "ok" else "  " + " ".join((cell["error"] or "").split())[-300:]
            print(
                f"[{len(cells)}/{total}] {model:20s} {criterion:26s} {cell['outcome']:7s} "
                f"callback {shown:>6s} measured {measured:>6s} kept {len(cell['kept_full_width'])} "
                f"{cell['seconds']:6.1f}s{error}",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    table = markdown_table(cells, table_header(cells, args.image_size, elapsed))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "target": TARGET,
        "tolerance": TOLERANCE,
        "image_size": args.image_size,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "seconds": elapsed,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "lightning": L.__version__,
            "lightning_prune": lightning_prune.__version__,
        },
    }
    (args.out / "torchvision_matrix.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
    (args.out / "torchvision_matrix.md").write_text(table)
    print(table)
    print(f"total {elapsed:.0f} s; wrote {args.out / 'torchvision_matrix.json'} and {args.out / 'torchvision_matrix.md'}")
    if args.readme is not None:
        if update_readme(args.readme, table):
            print(f"updated {args.readme}")
        else:
            print(f"{args.readme}: markers {README_START} / {README_END} not found, left untouched", file=sys.stderr)
    return 0 if all(c["outcome"] != "FAIL" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
