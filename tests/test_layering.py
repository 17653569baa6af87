"""The layering the README states, checked on the source: imports run one way, and torch-pruning is
reached through one file. A change that adds an import the wrong way fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_prune"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names), at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def test_the_engine_imports_no_criterion_registry_callback_or_lightning():
    for path in _files("engine"):
        bad = {m for m in _imports(path) if m.startswith(("lightning_prune.criteria", "lightning_prune.callback",
                                                          "lightning_prune.reporting", "lightning_prune.checkpoint",
                                                          "lightning.", "lightning_prune.collection.feeding"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_collection_statistics_import_nothing_from_engine_or_criteria():
    for path in _files("collection"):
        if path.name == "feeding.py":  # Lightning glue: may use anything below the callback
            continue
        bad = {m for m in _imports(path) if m.startswith(("lightning_prune.engine", "lightning_prune.criteria"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_only_the_adapter_imports_torch_pruning():
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(m == "torch_pruning" or m.startswith("torch_pruning.") for m in _imports(path))
    )
    assert users == ["engine/tp_adapter.py"]


def test_criteria_import_engine_types_for_real():
    for path in _files("criteria"):
        source = path.read_text()
        assert "TYPE_CHECKING" not in source, f"{path.name} hides an import behind TYPE_CHECKING"
