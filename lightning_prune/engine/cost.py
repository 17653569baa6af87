"""What a model costs: multiply-accumulates (MACs) per sample and parameters.

Definition (the one every number of this library uses): MACs are the multiply-accumulates of
every convolution and linear layer (transformers' ``Conv1D`` included) of the whole model, per sample, counted from a real forward
pass; a layer's count is ``positions * weight.numel()`` where ``positions`` is the number of
output positions (input positions for transposed convolutions) per sample. The projections of
``nn.MultiheadAttention`` count as linear layers: q over the query tokens, k and v over the key
tokens (packed or separate weights) and the output projection over the query tokens (it is applied
functionally, so its ``nn.Linear`` hook never fires); the attention products themselves (``QK^T``,
``AV``) are not counted, as in most pruning papers' tables. Bias additions,
normalisation and activations are not MACs. Parameters are all ``nn.Parameter`` entries, except
those of ``torch.optim.swa_utils.AveragedModel`` submodules (an averaged copy is not part of the
model that runs; see :mod:`~lightning_prune.engine.companions`).

Because both counts are sums of ``numel`` of parameters, the cost of any candidate pruning plan
follows exactly from the parameter slices each channel group owns: :class:`CostModel` evaluates a
plan without touching the model, which is what lets the allocator hit a target within one
channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune._model import batch_size_of, call_model, eval_forward, output_signature
from lightning_prune.engine.companions import own_parameters
from lightning_prune.engine.graph import ChannelGroup

__all__ = ["Cost", "CostModel", "batch_size_of", "call_model", "cost_from_positions", "count_cost", "profile"]


@dataclass(frozen=True)
class Cost:
    """MACs per sample and parameter count of a model; ``latency`` (seconds per forward pass at the
    latency batch size) when a :class:`~lightning_prune.engine.latency.LatencyCostModel` made it or it
    was measured, else None."""

    macs: int
    params: int
    latency: float | None = None

    def reduction_from(self, dense: Cost) -> tuple[float, float]:
        """Fractions of MACs and parameters removed relative to ``dense``."""
        return 1.0 - self.macs / max(1, dense.macs), 1.0 - self.params / max(1, dense.params)


def _is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.") and hasattr(module, "nf")


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)) or _is_transposed_linear(module)


def _positions(module: Any, inputs: tuple[Any, ...], output: torch.Tensor, batch: int) -> float:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        x = inputs[0]
        return x.numel() / (batch * module.in_channels)
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.numel() / (batch * module.out_channels)
    if _is_transposed_linear(module):
        return output.numel() / (batch * module.nf)
    return output.numel() / (batch * module.out_features)  # nn.Linear: tokens per sample


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _attention_positions(
    module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor, batch: int
) -> dict[torch.Tensor, float]:
    """Tokens per sample seen by each projection weight of ``nn.MultiheadAttention``."""
    key = args[1] if len(args) > 1 else kwargs.get("key")
    queries = output.numel() / (batch * module.embed_dim)
    keys = key.numel() / (batch * module.kdim) if isinstance(key, torch.Tensor) else queries
    weights: dict[torch.Tensor, float]
    if module.in_proj_weight is not None:  # packed rows: q (query tokens), k and v (key tokens)
        weights = {module.in_proj_weight: (queries + 2 * keys) / 3}
    else:
        assert module.q_proj_weight is not None and module.k_proj_weight is not None and module.v_proj_weight is not None
        weights = {module.q_proj_weight: queries, module.k_proj_weight: keys, module.v_proj_weight: keys}
    if not getattr(module, "calls_out_proj", False):  # torch applies it functionally: no hook of its own
        weights[module.out_proj.weight] = queries
    return weights


def profile(model: nn.Module, example_inputs: Any) -> tuple[dict[torch.Tensor, float], Any]:
    """One forward pass (eval mode): output positions per sample of every conv/linear weight, and the
    shape signature of the output (:func:`~lightning_prune._model.output_signature`)."""
    batch = batch_size_of(example_inputs)
    positions: dict[torch.Tensor, float] = {}
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if isinstance(output, tuple) and output:  # nn.MultiheadAttention: (attention output, weights)
            output = output[0]
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.MultiheadAttention):
            found = _attention_positions(module, args, kwargs, output, batch)
        else:
            found = {_weight(module): _positions(module, args, output, batch)}
        for weight, count in found.items():
            positions[weight] = positions.get(weight, 0.0) + count

    for module in model.modules():
        if _is_layer(module):
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        output = eval_forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return positions, output_signature(output)


def layer_positions(model: nn.Module, example_inputs: Any) -> dict[torch.Tensor, float]:
    """Output positions per sample of every conv/linear weight, from one forward pass (eval mode)."""
    return profile(model, example_inputs)[0]


def cost_from_positions(model: nn.Module, positions: Mapping[torch.Tensor, float]) -> Cost:
    """MACs and parameters of ``model`` from the layer positions of :func:`profile`."""
    macs = sum(p * w.numel() for w, p in positions.items())
    params = sum(p.numel() for p in own_parameters(model))
    return Cost(macs=int(round(macs)), params=int(params))


def count_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """Measure MACs per sample and parameters of ``model`` (see the module docstring)."""
    return cost_from_positions(model, layer_positions(model, example_inputs))


class CostModel:
    """Exact MACs and parameters of ``model`` after removing channels, evaluated without surgery.

    Args:
        model: the model as it is now.
        groups: its channel groups (from :func:`~lightning_prune.engine.graph.discover_groups`).
        example_inputs: inputs for the forward pass that measures layer positions.
        positions: the layer positions of :func:`profile`, when already measured (no forward pass).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        example_inputs: Any = None,
        positions: Mapping[torch.Tensor, float] | None = None,
    ) -> None:
        self._positions = dict(positions) if positions is not None else layer_positions(model, example_inputs)
        params = list(own_parameters(model))
        self._index = {p: i for i, p in enumerate(params)}
        self._shapes = [tuple(p.shape) for p in params]
        self._numel = [p.numel() for p in params]
        self._macs_weight = [self._positions.get(p, 0.0) for p in params]
        # For each group: (param index, dim, entries removed along dim per channel removed)
        self._effects: list[list[tuple[int, int, float]]] = []
        for group in groups:
            effects = []
            for s in group.slices:
                if s.param in self._index:
                    effects.append((self._index[s.param], s.dim, s.removal_ratio))
            self._effects.append(effects)
        self.current = self.evaluate([0] * len(groups))

    def evaluate(self, removed_channels: Sequence[int]) -> Cost:
        """Cost after removing ``removed_channels[g]`` channels from group ``g``."""
        removed: dict[tuple[int, int], float] = {}
        for effects, count in zip(self._effects, removed_channels):
            if count:
                for index, dim, ratio in effects:
                    removed[(index, dim)] = removed.get((index, dim), 0.0) + ratio * count
        factors: dict[int, float] = {}
        for (index, dim), amount in removed.items():
            size = self._shapes[index][dim]
            factors[index] = factors.get(index, 1.0) * max(0.0, (size - amount) / size)
        macs = 0.0
        params = 0.0
        for index, numel in enumerate(self._numel):
            kept = numel * factors.get(index, 1.0)
            params += kept
            macs += self._macs_weight[index] * kept
        return Cost(macs=int(round(macs)), params=int(round(params)))

    @staticmethod
    def relative_error(predicted: Cost, measured: Cost) -> float:
        """Largest relative difference between two costs (used to check the model after surgery)."""
        return max(
            abs(predicted.macs - measured.macs) / max(1, measured.macs),
            abs(predicted.params - measured.params) / max(1, measured.params),
        )
