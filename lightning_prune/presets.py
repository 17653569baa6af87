"""Settings that reproduce the papers' setups, as keyword arguments for the callback.

    from lightning_prune import StructuredPruningCallback
    from lightning_prune.presets import pls_vip_paper

    callback = StructuredPruningCallback(**pls_vip_paper(epochs=[9, 19, 29, 39, 49]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_prune.schedules import geometric_steps_for

__all__ = ["pls_vip_paper"]


def pls_vip_paper(epochs: Sequence[int], fraction_per_step: float = 0.1, **overrides: Any) -> dict[str, Any]:
    """Jordao et al.'s PLS + VIP schedule: each step removes ``fraction_per_step`` (10%) of the
    *remaining* prunable channels, ranked globally by VIP (max pooling, 2 components).

    After ``k`` steps ``1 - 0.9 ** k`` of the channels are gone (5 steps: 41%, 8 steps: 57%); the
    paper reports -35.2% FLOPs (5 iterations) and -52.6% FLOPs (8 iterations) on ResNet-56.

    Channels are counted once per coupled group. In a residual network the paper prunes the
    blocks' inner convolutions only: pass ``ignored_layers`` with one layer of every residual
    group (e.g. the stem and the projection shortcuts) to keep those widths, as
    ``examples/configs/cifar10_resnet56_pls_vip_*.yaml`` do. Without it the residual widths are
    ranked too, and the same channel fraction removes far more MACs (ResNet-56, 5 steps: ~62%
    instead of ~40%).

    Args:
        epochs: the epochs at whose end the steps run (one step per entry), fine-tuning between.
        fraction_per_step: share of the remaining channels removed per step.
        overrides: any other callback argument (``max_layer_ratio``, ``ignored_layers``, ...).
    """
    epochs = list(epochs)
    if not epochs:
        raise ValueError("epochs must name at least one epoch")
    settings: dict[str, Any] = {
        "criterion": "pls_vip",
        "channel_ratio": geometric_steps_for(fraction_per_step, len(epochs)),
        "schedule": "geometric",
        "epochs": epochs,
        "allocation": "global",
    }
    settings.update(overrides)
    return settings
