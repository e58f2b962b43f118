"""The classification variant benchmark's teachers, variants and page, without training (the runs take minutes)."""

from __future__ import annotations

import pytest
import torch

from monai_fedkd.benchmarks.classification_variants import VARIANTS, run, teacher_combinations, write_markdown
from monai_fedkd.losses import ensemble_log_probabilities


def test_teacher_combinations_cover_both_forms_and_weight_by_the_cards():
    counts = [[90, 10], [0, 50], [30, 30]]
    combos = teacher_combinations(counts)
    assert sorted(combos) == sorted(f"{c}_{w}" for c in ("mixture", "product") for w in ("mean", "count", "contrast", "size"))
    assert combos["product_contrast"]["combination"] == "product" and combos["mixture_mean"]["weights"] is None
    # the one-class site counts for nothing under contrast weights: the contrast teacher ignores its logits
    logits = torch.randn(3, 4, 2)
    changed = logits.clone()
    changed[1] = torch.randn(4, 2) * 10
    for name in ("mixture_contrast", "product_contrast"):
        a = ensemble_log_probabilities(logits, **combos[name])
        b = ensemble_log_probabilities(changed, **combos[name])
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.allclose(ensemble_log_probabilities(logits, **combos["product_size"]), ensemble_log_probabilities(changed, **combos["product_size"]))


def test_page_lists_every_teacher_and_variant_and_unknown_variants_are_named(tmp_path):
    results = {"benchmark": "tiny", "variants": {"default": {}, "affine": VARIANTS["affine"]},
               "seeds": [{"seed": 0, "teachers": {"site0": {"validation": 0.9, "test": 0.8}, "product_mean": {"validation": 0.95, "test": 0.85}},
                          "variants": {"default": {"validation": 0.91, "test": 0.81}, "affine": {"validation": 0.92, "test": None}}}]}
    page = tmp_path / "results.md"
    write_markdown(results, page)
    text = page.read_text()
    assert "| product_mean | 0.9500 / 0.8500 | 0.9500 / 0.8500 |" in text and "| site0 |" not in text
    assert "| affine | 0.9200 / – | 0.9200 / – |" in text
    write_markdown({**results, "seeds": []}, page)  # rewritten in place, not appended
    assert page.read_text().count("## Classification variants: tiny") == 1
    with pytest.raises(ValueError, match="unknown classification variants"):
        run("pneumoniamnist_a0.5", variants=["no_such_variant"], docs=None)


def test_a_site_that_withholds_its_counts_is_named(tmp_path):
    import json

    from monai_fedkd.benchmarks.classification_variants import class_counts

    for name, counts in (("site_a", [3, 4]), ("site_b", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "site_card.json").write_text(json.dumps({"class_counts": counts}))
    assert class_counts([tmp_path / "site_a"]) == [[3, 4]]
    with pytest.raises(ValueError, match="site_b"):
        class_counts([tmp_path / "site_a", tmp_path / "site_b"])


def test_published_seeds_merge_by_seed_and_site_models(tmp_path):
    import json

    from monai_fedkd.benchmarks.classification_variants import merge_published

    def seed(k, sha, **variants):
        return {"seed": k, "sites_sha256": sha, "teachers": {}, "variants": variants}

    out = tmp_path / "cv.json"
    assert merge_published(out, {"config_sha256": "c", "variants": {}, "seeds": []})["seeds"] == []  # nothing published yet
    out.write_text(json.dumps({"config_sha256": "c", "variants": {"default": {}, "affine": {}},
                               "seeds": [seed(0, "a", default={"test": 0.1}, affine={"test": 0.2}), seed(1, "b", default={"test": 0.3})]}))
    merged = merge_published(out, {"config_sha256": "c", "variants": {"default": {}},
                                   "seeds": [seed(0, "a", default={"test": 0.5}), seed(2, "d", default={"test": 0.6})]})
    by_seed = {r["seed"]: r for r in merged["seeds"]}
    assert sorted(by_seed) == [0, 1, 2] and set(merged["variants"]) == {"default", "affine"}
    # seed 0 again on the same site models: the new default replaces the old, the variant not rerun is kept
    assert by_seed[0]["variants"] == {"default": {"test": 0.5}, "affine": {"test": 0.2}}
    assert by_seed[1]["variants"] == {"default": {"test": 0.3}}  # a seed not rerun is kept as published
    # seed 1 on sites trained anew: nothing of the old sites' records survives for that seed
    retrained = merge_published(out, {"config_sha256": "c", "variants": {"default": {}}, "seeds": [seed(1, "new", default={"test": 0.9})]})
    assert {r["seed"]: r for r in retrained["seeds"]}[1]["variants"] == {"default": {"test": 0.9}}
    # a record from before the checksum: the same sites are known by their teachers' scores, equal to the last digit
    teachers = {"mixture_count": {"validation": 0.91, "test": 0.81}}
    out.write_text(json.dumps({"config_sha256": "c", "variants": {"default": {}},
                               "seeds": [{"seed": 0, "teachers": teachers, "variants": {"default": {"test": 0.1}}}]}))
    again = merge_published(out, {"config_sha256": "c", "variants": {"affine": {}},
                                  "seeds": [{**seed(0, "a", affine={"test": 0.2}), "teachers": teachers}]})
    assert again["seeds"][0]["variants"] == {"default": {"test": 0.1}, "affine": {"test": 0.2}} and again["seeds"][0]["sites_sha256"] == "a"
    moved = {"mixture_count": {"validation": 0.91, "test": 0.8100001}}
    other = merge_published(out, {"config_sha256": "c", "variants": {"affine": {}}, "seeds": [{**seed(0, "a", affine={"test": 0.2}), "teachers": moved}]})
    assert other["seeds"][0]["variants"] == {"affine": {"test": 0.2}}
    # another config: the published file is not this benchmark's any more
    assert [r["seed"] for r in merge_published(out, {"config_sha256": "other", "variants": {}, "seeds": [seed(3, "e")]})["seeds"]] == [3]


def test_every_variant_overrides_keys_the_distillation_bundle_has():
    # a misspelt override would be added to the config as a new, unused key: the variant would silently run the default
    from monai.bundle import ConfigParser

    from monai_fedkd.pipeline import BUNDLES_DIR

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "central_distillation" / "configs" / "train.json"))
    def known(key, overrides):  # or an argument of a component whose class the same variant replaces
        parent = key.rpartition("#")[0]
        return key in parser or (parent in parser and f"{parent}#_target_" in overrides)

    unknown = {name: key for name, overrides in VARIANTS.items() for key in overrides if not known(key, overrides)}
    assert not unknown
    assert not known("weights#no_such_term", {}) and not known("distillation#real_sites", {})  # the check can fail
    assert known("distillation#real_sites", VARIANTS["real_inputs"])
