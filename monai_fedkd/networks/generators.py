"""Generators that synthesise site-network inputs (2D images or 3D volumes) for data-free distillation.

The server learns a :class:`ConditionalGenerator` that maps a latent code ``z`` (and, for classification
sites, a target class index) to an input the site networks accept: exactly ``(B, out_channels, *spatial_size)``
with values inside the sites' declared ``value_range``.

Design choices (from the prototype's failure modes):

* label conditioning: a learned label embedding is concatenated with (or multiplies) ``z``, so the ensemble's
  cross-entropy to the target label gives the generator a per-sample signal and stops it collapsing;
* the output starts near the sites' mean input intensity (``init_mean`` sets the bias of the last layer) and is
  built by linear upsampling, so the initial samples are smooth volumes around the right intensity;
* no transposed convolutions (checkerboard texture): every block is ``linear upsample x2 -> conv 3 -> norm ->
  LeakyReLU``; convolutions pad by edge replication, so the output has no dark frame;
* every operation has a deterministic backward pass, also on CUDA. On the CPU that holds for PyTorch's own
  ``F.interpolate(..., mode="bilinear"/"trilinear", scale_factor=2, align_corners=False)`` and replication
  padding, which are used there. Their CUDA backward is nondeterministic, so on other devices the linear upsampling
  is a nearest upsample by ``expand``/``reshape`` followed by a fixed ``[1/4, 1/2, 1/4]`` smoothing per axis, and
  edges are replicated by concatenation: the same numbers (to float rounding), about half as fast for the whole 3D
  generator on a CPU (``docs/performance.md``).
  (cuDNN convolutions still need ``torch.backends.cudnn.deterministic = True`` on a GPU; that is the caller's setting.)

All constructor arguments are JSON-able, so the generator can be built from a bundle config through
``monai_fedkd.networks.build_network(name="monai_fedkd.networks.generators.ConditionalGenerator", ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConditionalGenerator", "EdgePadConv", "LayoutGenerator", "LinearUpsample", "default_num_upsamples", "seed_size"]

_NORMS = ("batch", "instance", "group", "none")
_CONDITIONS = ("label", "label_mul", "none")
_MIN_SEED = 4  # default number of upsamples keeps every seed-grid side at least this large (when possible)
_MAX_DEFAULT_UPSAMPLES = 4


def _as_size(spatial_size: int | Sequence[int], spatial_dims: int) -> list[int]:
    if isinstance(spatial_size, int):
        size = [int(spatial_size)] * spatial_dims
    else:
        size = [int(s) for s in spatial_size]
    if len(size) != spatial_dims:
        raise ValueError(f"spatial_size {list(size)} does not have spatial_dims={spatial_dims} entries")
    if any(s < 1 for s in size):
        raise ValueError(f"spatial_size {size} must be positive")
    return size


def default_num_upsamples(spatial_size: Sequence[int]) -> int:
    """Largest number of x2 upsamples (at most 4) that keeps the smallest seed-grid side >= 4.

    ``[28, 28] -> 2`` (seed 7x7), ``[48, 48, 32] -> 3`` (seed 6x6x4), ``[40, 32, 32] -> 3`` (seed 5x4x4).
    """
    smallest = min(int(s) for s in spatial_size)
    if smallest <= _MIN_SEED:
        return 0
    return int(min(_MAX_DEFAULT_UPSAMPLES, math.floor(math.log2(smallest / _MIN_SEED))))


def seed_size(spatial_size: Sequence[int], num_upsamples: int) -> list[int]:
    """Seed grid ``ceil(spatial_size / 2**num_upsamples)``; upsampled it covers ``spatial_size`` (then cropped)."""
    factor = 2**num_upsamples
    return [int(math.ceil(int(s) / factor)) for s in spatial_size]


def _norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    if norm == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1](channels)
    if norm == "instance":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 1](channels, affine=True)
    if norm == "group":
        groups = math.gcd(channels, 8)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def _value_range(value_range) -> tuple[float, float]:
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be [low, high] with high > low, got {list(value_range)}")
    return low, high


@torch.no_grad()
def _init_output_layer(weight: torch.Tensor, bias: torch.Tensor, value_range, init_mean: float) -> None:
    low, high = value_range
    p = (float(init_mean) - low) / (high - low)
    p = min(max(p, 1e-3), 1.0 - 1e-3)
    weight.sub_(weight.mean(dim=tuple(range(1, weight.ndim)), keepdim=True))
    bias.fill_(math.log(p / (1.0 - p)))


def _replicate_pad1(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Pad every spatial axis by one edge-replicated voxel on each side (deterministic backward on every device)."""
    if x.device.type == "cpu":
        return F.pad(x, [1, 1] * spatial_dims, mode="replicate")
    return _replicate_pad1_by_concat(x, spatial_dims)


def _replicate_pad_axis(x: torch.Tensor, axis: int) -> torch.Tensor:
    n = x.shape[axis]
    return torch.cat([x.narrow(axis, 0, 1), x, x.narrow(axis, n - 1, 1)], dim=axis)


def _replicate_pad1_by_concat(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    for axis in range(2, 2 + spatial_dims):
        x = _replicate_pad_axis(x, axis)
    return x


def _linear_upsample2_by_concat(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """x2 linear upsampling (``align_corners=False``) from ops whose CUDA backward is deterministic."""
    b, c, *size = x.shape
    # nearest x2: (B, C, s1, 1, s2, 1, ...) -> expand -> (B, C, 2*s1, 2*s2, ...)
    view_shape = [b, c]
    expand_shape = [b, c]
    for s in size:
        view_shape += [s, 1]
        expand_shape += [s, 2]
    x = x.reshape(view_shape).expand(expand_shape).reshape([b, c] + [2 * s for s in size])
    for axis in range(2, 2 + spatial_dims):
        n, padded = x.shape[axis], _replicate_pad_axis(x, axis)
        x = 0.25 * padded.narrow(axis, 0, n) + 0.5 * x + 0.25 * padded.narrow(axis, 2, n)
    return x


class EdgePadConv(nn.Module):
    """3-wide convolution keeping the size, with edge-replicated borders (no dark frame from zero padding).

    ``padding_mode="replicate"`` would do the same, but its CUDA backward is nondeterministic.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv_type(in_channels, out_channels, kernel_size=3, padding=0, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_replicate_pad1(x, self.spatial_dims))


def _conv(spatial_dims: int, in_channels: int, out_channels: int, bias: bool) -> nn.Module:
    return EdgePadConv(spatial_dims, in_channels, out_channels, bias=bias)


class LinearUpsample(nn.Module):
    """x2 (bi/tri)linear upsampling (``align_corners=False``) with a deterministic backward pass.

    On the CPU this is ``F.interpolate``. On other devices: nearest x2 upsampling by ``expand``/``reshape``, then
    the fixed kernel ``[1/4, 1/2, 1/4]`` along every spatial axis with the border replicated by concatenation; the
    same numbers without ``F.interpolate``'s nondeterministic CUDA backward.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # deterministic there, and one fused kernel
            return F.interpolate(x, scale_factor=2, mode=("linear", "bilinear", "trilinear")[self.spatial_dims - 1], align_corners=False)
        return _linear_upsample2_by_concat(x, self.spatial_dims)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, scale_factor=2, mode=linear, align_corners=False"


class _UpBlock(nn.Sequential):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(
            LinearUpsample(spatial_dims),
            _conv(spatial_dims, in_channels, out_channels, bias=norm == "none"),
            _norm_layer(norm, spatial_dims, out_channels),
            nn.LeakyReLU(0.2),
        )


class ConditionalGenerator(nn.Module):
    """Latent code (+ target label) -> synthetic site input ``(B, out_channels, *spatial_size)`` in ``value_range``.

    Args:
        spatial_dims: 2 for images, 3 for volumes (1 also works).
        out_channels: channels of the sites' input.
        spatial_size: the sites' input size, e.g. ``[28, 28]``, ``[28, 28, 28]``, ``[48, 48, 32]``; any positive
            sizes (non-power-of-two, anisotropic): the seed grid is ``ceil(size / 2**num_upsamples)`` and the
            upsampled features are centre-cropped to exactly ``spatial_size``.
        num_classes: number of target classes for label conditioning (classification sites); ``None``: no labels.
        latent_dim: size of ``z``.
        base_channels: feature channels at full resolution; coarser levels have up to 4x as many.
        num_upsamples: number of ``upsample -> conv -> norm -> LeakyReLU`` blocks; default
            :func:`default_num_upsamples` (smallest seed side >= 4, at most 4 blocks).
        value_range: ``[low, high]`` of the sites' network input; the output is ``low + (high-low)*sigmoid(.)``.
        init_mean: expected input intensity (e.g. the sites' mean); the last layer's bias is set so that the
            initial output mean is near it. ``None``: the middle of ``value_range``.
        norm: ``"batch"`` (default), ``"instance"``, ``"group"`` or ``"none"``.
        condition: how labels enter: ``"label"`` (learned embedding concatenated with ``z``), ``"label_mul"``
            (``z`` multiplied by a learned embedding) or ``"none"`` (labels ignored). Only used with
            ``num_classes``.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        spatial_size: int | Sequence[int],
        num_classes: int | None = None,
        latent_dim: int = 64,
        base_channels: int = 32,
        num_upsamples: int | None = None,
        value_range: Sequence[float] = (0.0, 1.0),
        init_mean: float | None = None,
        norm: str = "batch",
        condition: str = "label",
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        norm = "none" if norm is None else str(norm).lower()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        condition = "none" if condition is None else str(condition).lower()
        if condition not in _CONDITIONS:
            raise ValueError(f"condition must be one of {_CONDITIONS}, got {condition!r}")
        if out_channels < 1 or latent_dim < 1 or base_channels < 1:
            raise ValueError("out_channels, latent_dim and base_channels must be positive")
        low, high = _value_range(value_range)
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")

        self.spatial_dims = int(spatial_dims)
        self.out_channels = int(out_channels)
        self.spatial_size = _as_size(spatial_size, self.spatial_dims)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.latent_dim = int(latent_dim)
        self.value_range = (low, high)
        self.norm = norm
        self.condition = condition if self.num_classes is not None else "none"
        self.num_upsamples = default_num_upsamples(self.spatial_size) if num_upsamples is None else int(num_upsamples)
        if self.num_upsamples < 0:
            raise ValueError(f"num_upsamples must be >= 0, got {num_upsamples}")
        self.seed_size = seed_size(self.spatial_size, self.num_upsamples)

        # channels per level: level 0 is the seed grid, level num_upsamples is full resolution
        channels = [int(base_channels) * min(2 ** (self.num_upsamples - i), 4) for i in range(self.num_upsamples + 1)]
        self.channels = channels

        if self.condition == "none":
            self.embedding = None
            in_features = self.latent_dim
        else:
            self.embedding = nn.Embedding(self.num_classes, self.latent_dim)
            nn.init.normal_(self.embedding.weight, 0.0, 1.0)
            in_features = 2 * self.latent_dim if self.condition == "label" else self.latent_dim

        self.fc = nn.Linear(in_features, channels[0] * math.prod(self.seed_size), bias=norm == "none")
        self.seed_norm = _norm_layer(norm, self.spatial_dims, channels[0])
        self.seed_act = nn.LeakyReLU(0.2)
        self.blocks = nn.Sequential(
            *[_UpBlock(self.spatial_dims, channels[i], channels[i + 1], norm) for i in range(self.num_upsamples)]
        )
        self.final = _conv(self.spatial_dims, channels[-1], self.out_channels, bias=True)

        if init_mean is None:
            init_mean = 0.5 * (low + high)
        self.init_mean = float(init_mean)
        if not low <= self.init_mean <= high:
            raise ValueError(f"init_mean {init_mean} is outside value_range {list(value_range)}")
        self.reset_output_layer(self.init_mean)

    @torch.no_grad()
    def reset_output_layer(self, init_mean: float) -> None:
        """Set the last conv so that the output mean starts near ``init_mean`` (a value in ``value_range``).

        The bias is the logit of ``init_mean``'s relative position in ``value_range``; the weights of each output
        channel are made zero-mean so that the (positive-mean) LeakyReLU features do not shift that mean.
        """
        _init_output_layer(self.final.weight, self.final.bias, self.value_range, init_mean)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        for axis, target in enumerate(self.spatial_size, start=2):
            excess = x.shape[axis] - target
            if excess > 0:
                x = x.narrow(axis, excess // 2, target)
        return x

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``z``: ``(B, latent_dim)``; ``labels``: ``(B,)`` class indices or ``(B, num_classes)`` float class
        distributions (a soft target embeds as the same mixture of class embeddings); required when conditioning."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        h = z
        if self.embedding is not None:
            if labels is None:
                raise ValueError(f"this generator is conditioned on labels (num_classes={self.num_classes}); pass labels")
            if labels.shape[0] != z.shape[0]:
                raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {z.shape[0]}")
            if labels.ndim == 2 and labels.is_floating_point():
                # soft targets (rows sum to one): the matching mixture of class embeddings
                if labels.shape[1] != self.num_classes:
                    raise ValueError(f"soft labels must have shape (B, {self.num_classes}), got {tuple(labels.shape)}")
                emb = labels.to(self.embedding.weight.dtype) @ self.embedding.weight
            else:
                emb = self.embedding(labels.reshape(-1).long())
            h = torch.cat([z, emb], dim=1) if self.condition == "label" else z * emb
        h = self.fc(h).reshape([z.shape[0], self.channels[0], *self.seed_size])
        h = self.seed_act(self.seed_norm(h))
        h = self.blocks(h)
        h = self._crop(h)
        low, high = self.value_range
        return low + (high - low) * torch.sigmoid(self.final(h))

    def sample_inputs(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw ``z ~ N(0, 1)`` ``(B, latent_dim)`` and uniform target labels ``(B,)`` (``None`` without classes).

        Deterministic given the state of ``generator`` (drawn on the generator's device, then moved to ``device``,
        default the module's device).
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if device is None:
            device = next(self.parameters()).device
        z = torch.randn(int(batch_size), self.latent_dim, generator=generator, device=gen_device)
        labels = None
        if self.num_classes is not None:
            labels = torch.randint(0, self.num_classes, (int(batch_size),), generator=generator, device=gen_device)
            labels = labels.to(device)
        return z.to(device), labels


class LayoutGenerator(nn.Module):
    """Label layout + latent code -> synthetic segmentation-site input in ``value_range`` (two-stage synthesis:
    the server samples a layout, :class:`~monai_fedkd.server.layouts.LayoutSampler`, this network paints it).

    The layout enters one-hot, with ``latent_dim`` channels holding the latent code (the same at every voxel: the
    sample's global appearance), ``noise_channels`` of voxel-wise Gaussian noise (texture; drawn from torch's
    global generator, which the distillation engine seeds per step) and the intensity prior: the sites' mean image,
    deformed with the layout (``prior``; a constant ``init_mean`` without one). The output starts at the prior: the
    network's last layer adds to the prior's logit, its weights zero-mean and its bias zero. The body is MONAI's ``BasicUNet`` with
    non-trainable (linear) upsampling, so no transposed convolution leaves a checkerboard, and instance norm.

    Args:
        spatial_dims / out_channels / spatial_size / value_range / init_mean: as :class:`ConditionalGenerator`.
        num_classes: classes of the layout (the segmentation classes, background included).
        latent_dim: size of ``z``.
        noise_channels: voxel-wise noise channels.
        features: ``BasicUNet`` features (six numbers).
    """

    layout_conditioned = True

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        spatial_size: int | Sequence[int],
        num_classes: int,
        latent_dim: int = 8,
        noise_channels: int = 2,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        value_range: Sequence[float] = (0.0, 1.0),
        init_mean: float | None = None,
    ) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(num_classes) < 2:
            raise ValueError(f"a layout needs at least 2 classes (background and one structure), got {num_classes}")
        if latent_dim < 0 or noise_channels < 0 or out_channels < 1:
            raise ValueError("latent_dim and noise_channels must be >= 0, out_channels >= 1")
        low, high = _value_range(value_range)
        self.spatial_dims, self.out_channels = int(spatial_dims), int(out_channels)
        self.spatial_size = _as_size(spatial_size, self.spatial_dims)
        self.num_classes, self.latent_dim, self.noise_channels = int(num_classes), int(latent_dim), int(noise_channels)
        self.value_range = (low, high)
        self.body = BasicUNet(spatial_dims=self.spatial_dims, in_channels=self.num_classes + self.latent_dim + self.noise_channels + 1,
                              out_channels=self.out_channels, features=tuple(int(f) for f in features), upsample="nontrainable")
        self.init_mean = 0.5 * (low + high) if init_mean is None else float(init_mean)
        if not low <= self.init_mean <= high:
            raise ValueError(f"init_mean {init_mean} is outside value_range {list(value_range)}")
        conv = self.body.final_conv
        _init_output_layer(conv.weight, conv.bias, self.value_range, 0.5 * (low + high))  # bias 0: the prior sets the level

    def forward(self, z: torch.Tensor, layout: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """``z``: ``(B, latent_dim)``; ``layout``: ``(B, *spatial_size)`` (or ``(B, 1, *spatial_size)``) class indices;
        ``prior``: ``(B, 1, *spatial_size)`` intensities in ``value_range`` (default: ``init_mean`` everywhere)."""
        if layout is None:
            raise ValueError("LayoutGenerator needs a label layout (B, *spatial_size)")
        if layout.ndim == self.spatial_dims + 2 and layout.shape[1] == 1:
            layout = layout[:, 0]
        if layout.ndim != self.spatial_dims + 1 or list(layout.shape[1:]) != self.spatial_size:
            raise ValueError(f"layout must have shape (B, {self.spatial_size}), got {tuple(layout.shape)}")
        if z.ndim != 2 or z.shape != (layout.shape[0], self.latent_dim):
            raise ValueError(f"z must have shape ({layout.shape[0]}, {self.latent_dim}), got {tuple(z.shape)}")
        if layout.min() < 0 or layout.max() >= self.num_classes:
            raise ValueError(f"layout values must be in [0, {self.num_classes}), got {int(layout.min())}..{int(layout.max())}")
        onehot = nn.functional.one_hot(layout.long(), self.num_classes).movedim(-1, 1).to(z.dtype)
        low, high = self.value_range
        if prior is None:
            prior = torch.full((layout.shape[0], 1, *self.spatial_size), self.init_mean, device=z.device, dtype=z.dtype)
        if tuple(prior.shape) != (layout.shape[0], 1, *self.spatial_size):
            raise ValueError(f"prior must have shape ({layout.shape[0]}, 1, {self.spatial_size}), got {tuple(prior.shape)}")
        rel = ((prior.to(z.dtype) - low) / (high - low)).clamp(1e-3, 1 - 1e-3)
        parts = [onehot, rel]
        if self.latent_dim:
            parts.append(z.view(*z.shape, *[1] * self.spatial_dims).expand(-1, -1, *self.spatial_size))
        if self.noise_channels:
            parts.append(torch.randn(layout.shape[0], self.noise_channels, *self.spatial_size, device=z.device, dtype=z.dtype))
        h = torch.cat(parts, dim=1)
        # BasicUNet halves four times: pad every axis to a multiple of 16, and at least 32 so that the deepest
        # instance norm sees more than one voxel (few-slice or small volumes), then crop back
        padded = [max(32, -(-s // 16) * 16) for s in self.spatial_size]
        pad = []
        for s, t in zip(reversed(self.spatial_size), reversed(padded)):
            pad += [(t - s) // 2, t - s - (t - s) // 2]
        if any(pad):
            h = nn.functional.pad(h, pad, mode="replicate")
        out = self.body(h)
        if any(pad):
            out = out[(slice(None), slice(None), *[slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(self.spatial_size, padded)])]
        return low + (high - low) * torch.sigmoid(torch.logit(rel) + out)
