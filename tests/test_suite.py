"""The benchmark suite end to end on a tiny config: every method, one result file with the documented schema."""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import SHARED_DATA, require
from monai_fedkd.benchmarks.suite import METHODS, load_config, run_benchmark

pytestmark = pytest.mark.slow


def test_tiny_benchmark_runs_every_method(tmp_path):
    require("pneumoniamnist", "pneumoniamnist.npz")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "name": "tiny", "dataset": "pneumoniamnist", "num_sites": 2, "partition": {"method": "dirichlet", "alpha": 5.0},
        "max_per_split": 40, "seeds": [0], "methods": list(METHODS),
        "site_overrides": {"max_epochs": 1, "batch_size": 8},
        "central_overrides": {"iterations": 2, "batch_size": 8, "student_batch_size": 8},
        "fedavg": {"rounds": 1, "local_epochs": 1}}))
    docs = tmp_path / "docs"
    # a work folder relative to the working directory, as the CLI's default runs/bench is
    results = run_benchmark(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), docs=docs)
    written = json.loads((docs / "results" / "tiny.json").read_text())
    assert written["config_sha256"] == load_config(config)["_sha256"] and written["runs"][0]["manifest_sha256"]
    keys = {"benchmark", "method", "model", "seed", "test_set", "metric", "value"}
    assert written["records"] and all(set(r) == keys for r in written["records"])
    pooled = {r["method"]: r["value"] for r in written["records"] if r["test_set"] == "pooled" and r["metric"] == "auroc"}
    expected = {"local", "ensemble_mean", "ensemble_weighted"} | (set(METHODS) - {"local", "ensemble"})
    assert expected <= set(pooled)
    for method, value in pooled.items():
        assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, (method, value)
    costs = written["runs"][0]["methods"]
    assert costs["ours"]["per_site"] and all(v["queries"] == 2 for v in costs["ours"]["per_site"].values())
    assert costs["fedavg"]["per_site"] and all(v["bytes"] > 0 for v in costs["fedavg"]["per_site"].values())
    assert 0 <= costs["ours"]["framework_overhead"]
    assert (docs / "results" / "tiny_auroc.png").is_file() and (docs / "results" / "tiny_curves.png").is_file()
    assert "## Benchmark suite: tiny" in (docs / "results.md").read_text()
    assert results["records"] == written["records"]


def test_config_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pneumoniamnist_a0.5"):
        load_config("no_such_benchmark")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "dataset": "pneumoniamnist", "num_sites": 2, "partition": {"method": "dirichlet"},
                               "seeds": [0], "methods": ["ours", "fedprox"]}))
    with pytest.raises(ValueError, match="fedprox"):
        load_config(bad)
    assert load_config("pneumoniamnist_a0.5")["num_sites"] == 5
