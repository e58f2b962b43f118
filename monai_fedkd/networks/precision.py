"""Mixed-precision compute for the distillation's forward passes (generator, student, site networks).

Only ``bfloat16`` is offered: it keeps float32's exponent range, so no loss scaling is needed on any device, and on
CPUs with AMX/AVX512-BF16 (and on recent GPUs) 3D convolutions run several times faster. Parameters, optimizer
states, losses and everything that crosses the transport stay float32: the network outputs are cast back before any
loss sees them.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AUTOCAST_DTYPES", "autocast", "check_autocast_dtype"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def check_autocast_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is a supported autocast dtype name or ``None`` (full float32); a clear error otherwise."""
    if dtype is None or dtype in AUTOCAST_DTYPES:
        return dtype
    raise ValueError(f"autocast_dtype must be None (float32) or one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r} "
                     "(float16 would need loss scaling, which the distillation does not do)")


def autocast(device: torch.device | str, dtype: str | None):
    """A ``torch.autocast`` context for ``dtype`` on ``device``'s type, or a no-op context for ``None``."""
    if check_autocast_dtype(dtype) is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[dtype])
