"""torchvision's classification models (built without weights) pruned at fit start: the CI-sized matrix.

Every listed model with ``"l1"``, and every criterion on three of the hardest models:
``mobilenet_v3_small`` (squeeze-excitation, hardswish, depthwise convolutions), ``googlenet``
(concatenations of four branches) and ``regnet_y_400mf`` (grouped convolutions with
squeeze-excitation in residual blocks). Each cell is one whole ``Trainer.fit`` (see
``examples/torchvision_matrix.py``, which runs the full matrix at 64x64 and writes the README's
table): prune ~30% of the MACs before the first step, same output shape, MACs reduction within 2
points (the callback's record and an independent ``FlopCounterMode`` count), one training step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "torchvision_matrix.py"


def _load_matrix():
    name = "torchvision_matrix"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


matrix = _load_matrix()

IMAGE_SIZE = 32  # the smallest size every model accepts (ViT-B/16: 2x2 patches)
HARD_MODELS = ("mobilenet_v3_small", "googlenet", "regnet_y_400mf")
OTHER_CRITERIA = [c for c in matrix.criteria() if c != "l1"]


def _assert_ok(cell: dict) -> None:
    kept = f"; kept at full width: {cell['kept_full_width']}" if cell["kept_full_width"] else ""
    assert cell["outcome"] == "ok", (
        f"{cell['model']} / {cell['criterion']}: {cell['outcome']} "
        f"(callback {cell['reduction']}, measured {cell['measured_reduction']}){kept}\n{cell['error']}"
    )
    assert cell["loss"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(matrix.MODELS))
def test_every_model_prunes_with_l1(model_name):
    _assert_ok(matrix.run_cell(model_name, "l1", IMAGE_SIZE))


@pytest.mark.slow
@pytest.mark.parametrize("criterion", OTHER_CRITERIA)
@pytest.mark.parametrize("model_name", HARD_MODELS)
def test_every_criterion_on_the_hardest_models(model_name, criterion):
    _assert_ok(matrix.run_cell(model_name, criterion, IMAGE_SIZE))


def test_the_matrix_covers_the_issue_list_and_every_criterion():
    assert len(matrix.MODELS) == 18
    assert set(HARD_MODELS) <= set(matrix.MODELS)
    names = matrix.criteria()
    assert "l1" in names and "filter_ensembles" in names
    assert "lfe" not in names and "id" not in names  # aliases run once, under their canonical name


def _cell(model, criterion, outcome="ok", reduction=0.3, error=None):
    return {"model": model, "criterion": criterion, "outcome": outcome, "reduction": reduction,
            "error": error, "kept_full_width": ["a"] if model == "m2" else [], "seconds": 1.0}


def test_markdown_table_numbers_refusals_and_failures():
    cells = [
        _cell("m1", "l1"),
        _cell("m1", "fpgm", "refused", None, "PruningError: layer 'x' cannot be cut"),
        _cell("m2", "l1", "FAIL", None, "RuntimeError: boom"),
        _cell("m2", "fpgm", "FAIL", None, "RuntimeError: boom"),
    ]
    table = matrix.markdown_table(cells)
    lines = table.splitlines()
    assert lines[0] == "| model | `l1` | `fpgm` | kept at full width | time |"
    assert lines[2] == "| m1 | 30.0% | refused [1] |  | 2 s |"
    assert lines[3] == "| m2 | FAIL [2] | FAIL [2] | 1 | 2 s |"  # one note per distinct message
    assert "[1] PruningError: layer 'x' cannot be cut" in table and "[2] RuntimeError: boom" in table


def test_readme_is_updated_only_between_both_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{matrix.README_START}\nold\n{matrix.README_END}\nrest\n")
    assert matrix.update_readme(readme, "| new |\n")
    assert readme.read_text() == f"intro\n{matrix.README_START}\n| new |\n{matrix.README_END}\nrest\n"
    assert matrix.update_readme(readme, "| newer |\n")  # idempotent: the markers stay
    assert readme.read_text().count("| new") == 1
    readme.write_text(f"intro\n{matrix.README_START}\nno end marker\n")
    assert not matrix.update_readme(readme, "| new |\n")
    assert readme.read_text() == f"intro\n{matrix.README_START}\nno end marker\n"
