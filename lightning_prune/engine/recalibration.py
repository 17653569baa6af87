"""BatchNorm recalibration after a pruning step: re-estimate the running statistics on training
batches, with no gradient and no weight change.

After a cut (and more so after a weight correction) the activations every BatchNorm normalises
have changed, and its running mean and variance describe the dense network. :func:`recalibrate_batchnorm`
runs the model over a few batches with every other module in eval mode (dropout off), each
BatchNorm normalising with its batch statistics as in training, and sets every BatchNorm's running
statistics to the exact population mean and (unbiased) variance of all the rows it saw: sums
accumulated in float64 over the batches, all ranks combined under ``torch.distributed``.

**Which BatchNorms.** All of them (every ``_BatchNorm`` that tracks running statistics): after a
correction, an upstream change reaches every BatchNorm downstream of a pruned group, which in a
residual network is nearly all of them; recalibrating all is simpler and costs the same passes.

**Atomicity.** The running statistics are never written in place: while the pass runs, every
BatchNorm's ``track_running_stats`` is switched off (so the forward neither reads nor updates its
buffers), and the new statistics are *new* tensors bound in place of the old ones. A
:class:`~lightning_prune.engine.surgery.ModuleSnapshot` taken before the step still holds the old
tensors, untouched, so a failure after the recalibration can be undone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_prune._model import call_model, preserved_training_modes

__all__ = ["batchnorms", "recalibrate_batchnorm"]


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm of ``model`` that tracks running statistics, by qualified name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _all_reduce(tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, int]:
    """Set the running statistics of every BatchNorm of ``model`` to those of ``batches``.

    Args:
        model: the model (its parameters are not changed, no gradient is computed).
        batches: model inputs, one per forward pass.
        forward: ``forward(model, inputs)``; default: call the model (tuples unpacked, dicts as keywords).

    Returns:
        rows (samples x positions, all ranks) seen per BatchNorm; a BatchNorm that saw none keeps
        its statistics.
    """
    norms = batchnorms(model)
    if not norms:
        return {}
    sums: dict[str, list[Any]] = {name: [0, None, None] for name, _ in norms}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            xd = x.double()
            entry = sums[name]
            entry[0] += x.numel() // x.shape[1]
            s1, s2 = xd.sum(dims), (xd * xd).sum(dims)
            entry[1] = s1 if entry[1] is None else entry[1] + s1
            entry[2] = s2 if entry[2] is None else entry[2] + s2

        return hook

    tracking = [(m, m.track_running_stats) for _, m in norms]
    try:
        with preserved_training_modes(model), torch.no_grad():
            model.eval()
            for name, module in norms:
                module.train()  # normalise with batch statistics, as in training
                module.track_running_stats = False  # ... without reading or updating the buffers
                handles.append(module.register_forward_pre_hook(hook_for(name)))
            for inputs in batches:
                if forward is not None:
                    forward(model, inputs)
                else:
                    call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in tracking:
            module.track_running_stats = flag
    seen: dict[str, int] = {}
    for name, module in norms:
        count, s1, s2 = sums[name]
        channels = module.num_features
        running_mean = module.running_mean
        assert running_mean is not None  # batchnorms() keeps only modules that track statistics
        device = running_mean.device
        packed = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=device)
        if s1 is not None:
            packed[0] = float(count)
            packed[1 : 1 + channels] = s1.to(device)
            packed[1 + channels :] = s2.to(device)
        _all_reduce(packed)  # every rank calls it for every BatchNorm, in the same order
        n = float(packed[0].item())
        seen[name] = int(n)
        if n < 1:
            continue
        mean = packed[1 : 1 + channels] / n
        var = (packed[1 + channels :] / n - mean * mean).clamp_min(0.0)
        unbiased = var * (n / (n - 1)) if n > 1 else var
        dtype = running_mean.dtype
        module.running_mean = mean.to(dtype)  # new tensors bound in place of the old: nothing written in place
        module.running_var = unbiased.to(dtype)
    return seen
