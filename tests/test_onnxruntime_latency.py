"""OnnxRuntimeLatency: the model exported as it is now, checked against the module, timed in onnxruntime."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_prune.engine.latency import LayerSpec
from lightning_prune.engine.onnxruntime_latency import OnnxRuntimeLatency

LEGACY = {"dynamo": False}  # the TorchScript-based exporter: ~0.2 s per export here instead of ~2 s


def _conv(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 8, 3, padding=1)).eval()


class _DiffersInExport(nn.Module):
    """Computes x + 1 while being exported, x otherwise: an export that is not the model."""

    def forward(self, x):
        return x + 1 if torch.onnx.is_in_onnx_export() else x


class _FailsInExport(nn.Module):
    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("this module cannot be exported")
        return x


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


@pytest.mark.parametrize("export_kwargs", [None, LEGACY], ids=["dynamo", "legacy"])
def test_the_timed_graph_is_the_model_as_it_is_now(export_kwargs):
    latency = OnnxRuntimeLatency(intra_op_num_threads=1, repeats=2, min_sample_seconds=0.005, export_kwargs=export_kwargs)
    inputs = torch.randn(2, 3, 16, 16)
    seconds = latency(_conv(16), inputs)
    assert seconds > 0 and latency.calls == 1 and latency.export_seconds > 0
    shapes = sorted(latency.last_initializer_shapes.values())
    narrow = _conv(6)
    latency(narrow, inputs)
    # the timed graph holds the narrow model's convolutions (BatchNorm folded or not, widths are 6)
    convs = [s for s in latency.last_initializer_shapes.values() if len(s) == 4]
    assert sorted(convs) == sorted([tuple(narrow[0].weight.shape), tuple(narrow[3].weight.shape)])
    assert sorted(latency.last_initializer_shapes.values()) != shapes
    assert latency.calls == 2


def test_inputs_as_a_tuple_and_as_keywords():
    latency = OnnxRuntimeLatency(intra_op_num_threads=1, repeats=2, min_sample_seconds=0.005, export_kwargs=LEGACY)
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    assert latency(_TwoInputs().eval(), (x, y)) > 0
    assert latency(_TwoInputs().eval(), {"x": x, "y": y}) > 0


def test_an_export_that_computes_something_else_is_refused():
    latency = OnnxRuntimeLatency(repeats=2, export_kwargs=LEGACY)
    with pytest.raises(ValueError, match="outputs differ from the module's by 1, more than rtol"):
        latency(_DiffersInExport(), torch.randn(2, 3))
    unchecked = OnnxRuntimeLatency(repeats=2, rtol=None, export_kwargs=LEGACY)
    assert unchecked(_DiffersInExport(), torch.randn(2, 3)) > 0


def test_outputs_are_compared_relative_to_their_magnitude():
    """Large outputs (a random-init deep net's logits) may differ in float32's last digits, no more."""
    class Scaled(nn.Module):
        def __init__(self, scale, offset):
            super().__init__()
            self.scale, self.offset = scale, offset

        def forward(self, x):
            return x * self.scale + (self.offset if torch.onnx.is_in_onnx_export() else 0.0)

    x = torch.ones(2, 3)
    assert OnnxRuntimeLatency(repeats=1, export_kwargs=LEGACY)(Scaled(1e4, 5.0), x) > 0  # 5 in 1e4: 5e-4
    with pytest.raises(ValueError, match="more than rtol=0.001 of their largest magnitude 1e"):
        OnnxRuntimeLatency(repeats=1, export_kwargs=LEGACY)(Scaled(1e4, 20.0), x)  # 2e-3 of 1e4
    with pytest.raises(ValueError, match="by 0.01, more than rtol=0.001 of their largest magnitude 1;"):
        OnnxRuntimeLatency(repeats=1, export_kwargs=LEGACY)(Scaled(1e-3, 0.01), x)  # small outputs: 1 is the scale


def test_an_export_failure_names_the_export():
    with pytest.raises(ValueError, match="ONNX export or onnxruntime session failed: RuntimeError: this module cannot"):
        OnnxRuntimeLatency(export_kwargs=LEGACY)(_FailsInExport(), torch.randn(2, 3))


def test_a_wider_model_takes_longer_in_onnxruntime():
    """A sanity check of the clock with a 64x MACs gap (a ratio, not a speed target)."""
    latency = OnnxRuntimeLatency(intra_op_num_threads=1, export_kwargs=LEGACY)
    inputs = torch.randn(1, 3, 64, 64)
    narrow, wide = latency(_conv(4), inputs), latency(_conv(256), inputs)
    assert wide > 4 * narrow


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"providers": ("NoSuchExecutionProvider",)}, "not available in this onnxruntime"),
        ({"providers": "CPUExecutionProvider"}, "providers must be a non-empty sequence"),
        ({"intra_op_num_threads": -1}, "intra_op_num_threads must be a non-negative integer"),
        ({"graph_optimization": "max"}, "graph_optimization must be one of"),
        ({"repeats": 0}, "repeats must be a positive integer"),
        ({"warmup": 1.5}, "warmup must be a positive integer"),
        ({"min_sample_seconds": 0}, "min_sample_seconds must be a positive number"),
        ({"rtol": -1.0}, "rtol must be a non-negative number"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnnxRuntimeLatency(**kwargs)


def test_missing_onnxruntime_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-prune\[onnx\]'"):
        OnnxRuntimeLatency()


@pytest.mark.slow
def test_a_latency_target_fit_times_the_pruned_model_in_onnxruntime(tmp_path):
    import lightning as L

    from lightning_prune import StructuredPruningCallback
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.models import ImageClassifier, SmallResNet

    latency = OnnxRuntimeLatency(intra_op_num_threads=1, repeats=3, export_kwargs=LEGACY)
    timed = []  # the convolution shapes of every graph timed
    session = latency.session

    def recording(model, inputs):
        prepared = session(model, inputs)
        timed.append(sorted(s for s in latency.last_initializer_shapes.values() if len(s) == 4))
        return prepared

    latency.session = recording
    callback = StructuredPruningCallback("l1", target_latency_reduction=0.2, epochs=[0], latency_fn=latency,
                                         latency_batch_size=8, latency_cache_dir=str(tmp_path), verbose=False,
                                         )
    callback.latency.table_seconds = 5.0
    L.seed_everything(0)
    model = ImageClassifier(SmallResNet(widths=(16, 32), blocks_per_stage=1), lr=0.02, max_epochs=1)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[callback], limit_train_batches=2,
                        limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DigitsDataModule())
    record = callback.history[0]
    assert record.macs_after < record.macs_before
    assert latency.calls >= 3  # setup's dense measurement, then the step's start and its cut
    # the pruned network was timed as it is (the try kept is one of the graphs timed), and so was the dense one
    convs = sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert convs in timed and timed[0] != convs
    assert record.latency_after is not None and record.latency_after > 0
    assert float(trainer.callback_metrics["prune/latency_ms"]) == pytest.approx(1000 * record.latency_after, rel=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        LayerSpec("conv", 6, 10, (9, 9), 2, (3, 3), (2, 2), "[1, 1]", (1, 1), 1, True),
        LayerSpec("conv", 6, 10, (9, 9), 2, (4, 4), (1, 1), "same", (1, 1), 1, False),
        LayerSpec("conv", 6, 10, (9, 9), 2, (3, 3), (1, 1), "valid", (2, 2), 2, True),
        LayerSpec("conv", 6, 4, (11,), 3, (5,), (2,), "[2]", (1,), 1, False),
        LayerSpec("depthwise", 6, 6, (9, 9), 2, (3, 3), (2, 2), "[1, 1]", (1, 1), 6, False),
        LayerSpec("linear", 6, 10, (), 4, bias=True),
        LayerSpec("linear", 6, 10, (5,), 4),
    ],
    ids=["conv-pad-stride-bias", "conv-same-even-kernel", "conv-valid-dilated-grouped", "conv1d", "depthwise",
         "linear-bias", "linear-tokens"],
)
def test_a_table_layer_graph_computes_the_torch_layer(spec):
    """The one-node graph timed for a table point is the layer: its weights loaded into torch's module
    give the same outputs."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from lightning_prune.engine.onnxruntime_latency import _layer_graph

    graph = _layer_graph(spec)
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.graph.initializer}
    layer, x = spec.build(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weights["w"].T if spec.kind == "linear" else weights["w"])
        if spec.bias:
            layer.bias.copy_(weights["b"])
        expected = layer(x)
    got = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert got.shape == tuple(expected.shape)
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
    assert OnnxRuntimeLatency(repeats=1, min_sample_seconds=0.001).layer_timer(spec) > 0


def test_the_estimator_builds_onnxruntime_tables_and_times_the_step_interleaved(tmp_path):
    from lightning_prune.criteria import get_criterion
    from lightning_prune.engine import ChannelPruner, Target
    from lightning_prune.engine.latency import LatencyEstimator

    latency = OnnxRuntimeLatency(intra_op_num_threads=1, repeats=2, min_sample_seconds=0.005, export_kwargs=LEGACY)
    estimator = LatencyEstimator(latency_fn=latency, cache_dir=tmp_path, table_seconds=3.0, levels=0, precision=None,
                                 model_repeats=3, sample_seconds=0.005)
    assert estimator.layer_timer == latency.layer_timer
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x = torch.randn(2, 3, 32, 32)
    result = ChannelPruner(get_criterion("l1"), latency=estimator, latency_corrections=0).step(model, x, Target("latency", 0.3))
    assert estimator.measured_points > 0 and estimator.last_rounds == 3  # tables timed, then interleaved rounds
    assert latency.calls >= 3  # setup's measurement, then the start and the cut prepared as runners
    cache = list(tmp_path.glob("*.json"))
    assert len(cache) == 1 and "onnxruntime" in cache[0].read_text()
    assert result.after.macs < result.before.macs
