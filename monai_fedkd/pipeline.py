"""The main job as one chain of the project's public interfaces.

prepare a public dataset -> partition it into sites -> train every site with its site bundle through
``python -m monai.bundle run`` (one process per site, as a hospital would run it) -> distil the central model with
the central_distillation bundle (query mode) -> evaluate the site models, their ensembles and the central model
with the evaluation bundle -> print the table. Each step writes its outputs under ``workdir`` and
the whole chain is reproducible from its arguments (seeds included).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["BUNDLES_DIR", "bundle_command", "dataset_overrides", "distill_central", "run_pipeline", "train_site"]

logger = logging.getLogger(__name__)

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def _bundles_dir() -> Path:
    if not (BUNDLES_DIR / "site_classification").is_dir():
        raise FileNotFoundError(
            f"bundles not found at {BUNDLES_DIR}: install monai_fedkd from its repository checkout (pip install -e .)"
        )
    return BUNDLES_DIR


def _cli_value(value) -> str:
    # monai.bundle run parses override values with fire, which reads Python literals (True, [..]), not JSON; it drops a
    # top-level None (update_kwargs ignores None), so None travels as the config expression "$None"
    if value is None:
        return "$None"
    return value if isinstance(value, str) else repr(value)


def bundle_command(bundle: str, config: str | list[str], overrides: Mapping[str, object]) -> list[str]:
    """The ``python -m monai.bundle run`` command line for one of the project's bundles."""
    root = _bundles_dir() / bundle / "configs"
    configs = [config] if isinstance(config, str) else list(config)
    files = [str(root / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files[0] if len(files) == 1 else json.dumps(files)]
    cmd += ["--logging_file", str(root / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", _cli_value(v)]
    return cmd


def dataset_overrides(info: Mapping) -> tuple[str, dict]:
    """Site bundle name and overrides that describe a prepared dataset (its ``dataset_info.json``)."""
    task = info["task"]
    bundle = {"classification": "site_classification", "segmentation": "site_segmentation"}[task]
    overrides = {
        "spatial_dims": info["spatial_dims"],
        "in_channels": info["in_channels"],
        "num_classes": info["num_classes"],
        "class_names": info.get("class_names"),
    }
    if task == "classification":
        overrides["spatial_size"] = info["spatial_size"]
        overrides["intensity_range"] = info.get("intensity_range")
    return bundle, {k: v for k, v in overrides.items() if v is not None}


CHILD_PEAKS_MB: list[tuple[str, float]] = []
"""(what, peak resident set in MB) of every bundle process run so far; the benchmark suite reads it per method."""

# Linux carries a process's resident-set high-water mark across fork and exec, so a bundle started straight from
# this (possibly large) process would report at least this process's peak as its own. A minimal launcher (a bare
# interpreter, no imports beyond the standard library) starts the bundle instead and reports only the bundle's peak.
_PEAK_RSS_LAUNCHER = (
    "import os, subprocess, sys\n"
    "proc = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(str(usage.ru_maxrss))\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "sys.exit(code if code >= 0 else 128 - code)\n"
)


def run_measured(cmd: list[str], log_file: Path) -> tuple[int, float, float | None]:
    """Run ``cmd`` with its output in ``log_file``; returns its exit code, wall time in seconds, and its own peak
    resident set in MB (``None`` where the launcher could not report it)."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open(log_file, "w") as log:
        peak_file = Path(tmp) / "peak_rss_kib"
        returncode = subprocess.call([sys.executable, "-c", _PEAK_RSS_LAUNCHER, str(peak_file), *cmd], stdout=log, stderr=subprocess.STDOUT)
        peak_mb = float(peak_file.read_text()) / 1024 if peak_file.is_file() else None  # ru_maxrss is in KiB on Linux
    return returncode, time.perf_counter() - start, peak_mb


def run_logged(cmd: list[str], log_file: Path, what: str) -> float:
    """:func:`run_measured` that records the peak in ``CHILD_PEAKS_MB`` and raises with the log's tail on failure;
    returns the wall time."""
    returncode, elapsed, peak_mb = run_measured(cmd, log_file)
    if peak_mb is not None:
        CHILD_PEAKS_MB.append((what, peak_mb))
    if returncode != 0:
        tail = "\n".join(Path(log_file).read_text().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {returncode}); log: {log_file}\n{tail}")
    return elapsed


def train_site(site_datalist: Path, output_dir: Path, bundle: str, overrides: Mapping[str, object]) -> float:
    """Train one site with its bundle in its own process; returns wall time in seconds."""
    cmd = bundle_command(bundle, "train.json", {"datalist": str(site_datalist), "output_dir": str(output_dir), **overrides})
    return run_logged(cmd, output_dir.with_name(output_dir.name + "_train.log"), f"site training {output_dir.name}")


def _trained_with(site_dir: Path, seed: int, max_epochs: int | None = None) -> bool:
    """A finished site model from the same seed (and, when given, the same number of epochs)."""
    card = site_dir / "site_card.json"
    if not card.is_file():
        return False
    card = json.loads(card.read_text())
    same_epochs = max_epochs is None or card.get("training", {}).get("epochs") == int(max_epochs)
    return card.get("seed") == seed and same_epochs


def distill_central(workdir: Path, site_dirs, site_files, task: str, overrides: Mapping[str, object], name: str = "central",
                    extra_configs: Sequence[str] = ()) -> Path:
    """Run the central_distillation bundle over the trained sites (query mode, in-process transport) into
    ``workdir/name``; ``extra_configs`` are further config files of the bundle (e.g. ``dense.json``)."""
    sites_json = workdir / "sites.json"
    # each site's own datalist stays with the site object: it feeds only that site's discriminator
    sites_json.write_text(json.dumps([{"name": Path(d).name, "dir": str(Path(d).resolve()), "datalist": str(Path(f).resolve())}
                                      for d, f in zip(site_dirs, site_files)], indent=2) + "\n")
    central_dir = workdir / name
    configs = ["train.json"] + (["segmentation.json"] if task == "segmentation" else []) + list(extra_configs)
    cmd = bundle_command("central_distillation", configs, {"sites": str(sites_json), "output_dir": str(central_dir), **overrides})
    run_logged(cmd, workdir / f"{name}_distillation.log" if name != "central" else workdir / "central_distillation.log", f"{name} distillation")
    return central_dir


def seed_data_dir(data_root: str | Path, seed: int) -> Path:
    """The folder of the dataset prepared for ``seed`` under ``data_root``. The prepared dataset's own
    train/validation/test split (and the intensity range measured on its training volumes) depends on the seed, so
    runs of several seeds must not share one folder: each would re-prepare it, and a run of another seed at the same
    time would partition, train or evaluate on the wrong split."""
    return Path(data_root) / f"seed{int(seed)}"


def run_pipeline(
    dataset: str = "pneumoniamnist",
    workdir: str | Path = "runs/demo",
    data_dir: str | Path = "data",
    mirror: str | Path | None = None,
    num_sites: int = 5,
    method: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    max_epochs: int | None = None,
    max_per_split: int | None = None,
    site_overrides: Mapping[str, object] | None = None,
    partition_kwargs: Mapping[str, object] | None = None,
    distill: bool = True,
    central_overrides: Mapping[str, object] | None = None,
    reuse_sites: bool = False,
) -> Path:
    """Run the whole chain; returns the path of the metrics table (markdown)."""
    from monai_fedkd.data.partition import partition_datalist
    from monai_fedkd.data.prepare import prepare_dataset

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    datalist = Path(prepare_dataset(dataset, data_dir, mirror=mirror, max_per_split=max_per_split, seed=seed))
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    timings["prepare_s"] = time.perf_counter() - t0
    logger.info("prepared %s: %s", dataset, datalist)

    t0 = time.perf_counter()
    sites_dir = workdir / "sites"
    manifest_path = partition_datalist(
        datalist, sites_dir, num_sites=num_sites, method=method, seed=seed, alpha=alpha,
        task=info["task"], num_classes=info["num_classes"], **dict(partition_kwargs or {}),
    )
    manifest = json.loads(Path(manifest_path).read_text())
    site_files = [sites_dir / s["datalist"] for s in manifest["sites"]]
    timings["partition_s"] = time.perf_counter() - t0
    logger.info("partitioned into %d sites (%s): %s", len(site_files), method, manifest_path)

    bundle, overrides = dataset_overrides(info)
    overrides["seed"] = seed
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    overrides.update(site_overrides or {})
    site_dirs = []
    for k, site_file in enumerate(site_files):
        out = workdir / site_file.stem
        if reuse_sites and _trained_with(out, seed + k, overrides.get("max_epochs")):
            logger.info("reusing the trained %s (same split, same seed)", site_file.stem)
            site_dirs.append(out)
            continue
        elapsed = train_site(site_file, out, bundle, {**overrides, "seed": seed + k})
        timings[f"train_{site_file.stem}_s"] = elapsed
        site_dirs.append(out)
        logger.info("trained %s in %.1f s -> %s", site_file.stem, elapsed, out)

    extra = {}
    if distill:
        t0 = time.perf_counter()
        central_dir = distill_central(workdir, site_dirs, site_files, info["task"], {"seed": seed, **dict(central_overrides or {})})
        timings["distill_s"] = time.perf_counter() - t0
        extra = {"extra_models": {"central": str(central_dir)}}
        logger.info("distilled the central model in %.1f s -> %s", timings["distill_s"], central_dir)

    t0 = time.perf_counter()
    eval_dir = workdir / "eval"
    cmd = bundle_command(
        "evaluation",
        "evaluate.json",
        {"models": [str(d) for d in site_dirs], "test_datalists": [str(f) for f in site_files], "output_dir": str(eval_dir), **extra},
    )
    run_logged(cmd, workdir / "eval.log", "evaluation")
    timings["evaluate_s"] = time.perf_counter() - t0
    if distill:  # the central model as a bundle a hospital runs with plain MONAI, its scores in its README
        from monai_fedkd.export import export_bundle

        bundle_dir = export_bundle(central_dir, workdir / "central_bundle", metrics=eval_dir / "metrics.json",
                                   modality=info.get("modality"), overwrite=True)
        logger.info("exported the central model as a MONAI bundle: %s", bundle_dir)
    timings_file = workdir / "timings.json"
    if reuse_sites and timings_file.is_file():  # keep the site training times measured when the sites were trained
        timings = {**{k: v for k, v in json.loads(timings_file.read_text()).items() if k.startswith("train_")}, **timings}
    timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    table = eval_dir / "metrics.md"
    print(table.read_text())
    print(f"results: {eval_dir}  (site logs and timings in {workdir})")
    if distill:
        print(f"central model bundle (runs with plain MONAI): {workdir / 'central_bundle'}")
    return table
