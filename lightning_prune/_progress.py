"""Progress of long pruning work (collection passes, masked evaluations), shown the way the Trainer shows
its own: nothing when ``Trainer(enable_progress_bar=False)`` or off rank 0, a rich bar when the Trainer
uses :class:`~lightning.pytorch.callbacks.RichProgressBar`, a tqdm bar otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

from lightning_prune.engine.protocol import Progress, no_progress, tqdm_progress

__all__ = ["trainer_progress"]


@contextlib.contextmanager
def _rich(total: int, description: str) -> Iterator[Callable[[int], None]]:
    from rich.progress import Progress as RichProgress

    with RichProgress(transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(steps: int = 1) -> None:
            bar.update(task, advance=steps)

        yield advance


def trainer_progress(trainer: pl.Trainer) -> Progress:
    """A :data:`~lightning_prune.engine.protocol.Progress` that follows ``trainer``'s progress bar."""
    bar: Any = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not trainer.is_global_zero:
        return no_progress
    if isinstance(bar, RichProgressBar):
        return _rich
    return tqdm_progress
