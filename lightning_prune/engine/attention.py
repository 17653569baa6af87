"""Attention heads: where they are, how to cut them, and the attributes a forward reads.

An attention module computes ``num_heads`` heads of ``head_dim`` channels each: q, k and v
projections produce ``num_heads * head_dim`` features (separate layers or one fused ``qkv``), and
an output projection reads them back. Those inner channels are independent of the token width, so
they can be removed without touching the residual stream, but only in whole heads (or, as an
option, the same channels of every head), and only if the attributes the forward reshapes with
(``num_heads``, ``head_dim``, ``all_head_size``, ``split_size``...) follow the weights.

torch-pruning's graph cannot do this by itself (it couples q, k, v and o channel by channel and knows
nothing of the attributes), so heads are modelled here, outside torch-pruning:

* one small class per model family (:class:`AttentionFamily`, registered in :data:`FAMILIES`) says
  which layers and parameters hold the heads and how to rewrite the module's attributes; a family is
  recognised by its module's class path and attributes, never by importing its library;
* :func:`find_attention` lists the attention sites of a model, :func:`head_groups` turns each into a
  :class:`~lightning_prune.engine.graph.ChannelGroup` whose unit (position) is a whole head
  (``block = head_dim``) or one channel of every head (``channel_groups = num_heads``);
* :class:`HeadHandle` cuts the parameters (through torch-pruning's parameter cut, so the surgery's
  records and dry runs see it) and rewrites the attributes;
* the surgery record of a head cut is ``[attention module name, "heads" | "head_dims", removed
  channels]``; :func:`replay` replays a step's record, torch-pruning entries and head entries alike.

Widths hard-coded elsewhere (torchvision's ``VisionTransformer.hidden_dim``) are rewritten from the
weights after every cut by the :data:`WIDTH_ATTRIBUTES` registry (:func:`sync_width_attributes`).

Example (one head of a ``nn.MultiheadAttention`` removed by hand)::

    import torch
    from torch import nn
    from lightning_prune.engine.attention import cut_heads, find_attention

    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    site = find_attention(nn.ModuleDict({"attn": attention}))[0]
    cut_heads(site, channels=range(8, 16), whole_heads=True)   # head 1 (head_dim 8)
    x = torch.randn(2, 5, 32)
    assert attention.num_heads == 3 and attention(x, x, x)[0].shape == (2, 5, 32)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune.engine.graph import ChannelGroup, ParamSlice
from lightning_prune.engine.tp_adapter import TracedGraph, cut_through_interception, replay_history

__all__ = [
    "FAMILIES",
    "HEAD_MODES",
    "WIDTH_ATTRIBUTES",
    "AttentionFamily",
    "AttentionSite",
    "HeadHandle",
    "HeadPrunedMultiheadAttention",
    "SyncedHandle",
    "find_attention",
    "head_groups",
    "head_widths",
    "head_projection_layers",
    "is_head_entry",
    "replay",
    "sync_width_attributes",
]

#: Record markers of a head cut (the second field of a surgery entry): whole heads, or head width.
HEAD_MODES = ("heads", "head_dims")


def _module_path(module: nn.Module) -> str:
    return type(module).__module__


def _layer(module: nn.Module, name: str) -> nn.Module | None:
    found = getattr(module, name, None)
    return found if isinstance(found, nn.Module) else None


@dataclass(frozen=True)
class _Projection:
    """A parameter holding head channels: ``parts`` blocks of ``num_heads * head_dim`` entries along
    ``dim`` (3 for a fused q/k/v), produced by the heads (q/k/v) or read by them (the output projection)."""

    layer: nn.Module
    param: str
    dim: int
    parts: int
    is_output: bool


class AttentionFamily:
    """One model family's attention module: where its heads are and which attributes to rewrite.

    Subclasses set :attr:`name` and implement the four methods; :attr:`narrowable` says whether the
    head width may be narrowed (False where a layer normalises over ``head_dim``).
    """

    name = ""
    narrowable = True
    #: the heads' width is independent of the token width in torch-pruning's pruners too (its groups
    #: over the q/k/v outputs are then replaced by the head groups)
    owns_inner_width = True

    def matches(self, module: Any) -> bool:
        """Whether ``module`` is an attention module of this family (structural check)."""
        raise NotImplementedError

    def projections(self, module: Any) -> list[_Projection]:
        """The parameters holding head channels (q/k/v rows and biases, the output projection's columns)."""
        raise NotImplementedError

    def heads(self, module: Any) -> tuple[int, int]:
        """``(num_heads, head_dim)`` as the forward reads them."""
        raise NotImplementedError

    def set_heads(self, module: Any, num_heads: int, head_dim: int) -> None:
        """Rewrite the attributes the forward reads."""
        raise NotImplementedError

    def prepare(self, module: Any) -> None:
        """Make the module ready for head pruning before it is analysed (default: nothing)."""

    def value_layer(self, module: Any) -> nn.Module:
        """The module a head group is named after (its ``root_name``): the value projection, whose
        output the activation criteria observe, or the attention module itself where q, k and v are
        fused (its width is then recorded by :func:`head_widths`)."""
        raise NotImplementedError


class _LinearQKV(AttentionFamily):
    """Separate ``nn.Linear`` q, k, v (same width) and an output ``nn.Linear``; subclasses name them."""

    q = k = v = ""

    def _o(self, module: Any) -> nn.Module | None:
        raise NotImplementedError

    def _layers(self, module: Any) -> list[nn.Module | None]:
        return [_layer(module, self.q), _layer(module, self.k), _layer(module, self.v), self._o(module)]

    def _shapes_fit(self, module: Any) -> bool:
        layers = self._layers(module)
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            return False
        q, k, v, o = layers
        assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear) and isinstance(o, nn.Linear)
        num_heads, head_dim = self.heads(module)
        width = num_heads * head_dim
        return q.out_features == k.out_features == v.out_features == o.in_features == width

    def projections(self, module: Any) -> list[_Projection]:
        q, k, v, o = self._layers(module)
        found = []
        for layer in (q, k, v):
            assert layer is not None
            found.append(_Projection(layer, "weight", 0, 1, True))
            if getattr(layer, "bias", None) is not None:
                found.append(_Projection(layer, "bias", 0, 1, True))
        assert o is not None
        found.append(_Projection(o, "weight", 1, 1, False))
        return found

    def value_layer(self, module: Any) -> nn.Module:
        layer = _layer(module, self.v)
        assert layer is not None
        return layer


class HuggingFaceSelfAttention(_LinearQKV):
    """BERT / RoBERTa style: an attention module holding ``self`` (``query``, ``key``, ``value``,
    ``num_attention_heads``, ``attention_head_size``, ``all_head_size``) and ``output.dense``."""

    name = "huggingface-self-attention"
    q, k, v = "query", "key", "value"

    def matches(self, module: Any) -> bool:
        inner = _layer(module, "self")
        output = _layer(module, "output")
        return (
            _module_path(module).startswith("transformers.")
            and inner is not None
            and output is not None
            and all(hasattr(inner, a) for a in ("num_attention_heads", "attention_head_size", "all_head_size"))
            and self._shapes_fit(module)
        )

    def _layers(self, module: Any) -> list[nn.Module | None]:
        inner = _layer(module, "self")
        if inner is None:
            return [None] * 4
        return [_layer(inner, self.q), _layer(inner, self.k), _layer(inner, self.v), self._o(module)]

    def _o(self, module: Any) -> nn.Module | None:
        output = _layer(module, "output")
        return None if output is None else _layer(output, "dense")

    def heads(self, module: Any) -> tuple[int, int]:
        inner = module.self
        return int(inner.num_attention_heads), int(inner.attention_head_size)

    def set_heads(self, module: Any, num_heads: int, head_dim: int) -> None:
        inner = module.self
        inner.num_attention_heads = num_heads
        inner.attention_head_size = head_dim
        inner.all_head_size = num_heads * head_dim

    def value_layer(self, module: Any) -> nn.Module:
        return module.self.value


class HuggingFaceProjAttention(_LinearQKV):
    """ViT (transformers 5) / Llama-style layout without grouped keys: ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj`` in one module with ``num_attention_heads`` and ``head_dim``."""

    name = "huggingface-proj-attention"
    q, k, v = "q_proj", "k_proj", "v_proj"

    def _o(self, module: Any) -> nn.Module | None:
        return _layer(module, "o_proj")

    def matches(self, module: Any) -> bool:
        return (
            _module_path(module).startswith("transformers.")
            and hasattr(module, "num_attention_heads")
            and hasattr(module, "head_dim")
            and self._shapes_fit(module)
        )

    def heads(self, module: Any) -> tuple[int, int]:
        return int(module.num_attention_heads), int(module.head_dim)

    def set_heads(self, module: Any, num_heads: int, head_dim: int) -> None:
        module.num_attention_heads = num_heads
        module.head_dim = head_dim
        if hasattr(module, "num_key_value_heads"):
            module.num_key_value_heads = num_heads


class _FusedQKV(AttentionFamily):
    """A fused q|k|v projection (``3 * num_heads * head_dim`` features) and an output projection."""

    fused = out = ""
    fused_dim = 0  #: the fused projection's output dimension in its weight
    out_dim = 1  #: the output projection's input dimension in its weight

    def projections(self, module: Any) -> list[_Projection]:
        fused, out = getattr(module, self.fused), getattr(module, self.out)
        found = [_Projection(fused, "weight", self.fused_dim, 3, True)]
        if getattr(fused, "bias", None) is not None:
            found.append(_Projection(fused, "bias", 0, 3, True))
        found.append(_Projection(out, "weight", self.out_dim, 1, False))
        return found

    def value_layer(self, module: Any) -> nn.Module:
        return module  # the fused layer is 3x wider than the heads: the group is named after the module


class TimmAttention(_FusedQKV):
    """timm's ``Attention`` (ViT, DeiT...): ``qkv`` and ``proj`` linears, ``num_heads``, ``head_dim``,
    ``attn_dim``; not matched with a gate or a scale norm (their widths are not modelled)."""

    name = "timm-attention"
    fused, out = "qkv", "proj"

    def matches(self, module: Any) -> bool:
        qkv, proj = _layer(module, "qkv"), _layer(module, "proj")
        if not (_module_path(module).startswith("timm.") and isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            return False
        if not all(hasattr(module, a) for a in ("num_heads", "head_dim")) or getattr(module, "gate", None) is not None:
            return False
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return False
        width = int(module.num_heads) * int(module.head_dim)
        return qkv.out_features == 3 * width and proj.in_features == width

    def narrowable_for(self, module: Any) -> bool:
        return isinstance(getattr(module, "q_norm", nn.Identity()), nn.Identity)

    def heads(self, module: Any) -> tuple[int, int]:
        return int(module.num_heads), int(module.head_dim)

    def set_heads(self, module: Any, num_heads: int, head_dim: int) -> None:
        module.num_heads = num_heads
        module.head_dim = head_dim
        if hasattr(module, "attn_dim"):
            module.attn_dim = num_heads * head_dim


class GPT2Attention(_FusedQKV):
    """GPT-2 style: ``c_attn`` / ``c_proj`` are ``Conv1D`` (weight ``(in, out)``), with ``num_heads``,
    ``head_dim`` and ``split_size``; self-attention only (cross-attention's ``q_attn`` not modelled)."""

    name = "gpt2-attention"
    fused, out = "c_attn", "c_proj"
    fused_dim, out_dim = 1, 0

    def matches(self, module: Any) -> bool:
        c_attn, c_proj = _layer(module, "c_attn"), _layer(module, "c_proj")
        if not _module_path(module).startswith("transformers.") or c_attn is None or c_proj is None:
            return False
        if getattr(module, "is_cross_attention", False):
            return False
        if not all(hasattr(module, a) for a in ("num_heads", "head_dim", "split_size")):
            return False
        width = int(module.num_heads) * int(module.head_dim)
        w_attn, w_proj = getattr(c_attn, "weight", None), getattr(c_proj, "weight", None)
        return (
            isinstance(w_attn, torch.Tensor)
            and isinstance(w_proj, torch.Tensor)
            and hasattr(c_attn, "nf")
            and w_attn.dim() == 2
            and int(w_attn.shape[1]) == 3 * width
            and int(w_proj.shape[0]) == width
            and int(module.split_size) == width
        )

    def heads(self, module: Any) -> tuple[int, int]:
        return int(module.num_heads), int(module.head_dim)

    def set_heads(self, module: Any, num_heads: int, head_dim: int) -> None:
        module.num_heads = num_heads
        module.head_dim = head_dim
        module.split_size = num_heads * head_dim


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads are narrower than ``embed_dim`` (``num_heads * head_dim``
    inner features): torch's own forward requires them to equal ``embed_dim``. A pruned module's class
    is switched to this one (same parameters, same ``state_dict``); the forward is the same
    computation (packed q/k/v projection, scaled dot product with the scale of the original head
    width, masks, dropout, output projection) written with plain tensor operations. The output
    projection is called as a module, so that activation criteria observe the heads' outputs (its
    input) and the cost counts it through its own hook (:attr:`calls_out_proj`)."""

    calls_out_proj = True

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, head_dim = int(self.num_heads), int(self.head_dim)
        assert self.in_proj_weight is not None
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = nn.functional.linear(query, w_q, b_q).reshape(length, batch * heads, head_dim).transpose(0, 1)
        k = nn.functional.linear(key, w_k, b_k).reshape(source, batch * heads, head_dim).transpose(0, 1)
        v = nn.functional.linear(value, w_v, b_v).reshape(source, batch * heads, head_dim).transpose(0, 1)
        scale = float(getattr(self, "scaling", head_dim**-0.5))
        if not need_weights and key_padding_mask is None and (attn_mask is None or attn_mask.dim() == 2):
            # torch's fused attention (flash / memory-efficient kernels where the device has them): the
            # path of ViTs' need_weights=False calls, as fast as the module this one replaced
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # True: masked here, but "attends" for scaled_dot_product_attention
            fused = nn.functional.scaled_dot_product_attention(
                q.reshape(batch, heads, length, head_dim), k.reshape(batch, heads, source, head_dim),
                v.reshape(batch, heads, source, head_dim), attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal and attn_mask is None, scale=scale,
            )
            out = self.out_proj(fused.transpose(1, 2).reshape(batch, length, heads * head_dim))
            if not batched:
                return out.squeeze(0), None
            return (out if self.batch_first else out.transpose(0, 1)), None
        scores = torch.bmm(q * scale, k.transpose(1, 2))
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).triu(1)
        for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask.view(batch, 1, 1, source)):
            if mask is None:
                continue
            if mask is key_padding_mask or (key_padding_mask is not None and mask.dim() == 4):
                mask = mask.expand(batch, heads, 1, source).reshape(batch * heads, 1, source)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = nn.functional.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).view(batch, heads, length, head_dim).transpose(1, 2)
        # a module call on (batch, tokens, heads x head_dim), unlike torch's: hooks see the heads' outputs
        out = self.out_proj(out.reshape(batch, length, heads * head_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        shaped = weights.view(batch, heads, length, source)
        return out, shaped.mean(1) if average_attn_weights else shaped


class TorchMultiheadAttention(AttentionFamily):
    """``nn.MultiheadAttention`` with packed projections (``in_proj_weight``), no ``bias_k``/``bias_v``
    and no zero attention. Its inner width is tied to the token width in torch-pruning's pruner, so its
    heads are only cut when the token width is not in the scope (see :attr:`owns_inner_width`)."""

    name = "torch-multihead-attention"
    owns_inner_width = False
    # prepare(): switched to HeadPrunedMultiheadAttention when its heads are analysed (the same function),
    # so that the output projection's input is observable
    def matches(self, module: Any) -> bool:
        return (
            isinstance(module, nn.MultiheadAttention)
            and module.in_proj_weight is not None
            and module.bias_k is None
            and module.bias_v is None
            and not module.add_zero_attn
        )

    def projections(self, module: Any) -> list[_Projection]:
        found = [_Projection(module, "in_proj_weight", 0, 3, True)]
        if module.in_proj_bias is not None:
            found.append(_Projection(module, "in_proj_bias", 0, 3, True))
        found.append(_Projection(module.out_proj, "weight", 1, 1, False))
        return found

    def heads(self, module: Any) -> tuple[int, int]:
        return int(module.num_heads), int(module.head_dim)

    def prepare(self, module: Any) -> None:
        if not isinstance(module, HeadPrunedMultiheadAttention):
            module.scaling = float(module.head_dim) ** -0.5
            module.__class__ = HeadPrunedMultiheadAttention

    def set_heads(self, module: Any, num_heads: int, head_dim: int) -> None:
        self.prepare(module)
        module.num_heads = num_heads
        module.head_dim = head_dim

    def value_layer(self, module: Any) -> nn.Module:
        return module


#: The registered attention families, tried in order (first match wins).
FAMILIES: list[AttentionFamily] = [
    HuggingFaceSelfAttention(),
    HuggingFaceProjAttention(),
    TimmAttention(),
    GPT2Attention(),
    TorchMultiheadAttention(),
]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a model and its family."""

    name: str
    module: Any
    family: AttentionFamily

    def heads(self) -> tuple[int, int]:
        return self.family.heads(self.module)

    def narrowable(self) -> bool:
        check = getattr(self.family, "narrowable_for", None)
        return bool(check(self.module)) if check is not None else self.family.narrowable


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every attention module of ``model`` that a registered family recognises (outermost first; a
    module inside a recognised one is not searched)."""
    sites: list[AttentionSite] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        family = next((f for f in FAMILIES if f.matches(module)), None)
        if family is not None:
            sites.append(AttentionSite(name, module, family))
            inside.append(name)
    return sites


def head_widths(model: nn.Module) -> dict[str, int]:
    """Inner width (``num_heads * head_dim``) of every attention module of ``model``, by name."""
    widths = {}
    for site in find_attention(model):
        num_heads, head_dim = site.heads()
        widths[site.name] = num_heads * head_dim
    return widths


def head_projection_layers(sites: Iterable[AttentionSite]) -> set[nn.Module]:
    """Layers whose *output* channels are head channels (q, k, v, fused qkv): torch-pruning's groups
    rooted there are replaced by the head groups."""
    return {
        p.layer for site in sites if site.family.owns_inner_width for p in site.family.projections(site.module) if p.is_output
    }


def _sync_layer_sizes(layer: Any) -> None:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif hasattr(layer, "nf") and hasattr(layer, "nx"):  # transformers' Conv1D: weight (nx, nf)
        layer.nx, layer.nf = int(weight.shape[0]), int(weight.shape[1])


def _check_removal(channels: Sequence[int], num_heads: int, head_dim: int, whole_heads: bool) -> list[int]:
    """The kept channels; raises ValueError unless ``channels`` are whole heads (or the same offsets
    in every head), leaving at least one."""
    width = num_heads * head_dim
    removed = sorted(set(int(c) for c in channels))
    if any(c < 0 or c >= width for c in removed):
        raise ValueError(f"head channels out of range 0..{width - 1}: {removed}")
    if whole_heads:
        heads = sorted({c // head_dim for c in removed})
        if len(removed) != len(heads) * head_dim or len(heads) >= num_heads:
            raise ValueError(f"head cut must remove whole heads of {head_dim} channels, leaving one: {removed}")
    else:
        offsets = sorted({c % head_dim for c in removed})
        if len(removed) != len(offsets) * num_heads or len(offsets) >= head_dim:
            raise ValueError(f"head-width cut must remove the same offsets in each of {num_heads} heads: {removed}")
    gone = set(removed)
    return [c for c in range(width) if c not in gone]


def cut_heads(site: AttentionSite, channels: Sequence[int], whole_heads: bool) -> None:
    """Remove head channels ``channels`` (``0 .. num_heads * head_dim - 1``) from ``site``: the
    parameters (each through torch-pruning's cut, so interceptions record it) and the attributes."""
    num_heads, head_dim = site.heads()
    width = num_heads * head_dim
    keep = _check_removal(channels, num_heads, head_dim, whole_heads)
    if len(keep) == width:
        return
    for projection in site.family.projections(site.module):
        param = getattr(projection.layer, projection.param, None)
        if not isinstance(param, nn.Parameter):
            continue
        index = [part * width + c for part in range(projection.parts) for c in keep]
        setattr(projection.layer, projection.param, cut_through_interception(param, index, projection.dim))
        _sync_layer_sizes(projection.layer)
    if whole_heads:
        site.family.set_heads(site.module, len(keep) // head_dim, head_dim)
    else:
        site.family.set_heads(site.module, num_heads, len(keep) // num_heads)


@dataclass(frozen=True)
class HeadHandle:
    """Cuts channels of one attention site's heads (a :class:`~lightning_prune.engine.graph.Cutter`)."""

    site: AttentionSite
    whole_heads: bool

    def prune(self, channels: Sequence[int]) -> None:
        cut_heads(self.site, channels, self.whole_heads)

    def entry(self, channels: Sequence[int]) -> list[Any]:
        """The surgery record of cutting ``channels``."""
        return [self.site.name, HEAD_MODES[0] if self.whole_heads else HEAD_MODES[1], sorted(int(c) for c in channels)]


def head_groups(
    model: nn.Module, sites: Sequence[AttentionSite], *, whole_heads: bool = True, start: int = 0
) -> list[ChannelGroup]:
    """One :class:`~lightning_prune.engine.graph.ChannelGroup` per attention site (``kind="heads"``).

    With ``whole_heads`` a position is one head (``block = head_dim``); otherwise one channel of every
    head (``channel_groups = num_heads``; sites whose family normalises over ``head_dim`` are then left
    out). Sites with a single head (whole heads) or a single channel per head are left out.
    """
    module_names = {m: n for n, m in model.named_modules()}
    param_names = {p: n for n, p in model.named_parameters()}
    groups: list[ChannelGroup] = []
    for site in sites:
        num_heads, head_dim = site.heads()
        width = num_heads * head_dim
        site.family.prepare(site.module)
        if (whole_heads and num_heads < 2) or (not whole_heads and (head_dim < 2 or not site.narrowable())):
            continue
        slices = []
        for projection in site.family.projections(site.module):
            param = getattr(projection.layer, projection.param, None)
            if not isinstance(param, nn.Parameter) or param not in param_names:
                continue
            idxs = tuple(part * width + c for part in range(projection.parts) for c in range(width))
            slices.append(
                ParamSlice(
                    name=param_names[param],
                    param=param,
                    dim=projection.dim,
                    idxs=idxs,
                    root_idxs=tuple(c for _ in range(projection.parts) for c in range(width)),
                    is_output=projection.is_output,
                    dep_channels=int(param.shape[projection.dim]),
                )
            )
        layers = [p.layer for p in site.family.projections(site.module)]
        output = next(p.layer for p in site.family.projections(site.module) if not p.is_output)
        groups.append(
            ChannelGroup(
                index=start + len(groups),
                root_name=module_names[site.family.value_layer(site.module)],
                size=width,
                channel_groups=1 if whole_heads else num_heads,
                slices=tuple(slices),
                module_names=tuple(dict.fromkeys([site.name] + [module_names[layer] for layer in layers])),
                handle=HeadHandle(site, whole_heads),
                block=head_dim if whole_heads else 1,
                kind="heads",
                observed=(module_names[output], "input"),  # the heads' outputs, concatenated
            )
        )
    return groups


# --------------------------------------------------------------------------------------------
# Widths hard-coded outside the weights
# --------------------------------------------------------------------------------------------


class WidthAttribute:
    """A width a forward reads from an attribute instead of the weights; rewritten after every cut."""

    def matches(self, module: Any) -> bool:
        raise NotImplementedError

    def sync(self, module: Any) -> None:
        raise NotImplementedError


class TorchvisionViTHiddenDim(WidthAttribute):
    """torchvision's ``VisionTransformer`` reshapes the patch embedding with ``self.hidden_dim``."""

    def matches(self, module: Any) -> bool:
        return (
            _module_path(module) == "torchvision.models.vision_transformer"
            and type(module).__name__ == "VisionTransformer"
            and hasattr(module, "hidden_dim")
            and isinstance(getattr(module, "conv_proj", None), nn.Conv2d)
        )

    def sync(self, module: Any) -> None:
        module.hidden_dim = int(module.conv_proj.out_channels)


#: The registered hard-coded widths.
WIDTH_ATTRIBUTES: list[WidthAttribute] = [TorchvisionViTHiddenDim()]


def width_attribute_modules(model: nn.Module) -> list[tuple[nn.Module, WidthAttribute]]:
    """The modules of ``model`` with a registered hard-coded width."""
    return [(m, w) for m in model.modules() for w in WIDTH_ATTRIBUTES if w.matches(m)]


def sync_width_attributes(model: nn.Module) -> None:
    """Rewrite every registered hard-coded width of ``model`` from its weights."""
    for module, width in width_attribute_modules(model):
        width.sync(module)


@dataclass(frozen=True)
class SyncedHandle:
    """A group's cutter followed by :func:`sync_width_attributes` on the model (models with a
    hard-coded width, e.g. torchvision's ViT)."""

    inner: Any
    model: nn.Module

    def prune(self, channels: Sequence[int]) -> None:
        self.inner.prune(channels)
        sync_width_attributes(self.model)


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------


def is_head_entry(entry: Sequence[Any]) -> bool:
    """Whether a surgery entry records a head cut (else it is torch-pruning's ``[layer, is_out, idxs]``)."""
    return len(entry) == 3 and isinstance(entry[1], str) and entry[1] in HEAD_MODES


def replay(graph: TracedGraph, model: nn.Module, entries: Sequence[Sequence[Any]]) -> None:
    """Re-apply one step's surgery record to ``model`` (traced as ``graph``): torch-pruning's entries,
    then the head cuts, then the hard-coded widths.

    Raises:
        ValueError: a head entry names a module that is not a recognised attention module, or
            channels that are not whole heads (or head offsets) of it.
    """
    plain = [e for e in entries if not is_head_entry(e)]
    if plain:
        replay_history(graph, plain)
    sites = {site.name: site for site in find_attention(model)}
    with torch.no_grad():
        for name, mode, channels in (e for e in entries if is_head_entry(e)):
            if name not in sites:
                raise ValueError(f"the record cuts heads of '{name}', which is not an attention module of this model")
            cut_heads(sites[name], list(channels), mode == HEAD_MODES[0])
    sync_width_attributes(model)
