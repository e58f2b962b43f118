"""The process heap setting (monai_fedkd.cpu_heap): its effect on page faults, its refusals, its resolution."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monai_fedkd import cpu_heap

needs_glibc = pytest.mark.skipif(cpu_heap._glibc()[0] is None, reason="the heap setting exists in glibc only")

# a fresh process (the setting lasts for its life): allocate, fill and free a 64 MB tensor twenty times and count the
# minor page faults of the last ten rounds (a retained heap grows to a few such blocks before it reuses them, as a
# distillation's steps repeat their allocations)
_FAULTS = """
import json, resource, sys, torch
from monai_fedkd.cpu_heap import configure_cpu_heap
mode = configure_cpu_heap(sys.argv[1])
for _ in range(10):
    x = torch.empty(16 * 2**20).fill_(1.0); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.empty(16 * 2**20).fill_(1.0); del x
print(json.dumps({"mode": mode, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_retained_heap_reuses_freed_pages_where_the_system_heap_faults_them_in_again():
    system, retain = _faults("system"), _faults("retain")
    assert (system["mode"], retain["mode"]) == ("system", "retain")
    pages = 10 * 64 * 2**20 // 4096  # a 64 MB block is 16384 pages of 4 KiB, ten times
    assert system["faults"] > pages // 2, "glibc maps a 64 MB block afresh on every allocation"
    assert retain["faults"] < pages // 100, f"a retained heap reuses its pages: {retain} against {system}"


def test_bad_names_are_refused_and_auto_leaves_a_cuda_process_alone():
    with pytest.raises(ValueError, match="cpu_heap must be one of"):
        cpu_heap.configure_cpu_heap("jemalloc")
    before = cpu_heap.cpu_heap_in_effect()
    assert cpu_heap.configure_cpu_heap("auto", "cuda") == before, "tensors on a GPU: the host heap is left as it is"
    assert cpu_heap.configure_cpu_heap(None) == cpu_heap.configure_cpu_heap("system") == before


def test_retain_without_glibc_is_refused_with_the_reason_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_heap, "_glibc", lambda: (None, "the C library is not glibc (no mallopt)"))
    with pytest.raises(RuntimeError, match="needs glibc's mallopt: the C library is not glibc"):
        cpu_heap.configure_cpu_heap("retain")
    assert cpu_heap.configure_cpu_heap("auto", "cpu") == cpu_heap.cpu_heap_in_effect() == "system"
