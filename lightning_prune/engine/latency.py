"""Measured latency: per-layer tables, a latency model of any plan, and their on-disk cache.

MACs are a poor proxy for the time a model takes on the machine it is deployed to (fixed per-layer
costs, memory-bound layers, widths the kernels do not like). This module gives the allocator a
*latency model* of a plan, as :class:`~lightning_prune.engine.cost.CostModel` gives it the MACs:

* every convolution and linear layer the forward pass reaches gets a **table**: its measured time,
  alone, at the latency batch size, dtype and device, on a grid of (input width, output width)
  points covering the widths the plan may choose (from its current width down to what
  ``max_layer_ratio`` allows). Between grid points the time is interpolated bilinearly (linearly
  beyond), after making the grid non-decreasing in both widths (running maxima: timing noise never
  makes a narrower layer look slower). Depthwise convolutions have one axis (input = output =
  groups); a side that no group prunes (the stem's input, the classifier's output) stays at its width;
* the model's latency at a plan is ``sum(tables at the plan's widths) + c0 + c1 * A(plan)``, where
  ``A`` is the activation volume the tabled layers write (output channels times output positions):
  the tables carry the convolutions and linear layers, ``c0 + c1 A`` everything else (a fixed part:
  Python and per-call overhead; a part that scales with the activations: normalisation, activation
  functions, additions). ``c0`` and ``c1`` come from two measurements of the whole model, as it is
  and with every group cut to half its width on trial (then restored; both parts kept non-negative);
  with one measurement the rest is taken as fixed (``c1 = 0``). When the layers alone take longer
  than the whole model, the tables are scaled to the measurement instead;
* grids are refined level by level (2, then 3, then 5 points per axis) while the time budget
  ``table_seconds`` lasts; every measured point is stored in a JSON file under ``cache_dir`` (default
  ``~/.cache/lightning_prune/latency``, or ``$LIGHTNING_PRUNE_LATENCY_CACHE``), one file per device,
  torch version and dtype, keyed by the layer's configuration and widths, so a second fit on the same
  machine measures nothing;
* :meth:`LatencyEstimator.fast_multiple` scans the output width of the costliest layer and returns the
  multiple whose staircase explains the times (the ``round_to="auto"`` rule).

Every measurement goes through an injectable function: ``layer_timer(spec) -> seconds`` for one
layer, ``latency_fn(model, example_inputs) -> seconds`` for the whole model; unit tests pass
deterministic ones. Real timing: warm-up, then the median of repeats, eval mode, no gradient,
``torch.cuda.synchronize`` on CUDA.

Example::

    import torch
    from torch import nn
    from lightning_prune.engine.latency import LatencyEstimator

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3))
    estimator = LatencyEstimator(batch_size=8, table_seconds=5.0)
    print(estimator.measure(model, torch.randn(2, 3, 16, 16)))  # seconds per batch of 8
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_prune._model import batch_size_of, call_model, evaluating, preserved_training_modes
from lightning_prune._tree import tree_map
from lightning_prune.engine.cost import Cost, CostModel
from lightning_prune.engine.graph import ChannelGroup

__all__ = [
    "AUTO_MULTIPLES",
    "CACHE_ENV",
    "LatencyCostModel",
    "LatencyEstimator",
    "LayerSpec",
    "LayerTimer",
    "ModelTimer",
    "check_seconds",
    "default_cache_dir",
    "environment_key",
    "fast_multiple_from_times",
    "fastest_multiple",
    "interpolate",
    "monotone_grid",
    "median_interval",
    "median_ratio",
    "resize_batch",
    "time_callable",
    "time_interleaved",
]

#: Environment variable overriding the default cache folder.
CACHE_ENV = "LIGHTNING_PRUNE_LATENCY_CACHE"
#: Candidate multiples of ``round_to="auto"``, largest first.
AUTO_MULTIPLES = (32, 16, 8, 4)


@dataclass(frozen=True)
class LayerSpec:
    """One layer configuration at given widths: what a table point measures.

    ``kind`` is ``"conv"``, ``"depthwise"`` or ``"linear"``; ``spatial`` the input's sizes after the
    channel axis (convolutions) or between batch and features (linear layers); ``groups`` the
    convolution's groups (``in_channels`` for depthwise ones).
    """

    kind: str
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...]
    batch: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: str = ""
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False

    def config(self) -> str:
        """The configuration without the widths (the cache key's layer part)."""
        return (
            f"{self.kind}|k{self.kernel}|s{self.stride}|p{self.padding}|d{self.dilation}|b{int(self.bias)}|"
            f"x{self.spatial}|n{self.batch}" + (f"|g{self.groups}" if self.kind == "conv" else "")
        )

    def key(self) -> str:
        return f"{self.config()}|{self.in_channels}>{self.out_channels}"

    def at(self, in_channels: int, out_channels: int) -> LayerSpec:
        """The same layer at other widths (depthwise: ``in = out = groups = out_channels``)."""
        if self.kind == "depthwise":
            return replace(self, in_channels=out_channels, out_channels=out_channels, groups=out_channels)
        return replace(self, in_channels=in_channels, out_channels=out_channels)

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
        """The layer and a random input for it."""
        if self.kind == "linear":
            layer: nn.Module = nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
            x = torch.randn(self.batch, *self.spatial, self.in_channels)
        else:
            conv: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel)]
            padding: Any = self.padding if self.padding in ("same", "valid") else tuple(json.loads(self.padding))
            layer = conv(
                self.in_channels, self.out_channels, self.kernel, self.stride, padding, self.dilation,
                groups=self.groups, bias=self.bias,
            )
            x = torch.randn(self.batch, self.in_channels, *self.spatial)
        return layer.to(device=device, dtype=dtype).eval(), x.to(device=device, dtype=dtype)


#: ``layer_timer(spec) -> seconds``: the time of one forward pass of a layer configuration.
LayerTimer = Callable[[LayerSpec], float]
#: ``latency_fn(model, example_inputs) -> seconds``: the time of one forward pass of the whole model.
ModelTimer = Callable[[nn.Module, Any], float]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm(fn: Callable[[], Any], device: torch.device, warmup: int, max_warmup_seconds: float) -> float:
    """Call ``fn`` at least ``warmup`` times, and more while the calls still get faster (the first calls
    at a new shape build kernels and allocate; on CPU they can be 10x slower), for at most
    ``max_warmup_seconds``; return the fastest of the last two calls' seconds."""
    started = time.perf_counter()
    previous = took = math.inf
    for i in range(warmup + 20):
        tick = time.perf_counter()
        fn()
        _synchronize(device)
        took = time.perf_counter() - tick
        if i + 1 >= warmup and (took > 0.8 * previous or time.perf_counter() - started > max_warmup_seconds):
            break
        previous = took
    return min(previous, took)


def _calls_per_sample(seconds: float, min_sample_seconds: float) -> int:
    return max(1, min(1000, math.ceil(min_sample_seconds / max(seconds, 1e-7))))


def _sample(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``fn`` (synchronised once at the end)."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    _synchronize(device)
    return (time.perf_counter() - started) / calls


def time_callable(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
    max_warmup_seconds: float = 2.0,
    min_sample_seconds: float = 0.02,
) -> float:
    """Median over ``repeats`` samples of the wall time of one ``fn()`` call (synchronised on CUDA); a
    sample times as many back-to-back calls as fill ``min_sample_seconds`` (timer resolution and short
    interruptions average out). Before: at least ``warmup`` calls, and more while they still get faster
    (the first calls at a new shape build kernels and allocate; on CPU they can be 10x slower), for at
    most ``max_warmup_seconds``."""
    calls = _calls_per_sample(_warm(fn, device, warmup, max_warmup_seconds), min_sample_seconds)
    return float(statistics.median(_sample(fn, device, calls) for _ in range(repeats)))


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    device: torch.device,
    *,
    enter: Sequence[Callable[[], None]] | None = None,
    warmup: int = 2,
    rounds: int = 9,
    max_warmup_seconds: float = 2.0,
    min_sample_seconds: float = 0.02,
    precision: float | None = None,
    max_rounds: int | None = None,
    max_seconds: float = math.inf,
) -> list[list[float]]:
    """Per round, one sample (seconds per call, as in :func:`time_callable`) of every callable in
    ``fns``, taken in turn, the order rotated from round to round: a machine whose speed drifts over
    seconds (shared CPUs, clocks that boost and throttle) slows every callable of a round alike, so
    ratios within a round cancel the drift that separate measurements would keep. ``enter[i]()`` runs
    before each of ``fns[i]``'s warm-ups and samples, untimed (e.g. switching a model into a state).

    With ``precision``: after ``rounds`` rounds, further rounds while the 95% confidence interval of
    the median of the per-round ratios ``fns[i] / fns[0]`` (:func:`median_interval`) is wider than
    ``± precision`` for some ``i``, up to ``max_rounds`` rounds in all (default ``5 * rounds``) and
    for at most ``max_seconds`` of sampling (a burst of noise on a shared machine widens the
    interval, and the rounds after it outvote it). Returns one list of ``len(fns)`` seconds per
    round taken."""
    enter = list(enter) if enter is not None else [lambda: None] * len(fns)
    if len(enter) != len(fns):
        raise ValueError(f"enter needs one callable per fn ({len(fns)}), got {len(enter)}")
    calls = []
    for fn, switch in zip(fns, enter):
        switch()
        calls.append(_calls_per_sample(_warm(fn, device, warmup, max_warmup_seconds), min_sample_seconds))
    limit = rounds if precision is None else max(rounds, max_rounds if max_rounds is not None else 5 * rounds)
    started = time.perf_counter()
    samples: list[list[float]] = []
    for r in range(limit):
        if r >= rounds and precision is not None and (
            time.perf_counter() - started >= max_seconds or _precise(samples, precision)
        ):
            break
        row = [0.0] * len(fns)
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            enter[i]()
            row[i] = _sample(fns[i], device, calls[i])
        samples.append(row)
    return samples


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free ``confidence`` interval of the median of ``values``: the order statistics
    ``(x_(j), x_(n+1-j))`` with the largest ``j`` such that a Binomial(n, 1/2) falls in
    ``[j, n-j]`` with probability at least ``confidence``; the whole range when ``n`` is too small
    for any narrower one (n <= 8 at 95%)."""
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    mass = [math.comb(n, k) / 2.0**n for k in range(n + 1)]
    best = 1
    for j in range(1, n // 2 + 1):
        if sum(mass[j : n - j + 1]) >= confidence:
            best = j
        else:
            break
    # coverage of (x_(j), x_(n+1-j)) is P(j <= B <= n-j); j = 1 with too few values: the range
    return ordered[best - 1], ordered[n - best]


def _precise(samples: Sequence[Sequence[float]], precision: float) -> bool:
    """Whether every ratio to ``samples[r][0]`` has a 95% median interval within ``± precision``."""
    for i in range(1, len(samples[0])):
        low, high = median_interval([row[i] / row[0] for row in samples])
        if (high - low) / 2 > precision:
            return False
    return True


def median_ratio(samples: Sequence[Sequence[float]], numerator: int = 1, denominator: int = 0) -> float:
    """The median over rounds of ``samples[r][numerator] / samples[r][denominator]`` (see
    :func:`time_interleaved`)."""
    return float(statistics.median(row[numerator] / row[denominator] for row in samples))


def check_seconds(value: Any, argument: str) -> float:
    """``value`` as a finite positive number of seconds, or a ``ValueError`` naming ``argument``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{argument} must return a finite positive number of seconds, got {value!r}")
    return float(value)


def resize_batch(inputs: Any, batch: int) -> Any:
    """``inputs`` with every batched tensor repeated (then cut) to ``batch`` samples."""

    def resize(t: torch.Tensor) -> torch.Tensor:
        if not t.dim() or t.shape[0] == batch:
            return t
        reps = math.ceil(batch / max(1, t.shape[0]))
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch]

    return tree_map(resize, inputs)


def default_cache_dir() -> Path:
    """``$LIGHTNING_PRUNE_LATENCY_CACHE``, else ``~/.cache/lightning_prune/latency``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_prune" / "latency")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{device.type}:{cpu}:{torch.get_num_threads()}threads"


def environment_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a table depends on besides the layer: the device (its name, CPU threads), the torch
    version and the dtype."""
    return f"{_device_name(device)}|torch{torch.__version__}|{dtype}"


def interpolate(points: Sequence[float], values: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation of ``values`` at sorted ``points`` (linear beyond the ends)."""
    if len(points) == 1:
        return float(values[0])
    i = min(max(bisect.bisect_right(points, x) - 1, 0), len(points) - 2)
    x0, x1 = points[i], points[i + 1]
    w = (x - x0) / (x1 - x0)
    return float(values[i] + w * (values[i + 1] - values[i]))


def _bilinear(ins: Sequence[float], outs: Sequence[float], grid: Sequence[Sequence[float]], x: float, y: float) -> float:
    column = [interpolate(outs, row, y) for row in grid]  # one value per input point
    return interpolate(ins, column, x)


def _grid_points(low: int, high: int, level: int, step: int) -> list[int]:
    """``2**level + 1`` evenly spaced widths in ``[low, high]`` (multiples of ``step``), deduplicated."""
    if high <= low:
        return [high]
    count = 2**level + 1
    points = {high, max(step, step * round(low / step))}
    for i in range(1, count - 1):
        value = low + (high - low) * i / (count - 1)
        points.add(max(step, step * round(value / step)))
    return sorted(p for p in points if p <= high)


def monotone_grid(grid: Sequence[Sequence[float]]) -> list[list[float]]:
    """``grid`` (rows: increasing input widths, columns: increasing output widths) made non-decreasing
    along both axes by running maxima from the narrowest point: a wider layer is never predicted
    faster than a narrower one (on a noisy machine a narrow point timed during a load spike would
    otherwise make cutting channels look like it costs time)."""
    rows = [list(row) for row in grid]
    for i, row in enumerate(rows):
        for j in range(len(row)):
            best = row[j]
            if j:
                best = max(best, row[j - 1])
            if i:
                best = max(best, rows[i - 1][j])
            row[j] = best
    return rows


def fast_multiple_from_times(
    times: Mapping[int, float], multiples: Sequence[int] = AUTO_MULTIPLES, margin: float = 0.75
) -> int | None:
    """The largest multiple ``m`` for which a staircase (one time per block of widths ``(k m - m, k m]``)
    explains ``times`` (width -> seconds) better than a straight line: residual sum of squares at most
    ``margin`` times the line's. None when no multiple does (time follows the width smoothly)."""
    widths = sorted(times)
    if len(widths) < 4:
        return None
    ys = [times[w] for w in widths]
    n = len(widths)
    mean_x, mean_y = sum(widths) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in widths)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(widths, ys)) / sxx if sxx else 0.0
    line = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in zip(widths, ys))
    for m in multiples:
        blocks: dict[int, list[float]] = {}
        for x, y in zip(widths, ys):
            blocks.setdefault(math.ceil(x / m), []).append(y)
        if len(blocks) < 2 or all(len(b) < 2 for b in blocks.values()):
            continue
        stair = sum((y - sum(b) / len(b)) ** 2 for b in blocks.values() for y in b)
        if stair <= margin * line:
            return m
    return None


def fastest_multiple(times: Mapping[int | None, float], margin: float = 0.01) -> int | None:
    """The candidate of ``times`` (multiple, or None for unsnapped widths -> seconds of the whole model
    cut with it) to keep: the finest (None, then the smallest multiple) unless a coarser one is faster
    by more than ``margin`` (relative), in which case that one, and so on up the multiples; ties keep
    the finer widths, which constrain the allocation less. Raises ``ValueError`` on an empty mapping."""
    if not times:
        raise ValueError("fastest_multiple needs at least one candidate")
    order = sorted(times, key=lambda m: 0 if m is None else m)
    best = order[0]
    for multiple in order[1:]:
        if times[multiple] < times[best] * (1.0 - margin):
            best = multiple
    return best


@dataclass
class _Layer:
    """One tabled layer of a model: its spec at the current widths, the grid, and how groups change it."""

    name: str
    spec: LayerSpec
    ins: list[int]
    outs: list[int]
    grid: list[list[float]] = field(default_factory=list)
    #: per group index: (output channels removed, input channels removed) per root channel removed
    effects: dict[int, tuple[float, float]] = field(default_factory=dict)
    positions: float = 0.0  #: output positions per sample (the activation volume per output channel)

    def seconds(self, in_width: float, out_width: float) -> float:
        if self.spec.kind == "depthwise":
            return interpolate(self.outs, self.grid[0], out_width)
        return _bilinear(self.ins, self.outs, self.grid, in_width, out_width)

    def widths(self, removed: Sequence[int]) -> tuple[float, float]:
        out_w, in_w = float(self.spec.out_channels), float(self.spec.in_channels)
        for g, (out_ratio, in_ratio) in self.effects.items():
            if g < len(removed) and removed[g]:
                out_w -= out_ratio * removed[g]
                in_w -= in_ratio * removed[g]
        return in_w, out_w


def _spec_of(module: nn.Module, x: torch.Tensor, batch: int) -> LayerSpec | None:
    """The spec of a conv/linear layer that read ``x``; None for layers without a table (transposed
    convolutions, attention)."""
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.in_features, module.out_features, tuple(x.shape[1:-1]), batch,
                         bias=module.bias is not None)
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        padding = module.padding if isinstance(module.padding, str) else json.dumps(list(module.padding))
        return LayerSpec(
            "depthwise" if depthwise else "conv", module.in_channels, module.out_channels, tuple(x.shape[2:]), batch,
            kernel=tuple(module.kernel_size), stride=tuple(module.stride), padding=padding,
            dilation=tuple(module.dilation), groups=module.groups, bias=module.bias is not None,
        )
    return None


def _layer_inputs(model: nn.Module, example_inputs: Any) -> dict[str, tuple[nn.Module, torch.Tensor, float]]:
    """Every conv/linear layer the forward pass reaches, with the first input it read and its output
    positions per sample."""
    names = {m: n for n, m in model.named_modules()}
    found: dict[str, tuple[nn.Module, torch.Tensor, float]] = {}
    handles = []
    batch = max(1, batch_size_of(example_inputs))

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor) and names[module] not in found:
            width = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            found[names[module]] = (module, args[0], output.numel() / (batch * max(1, width)))

    for module in names:
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(module.register_forward_hook(hook))
    try:
        with evaluating(model):
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


class _DiskCache:
    """Measured points of one environment (device, torch version, dtype), as one JSON file."""

    def __init__(self, folder: Path | None, environment: str) -> None:
        self.environment = environment
        digest = hashlib.sha1(environment.encode()).hexdigest()[:16]
        self.path = None if folder is None else folder / f"{digest}.json"
        self.values: dict[str, float] = {}
        self.levels: dict[str, int] = {}  #: grid -> finest level measured completely (the budget's outcome)
        if self.path is not None and self.path.exists():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.path.read_text())
                if data.get("environment") == environment:
                    self.values = {str(k): float(v) for k, v in data.get("points", {}).items()}
                    self.levels = {str(k): int(v) for k, v in data.get("levels", {}).items()}

    def save(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            data = {"environment": self.environment, "points": self.values, "levels": self.levels}
            tmp.write_text(json.dumps(data, sort_keys=True))
            tmp.replace(self.path)


ProgressFn = Callable[[int, str], contextlib.AbstractContextManager[Callable[[int], None]]]


def _ignore(advance: int = 1) -> None:
    return None


@contextlib.contextmanager
def _no_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    yield _ignore


class LatencyEstimator:
    """Measures a model's latency and builds the per-layer tables of :class:`LatencyCostModel`.

    Args:
        latency_fn: ``latency_fn(model, example_inputs) -> seconds`` for the whole model (e.g. an
            onnxruntime session); ``example_inputs`` are already at ``batch_size`` and on ``device``.
            Default None: the median of ``repeats`` timed forward passes after ``warmup`` ones (eval
            mode, no gradient). Anything but a finite positive number raises ``ValueError`` naming
            ``latency_fn``.
        batch_size: the batch size latency is measured at. Default None: the example inputs' batch size
            (the callback passes the training batch size). Not a positive integer: ``ValueError``.
        device: where to measure (``"cpu"``, ``"cuda"``, a ``torch.device``). Default None: the model's
            device. The model is moved there for the measurement and back.
        layer_timer: ``layer_timer(spec) -> seconds`` for one table point. Default: ``latency_fn``'s
            own ``layer_timer`` method when it has one (the tables then time layers in its runtime;
            its ``cache_key`` attribute joins the cache key), else builds the layer
            (:meth:`LayerSpec.build`) and times it like the model.
        cache_dir: folder of the on-disk cache. Default None: :func:`default_cache_dir`; ``False``: no
            disk cache (points are still shared within this estimator).
        table_seconds: time budget of the table building in one call, seconds. Default 60. The first
            level (grid corners) is always measured; finer levels only while the budget lasts.
        levels: finest grid level (``2**levels + 1`` points per axis). Default 2 (5 points).
        warmup / repeats: warm-up calls and samples of the default layer timer (samples of 20 ms).
            Defaults 2 / 5.
        model_repeats / sample_seconds: samples, and the duration each fills with back-to-back calls, of
            the default model timing. Defaults 9 / 0.05 s.
        precision: a pruned model timed against its start (:meth:`relative`) gets rounds beyond
            ``model_repeats`` until the 95% confidence interval of the median ratio is within
            ``± precision``, up to ``max_model_repeats`` rounds and ``max_model_seconds`` of sampling.
            Defaults 0.01 / 45 / 20 s. None: exactly ``model_repeats`` rounds. The last interval and
            round count are kept as :attr:`last_interval` / :attr:`last_rounds`. Not a positive
            number: ``ValueError``.
        progress: ``progress(total, description)`` context manager yielding ``advance(n)`` (the
            callback's follows the Trainer's bar). Default: nothing shown.

    Attributes:
        measured_points / cached_points: table points measured / read from the cache so far.
        table_time: seconds spent measuring table points so far.
    """

    def __init__(
        self,
        *,
        latency_fn: ModelTimer | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        layer_timer: LayerTimer | None = None,
        cache_dir: str | os.PathLike[str] | bool | None = None,
        table_seconds: float = 60.0,
        levels: int = 2,
        warmup: int = 2,
        repeats: int = 5,
        model_repeats: int = 9,
        sample_seconds: float = 0.05,
        precision: float | None = 0.01,
        max_model_repeats: int = 45,
        max_model_seconds: float = 20.0,
        progress: ProgressFn | None = None,
    ) -> None:
        if latency_fn is not None and not callable(latency_fn):
            raise TypeError(f"latency_fn must be a callable (model, example_inputs) -> seconds or None, got {latency_fn!r}")
        if layer_timer is not None and not callable(layer_timer):
            raise TypeError(f"layer_timer must be a callable (LayerSpec) -> seconds or None, got {layer_timer!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"latency_batch_size must be a positive integer or None, got {batch_size!r}")
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"latency_device must be a torch device (e.g. 'cpu', 'cuda:0') or None, got {device!r}") from error
        if isinstance(table_seconds, bool) or not isinstance(table_seconds, (int, float)) or not table_seconds > 0:
            raise ValueError(f"table_seconds must be a positive number, got {table_seconds!r}")
        if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= 4:
            raise ValueError(f"levels must be an integer in [0, 4], got {levels!r}")
        own_timer = getattr(latency_fn, "layer_timer", None)
        if layer_timer is None and callable(own_timer):  # the tables in the latency_fn's runtime
            layer_timer = own_timer
        self.latency_fn = latency_fn
        self.batch_size = batch_size
        self.layer_timer = layer_timer
        self.cache_dir: Path | None = (
            None if cache_dir is False else default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)  # type: ignore[arg-type]
        )
        self.table_seconds = float(table_seconds)
        self.levels = levels
        self.warmup, self.repeats = int(warmup), int(repeats)
        self.model_repeats, self.sample_seconds = int(model_repeats), float(sample_seconds)
        bad_precision = isinstance(precision, bool) or not isinstance(precision, (int, float)) or not precision > 0
        if precision is not None and bad_precision:
            raise ValueError(f"precision must be a positive number (a latency ratio) or None, got {precision!r}")
        if isinstance(max_model_repeats, bool) or not isinstance(max_model_repeats, int) or max_model_repeats < 1:
            raise ValueError(f"max_model_repeats must be a positive integer, got {max_model_repeats!r}")
        if isinstance(max_model_seconds, bool) or not isinstance(max_model_seconds, (int, float)) or not max_model_seconds > 0:
            raise ValueError(f"max_model_seconds must be a positive number, got {max_model_seconds!r}")
        self.precision = None if precision is None else float(precision)
        self.max_model_repeats, self.max_model_seconds = max_model_repeats, float(max_model_seconds)
        self.last_interval: tuple[float, float] | None = None  #: 95% interval of the last relative() ratio
        self.last_rounds = 0  #: rounds the last relative() took
        self.progress: ProgressFn = progress or _no_progress
        self.measured_points = 0
        self.cached_points = 0
        self.table_time = 0.0
        self.measurements = 0  #: whole-model measurements so far
        self._caches: dict[str, _DiskCache] = {}
        self._grids: dict[str, tuple[list[int], list[int]]] = {}  #: layer name -> its grid (fixed once chosen)

    # ------------------------------------------------------------------ the whole model
    def timing_device(self, model: nn.Module) -> torch.device:
        """Where ``model`` is timed: ``device`` when given, else the device of its parameters (CPU without any)."""
        if self.device is not None:
            return self.device
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @staticmethod
    def _dtype_of(model: nn.Module) -> torch.dtype:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.float32

    def _batch(self, example_inputs: Any) -> int:
        return self.batch_size or batch_size_of(example_inputs)

    @contextlib.contextmanager
    def _on_device(self, model: nn.Module) -> Iterator[torch.device]:
        device = self.timing_device(model)
        first = next(model.parameters(), None)
        home = first.device if first is not None else device
        if home != device:
            model.to(device)
        try:
            yield device
        finally:
            if home != device:
                model.to(home)

    def _call_latency_fn(self, model: nn.Module, inputs: Any) -> float:
        """``latency_fn(model, inputs)`` as checked seconds; its failures as a ``ValueError`` naming it."""
        assert self.latency_fn is not None
        try:
            value = self.latency_fn(model, inputs)
        except Exception as error:
            raise ValueError(f"latency_fn raised {type(error).__name__}: {error}") from error
        return check_seconds(value, "latency_fn")

    @staticmethod
    def _call_runner(runner: Callable[[nn.Module, Any], Callable[[], Any]], model: nn.Module, inputs: Any) -> Callable[[], Any]:
        """``latency_fn.runner(model, inputs)``: a call that runs the prepared model; failures name ``latency_fn``."""
        try:
            run = runner(model, inputs)
        except Exception as error:
            raise ValueError(f"latency_fn.runner raised {type(error).__name__}: {error}") from error
        if not callable(run):
            raise ValueError(f"latency_fn.runner must return a callable that runs the model once, got {run!r}")
        return run

    def measure(self, model: nn.Module, example_inputs: Any) -> float:
        """Seconds per forward pass of ``model`` at ``batch_size`` on ``device`` (eval mode, no grad).

        Raises:
            ValueError: ``latency_fn`` raised, or returned something that is not finite positive seconds.
        """
        inputs = resize_batch(example_inputs, self._batch(example_inputs))
        self.measurements += 1
        with self._on_device(model) as device:
            inputs = tree_map(lambda t: t.to(device), inputs)
            with evaluating(model):
                if self.latency_fn is not None:
                    return self._call_latency_fn(model, inputs)
                return time_callable(
                    lambda: call_model(model, inputs), device, warmup=self.warmup + 1, repeats=self.model_repeats,
                    min_sample_seconds=self.sample_seconds,
                )

    def relative(
        self,
        model: nn.Module,
        example_inputs: Any,
        enter_reference: Callable[[], None],
        enter_candidate: Callable[[], None],
    ) -> float:
        """The candidate's seconds per forward over the reference's: ``model`` in two states that the
        callables switch it into (e.g. the step's start and its cut, restored from snapshots), timed
        interleaved round by round (:meth:`compare`). The model is left in the candidate state.

        Raises:
            ValueError: as :meth:`measure`.
        """
        return self.compare(model, example_inputs, [enter_reference, enter_candidate])[1]

    def compare(self, model: nn.Module, example_inputs: Any, states: Sequence[Callable[[], None]]) -> list[float]:
        """Seconds per forward of ``model`` in each of ``states`` (callables that switch it into a state,
        e.g. restoring snapshots) over its seconds in ``states[0]``, all timed interleaved round by round
        (:func:`time_interleaved`, ``model_repeats`` rounds and more until every median ratio is known
        within ``precision``; medians of the per-round ratios), so that a machine whose speed drifts
        between separate measurements does not move the ratios.
        With ``latency_fn``: one call per state, unless it also has ``runner(model, example_inputs) ->
        run`` (a zero-argument call running the model as prepared, e.g. an onnxruntime session): then
        every state is prepared and their runs timed interleaved, as forwards are. When ``device`` is not
        the model's, every state is copied there. The model is left in the last state.
        :attr:`last_interval` is the 95% interval of the last state's ratio.

        Raises:
            ValueError: as :meth:`measure`; fewer than two states.
        """
        if len(states) < 2:
            raise ValueError(f"compare needs at least two states, got {len(states)}")
        inputs = resize_batch(example_inputs, self._batch(example_inputs))
        self.measurements += len(states)
        device = self.timing_device(model)
        first = next(model.parameters(), None)
        nets: list[nn.Module] = [model] * len(states)
        enter = list(states)
        if first is not None and first.device != device:  # time copies there; the model stays home
            nets = []
            for switch in states:
                switch()
                nets.append(copy.deepcopy(model).to(device))
            enter = [lambda: None] * len(states)
        inputs = tree_map(lambda t: t.to(device), inputs)

        def state(i: int) -> Callable[[], None]:
            def switch() -> None:
                enter[i]()
                nets[i].eval()

            return switch

        indices = range(len(states))
        try:
            with preserved_training_modes(model), torch.no_grad():
                runner = getattr(self.latency_fn, "runner", None)
                runs: list[Callable[[], Any]]
                switches: list[Callable[[], None]] | None
                if callable(runner):  # every state prepared (e.g. exported), then their runs timed interleaved
                    runs = []
                    for i in indices:
                        state(i)()
                        runs.append(self._call_runner(runner, nets[i], inputs))
                    switches = None
                elif self.latency_fn is not None:
                    seconds = []
                    for i in indices:  # the reference first
                        state(i)()
                        seconds.append(self._call_latency_fn(nets[i], inputs))
                    return [s / seconds[0] for s in seconds]
                else:
                    runs = [functools.partial(call_model, net, inputs) for net in nets]
                    switches = [state(i) for i in indices]
                samples = time_interleaved(
                    runs, device, enter=switches, warmup=self.warmup + 1, rounds=self.model_repeats,
                    min_sample_seconds=self.sample_seconds, precision=self.precision,
                    max_rounds=self.max_model_repeats, max_seconds=self.max_model_seconds,
                )
                self.last_interval = median_interval([row[-1] / row[0] for row in samples])
                self.last_rounds = len(samples)
                return [1.0] + [median_ratio(samples, i) for i in indices[1:]]
        finally:
            states[-1]()

    # ------------------------------------------------------------------ tables
    def _timer_key(self) -> str:
        """What the layer timer adds to the cache key (its ``cache_key``, e.g. a runtime and its version)."""
        owner = getattr(self.layer_timer, "__self__", self.layer_timer)
        key = getattr(owner, "cache_key", None)
        return f"|{key}" if key else ""

    def _cache(self, device: torch.device, dtype: torch.dtype) -> _DiskCache:
        key = environment_key(device, dtype) + self._timer_key()
        if key not in self._caches:
            self._caches[key] = _DiskCache(self.cache_dir, key)
        return self._caches[key]

    def _time_layer(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> float:
        if self.layer_timer is not None:
            return check_seconds(self.layer_timer(spec), "layer_timer")
        layer, x = spec.build(device, dtype)
        with torch.no_grad():
            return time_callable(lambda: layer(x), device, warmup=self.warmup, repeats=self.repeats)

    def _points(
        self, specs: Sequence[LayerSpec], device: torch.device, dtype: torch.dtype, budget: float | None
    ) -> dict[str, float]:
        """The seconds of every spec (cached ones read, others measured while ``budget`` lasts; None:
        no limit). Missing from the result: the specs left out by the budget."""
        cache = self._cache(device, dtype)
        result: dict[str, float] = {}
        todo: list[LayerSpec] = []
        for spec in specs:
            key = spec.key()
            if key in result:
                continue
            if key in cache.values:
                result[key] = cache.values[key]
                self.cached_points += 1
            elif all(key != s.key() for s in todo):
                todo.append(spec)
        if todo:
            started = time.perf_counter()
            with self.progress(len(todo), f"latency tables ({len(todo)} points)") as advance:
                for spec in todo:
                    if budget is not None and time.perf_counter() - started > budget:
                        break
                    seconds = self._time_layer(spec, device, dtype)
                    result[spec.key()] = cache.values[spec.key()] = seconds
                    self.measured_points += 1
                    advance(1)
            self.table_time += time.perf_counter() - started
            cache.save()
        return result

    def layers(
        self,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        example_inputs: Any,
        *,
        max_layer_ratio: float = 0.9,
    ) -> list[_Layer]:
        """The tables of every conv/linear layer of ``model``, measured or read from the cache."""
        batch = self._batch(example_inputs)
        device, dtype = self.timing_device(model), self._dtype_of(model)
        layers: list[_Layer] = []
        for name, (module, x, positions) in _layer_inputs(model, example_inputs).items():
            spec = _spec_of(module, x, batch)
            if spec is None:
                continue
            layer = _Layer(name, spec, [], [], positions=positions)
            weight = module.weight
            for group in groups:
                out_ratio = in_ratio = 0.0
                for piece in group.slices:
                    if piece.param is weight:
                        if piece.dim == 0:
                            out_ratio += piece.removal_ratio
                        elif piece.dim == 1 and spec.kind != "depthwise":
                            in_ratio += piece.removal_ratio * (spec.groups if spec.kind == "conv" else 1)
                if out_ratio or in_ratio:
                    layer.effects[group.index] = (out_ratio, in_ratio)
            layers.append(layer)
        self._fill_grids(layers, device, dtype, max_layer_ratio)
        return layers

    def _axis(self, width: int, pruned: bool, max_layer_ratio: float, level: int, step: int) -> list[int]:
        if not pruned:
            return [width]
        low = max(1, math.ceil((1.0 - max_layer_ratio) * width - 1e-9))
        return _grid_points(low, width, level, step)

    def _fill_grids(self, layers: Sequence[_Layer], device: torch.device, dtype: torch.dtype, max_layer_ratio: float) -> None:
        started = time.perf_counter()
        cache = self._cache(device, dtype)
        grid_keys = {layer.name: f"{layer.spec.key()}|r{max_layer_ratio}|L{self.levels}" for layer in layers}
        reached: dict[str, int] = {}
        for level in range(self.levels + 1):
            specs: dict[str, list[LayerSpec]] = {}
            axes: dict[str, tuple[list[int], list[int]]] = {}
            for layer in layers:
                fixed = self._grids.get(layer.name)
                if fixed is not None and level > 0:
                    continue  # the grid chosen when the layer was first seen (widths only shrink since)
                if level > cache.levels.get(grid_keys[layer.name], self.levels):
                    continue  # an earlier build's budget stopped there: a cached build measures nothing
                spec = layer.spec
                step = spec.groups if spec.kind == "conv" else 1
                out_pruned = any(o for o, _ in layer.effects.values())
                in_pruned = any(i for _, i in layer.effects.values())
                if fixed is not None:
                    ins, outs = fixed
                elif spec.kind == "depthwise":
                    outs = self._axis(spec.out_channels, out_pruned, max_layer_ratio, level, 1)
                    ins = [outs[-1]]
                else:
                    ins = self._axis(spec.in_channels, in_pruned, max_layer_ratio, level, step)
                    outs = self._axis(spec.out_channels, out_pruned, max_layer_ratio, level, step)
                axes[layer.name] = (ins, outs)
                specs[layer.name] = [spec.at(i, o) for i in ins for o in outs]
            if not specs:
                break
            spent = time.perf_counter() - started
            budget = None if level == 0 else max(0.0, self.table_seconds - spent)
            if budget is not None and budget <= 0:
                break
            values = self._points([s for group in specs.values() for s in group], device, dtype, budget)
            for layer in layers:
                if layer.name not in specs:
                    continue
                if all(s.key() in values for s in specs[layer.name]):
                    reached[layer.name] = level
                    ins, outs = axes[layer.name]
                    layer.ins, layer.outs = ins, outs
                    if layer.spec.kind == "depthwise":
                        layer.ins = [ins[0]]
                        layer.grid = monotone_grid([[values[layer.spec.at(o, o).key()] for o in outs]])
                    else:
                        layer.grid = monotone_grid([[values[layer.spec.at(i, o).key()] for o in outs] for i in ins])
        for layer in layers:
            if layer.name not in self._grids and layer.grid:
                self._grids[layer.name] = (layer.ins, layer.outs)
                if grid_keys[layer.name] not in cache.levels and layer.name in reached:
                    cache.levels[grid_keys[layer.name]] = reached[layer.name]
        cache.save()

    def cost_model(
        self,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        example_inputs: Any,
        *,
        positions: Mapping[torch.Tensor, float] | None = None,
        max_layer_ratio: float = 0.9,
        measured: float | None = None,
        trial: tuple[Sequence[int], float] | None = None,
        rest: tuple[float, float, float] | None = None,
    ) -> LatencyCostModel:
        """A :class:`LatencyCostModel` of ``model`` as it is now (measures it unless ``measured`` is
        given); ``trial`` (channels removed per group, measured seconds) and ``rest`` (``scale, c0, c1``) as
        in :class:`LatencyCostModel`."""
        layers = self.layers(model, groups, example_inputs, max_layer_ratio=max_layer_ratio)
        seconds = self.measure(model, example_inputs) if measured is None else measured
        return LatencyCostModel(
            model, groups, example_inputs, positions=positions, layers=layers, measured=seconds, trial=trial, rest=rest
        )

    def fast_multiple(self, model: nn.Module, example_inputs: Any, layers: Sequence[_Layer] | None = None) -> int | None:
        """The multiple widths should snap to on this device (the ``round_to="auto"`` rule): the output
        width of the costliest tabled layer is scanned over its last 64 widths (cached like the tables)
        and :func:`fast_multiple_from_times` reads the staircase. None: no multiple is faster."""
        device, dtype = self.timing_device(model), self._dtype_of(model)
        if layers is None:
            batch = self._batch(example_inputs)
            found = [(_spec_of(m, x, batch), n) for n, (m, x, _) in _layer_inputs(model, example_inputs).items()]
            candidates = [s for s, _ in found if s is not None and s.kind != "depthwise"]
            if not candidates:
                return None
            times = self._points(candidates, device, dtype, None)
            ranked = sorted(candidates, key=lambda s: -times.get(s.key(), 0.0))
        else:
            ranked = [
                layer.spec
                for layer in sorted(layers, key=lambda t: -(t.grid[-1][-1] if t.grid else 0.0))
                if layer.spec.kind != "depthwise"
            ]
        spec = next((s for s in ranked if s.out_channels >= 8), None)
        if spec is None:
            return None
        widths = range(max(1, spec.out_channels - 63), spec.out_channels + 1)
        scan = [spec.at(spec.in_channels, w) for w in widths]
        values = self._points(scan, device, dtype, None)
        return fast_multiple_from_times({s.out_channels: values[s.key()] for s in scan})

    def group_multiples(
        self, model: nn.Module, groups: Sequence[ChannelGroup], layers: Sequence[_Layer], max_layer_ratio: float = 0.9
    ) -> dict[str, int | None]:
        """Per group (by root layer name), the multiple its width should snap to on this device: the
        output width of the group's costliest tabled layer (the one it sets the output width of) is
        scanned over the widths the group may keep, at most its last 64, and
        :func:`fast_multiple_from_times` reads that layer's staircase. One layer's kernels may work on
        blocks of 16 channels while a narrower layer's do not, which one multiple for the whole model
        cannot say. Scans are cached like the tables (layers of one configuration share them) and
        bounded by ``table_seconds``; a group whose scan the budget cut short, or with no such layer,
        gets None (any width)."""
        device, dtype = self.timing_device(model), self._dtype_of(model)
        scans: dict[str, list[LayerSpec]] = {}
        for group in groups:
            owned = [
                layer for layer in layers
                if layer.grid and layer.spec.kind != "depthwise" and layer.effects.get(group.index, (0.0, 0.0))[0] > 0
            ]
            if not owned:
                continue
            spec = max(owned, key=lambda t: t.grid[-1][-1]).spec
            step = spec.groups if spec.kind == "conv" else 1
            low = max(1, math.ceil((1.0 - max_layer_ratio) * spec.out_channels - 1e-9), spec.out_channels - 63)
            scan = [spec.at(spec.in_channels, w) for w in range(low, spec.out_channels + 1) if w % step == 0]
            if len(scan) >= 4:
                scans[group.root_name] = scan
        values = self._points([s for scan in scans.values() for s in scan], device, dtype, self.table_seconds)
        multiples: dict[str, int | None] = {}
        for group in groups:
            scan = scans.get(group.root_name, [])
            complete = bool(scan) and all(s.key() in values for s in scan)
            multiples[group.root_name] = (
                fast_multiple_from_times({s.out_channels: values[s.key()] for s in scan}) if complete else None
            )
        return multiples


class LatencyCostModel(CostModel):
    """:class:`~lightning_prune.engine.cost.CostModel` whose costs also carry the predicted latency
    (``Cost.latency``, seconds) of a plan: the per-layer tables at the plan's widths plus the rest of
    the model, ``c0 + c1 * activation volume`` (see the module docstring).

    Args:
        measured: seconds of the model as it is.
        trial: ``(channels removed per group, seconds measured with them cut)``: a second measurement
            that separates the fixed rest ``c0`` from the part ``c1`` scaling with the activations.
            Default None: ``c1 = 0``.
        rest: ``(scale, c0, c1)`` known already (the same model analysed again); overrides ``trial``.

    When the layers alone take longer than the whole model (the rest would be negative), the tables
    are scaled to the measurement instead (``scale = measured / tables``, no rest); otherwise
    ``scale = 1`` and ``0 <= c1 <= rest / volume`` (so ``c0 >= 0``): predictions stay positive whatever
    the noise of the two measurements.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        example_inputs: Any = None,
        *,
        positions: Mapping[torch.Tensor, float] | None = None,
        layers: Sequence[_Layer],
        measured: float,
        trial: tuple[Sequence[int], float] | None = None,
        rest: tuple[float, float, float] | None = None,
    ) -> None:
        self.layers = [layer for layer in layers if layer.grid]
        self._by_group: dict[int, list[_Layer]] = {}
        for layer in self.layers:
            for g in layer.effects:
                self._by_group.setdefault(g, []).append(layer)
        self._num_groups = len(groups)
        self.measured = float(measured)
        dense = [0] * len(groups)
        self._scale = 1.0
        if rest is not None:
            self._scale, c0, c1 = rest
        else:
            tables, volume = self._tables(dense), self._volume(dense)
            remainder = self.measured - tables
            c1 = 0.0
            if remainder < 0 and tables > 0:  # the layers alone take longer than the model: scale the tables
                self._scale, c0 = self.measured / tables, 0.0
            else:
                if trial is not None and volume > 0:
                    counts, seconds = trial
                    spread = volume - self._volume(counts)
                    if spread > 0:  # within [0, all of the rest]: noise never makes a part negative
                        c1 = ((remainder - (seconds - self._tables(counts))) / spread)
                        c1 = min(max(c1, 0.0), remainder / volume)
                c0 = remainder - c1 * volume
        #: ``(scale, c0, c1)``: latency = scale * tables + c0 + c1 * activation volume (seconds)
        self.rest = (float(self._scale), float(c0), float(c1))
        super().__init__(model, groups, example_inputs, positions=positions)

    def _tables(self, removed: Sequence[int]) -> float:
        return sum(layer.seconds(*layer.widths(removed)) for layer in self.layers)

    def _volume(self, removed: Sequence[int]) -> float:
        return sum(layer.widths(removed)[1] * layer.positions for layer in self.layers)

    def latency(self, removed_channels: Sequence[int]) -> float:
        """Predicted seconds after removing ``removed_channels[g]`` channels from group ``g``."""
        return sum(self.breakdown(removed_channels).values())

    def breakdown(self, removed_channels: Sequence[int]) -> dict[str, float]:
        """The predicted seconds of :meth:`latency` by part: ``"layers"`` (the tabled conv/linear
        layers), ``"fixed"`` (``c0``: per-call overhead that no width changes) and ``"activations"``
        (``c1`` times the activation volume: normalisation, activation functions, additions, which
        shrink with the channels, not with the MACs). What widths can buy: with the layers' time cut in
        proportion to the MACs, the other two parts still bound the latency gain from below."""
        scale, c0, c1 = self.rest
        return {
            "layers": scale * self._tables(removed_channels),
            "fixed": c0,
            "activations": c1 * self._volume(removed_channels),
        }

    def group_saving(self, group: int, removed: int) -> float:
        """Seconds saved by removing ``removed`` channels of ``group`` alone (the others untouched)."""
        counts = [0] * self._num_groups
        counts[group] = removed
        dense = [0] * self._num_groups
        scale, c1 = self.rest[0], self.rest[2]
        return sum(
            scale * (layer.seconds(*layer.widths(dense)) - layer.seconds(*layer.widths(counts)))
            + c1 * (layer.widths(dense)[1] - layer.widths(counts)[1]) * layer.positions
            for layer in self._by_group.get(group, [])
        )

    def evaluate(self, removed_channels: Sequence[int]) -> Cost:
        cost = super().evaluate(removed_channels)
        return Cost(cost.macs, cost.params, latency=self.latency(removed_channels))

