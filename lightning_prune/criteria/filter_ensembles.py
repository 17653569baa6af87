"""``"filter_ensembles"``: linear filter ensembles (Sándor, Pável, Csató, arXiv 2001.08142).

``docs/criteria.md`` section "Linear filter ensembles". ``S`` random binary masks over the channels (each kept with
probability ``p_keep``) are applied by zeroing the masked channels where they leave their group
(hooks on the model, no copy); the loss of each masked model on a fixed set of held-out batches
is recorded, and a linear additive model ``loss ~ b0 + sum_k b_k m_k`` is fitted by ridge
regression. With i.i.d. masks ``b_k`` estimates ``E[loss | m_k = 1] - E[loss | m_k = 0]``, so the
importance of channel ``k`` is ``-b_k``: the loss increase its removal causes. All layers are
masked at once, so every evaluation informs every channel; the fit is ``"joint"`` (one regression
over all channels) or ``"per_layer"`` (one regression per group on the same outcomes). Scores are
in loss units in both cases, hence comparable across layers (global allocation allowed).

Budget: at most ``max_evaluations`` masked evaluations per step, each ``num_batches`` forward
passes, shown with a progress bar. Masks come from the step's seeded generator: the same seed
gives the same pruning. The paper leaves ``p_keep``, ``S`` and joint vs per-layer open; the
defaults here (0.75, 256, joint, ridge ``alpha=1``) are our choice, all parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from lightning_prune.criteria.base import Criterion, Requirements, ScoringContext
from lightning_prune.criteria.registry import register_criterion

if TYPE_CHECKING:
    from lightning_prune.engine.graph import ChannelGroup

__all__ = ["LinearFilterEnsembles", "channel_masking", "ridge_coefficients"]


def ridge_coefficients(masks: torch.Tensor, outcomes: torch.Tensor, alpha: float) -> torch.Tensor:
    """Slopes ``b`` of ``outcomes ~ b0 + masks @ b``, ridge-penalised (``alpha``), intercept free.

    Solved in float64 on centred data, in the primal (``K <= S``) or dual (``K > S``) form, which
    give the same ``b``: ``(Xc^T Xc + a I)^-1 Xc^T yc = Xc^T (Xc Xc^T + a I)^-1 yc``.
    """
    x = masks.double()
    y = outcomes.double()
    xc = x - x.mean(0, keepdim=True)
    yc = y - y.mean()
    s, k = xc.shape
    if k <= s:
        return torch.linalg.solve(xc.T @ xc + alpha * torch.eye(k, dtype=x.dtype), xc.T @ yc)
    return xc.T @ torch.linalg.solve(xc @ xc.T + alpha * torch.eye(s, dtype=x.dtype), yc)


def _mask_points(group: ChannelGroup, model: nn.Module, graph: Any) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, int]]:
    """Where a group's channels leave it: (module, module channel idxs, root idxs, module width) to zero.

    Every producer of the group (a layer whose *output* channels belong to it and that owns
    parameters) is masked, unless its output feeds another producer of the same group (a conv
    followed by its BatchNorm: the BN is masked, so the channel is exactly zero, not BN's shift).
    """
    modules = dict(model.named_modules())
    producers: dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...], int]] = {}
    for s in group.slices:
        if not s.is_output or not s.addressable:
            continue
        owner = modules.get(s.name.rsplit(".", 1)[0] if "." in s.name else "")
        if owner is not None and owner not in producers:
            # the module's own width: the group may own only part of it (a BatchNorm after a concatenation)
            producers[owner] = (s.idxs, s.root_idxs, int(s.param.shape[s.dim]))
    points = []
    for module, (idxs, roots, width) in producers.items():
        feeds_producer = graph is not None and any(m in producers for m in graph.downstream_modules(module))
        if not feeds_producer:
            points.append((module, torch.tensor(idxs), torch.tensor(roots), width))
    return points


@contextlib.contextmanager
def channel_masking(
    groups: Sequence[ChannelGroup], model: nn.Module, graph: Any, masks: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Zero, while inside, the channels whose ``masks[g][root_channel]`` is 0 (forward hooks)."""
    handles = []
    for group, mask in zip(groups, masks):
        for module, idxs, roots, width in _mask_points(group, model, graph):
            module_mask = torch.ones(width)
            module_mask[idxs] = mask.float()[roots]
            dim = 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) else -1

            def hook(_m, _inputs, output, module_mask=module_mask, dim=dim):
                if output.shape[dim] != module_mask.numel():  # e.g. ConvNeXt's LayerNorm2d: channels first
                    dim = 1 if dim == -1 else -1
                shape = [1] * output.dim()
                shape[dim] = -1
                return output * module_mask.to(output.device, output.dtype).view(shape)

            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_loss(measure: Any) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """A loss-like callable (lower is better) from a callable or a torchmetrics ``Metric``."""
    from torchmetrics import Metric

    if isinstance(measure, Metric):
        sign = -1.0 if measure.higher_is_better else 1.0

        def metric_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
            metric = measure.to(labels.device)
            value = metric(outputs, labels)  # this batch's value
            metric.reset()
            return sign * value.float()

        return metric_loss
    if not callable(measure):
        raise TypeError(f"loss_fn must be a callable (outputs, labels) -> tensor or a torchmetrics Metric, got {measure!r}")
    return measure


@register_criterion("filter_ensembles", "lfe")
class LinearFilterEnsembles(Criterion):
    """Importance = the loss increase a channel's removal causes, from a linear model over random masks.

    Args:
        p_keep: probability that a channel is kept in a mask, in (0, 1). Default 0.75.
        max_evaluations: hard cap on masked evaluations per step (each is ``num_batches`` forward
            passes on the held-out batches). Default 256.
        alpha: ridge penalty (> 0; the number of masks is usually below the number of channels).
        fit: ``"joint"`` (one regression over all channels) or ``"per_layer"``.
        num_batches: held-out batches per evaluation (validation batches when the fit has a
            validation loader, else the last training batches). Default 4.
        loss_fn: what each masked model is measured by: ``(outputs, labels) -> scalar tensor``
            (lower is better; default cross-entropy), or a torchmetrics ``Metric`` (e.g.
            ``MulticlassAccuracy``), negated when higher is better, so that importance is always
            the damage a channel's removal does.
        progress: show a progress bar over the evaluations.
    """

    requirements = Requirements(forward_passes=True, labels=True)
    comparable_across_layers = True
    default_allocation = "global"

    def __init__(
        self,
        p_keep: float = 0.75,
        max_evaluations: int = 256,
        alpha: float = 1.0,
        fit: Literal["joint", "per_layer"] = "joint",
        num_batches: int = 4,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | Any | None = None,
        progress: bool = True,
    ) -> None:
        if not 0.0 < p_keep < 1.0:
            raise ValueError(f"p_keep must be in (0, 1), got {p_keep!r}")
        if max_evaluations < 2:
            raise ValueError(f"max_evaluations must be >= 2, got {max_evaluations!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if fit not in ("joint", "per_layer"):
            raise ValueError(f"fit must be 'joint' or 'per_layer', got {fit!r}")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches!r}")
        self.p_keep = float(p_keep)
        self.max_evaluations = int(max_evaluations)
        self.alpha = float(alpha)
        self.fit = fit
        self.num_batches = int(num_batches)
        self.loss_fn = _as_loss(loss_fn) if loss_fn is not None else nn.functional.cross_entropy
        self.progress = progress
        self.evaluations = 0  #: masked evaluations run at the last step (never above the budget)

    @property
    def heldout_batches(self) -> int:
        return self.num_batches

    def sample_masks(self, sizes: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """``(max_evaluations, sum(sizes))`` i.i.d. Bernoulli(``p_keep``) masks from ``generator``."""
        total = sum(sizes)
        return (torch.rand(self.max_evaluations, total, generator=generator) < self.p_keep).float()

    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        if context.forward is None:
            raise ValueError("filter_ensembles needs held-out batches; use it through StructuredPruningCallback")
        sizes = [g.size for g in groups]
        masks = self.sample_masks(sizes, context.generator)
        outcomes = torch.empty(masks.shape[0], dtype=torch.float64)
        from tqdm.auto import tqdm

        self.evaluations = 0
        for s in tqdm(range(masks.shape[0]), desc="lightning-prune: filter ensembles", disable=not self.progress, leave=False):
            per_group = list(torch.split(masks[s], sizes))
            with channel_masking(groups, context.model, context.graph, per_group):
                outcomes[s] = float(context.forward(self.loss_fn))
            self.evaluations += 1
        if self.fit == "joint":
            coefficients = list(torch.split(ridge_coefficients(masks, outcomes, self.alpha), sizes))
        else:
            coefficients = [ridge_coefficients(m, outcomes, self.alpha) for m in torch.split(masks, sizes, dim=1)]
        return [-c for c in coefficients]
