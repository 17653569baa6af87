"""A fit that saves a checkpoint after every epoch and crashes at the start of a later one (resume tests)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class SaveThenCrash(L.Callback):
    """Saves ``folder/epoch<k>.ckpt`` at every epoch's end; raises at the start of epoch ``crash_epoch``."""

    def __init__(self, folder: Path, crash_epoch: int = 2) -> None:
        self.folder = Path(folder)
        self.crash_epoch = crash_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.folder / f"epoch{trainer.current_epoch}.ckpt")

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.crash_epoch:
            raise RuntimeError("simulated crash after the first prune")
