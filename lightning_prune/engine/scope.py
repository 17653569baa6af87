"""What to prune, in one word: the ``scope`` argument and the structural classes of groups.

Every channel group is one of three kinds, decided from the layers it couples (never by name):

* ``"heads"``: the q/k/v output channels of an attention module, cut in whole heads
  (:mod:`lightning_prune.engine.attention`);
* ``"embedding"``: the token width (the residual stream of a transformer): a group that reaches a
  layer norm, an embedding, or a parameter held directly by a container module (a position
  embedding, a class token);
* ``"mlp"``: every other width inside a transformer block (the module holding an attention module:
  its feed-forward hidden widths); in a model without attention, every width that is not the token
  width (every channel of a CNN without layer norms);
* ``"other"``: in a transformer, the widths outside its blocks (a pooler, a pre-logits layer); only
  ``"all"`` prunes them.

``scope`` is ``"mlp"``, ``"heads"``, ``"embedding"``, ``"all"``, or a combination (a sequence of
them, or a ``"+"``-joined string such as ``"mlp+heads"``). None (the default) means ``"mlp+heads"``
for a transformer (a model with an attention module: the token width is kept, which is what users
of a pretrained transformer expect) and ``"all"`` otherwise (CNNs are pruned as before).

Example::

    from lightning_prune.engine.scope import resolve_scope
    assert resolve_scope("mlp+heads") == frozenset({"mlp", "heads"})
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_prune.engine.graph import ChannelGroup

__all__ = ["KINDS", "SCOPE_NAMES", "Scope", "classify_group", "default_scope", "resolve_scope"]

#: The group kinds a scope selects from.
KINDS: tuple[str, ...] = ("mlp", "heads", "embedding", "other")
#: Every accepted scope word.
SCOPE_NAMES: tuple[str, ...] = ("mlp", "heads", "embedding", "all")

Scope = str | Sequence[str] | None


def resolve_scope(scope: Scope) -> frozenset[str] | None:
    """The kinds ``scope`` selects, or None for the default (decided per model by :func:`default_scope`).

    Raises:
        ValueError: an unknown word, or an empty scope (the message lists the allowed words).
        TypeError: neither a string, a sequence of strings nor None.
    """
    if scope is None:
        return None
    if isinstance(scope, str):
        words = [w.strip() for w in scope.split("+")]
    elif isinstance(scope, Sequence) and all(isinstance(w, str) for w in scope):
        words = [w.strip() for w in scope]
    else:
        raise TypeError(f"scope must be a string, a sequence of strings or None, got {scope!r}")
    unknown = [w for w in words if w not in SCOPE_NAMES]
    if unknown or not words:
        raise ValueError(
            f"scope must be one of {', '.join(SCOPE_NAMES)}, a combination of them (e.g. 'mlp+heads' or "
            f"['mlp', 'heads']) or None, got {scope!r}"
        )
    return frozenset(KINDS) if "all" in words else frozenset(words)


def default_scope(is_transformer: bool) -> frozenset[str]:
    """``{"mlp", "heads"}`` for a transformer (token width kept), every kind otherwise."""
    return frozenset({"mlp", "heads"}) if is_transformer else frozenset(KINDS)


def _is_token_layer(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.Embedding)):
        return True
    name = type(module).__name__
    return name.endswith("LayerNorm") or name.endswith("RMSNorm")


def classify_group(group: ChannelGroup, model: nn.Module, blocks: Sequence[str] | None = None) -> str:
    """The kind of a torch-pruning group: ``"embedding"`` if it reaches a layer norm, an embedding or
    a parameter held by a container module (position embedding, class token); else ``"mlp"`` when
    ``blocks`` (names of the modules holding an attention module) is None or its root lies in one of
    them; else ``"other"`` (head groups are built with ``kind="heads"``)."""
    if group.kind == "heads":
        return "heads"
    for piece in group.slices:
        owner_name, _, attribute = piece.name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if _is_token_layer(owner):
            return "embedding"
        if attribute not in ("weight", "bias") and not isinstance(owner, nn.MultiheadAttention):
            return "embedding"
    if blocks is None or any(group.root_name.startswith(block + ".") for block in blocks):
        return "mlp"
    return "other"
