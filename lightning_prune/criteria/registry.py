"""Criterion names: look-up, registration and listing."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from lightning_prune.criteria.base import Criterion

__all__ = ["available_criteria", "get_criterion", "register_criterion"]

_REGISTRY: dict[str, Callable[..., Criterion]] = {}
_F = TypeVar("_F", bound=Callable[..., Criterion])


def register_criterion(name: str, *aliases: str, overwrite: bool = False) -> Callable[[_F], _F]:
    """Class decorator (or decorator of a factory) that makes a criterion available by name.

    Raises:
        ValueError: if the name is taken and ``overwrite`` is False.
    """

    def decorator(factory: _F) -> _F:
        for key in (name, *aliases):
            key = key.lower()
            if key in _REGISTRY and not overwrite:
                raise ValueError(f"criterion name '{key}' is already registered; pass overwrite=True to replace it")
            _REGISTRY[key] = factory
        if isinstance(factory, type) and not getattr(factory, "name", ""):
            setattr(factory, "name", name)  # noqa: B010 - a class attribute of a factory that may lack it
        return factory

    return decorator


def available_criteria() -> list[str]:
    """Registered criterion names (aliases included), sorted."""
    return sorted(_REGISTRY)


def get_criterion(criterion: str | Criterion, **kwargs: Any) -> Criterion:
    """Resolve ``criterion`` to an instance: a registered name (built with ``kwargs``) or an instance.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or ``kwargs`` the criterion does
            not accept (the message lists the ones it does).
        TypeError: neither a string nor a :class:`Criterion`.
    """
    if isinstance(criterion, Criterion):
        if kwargs:
            raise ValueError("criterion_kwargs can only be used with a criterion given by name")
        return criterion
    if not isinstance(criterion, str):
        raise TypeError(
            f"criterion must be a registered name or a Criterion instance, got {type(criterion).__name__}: {criterion!r}"
        )
    factory = _REGISTRY.get(criterion.lower())
    if factory is None:
        raise ValueError(f"unknown criterion '{criterion}'. Valid names: {', '.join(available_criteria())}")
    if kwargs:  # name the argument and what the criterion accepts, before training starts
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # a factory without a signature: let the call decide
            accepted = None
        takes_any = accepted is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [] if accepted is None or takes_any else sorted(set(kwargs) - set(accepted))
        if unknown and accepted is not None:
            valid = ", ".join(n for n, p in accepted.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL) or "none"
            raise ValueError(
                f"criterion_kwargs {unknown} are not arguments of criterion '{criterion}'; it accepts: {valid}"
            )
    instance = factory(**kwargs)
    if not getattr(instance, "name", ""):
        instance.name = criterion.lower()  # type: ignore[misc]  # name is a ClassVar; a factory-made instance gets its own
    return instance
