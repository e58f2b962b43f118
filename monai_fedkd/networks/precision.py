"""Mixed-precision compute for the distillation's forward passes (generator, student, site networks).

Only ``bfloat16`` is offered: it keeps float32's exponent range, so no loss scaling is needed on any device, and on
CPUs with AMX/AVX512-BF16 (and on recent GPUs) 3D convolutions run faster (1.1-1.9x per pass on 2 AMX cores, see
docs/performance.md). Parameters, optimizer states, losses and everything that crosses the transport stay float32:
the network outputs are cast back before any loss sees them.

``"auto"`` asks for bfloat16 only where the device computes it natively (a CUDA device with bfloat16 support; a CPU
with AMX or AVX512-BF16) and float32 elsewhere, where emulated bfloat16 would be slower than float32. Native is not
enough: torch 2.13's CPU kernels on an AMD EPYC with AVX512-BF16 (no AMX) return wrong weight gradients for a 3x3x3
convolution over a 2x2x2 input (relative error near 1, sometimes inf or NaN), the deepest level of the layout
generator, which then diverges within two steps. So ``"auto"`` also checks, once per process and device, that small
convolutions' outputs and gradients in bfloat16 agree with float32 (:func:`bfloat16_convolutions_agree`). Each process
resolves it against its own device, so in a federation every site decides for its own hardware.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["AUTOCAST_DTYPES", "autocast", "bfloat16_convolutions_agree", "check_autocast_dtype", "native_bfloat16", "resolve_autocast_dtype"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def check_autocast_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is a supported autocast dtype name, ``None`` for full float32 (``None`` or ``"float32"``: a
    ``monai.bundle run`` command line drops ``--key None`` overrides, so float32 needs a name there); a clear error
    otherwise."""
    if dtype is None or dtype == "float32":
        return None
    if dtype in AUTOCAST_DTYPES:
        return dtype
    raise ValueError(f"autocast_dtype must be None or 'float32' (no autocast), 'auto' or one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r} "
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


# (spatial dims, spatial size): the small inputs the networks' deepest levels see, the 3D 2x2x2 case among them
_PROBE_SHAPES = ((3, 2), (3, 3), (3, 4), (2, 2), (2, 4))


@functools.lru_cache(maxsize=None)
def _probe(device: str, tolerance: float) -> tuple[bool, str]:
    with torch.random.fork_rng(devices=[]):  # the layers' initialisation must not move the run's seeded global stream
        return _probe_convolutions(device, tolerance)


def _probe_convolutions(device: str, tolerance: float) -> tuple[bool, str]:
    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for dims, size in _PROBE_SHAPES:
        conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(16, 32, 3, padding=1).to(device)
        x = torch.randn(2, 16, *[size] * dims, generator=rng).to(device).requires_grad_(True)
        results = []
        for dtype in (None, "bfloat16"):
            conv.zero_grad(set_to_none=True)
            x.grad = None
            with autocast(device, dtype):
                y = conv(x)
            y = y.float()
            y.backward(torch.ones_like(y) + torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
            results.append((y.detach(), conv.weight.grad, x.grad))
        for what, ref, low in zip(("output", "weight gradient", "input gradient"), *results):
            err = float((low.float() - ref).norm() / ref.norm().clamp_min(1e-12))
            if not err <= tolerance:  # also catches NaN
                reason = f"{dims}D convolution over {[size] * dims}: bfloat16 {what} off by {err:.3g} (relative)"
                logger.warning("bfloat16 on %s disagrees with float32 (%s): 'auto' precision stays float32", device, reason)
                return False, reason
    return True, ""


def bfloat16_convolutions_agree(device: torch.device | str, tolerance: float = 0.05) -> bool:
    """Whether small 2D/3D convolutions under bfloat16 autocast on ``device`` give outputs, weight gradients and input
    gradients within ``tolerance`` (relative) of float32 (bfloat16 rounding alone gives about 0.003). Cached per device."""
    return _probe(str(torch.device(device)), float(tolerance))[0]


def resolve_autocast_dtype(dtype: str | None, device: torch.device | str) -> str | None:
    """The autocast dtype to use on ``device``: ``"auto"`` becomes ``"bfloat16"`` where :func:`native_bfloat16` and
    :func:`bfloat16_convolutions_agree`, else ``None``; other values are checked by :func:`check_autocast_dtype`."""
    if dtype == "auto":
        return "bfloat16" if native_bfloat16(device) and bfloat16_convolutions_agree(device) else None
    dtype = check_autocast_dtype(dtype)
    if dtype == "bfloat16":
        bfloat16_convolutions_agree(device)  # an explicit choice stands; where the check fails, its warning says why
    return dtype


def autocast(device: torch.device | str, dtype: str | None):
    """A ``torch.autocast`` context for ``dtype`` on ``device``'s type, or a no-op context for ``None``."""
    dtype = check_autocast_dtype(dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[dtype])
