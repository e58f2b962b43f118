"""How this process's C heap hands large blocks back to the system: released at once, or kept for reuse.

glibc's ``malloc`` serves every block above 32 MB (and, as its threshold adapts, many smaller ones) with a fresh
``mmap`` and returns it to the kernel on ``free``. The next block of the same size then costs a page fault per 4 KiB
page, which the kernel must zero: on a 3D segmentation step, where the server's cross-site terms allocate a dozen
temporaries of 4 sites x 4 patches x 6 classes x 48³ voxels (42 MB each), most of their time went to those faults.
Keeping freed blocks in the heap (no ``mmap`` for large blocks, no trimming of the heap's top) lets the next step
reuse the same pages: on 2 Intel Xeon cores the server's terms of an IXI step took a median 134 ms against 229 ms,
the framework's overhead beyond site compute 15.6 % against 26.4 %, with the site networks, the generator and the
student unchanged and the peak resident memory up to 3 % higher (docs/performance.md, "The C heap").

The cost: memory the process freed is not given back to the system until it exits, so its resident size stays at
its peak, and a block larger than the free ones extends the heap (it settles at a few blocks of each size). That
suits a distillation (one long process whose step repeats the same allocations) and is why ``"auto"`` keeps the
system's behaviour where the tensors do not live in host memory (CUDA).

Only glibc has these settings (``mallopt``); elsewhere (macOS, Windows, musl) ``"auto"`` leaves the heap as it is and
``"retain"`` is refused with the reason. Every process decides for itself: in a federation each site's process
has its own heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

__all__ = ["CPU_HEAPS", "configure_cpu_heap", "cpu_heap_in_effect"]

logger = logging.getLogger(__name__)

CPU_HEAPS = ("system", "retain", "auto")

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest free top (2 GiB) kept before the heap is trimmed

_in_effect = "system"


def _glibc():
    """The process's C library when it is glibc (it has ``mallopt``), else ``None`` with the reason."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError as e:
        return None, f"no C library could be loaded ({e})"
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None, "the C library is not glibc (no mallopt)"
    return libc, ""


def configure_cpu_heap(cpu_heap: str | None = "auto", device: torch.device | str | None = None) -> str:
    """Set how this process's heap treats large freed blocks; returns what is in effect, ``"retain"`` or ``"system"``.

    ``"retain"``: large blocks come from the heap and freed ones stay there for reuse (glibc only; refused elsewhere,
    naming why). ``"system"`` or ``None``: leave the C library's behaviour as it is. ``"auto"``: ``"retain"`` where
    glibc is the C library and ``device`` (the process's compute device) is the CPU or not given, ``"system"``
    otherwise. Called once, early (a bundle's ``initialize``); ``"retain"`` lasts for the life of the process.
    """
    global _in_effect
    if cpu_heap is None:
        cpu_heap = "system"
    if cpu_heap not in CPU_HEAPS:
        raise ValueError(f"cpu_heap must be one of {CPU_HEAPS} (or None for 'system'), got {cpu_heap!r}")
    if cpu_heap == "system":
        return _in_effect
    if cpu_heap == "auto" and device is not None and torch.device(device).type != "cpu":
        return _in_effect
    libc, why_not = _glibc()
    if libc is None:
        if cpu_heap == "retain":
            raise RuntimeError(f"cpu_heap 'retain' needs glibc's mallopt: {why_not}; use 'auto' or 'system'")
        logger.info("cpu_heap 'auto': the heap stays as the C library keeps it (%s)", why_not)
        return _in_effect
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        raise RuntimeError("glibc's mallopt refused the heap settings (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)")
    _in_effect = "retain"
    return _in_effect


def cpu_heap_in_effect() -> str:
    """``"retain"`` once :func:`configure_cpu_heap` set it in this process, else ``"system"``."""
    return _in_effect
