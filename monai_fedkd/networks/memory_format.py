"""Memory layout of the networks that the distillation runs many times per step (the student, the site networks).

A 3D convolution network on CPU (oneDNN) runs faster on channels-last tensors (N, D, H, W, C strides): on 2 Intel
Xeon cores a MONAI UNet (16-128 channels) on a batch of four 48³ patches took 210 ms against 241 ms for a forward and
backward pass (1.16x in bfloat16), while a 2D UNet gained 3 % and the AdrenalMNIST3D classifier lost 5 %
(``python -m monai_fedkd.benchmarks.memory_format_step``, docs/performance.md). The values computed are the same up to
float rounding (the order of the sums changes); parameters keep their shapes, so a state dict loads into a network
of either layout.

``"auto"`` picks channels-last only where it was measured to help: 3D networks on CPU. On CUDA the gain depends on
the precision and the cuDNN version, so ``"auto"`` keeps the contiguous layout there; ``"channels_last"`` asks for
it on any device. Each process resolves its own value, so in a federation every site decides for its hardware.
"""

from __future__ import annotations

import torch

__all__ = ["MEMORY_FORMATS", "resolve_memory_format", "to_memory_format"]

MEMORY_FORMATS = ("contiguous", "channels_last", "auto")


def resolve_memory_format(memory_format: str | None, spatial_dims: int, device: torch.device | str) -> str:
    """``"contiguous"`` or ``"channels_last"`` for networks over ``spatial_dims`` spatial axes on ``device``.

    ``None`` means ``"contiguous"`` (a ``monai.bundle run`` command line drops ``--key None``, so both names exist).
    Channels-last exists for 2D (4D tensors) and 3D (5D tensors) only; asking for it with other dims is an error."""
    if memory_format is None:
        return "contiguous"
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS} (or None for 'contiguous'), got {memory_format!r}")
    if memory_format == "auto":
        return "channels_last" if spatial_dims == 3 and torch.device(device).type == "cpu" else "contiguous"
    if memory_format == "channels_last" and spatial_dims not in (2, 3):
        raise ValueError(f"memory_format 'channels_last' needs 2 or 3 spatial dims, got {spatial_dims}")
    return memory_format


def _torch_format(memory_format: str, ndim: int) -> torch.memory_format:
    if memory_format == "contiguous":
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def to_memory_format(value, memory_format: str, spatial_dims: int):
    """A module (its 4D/5D weights) or a tensor of ``spatial_dims`` spatial axes in ``memory_format`` (resolved)."""
    fmt = _torch_format(memory_format, spatial_dims + 2)
    if isinstance(value, torch.nn.Module):
        return value.to(memory_format=fmt)
    if value.ndim != spatial_dims + 2:  # e.g. a classification output (B, C): nothing to lay out
        return value
    return value.contiguous(memory_format=fmt)
