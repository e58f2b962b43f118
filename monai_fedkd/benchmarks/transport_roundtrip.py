"""Round-trip time and bytes per site: in-process transport vs NVIDIA FLARE (Collab API, simulator, loopback).

For each case the ``central_distillation`` bundle runs ``--iterations`` generator steps over the same trained sites,
once in-process (``python -m monai.bundle run``) and once through ``monai-fedkd flare-distill`` (FLARE simulator:
the server and every site in its own process), ``--repeats`` times each. From the central cards it reports per
site: the time per round trip outside the site's own compute (transport overhead: serialisation, messaging, and for
FLARE the wait for the slowest site of the parallel call), the time at the site, bytes per generator step, and the
bundle's wall time. Medians over the repeats.

    python -m monai_fedkd.benchmarks.transport_roundtrip --cases pneumoniamnist_a0.5/seed0 adrenalmnist3d_a0.5/seed0

The cases are benchmark work directories written by ``monai_fedkd.benchmarks.distillation_quality`` (their trained
sites and ``sites.json``). Writes ``docs/results/transport_roundtrip.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from monai_fedkd.pipeline import bundle_command

COMMON = {"checkpoint_interval": 100000, "montage_interval": 100000}


def _card(out: Path) -> dict:
    return json.loads((out / "central_card.json").read_text())


def _run(kind: str, case: Path, out: Path, iterations: int, extra: dict) -> float:
    overrides = {**COMMON, "iterations": iterations, **extra}
    sites = case / "sites.json"
    task = json.loads((Path(json.loads(sites.read_text())[0]["dir"]) / "site_card.json").read_text())["task"]
    t0 = time.perf_counter()
    if kind == "in_process":
        configs = ["train.json"] + (["segmentation.json"] if task == "segmentation" else [])
        cmd = bundle_command("central_distillation", configs, {"sites": str(sites), "output_dir": str(out), **overrides})
    else:
        cmd = [sys.executable, "-m", "monai_fedkd.cli", "flare-distill", "--sites", str(sites), "--output-dir", str(out),
               "--workspace", str(out.parent / (out.name + "_ws"))]
        for k, v in overrides.items():
            cmd += ["--override", f"{k}={json.dumps(v)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run on {case} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure(case: Path, iterations: int, repeats: int, workroot: Path, extra: dict) -> dict:
    rows = {}
    for kind in ("in_process", "flare"):
        runs = []
        for r in range(repeats):
            out = workroot / case.parent.name / case.name / f"{kind}_{r}"
            wall = _run(kind, case, out, iterations, extra)
            card = _card(out)
            per_site = {}
            for name, s in card["sites"].items():
                t = s["transport"]
                calls = t["queries"] + t["vjps"]
                per_site[name] = {"overhead_ms_per_round_trip": 1000 * t["seconds_in_transport"] / max(calls, 1),
                                  "site_ms_per_step": 1000 * t["seconds_at_site"] / max(t["queries"], 1),
                                  "bytes_per_step": (t["bytes_sent"] + t["bytes_received"]) / max(t["queries"], 1)}
            runs.append({"wall_s": wall, "per_site": per_site})
        names = sorted(runs[0]["per_site"])
        rows[kind] = {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "per_site": {n: {k: statistics.median(r["per_site"][n][k] for r in runs) for k in runs[0]["per_site"][n]} for n in names},
            "runs": runs,
        }
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["pneumoniamnist_a0.5/seed0", "adrenalmnist3d_a0.5/seed0"])
    parser.add_argument("--benchroot", default="runs/bench")
    parser.add_argument("--workroot", default="runs/transport")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", default=str(Path(__file__).resolve().parents[2] / "docs"))
    args = parser.parse_args(argv)
    # the same per-step sizes as the quality benchmarks use
    extra = {"adrenalmnist3d_a0.5": {"batch_size": 16, "student_batch_size": 32, "student_steps": 3}}
    results = {}
    for case in args.cases:
        path = Path(args.benchroot) / case
        results[case] = measure(path, args.iterations, args.repeats, Path(args.workroot), extra.get(path.parent.name, {}))
    out = Path(args.docs) / "results" / "transport_roundtrip.json"
    out.write_text(json.dumps({"iterations": args.iterations, "repeats": args.repeats, "cases": results}, indent=2) + "\n")
    lines = ["| case | transport | bundle wall (s) | overhead per round trip (ms) | at site per step (ms) | bytes per step per site |", "|---|---|---|---|---|---|"]
    for case, rows in results.items():
        for kind, r in rows.items():
            ps = r["per_site"].values()
            lines.append(f"| {case} | {kind} | {r['wall_s']:.1f} | {statistics.median(p['overhead_ms_per_round_trip'] for p in ps):.1f} | "
                         f"{statistics.median(p['site_ms_per_step'] for p in ps):.1f} | {statistics.median(p['bytes_per_step'] for p in ps) / 1e6:.2f} MB |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
