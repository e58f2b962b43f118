"""Privacy figures for docs/privacy.md: what site answers leak under each policy, and what noise costs the central model.

1. **Audit** (``monai_fedkd.site.audit``) of one PneumoniaMNIST site (the largest of the main job's 5 Dirichlet(0.5)
   sites, trained with the site bundle's defaults) under several policies, and of a deliberately overfit site (40
   training images, validation on the training images, 60 epochs), which shows that the audit detects leakage.
2. **Price**: the central model's pooled test AUROC vs the sites' epsilon, every site answering under the same noisy
   policy, for PneumoniaMNIST (5 sites) and AdrenalMNIST3D (4 sites).

    python -m monai_fedkd.benchmarks.privacy --mirror ../shared/data

writes ``docs/results/privacy.json`` and ``docs/privacy/*.png``; ``docs/privacy.md`` quotes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from monai_fedkd.pipeline import bundle_command, dataset_overrides, distill_central, run_pipeline, seed_data_dir

logger = logging.getLogger(__name__)
DOCS = Path(__file__).resolve().parents[2] / "docs"

AUDIT_POLICIES = {
    "default (logits + gradients)": {},
    "probabilities, no gradients": {"outputs": "probabilities", "return_gradients": False},
    "top-1 probability, no gradients": {"outputs": "top_k", "top_k": 1, "return_gradients": False},
    "labels only": {"outputs": "labels"},
    "probabilities + gradients clipped, noise 1": {"outputs": "probabilities", "clip_outputs": 1.0, "clip_gradients": 1.0,
                                                   "noise_multiplier": 1.0},
    "probabilities + gradients clipped, noise 4": {"outputs": "probabilities", "clip_outputs": 1.0, "clip_gradients": 1.0,
                                                   "noise_multiplier": 4.0},
}


def price_policy(noise: float) -> dict:
    """The policy family of the price curve: probabilities and gradients, per-sample clipped, Gaussian noise."""
    if noise == 0:
        return {"outputs": "probabilities"}
    # 0.005 is about the median per-sample norm of the sites' input-gradients and VJPs (PneumoniaMNIST main job)
    return {"outputs": "probabilities", "clip_outputs": 1.0, "clip_gradients": 0.005, "noise_multiplier": noise}


def _sites(workdir: Path, dataset: str, num_sites: int, mirror, seed: int) -> tuple[list[Path], list[Path], dict]:
    run_pipeline(dataset=dataset, workdir=workdir, data_dir=seed_data_dir(workdir.parent / "data", seed), mirror=mirror, num_sites=num_sites,
                 alpha=0.5, seed=seed, distill=False, reuse_sites=True)
    manifest = json.loads((workdir / "sites" / "manifest.json").read_text())
    files = [workdir / "sites" / s["datalist"] for s in manifest["sites"]]
    return [workdir / f.stem for f in files], files, manifest


def audit_cases(root: Path, mirror, seed: int, max_items: int, inversion_steps: int, figures: Path) -> list[dict]:
    from monai_fedkd.data.prepare import prepare_dataset
    from monai_fedkd.site.audit import run_audit

    site_dirs, files, manifest = _sites(root / "pneumoniamnist", "pneumoniamnist", 5, mirror, seed)
    largest = max(range(len(files)), key=lambda k: manifest["sites"][k]["counts"]["training"])
    out = []
    for name, policy in AUDIT_POLICIES.items():
        t0 = time.perf_counter()
        report = run_audit(site_dirs[largest], files[largest], root / "audit" / f"p{len(out)}", policy=policy, max_items=max_items,
                           inversion_steps=inversion_steps, seed=seed)
        shutil.copy(root / "audit" / f"p{len(out)}" / "inversion.png", figures / f"inversion_site_p{len(out)}.png")
        out.append({**report, "site_name": site_dirs[largest].name, "overfit": False, "policy_name": name, "seconds": time.perf_counter() - t0})
    # a deliberately overfit site (as in tests/test_policy.py): few images, many epochs, no dropout, its last weights
    datalist = Path(prepare_dataset("pneumoniamnist", root / "data_small", mirror=mirror, max_per_split=150, seed=seed))
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    bundle, overrides = dataset_overrides(info)
    overfit = root / "overfit_site"
    cmd = bundle_command(bundle, "train.json", {"datalist": str(datalist), "output_dir": str(overfit), "max_epochs": 100, "batch_size": 16,
                                                "val_interval": 1000, "network_def#dropout": 0.0, "seed": seed, **overrides})
    subprocess.run(cmd, check=True, capture_output=True)
    for name in ("default (logits + gradients)", "probabilities + gradients clipped, noise 4"):
        report = run_audit(overfit, datalist, root / "audit" / f"overfit{len(out)}", policy=AUDIT_POLICIES[name],
                           max_items=max_items, inversion_steps=inversion_steps, seed=seed)
        shutil.copy(root / "audit" / f"overfit{len(out)}" / "inversion.png", figures / f"inversion_overfit_p{len(out)}.png")
        out.append({**report, "site_name": "overfit site", "overfit": True, "policy_name": name})
    return out


def price_cases(root: Path, mirror, seed: int, noises: list[float], iterations: dict) -> list[dict]:
    out = []
    for dataset, num_sites in (("pneumoniamnist", 5), ("adrenalmnist3d", 4)):
        workdir = root / dataset
        site_dirs, files, _ = _sites(workdir, dataset, num_sites, mirror, seed)
        for noise in noises:
            policy = price_policy(noise)
            run = root / f"price_{dataset}_{noise:g}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            sites = []
            for d in site_dirs:  # each site's own copy with its policy file (the site sets it, not the server)
                copy = run / d.name
                shutil.copytree(d, copy, ignore=shutil.ignore_patterns("distillation_state", "tensorboard"))
                (copy / "site_policy.json").write_text(json.dumps(policy))
                sites.append(copy)
            t0 = time.perf_counter()
            task = "classification"
            extra = {"batch_size": 16} if dataset == "adrenalmnist3d" else {}  # as in the quality benchmark
            central = distill_central(run, sites, files, task, {"seed": seed, "iterations": iterations[dataset], **extra})
            seconds = time.perf_counter() - t0
            from monai_fedkd.evaluation import evaluate_models

            metrics = evaluate_models([str(s) for s in sites], [str(f) for f in files], run / "eval", extra_models={"central": str(central)})
            card = json.loads((central / "central_card.json").read_text())
            eps = {n: s.get("privacy", {}).get("epsilon") for n, s in card["sites"].items()}
            out.append({"dataset": dataset, "noise_multiplier": noise, "policy": policy, "iterations": iterations[dataset], "overrides": extra,
                        "central_auroc": metrics["central"]["pooled"]["auroc"],
                        "ensemble_auroc": metrics["ensemble_weighted"]["pooled"]["auroc"],
                        "epsilon_per_site": eps, "max_epsilon": None if any(v is None for v in eps.values()) else max(eps.values()),
                        "releases_per_site": {n: s.get("privacy", {}).get("releases") for n, s in card["sites"].items()},
                        "distill_seconds": seconds})
            logger.info("price %s noise %g: AUROC %.4f, eps %s", dataset, noise, out[-1]["central_auroc"], out[-1]["max_epsilon"])
    return out


def _eps(v) -> str:
    return "unbounded" if v is None else f"{v:.3g}"


def write_docs(results: dict, page: Path) -> None:
    """The tables of ``docs/privacy.md`` between its result markers, from ``docs/results/privacy.json``."""
    start, end = "<!-- privacy-results:start -->", "<!-- privacy-results:end -->"
    lines = [start, "## Measured (2 CPU cores, seed 0)", ""]
    if results.get("audit"):
        lines += ["### Audit", "",
                  "PneumoniaMNIST: the largest of the main job's 5 Dirichlet(0.5) sites (site bundle defaults), and a deliberately "
                  "overfit site (150 images, 100 epochs, no dropout, last weights). Members: training images; non-members: the "
                  "site's validation images (up to 300 each; chance is 0.5 ± about 0.035). Inversion: 8 images of the site's "
                  "largest class, 150 steps.", "",
                  "| site | policy | attack AUROC: loss / gradient norm / best | inversion: SSIM to nearest training image (inverted / held-out real / noise) | site answers the target class | epsilon of the audit's queries |",
                  "|---|---|---|---|---|---|"]
        for a in results["audit"]:
            mia, inv = a["membership_inference"], a["input_inversion"]
            auc = mia["attack_auroc"]
            ssim = inv["ssim_to_nearest_training_image"]
            lines.append(f"| {a['site_name']} ({mia['members']} + {mia['nonmembers']}) | {a['policy_name']} | {auc['loss']:.3f} / "
                         f"{auc.get('gradient_norm', float('nan')):.3f} / **{mia['best_attack_auroc']:.3f}** | {ssim['inverted']:.3f} / "
                         f"{ssim['held_out_real']:.3f} / {ssim['noise']:.3f} | {inv['site_answers_target_class']:.2f} | "
                         f"{_eps(mia['privacy']['epsilon'])} |")
        lines += ["", "Inverted inputs (top row) and their nearest training images (bottom row):", ""]
        for k, a in enumerate(results["audit"]):
            img = f"privacy/inversion_{'overfit' if a['overfit'] else 'site'}_p{k}.png"
            lines.append(f"- {a['site_name']}, {a['policy_name']}: ![]({img})")
        lines += ["", f"Reproduce: `{results.get('audit_command')}`", ""]
    if results.get("price"):
        lines += ["### Price: central model quality vs epsilon", "",
                  "Every site answers under the same policy: probabilities (clipped to 1) and gradients (clipped to 0.005, about "
                  "the median per-sample norm), Gaussian noise of the given multiplier. Pooled test AUROC of the central model; "
                  "the weighted ensemble of the same sites is the reference. Distillation wall times include other jobs run "
                  "beside them on the same 2 cores (the first PneumoniaMNIST rows most).", "",
                  "| dataset | noise multiplier | epsilon per site (delta 1e-5) | releases per site | central AUROC | weighted ensemble AUROC | distillation (s) |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["price"]:
            rel = sorted(set((r.get("releases_per_site") or {}).values()) - {None})
            lines.append(f"| {r['dataset']} | {r['noise_multiplier']:g} | {_eps(r['max_epsilon'])} | {', '.join(map(str, rel))} | "
                         f"{r['central_auroc']:.4f} | {r['ensemble_auroc']:.4f} | {r['distill_seconds']:.0f} |")
        lines += ["", f"Reproduce: `{results.get('price_command')}`", ""]
    lines.append(end)
    text = page.read_text()
    head, rest = text.split(start, 1)
    page.write_text(head + "\n".join(lines) + rest.split(end, 1)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", default=os.environ.get("DATA_MIRROR"))
    parser.add_argument("--workdir", default="runs/privacy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-items", type=int, default=300)
    parser.add_argument("--inversion-steps", type=int, default=150)
    parser.add_argument("--noises", type=float, nargs="+", default=[0.0, 1.0, 10.0, 100.0])
    parser.add_argument("--iterations-2d", type=int, default=300)
    parser.add_argument("--iterations-3d", type=int, default=100)
    parser.add_argument("--only", choices=("audit", "price", "docs"), default=None)
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    root, docs = Path(args.workdir), Path(args.docs)
    figures = docs / "privacy"
    figures.mkdir(parents=True, exist_ok=True)
    results_file = docs / "results" / "privacy.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.only in (None, "audit"):
        results["audit"] = audit_cases(root, args.mirror, args.seed, args.max_items, args.inversion_steps, figures)
        results["audit_command"] = f"python -m monai_fedkd.benchmarks.privacy --mirror ../shared/data --only audit --seed {args.seed}"
    if args.only in (None, "price"):
        results["price"] = price_cases(root, args.mirror, args.seed, args.noises,
                                       {"pneumoniamnist": args.iterations_2d, "adrenalmnist3d": args.iterations_3d})
        results["price_command"] = (f"python -m monai_fedkd.benchmarks.privacy --mirror ../shared/data --only price --seed {args.seed} "
                                    f"--noises {' '.join(f'{n:g}' for n in args.noises)} --iterations-2d {args.iterations_2d} "
                                    f"--iterations-3d {args.iterations_3d}")
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    write_docs(results, docs / "privacy.md")
    print(json.dumps(results, indent=2)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
