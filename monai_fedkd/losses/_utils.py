"""Small helpers shared by the loss modules (shape checks, reductions, stacking of site outputs)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def check_weight(weight: float) -> float:
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight}")
    return weight


def check_nonnegative_weights(values, name: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """``values`` as a flat, detached tensor; refuses an empty one, a non-finite or negative entry, or all zeros."""
    t = torch.as_tensor(values, dtype=dtype or torch.get_default_dtype(), device=device).detach().reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or float(t.sum()) <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero, got {t.tolist()}")
    return t


def check_logits(x: torch.Tensor, name: str = "logits") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be (batch, classes, *spatial), got shape {tuple(x.shape)}")
    return x


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-sample/voxel values of shape ``(B, *spatial)``: mean or sum over all of them, or keep them."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def stack_sites(site_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Site outputs as one ``(K, B, N, *spatial)`` tensor (a tensor input is taken as already stacked)."""
    if isinstance(site_logits, torch.Tensor):
        stacked = site_logits
    else:
        site_logits = list(site_logits)
        if not site_logits:
            raise ValueError("at least one site's logits are needed")
        shapes = {tuple(t.shape) for t in site_logits}
        if len(shapes) != 1:
            raise ValueError(f"all sites' logits must have the same shape, got {sorted(shapes)}")
        stacked = torch.stack(list(site_logits))
    if stacked.ndim < 3:
        raise ValueError(f"stacked site logits must be (K, B, N, *spatial), got shape {tuple(stacked.shape)}")
    if stacked.shape[0] == 0:
        raise ValueError("at least one site's logits are needed")
    return stacked


def xlogx(p: torch.Tensor) -> torch.Tensor:
    """``p * log(p)`` with ``0 log 0 = 0`` and a finite (zero) gradient at ``p = 0``."""
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))
    return torch.where(positive, p * torch.log(safe), torch.zeros_like(p))
