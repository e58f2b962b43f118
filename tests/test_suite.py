"""The benchmark suite end to end on a tiny config: every method, one result file with the documented schema."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch

from conftest import SHARED_DATA, require
from monai_fedkd import cpu_heap
from monai_fedkd.benchmarks._timing import processor_name
from monai_fedkd.benchmarks.suite import METHODS, _earlier_seeds, _merged, _published, load_config, run_benchmark, sites_checksum, summary

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
    # what the budget bought and how the server computed, from the central card (classification: float32, contiguous)
    heap = "retain" if cpu_heap._glibc()[0] is not None else "system"  # the bundle's cpu_heap "auto" on this CPU
    assert costs["ours"]["compute"] == {"steps": 2, "autocast_dtype": None, "memory_format": "contiguous", "cpu_heap": heap}
    # distilled methods run in bundle processes of their own: their peak is that process's, far below the suite's own
    assert costs["ours"]["peak_rss_kind"] == "process" and 50 < costs["ours"]["peak_rss_mb"] < 20000
    assert costs["centralized"]["peak_rss_kind"] == "process"
    assert (docs / "results" / "tiny_auroc.png").is_file() and (docs / "results" / "tiny_curves.png").is_file()
    assert "## Benchmark suite: tiny" in (docs / "results.md").read_text()
    assert results["records"] == written["records"]
    # the distilled methods may run under a wall-time budget: the machine that bought their steps is named
    run_entry = written["runs"][0]
    assert run_entry["processor"] == processor_name() and run_entry["torch_threads"] == torch.get_num_threads()
    kept = ", freed memory kept for reuse" if heap == "retain" else ", the system's heap"
    assert (f"seed 0 ({processor_name()}, {torch.get_num_threads()} threads): 2 steps, float32, contiguous layout{kept}; at the sites"
            in (docs / "results.md").read_text())

    # re-running one method on the same sites replaces its records and keeps every other method's
    def others(res):
        return [r for r in res["records"] if r["method"] != "ours"]
    rerun = run_benchmark(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), docs=docs, methods=["ours"])
    assert others(rerun) == others(written)
    assert len([r for r in rerun["records"] if r["method"] == "ours"]) == len([r for r in written["records"] if r["method"] == "ours"])
    run0 = rerun["runs"][0]
    assert [r["methods"] for r in run0["reruns"]] == [["ours"]] and run0["methods"]["fedavg"] == costs["fedavg"]
    assert run0["methods"]["ours"] != costs["ours"] and run0["sites_sha256"] == written["runs"][0]["sites_sha256"]
    with pytest.raises(ValueError, match="fedprox"):
        run_benchmark(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), docs=docs, methods=["fedprox"])
    # published results made from other site models: a partial re-run would mix sites, so it is refused before any work
    tampered = json.loads((docs / "results" / "tiny.json").read_text())
    tampered["runs"][0]["sites_sha256"] = "0" * 64
    (docs / "results" / "tiny.json").write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="other site models"):
        run_benchmark(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), docs=docs, methods=["ours"])
    assert json.loads((docs / "results" / "tiny.json").read_text()) == tampered
    # a seed never published: refused before its sites are trained
    with pytest.raises(ValueError, match="no published results of this config for seed 7"):
        run_benchmark(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), docs=docs, seeds=[7], methods=["ours"])
    assert not (tmp_path / "runs" / "tiny" / "seed7").exists()

    # distillation repeats on the same sites: other distillation seeds, other models, the seed's value their mean
    repeated = tmp_path / "tiny_repeats.json"
    repeated.write_text(json.dumps({**json.loads(config.read_text()), "methods": ["ours"], "distillation_repeats": 2}))
    docs_repeats = tmp_path / "docs_repeats"
    res = run_benchmark(repeated, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), docs=docs_repeats)
    assert res["runs"][0]["sites_sha256"] == written["runs"][0]["sites_sha256"], "the repeats reuse the trained sites"
    ours = {r["model"]: r["value"] for r in res["records"] if r["method"] == "ours" and r["test_set"] == "pooled" and r["metric"] == "auroc"}
    assert set(ours) == {"ours", "ours_repeat1"} and all(math.isfinite(v) for v in ours.values())
    run_costs = res["runs"][0]["methods"]
    assert (run_costs["ours"]["distillation_seed"], run_costs["ours_repeat1"]["distillation_seed"]) == (0, 1000)
    seed_folder = tmp_path / "runs" / "tiny" / "seed0"
    first, second = (torch.load(seed_folder / m / "models" / "model.pt", weights_only=True) for m in ("ours", "ours_repeat1"))
    assert any(not torch.equal(first[k], second[k]) for k in first), "a repeat must distil with another random stream"
    assert summary(res)["ours"]["per_seed"] == [pytest.approx((ours["ours"] + ours["ours_repeat1"]) / 2)]
    assert "the mean of its 2 distillations" in (docs_repeats / "results.md").read_text()


def test_config_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pneumoniamnist_a0.5"):
        load_config("no_such_benchmark")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "dataset": "pneumoniamnist", "num_sites": 2, "partition": {"method": "dirichlet"},
                               "seeds": [0], "methods": ["ours", "fedprox"]}))
    with pytest.raises(ValueError, match="fedprox"):
        load_config(bad)
    for repeats in (0, 1.5, True):
        bad.write_text(json.dumps({"name": "x", "dataset": "pneumoniamnist", "num_sites": 2, "partition": {"method": "dirichlet"},
                                   "seeds": [0], "methods": ["ours"], "distillation_repeats": repeats}))
        with pytest.raises(ValueError, match="distillation_repeats"):
            load_config(bad)
    assert load_config("pneumoniamnist_a0.5")["num_sites"] == 5


def test_rerunning_some_seeds_keeps_the_others_of_the_same_config(tmp_path):
    (tmp_path / "results").mkdir()
    def run(seed, value, sites="s"):
        return {"seed": seed, "methods": {}, "primary_metric": "auroc", "sites_sha256": sites}, {
            "benchmark": "b", "method": "ours", "model": "ours", "seed": seed, "test_set": "pooled", "metric": "auroc", "value": value}
    (r0, rec0), (r1, rec1) = run(0, 0.8), run(1, 0.7)
    published = {"benchmark": "b", "config_sha256": "abc", "seeds": [0, 1], "runs": [r0, r1], "records": [rec0, rec1]}
    (tmp_path / "results" / "b.json").write_text(json.dumps(published))
    kept = _earlier_seeds(_published(tmp_path, "b", "abc"), [1])
    assert kept["seeds"] == [0] and kept["records"] == [rec0]
    # seed 0's work folder holds site models: kept when they are the published ones, dropped when they are not
    site = tmp_path / "work" / "seed0" / "site0"
    (site / "models").mkdir(parents=True)
    (site / "models" / "model.pt").write_bytes(b"weights")
    (site.parent / "sites.json").write_text(json.dumps([{"name": "site0", "dir": str(site), "datalist": "unused"}]))
    folder = lambda seed: tmp_path / "work" / f"seed{seed}"  # noqa: E731
    r0["sites_sha256"] = sites_checksum([site])
    (tmp_path / "results" / "b.json").write_text(json.dumps(published))
    assert _earlier_seeds(_published(tmp_path, "b", "abc"), [1], folder)["seeds"] == [0]
    (site / "models" / "model.pt").write_bytes(b"retrained")
    assert _earlier_seeds(_published(tmp_path, "b", "abc"), [1], folder) == {"seeds": [], "records": [], "runs": []}
    # a seed published before site checksums were recorded cannot be shown to match: not kept either
    del r0["sites_sha256"]
    (tmp_path / "results" / "b.json").write_text(json.dumps(published))
    assert _earlier_seeds(_published(tmp_path, "b", "abc"), [1])["seeds"] == []
    r1b, rec1b = run(1, 0.9)
    merged = _merged(kept, {"benchmark": "b", "config_sha256": "abc", "seeds": [1], "runs": [r1b], "records": [rec1b]})
    assert merged["seeds"] == [0, 1] and [r["value"] for r in merged["records"]] == [0.8, 0.9]
    # asked for seeds 1 and 2 but stopped after seed 1: seed 2 is not claimed
    stopped = _merged(kept, {"benchmark": "b", "config_sha256": "abc", "seeds": [1, 2], "runs": [r1b], "records": [rec1b]})
    assert stopped["seeds"] == [0, 1]
    assert _published(tmp_path, "b", "another config") is None  # results of another config are never mixed in


def test_tiny_segmentation_benchmark_runs_every_method(tmp_path):
    """The IXI path of the suite (segmentation sites, DENSE and ours with layouts, FedAvg and centralized on label maps)."""
    require("ixi_hh", "t1")
    config = tmp_path / "tiny_seg.json"
    config.write_text(json.dumps({
        "name": "tiny_seg", "dataset": "ixi", "num_sites": 2, "partition": {"method": "acquisition"}, "max_per_split": 4, "seeds": [0],
        "methods": list(METHODS),
        # the tiny sites hold 2 training subjects; their own policy lets them share an atlas of 2 (the default asks for 5)
        "site_overrides": {"spacing": [6.0, 6.0, 6.0], "spatial_size": [16, 16, 16], "max_epochs": 1, "batch_size": 1, "samples_per_volume": 1,
                           "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2], "answer_policy": {"atlas_min_subjects": 1}},
        "central_overrides": {"iterations": 2, "batch_size": 2, "student_batch_size": 2, "student_steps": 1},
        "fedavg": {"rounds": 1, "local_epochs": 1}}))
    docs = tmp_path / "docs"
    run_benchmark(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), docs=docs)
    written = json.loads((docs / "results" / "tiny_seg.json").read_text())
    assert written["runs"][0]["primary_metric"] == "mean_dice"
    pooled = {r["method"]: r["value"] for r in written["records"] if r["test_set"] == "pooled" and r["metric"] == "mean_dice"}
    assert {"local", "ensemble_mean", "ensemble_weighted"} | (set(METHODS) - {"local", "ensemble"}) <= set(pooled)
    for method, value in pooled.items():
        assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, (method, value)
    per_class = {r["metric"] for r in written["records"] if r["method"] == "ours" and r["metric"].startswith("dice/")}
    assert len(per_class) == 5, per_class  # Dice of every foreground class, not only the mean


def test_every_shipped_ixi_config_partitions_the_full_release(tmp_path):
    """The shipped configs are what users run: each must partition the real IXI release for each of its seeds
    (the age split once failed on subjects without an age, which a tiny fixture never shows)."""
    from monai_fedkd.benchmarks.suite import CONFIGS, partition_arguments
    from monai_fedkd.data.partition import partition_datalist
    from monai_fedkd.data.prepare import prepare_dataset

    require("ixi_hh", "t1")
    datalist = prepare_dataset("ixi", tmp_path / "data", mirror=SHARED_DATA)
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    configs = [load_config(p) for p in sorted(CONFIGS.glob("*.json"))]
    configs = [c for c in configs if c["dataset"] == "ixi"]
    assert {c["partition"]["method"] for c in configs} == {"acquisition", "metadata"}
    for cfg in configs:
        for seed in cfg["seeds"]:
            out = tmp_path / cfg["name"] / str(seed)
            manifest = json.loads(partition_datalist(datalist, out, num_sites=cfg["num_sites"], seed=seed, task=info["task"],
                                                     num_classes=info["num_classes"], **partition_arguments(cfg)).read_text())
            assert len(manifest["sites"]) == cfg["num_sites"], cfg["name"]
            for site in manifest["sites"]:
                items = json.loads((out / site["datalist"]).read_text())
                assert items["training"] and items["test"], (cfg["name"], seed, site["name"])


def test_seeds_of_one_benchmark_keep_their_own_prepared_data(tmp_path):
    """The prepared dataset's split depends on the seed: preparing seed 1 in the same work folder (e.g. at the same
    time, as two benchmark processes do) must leave seed 0's sites on seed 0's data."""
    from monai_fedkd.benchmarks.suite import prepare_sites

    require("ixi_hh", "t1")
    cfg = {"name": "two_seeds", "dataset": "ixi", "num_sites": 2, "partition": {"method": "acquisition"}, "max_per_split": 4,
           "site_overrides": {"spacing": [8.0, 8.0, 8.0], "spatial_size": [8, 8, 8], "max_epochs": 1, "batch_size": 1, "samples_per_volume": 1,
                              "network_def#channels": [4, 8, 16], "network_def#strides": [2, 2], "answer_policy": {"atlas_min_subjects": 1}}}
    workdir = os.path.relpath(tmp_path / "runs")
    run0, _, files0, _ = prepare_sites(cfg, 0, workdir, SHARED_DATA)
    manifest0 = json.loads((run0 / "sites" / "manifest.json").read_text())
    subjects0 = [json.loads(f.read_text())["training"] for f in files0]
    prepare_sites(cfg, 1, workdir, SHARED_DATA)
    info0 = run0 / "sites" / manifest0["source"]["dataset_info"]
    assert hashlib.sha256(info0.read_bytes()).hexdigest() == manifest0["source"]["dataset_info_sha256"], "seed 1 re-prepared seed 0's data"
    datalist0 = json.loads((info0.parent / "datalist.json").read_text())
    assert datalist0["training"] and json.loads((info0.parent / "dataset_info.json").read_text())["parameters"]["seed"] == 0
    for f, items in zip(files0, subjects0):
        assert all((f.parent / it["image"]).is_file() for it in items)
