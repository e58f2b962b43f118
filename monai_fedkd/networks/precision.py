"""Mixed-precision compute for the distillation's forward passes (generator, student, site networks).

Only ``bfloat16`` is offered: it keeps float32's exponent range, so no loss scaling is needed on any device, and on
CPUs with AMX/AVX512-BF16 (and on recent GPUs) 3D convolutions run faster (1.1-1.9x per pass on 2 AMX cores, see
docs/performance.md). Parameters, optimizer states, losses and everything that crosses the transport stay float32:
the network outputs are cast back before any loss sees them.

``"auto"`` asks for bfloat16 only where the device computes it natively (a CUDA device with bfloat16 support; a CPU
with AMX or AVX512-BF16) and float32 elsewhere, where emulated bfloat16 would be slower than float32. Each process
resolves it against its own device, so in a federation every site decides for its own hardware.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AUTOCAST_DTYPES", "autocast", "check_autocast_dtype", "native_bfloat16", "resolve_autocast_dtype"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def check_autocast_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is a supported autocast dtype name or ``None`` (full float32); a clear error otherwise."""
    if dtype is None or dtype in AUTOCAST_DTYPES:
        return dtype
    raise ValueError(f"autocast_dtype must be None (float32), 'auto' or one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r} "
                     "(float16 would need loss scaling, which the distillation does not do)")


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (not by emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        # torch exposes the CPU's instruction sets only privately; a torch without these answers "no", i.e. float32
        probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


def resolve_autocast_dtype(dtype: str | None, device: torch.device | str) -> str | None:
    """The autocast dtype to use on ``device``: ``"auto"`` becomes ``"bfloat16"`` where :func:`native_bfloat16`, else
    ``None``; other values are checked by :func:`check_autocast_dtype`."""
    if dtype == "auto":
        return "bfloat16" if native_bfloat16(device) else None
    return check_autocast_dtype(dtype)


def autocast(device: torch.device | str, dtype: str | None):
    """A ``torch.autocast`` context for ``dtype`` on ``device``'s type, or a no-op context for ``None``."""
    if check_autocast_dtype(dtype) is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[dtype])
