"""Run by tests/test_ddp.py: a 2-process CPU DDP fit with pruning; each rank writes what it saw."""

from __future__ import annotations

import hashlib
import json
import sys

import lightning as L

from lightning_prune import StructuredPruningCallback
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet


def main(out: str, criterion: str) -> None:
    L.seed_everything(0)
    model = ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1))
    callbacks = []
    cb = None
    if criterion != "none":
        cb = StructuredPruningCallback(criterion, target_flops_reduction=0.4, epochs=[0], verbose=False, collect_batches=3)
        callbacks.append(cb)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=4, limit_val_batches=1,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=16))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    opt = trainer.optimizers[0]
    result = {
        "rank": trainer.global_rank,
        "widths": cb.history[-1].widths if cb else {},
        "samples": cb.history[-1].samples if cb else None,
        "digest": digest,
        "optimizer_is_model": {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()},
    }
    with open(f"{out}.{trainer.global_rank}.json", "w") as f:
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
    main(sys.argv[1], sys.argv[2])
    _teardown()  # only after success: a failed rank must not leave the others waiting at a barrier
