"""The benchmark scripts' smoke modes run end to end and write sane results (examples/benchmark_*.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_prune.engine.heap import _glibc_mallopt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TP = "torch-pruning (l1, local)"
MP = "ModelPruning (ln_structured)"


def _run(script: str, out: Path, timeout: float, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    readme = out / "README.md"
    readme.write_text("intro\n<!-- benchmark-compare:start -->\nold\n<!-- benchmark-compare:end -->\nrest\n")
    done = _run("benchmark_compare.py", out, 300, "--readme", str(readme))
    return out, json.loads((out / "compare.json").read_text()), done.stdout


@pytest.fixture(scope="module")
def performance(tmp_path_factory):
    out = tmp_path_factory.mktemp("performance")
    (out / "README.md").write_text("a\n<!-- benchmark-performance:start -->\n<!-- benchmark-performance:end -->\nb\n")
    done = _run("benchmark_performance.py", out, 400, "--readme", str(out / "README.md"))
    return out, json.loads((out / "performance.json").read_text()), done.stdout


@pytest.mark.slow
def test_compare_smoke_files_and_rows(compare):
    out, result, stdout = compare
    for name in ("compare.json", "compare.md", "compare_accuracy.png", "compare_widths.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compare_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = result["config"]
    assert config["smoke"] and config["seeds"] == [0] and config["targets"] == [0.5]
    assert len(config["criteria"]) == 2 and "l1" in config["criteria"]
    assert config["peers"] == [TP, MP]
    methods = config["criteria"] + config["peers"]
    assert sorted(r["method"] for r in result["runs"]) == sorted(methods)
    assert all(r["ok"] for r in result["runs"]), [r.get("error") for r in result["runs"]]
    assert {(s["target"], s["method"]) for s in result["summary"]} == {(0.5, m) for m in methods}
    assert set(result["widths"]["methods"]) == set(methods)
    assert result["wall_seconds"] > 0
    table = (out / "compare.md").read_text()
    assert "| target | method | MACs removed" in table and "batch 64 (x dense)" in table
    for method in methods:
        assert f"| 50% | {method} |" in table
    assert "| 50% | l1 |" in stdout  # the tables are printed at the end
    readme = (out / "README.md").read_text()  # the condensed summary went between the markers
    assert readme.startswith("intro\n<!-- benchmark-compare:start -->\n| method |") and readme.endswith("<!-- benchmark-compare:end -->\nrest\n")
    assert "old" not in readme and all(readme.count(f"| {m} |") == 2 for m in methods)
    assert stdout.count("[") >= len(methods)  # one progress line per run


@pytest.mark.slow
def test_compare_smoke_numbers_are_sane(compare):
    _, result, _ = compare
    dense = result["dense"][0]
    runs = {r["method"]: r for r in result["runs"]}
    for row in runs.values():
        assert 0.0 <= row["accuracy_after_prune"] <= 1.0
        assert 0.0 <= row["accuracy_after_finetune"] <= 1.0
        assert row["prune_seconds"] >= 0 and row["fit_seconds"] > 0
        assert set(row["latency_ms"]) == {"1", "64"} and all(v > 0 for v in row["latency_ms"].values())
        assert row["latency_ratio"]["64"] == pytest.approx(row["latency_ms"]["64"] / row["dense_latency_ms"]["64"])
    for name in result["config"]["criteria"]:  # ours: within 2 points of the target, really smaller
        row = runs[name]
        assert abs(row["flops_reduction"] - 0.5) <= 0.02, (name, row["flops_reduction"])
        assert row["macs"] < dense["macs"] and row["params"] < dense["params"]
        assert row["macs"] == pytest.approx(dense["macs"] * (1 - row["flops_reduction"]), abs=1)
    tp_row = runs[TP]  # torch-pruning stops at the first step past the target
    assert tp_row["tp_counted_flops_reduction"] >= 0.5
    assert 0.48 <= tp_row["flops_reduction"] <= 0.56
    mp = runs[MP]  # ModelPruning only masks: dense MACs and shapes, zeros instead
    assert mp["macs"] == dense["macs"] and mp["params"] == dense["params"]
    assert mp["flops_reduction"] == 0.0
    assert mp["params_nonzero"] < dense["params"]
    assert mp["amount"] == pytest.approx(runs["l1"]["channels_removed"])
    assert mp["channels_removed"] == pytest.approx(mp["amount"], abs=0.02)
    assert 0.2 < runs["l1"]["channels_removed"] < 0.4  # ~30% of the channels for 50% of the MACs (quadratic)


@pytest.mark.slow
def test_performance_smoke(performance):
    out, result, stdout = performance
    assert (out / "performance.md").stat().st_size > 0
    (crit,) = result["config"]["criteria"]
    assert list(result["step_overhead"]) == ["digits"]  # --smoke: the first --overhead-data only
    step = result["step_overhead"]["digits"][crit]
    assert step["ms_per_step_without"] > 0 and step["ratio"] > 0.5
    fit = result["fit_overhead"]
    assert set(fit["ratio"]) == {crit} and fit["median_seconds"]["none"] > 0
    digits = result["latency"]["digits SmallResNet"]
    (row,) = digits["rows"]
    assert row["ok"] and abs(row["macs_ratio"] - 0.5) <= 0.02
    assert row["latency_ms"]["1"] > 0 and row["latency_ms"]["64"] > row["latency_ms"]["1"]
    resnet = result["latency"]["CIFAR ResNet-56"]
    assert resnet["dense"]["macs"] > 100e6 and all(r["ok"] for r in resnet["rows"])
    memory = result["collection_memory"][crit]
    assert memory["4x"]["samples"] == 4 * memory["1x"]["samples"]
    for entry in memory.values():
        assert entry["peak_bytes"] > 0 and entry["peak_nbytes_reported"] > 0
        assert entry["peak_bytes"] >= entry["final_bytes"]
    step = result["prune_step"]  # prune-step time vs one epoch, filter ensembles batched and not
    assert set(step["rows"]) == {"l1", "filter_ensembles", "filter_ensembles (masks_per_pass=1)"}
    assert step["epoch_seconds"] > 0 and all(r["step_seconds"] > 0 for r in step["rows"].values())
    assert all(r["ratio"] == pytest.approx(r["step_seconds"] / step["epoch_seconds"]) for r in step["rows"].values())
    assert step["rows"]["filter_ensembles (masks_per_pass=1)"]["kwargs"]["masks_per_pass"] == 1
    table = (out / "performance.md").read_text()
    assert "collection overhead" in table and "4x / 1x" in table and "digits SmallResNet" in table
    assert "Prune-step time vs one training epoch" in table and "| filter_ensembles (masks_per_pass=1) |" in table
    assert (out / "README.md").read_text() == f"a\n<!-- benchmark-performance:start -->\n{table}<!-- benchmark-performance:end -->\nb\n"


def test_latency_leaves_training_modes_alone():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from _bench import latency_ms, make_model
    finally:
        sys.path.remove(str(EXAMPLES))
    net = make_model(1).net.train()
    result = latency_ms({"a": net}, (1, 8, 8), batch_sizes=(1, 2), rounds=2, budget_s=0.001)
    assert set(result["a"]) == {"1", "2"} and all(v > 0 for v in result["a"].values())
    assert all(m.training for m in net.modules())


@pytest.mark.slow
def test_compare_smoke_on_fashion_mnist_reads_the_real_files(tmp_path, fashion_mnist_dir):
    """``--data fashion-mnist`` end to end on a few real batches (CI has Debian's files)."""
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- benchmark-compare-fashion-mnist:start -->\n<!-- benchmark-compare-fashion-mnist:end -->\nb\n")
    _run("benchmark_compare.py", tmp_path, 300, "--data", "fashion-mnist", "--data-dir", str(tmp_path / "none"),
         "--readme", str(readme))
    result = json.loads((tmp_path / "compare_fashion_mnist.json").read_text())
    config = result["config"]
    assert config["data"] == "fashion-mnist" and config["input_shape"] == [1, 28, 28] and config["peers"] == []
    assert [r["method"] for r in result["runs"]] == ["l1"] and result["runs"][0]["ok"]
    assert abs(result["runs"][0]["flops_reduction"] - 0.5) <= 0.02
    for name in ("compare_fashion_mnist.md", "compare_fashion_mnist_accuracy.png", "compare_fashion_mnist_widths.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "Fashion-MNIST, CIFAR-style ResNet-8" in (tmp_path / "compare_fashion_mnist.md").read_text()
    assert "| l1 |" in readme.read_text()


@pytest.mark.slow
def test_latency_benchmark_smoke(tmp_path):
    """examples/benchmark_latency.py --smoke: every section writes its rows, the files exist."""
    _run("benchmark_latency.py", tmp_path, 300, "--cache", str(tmp_path / "cache"))
    result = json.loads((tmp_path / "latency.json").read_text())
    # --malloc retain by default: applied wherever glibc is
    assert result["malloc"] == {"mode": "retain", "applied": _glibc_mallopt() is not None}
    rows = [r for r in result["latency"] if "error" not in r]
    assert {r["variant"] for r in rows} == {"latency 0.5", "MACs 0.5", "MACs 0.5, round_to=auto"}
    for r in rows:
        assert r["dense_ms"] > 0 and r["pruned_ms"] > 0 and 0 < r["macs_ratio"] < 1
        assert r["cached_points_measured"] == 0  # the second build read everything from the cache
    macs = next(r for r in rows if r["variant"] == "MACs 0.5")
    assert abs(macs["macs_ratio"] - 0.5) <= 0.02
    (tables,) = result["tables"]
    assert tables["cold_points"] > 0 and tables["cached_measured"] == 0
    ort = {r["variant"]: r for r in result["onnxruntime"]}
    assert set(ort) == {"aimed at onnxruntime", "aimed at eager torch", "MACs 0.5", "MACs 0.5, round_to=auto (onnxruntime)"}
    assert not any("error" in r for r in ort.values())
    assert abs(ort["MACs 0.5"]["macs_ratio"] - 0.5) <= 0.02
    for r in ort.values():
        assert r["ort_ratio"] == pytest.approx(r["ort_pruned_ms"] / r["ort_dense_ms"]) and 0 < r["macs_ratio"] < 1
        assert r["eager_ratio"] == pytest.approx(r["eager_pruned_ms"] / r["eager_dense_ms"])
    assert ort["aimed at onnxruntime"]["table_points"] > 0  # its own (onnxruntime) tables, another cache key
    auto = [next(r for r in rows if r["variant"] == "MACs 0.5, round_to=auto"), ort["MACs 0.5, round_to=auto (onnxruntime)"]]
    for r in auto:  # the step timed its cut with free widths and each reachable multiple
        assert "none" in r["round_to_trials"] and all(0 < v < 1.5 for v in r["round_to_trials"].values())
    assert "the step's cut at each candidate" in (tmp_path / "latency.md").read_text()
    (acc,) = result["accuracy"]
    assert 0 < acc["acc_latency_targeted"] <= 1 and 0 < acc["acc_macs_targeted"] <= 1
    assert (tmp_path / "latency.md").stat().st_size > 0 and (tmp_path / "latency.png").stat().st_size > 0


def _compare_module():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import benchmark_compare
    finally:
        sys.path.remove(str(EXAMPLES))
    return benchmark_compare


def test_every_repair_variant_of_the_comparison_is_a_valid_callback_configuration():
    benchmark_compare = _compare_module()
    from lightning_prune import StructuredPruningCallback

    for label in benchmark_compare.REPAIR_VARIANTS:
        name, repair = benchmark_compare.variant_of(f"pca_gm [{label}]")
        cb = StructuredPruningCallback(name, target_flops_reduction=0.5, verbose=False, **repair)
        assert cb.pruner.criterion_widths is repair.get("criterion_widths", True)
    assert benchmark_compare.variant_of("l1") == ("l1", {})


def _seed_result(seed: int, accuracies: dict[str, float], wall: float) -> dict:
    """A comparison result of one seed and one target, as ``run`` writes it (numbers made up)."""
    keys = ("flops_reduction", "params_reduction", "nonzero_params_reduction", "macs", "params", "params_nonzero",
            "channels_removed", "accuracy_after_prune", "prune_seconds")
    runs = [
        {**dict.fromkeys(keys, 0.5), "accuracy_after_finetune": acc, "latency_ms": {"1": 1.0, "64": 8.0},
         "latency_ratio": {"1": 0.6, "64": 0.5 + seed / 10}, "method": method, "seed": seed, "target": 0.5, "ok": True}
        for method, acc in accuracies.items()
    ]
    config = {"data": "fashion-mnist", "seeds": [seed], "targets": [0.5], "criteria": ["l1", "fpgm"], "peers": [], "smoke": False}
    return {"config": config, "machine": {"cpu": "x"}, "dense": [{"seed": seed, "accuracy": 0.9}], "runs": runs,
            "widths": {"seed": seed}, "wall_seconds": wall}


def test_compare_merges_runs_of_other_seeds_against_numpy():
    import numpy as np

    bc = _compare_module()
    accuracies = {0: {"l1": 0.80, "fpgm": 0.70}, 1: {"l1": 0.84, "fpgm": 0.60}, 2: {"l1": 0.86, "fpgm": 0.65}}
    parts = [_seed_result(s, accuracies[s], wall=60.0 * (s + 1)) for s in (2, 0, 1)]  # any order
    merged = bc.merge_results(parts)
    assert merged["config"]["seeds"] == [0, 1, 2] and [d["seed"] for d in merged["dense"]] == [0, 1, 2]
    assert merged["widths"] == {"seed": 0} and len(merged["runs"]) == 6
    assert merged["wall_seconds"] == 180.0 and sorted(merged["wall_seconds_each"]) == [60.0, 120.0, 180.0]
    for method in ("l1", "fpgm"):
        (row,) = [r for r in merged["summary"] if r["method"] == method]
        values = np.array([accuracies[s][method] for s in (0, 1, 2)])
        mean, std = row["accuracy_after_finetune"]
        assert row["seeds"] == 3 and mean == pytest.approx(values.mean())
        assert std == pytest.approx(values.std(ddof=1))  # the sample standard deviation
        assert row["latency_ratio_64"][0] == pytest.approx(0.6)
    assert "Merged from 3 runs" in bc._wall_time(merged)
    again = bc.merge_results([merged])  # re-rendering a merged file keeps what it was merged from
    assert sorted(again["wall_seconds_each"]) == [60.0, 120.0, 180.0] and again["summary"] == merged["summary"]


def test_compare_merge_refuses_other_configurations_and_repeated_seeds():
    bc = _compare_module()
    a, b = _seed_result(0, {"l1": 0.8, "fpgm": 0.7}, 1.0), _seed_result(1, {"l1": 0.8, "fpgm": 0.7}, 1.0)
    b["config"]["targets"] = [0.7]
    with pytest.raises(ValueError, match=r"differ in \['targets'\]"):
        bc.merge_results([a, b])
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\] appear in more than one"):
        bc.merge_results([a, _seed_result(0, {"l1": 0.8, "fpgm": 0.7}, 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        bc.merge_results([])


def _grid_result(seeds, targets, variants, value) -> dict:
    """A ``--repair-grid`` result (numbers from ``value(target, variant, seed)``: after the step, after fine-tuning)."""
    runs = [
        {"method": f"l1 [{v}]", "seed": s, "target": t, "ok": True,
         "accuracy_after_prune": value(t, v, s)[0], "accuracy_after_finetune": value(t, v, s)[1]}
        for s in seeds for t in targets for v in variants
    ]
    config = {"data": "fashion-mnist", "depth": 20, "dense_epochs": 8, "dense_lr": 0.1, "limit_train_batches": 0.25,
              "test_batches": 20, "finetune_epochs": 1, "finetune_lr": 0.01, "repair_grid": True, "seeds": list(seeds)}
    return {"config": config, "runs": runs}


def test_repair_grid_combines_results_of_other_variants_and_targets_against_numpy():
    import numpy as np

    bc = _compare_module()
    rng = np.random.default_rng(0)
    table = {(t, v, s): tuple(rng.uniform(0.1, 0.9, 2)) for t in (0.5, 0.9) for v in bc.REPAIR_GRID for s in (0, 1, 2)}
    value = lambda t, v, s: table[(t, v, s)]  # noqa: E731
    parts = [
        _grid_result((0, 1, 2), (0.5,), ("plain, nobn", "ls, bn"), value),
        _grid_result((0, 1, 2), (0.9,), ("plain, nobn", "ls, bn"), value),
        *(_grid_result((s,), (0.5, 0.9), ("plain, bn", "ls, nobn"), value) for s in (0, 1)),  # seed 2 missing
    ]
    text = bc.repair_grid_table(parts)
    header = next(line for line in text.splitlines() if line.startswith("| target"))
    assert header == "| target | criterion | plain, nobn | ls, nobn | plain, bn | ls, bn |"
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| -")}
    assert set(rows) == {"| -50%", "| -90%"}
    for t in (0.5, 0.9):
        cells = rows[f"| -{t:.0%}"].strip("| ").split(" | ")[2:]
        for cell, v in zip(cells, ["plain, nobn", "ls, nobn", "plain, bn", "ls, bn"]):
            seeds = (0, 1, 2) if v in ("plain, nobn", "ls, bn") else (0, 1)
            for part, k in zip(cell.split(" / "), (0, 1)):
                values = 100 * np.array([table[(t, v, s)][k] for s in seeds])
                expected = f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" + ("" if len(seeds) == 3 else " (n=2)")
                assert part == expected
    with pytest.raises(ValueError, match="appears twice"):
        bc.repair_grid_table([parts[0], parts[0]])
    other = _grid_result((0,), (0.5,), ("plain, bn",), value)
    other["config"]["dense_epochs"] = 30
    with pytest.raises(ValueError, match=r"differ in \['dense_epochs'\]"):
        bc.repair_grid_table([parts[0], other])
    with pytest.raises(ValueError, match="--repair-grid results only"):
        bc.repair_grid_table([{**parts[0], "config": {**parts[0]["config"], "repair_grid": False}}])


def test_correction_ridge_benchmark_smoke(tmp_path):
    """examples/benchmark_correction_ridge.py --smoke: ResNet-18 at 32 px with Grams of 32 rows for up to
    512 channels; every variant is recorded and the table says which one is best."""
    _run("benchmark_correction_ridge.py", tmp_path, 300)
    result = json.loads((tmp_path / "correction_ridge.json").read_text())
    assert [r["criterion"] for r in result["rows"]] == ["l1", "interpolative_decomposition"]
    for row in result["rows"]:
        assert row["model"] == "resnet18" and row["min_rows_per_channel"] < 1  # fewer rows than channels
        for label in ("selection", "ridge 1e-6", "gcv"):
            assert row[label] > 0 and abs(row[f"macs_removed {label}"] - 0.3) <= 0.02
        assert row["gcv"] < row["ridge 1e-6"]  # GCV does not overfit the 32 rows as a ridge of 1e-6 does
        assert row["gcv_ridges"]["max"] > 1e-3  # GCV raised the ridge above the floor somewhere
    table = (tmp_path / "correction_ridge.md").read_text()
    assert "| l1 | resnet18 | 2 |" in table and "| interpolative_decomposition | resnet18 | 2 |" in table and "**" in table
