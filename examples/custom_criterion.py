"""Plug in your own criterion: register a class, then use its name in the callback.

A criterion turns channel groups (sets of coupled channels that are pruned together) into one
importance score per channel. ``group.slices`` gives every parameter slice a channel owns;
``slice.per_channel(group.size)`` returns it as a ``(channels, features)`` matrix.

    python examples/custom_criterion.py
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_prune import GroupCriterion, StructuredPruningCallback, register_criterion
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ImageClassifier, SmallResNet


@register_criterion("filter_variance")
class FilterVariance(GroupCriterion):
    """Keep the channels whose producing filters vary the most (flat filters go first)."""

    def score_group(self, group, context) -> torch.Tensor:
        rows = [s.per_channel(group.size) for s in group.slices if s.is_output and s.param.dim() > 1]
        variances = [r.double().var(dim=1) for r in rows if r is not None]
        return torch.stack(variances).mean(0)


def main() -> None:
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallResNet(widths=(16, 32, 64), blocks_per_stage=1), max_epochs=4)
    pruning = StructuredPruningCallback("filter_variance", target_flops_reduction=0.4, epochs=[1])
    trainer = L.Trainer(
        max_epochs=4, callbacks=[pruning], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, DigitsDataModule())
    print("history:", [(r.epoch, r.flops_reduction) for r in pruning.history])
    print(trainer.test(model, DigitsDataModule(), verbose=False))


if __name__ == "__main__":
    main()
