"""fit(torch.compile(model)): the pruner works on the eager forward, then the methods are compiled afresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "compiled_fit.py"


def test_torch_compiled_module_is_pruned_and_recompiled(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_module"] and result["steps"] == 1
    assert result["recompiled"]  # the compiled methods were rebuilt around the pruned module
    assert abs(result["reduction"] - 0.4) <= 0.02  # MACs counted on the eager forward
    assert result["compiled_equals_eager"]
