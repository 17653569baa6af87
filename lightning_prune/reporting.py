"""What pruning did: per-step records, what is logged after each step, and the summary table
printed at the end of fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_prune.engine.cost import Cost
from lightning_prune.engine.pruner import StepResult
from lightning_prune.engine.targets import Target

__all__ = ["PruningRecord", "format_count", "log_step", "plot_latency", "plot_widths", "record_step", "summary_table"]


@dataclass
class PruningRecord:
    """One pruning step, as plain data (safe to store in a checkpoint).

    Attributes:
        step: index of the step (0 = first).
        epoch: the epoch at whose end it ran (-1: at the start of training).
        criterion: the criterion's name.
        target_kind: ``"flops"``, ``"params"`` or ``"channels"``.
        target: the cumulative target of this step (fraction of the dense model removed).
        macs_before / macs_after: MACs per sample before and after the step.
        params_before / params_after: parameter counts before and after.
        flops_reduction / params_reduction: cumulative reductions relative to the dense model.
        widths: output width of every conv/linear layer after the step.
        seconds: wall time of the step (tracing, scoring, allocation, surgery, optimizer remap).
        samples: training samples the criterion's activation statistics come from (summed over
            all processes under DDP); None for weight-only criteria.
        surgery: what the step cut, as torch-pruning history entries ``[layer name, is output
            channels, channel indices]`` and head cuts ``[attention module, "heads" | "head_dims",
            channels]`` (:mod:`lightning_prune.engine.attention`): replaying them on the model as it
            was before the step restores its structure (:mod:`lightning_prune.checkpoint`).
        corrections: per group root, how the criterion corrected the remaining weights (e.g.
            ``"interpolation absorbed by 2 consumer(s)"`` or ``"selection only: ..."``); empty when
            the criterion does not correct weights.
        order: the step's position among every pruning step done on the model, all callbacks of the
            trainer together (0 = first): resume and ``load_pruned`` replay steps in this order. None in
            records written before it existed (their ``step`` is the order then).
        metrics_before: ``trainer.callback_metrics`` just before the step, as floats: the
            validation scores there (if any) are the *unpruned* model's, the training ones are the
            epoch's.
        metrics_after: the metrics the post-step validation produced (``validate_after_prune``), as
            floats: the pruned model's scores, before any fine-tuning. None when no validation ran
            after the step (start of training, ``validate_after_prune=False``, a fit without
            validation). Records written before these fields existed load with ``{}`` / None.
        recalibration_seconds: wall time of the BatchNorm recalibration inside the step (0 when off).
        agreement: share of the step's drawn training samples whose predicted class is the same
            right after the step as before it (None when not measured or the model's predictions
            are not ``(N, classes)``).
        latency_dense / latency_before / latency_after: measured seconds per forward pass (latency batch
            size and device) of the dense model, of the model before the step and after it; None when
            latency is not measured (no latency target, ``round_to="auto"`` or ``measure_latency``).
        latency_predicted: what the latency model predicted for the kept plan, seconds.
        latency_tries: the latency correction's tries, ``[planning target, predicted s, measured s]``
            (the first is the plan for the step's target; one entry without a latency target).
        round_to: the multiple the kept widths snap to at this step (``round_to="auto"`` resolved;
            None: any width; a dict: root layer name -> multiple, one per group).
        round_to_trials: when ``round_to="auto"`` chose its multiple at this step by timing the whole
            model cut with each candidate: candidate (``"none"``, ``"4"``, ..., ``"groups"`` for the
            per-group multiples) -> seconds relative to the model before the step. A resumed fit keeps
            the choice. Empty otherwise.
    """

    step: int
    epoch: int
    criterion: str
    target_kind: str
    target: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    flops_reduction: float
    params_reduction: float
    widths: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    corrections: dict[str, str] = field(default_factory=dict)
    surgery: list[list[Any]] = field(default_factory=list)
    samples: int | None = None
    order: int | None = None
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] | None = None
    recalibration_seconds: float = 0.0
    agreement: float | None = None
    latency_dense: float | None = None
    latency_before: float | None = None
    latency_after: float | None = None
    latency_predicted: float | None = None
    latency_tries: list[list[float]] = field(default_factory=list)
    round_to: int | dict[str, int | None] | None = None
    round_to_trials: dict[str, float] = field(default_factory=dict)

    @property
    def latency_ratio(self) -> float | None:
        """Measured latency after the step over the dense model's (None when not measured)."""
        if self.latency_after is None or not self.latency_dense:
            return None
        return self.latency_after / self.latency_dense

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningRecord:
        """The record of :meth:`to_dict`; fields added since a record was written take their defaults."""
        return cls(**data)


def record_step(
    result: StepResult,
    *,
    step: int,
    epoch: int,
    criterion: str,
    target: Target,
    dense: Cost,
    samples: int | None = None,
    order: int | None = None,
) -> PruningRecord:
    """The record of one completed step (reductions relative to ``dense``)."""
    flops_reduction, params_reduction = result.after.reduction_from(dense)
    return PruningRecord(
        step=step,
        epoch=epoch,
        criterion=criterion,
        target_kind=target.kind,
        target=target.value,
        macs_before=result.before.macs,
        macs_after=result.after.macs,
        params_before=result.before.params,
        params_after=result.after.params,
        flops_reduction=flops_reduction,
        params_reduction=params_reduction,
        widths=result.widths,
        seconds=result.seconds,
        corrections=result.corrections,
        surgery=result.surgery,
        samples=samples,
        order=order,
        recalibration_seconds=result.recalibration_seconds,
        latency_dense=dense.latency,
        latency_before=result.before.latency,
        latency_after=result.latency_measured,
        latency_predicted=result.latency_predicted,
        latency_tries=[list(map(float, t)) for t in result.latency_tries],
        round_to=dict(result.round_to) if isinstance(result.round_to, Mapping) else result.round_to,
        round_to_trials=dict(result.round_to_trials),
    )


def step_metrics(record: PruningRecord) -> dict[str, float]:
    """What is logged after a step, under ``prune/...`` (``prune/agreement`` when measured)."""
    metrics = {
        "prune/macs": float(record.macs_after),
        "prune/params": float(record.params_after),
        "prune/flops_reduction": record.flops_reduction,
        "prune/params_reduction": record.params_reduction,
        "prune/seconds": record.seconds,
        "prune/step": float(record.step + 1),
    }
    if record.agreement is not None:
        metrics["prune/agreement"] = float(record.agreement)
    if record.recalibration_seconds:
        metrics["prune/recalibration_seconds"] = float(record.recalibration_seconds)
    if record.latency_after is not None:
        metrics["prune/latency_ms"] = 1000.0 * record.latency_after
        if record.latency_predicted is not None:
            metrics["prune/latency_predicted_ms"] = 1000.0 * record.latency_predicted
        ratio = record.latency_ratio
        if ratio is not None:
            metrics["prune/latency_ratio"] = ratio
    return metrics


def log_step(trainer: pl.Trainer, record: PruningRecord, num_steps: int, verbose: bool) -> None:
    """Send a step's metrics to every logger and to ``trainer.callback_metrics``; one line on rank 0
    when ``verbose``; a warning when a step that is not the last removed nothing."""
    metrics = step_metrics(record)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    if verbose:
        when = "train start" if record.epoch < 0 else f"end of epoch {record.epoch}"
        rank_zero_info(
            f"[lightning-prune] step {record.step + 1}/{num_steps} ({when}, {record.criterion}): "
            f"MACs {format_count(record.macs_before)} -> {format_count(record.macs_after)} "
            f"(-{record.flops_reduction:.1%} vs dense), params {format_count(record.params_after)} "
            f"(-{record.params_reduction:.1%}), {record.seconds:.2f}s"
            + ("" if record.agreement is None else f", agreement {record.agreement:.1%}")
            + (
                ""
                if record.latency_after is None or record.latency_ratio is None
                else f", latency {1000 * record.latency_after:.2f} ms ({record.latency_ratio:.2f}x dense"
                + ("" if record.latency_predicted is None else f", predicted {1000 * record.latency_predicted:.2f} ms")
                + ")"
            )
        )
    if record.macs_after == record.macs_before and record.step + 1 < num_steps:
        rank_zero_warn(f"pruning step {record.step + 1} removed nothing (the schedule's target was already met)")


def format_count(value: float) -> str:
    """``1234567 -> '1.23M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def summary_table(records: Sequence[PruningRecord], dense_macs: int, dense_params: int) -> str:
    """A compact text table of the steps, with the dense model as the first row; with measured
    latency, also the latency (ms) and its ratio to the dense model's."""
    latency = any(r.latency_after is not None for r in records)
    header = f"{'step':>4} {'epoch':>5} {'target':>7} {'MACs':>9} {'-MACs':>7} {'params':>9} {'-params':>8} {'time':>7}"
    if latency:
        header += f" {'lat ms':>9} {'lat/dense':>9}"
    lines = [header, "-" * len(header)]
    dense = f"{format_count(dense_macs):>9} {'':>7} {format_count(dense_params):>9}"
    row = f"{'dense':>4} {'':>5} {'':>7} {dense} {'':>8} {'':>7}"
    dense_latency = next((r.latency_dense for r in records if r.latency_dense is not None), None)
    if latency:
        row += f" {'' if dense_latency is None else f'{1000 * dense_latency:.2f}':>9} {'1.00x':>9}"
    lines.append(row)
    for r in records:
        epoch = "start" if r.epoch < 0 else str(r.epoch)
        row = (
            f"{r.step + 1:>4} {epoch:>5} {r.target:>7.1%} {format_count(r.macs_after):>9} {r.flops_reduction:>7.1%} "
            f"{format_count(r.params_after):>9} {r.params_reduction:>8.1%} {r.seconds:>6.2f}s"
        )
        if latency:
            ms = "" if r.latency_after is None else f"{1000 * r.latency_after:.2f}"
            ratio = "" if r.latency_ratio is None else f"{r.latency_ratio:.2f}x"
            row += f" {ms:>9} {ratio:>9}"
        lines.append(row)
    return "\n".join(lines)


def plot_latency(records: Sequence[PruningRecord], dense_macs: int, path: str) -> None:
    """Save a plot of measured latency (and the latency model's prediction) against MACs, one point per
    step, the dense model first. Needs matplotlib (``pip install lightning-prune[plot]``).

    Raises:
        ValueError: no record holds a measured latency.
    """
    timed = [r for r in records if r.latency_after is not None]
    if not timed:
        raise ValueError("no step measured latency: use target_latency_reduction, round_to='auto' or measure_latency=True")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_latency = next((r.latency_dense for r in timed if r.latency_dense is not None), None)
    macs = ([dense_macs] if dense_latency else []) + [r.macs_after for r in timed]
    measured = ([1000 * dense_latency] if dense_latency else []) + [1000 * float(r.latency_after or 0.0) for r in timed]
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.plot(macs, measured, "o-", label="measured")
    predicted = [(r.macs_after, 1000 * r.latency_predicted) for r in timed if r.latency_predicted is not None]
    if predicted:
        ax.plot(*zip(*predicted), "x", label="predicted (latency model)")
    for x, y, name in zip(macs, measured, (["dense"] if dense_latency else []) + [f"step {r.step + 1}" for r in timed]):
        ax.annotate(name, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("MACs per sample")
    ax.set_ylabel("latency (ms per batch)")
    ax.set_title("Latency vs MACs per pruning step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_widths(records: Sequence[PruningRecord], dense_widths: dict[str, int], path: str) -> None:
    """Save a bar chart of every conv/linear layer's width: dense, then after each step.

    Needs matplotlib (``pip install lightning-prune[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dense_widths)
    series = [("dense", [dense_widths[n] for n in names])]
    series += [(f"step {r.step + 1} (-{r.flops_reduction:.0%} MACs)", [r.widths.get(n, 0) for n in names]) for r in records]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.2))
    bar = 0.8 / len(series)
    for i, (label, widths) in enumerate(series):
        ax.bar([x + i * bar for x in range(len(names))], widths, width=bar, label=label)
    ax.set_xticks([x + 0.4 - bar / 2 for x in range(len(names))])
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Width per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
