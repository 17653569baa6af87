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

Budget: at most ``max_evaluations`` masked evaluations per step, each a pass over ``num_batches``
held-out batches, shown with a progress bar. Several masks share one forward pass
(``masks_per_pass``): the held-out batch is repeated once per mask and each copy masked by its own
mask, so a step costs ``max_evaluations / masks_per_pass`` passes of larger batches. Masks come from
the step's seeded generator: the same seed gives the same pruning. The paper leaves ``p_keep``, ``S``
and joint vs per-layer open; the defaults here (0.75, 256, joint, ridge ``alpha=1``) are our choice,
all parameters.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_prune.criteria.base import Criterion, Requirements, ScoringContext
from lightning_prune.criteria.registry import register_criterion
from lightning_prune.engine.graph import ChannelGroup
from lightning_prune.engine.protocol import Progress, no_progress, tqdm_progress

__all__ = [
    "MAX_PASS_ELEMENTS",
    "MAX_PASS_ELEMENTS_CPU",
    "MAX_PASS_SAMPLES",
    "MAX_PASS_SAMPLES_CPU",
    "LinearFilterEnsembles",
    "channel_masking",
    "per_sample_loss",
    "ridge_coefficients",
]

#: ``masks_per_pass=None``: at most this many samples (masks x held-out batch) in one forward pass ...
MAX_PASS_SAMPLES = 1024
#: ... (on the CPU this many: past the caches a pass gets slower per sample; on the digits benchmark
#: model, held-out batches of 64, a -50% step took 1.71 s at 4 masks per pass, 2.62 s at 16, 1.98 s at 1) ...
MAX_PASS_SAMPLES_CPU = 256
#: ... and at most this many input elements on an accelerator (2**24 floats: 64 MiB of float32 input) ...
MAX_PASS_ELEMENTS = 2**24
#: ... or on the CPU (2**18: 1 MiB), where stacking masks past the caches makes a pass slower per sample:
#: on the Fashion-MNIST ResNet-20 (held-out batches of 128 28x28 images) 8 masks per pass took 2.1x as
#: long per mask as 1 or 2.
MAX_PASS_ELEMENTS_CPU = 2**18


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


def _mask_points(
    group: ChannelGroup, model: nn.Module, graph: Any
) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, int, str]]:
    """Where a group's channels leave it: (module, module channel idxs, root idxs, module width, site)
    to zero, ``site`` being ``"output"`` or ``"input"``.

    Every producer of the group (a layer whose *output* channels belong to it and that owns
    parameters) is masked, unless its output feeds another producer of the same group (a conv
    followed by its BatchNorm: the BN is masked, so the channel is exactly zero, not BN's shift).
    A group observed at a module's input (attention heads: the output projection's input, where the
    heads' outputs are concatenated) is masked there instead.
    """
    modules = dict(model.named_modules())
    name, site = group.observation
    if site == "input" and name in modules:
        everything = torch.arange(group.size)
        return [(modules[name], everything, everything, group.size, "input")]
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
            points.append((module, torch.tensor(idxs), torch.tensor(roots), width, "output"))
    return points


@contextlib.contextmanager
def channel_masking(
    groups: Sequence[ChannelGroup], model: nn.Module, graph: Any, masks: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Zero, while inside, the channels whose ``masks[g][root_channel]`` is 0 (forward hooks).

    A 1-D mask (``group.size``) applies to every sample. 2-D masks ``(M, group.size)`` (the same
    ``M`` for every group given 2-D) mask a batch stacked from ``M`` blocks: block ``r`` of the
    batch (samples ``r * B`` to ``(r + 1) * B - 1`` of an ``M * B`` batch) gets row ``r``, the
    output viewed as ``(M, B, C, ...)`` and multiplied by the rows broadcast as ``(M, 1, C, 1, ...)``.
    Batch-first outputs are assumed; a batch not divisible by ``M`` is a ``ValueError``.
    """
    rows = {int(m.shape[0]) for m in masks if m.dim() == 2}
    if len(rows) > 1 or any(m.dim() not in (1, 2) for m in masks):
        raise ValueError(f"masks must be 1-D, or 2-D with the same number of rows, got shapes {[tuple(m.shape) for m in masks]}")
    handles = []
    for group, mask in zip(groups, masks):
        batched = mask.dim() == 2
        for module, idxs, roots, width, site in _mask_points(group, model, graph):
            if batched:
                module_mask = torch.ones(mask.shape[0], width)
                module_mask[:, idxs] = mask.float()[:, roots]
            else:
                module_mask = torch.ones(width)
                module_mask[idxs] = mask.float()[roots]
            dim = 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) else -1
            on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

            def hook(_m, _inputs, output, module_mask=module_mask, dim=dim, batched=batched, on_device=on_device):
                width = module_mask.shape[-1]
                if output.shape[dim] != width:  # e.g. ConvNeXt's LayerNorm2d: channels first
                    dim = 1 if dim == -1 else -1
                key = (output.device, output.dtype)
                if key not in on_device:
                    on_device[key] = module_mask.to(output.device, output.dtype)
                factor = on_device[key]
                if not batched:
                    shape = [1] * output.dim()
                    shape[dim] = -1
                    return output * factor.view(shape)
                blocks = factor.shape[0]
                if output.shape[0] % blocks:
                    raise ValueError(f"a batch of {output.shape[0]} samples is not {blocks} stacked blocks")
                stacked = output.reshape(blocks, output.shape[0] // blocks, *output.shape[1:])
                shape = [1] * stacked.dim()
                shape[0], shape[dim % output.dim() + 1] = blocks, width
                return (stacked * factor.view(shape)).reshape(output.shape)

            if site == "input":

                def pre_hook(_m, inputs, hook=hook):
                    return (hook(_m, inputs, inputs[0]),) + tuple(inputs[1:])

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _per_sample_cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unreduced cross-entropy whose per-block mean is ``cross_entropy``'s (mean) value on the block:
    with class indices, samples at ``ignore_index`` (-100) count zero and the others are scaled by
    ``all / valid`` (the same ratio in every block of a repeated batch)."""
    losses = nn.functional.cross_entropy(outputs, labels, reduction="none")
    if labels.is_floating_point():  # class probabilities: every sample counts
        return losses
    valid = labels != -100
    return losses * (valid.numel() / valid.sum())


def per_sample_loss(loss_fn: Any) -> Callable[[Any, torch.Tensor], torch.Tensor] | None:
    """The unreduced form of ``loss_fn`` that batched evaluation needs, or None when there is none:
    ``nn.functional.cross_entropy`` (the default) is split per sample; any other callable and every
    torchmetrics ``Metric`` cannot be, and are evaluated one mask per pass."""
    return _per_sample_cross_entropy if loss_fn is nn.functional.cross_entropy else None


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
            validation loader, else the last training batches). Default 2: with 256 evaluations of 2
            batches of 128, a step costs 0.46 of a training epoch of a CIFAR ResNet-20 on Fashion-MNIST
            on a 2-core CPU (``examples/benchmark_performance.py --sections prune_step --step-data
            fashion-mnist``).
        loss_fn: what each masked model is measured by: ``(outputs, labels) -> scalar tensor``
            (lower is better; default cross-entropy), or a torchmetrics ``Metric`` (e.g.
            ``MulticlassAccuracy``), negated when higher is better, so that importance is always
            the damage a channel's removal does.
        progress: show progress over the evaluations (one tick per mask): the Trainer's kind of bar
            inside a fit (none with ``enable_progress_bar=False``), tqdm outside one. Default True.
        masks_per_pass: masks evaluated per forward pass, stacked along the batch (the held-out
            batch repeated once per mask, each copy masked by its own mask). ``None`` (default):
            as many as fit ``MAX_PASS_SAMPLES`` (1024; ``MAX_PASS_SAMPLES_CPU``, 256, on the CPU)
            samples and ``MAX_PASS_ELEMENTS`` (2**24; ``MAX_PASS_ELEMENTS_CPU``, 2**18, on the CPU)
            input elements per pass, i.e. ``min(max_evaluations, 1024 // B, 2**24 // (B * E))`` on
            an accelerator for held-out batches of ``B`` samples of ``E`` input elements, at least 1. ``1``: one
            mask per pass with ``loss_fn`` as given (the unbatched path). Batching needs a loss
            that splits per sample: the default cross-entropy does; any other ``loss_fn`` (a user
            callable, a torchmetrics ``Metric``), and a ``context.forward`` without
            ``evaluate_batched``, fall back to one mask per pass. Stacking is exact when the model
            treats samples independently in eval mode (BatchNorm uses its running statistics); a
            model whose eval output depends on the rest of the batch would score differently.
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
        num_batches: int = 2,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | Any | None = None,
        progress: bool = True,
        masks_per_pass: int | None = None,
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
        if masks_per_pass is not None and (
            isinstance(masks_per_pass, bool) or not isinstance(masks_per_pass, int) or masks_per_pass < 1
        ):
            raise ValueError(f"masks_per_pass must be a positive int or None, got {masks_per_pass!r}")
        self.p_keep = float(p_keep)
        self.max_evaluations = int(max_evaluations)
        self.alpha = float(alpha)
        self.fit = fit
        self.num_batches = int(num_batches)
        self.loss_fn = _as_loss(loss_fn) if loss_fn is not None else nn.functional.cross_entropy
        self.progress = progress
        self.masks_per_pass = masks_per_pass
        if masks_per_pass not in (None, 1) and per_sample_loss(self.loss_fn) is None:
            warnings.warn(
                f"filter_ensembles: loss_fn {loss_fn!r} does not split per sample; masks_per_pass={masks_per_pass} is "
                "ignored and every mask is evaluated in a pass of its own",
                stacklevel=2,
            )
        self.evaluations = 0  #: masked evaluations run at the last step (never above the budget)
        self.passes = 0  #: evaluation calls (each one pass over the held-out batches) at the last step

    @property
    def heldout_batches(self) -> int:
        return self.num_batches

    def _progress(self, context: ScoringContext) -> Progress:
        """The context's progress (the Trainer's, through the callback), tqdm without one; none when
        ``progress=False``."""
        if not self.progress:
            return no_progress
        return context.progress or tqdm_progress

    def sample_masks(self, sizes: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """``(max_evaluations, sum(sizes))`` i.i.d. Bernoulli(``p_keep``) masks from ``generator``."""
        total = sum(sizes)
        return (torch.rand(self.max_evaluations, total, generator=generator) < self.p_keep).float()

    def pass_size(self, forward: Any) -> int:
        """Masks per evaluation call for ``context.forward``: 1 (one mask per pass) when the loss does not
        split per sample or ``forward`` has no ``evaluate_batched``; else ``masks_per_pass``, or the
        automatic rule (see the class doc), never above ``max_evaluations``."""
        if per_sample_loss(self.loss_fn) is None or not callable(getattr(forward, "evaluate_batched", None)):
            return 1
        if self.masks_per_pass is not None:
            return min(self.masks_per_pass, self.max_evaluations)
        samples = max(1, int(forward.batch_samples))
        elements = max(1, samples * int(forward.sample_elements))
        cpu = getattr(forward, "device_type", "cpu") == "cpu"
        cap, most = (MAX_PASS_ELEMENTS_CPU, MAX_PASS_SAMPLES_CPU) if cpu else (MAX_PASS_ELEMENTS, MAX_PASS_SAMPLES)
        return max(1, min(self.max_evaluations, most // samples, cap // elements))

    def score(self, groups: Sequence[ChannelGroup], context: ScoringContext) -> list[torch.Tensor]:
        if context.forward is None:
            raise ValueError("filter_ensembles needs held-out batches; use it through StructuredPruningCallback")
        sizes = [g.size for g in groups]
        masks = self.sample_masks(sizes, context.generator)
        outcomes = torch.empty(masks.shape[0], dtype=torch.float64)
        per_pass = self.pass_size(context.forward)
        per_sample = per_sample_loss(self.loss_fn)
        self.evaluations = self.passes = 0
        with self._progress(context)(masks.shape[0], "lightning-prune: filter ensembles") as advance:
            for start in range(0, masks.shape[0], per_pass):
                chunk = masks[start : start + per_pass]
                if per_pass == 1:  # one mask, the loss as given
                    with channel_masking(groups, context.model, context.graph, list(torch.split(chunk[0], sizes))):
                        outcomes[start] = float(context.forward(self.loss_fn))
                else:  # len(chunk) masks stacked along the repeated batch
                    with channel_masking(groups, context.model, context.graph, list(torch.split(chunk, sizes, dim=1))):
                        losses = getattr(context.forward, "evaluate_batched")(per_sample, len(chunk))  # noqa: B009 - an optional method beyond the protocol's callable
                    outcomes[start : start + len(chunk)] = losses.double()
                self.evaluations += len(chunk)
                self.passes += 1
                advance(len(chunk))
        if self.fit == "joint":
            coefficients = list(torch.split(ridge_coefficients(masks, outcomes, self.alpha), sizes))
        else:
            coefficients = [ridge_coefficients(m, outcomes, self.alpha) for m in torch.split(masks, sizes, dim=1)]
        return [-c for c in coefficients]
