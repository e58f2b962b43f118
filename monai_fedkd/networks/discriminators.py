"""Site-side discriminators (real site images vs. synthetic ones) and their adversarial losses.

Each site hosts a small patch discriminator trained on its own real inputs against the server's synthetic
inputs; the server's generator receives :func:`realism_loss` of the discriminators' scores on its samples.

* :func:`build_discriminator` returns MONAI's :class:`monai.networks.nets.PatchDiscriminator`, configured small
  for CPU (its forward returns the list of intermediate outputs, the last being the patch logit map);
* :class:`PatchDiscriminatorScore` wraps it so that forward returns only the patch logit map ``(B, 1, *patch)``;
* :class:`MultiScaleDiscriminator` scores the input and 2x/4x average-pooled copies (one map per scale), which
  gives a 3D discriminator a view of global structure at a small cost.

All constructor arguments are JSON-able so these can be built through ``monai_fedkd.networks.build_network``.
Pooling is done by reshaping and averaging (no ``AvgPool`` module, whose CUDA backward is nondeterministic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai.networks.nets import PatchDiscriminator

__all__ = [
    "build_discriminator",
    "patch_output_size",
    "PatchDiscriminatorScore",
    "MultiScaleDiscriminator",
    "discriminator_loss",
    "realism_loss",
    "LOSS_MODES",
]

LOSS_MODES = ("hinge", "bce", "lsgan")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def patch_output_size(
    spatial_size: Sequence[int],
    num_layers_d: int = 2,
    kernel_size: int = 4,
    padding: int = 1,
    last_conv_kernel_size: int | None = None,
) -> list[int]:
    """Spatial size of the patch logit map of :func:`build_discriminator` for an input of ``spatial_size``.

    Sizes <= 0 mean the input is too small for that configuration. For the defaults: 28 -> 5, 48 -> 10, 14 -> 1.
    """
    last = kernel_size if last_conv_kernel_size is None else last_conv_kernel_size
    out = []
    for s in spatial_size:
        s = _conv_out(int(s), kernel_size, 2, padding)  # initial conv
        for layer in range(num_layers_d):
            s = _conv_out(s, kernel_size, 1 if layer == num_layers_d - 1 else 2, padding)
        s = _conv_out(s, last, 1, (last - 1) // 2)
        out.append(s)
    return out


def _normalized_sizes(spatial_size: Sequence[int], num_layers_d: int, kernel_size: int, padding: int) -> list[list[int]]:
    """Spatial sizes after each normalised layer (the ``num_layers_d`` middle layers)."""
    sizes = [_conv_out(int(s), kernel_size, 2, padding) for s in spatial_size]
    result = []
    for layer in range(num_layers_d):
        stride = 1 if layer == num_layers_d - 1 else 2
        sizes = [_conv_out(s, kernel_size, stride, padding) for s in sizes]
        result.append(list(sizes))
    return result


def build_discriminator(
    spatial_dims: int,
    in_channels: int,
    num_layers_d: int = 2,
    channels: int = 16,
    kernel_size: int = 4,
    norm: str | tuple = "INSTANCE",
    dropout: float = 0.0,
    last_conv_kernel_size: int | None = None,
) -> PatchDiscriminator:
    """MONAI's ``PatchDiscriminator``, small for CPU: ``channels`` filters in the first layer (doubled per layer).

    ``norm`` defaults to instance norm (per-sample, so scores do not depend on how real and synthetic samples
    are batched); pass ``"BATCH"`` for MONAI's default. Forward returns a list of intermediate outputs whose last
    element is the patch logit map; :class:`PatchDiscriminatorScore` returns only that map.
    """
    return PatchDiscriminator(
        spatial_dims=int(spatial_dims),
        channels=int(channels),
        in_channels=int(in_channels),
        out_channels=1,
        num_layers_d=int(num_layers_d),
        kernel_size=int(kernel_size),
        norm=norm,
        dropout=dropout,
        last_conv_kernel_size=last_conv_kernel_size,
    )


class PatchDiscriminatorScore(nn.Module):
    """A :func:`build_discriminator` network whose forward returns only the patch logit map ``(B, 1, *patch)``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_layers_d: int = 2,
        channels: int = 16,
        kernel_size: int = 4,
        norm: str | tuple = "INSTANCE",
        dropout: float = 0.0,
        last_conv_kernel_size: int | None = None,
    ) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.num_layers_d = int(num_layers_d)
        self.kernel_size = int(kernel_size)
        self.last_conv_kernel_size = last_conv_kernel_size
        self.net = build_discriminator(
            spatial_dims, in_channels, num_layers_d, channels, kernel_size, norm, dropout, last_conv_kernel_size
        )

    def output_size(self, spatial_size: Sequence[int]) -> list[int]:
        return patch_output_size(spatial_size, self.num_layers_d, self.kernel_size, 1, self.last_conv_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def _avg_pool(x: torch.Tensor, factor: int, spatial_dims: int) -> torch.Tensor:
    """Average-pool by ``factor`` (trailing remainder cropped) with reshape + mean: deterministic backward."""
    if factor == 1:
        return x
    b, c, *size = x.shape
    out = [s // factor for s in size]
    if any(o < 1 for o in out):
        raise ValueError(f"input of spatial size {size} is too small to pool by {factor}")
    x = x[(slice(None), slice(None)) + tuple(slice(0, o * factor) for o in out)]
    shape = [b, c]
    for o in out:
        shape += [o, factor]
    x = x.reshape(shape)
    return x.mean(dim=tuple(3 + 2 * i for i in range(spatial_dims)))


class MultiScaleDiscriminator(nn.Module):
    """Patch discriminators on the input and on 2x, 4x, ... average-pooled copies; forward returns a list of maps.

    Args:
        spatial_dims, in_channels, channels, kernel_size, norm, dropout: as :func:`build_discriminator`.
        num_scales: number of scales (1: input only; 3: input, /2, /4).
        num_layers_d: layers of the discriminator at every scale.
        spatial_size: the input size; when given, a coarse scale whose input is too small for ``num_layers_d``
            layers gets fewer layers (so that every map has at least one patch and normalised layers see more
            than one voxel), e.g. ``[28, 28]`` at /4 (7x7) uses 1 layer. Without it, all scales use
            ``num_layers_d`` and small inputs may fail at the coarse scales.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_scales: int = 3,
        num_layers_d: int = 2,
        channels: int = 16,
        kernel_size: int = 4,
        norm: str | tuple = "INSTANCE",
        dropout: float = 0.0,
        spatial_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        self.spatial_dims = int(spatial_dims)
        self.num_scales = int(num_scales)
        self.layers_per_scale: list[int] = []
        for scale in range(self.num_scales):
            layers = int(num_layers_d)
            if spatial_size is not None:
                factor = 2**scale
                pooled = [int(s) // factor for s in spatial_size]
                while layers >= 0 and not self._fits(pooled, layers, kernel_size):
                    layers -= 1
                if layers < 0:
                    raise ValueError(
                        f"input {list(spatial_size)} pooled by {factor} ({pooled}) is too small for a patch "
                        f"discriminator; use fewer scales (num_scales={num_scales})"
                    )
            self.layers_per_scale.append(layers)
        self.discriminators = nn.ModuleList(
            [
                PatchDiscriminatorScore(spatial_dims, in_channels, layers, channels, kernel_size, norm, dropout)
                for layers in self.layers_per_scale
            ]
        )

    @staticmethod
    def _fits(size: Sequence[int], layers: int, kernel_size: int) -> bool:
        if min(size) < 1 or min(patch_output_size(size, layers, kernel_size)) < 1:
            return False
        return all(math.prod(s) > 1 for s in _normalized_sizes(size, layers, kernel_size, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [d(_avg_pool(x, 2**i, self.spatial_dims)) for i, d in enumerate(self.discriminators)]


def _is_raw_patch_output(items: Sequence) -> bool:
    """``PatchDiscriminator.forward``'s list: feature maps with several channels, then the 1-channel logit map."""
    if len(items) < 2 or not all(isinstance(t, torch.Tensor) and t.ndim >= 3 for t in items):
        return False
    return items[-1].shape[1] == 1 and any(t.shape[1] != 1 for t in items[:-1])


def _as_list(logits: torch.Tensor | Sequence) -> list[torch.Tensor]:
    """Score maps from a tensor, a list of per-scale maps, or raw ``PatchDiscriminator`` output(s).

    A raw ``PatchDiscriminator`` output (the list of intermediate outputs of :func:`build_discriminator`'s
    network) is reduced to its last element, the logit map; a list of such lists to one map per scale.
    """
    if isinstance(logits, torch.Tensor):
        maps = [logits]
    else:
        items = list(logits)
        if not items:
            raise ValueError("empty list of discriminator outputs")
        if _is_raw_patch_output(items):
            maps = [items[-1]]
        else:
            maps = [item[-1] if isinstance(item, (list, tuple)) else item for item in items]
    for m in maps:
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"discriminator output must be tensors, got {type(m).__name__}")
        if m.ndim >= 3 and m.shape[1] != 1:
            raise ValueError(
                f"a patch logit map has shape (B, 1, ...), got {tuple(m.shape)}; pass the last element of "
                "PatchDiscriminator's output (or use PatchDiscriminatorScore)"
            )
    return maps


def _check_mode(mode: str) -> str:
    mode = str(mode).lower()
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    return mode


def discriminator_loss(
    real_logits: torch.Tensor | Sequence[torch.Tensor],
    fake_logits: torch.Tensor | Sequence[torch.Tensor],
    mode: str = "hinge",
) -> torch.Tensor:
    """Loss to train a discriminator: low when real logits are high and fake logits low.

    ``hinge``: ``relu(1 - D(real)).mean() + relu(1 + D(fake)).mean()``; ``bce``: ``softplus(-D(real)).mean() +
    softplus(D(fake)).mean()`` (binary cross-entropy with logits); ``lsgan``: ``(D(real) - 1)^2 + D(fake)^2``.
    Lists of maps (multi-scale) give the mean over scales; the raw list output of :func:`build_discriminator`'s
    network is accepted too (its last element, the logit map, is used).
    """
    mode = _check_mode(mode)
    reals, fakes = _as_list(real_logits), _as_list(fake_logits)
    if len(reals) != len(fakes):
        raise ValueError(f"{len(reals)} real maps but {len(fakes)} fake maps")
    losses = []
    for real, fake in zip(reals, fakes):
        if mode == "hinge":
            losses.append(F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        elif mode == "bce":
            losses.append(F.softplus(-real).mean() + F.softplus(fake).mean())
        else:
            losses.append((real - 1.0).pow(2).mean() + fake.pow(2).mean())
    return torch.stack(losses).mean()


def realism_loss(fake_logits: torch.Tensor | Sequence[torch.Tensor], mode: str = "hinge") -> torch.Tensor:
    """Generator loss from discriminator scores of synthetic inputs: decreases as the fake logits increase.

    ``hinge``: ``-D(fake).mean()``; ``bce``: ``softplus(-D(fake)).mean()`` (non-saturating); ``lsgan``:
    ``(D(fake) - 1)^2`` (decreasing up to 1). Lists of maps (multi-scale) give the mean over scales; the raw list
    output of :func:`build_discriminator`'s network is accepted too (its last element is used).
    """
    mode = _check_mode(mode)
    losses = []
    for fake in _as_list(fake_logits):
        if mode == "hinge":
            losses.append(-fake.mean())
        elif mode == "bce":
            losses.append(F.softplus(-fake).mean())
        else:
            losses.append((fake - 1.0).pow(2).mean())
    return torch.stack(losses).mean()
