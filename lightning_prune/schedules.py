"""Pruning schedules: the cumulative target after each of ``n`` pruning steps.

Every schedule maps the final target ``T`` (a fraction removed, relative to the dense model) and
the number of steps ``n`` to the cumulative fraction removed after step ``i = 1..n``; the last
one is always ``T``.

* ``"linear"``: ``T * i / n``.
* ``"geometric"``: each step removes the same fraction ``q`` of what is left,
  ``1 - (1 - T) ** (i / n)`` (the PLS paper's schedule: with ``q = 0.1`` after ``k`` steps
  ``1 - 0.9 ** k`` is gone; see :func:`geometric_steps_for`).
* ``"agp"``: automated gradual pruning (Zhu & Gupta 2017), ``T * (1 - (1 - i / n) ** 3)``:
  large steps first, small ones when the network is already thin.

A callable ``f(i, n, T) -> float`` may stand in for a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

__all__ = ["SCHEDULES", "Schedule", "ScheduleName", "cumulative_targets", "geometric_steps_for"]

Schedule = Callable[[int, int, float], float]
ScheduleName = Literal["linear", "geometric", "agp"]


def _linear(i: int, n: int, final: float) -> float:
    return final * i / n


def _geometric(i: int, n: int, final: float) -> float:
    return 1.0 - (1.0 - final) ** (i / n)


def _agp(i: int, n: int, final: float) -> float:
    return final * (1.0 - (1.0 - i / n) ** 3)


SCHEDULES: dict[str, Schedule] = {"linear": _linear, "geometric": _geometric, "agp": _agp}


def cumulative_targets(final: float, steps: int, schedule: str | Schedule = "linear") -> list[float]:
    """Cumulative fraction removed after each step; non-decreasing, ending at ``final``.

    Raises:
        ValueError: unknown schedule name, ``steps < 1``, or a callable schedule that decreases
            or leaves ``[0, final]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{schedule}'. Valid names: {', '.join(SCHEDULES)}")
        fn = SCHEDULES[schedule]
    elif callable(schedule):
        fn = schedule
    else:
        raise TypeError(f"schedule must be one of {list(SCHEDULES)} or a callable, got {schedule!r}")
    values = [float(fn(i, steps, final)) for i in range(1, steps + 1)]
    values[-1] = final
    previous = 0.0
    for value in values:
        if not (previous - 1e-12 <= value <= final + 1e-12):
            raise ValueError(f"schedule {schedule!r} gave {values}: values must rise from 0 to the final target {final}")
        previous = value
    return values


def geometric_steps_for(fraction_per_step: float, steps: int) -> float:
    """Final target of ``steps`` geometric steps that each remove ``fraction_per_step`` of what is left.

    ``geometric_steps_for(0.1, 5) == 1 - 0.9 ** 5`` (the PLS + VIP paper's 5-iteration setting).
    """
    if not 0.0 < fraction_per_step < 1.0:
        raise ValueError(f"fraction_per_step must be in (0, 1), got {fraction_per_step}")
    return 1.0 - math.pow(1.0 - fraction_per_step, steps)
