"""What pruning did: per-step records and the summary table printed at the end of fit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PruningRecord", "format_count", "plot_widths", "summary_table"]


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
            channels, channel indices]``: replaying them on the model as it was before the step
            restores its structure (:mod:`lightning_prune.checkpoint`).
        corrections: per group root, how the criterion corrected the remaining weights (e.g.
            ``"interpolation absorbed by 2 consumer(s)"`` or ``"selection only: ..."``); empty when
            the criterion does not correct weights.
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
    surgery: list[list] = field(default_factory=list)
    samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningRecord:
        return cls(**data)


def format_count(value: float) -> str:
    """``1234567 -> '1.23M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def summary_table(records: Sequence[PruningRecord], dense_macs: int, dense_params: int) -> str:
    """A compact text table of the steps, with the dense model as the first row."""
    header = f"{'step':>4} {'epoch':>5} {'target':>7} {'MACs':>9} {'-MACs':>7} {'params':>9} {'-params':>8} {'time':>7}"
    lines = [header, "-" * len(header)]
    lines.append(f"{'dense':>4} {'':>5} {'':>7} {format_count(dense_macs):>9} {'':>7} {format_count(dense_params):>9} {'':>8} {'':>7}")
    for r in records:
        epoch = "start" if r.epoch < 0 else str(r.epoch)
        lines.append(
            f"{r.step + 1:>4} {epoch:>5} {r.target:>7.1%} {format_count(r.macs_after):>9} {r.flops_reduction:>7.1%} "
            f"{format_count(r.params_after):>9} {r.params_reduction:>8.1%} {r.seconds:>6.2f}s"
        )
    return "\n".join(lines)


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
