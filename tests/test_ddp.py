"""Two-process DDP on CPU (gloo): same decision on both ranks from both ranks' data, training goes on.

Lightning's DDP launcher re-executes the script it runs, so the fit lives in tests/scripts/ddp_fit.py
and each rank writes what it saw to a JSON file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"
DENSE_WIDTHS = {  # SmallResNet(widths=(8, 16), blocks_per_stage=1) inside ImageClassifier
    "net.stem.0": 8, "net.stages.0.0.conv1": 8, "net.stages.0.0.conv2": 8,
    "net.stages.1.0.conv1": 16, "net.stages.1.0.conv2": 16, "net.stages.1.0.shortcut.0": 16, "net.fc": 10,
}


@pytest.mark.parametrize("criterion", ["pls_vip", "pca_gm", "di", "id"])  # every way statistics are combined
def test_two_process_ddp_prunes_identically_and_keeps_training(tmp_path, criterion):
    out = tmp_path / "rank"
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), criterion], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["widths"] == ranks[1]["widths"]  # the same channels cut on both ranks
    assert set(ranks[0]["widths"]) == set(DENSE_WIDTHS)
    assert any(ranks[0]["widths"][n] < w for n, w in DENSE_WIDTHS.items())  # and something was cut
    assert ranks[0]["widths"]["net.fc"] == 10
    assert ranks[0]["digest"] == ranks[1]["digest"]  # equal parameters after further DDP training
    assert all(r["optimizer_is_model"] for r in ranks)  # optimizers point at the pruned parameters
    # the statistics came from both ranks: 2 ranks x 3 window batches x 16 samples
    assert ranks[0]["samples"] == ranks[1]["samples"] == 2 * 3 * 16


RESUME_SCRIPT = Path(__file__).parent / "scripts" / "ddp_resume_fit.py"


def test_two_process_ddp_interrupted_after_a_prune_and_resumed_ends_like_the_uninterrupted_run(tmp_path):
    out, ckpt_dir = tmp_path / "rank", tmp_path / "ckpt"

    def run(mode):
        done = subprocess.run([sys.executable, str(RESUME_SCRIPT), str(out), mode, str(ckpt_dir)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(Path(f"{out}.{mode}.{r}.json").read_text()) for r in (0, 1)]

    full = run("full")
    first = run("first")
    assert (ckpt_dir / "last.ckpt").is_file() and first[0]["epochs"] == [0]  # interrupted after the first prune
    resumed = run("resume")
    for ranks in (full, resumed):
        assert [r["rank"] for r in ranks] == [0, 1]
        assert ranks[0]["epochs"] == ranks[1]["epochs"] == [0, 1]
        assert ranks[0]["digest"] == ranks[1]["digest"]  # identical parameters on both ranks
        assert all(r["optimizer_is_model"] for r in ranks)
    assert resumed[0]["widths"] == full[0]["widths"]
    assert resumed[0]["digest"] == full[0]["digest"]  # and equal to the uninterrupted 2-rank run
