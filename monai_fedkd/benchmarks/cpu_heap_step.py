"""Time of the server's cross-site terms and of a site network with freed blocks kept in the heap, or given back.

``cpu_heap`` (:mod:`monai_fedkd.cpu_heap`; central_distillation's default ``"auto"``) keeps the blocks a process frees
in its heap for the next allocation, where glibc would unmap them and fault fresh zeroed pages in on the next one.
Each variant runs in its own process (the setting lasts for a process's life): the consensus and the mixture
ensemble with a cross-entropy on it, forward and backward, at one generator step's shape of each segmentation
benchmark, and one forward and backward of the 3D IXI site UNet (bfloat16, channels-last: the 3D default on a CPU
with AMX), and writes the medians to ``docs/results/cpu_heap_step.json``:

    python -m monai_fedkd.benchmarks.cpu_heap_step --repeats 15

Run it alone: other jobs on the cores change the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

from monai_fedkd.benchmarks._timing import compare_variants

# (sites, generator batch, classes, spatial) of one generator step of each segmentation benchmark's default, and the
# IXI site network at the distillation's batch and the sites' patch size
CASES = {
    "ixi_acquisition_server_terms_4x4x6x48^3": {"kind": "server_terms", "sites": 4, "batch_size": 4, "num_classes": 6, "spatial": [48, 48, 48]},
    "ixi_axial_server_terms_4x4x4x64^2": {"kind": "server_terms", "sites": 4, "batch_size": 4, "num_classes": 4, "spatial": [64, 64]},
    "ixi_unet_4x48^3_bfloat16_channels_last": {"kind": "network", "case": "ixi_unet_4x48^3_bfloat16"},
}

_CHILD = """
import json, sys, torch
from monai_fedkd.cpu_heap import configure_cpu_heap
mode, case, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
configure_cpu_heap(mode)
if case["kind"] == "server_terms":
    from monai_fedkd.benchmarks.server_terms import time_case
    times = time_case(case, repeats, closed_form=True)
else:
    from monai_fedkd.benchmarks.memory_format_step import CASES, _time
    times = _time(CASES[case["case"]], repeats, "channels_last")
print(json.dumps(times))
"""


def time_in_process(case: dict, repeats: int, cpu_heap: str) -> list[float]:
    """Seconds per repeat of ``case`` in a fresh Python process whose heap is set to ``cpu_heap``."""
    import torch

    out = subprocess.run([sys.executable, "-c", _CHILD, cpu_heap, json.dumps(case), str(repeats), str(torch.get_num_threads())],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"timing {case} with cpu_heap {cpu_heap!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    variants = {"retain": lambda case, repeats: time_in_process(case, repeats, "retain"),
                "system": lambda case, repeats: time_in_process(case, repeats, "system")}
    return compare_variants(argv, __doc__, CASES, variants, "cpu_heap_step")


if __name__ == "__main__":
    raise SystemExit(main())
