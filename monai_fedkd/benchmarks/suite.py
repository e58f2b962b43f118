"""The benchmark suite: every federated method on the same sites, splits and seeds (``monai-fedkd bench CONFIG``).

For each seed the main job's sites are trained once (reused when already trained for the same split and seed), then
every method of the config builds its model from those same sites:

- ``local`` and ``ensemble`` (mean and class-count weighted): the site models themselves;
- ``centralized``: the site bundle on the pooled training (and validation) items;
- ``fedavg``: rounds of local epochs with weighted averaging (``monai.fl.client.MonaiAlgo``, in-process);
- ``one_shot_fedavg``: the trained site models averaged once;
- ``dense``: DENSE over the same sites (``central_distillation`` with ``dense.json``);
- ``ours`` and its ablations ``ours_no_consensus``, ``ours_no_expertise``, ``ours_no_discriminators``;
- ``ours_product`` and ``ours_mixture``: ours with the sites always combined as a product of experts (their
  geometric mean, equal weights), or always as the contrast-weighted mixture, instead of the default's choice
  between the two from the cards (``ensemble_combination: "auto"``).

A distillation's score moves with its random stream (on AdrenalMNIST3D by up to 0.1 AUROC between runs that
differed only in the last bits of one gradient), so a config may set ``distillation_repeats: N``: every distilled
method then distils N times per seed on the same sites (distillation seeds ``seed + 1000 r``; models
``<method>_repeat<r>``, records under the method's name), and the table takes the mean over the repeats as the
seed's value before the mean and sd over seeds.

One evaluation scores them all on every site's test split and the pooled test set. Written to ``docs/``:
``results/<benchmark>.json`` (one record per method x seed x test set x metric, with the config and the partition
manifest checksums, and per method and seed: wall time, bytes and queries per site, peak memory, and for ``ours`` a
profile of a generator step), ``results/<benchmark>_<metric>.png`` (metric by method, mean and sd over seeds) and
``results/<benchmark>_curves.png`` (distillation loss curves), and the benchmark's table in ``results.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Mapping

import torch

from monai_fedkd import pipeline
from monai_fedkd.benchmarks._timing import processor_name
from monai_fedkd.pipeline import BUNDLES_DIR, run_logged, bundle_command, dataset_overrides, distill_central, run_pipeline, seed_data_dir

__all__ = ["METHODS", "load_config", "prepare_sites", "run_benchmark", "write_markdown"]

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).with_name("configs")
DOCS = Path(__file__).resolve().parents[2] / "docs"
DISTILLED = {  # method -> (extra central_distillation configs, overrides)
    "ours": ((), {}),
    "ours_no_consensus": ((), {"weights#consensus": 0.0}),
    # without the cards' class counts: equal weights, and nothing to tell a site of one class by (so a mixture)
    "ours_no_expertise": ((), {"ensemble_weighting": "mean", "ensemble_combination": "mixture"}),
    "ours_no_discriminators": ((), {"weights#realism": 0.0, "with_real_images": False}),
    "ours_product": ((), {"ensemble_combination": "product", "ensemble_weighting": "mean"}),
    "ours_mixture": ((), {"ensemble_combination": "mixture"}),
    "dense": (("dense.json",), {}),
}
METHODS = ("local", "ensemble", "centralized", "fedavg", "one_shot_fedavg", *DISTILLED)
REQUIRED = ("name", "dataset", "num_sites", "partition", "seeds", "methods")
REPEAT_SEED_STRIDE = 1000  # repeat r of a distilled method distils with seed + 1000 * r (repeat 0: the seed itself)


def load_config(config: str | os.PathLike) -> dict:
    """A benchmark config: a JSON file, or the name of one in ``monai_fedkd/benchmarks/configs``."""
    path = Path(config)
    if not path.is_file():
        path = CONFIGS / f"{config}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise FileNotFoundError(f"benchmark config {config} is neither a file nor one of {known}")
    cfg = json.loads(path.read_text())
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"benchmark config {path} lacks {missing}")
    unknown = sorted(set(cfg["methods"]) - set(METHODS))
    if unknown:
        raise ValueError(f"benchmark config {path}: unknown methods {unknown}; known: {list(METHODS)}")
    repeats = cfg.get("distillation_repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"benchmark config {path}: distillation_repeats must be a whole number >= 1, not {repeats!r}")
    cfg["_path"], cfg["_sha256"] = str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest()
    return cfg


def _self_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _param_bytes(model_dir: Path) -> int:
    state = torch.load(model_dir / "models" / "model.pt", map_location="cpu", weights_only=True)
    return int(sum(v.numel() * v.element_size() for v in state.values()))


def repeat_model(method: str, repeat: int) -> str:
    """The model name of a distilled method's ``repeat`` (0: the method's own name)."""
    return method if repeat == 0 else f"{method}_repeat{repeat}"


def _build(method: str, cfg: Mapping, workdir: Path, site_dirs, site_files, info: Mapping, seed: int, repeat: int = 0) -> tuple[Path, dict]:
    """Build ``method``'s model from the trained sites; returns its directory and its costs. ``repeat`` r > 0 distils
    a distilled method again on the same sites with the distillation seed ``seed + 1000 r``."""
    from monai_fedkd import baselines

    bundle, site_overrides = dataset_overrides(info)
    site_overrides = {**site_overrides, **cfg.get("site_overrides", {}), "seed": seed}
    t0 = time.perf_counter()
    costs: dict = {}
    first_child = len(pipeline.CHILD_PEAKS_MB)
    if method in DISTILLED:
        extra, overrides = DISTILLED[method]
        costs["distillation_seed"] = seed + REPEAT_SEED_STRIDE * repeat
        out = distill_central(workdir, site_dirs, site_files, info["task"],
                              {"seed": costs["distillation_seed"], **cfg.get("central_overrides", {}), **overrides},
                              name=repeat_model(method, repeat), extra_configs=extra)
        card = json.loads((out / "central_card.json").read_text())
        costs["per_site"] = {n: {"bytes": s["transport"]["bytes_sent"] + s["transport"]["bytes_received"], "queries": s["transport"]["queries"],
                                 "vjps": s["transport"]["vjps"]} for n, s in card["sites"].items()}
        site_s = sum(s["transport"]["seconds_at_site"] for s in card["sites"].values())
        transport_s = sum(s["transport"]["seconds_in_transport"] for s in card["sites"].values())
        steps = max(int(card["iterations"]), 1)
        costs["generator_step_profile_ms"] = {"at_sites": 1000 * site_s / steps, "server_cross_site_terms": 1000 * card["timing"]["server_s"] / steps,
                                              "transport": 1000 * transport_s / steps, "student": 1000 * card["timing"]["student_s"] / steps}
        if "generator_s" in card["timing"]:  # the generator's own forward, backward and update (cards since 0.7.3)
            costs["generator_step_profile_ms"]["generator"] = 1000 * card["timing"]["generator_s"] / steps
        costs["framework_overhead"] = (card["timing"]["server_s"] + transport_s) / site_s if site_s else None
        # what a wall-time budget bought and how the server computed: "auto" defaults resolve by machine
        costs["compute"] = {"steps": int(card["iterations"]), "autocast_dtype": card.get("autocast_dtype"),
                            "memory_format": card.get("memory_format"), "cpu_heap": card.get("cpu_heap")}
    elif method == "fedavg":
        fed = cfg.get("fedavg", {})
        rounds, epochs = int(fed.get("rounds", 10)), int(fed.get("local_epochs", 1))
        out = workdir / "fedavg"
        baselines.fedavg(workdir / "sites.json", BUNDLES_DIR / bundle, out, rounds=rounds, local_epochs=epochs,
                         overrides={k: v for k, v in site_overrides.items() if k not in ("max_epochs", "seed")}, seed=seed)
        size = _param_bytes(out)
        costs["per_site"] = {Path(d).name: {"bytes": 2 * rounds * size, "queries": 0, "rounds": rounds} for d in site_dirs}
    elif method == "one_shot_fedavg":
        out = baselines.one_shot_fedavg(site_dirs, workdir / "one_shot_fedavg").parents[1]
        costs["per_site"] = {Path(d).name: {"bytes": _param_bytes(Path(d)), "queries": 0} for d in site_dirs}
    elif method == "centralized":
        out = baselines.centralized(site_files, bundle, workdir / "centralized", overrides=site_overrides).parents[1]
        costs["per_site"] = None  # the pooled data itself would have to move
    else:
        raise ValueError(f"{method} builds no model of its own")
    costs["wall_s"] = time.perf_counter() - t0
    children = [mb for _, mb in pipeline.CHILD_PEAKS_MB[first_child:]]
    if children:  # the method ran in bundle processes of its own: their exact peak
        costs["peak_rss_mb"], costs["peak_rss_kind"] = max(children), "process"
    else:  # in-process (FedAvg, one-shot): this process's peak so far, an upper bound
        costs["peak_rss_mb"], costs["peak_rss_kind"] = _self_peak_mb(), "upper_bound"
    return out, costs


def _records(metrics: Mapping, methods: Mapping[str, str], benchmark: str, seed: int) -> list[dict]:
    """One record per model x test set x metric; models are named by method (sites: ``local``)."""
    out = []
    for model, per_test in metrics.items():
        if model == "meta":
            continue
        role = metrics["meta"]["models"][model]["role"]
        method = "local" if role == "site" else methods.get(model, model)
        for test, values in per_test.items():
            for metric, value in values.items():
                flat = value.items() if isinstance(value, dict) else [(None, value)]
                for cls, v in flat:
                    name = f"{metric}/{cls}" if cls is not None else metric
                    if name == "n":
                        continue
                    out.append({"benchmark": benchmark, "method": method, "model": model, "seed": seed, "test_set": test,
                                "metric": name, "value": None if v is None else float(v)})
    return out


def partition_arguments(cfg: Mapping) -> dict:
    """The keyword arguments of ``partition_datalist`` that the config's ``partition`` block stands for (``alpha``
    defaults to 0.5, as in ``run_pipeline``)."""
    return {"alpha": 0.5, **cfg["partition"]}


def seed_folder(workdir, name: str, seed: int) -> Path:
    """Where a benchmark's seed keeps its sites and built models."""
    return Path(workdir) / name / f"seed{seed}"


def prepare_sites(cfg: Mapping, seed: int, workdir, mirror=None) -> tuple[Path, list[Path], list[Path], dict]:
    """Train (or reuse, when trained for the same split and seed) the benchmark's sites for ``seed``; returns the run
    folder, the site model folders, their datalists and the dataset info. Writes ``<run>/sites.json``."""
    partition = partition_arguments(cfg)
    run = seed_folder(workdir, cfg["name"], seed)
    run_pipeline(dataset=cfg["dataset"], workdir=run, data_dir=seed_data_dir(Path(workdir) / "data", seed), mirror=mirror, num_sites=cfg["num_sites"],
                 method=partition.pop("method"), alpha=partition.pop("alpha"), seed=seed, max_per_split=cfg.get("max_per_split"),
                 site_overrides=cfg.get("site_overrides"), distill=False, reuse_sites=True, partition_kwargs=partition)
    manifest_path = run / "sites" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    info = json.loads((manifest_path.parent / manifest["source"]["dataset_info"]).read_text())
    site_files = [run / "sites" / s["datalist"] for s in manifest["sites"]]
    site_dirs = [run / f.stem for f in site_files]
    (run / "sites.json").write_text(json.dumps([{"name": d.name, "dir": str(d.resolve()), "datalist": str(f.resolve())}
                                                for d, f in zip(site_dirs, site_files)], indent=2))
    return run, site_dirs, site_files, info


def sites_checksum(site_dirs) -> str:
    """sha256 over the site models: records of one seed are comparable only when made from the same sites."""
    h = hashlib.sha256()
    for d in sorted(Path(d) for d in site_dirs):
        h.update((d / "models" / "model.pt").read_bytes())
    return h.hexdigest()


def run_benchmark(config: str | os.PathLike, mirror=None, workdir: str | os.PathLike = "runs/bench", seeds=None,
                  docs: str | os.PathLike | None = DOCS, methods=None) -> dict:
    """Run every method of ``config`` for every seed; write the JSON, plots and the markdown table under ``docs``.

    ``methods``: re-run only these methods of the config, on the same site models as the published results of each
    seed (checked by checksum), and keep the published records of the others: after a method's default changes, the
    table is renewed without re-running every baseline."""
    cfg = load_config(config)
    name = cfg["name"]
    rerun = _methods_to_rerun(cfg, methods)
    results = {"benchmark": name, "config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "config_sha256": cfg["_sha256"],
               "seeds": list(seeds or cfg["seeds"]), "records": [], "runs": []}
    results["workdir"] = str(workdir)
    published = _published(Path(docs) if docs is not None else None, name, cfg["_sha256"])
    kept = _earlier_seeds(published, results["seeds"], lambda seed: seed_folder(workdir, name, seed))
    # a partial re-run needs every seed's published results: checked before any site is trained or model built
    earlier_of = {seed: _published_seed(published, seed, config) for seed in results["seeds"]} if rerun else {}
    for seed in results["seeds"]:
        t0 = time.perf_counter()
        run, site_dirs, site_files, info = prepare_sites(cfg, seed, workdir, mirror)
        sites_wall = time.perf_counter() - t0
        sites_sha256 = sites_checksum(site_dirs)
        earlier = earlier_of.get(seed)
        if earlier is not None and earlier["run"]["sites_sha256"] != sites_sha256:
            raise ValueError(f"{config}: seed {seed}'s published results were made from other site models than the ones now in "
                             "the work folder, so re-running only some methods would compare models built from different sites; "
                             "run every method (without --methods)")
        manifest_path = run / "sites" / "manifest.json"
        built, costs, method_of = {}, {}, {}
        for method in rerun or cfg["methods"]:
            if method in ("local", "ensemble"):
                continue
            # a distillation's score moves with its random stream: distilled methods can be averaged over repeats
            for repeat in range(cfg.get("distillation_repeats", 1) if method in DISTILLED else 1):
                model = repeat_model(method, repeat)
                logger.info("%s seed %d: building %s", name, seed, model)
                built[model], costs[model] = _build(method, cfg, run, site_dirs, site_files, info, seed, repeat)
                method_of[model] = method
        t0 = time.perf_counter()
        eval_dir = run / "eval_all"
        cmd = bundle_command("evaluation", "evaluate.json", {"models": [str(d) for d in site_dirs], "test_datalists": [str(f) for f in site_files],
                                                             "output_dir": str(eval_dir), "extra_models": {m: str(d) for m, d in built.items()} or None,
                                                             "ensemble": "ensemble" in (rerun or cfg["methods"])})
        run_logged(cmd, run / "eval_all.log", "evaluation")
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        records = _records(metrics, method_of, name, seed)
        entry = {"seed": seed, "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(), "sites_sha256": sites_sha256,
                 "phases_s": {"sites": sites_wall, "evaluation": time.perf_counter() - t0, **{m: c["wall_s"] for m, c in costs.items()}},
                 "site_training_s": json.loads((run / "timings.json").read_text()), "methods": costs,
                 "bundle_versions": _bundle_versions(), "primary_metric": metrics["meta"]["primary_metric"],
                 # a wall-time budget (max_seconds) buys steps by the processor and threads, which the records name
                 "processor": processor_name(), "torch_threads": torch.get_num_threads()}
        if earlier is not None:
            records, entry = _rerun_merged(earlier, records, entry, rerun)
        results["records"] += records
        results["runs"].append(entry)
        if docs is not None:  # after every seed: a long run that stops keeps the seeds it finished
            _write(_merged(kept, results), Path(docs))
    return _merged(kept, results)


def _method_of_record(method: str) -> str:
    """The config method a record belongs to (the two ensembles are the config's ``ensemble``)."""
    return "ensemble" if method.startswith("ensemble_") else method


def _methods_to_rerun(cfg: Mapping, methods) -> list[str] | None:
    if methods is None:
        return None
    methods = list(dict.fromkeys(methods))
    foreign = [m for m in methods if m not in cfg["methods"]]
    if not methods or foreign:
        raise ValueError(f"benchmark {cfg['name']}: can re-run only methods of its config {cfg['methods']}, not {foreign or 'none'}")
    return methods


def _published_seed(published: Mapping | None, seed: int, config) -> dict:
    """The published run and records of ``seed``, which a partial re-run keeps for the methods it does not run."""
    runs = [r for r in (published or {}).get("runs", []) if r["seed"] == seed]
    if not runs:
        raise ValueError(f"{config}: no published results of this config for seed {seed} to keep; run every method "
                         "(without --methods) first")
    if "sites_sha256" not in runs[0]:
        raise ValueError(f"{config}: seed {seed}'s published results do not name their site models (written before site "
                         "checksums were recorded), so a partial re-run cannot be shown to use the same sites; run every method "
                         "(without --methods)")
    return {"run": runs[0], "records": [r for r in published["records"] if r["seed"] == seed]}


def _rerun_merged(earlier: Mapping, records: list[dict], entry: dict, rerun: list[str]) -> tuple[list[dict], dict]:
    """The seed's published records and costs with those of the re-run methods replaced."""
    records = [r for r in records if _method_of_record(r["method"]) in rerun]
    kept = [r for r in earlier["records"] if _method_of_record(r["method"]) not in rerun]
    old = earlier["run"]
    merged = {**old, "methods": {**old["methods"], **entry["methods"]},
              "phases_s": {**old["phases_s"], **{m: c["wall_s"] for m, c in entry["methods"].items()}},
              "reruns": [*old.get("reruns", []), {"methods": rerun, "bundle_versions": entry["bundle_versions"],
                                                  "evaluation_s": entry["phases_s"]["evaluation"],
                                                  "processor": entry["processor"], "torch_threads": entry["torch_threads"]}]}
    return kept + records, merged


def _bundle_versions() -> dict[str, str]:
    """The version of every bundle a run used: a bundle's defaults (e.g. the ensemble weighting) can change between
    runs of the same benchmark config."""
    return {p.parent.parent.name: json.loads(p.read_text())["version"] for p in sorted(BUNDLES_DIR.glob("*/configs/metadata.json"))}


def _published(docs: Path | None, name: str, sha256: str) -> dict | None:
    """The published results of the same config (None when there are none, or they are of another config)."""
    path = docs / "results" / f"{name}.json" if docs is not None else None
    if path is None or not path.is_file():
        return None
    old = json.loads(path.read_text())
    if old.get("config_sha256") != sha256:
        logger.warning("%s was written by another version of the config: its seeds are not kept", path)
        return None
    return old


def _earlier_seeds(old: Mapping | None, seeds, run_folder=None) -> dict | None:
    """The published results of other seeds of the same config, kept when only some seeds are (re)run.

    A seed is kept only when its run names its site models (``sites_sha256``) and, where ``run_folder(seed)`` still
    holds that seed's sites, they are the same models: otherwise a table's mean would mix seeds distilled from sites
    trained by other code, which the config checksum alone cannot show."""
    if old is None:
        return None
    seeds = set(seeds)
    keep = set()
    for run in old["runs"]:
        seed = run["seed"]
        if seed in seeds:
            continue
        if "sites_sha256" not in run:
            logger.warning("published seed %d does not name its site models (written before site checksums were recorded): "
                           "not kept; re-run it to publish it again", seed)
            continue
        folder = run_folder(seed) if run_folder is not None else None
        now = _sites_checksum_in(folder) if folder is not None else None
        if now is not None and now != run["sites_sha256"]:
            logger.warning("published seed %d was made from other site models than the ones now in %s: not kept; re-run it "
                           "to publish it again", seed, folder)
            continue
        keep.add(seed)
    return {"seeds": [s for s in old["seeds"] if s in keep], "records": [r for r in old["records"] if r["seed"] in keep],
            "runs": [r for r in old["runs"] if r["seed"] in keep]}


def _sites_checksum_in(run: Path) -> str | None:
    """The checksum of the site models a seed's run folder holds (None when it holds none, e.g. on another machine)."""
    listing = run / "sites.json"
    if not listing.is_file():
        return None
    dirs = [Path(s["dir"]) for s in json.loads(listing.read_text())]
    return sites_checksum(dirs) if all((d / "models" / "model.pt").is_file() for d in dirs) else None


def _merged(kept: Mapping | None, results: Mapping) -> dict:
    """The published seeds and this run's; ``seeds`` lists only seeds whose runs finished (a stopped run keeps its
    finished seeds and claims no others)."""
    out = dict(results)
    if kept and kept["runs"]:
        out["runs"] = sorted([*kept["runs"], *results["runs"]], key=lambda r: r["seed"])
        out["records"] = [*kept["records"], *results["records"]]
    out["seeds"] = sorted({r["seed"] for r in out["runs"]})
    return out


def _write(results: Mapping, docs: Path) -> None:
    (docs / "results").mkdir(parents=True, exist_ok=True)
    tmp = docs / "results" / f".{results['benchmark']}.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, docs / "results" / f"{results['benchmark']}.json")
    plot(results, docs / "results")
    write_markdown(results, docs / "results.md")


def summary(results: Mapping) -> dict[str, dict]:
    """Pooled primary metric per method: mean, sd and per-seed values (sites: the mean over the sites; a distilled
    method with ``distillation_repeats``: the mean over its repeats)."""
    metric = results["runs"][0]["primary_metric"] if results["runs"] else "auroc"
    per: dict[str, dict[int, list[float]]] = {}
    for r in results["records"]:
        if r["test_set"] == "pooled" and r["metric"] == metric and r["value"] is not None:
            per.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r["value"])
    out = {}
    for method, seeds in per.items():
        values = [statistics.mean(v) for _, v in sorted(seeds.items())]
        out[method] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}
    return out


def plot(results: Mapping, folder: Path) -> list[Path]:
    """Metric by method (mean and sd over seeds) and the distillation curves of the distilled methods, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = results["benchmark"]
    metric = results["runs"][0]["primary_metric"] if results["runs"] else "auroc"
    s = summary(results)
    methods = sorted(s, key=lambda m: s[m]["mean"])
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(methods) + 1.2))
    ax.barh(methods, [s[m]["mean"] for m in methods], xerr=[s[m]["sd"] for m in methods], color="#4c72b0", capsize=3)
    ax.set_xlabel(f"pooled test {metric} (mean ± sd over {len(results['runs'])} seed(s))")
    ax.set_title(name)
    fig.tight_layout()
    paths = [folder / f"{name}_{metric}.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    curves = _curves(results)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, (steps, values) in sorted(curves.items()):
            ax.plot(steps, values, label=label, linewidth=1)
        ax.set_xlabel("generator step")
        ax.set_ylabel("student distillation loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"{name}: distillation curves")
        fig.tight_layout()
        paths.append(folder / f"{name}_curves.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def _curves(results: Mapping) -> dict[str, tuple[list[int], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for seed in results["seeds"]:
        for method in DISTILLED:
            tb = seed_folder(results.get("workdir", "runs/bench"), results["benchmark"], seed) / method / "tensorboard"
            if not tb.is_dir():
                continue
            acc = EventAccumulator(str(tb))
            acc.Reload()
            if "student/distillation" in acc.Tags().get("scalars", []):
                events = acc.Scalars("student/distillation")
                out[f"{method} (seed {seed})"] = ([e.step for e in events], [e.value for e in events])
    return out


MARK_START, MARK_END = "<!-- suite:{}:start -->", "<!-- suite:{}:end -->"


def write_markdown(results: Mapping, page: Path) -> None:
    """The benchmark's section of ``results.md`` (between its own markers; the rest of the page is kept)."""
    name = results["benchmark"]
    metric = results["runs"][0]["primary_metric"] if results["runs"] else "auroc"
    s = summary(results)
    lines = [MARK_START.format(name), f"## Benchmark suite: {name}", "",
             f"Pooled test {metric}, mean ± sd over seeds {[r['seed'] for r in results['runs']]} (`local`: the mean of the site models). Same sites, "
             "splits and seeds for every method." + _repeats_sentence(results), "", f"| method | {metric} | per seed |", "|---|---|---|"]
    for m in sorted(s, key=lambda k: -s[k]["mean"]):
        lines.append(f"| {m} | {s[m]['mean']:.4f} ± {s[m]['sd']:.4f} | {', '.join(f'{v:.4f}' for v in s[m]['per_seed'])} |")
    lines += ["", "| method | wall (s), median over seeds | bytes per site (median) | queries per site | peak RSS (MB)¹ |",
              "|---|---|---|---|---|"]
    methods = sorted({m for r in results["runs"] for m in r["methods"]})
    for m in methods:
        runs = [r["methods"][m] for r in results["runs"] if m in r["methods"]]
        per_site = [v for c in runs if c.get("per_site") for v in c["per_site"].values()]
        b = statistics.median(v["bytes"] for v in per_site) / 1e6 if per_site else None
        q = statistics.median(v["queries"] for v in per_site) if per_site else None
        peaks = [c for c in runs if c.get("peak_rss_mb") is not None]
        measured = [c for c in peaks if c["peak_rss_kind"] != "upper_bound"]  # a bound only where no seed measured the process
        peak = (f"{statistics.median(c['peak_rss_mb'] for c in measured):.0f}" if measured else
                f"≤ {statistics.median(c['peak_rss_mb'] for c in peaks):.0f}" if peaks else "not measured")
        lines.append(f"| {m} | {statistics.median(c['wall_s'] for c in runs):.0f} | {'n/a (data pooled)' if b is None else f'{b:.2f} MB'} | "
                     f"{'' if q is None else int(q)} | {peak} |")
    lines += ["", "¹ The peak resident set of the method's own bundle processes, median over the seeds that measured it. ≤: an "
              "upper bound, the suite process's peak so far, where the method ran inside it (FedAvg, one-shot FedAvg) or where a "
              "bundle process's figure could include the suite's (records before 2026-12-02). Not measured: centralized training "
              "in records before 2026-12-02."]
    prof = [(r["seed"], r["methods"]["ours"]) for r in results["runs"] if "ours" in r["methods"]]
    if prof:
        lines += ["", "One generator step of `ours`:"]
    machine = {r["seed"]: f" ({r['processor']}, {r['torch_threads']} threads)" if r.get("processor") else "" for r in results["runs"]}
    for seed, costs in prof:
        p = costs["generator_step_profile_ms"]
        run = costs.get("compute")  # records before 2026-12-05 lack it
        heap = {"retain": ", freed memory kept for reuse", "system": ", the system's heap"}.get((run or {}).get("cpu_heap"), "")  # since 0.14.0
        ran = (f" {run['steps']} steps, {run['autocast_dtype'] or 'float32'}, {run['memory_format'] or 'contiguous'} layout{heap};" if run else "")
        lines.append(f"- seed {seed}{machine[seed]}:{ran} at the sites {p['at_sites']:.1f} ms, server cross-site terms {p['server_cross_site_terms']:.1f} ms, "
                     f"transport {p['transport']:.2f} ms, student {p['student']:.1f} ms"
                     + (f", the generator's forward, backward and update {p['generator']:.1f} ms" if "generator" in p else "") + "; "
                     f"framework overhead beyond site compute {100 * costs['framework_overhead']:.1f} % (aim: under 25 %).")
    reruns = [(r["seed"], x) for r in results["runs"] for x in r.get("reruns", [])]
    if reruns:
        lines += ["", "Methods re-run on the same site models (`--methods`), the other methods' records kept:"]
    for seed, x in reruns:
        lines.append(f"- seed {seed}: {', '.join(x['methods'])} (central_distillation {x['bundle_versions'].get('central_distillation', '?')})")
    lines += ["", f"![](results/{name}_{metric}.png)", f"![](results/{name}_curves.png)", "",
              f"Reproduce: `monai-fedkd bench {name} --mirror ../shared/data` (records: `docs/results/{name}.json`).", MARK_END.format(name)]
    write_section(page, MARK_START.format(name), MARK_END.format(name), lines)


def _repeats_sentence(results: Mapping) -> str:
    repeats = results.get("config", {}).get("distillation_repeats", 1)
    if repeats == 1:
        return ""
    return (f" Each distilled method's value of a seed is the mean of its {repeats} distillations on that seed's sites (distillation "
            f"seeds seed + {REPEAT_SEED_STRIDE} r, r < {repeats}; models `<method>_repeat<r>` in the records).")


def write_section(page: Path, start: str, end: str, lines: list[str]) -> None:
    """Replace the block of ``page`` between the markers ``start`` and ``end`` (``lines`` carry both), or append it;
    the rest of the page is kept."""
    text = page.read_text() if page.is_file() else "# Results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + "\n".join(lines) + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    page.write_text(text)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a benchmark config JSON, or the name of one in monai_fedkd/benchmarks/configs")
    parser.add_argument("--mirror", default=os.environ.get("DATA_MIRROR"), help="local copy of the official dataset files")
    parser.add_argument("--workdir", default="runs/bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's seeds")
    parser.add_argument("--docs", default=str(DOCS), help="where results/<benchmark>.json, the plots and results.md go")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="re-run only these methods of the config on the same site models, keeping the published records of the others")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    run_benchmark(args.config, mirror=args.mirror, workdir=args.workdir, seeds=args.seeds, docs=args.docs, methods=args.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
