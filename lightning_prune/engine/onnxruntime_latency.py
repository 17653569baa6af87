"""A ``latency_fn`` that times the model as it will be deployed: exported to ONNX, run by onnxruntime.

PyTorch's eager forward is not what many deployments run: onnxruntime fuses batch norms into
convolutions, folds activations and drops Python's per-module overhead (a torchvision ResNet-18 at
64 px, batch 1, on a 2-core CPU: 1.6 ms in onnxruntime against 8.7 ms eager). A latency target aimed
at the eager time then removes the wrong channels. :class:`OnnxRuntimeLatency` is a
``latency_fn(model, example_inputs) -> seconds`` for
:class:`~lightning_prune.StructuredPruningCallback` and
:class:`~lightning_prune.engine.latency.LatencyEstimator`: at every call it exports the model *as it is
now* (pruned widths included), opens an ``onnxruntime.InferenceSession`` on it, checks the session's
outputs against the module's, and returns the median seconds per ``session.run``.

It also times single layers in onnxruntime (:meth:`OnnxRuntimeLatency.layer_timer`, one-node graphs
built directly), so the per-layer latency tables describe the same runtime, and it prepares runnable
sessions (:meth:`OnnxRuntimeLatency.runner`) so that the step times its start and its cut interleaved.

Example::

    import torch
    from torch import nn
    from lightning_prune.engine.onnxruntime_latency import OnnxRuntimeLatency

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3)).eval()
    latency = OnnxRuntimeLatency(intra_op_num_threads=1)
    print(latency(model, torch.randn(1, 3, 32, 32)))  # seconds per run, e.g. 2e-05
    # StructuredPruningCallback("l1", target_latency_reduction=0.5, latency_fn=latency, latency_batch_size=1)
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_prune._model import call_model, evaluating
from lightning_prune._tree import tensors
from lightning_prune.engine.latency import LayerSpec, time_callable

__all__ = ["OnnxRuntimeLatency"]


def _arguments(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments the way :func:`~lightning_prune._model.call_model` calls the model."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _input_shape(spec: LayerSpec) -> tuple[int, ...]:
    if spec.kind == "linear":
        return (spec.batch, *spec.spatial, spec.in_channels)
    return (spec.batch, spec.in_channels, *spec.spatial)


def _layer_graph(spec: LayerSpec) -> Any:
    """A one-layer ONNX model of ``spec`` (input ``x``, output ``y``), random float32 weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_input_shape(spec)))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if spec.kind == "linear":
        inits = [weight("w", (spec.in_channels, spec.out_channels))]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not spec.bias else "xw"])]
        if spec.bias:
            inits.append(weight("b", (spec.out_channels,)))
            nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
    else:
        dims = len(spec.kernel)
        inits = [weight("w", (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel))]
        if spec.bias:
            inits.append(weight("b", (spec.out_channels,)))
        attributes: dict[str, Any] = {
            "kernel_shape": list(spec.kernel), "strides": list(spec.stride), "dilations": list(spec.dilation),
            "group": spec.groups,
        }
        if spec.padding == "same":
            attributes["auto_pad"] = "SAME_UPPER"  # torch's "same" puts the odd extra at the end
        elif spec.padding == "valid":
            attributes["pads"] = [0] * (2 * dims)
        else:
            pads = [int(p) for p in json.loads(spec.padding)]
            attributes["pads"] = pads + pads
        nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if spec.bias else []), ["y"], **attributes)]
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class OnnxRuntimeLatency:
    """``latency_fn(model, example_inputs) -> seconds``: the model exported to ONNX, timed in onnxruntime.

    Args:
        providers: onnxruntime execution providers, in order of preference. Default
            ``("CPUExecutionProvider",)``; e.g. ``("CUDAExecutionProvider", "CPUExecutionProvider")``
            with ``onnxruntime-gpu``. One the installed onnxruntime lacks raises ``ValueError`` at
            construction, listing the available ones.
        intra_op_num_threads: threads onnxruntime may use inside an operator. Default None: torch's
            current ``torch.get_num_threads()``, so that both runtimes are compared on equal terms;
            0 lets onnxruntime choose. A negative or non-integer value raises ``ValueError``.
        graph_optimization: onnxruntime's graph optimisation level, ``"disable"``, ``"basic"``,
            ``"extended"`` or ``"all"``. Default ``"all"`` (what a deployment runs). Another word
            raises ``ValueError`` naming the allowed ones.
        warmup / repeats: untimed runs first (more while runs still get faster), then the median of
            ``repeats`` samples, each as many back-to-back runs as fill ``min_sample_seconds``.
            Defaults 3 / 9 / 0.05 s. Not positive: ``ValueError``.
        rtol: the session's outputs must equal the module's within ``rtol`` times the outputs' largest
            magnitude (at least 1), or the call raises ``ValueError`` (an export that computes something
            else would be timed otherwise; fused batch norms differ in the last float32 digits).
            Default 1e-3; None skips the check.
        export_kwargs: extra keyword arguments of ``torch.onnx.export`` (e.g. ``{"opset_version": 18}``,
            or ``{"dynamo": False}`` for the legacy exporter, which exports about 10x faster).
            Default None: torch's defaults.

    :meth:`session` gives the checked session itself, :meth:`runner` a call that runs it (the estimator
    prepares the step's start and its cut and times them interleaved, round by round, as it does eager
    forwards), and :meth:`layer_timer` times one layer in onnxruntime, so the per-layer tables are
    onnxruntime's too (cached under :attr:`cache_key`: onnxruntime version, providers, threads).

    Attributes:
        calls: how many models were exported and prepared (:meth:`runner`, ``__call__``) so far.
        export_seconds: seconds spent exporting and opening sessions so far (not part of the latency).
        last_initializer_shapes: the last export's initializers, name -> shape (which widths were
            timed); the ONNX file itself lives in a temporary folder removed after the export.

    Raises:
        ImportError (at construction): onnxruntime is not installed (``pip install 'lightning-prune[onnx]'``).
        ValueError (at a call): the export or the session failed, or its outputs differ from the
        module's; the callback reports it as a failing ``latency_fn`` before training starts.
    """

    _LEVELS = ("disable", "basic", "extended", "all")

    def __init__(
        self,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        *,
        intra_op_num_threads: int | None = None,
        graph_optimization: str = "all",
        warmup: int = 3,
        repeats: int = 9,
        min_sample_seconds: float = 0.05,
        rtol: float | None = 1e-3,
        export_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                "OnnxRuntimeLatency needs onnx, onnxscript and onnxruntime: pip install 'lightning-prune[onnx]'"
            ) from error
        self._ort = onnxruntime
        if isinstance(providers, str) or not isinstance(providers, Sequence) or not providers:
            raise ValueError(f"providers must be a non-empty sequence of onnxruntime provider names, got {providers!r}")
        available = onnxruntime.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"providers {missing} are not available in this onnxruntime; available: {available}")
        if intra_op_num_threads is not None and (
            isinstance(intra_op_num_threads, bool) or not isinstance(intra_op_num_threads, int) or intra_op_num_threads < 0
        ):
            raise ValueError(f"intra_op_num_threads must be a non-negative integer or None, got {intra_op_num_threads!r}")
        if graph_optimization not in self._LEVELS:
            raise ValueError(f"graph_optimization must be one of {self._LEVELS}, got {graph_optimization!r}")
        for name, value in (("warmup", warmup), ("repeats", repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(min_sample_seconds, bool) or not isinstance(min_sample_seconds, (int, float)) or not min_sample_seconds > 0:
            raise ValueError(f"min_sample_seconds must be a positive number, got {min_sample_seconds!r}")
        if rtol is not None and not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and rtol >= 0):
            raise ValueError(f"rtol must be a non-negative number or None, got {rtol!r}")
        self.providers = list(providers)
        self.intra_op_num_threads = intra_op_num_threads
        self.graph_optimization = graph_optimization
        self.warmup, self.repeats, self.min_sample_seconds = warmup, repeats, float(min_sample_seconds)
        self.rtol = rtol
        self.export_kwargs = dict(export_kwargs or {})
        self.calls = 0
        self.export_seconds = 0.0
        self.last_initializer_shapes: dict[str, tuple[int, ...]] = {}

    def _options(self) -> Any:
        options = self._ort.SessionOptions()
        threads = torch.get_num_threads() if self.intra_op_num_threads is None else self.intra_op_num_threads
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        level = {
            "disable": "ORT_DISABLE_ALL",
            "basic": "ORT_ENABLE_BASIC",
            "extended": "ORT_ENABLE_EXTENDED",
            "all": "ORT_ENABLE_ALL",
        }[self.graph_optimization]
        options.graph_optimization_level = getattr(self._ort.GraphOptimizationLevel, level)
        return options

    def _export(self, model: nn.Module, example_inputs: Any, path: Path) -> None:
        import onnx

        args, kwargs = _arguments(example_inputs)
        options = {"external_data": False, "verbose": False, **self.export_kwargs}
        if kwargs:
            options["kwargs"] = kwargs
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter chatter (deprecations, opset notes) on every step
            torch.onnx.export(model, args, str(path), **options)
        proto = onnx.load(str(path), load_external_data=False)
        self.last_initializer_shapes = {init.name: tuple(int(d) for d in init.dims) for init in proto.graph.initializer}

    def session(self, model: nn.Module, example_inputs: Any) -> tuple[Any, dict[str, Any]]:
        """``model`` as it is now, exported and opened: ``(onnxruntime.InferenceSession, feeds)``, its
        outputs checked against the module's (``rtol``); ``session.run(None, feeds)`` runs it.

        Raises:
            ValueError: the export or the session failed, or the outputs differ from the module's.
        """
        started = time.perf_counter()
        with evaluating(model), tempfile.TemporaryDirectory(prefix="lightning_prune_onnx_") as folder:
            path = Path(folder) / "model.onnx"
            try:
                self._export(model, example_inputs, path)
                session = self._ort.InferenceSession(str(path), self._options(), providers=self.providers)
            except Exception as error:
                raise ValueError(f"the ONNX export or onnxruntime session failed: {type(error).__name__}: {error}") from error
            names = [i.name for i in session.get_inputs()]
            given = tensors(example_inputs)
            if len(names) != len(given):
                raise ValueError(f"the ONNX graph takes {len(names)} inputs but the example inputs hold {len(given)} tensors")
            feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, given)}
            self.export_seconds += time.perf_counter() - started
            if self.rtol is not None:
                self._check(session.run(None, feeds), tensors(call_model(model, example_inputs)))
        return session, feeds

    def _check(self, got: Sequence[Any], expected: Sequence[torch.Tensor]) -> None:
        assert self.rtol is not None
        worst, scale = 0.0, 1.0
        for g, e in zip(got, expected):
            e = e.detach().cpu().float()
            scale = max(scale, float(e.abs().max()) if e.numel() else 0.0)
            worst = max(worst, float((torch.from_numpy(g) - e).abs().max()) if tuple(g.shape) == tuple(e.shape) else math.inf)
        if len(got) != len(expected) or worst > self.rtol * scale:
            raise ValueError(
                f"the onnxruntime session's outputs differ from the module's by {worst:.3g}, more than "
                f"rtol={self.rtol} of their largest magnitude {scale:.3g}; the export does not compute the model, "
                "so its time would be meaningless"
            )

    def runner(self, model: nn.Module, example_inputs: Any) -> Callable[[], Any]:
        """A zero-argument call running ``model`` as it is now in onnxruntime (:meth:`session`). The
        estimator prepares the step's start and its cut this way and times them interleaved."""
        session, feeds = self.session(model, example_inputs)
        self.calls += 1
        return lambda: session.run(None, feeds)

    def _time(self, run: Callable[[], Any]) -> float:
        return float(time_callable(
            run, torch.device("cpu"), warmup=self.warmup, repeats=self.repeats, min_sample_seconds=self.min_sample_seconds,
        ))

    def __call__(self, model: nn.Module, example_inputs: Any) -> float:
        """Seconds per ``session.run`` of ``model`` exported at ``example_inputs`` (their batch size)."""
        return self._time(self.runner(model, example_inputs))

    @property
    def cache_key(self) -> str:
        """What the layer tables measured by :meth:`layer_timer` depend on besides device and torch."""
        threads = torch.get_num_threads() if self.intra_op_num_threads is None else self.intra_op_num_threads
        return (f"onnxruntime{self._ort.__version__}|{','.join(self.providers)}|{threads}threads|"
                f"{self.graph_optimization}")

    def layer_timer(self, spec: LayerSpec) -> float:
        """Seconds per run of one convolution or linear layer in onnxruntime: a one-node ONNX graph
        (``Conv``, or ``MatMul`` and ``Add``) built directly, with random weights, float32. The
        estimator uses it for its tables when this object is the ``latency_fn``."""
        session = self._ort.InferenceSession(
            _layer_graph(spec).SerializeToString(), self._options(), providers=self.providers
        )
        x = np.random.default_rng(0).standard_normal(_input_shape(spec)).astype(np.float32)
        return self._time(lambda: session.run(None, {"x": x}))

    def __repr__(self) -> str:
        return (
            f"OnnxRuntimeLatency(providers={self.providers}, intra_op_num_threads={self.intra_op_num_threads}, "
            f"graph_optimization={self.graph_optimization!r})"
        )

