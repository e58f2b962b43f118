"""The end-to-end quality check's page section, without training (its runs take the whole main job per seed)."""

from __future__ import annotations

from monai_fedkd.benchmarks.distillation_quality import write_markdown


def _result(name: str, central: float) -> dict:
    seed = {"seed": 0, "central": central, "ensemble_weighted": 0.9, "ensemble_mean": 0.89, "best_site": 0.92, "mean_local": 0.8,
            "target_met": False, "target_detail": "central - best site = -0.1 (target > 0)",
            "timings_s": {"train_site0": 10.0, "train_site1": 12.0, "distill_s": 30.0},
            "bytes_per_site": {"site0": {"bytes_sent": 1e6, "bytes_received": 2e6}}}
    return {"benchmark": name, "target": "central AUROC above the best single site's", "per_seed": [seed],
            "mean": {k: seed[k] for k in ("central", "ensemble_weighted", "ensemble_mean", "best_site", "mean_local")}}


def test_rerunning_the_check_rewrites_only_its_own_section(tmp_path):
    """results.md is mostly hand-written discussion and other benchmarks' sections: regenerating the check's tables
    must keep them word for word (it once rebuilt the page from a stale copy of the notes and dropped later edits)."""
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n## Where things stand\n\nhand-written paragraph\n")
    write_markdown([_result("bench_a", 0.8)], page)
    with page.open("a") as f:
        f.write("\nlater discussion\n\n<!-- suite:bench_a:start -->\nsuite table\n<!-- suite:bench_a:end -->\n")
    write_markdown([_result("bench_a", 0.85), _result("bench_b", 0.7)], page)
    text = page.read_text()
    assert text.startswith("# Results\n\n## Where things stand\n\nhand-written paragraph\n")
    assert "later discussion" in text and "<!-- suite:bench_a:start -->\nsuite table\n<!-- suite:bench_a:end -->" in text
    assert text.count("## bench_a") == 1 and "## bench_b" in text
    assert "| 0 | 0.8500 |" in text and "| 0 | 0.8000 |" not in text  # the section was replaced, not appended
    assert text.index("## bench_a") < text.index("later discussion")  # and stays where it was
