"""Run by tests/test_compile.py in its own process: fit(torch.compile(model)) with a prune.

A separate process keeps torch's default threading: inductor's CPU path corrupts the heap when
torch.set_num_threads(1) is in effect (seen with torch 2.14.1), which the test session sets.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch

from lightning_prune import StructuredPruningCallback, count_cost
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet

#: the compile backend (argv[2]; default aot_eager)
BACKEND = sys.argv[2] if len(sys.argv) > 2 else "aot_eager"


def main(out: str) -> None:
    L.seed_everything(0)
    model = ImageClassifier(SmallResNet(widths=(8, 16), blocks_per_stage=1))
    x = torch.randn(2, 1, 8, 8)
    dense = count_cost(model, x)
    cb = StructuredPruningCallback("l1", target_flops_reduction=0.4, epochs=[0], verbose=False)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # aot_eager: dynamo and AOT autograd (where shape guards live) without inductor's C++ codegen, which
    # took minutes of the suite on 2 cores; the callback does not depend on the backend
    trainer.fit(torch.compile(model, backend=BACKEND), DigitsDataModule())
    module = trainer.lightning_module
    ctx = module._compiler_ctx
    probe = torch.randn(4, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        same = torch.allclose(module(probe), ctx["original_forward"](probe), atol=1e-5)
    result = {
        "same_module": module is model,
        "steps": len(cb.history),
        "recompiled": module.forward is not ctx["original_forward"],
        "reduction": 1 - count_cost(model, x).macs / dense.macs,
        "compiled_equals_eager": bool(same),
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
