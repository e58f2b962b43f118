"""Site training cost of the default site bundle configs: wall time per epoch and peak memory.

Each case prepares a real dataset, partitions it like the main job, and trains one site with the bundle's default
configuration (only the dataset overrides and ``max_epochs`` set) in a fresh ``python -m monai.bundle run``
process, ``--repeats`` times. Per-epoch times come from the trainer's own log ("Epoch[n] Complete. Time taken"),
the first epoch (caching, start-up) is reported separately; peak memory is the child process's max RSS.

    python -m monai_fedkd.benchmarks.site_training --mirror ../shared/data --repeats 3

writes ``docs/results/site_training.json`` and the table in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from monai_fedkd.data.partition import partition_datalist
from monai_fedkd.data.prepare import prepare_dataset
from monai_fedkd.pipeline import bundle_command, dataset_overrides, run_measured

EPOCH_RE = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")

# (name, dataset, partition method, sites, extra site overrides)
CASES = [
    ("2D classification: PneumoniaMNIST, 1 of 5 Dirichlet(0.5) sites", "pneumoniamnist", "dirichlet", 5, {}),
    ("3D classification: AdrenalMNIST3D 28^3, 1 of 4 Dirichlet(0.5) sites", "adrenalmnist3d", "dirichlet", 4, {}),
    ("3D segmentation: IXI T1 (6 classes, 4 mm), 1 of 4 acquisition-shift sites", "ixi", "acquisition", 4,
     {"spacing": [4.0, 4.0, 4.0], "spatial_size": [48, 48, 48]}),
]


def _epoch_times(log_text: str) -> list[float]:
    times = {}
    for m in EPOCH_RE.finditer(log_text):
        times[int(m.group(1))] = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
    return [times[k] for k in sorted(times)]


def run_case(name, dataset, method, num_sites, extra, mirror, workdir: Path, repeats: int, max_epochs: int, seed: int) -> dict:
    datalist = prepare_dataset(dataset, workdir / "data", mirror=mirror)
    info = json.loads((Path(datalist).parent / "dataset_info.json").read_text())
    sites = workdir / f"{dataset}_sites"
    manifest = json.loads(Path(partition_datalist(datalist, sites, num_sites=num_sites, method=method, seed=seed,
                                                  task=info["task"], num_classes=info["num_classes"])).read_text())
    site = manifest["sites"][0]
    bundle, overrides = dataset_overrides(info)
    overrides.update(extra, max_epochs=max_epochs, seed=seed)
    runs = []
    for r in range(repeats):
        out = workdir / f"{dataset}_site0_run{r}"
        log = workdir / f"{dataset}_run{r}.log"
        cmd = bundle_command(bundle, "train.json", {"datalist": str(sites / site["datalist"]), "output_dir": str(out), **overrides})
        rc, wall, rss_mb = run_measured(cmd, log)
        if rc != 0:
            raise RuntimeError(f"{name}: site training failed, see {log}")
        epochs = _epoch_times(log.read_text())
        runs.append({"wall_s": wall, "epoch_s": epochs, "peak_rss_mb": rss_mb})
    steady = [e for run in runs for e in run["epoch_s"][1:]]
    return {
        "case": name,
        "bundle": bundle,
        "overrides": overrides,
        "site_training_samples": site["counts"]["training"],
        "site_validation_samples": site["counts"]["validation"],
        "repeats": repeats,
        "median_epoch_s": statistics.median(steady) if steady else None,
        "median_first_epoch_s": statistics.median(run["epoch_s"][0] for run in runs),
        "median_wall_s": statistics.median(run["wall_s"] for run in runs),
        "median_peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
        "runs": runs,
    }


def write_markdown(results: dict, path: Path) -> None:
    env = results["environment"]
    lines = [
        "# Performance",
        "",
        "## Site training (default site bundle configs)",
        "",
        f"Measured on {env['cpu_count']} CPU cores ({env['machine']}), torch {env['torch']} "
        f"({env['torch_threads']} threads), {results['repeats']} runs of {results['max_epochs']} epochs per case; "
        "medians. \"Epoch\" excludes the first epoch of each run (dataset caching, start-up), which is listed "
        "separately. Peak memory is the max RSS of the site's training process (includes the cached dataset). "
        "Epoch time includes the site-local validation pass run after every epoch.",
        "",
        "| case | site training / val samples | median epoch (s) | median first epoch (s) | median run wall (s) | median peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        epoch = f"{c['median_epoch_s']:.2f}" if c["median_epoch_s"] is not None else "n/a"
        lines.append(
            f"| {c['case']} | {c['site_training_samples']} / {c['site_validation_samples']} | {epoch} | "
            f"{c['median_first_epoch_s']:.2f} | {c['median_wall_s']:.1f} | {c['median_peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "Reproduce (writes `docs/results/site_training.json` and this table):",
        "",
        "```bash",
        f"python -m monai_fedkd.benchmarks.site_training --mirror ../shared/data --repeats {results['repeats']} --max-epochs {results['max_epochs']}",
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", default=os.environ.get("DATA_MIRROR"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", default=str(Path(__file__).resolve().parents[2] / "docs"))
    parser.add_argument("--only", default=None, help="substring of the dataset name to run one case")
    args = parser.parse_args(argv)
    docs = Path(args.docs)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedkd_bench_") as tmp:
        cases = [run_case(*c, mirror=args.mirror, workdir=Path(tmp), repeats=args.repeats, max_epochs=args.max_epochs, seed=args.seed)
                 for c in CASES if args.only is None or args.only in c[1]]
    results = {
        "environment": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "repeats": args.repeats,
        "max_epochs": args.max_epochs,
        "seed": args.seed,
        "cases": cases,
    }
    (docs / "results" / "site_training.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, docs / "performance.md")
    print((docs / "performance.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
