"""Which teacher and which distillation settings lift the central classifier: variants on the suite's sites, scored
on the sites' validation splits (what a choice may use) and on their test splits (reported, never chosen by).

``python -m monai_fedkd.benchmarks.classification_variants pneumoniamnist_a0.5 --mirror ../shared/data --seeds 0 1 2``

For each seed the benchmark's sites (``monai-fedkd bench`` config) are trained or reused. First the teachers: every
site model and every way of combining them (a mixture or a product of experts, with equal, class-count, contrast or
training-set-size weights, all from what the cards publish) is scored on the pooled validation and test splits, so a
distillation variant can be read against the teacher it copies. Then every distillation variant (central_distillation
overrides, a fixed number of iterations: a minute or a few each) is built through the bundle and scored
the same way. Written: ``docs/results/classification_variants_<benchmark>.json`` and a section of
``docs/results.md``; seeds run later (``--seeds``, ``--variants``) merge into what is published when their site
models are the same (:func:`merge_published`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_fedkd.benchmarks.suite import DOCS, load_config, prepare_sites, sites_checksum, write_section
from monai_fedkd.pipeline import distill_central

logger = logging.getLogger(__name__)

# the sites' own training augmentation (site_classification's train#random_transforms), applied to the student's
# inputs: a small rotation or scaling leaves an image's class, so the ensemble's answer stays a valid target; the
# ranges follow the bundle's spatial_dims (one rotation angle in 2D, three in 3D), as at the sites
SITE_AFFINE = {
    "_target_": "RandAffine",
    "prob": 0.5,
    "rotate_range": "$[0.15] * (1 if @spatial_dims == 2 else 3)",
    "scale_range": "$[0.1] * @spatial_dims",
    "padding_mode": "border",
}
# twice the sites' rotation and scaling, on most of the student's inputs: how far the label-preserving augmentation
# can be pushed before the student stops following its teachers
STRONG_AFFINE = {
    **SITE_AFFINE,
    "prob": 0.8,
    "rotate_range": "$[0.3] * (1 if @spatial_dims == 2 else 3)",
    "scale_range": "$[0.2] * @spatial_dims",
}
REAL_INPUTS = {
    "generator_iterations": 0,
    "distillation#_target_": "monai_fedkd.benchmarks.real_input_bound.RealInputDistillation",
    "distillation#real_sites": "@query_sites",
}
VARIANTS = {  # name -> central_distillation overrides
    "default": {},
    "product_weighted": {"ensemble_combination": "product"},
    "product_weighted_1000": {"ensemble_combination": "product", "iterations": 1000},
    "product_weighted_affine": {"ensemble_combination": "product", "student_transform": SITE_AFFINE},
    "product_weighted_affine_1000": {"ensemble_combination": "product", "iterations": 1000, "student_transform": SITE_AFFINE},
    "affine": {"student_transform": SITE_AFFINE},
    "affine_1000": {"iterations": 1000, "student_transform": SITE_AFFINE},
    "default_1000": {"iterations": 1000},
    # the student's weight average without the random initial weights' share: a fixed decay of 0.999 over the
    # default's 1500 student updates still gives them 0.999^1500 = 22 % of the average
    "ema_warmup": {"ema_warmup": True},
    # twice the student's updates on the cache per generator step: does the student copy its teachers closer?
    "student_steps_10": {"student_steps": 10},
    # the student's step size at the end: its learning rate falling to 0 by the last iteration (no extra time), also
    # from twice the default's rate; and a cache four times as wide (older inputs kept longer, no extra time)
    "cosine": {"student_lr_schedule": "cosine"},
    "cosine_lr_2e-3": {"student_lr_schedule": "cosine", "student_lr": 0.002},
    "cache_4096": {"cache_size": 4096},
    # softer targets: AUROC ranks the student's scores, and a tempered KL hands it more of the teachers' ranking of
    # confident inputs (the temperature also softens the generator's consensus and adversarial terms)
    "temperature_2": {"temperature": 2.0},
    "temperature_4": {"temperature": 4.0},
    # the generator's side of the student's fidelity on real images: inputs the sites' discriminators find more
    # real, or more inputs on which the student still disagrees with the ensemble
    "realism_1.5": {"weights#realism": 1.5},
    "adversarial_1.0": {"weights#adversarial": 1.0},
    # the student-side changes that each moved validation a little, together
    "cache_4096_cosine": {"cache_size": 4096, "student_lr_schedule": "cosine"},
    "cache_4096_cosine_temperature_2": {"cache_size": 4096, "student_lr_schedule": "cosine", "temperature": 2.0},
    # the synthesis side: twice the inputs (and the sites' queries) per generator step
    "batch_size_64": {"batch_size": 64},
    # not data-free, a bound: the same run on the sites' pooled real training images instead of synthesized ones
    # (monai_fedkd.benchmarks.real_input_bound): what of the student's distance to its teachers the synthesis costs
    "real_inputs": REAL_INPUTS,
    # the stronger augmentation of the student's inputs, data-free and on real inputs
    "affine_strong": {"student_transform": STRONG_AFFINE},
    "real_inputs_affine_strong": {**REAL_INPUTS, "student_transform": STRONG_AFFINE},
    # the same augmentations with the sites asked (forward-only) about each transformed input, so teacher and student
    # see the same view: one extra forward-only query of batch_size inputs a step
    "affine_queried": {"student_transform": SITE_AFFINE, "student_transform_targets": "queried"},
    "affine_strong_queried": {"student_transform": STRONG_AFFINE, "student_transform_targets": "queried"},
}
SPLITS = ("validation", "test")


def site_logits(site_dirs, site_files, key: str) -> tuple[torch.Tensor, np.ndarray]:
    """Every site model's logits ``(K, B, N)`` on the pooled ``key`` split of all sites, and the labels ``(B,)``."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, SelectItemsd

    from monai_fedkd.data.datalist import load_datalist
    from monai_fedkd.data.transforms import card_preprocessing
    from monai_fedkd.site.card import load_site_model

    items = [it for f in site_files for it in load_datalist(str(f), key=key, task="classification", base_dir=str(Path(f).parent))]
    if not items:
        raise ValueError(f"the sites' datalists hold no '{key}' items")
    labels = np.asarray([int(it["label"]) for it in items])
    out = []
    for d in site_dirs:
        net, card = load_site_model(str(d), "cpu")
        loader = DataLoader(Dataset(items, Compose(card_preprocessing(card, with_label=False) + [SelectItemsd(keys=["image"])])), batch_size=128)
        with torch.no_grad():
            out.append(torch.cat([torch.as_tensor(net(b["image"])).float().as_subclass(torch.Tensor) for b in loader]))
    return torch.stack(out), labels


def teacher_combinations(class_counts) -> dict[str, dict]:
    """The site combinations scored as teachers: name -> keyword arguments of ``ensemble_log_probabilities``."""
    from monai_fedkd.losses import contrast_counts, site_weights

    num_classes = len(class_counts[0])
    count = site_weights(class_counts, num_classes)
    contrast = site_weights(contrast_counts(class_counts), num_classes)
    size = torch.tensor([float(sum(c)) for c in class_counts])
    return {f"{comb}_{name}": {"weights": w, "combination": comb}
            for comb in ("mixture", "product") for name, w in (("mean", None), ("count", count), ("contrast", contrast), ("size", size))}


def class_counts(site_dirs) -> list[list[float]]:
    """The class counts of every site's card (the weighted teachers need them all)."""
    counts = [json.loads((Path(d) / "site_card.json").read_text()).get("class_counts") for d in site_dirs]
    missing = [Path(d).name for d, c in zip(site_dirs, counts) if c is None]
    if missing:
        raise ValueError(f"sites {missing} withhold their class counts: the weighted teachers cannot be scored")
    return counts


def score_teachers(site_dirs, site_files, counts=None) -> dict[str, dict[str, float | None]]:
    """Pooled AUROC of every site model and every combination in :func:`teacher_combinations`, per split
    (scored as the evaluation scores models: :func:`~monai_fedkd.evaluation.evaluate.classification_metrics`)."""
    from monai_fedkd.evaluation.evaluate import classification_metrics
    from monai_fedkd.losses import ensemble_log_probabilities

    combos = teacher_combinations(counts if counts is not None else class_counts(site_dirs))

    def auroc(probs: torch.Tensor, labels: np.ndarray) -> float | None:
        return classification_metrics(probs.numpy(), labels)["auroc"]

    scores: dict[str, dict[str, float | None]] = {}
    for key in SPLITS:
        logits, labels = site_logits(site_dirs, site_files, key)
        for d, lg in zip(site_dirs, logits):
            scores.setdefault(Path(d).name, {})[key] = auroc(torch.softmax(lg, 1), labels)
        for name, kw in combos.items():
            scores.setdefault(name, {})[key] = auroc(ensemble_log_probabilities(logits, **kw).exp(), labels)
    return scores


def score_model(model_dir: Path, site_files, output_dir: Path) -> dict[str, float | None]:
    """Pooled AUROC of one model on the sites' validation and test splits (the evaluation's own scoring)."""
    from monai_fedkd.evaluation.evaluate import evaluate_models

    out = {}
    for key in SPLITS:
        metrics = evaluate_models([], [str(f) for f in site_files], output_dir / key, ensemble=False, extra_models={"model": str(model_dir)}, test_key=key)
        out[key] = metrics["model"]["pooled"]["auroc"]
    return out


def run(benchmark: str, mirror=None, workdir="runs/bench", seeds=None, variants=None, docs: Path | None = DOCS) -> dict:
    cfg = load_config(benchmark)
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown classification variants {unknown}; known: {list(VARIANTS)}")
    out_json = None if docs is None else Path(docs) / "results" / f"classification_variants_{cfg['name']}.json"
    results = {"benchmark": cfg["name"], "config_sha256": cfg["_sha256"], "variants": {v: VARIANTS[v] for v in variants}, "seeds": []}
    for seed in seeds or cfg["seeds"]:
        run_dir, site_dirs, site_files, info = prepare_sites(cfg, seed, workdir, mirror)
        if info["task"] != "classification":
            raise ValueError(f"{cfg['name']} is a {info['task']} benchmark; classification variants score AUROC")
        manifest = json.loads((run_dir / "sites" / "manifest.json").read_text())
        counts = class_counts(site_dirs)
        record = {"seed": seed, "sites": [Path(d).name for d in site_dirs], "sites_sha256": sites_checksum(site_dirs),
                  "teachers": score_teachers(site_dirs, site_files, counts),
                  "variants": {}, "class_counts": counts,
                  "manifest_partition": manifest.get("partition")}
        for v in variants:
            name = f"variant_{v}"
            t0 = time.perf_counter()
            model = distill_central(run_dir, site_dirs, site_files, "classification", {"seed": seed, **cfg.get("central_overrides", {}), **VARIANTS[v]}, name=name)
            wall = time.perf_counter() - t0
            card = json.loads((model / "central_card.json").read_text())
            record["variants"][v] = {**score_model(model, site_files, run_dir / f"{name}_eval"), "wall_s": wall, "iterations": card["iterations"]}
            logger.info("%s seed %d %s: %s", cfg["name"], seed, v, record["variants"][v])
        results["seeds"].append(record)
        if out_json is not None:  # after every seed: a run that stops keeps what it finished
            _write(results, out_json, Path(docs) / "results.md")
    return results


def merge_published(out_json: Path, results: dict) -> dict:
    """``results`` with the published seeds this call did not run. A seed run again on the same site models keeps
    its published variants that this call did not run; on other site models (or another config) it is replaced."""
    if not out_json.is_file():
        return results
    old = json.loads(out_json.read_text())
    if old.get("config_sha256") != results["config_sha256"]:
        return results
    new_seeds = {r["seed"]: r for r in results["seeds"]}
    merged = []
    for r in old.get("seeds", []):
        mine = new_seeds.pop(r["seed"], None)
        if mine is None:
            merged.append(r)
        elif _same_sites(r, mine):
            merged.append({**mine, "variants": {**r["variants"], **mine["variants"]}})
        else:
            merged.append(mine)
    merged += new_seeds.values()
    return {**results, "variants": {**old.get("variants", {}), **results["variants"]}, "seeds": sorted(merged, key=lambda r: r["seed"])}


def _same_sites(published: dict, mine: dict) -> bool:
    """Whether a published seed's record was made on the same site models as ``mine``: by their checksum, or, for a
    record that predates it, by the teachers' scores (a deterministic function of the site models and the splits:
    equal to the last digit on the same sites)."""
    if published.get("sites_sha256") is not None:
        return published["sites_sha256"] == mine["sites_sha256"]
    return bool(published.get("teachers")) and published["teachers"] == mine["teachers"]


def _write(results: dict, out_json: Path, page: Path) -> None:
    results = merge_published(out_json, results)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(f".{out_json.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out_json)  # a run that stops mid-write leaves the published file whole
    write_markdown(results, page)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def write_markdown(results: dict, page: Path) -> None:
    name, seeds = results["benchmark"], results["seeds"]
    start, end = f"<!-- classification_variants:{name}:start -->", f"<!-- classification_variants:{name}:end -->"
    head = "| {} | " + " | ".join(f"seed {r['seed']} val / test" for r in seeds) + " | mean val / test |"
    lines = [start, f"## Classification variants: {name}", "",
             "Pooled AUROC on the sites' validation splits (what a choice may use) and test splits (reported, never chosen by).", "",
             head.format("teacher"), "|---" * (len(seeds) + 2) + "|"]

    def row(label, values):
        vals = [v.get("validation") for v in values], [v.get("test") for v in values]
        means = [statistics.mean(x) if x and all(y is not None for y in x) else None for x in vals]
        return f"| {label} | " + " | ".join(f"{_fmt(v.get('validation'))} / {_fmt(v.get('test'))}" for v in values) + f" | {_fmt(means[0])} / {_fmt(means[1])} |"

    teachers = list(seeds[0]["teachers"]) if seeds else []
    lines += [row(t, [r["teachers"].get(t, {}) for r in seeds]) for t in teachers if not t.startswith("site")]
    lines += ["", head.format("distilled variant"), "|---" * (len(seeds) + 2) + "|"]
    lines += [row(v, [r["variants"].get(v, {}) for r in seeds]) for v in results["variants"]]
    lines += ["", f"Reproduce: `python -m monai_fedkd.benchmarks.classification_variants {name} --mirror ../shared/data` "
              f"(records: `docs/results/classification_variants_{name}.json`).", end]
    write_section(page, start, end, lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="pneumoniamnist_a0.5")
    parser.add_argument("--mirror", default=None)
    parser.add_argument("--workdir", default="runs/bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=None, help=f"default: all of {list(VARIANTS)}")
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    run(args.benchmark, args.mirror, args.workdir, args.seeds, args.variants, Path(args.docs) if args.docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
