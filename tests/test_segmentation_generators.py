"""The 3D segmentation generator comparison end to end on tiny IXI sites: every variant and the real-input bound."""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import SHARED_DATA, require
from monai_fedkd.benchmarks._timing import processor_name
from monai_fedkd.benchmarks.segmentation_generators import NARROW_GENERATOR, UPPER_BOUND, VARIANTS, atlas_layout_match, run
from monai_fedkd.benchmarks.suite import load_config, prepare_sites
from monai_fedkd.site.card import read_site_card

pytestmark = pytest.mark.slow


def test_every_generator_variant_is_scored_on_the_same_sites(tmp_path, monkeypatch):
    require("ixi_hh", "t1")
    config = tmp_path / "tiny_seg.json"
    config.write_text(json.dumps({
        "name": "tiny_seg", "dataset": "ixi", "num_sites": 2, "partition": {"method": "acquisition"}, "max_per_split": 4, "seeds": [0],
        "methods": ["ours"],
        # the sites' own policy lets them share an atlas of their 2 training subjects (the default asks for 5)
        "site_overrides": {"spacing": [6.0, 6.0, 6.0], "spatial_size": [16, 16, 16], "max_epochs": 1, "batch_size": 1, "samples_per_volume": 1,
                           "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2], "answer_policy": {"atlas_min_subjects": 1}}}))
    docs = tmp_path / "docs"
    variants = [UPPER_BOUND, "layout", "unconditional"]  # the bound first: it needs no data-free run of its own
    results = run(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), seconds=3.0, variants=variants, docs=docs)
    written = json.loads((docs / "results" / "segmentation_generators_tiny_seg.json").read_text())
    assert written["runs"] == results["runs"] and sorted(r["variant"] for r in written["runs"]) == sorted(variants)
    for r in written["runs"]:
        dice = r["pooled"]["mean_dice"]
        assert dice is not None and math.isfinite(dice) and 0.0 <= dice <= 1.0, r
        assert r["steps"] >= 1 and r["reference"]["ensemble_weighted"]["mean_dice"] is not None
        assert 0.0 <= r["validation"]["mean_dice"] <= 1.0, "variants are chosen on the sites' validation splits"
        assert len(r["sites_sha256"]) == 64
    layout = next(r for r in written["runs"] if r["variant"] == "layout")
    # the layout variants keep the generator width they were measured with, whatever the bundle's default is now
    card = json.loads((tmp_path / "runs" / "tiny_seg" / "seed0" / "generator_layout_3s" / "central_card.json").read_text())
    assert card["generator_def"]["features"] == NARROW_GENERATOR["generator_def#features"]
    assert card["consensus_voxel_stride"] == 1, "variants measured before the strided consensus keep it on every voxel"
    assert 0.0 <= layout["generator/layout_agreement"] <= 1.0
    # the budget is wall time: a run's thread count is recorded, and montages of more than one thread say so
    assert layout["torch_threads"] >= 1
    assert layout["processor"] == processor_name()
    threads = f"_{layout['torch_threads']}threads" if layout["torch_threads"] > 1 else ""
    assert (docs / "results" / "segmentation_generators" / "tiny_seg" / f"layout_3s_seed0{threads}_layout.png").is_file()
    assert "## 3D segmentation generators: tiny_seg" in (docs / "results.md").read_text()
    # another variant run later (or by another process at the same time) adds its records and keeps the others; a
    # variant that fails does not stop the ones queued after it, and the run ends with an error that names it
    monkeypatch.setitem(VARIANTS, "broken", ((), {"autocast_dtype": "float16"}))
    with pytest.raises(RuntimeError, match=r"1 generator variant run\(s\) failed.*broken \(seed 0\)"):
        run(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), seconds=3.0, variants=["broken", "layout_fg_student_augment"], docs=docs)
    (log,) = (tmp_path / "runs").rglob("generator_broken_3s_distillation.log")
    assert "float16" in log.read_text() and not (log.parent / "generator_broken_3s" / "models" / "model.pt").exists()
    merged = json.loads((docs / "results" / "segmentation_generators_tiny_seg.json").read_text())
    assert sorted(r["variant"] for r in merged["runs"]) == sorted([*variants, "layout_fg_student_augment"])
    # a budget of steps instead of wall time: every variant (and the bound) takes exactly that many, on any machine,
    # and its records stand beside the wall-time ones of the same variant
    published = run(config, mirror=SHARED_DATA, workdir=os.path.relpath(tmp_path / "runs"), steps=2, variants=["layout", UPPER_BOUND], docs=docs)
    by_steps = [r for r in published["runs"] if r.get("steps_budget")]
    assert sorted(r["variant"] for r in by_steps) == sorted(["layout", UPPER_BOUND])
    assert all(r["steps"] == 2 and r["steps_budget"] == 2 and r["seconds"] is None for r in by_steps)
    card = json.loads((tmp_path / "runs" / "tiny_seg" / "seed0" / "generator_layout_2steps" / "central_card.json").read_text())
    assert card["iterations"] == 2 and card["max_seconds"] is None
    merged = json.loads((docs / "results" / "segmentation_generators_tiny_seg.json").read_text())
    assert sorted(r["steps_budget"] for r in merged["runs"] if r["variant"] == "layout" and "steps_budget" in r) == [2]
    assert [r["seconds"] for r in merged["runs"] if r["variant"] == "layout" and "steps_budget" not in r] == [3.0]
    assert merged["seconds_per_variant"] == 3.0 and "layout (2 steps" in (docs / "results.md").read_text()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run(config, variants=["layout"], steps=0, docs=None)
    # the atlas check: leave-one-out layouts of every alignment and cell size, scored against the subject left out
    run_dir, site_dirs, site_files, _ = prepare_sites(load_config(config), 0, os.path.relpath(tmp_path / "runs"), SHARED_DATA)
    bound = read_site_card(run_dir / f"generator_{UPPER_BOUND}_3s")
    assert bound["role"] == "real_input_bound" and "not data-free" in bound["upper_bound"] and bound["max_seconds"] == 3.0
    match = atlas_layout_match(site_dirs, site_files)
    assert match["subjects"] == sum(len(json.loads(f.read_text())["training"]) for f in site_files)
    assert sorted((r["align"], r["pool"]) for r in match["runs"]) == [("centre", 1), ("centre", 2), ("foreground", 1), ("foreground", 2)]
    assert all(0.0 <= d <= 1.0 for r in match["runs"] for d in [r["mean_dice"], *r["dice"].values()])
    with pytest.raises(ValueError, match="unknown generator variants"):
        run(config, variants=["no_such_variant"], docs=None)
    assert set(VARIANTS) >= {"layout", "unconditional"}


def test_published_runs_merge_by_seed_variant_budget_and_sites(tmp_path):
    from monai_fedkd.benchmarks.segmentation_generators import _merge_published

    def rec(variant, seconds, sites, dice):
        return {"seed": 0, "variant": variant, "seconds": seconds, "sites_sha256": sites, "pooled": {"mean_dice": dice}}

    out = tmp_path / "published.json"
    published = {"benchmark": "b", "variants": {"a": {}}, "runs": [rec("a", 60.0, "s1", 0.1), rec("b", 60.0, "s1", 0.2), rec("a", 600.0, "s1", 0.3)]}
    out.write_text(json.dumps(published))
    # a process that started before "b" was published reruns "a" at 60 s: "b" and the 600 s run stay
    merged = _merge_published(out, {"benchmark": "b", "variants": {"a": {}}, "runs": [rec("a", 60.0, "s1", 0.5)]})
    assert sorted((r["variant"], r["seconds"], r["pooled"]["mean_dice"]) for r in merged["runs"]) == [("a", 60.0, 0.5), ("a", 600.0, 0.3), ("b", 60.0, 0.2)]
    # the sites of seed 0 were trained anew: the runs made from the old ones stay (the tables keep them apart), and a
    # rerun of "a" on the new sites replaces nothing made from the old ones
    merged = _merge_published(out, {"benchmark": "b", "variants": {}, "runs": [rec("c", 60.0, "s2", 0.4), rec("a", 60.0, "s2", 0.6)]})
    assert [(r["variant"], r["seconds"], r["sites_sha256"]) for r in merged["runs"]] == [
        ("a", 60.0, "s1"), ("b", 60.0, "s1"), ("a", 600.0, "s1"), ("c", 60.0, "s2"), ("a", 60.0, "s2")]
    # a run with two threads gets more steps in the same wall time: it replaces no run of one thread
    out.write_text(json.dumps(merged))
    merged = _merge_published(out, {"benchmark": "b", "variants": {}, "runs": [{**rec("a", 60.0, "s2", 0.7), "torch_threads": 2}]})
    assert sorted(r["pooled"]["mean_dice"] for r in merged["runs"] if (r["variant"], r["sites_sha256"]) == ("a", "s2")) == [0.6, 0.7]
    # nor does a run on another processor (records before the processor was recorded count as another one)
    out.write_text(json.dumps(merged))
    merged = _merge_published(out, {"benchmark": "b", "variants": {}, "runs": [{**rec("a", 60.0, "s2", 0.8), "torch_threads": 2, "processor": "cpu X"}]})
    assert sorted(r["pooled"]["mean_dice"] for r in merged["runs"] if (r["variant"], r["sites_sha256"]) == ("a", "s2")) == [0.6, 0.7, 0.8]


def test_tables_compare_variants_on_shared_seeds_and_finalists_per_seed(tmp_path):
    """A variant run on more seeds must not be ranked by seeds the others never ran; each finalist seed is held to its
    own sites' references."""
    from monai_fedkd.benchmarks.segmentation_generators import write_markdown

    def rec(variant, seed, val, test, ens, local):
        return {"seed": seed, "variant": variant, "seconds": 60.0, "steps": 10, "validation": {"mean_dice": val},
                "pooled": {"mean_dice": test, "dice": {"a": test}},
                "reference": {"ensemble_weighted": {"mean_dice": ens}, "mean_local": {"mean_dice": local}}}

    runs = [rec("x", 0, 0.50, 0.50, 0.60, 0.52), rec("x", 1, 0.90, 0.90, 0.95, 0.80), rec("y", 0, 0.55, 0.56, 0.60, 0.52)]
    page = tmp_path / "results.md"
    write_markdown({"benchmark": "b", "seconds_per_variant": 60.0, "runs": runs}, page)
    text = page.read_text()
    screening = text.split("Finalists")[0]
    seed0, seed1 = screening.split("Seed 1 (")
    assert "Seed 0 (" in seed0 and seed0.index("| y (60 s)") < seed0.index("| x (60 s)"), "y wins on seed 0"
    assert "| x (60 s) | 0.500 | 0.500 |" in seed0, "seed 0's table holds seed 0's runs only"
    assert "| x (60 s) | 0.900 | 0.900 |" in seed1 and "| y (60 s)" not in seed1, "seed 1's table holds only what ran on seed 1"
    finalists = text.split("Finalists")[1]
    assert "| x (60 s) | 0 | 0.500 | 0.500 | 0.540 | 0.520 | -0.040 |" in finalists  # the stricter of 0.9 x 0.60 and 0.52
    assert "| x (60 s) | 1 | 0.900 | 0.900 | 0.855 | 0.800 | +0.045 |" in finalists
    assert "| y (60 s) |" not in finalists, "a variant of one seed is no finalist"
    assert "other site models" not in text
    write_markdown({"benchmark": "b", "seconds_per_variant": 60.0, "runs": [*runs, {**rec("y", 0, 0.3, 0.3, 0.6, 0.52), "torch_threads": 2}]}, page)
    assert "| y (60 s, 2 threads) | 0.300 | 0.300 |" in page.read_text() and "| y (60 s) | 0.550 | 0.560 |" in page.read_text()

    # seed 0's sites are trained anew and x rerun on them: the tables above hold the new sites' runs only, the runs
    # of the earlier sites keep a table of their own
    def on(r, sites):
        return {**r, "sites_sha256": sites}

    runs = [on(r, "old0" if r["seed"] == 0 else "s1") for r in runs] + [on(rec("x", 0, 0.70, 0.71, 0.65, 0.60), "new0")]
    write_markdown({"benchmark": "b", "seconds_per_variant": 60.0, "runs": runs}, page)
    current, earlier = page.read_text().split("other site models")
    assert "| x (60 s) | 0 | 0.700 | 0.710 | 0.585 | 0.600 | +0.110 |" in current and "| x (60 s) | 0 | 0.500 |" not in current
    assert "| y (60 s) |" not in current, "y ran on the earlier sites only"
    assert earlier.index("| y (60 s) | 0.550 | 0.560 |") < earlier.index("| x (60 s) | 0.500 | 0.500 |"), "the earlier sites' screening"
    # a real-input bound run alone on sites trained anew later does not push the seed's data-free runs aside
    write_markdown({"benchmark": "b", "seconds_per_variant": 60.0, "runs": [*runs, on(rec(UPPER_BOUND, 0, 0.8, 0.8, 0.7, 0.6), "newer0")]}, page)
    current, other = page.read_text().split("Finalists")[1].split("other site models", 1)
    assert "| x (60 s) | 0 | 0.700 | 0.710 |" in current and f"| {UPPER_BOUND} (60 s) |" not in current
    assert "newer0" in page.read_text() and f"| {UPPER_BOUND} (60 s) | 0.800 | 0.800 |" in page.read_text().split("newer0")[1]
    # where the benchmark suite published a seed, its sites stay the seed's current ones when runs on sites trained
    # anew elsewhere (another machine) are added later: the suite and this comparison keep speaking of the same models
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "b.json").write_text(json.dumps({"runs": [{"seed": 0, "sites_sha256": "new0"}]}))
    write_markdown({"benchmark": "b", "seconds_per_variant": 60.0, "runs": [*runs, on(rec("x", 0, 0.2, 0.2, 0.7, 0.6), "elsewhere0")]}, page)
    current, other = page.read_text().split("Finalists")[1].split("other site models", 1)
    assert "| x (60 s) | 0 | 0.700 | 0.710 |" in current and "| x (60 s) | 0 | 0.200 |" not in current
    assert "elsewhere0" in other
