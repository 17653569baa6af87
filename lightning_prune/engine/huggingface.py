"""Hugging Face models after pruning: the ``config`` follows the new widths, or says why it cannot.

``from_pretrained`` rebuilds a model from its ``config`` before loading the weights, so a pruned
model round-trips through ``save_pretrained`` / ``from_pretrained`` only when its config describes
every pruned width. A config holds one value per layer type (``hidden_size``,
``intermediate_size``, ``num_attention_heads``, and for some models ``head_dim``), so that is
possible when every layer of a type has the same width (``ChannelPruner(uniform_per_type=True)``
ensures it) and, for models that derive the head width as ``hidden_size / num_attention_heads``
(BERT, RoBERTa, GPT-2), when that still holds (it does not after whole heads are removed with the
token width kept: their config cannot describe such a model).

:func:`sync_configs` runs after every pruning step and replay: it writes the widths into the config
where it can, and otherwise makes the model's ``save_pretrained`` warn with the reason
(:class:`ConfigCannotDescribeWarning`) before saving; ``lightning_prune.load_pruned`` (a Lightning
checkpoint) or ``restore_pruned_structure`` then rebuild it. transformers is never imported: models
are recognised by their class path and ``config.model_type``.

Example (BERT, feed-forward widths only, one width for every layer)::

    pruner = ChannelPruner(get_criterion("l1"), scope="mlp", uniform_per_type=True,
                           output_transform=lambda out: out.logits)
    pruner.step(model, {"input_ids": ids}, Target("flops", 0.3))
    model.save_pretrained(path)          # config.intermediate_size is the pruned width
    BertForSequenceClassification.from_pretrained(path)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune.engine.attention import find_attention

__all__ = ["CONFIG_FAMILIES", "ConfigCannotDescribeWarning", "ConfigFamily", "update_configs", "sync_configs"]


class ConfigCannotDescribeWarning(UserWarning):
    """``save_pretrained`` of a pruned model whose config cannot describe its widths."""


def _out_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and isinstance(weight, torch.Tensor):  # transformers' Conv1D
        return int(weight.shape[1])
    raise TypeError(f"no output width for {type(module).__name__}")


@dataclass(frozen=True)
class ConfigFamily:
    """How one family's config names its widths.

    Attributes:
        model_types: ``config.model_type`` values of the family.
        hidden: the token-width field; heads: the number-of-heads field; intermediate: the
            feed-forward width field; ff_suffix: the name suffix of the feed-forward input layers.
        head_dim: the head-width field the model reads, or None when the model derives the head
            width as ``hidden / heads``.
    """

    model_types: tuple[str, ...]
    hidden: str
    heads: str
    intermediate: str
    ff_suffix: str
    head_dim: str | None = None

    def widths(self, model: nn.Module) -> dict[str, set[int]]:
        """Every value the model's layers have for each field."""
        found: dict[str, set[int]] = {self.hidden: set(), self.heads: set(), self.intermediate: set(), "head_dim": set()}
        for site in find_attention(model):
            num_heads, head_dim = site.heads()
            found[self.heads].add(num_heads)
            found["head_dim"].add(head_dim)
        for name, module in model.named_modules():
            if name.endswith(self.ff_suffix):
                found[self.intermediate].add(_out_width(module))
        embeddings = getattr(model, "get_input_embeddings", None)
        table = embeddings() if callable(embeddings) else None
        weight = getattr(table, "weight", None)
        if isinstance(weight, torch.Tensor) and isinstance(table, nn.Embedding):
            found[self.hidden].add(int(weight.shape[1]))
        for module in model.modules():  # the token width: every norm over it
            if isinstance(module, nn.LayerNorm):
                found[self.hidden].add(int(module.normalized_shape[-1]))
        return found

    def update(self, config: Any, model: nn.Module) -> list[str]:
        """Write the model's widths into ``config``; the reasons it cannot (then nothing is written)."""
        widths = self.widths(model)
        reasons = [
            f"layers have different {field} ({', '.join(str(v) for v in sorted(values))}): a config holds one value "
            "per layer type (prune with uniform_per_type=True)"
            for field, values in widths.items()
            if len(values) > 1
        ]
        values = {field: next(iter(v)) for field, v in widths.items() if len(v) == 1}
        hidden, heads, head_dim = values.get(self.hidden), values.get(self.heads), values.get("head_dim")
        derived = hidden is not None and heads is not None and head_dim is not None and heads * head_dim != hidden
        if self.head_dim is None and derived:
            reasons.append(
                f"{self.model_types[0]} derives the head width as {self.hidden} / {self.heads}, but the model has "
                f"{heads} heads of {head_dim} with {self.hidden}={hidden}"
            )
        reasons += _scale_mismatches(model)
        if reasons:
            return reasons
        saved = config.to_dict()
        for field, value in values.items():
            if field == "head_dim":
                if self.head_dim is not None:
                    setattr(config, self.head_dim, value)
            else:
                setattr(config, field, value)
        reasons = _rebuild_mismatches(model, config)
        if reasons:  # some width the config has no field for (a pooler, say): leave the config as it was
            for key, value in saved.items():
                if key in values or key == self.head_dim:
                    setattr(config, key, value)
        return reasons


def _scale_mismatches(model: nn.Module) -> list[str]:
    """Narrowed heads (``head_pruning="head_dims"``) keep the attention scale of their original width;
    a model built from the config would compute it from the new one."""
    for site in find_attention(model):
        holder = getattr(site.module, "self", site.module)
        scaling = getattr(holder, "scaling", None)
        _, head_dim = site.heads()
        if isinstance(scaling, float) and abs(scaling - head_dim**-0.5) > 1e-9 * scaling:
            return [
                f"'{site.name}' scales attention by {scaling:.6g} (its original head width), a model built from the "
                f"config would use head_dim ** -0.5 = {head_dim**-0.5:.6g}"
            ]
    return []


def _rebuild_mismatches(model: nn.Module, config: Any) -> list[str]:
    """Parameters whose shape a model built from ``config`` (on the meta device, by the model's own
    class) would not have: what ``from_pretrained`` would fail on."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = type(model)(config)
    except Exception as error:  # noqa: BLE001 - any failure means the config does not rebuild the model
        return [f"{type(model).__name__}(config) fails: {type(error).__name__}: {error}"[:300]]
    shapes = {name: tuple(p.shape) for name, p in rebuilt.named_parameters()}
    wrong = [
        f"{name}: the model has {tuple(p.shape)}, the config builds {shapes.get(name)}"
        for name, p in model.named_parameters()
        if shapes.get(name) != tuple(p.shape)
    ]
    return [f"{len(wrong)} parameter(s) the config cannot describe, e.g. " + "; ".join(wrong[:3])] if wrong else []


#: The registered config families.
CONFIG_FAMILIES: list[ConfigFamily] = [
    ConfigFamily(
        ("bert", "roberta", "xlm-roberta", "camembert"), "hidden_size", "num_attention_heads", "intermediate_size",
        ".intermediate.dense",
    ),
    ConfigFamily(("vit", "deit"), "hidden_size", "num_attention_heads", "intermediate_size", ".mlp.fc1", head_dim="head_dim"),
    ConfigFamily(("gpt2",), "n_embd", "n_head", "n_inner", ".mlp.c_fc"),
]


def _pretrained_models(model: nn.Module) -> list[nn.Module]:
    """Outermost transformers models inside ``model`` (itself included)."""
    found: list[nn.Module] = []
    for module in model.modules():
        if any(module in set(f.modules()) for f in found):
            continue
        config = getattr(module, "config", None)
        if (
            type(module).__module__.startswith("transformers.")
            and callable(getattr(type(module), "save_pretrained", None))
            and isinstance(getattr(config, "model_type", None), str)
        ):
            found.append(module)
    return found


def update_configs(model: nn.Module) -> dict[int, list[str]]:
    """Per transformers model inside ``model`` (by ``id``): why its config cannot describe it (empty: it can)."""
    result = {}
    for pretrained in _pretrained_models(model):
        config: Any = pretrained.config
        family = next((f for f in CONFIG_FAMILIES if config.model_type in f.model_types), None)
        if family is None:
            result[id(pretrained)] = [f"lightning-prune has no config mapping for model_type '{config.model_type}'"]
        else:
            result[id(pretrained)] = family.update(config, pretrained)
    return result


def _warning_save(original: Callable[..., Any], reasons: list[str]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            "this pruned model's config cannot describe its widths, so from_pretrained will not rebuild it: "
            + "; ".join(reasons)
            + ". The weights are saved; rebuild the model with lightning_prune.load_pruned (a Lightning checkpoint) "
            "or restore_pruned_structure(model, record) before loading them.",
            ConfigCannotDescribeWarning,
            stacklevel=2,
        )
        return original(*args, **kwargs)

    save_pretrained.lightning_prune_reasons = reasons  # type: ignore[attr-defined]
    return save_pretrained


def sync_configs(model: nn.Module) -> None:
    """Update the config of every transformers model inside ``model`` to its widths; where the config
    cannot describe them, its ``save_pretrained`` warns why (see the module docstring). No-op for
    other models."""
    for pretrained in _pretrained_models(model):
        reasons = update_configs(pretrained).get(id(pretrained), [])
        vars(pretrained).pop("save_pretrained", None)
        if reasons:
            cls: Any = type(pretrained)
            original = cls.save_pretrained.__get__(pretrained)
            vars(pretrained)["save_pretrained"] = _warning_save(original, reasons)
