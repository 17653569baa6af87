"""A small, fixed pruning fit per criterion: its plan (widths per step), a fingerprint of its final weights,
and the forwards / traces lightning-prune makes per step. Shared by the reference test and by
``python tests/reference_fit.py`` (which rewrites ``tests/data/reference_plans.json``)."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch_pruning as tp

from lightning_prune import StructuredPruningCallback
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

REFERENCE = Path(__file__).parent / "data" / "reference_plans.json"

#: criterion -> criterion_kwargs; every built-in criterion once.
CRITERIA: dict[str, dict[str, Any] | None] = {
    "l1": None,
    "l2": None,
    "fpgm": None,
    "random": None,
    "pls_vip": None,
    "pca_gm": None,
    "di": None,
    "id": None,
    "filter_ensembles": {"max_evaluations": 32, "num_batches": 2, "progress": False},
}
_HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_batch_start",
          "on_train_batch_end", "on_train_epoch_end")


class _Counts:
    def __init__(self) -> None:
        self.inside = 0
        self.forwards = 0
        self.traces = 0


def _counting_callback(counts: _Counts, **kwargs: Any) -> StructuredPruningCallback:
    """The callback, with every hook counted: model forwards made inside its hooks (tracing, costs,
    checks, held-out evaluations; not the training forwards it observes) and torch-pruning traces."""
    callback = StructuredPruningCallback(**kwargs)
    for name in _HOOKS:
        original = getattr(callback, name)

        def counted(*args: Any, _original: Any = original, **kw: Any) -> Any:
            counts.inside += 1
            try:
                return _original(*args, **kw)
            finally:
                counts.inside -= 1

        setattr(callback, name, counted)
    return callback


def weight_fingerprint(model: torch.nn.Module) -> dict[str, list[float]]:
    """Per floating-point state entry, its sum and L2 norm (float64): equal to within float rounding on
    any CPU, unlike a hash of the bytes (oneDNN's kernels round differently on Intel and AMD)."""
    return {
        key: [float(t.detach().double().sum()), float(t.detach().double().norm())]
        for key, t in sorted(model.state_dict().items())
        if t.is_floating_point()
    }


def run(criterion: str) -> dict[str, Any]:
    """Fit the digits SmallResNet with two pruning steps; the plan, weight fingerprint and counts."""
    counts = _Counts()
    build = tp.DependencyGraph.build_dependency

    def counted_build(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts.traces += 1
        return build(self, *args, **kwargs)

    L.seed_everything(0)
    net = SmallResNet(widths=(16, 32), blocks_per_stage=1)
    model = ImageClassifier(net, max_epochs=3)

    def count_forward(_module: Any, _inputs: Any) -> None:
        if counts.inside:
            counts.forwards += 1

    handle = net.register_forward_pre_hook(count_forward)
    # The behaviour recorded before least-squares correction and BN recalibration existed: both off
    # (and no agreement measurement, which adds forwards), except that "id" keeps its own correction.
    callback = _counting_callback(
        counts, criterion=criterion, target_flops_reduction=0.5, epochs=[0, 1], verbose=False,
        criterion_kwargs=CRITERIA[criterion], recalibrate_bn=False, measure_agreement=False,
        correction=None if criterion == "id" else "none",
    )
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    tp.DependencyGraph.build_dependency = counted_build
    try:
        trainer.fit(model, DigitsDataModule())
    finally:
        tp.DependencyGraph.build_dependency = build
        handle.remove()
    return {
        "widths": [r.widths for r in callback.history],
        "weights": weight_fingerprint(model),
        "forwards": counts.forwards,
        "traces": counts.traces,
        "steps": len(callback.history),
    }


def cpu_name() -> str:
    """The CPU family the fingerprints are recorded under ("AMD EPYC", "Intel Xeon", else the vendor)."""
    try:
        vendor = next(line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        vendor = platform.processor() or "unknown"
    return {"AuthenticAMD": "AMD EPYC", "GenuineIntel": "Intel Xeon"}.get(vendor, vendor)


def main() -> None:
    """Record (or re-record) the given criteria, this machine's fingerprints under its CPU name."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    names = sys.argv[1:] or list(CRITERIA)
    results = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    with threadpool_limits(limits=1):  # as the tests run
        for name in names:
            found = run(name)
            cpus = results.get(name, {}).get("weights_cpus", {})
            cpus[cpu_name()] = found.pop("weights")
            results[name] = {**found, "weights_cpus": cpus}
            print(name, {k: v for k, v in found.items() if k != "widths"}, flush=True)
    REFERENCE.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
