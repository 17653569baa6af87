"""Run by tests/test_ddp.py: a 2-process CPU DDP fit with two pruning steps, whole or interrupted.

``full``: the whole fit (max_epochs=3). ``first``: stops after the first epoch (it ends with a
prune; ModelCheckpoint(save_last=True) writes last.ckpt then). ``resume``: a new process resumes from last.ckpt to
max_epochs=3. Each rank writes a digest of its parameters and the widths to JSON.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune import StructuredPruningCallback
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

EPOCHS = 3


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True  # every rank: the fit ends together


def main(out: str, mode: str, ckpt_dir: str) -> None:
    L.seed_everything(0)  # the same in every mode: under DDP the data order depends on the global seed
    model = ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1), max_epochs=EPOCHS)
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.5, epochs=[0, 1], verbose=False)
    callbacks: list[L.Callback] = [cb]
    if mode == "first":
        callbacks += [StopAfterFirstEpoch(), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS,
        limit_train_batches=4, limit_val_batches=1, callbacks=callbacks, logger=False,
        enable_checkpointing=mode == "first", enable_progress_bar=False, enable_model_summary=False,
    )
    ckpt = str(Path(ckpt_dir) / "last.ckpt") if mode == "resume" else None
    trainer.fit(model, DigitsDataModule(batch_size=16), ckpt_path=ckpt)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    opt = trainer.optimizers[0]
    result = {
        "rank": trainer.global_rank,
        "epochs": [r.epoch for r in cb.history],
        "widths": cb.history[-1].widths if cb.history else {},
        "digest": digest,
        "optimizer_is_model": {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()},
    }
    with open(f"{out}.{mode}.{trainer.global_rank}.json", "w") as f:
        json.dump(result, f)


def _teardown() -> None:
    """Close the process group before the interpreter exits: left to exit-time destructors, gloo's
    threads were once still joinable there ("terminate called without an active exception", SIGABRT
    after the fit had finished and its results were written)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
    _teardown()  # only after success: a failed rank must not leave the others waiting at a barrier
