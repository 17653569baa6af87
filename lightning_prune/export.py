"""Export a pruned model for deployment: TorchScript, ``torch.export`` or ONNX.

The pruned module is an ordinary ``nn.Module``, so the standard exporters apply; this wraps them
with the checks a deployment needs: eval mode, the exported program's outputs compared with the
module's (``atol``), and a clear message when an optional exporter is missing.

    from lightning_prune.export import export_pruned
    export_pruned(model, "model.pt2", torch.randn(1, 3, 32, 32), format="torch_export")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_prune._model import call_model, evaluating
from lightning_prune._tree import tensors

__all__ = ["Format", "export_pruned"]

Format = Literal["torchscript", "torch_export", "onnx"]


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def export_pruned(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    format: Format = "torchscript",
    *,
    atol: float = 1e-5,
) -> Path:
    """Export ``model`` (in eval mode) to ``path`` and check that the export reproduces its outputs.

    Args:
        model: the (pruned) model; a LightningModule works too.
        path: the file to write.
        example_inputs: inputs for tracing/export (a tensor or a tuple of tensors).
        format: ``"torchscript"`` (``torch.jit.trace``), ``"torch_export"`` (``torch.export``,
            saved with ``torch.export.save``) or ``"onnx"`` (one self-contained file, checked in
            onnxruntime; needs the ``onnx`` extra: ``pip install lightning-prune[onnx]``; models above
            protobuf's 2 GB limit need ``torch.onnx.export`` with external data directly).
        atol: largest absolute difference allowed between the export's and the module's outputs.

    Raises:
        ValueError: unknown ``format``, or the export's outputs differ from the module's.
        ImportError: ``format="onnx"`` without the ``onnx`` extra.
    """
    path = Path(path)
    args = _as_args(example_inputs)
    with evaluating(model):
        expected = call_model(model, example_inputs)
        if format == "torchscript":
            exported = torch.jit.trace(model, args)
            torch.jit.save(exported, str(path))
            got = torch.jit.load(str(path))(*args)
        elif format == "torch_export":
            program = torch.export.export(model, args)
            torch.export.save(program, str(path))
            got = torch.export.load(str(path)).module()(*args)
        elif format == "onnx":
            try:
                import onnxruntime
            except ImportError as error:
                raise ImportError(
                    "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'lightning-prune[onnx]'"
                ) from error
            # one self-contained file (weights inside): fine below protobuf's 2 GB limit
            torch.onnx.export(model, args, str(path), external_data=False)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
            got = [torch.from_numpy(o) for o in session.run(None, feeds)]
            expected = [t.detach().cpu() for t in tensors(expected)]
        else:
            raise ValueError(f"format must be 'torchscript', 'torch_export' or 'onnx', got {format!r}")
    for a, b in zip(tensors(expected), tensors(got)):
        if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=0):
            raise ValueError(f"the {format} export's outputs differ from the module's by more than atol={atol}")
    return path
