"""Exported pruned models reproduce the module's outputs and are smaller than the dense export."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_prune import ChannelPruner, Target, get_criterion
from lightning_prune.export import export_pruned
from lightning_prune.models import SmallResNet


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".pt"), ("torch_export", ".pt2")])
def test_export_matches_the_module_and_shrinks_with_the_parameters(tmp_path, fmt, suffix):
    torch.manual_seed(0)
    dense = SmallResNet(widths=(64, 128, 256), blocks_per_stage=1).eval()  # ~1.2M params: file overhead negligible
    x = torch.randn(3, 1, 8, 8)
    pruned = copy.deepcopy(dense)
    result = ChannelPruner(get_criterion("l1")).step(pruned, x, Target("params", 0.5))
    dense_file = export_pruned(dense, tmp_path / f"dense{suffix}", x, format=fmt)
    pruned_file = export_pruned(pruned, tmp_path / f"pruned{suffix}", x, format=fmt)
    loaded = torch.jit.load(str(pruned_file)) if fmt == "torchscript" else torch.export.load(str(pruned_file)).module()
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned(x), atol=1e-5)
    size_ratio = pruned_file.stat().st_size / dense_file.stat().st_size
    param_ratio = result.after.params / result.before.params
    assert abs(size_ratio - param_ratio) < 0.1, (size_ratio, param_ratio)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_pruned(SmallResNet(widths=(8,), blocks_per_stage=1), tmp_path / "m", torch.randn(1, 1, 8, 8), format="tflite")


def test_onnx_export_matches_the_module_in_onnxruntime(tmp_path):
    import onnxruntime as ort  # the onnx extra, installed by `make test`
    torch.manual_seed(0)
    dense = SmallResNet(widths=(64, 128, 256), blocks_per_stage=1).eval()
    x = torch.randn(3, 1, 8, 8)
    pruned = copy.deepcopy(dense)
    result = ChannelPruner(get_criterion("l1")).step(pruned, x, Target("params", 0.5))
    dense_file = export_pruned(dense, tmp_path / "dense.onnx", x, format="onnx")
    pruned_file = export_pruned(pruned, tmp_path / "pruned.onnx", x, format="onnx")
    session = ort.InferenceSession(str(pruned_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), pruned(x), atol=1e-4)
    size_ratio = pruned_file.stat().st_size / dense_file.stat().st_size
    assert abs(size_ratio - result.after.params / result.before.params) < 0.1
