"""What an exported model bundle costs a hospital pipeline: CPU time per study and peak memory.

Each case trains a small site model (1 epoch: the weights do not change the cost), exports it with
``monai_fedkd.export.export_bundle`` and runs the bundle as a hospital would, ``python -m monai.bundle run
--config_file <bundle>/configs/inference.json --input_dir ... --output_dir ...``, in a fresh process, ``--repeats``
times. Per-study seconds come from the bundle's own CSV (``seconds``: reading, preprocessing, inference, inverse
transforms and writing the outputs of that study); start-up is the run's wall time minus the studies' time; peak
memory is the max RSS of the bundle's process.

    python -m monai_fedkd.benchmarks.inference_bundle --mirror ../shared/data --repeats 3

writes ``docs/results/inference_bundle.json`` and the table in ``docs/hospital_pipeline.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from monai_fedkd.data.prepare import prepare_dataset
from monai_fedkd.export import export_bundle
from monai_fedkd.pipeline import bundle_command, dataset_overrides, run_measured

DOCS = Path(__file__).resolve().parents[2] / "docs"
TABLE_START, TABLE_END = "<!-- inference-bundle-table:start -->", "<!-- inference-bundle-table:end -->"
IXI_MODEL = {"spacing": [4.0, 4.0, 4.0], "spatial_size": [48, 48, 48]}  # the IXI benchmark's site configuration


def _site_model(dataset: str, mirror, workdir: Path, max_per_split: int, extra: dict) -> tuple[Path, Path, dict]:
    datalist = Path(prepare_dataset(dataset, workdir / "data", mirror=mirror, max_per_split=max_per_split))
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    bundle, overrides = dataset_overrides(info)
    site = workdir / f"{dataset}_site"
    cmd = bundle_command(bundle, "train.json", {"datalist": str(datalist), "output_dir": str(site), "max_epochs": 1, **overrides, **extra})
    rc, _, _ = run_measured(cmd, workdir / f"{dataset}_train.log")
    if rc != 0:
        raise RuntimeError(f"training the {dataset} site failed, see {workdir / f'{dataset}_train.log'}")
    return site, datalist, info


def _studies_from_datalist(datalist: Path, target: Path) -> int:
    """Copy the test images of a prepared datalist into a plain folder of studies; returns how many."""
    target.mkdir(parents=True)
    items = json.loads(datalist.read_text())["test"]
    for item in items:
        shutil.copy(datalist.parent / item["image"], target / Path(item["image"]).name)
    return len(items)


def _studies_ixi(datalist: Path, target: Path) -> str:
    return f"{_studies_from_datalist(datalist, target)} IXI T1 NIfTI volumes, 120×120×90 at 2 mm"


def _studies_dicom(series: Path, target: Path, copies: int = 4) -> str:
    for k in range(copies):
        shutil.copytree(series, target / f"series_{k}")
    return f"{copies} copies of a real MR DICOM series (36 files, 64×64×36 at 3×3×3.6 mm), DICOM-SEG written too"


def _studies_png(datalist: Path, target: Path) -> str:
    return f"{_studies_from_datalist(datalist, target)} PneumoniaMNIST PNG images, 28×28"


def _run(bundle: Path, studies: Path, out: Path, log: Path, extra: dict, repeats: int) -> list[dict]:
    runs = []
    for r in range(repeats):
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
               "--input_dir", str(studies), "--output_dir", str(out)]
        for k, v in extra.items():
            cmd += [f"--{k}", str(v)]
        rc, wall, rss_mb = run_measured(cmd, log)
        if rc != 0:
            raise RuntimeError(f"the exported bundle failed on {studies} (exit {rc}), see {log}")
        table = out / ("label_volumes.csv" if (out / "label_volumes.csv").exists() else "predictions.csv")
        with open(table, newline="") as f:
            seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
        runs.append({"wall_s": wall, "study_s": seconds, "startup_s": wall - sum(seconds), "peak_rss_mb": rss_mb})
    return runs


def run_cases(mirror, workdir: Path, repeats: int) -> list[dict]:
    cases = []
    seg_site, seg_datalist, seg_info = _site_model("ixi", mirror, workdir, 8, IXI_MODEL)
    seg_bundle = export_bundle(seg_site, workdir / "ixi_bundle", modality=seg_info.get("modality"))
    cls_site, cls_datalist, _ = _site_model("pneumoniamnist", mirror, workdir, 200, {})
    cls_bundle = export_bundle(cls_site, workdir / "pneumonia_bundle")
    plans = [
        ("3D segmentation, IXI model (6 classes, 4 mm, 48³ windows), NIfTI in", seg_bundle, _studies_ixi, seg_datalist, {}),
        ("3D segmentation, same model, DICOM series in, NIfTI + DICOM-SEG out", seg_bundle, _studies_dicom,
         Path(mirror) / "dicom_mr_series" / "gre_field_mapping_2", {"dicom_seg": "true"}),
        ("2D classification, PneumoniaMNIST model (28×28)", cls_bundle, _studies_png, cls_datalist, {}),
    ]
    for k, (name, bundle, make_studies, source, extra) in enumerate(plans):
        studies = workdir / f"studies_{k}"
        described = make_studies(source, studies)
        runs = _run(bundle, studies, workdir / f"out_{k}", workdir / f"run_{k}.log", extra, repeats)
        per_study = [s for run in runs for s in run["study_s"]]
        cases.append({
            "case": name,
            "studies": described,
            "n_studies": len(runs[0]["study_s"]),
            "repeats": repeats,
            "median_study_s": statistics.median(per_study),
            "max_study_s": max(per_study),
            "median_startup_s": statistics.median(run["startup_s"] for run in runs),
            "median_wall_s": statistics.median(run["wall_s"] for run in runs),
            "median_peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
            "overrides": extra,
            "runs": runs,
        })
    return cases


def write_table(results: dict, page: Path) -> None:
    env = results["environment"]
    lines = [
        TABLE_START,
        f"Measured on {env['cpu_count']} CPU cores ({env['machine']}), torch {env['torch']}, MONAI {env['monai']}, "
        f"{results['repeats']} runs per case, each a fresh `python -m monai.bundle run` process; medians. Time per study is "
        "wall time (reading, preprocessing, inference, inverse transforms, writing), from the bundle's own CSV.",
        "",
        "| case | studies | time per study, median / max (s) | start-up per run (s) | wall per run (s) | peak memory, RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        lines.append(f"| {c['case']} | {c['studies']} | {c['median_study_s']:.3f} / {c['max_study_s']:.3f} | {c['median_startup_s']:.1f} | "
                     f"{c['median_wall_s']:.1f} | {c['median_peak_rss_mb']:.0f} |")
    lines += ["", "Reproduce (writes `docs/results/inference_bundle.json` and this table):", "", "```bash",
              f"python -m monai_fedkd.benchmarks.inference_bundle --mirror ../shared/data --repeats {results['repeats']}", "```", TABLE_END]
    text = page.read_text() if page.is_file() else ""
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + "\n".join(lines) + rest.split(TABLE_END, 1)[1]
    else:
        text = text + "\n" + "\n".join(lines) + "\n"
    page.write_text(text)


def main(argv=None) -> int:
    import monai

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", default=os.environ.get("DATA_MIRROR"), required=os.environ.get("DATA_MIRROR") is None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args(argv)
    docs = Path(args.docs)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedkd_infer_bench_") as tmp:
        cases = run_cases(args.mirror, Path(tmp), args.repeats)
    results = {
        "environment": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                        "torch": torch.__version__, "monai": monai.__version__},
        "repeats": args.repeats,
        "cases": cases,
    }
    (docs / "results" / "inference_bundle.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, docs / "hospital_pipeline.md")
    print(json.dumps([{k: v for k, v in c.items() if k != "runs"} for c in cases], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
