"""The command line shared by the A/B timing benchmarks: median times of two variants per case, written to docs/."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[2] / "docs"


def processor_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere): speed-ups differ between
    processors of one architecture, e.g. with and without AMX."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forward_backward_times(net: torch.nn.Module, x: torch.Tensor, repeats: int, autocast_dtype: str | None = None) -> list[float]:
    """Seconds of ``repeats`` forward and backward passes of ``net`` on ``x`` (``x`` requires grad: to the input, as a
    site answering a query does, and to the weights, as the student's update does), after one uncounted pass that warms
    up allocators and oneDNN's kernels; the forward pass under ``autocast_dtype``."""
    from monai_fedkd.networks.precision import autocast

    times = []
    for i in range(repeats + 1):
        net.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        with autocast(x.device, autocast_dtype):
            out = net(x)
        out.float().square().mean().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def compare_variants(argv, description: str, cases: Mapping[str, dict], variants: Mapping[str, Callable[[dict, int], list[float]]],
                     result_name: str, context: Mapping | None = None) -> int:
    """Time every case with each of two ``variants`` (``name -> time(case, repeats) -> seconds per repeat``) and write
    ``docs/results/<result_name>.json``: per case its medians ``<variant>_s``, all times ``<variant>_all_s`` and
    ``speedup`` (the second variant's median over the first's); ``context`` adds facts about the machine."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    (first, time_first), (second, time_second) = variants.items()
    results = {"repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "processor": processor_name(), **(context or {}), "cases": {}}
    for name, case in cases.items():
        a, b = time_first(case, args.repeats), time_second(case, args.repeats)
        results["cases"][name] = {**case, f"{first}_s": statistics.median(a), f"{second}_s": statistics.median(b),
                                  "speedup": statistics.median(b) / statistics.median(a), f"{first}_all_s": a, f"{second}_all_s": b}
        print(f"{name}: {first} {1000 * statistics.median(a):.2f} ms, {second} {1000 * statistics.median(b):.2f} ms per forward + backward")
    out = args.docs / "results" / f"{result_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0
