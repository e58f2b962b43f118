"""Priors on the synthetic inputs ``x``: total variation, BatchNorm statistics matching, batch diversity and the
sites' intensity distribution per class (layout-conditioned segmentation)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._utils import check_reduction, check_weight

__all__ = ["TotalVariationLoss", "DiversityLoss", "BatchNormStatisticsLoss", "ClassIntensityLoss", "ClassGradientLoss", "neighbour_differences", "bn_statistics_loss", "has_batchnorm"]


class TotalVariationLoss(nn.Module):
    """Anisotropic total variation of images ``x`` of shape ``(B, C, *spatial)`` (2D or 3D, any ``ndim >= 3``).

    Value: ``weight * sum_d mean |x[..., i+1 along d] - x[..., i along d]|`` over the spatial axes ``d``
    (the mean absolute difference between neighbours along each axis, summed over axes). ``>= 0``; zero for
    a constant image. Penalises high-frequency noise in the generator's images; differentiable w.r.t. ``x``.

    Args:
        weight: scale of the returned value.
        reduction: ``"mean"`` (default, as above), ``"sum"`` (sum of absolute differences) or ``"none"``
            (``(B,)``: the per-image value, i.e. each axis' mean over that image's channels and positions).
    """

    def __init__(self, weight: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.weight = check_weight(weight)
        self.reduction = check_reduction(reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"x must be (B, C, *spatial) with at least one spatial axis, got shape {tuple(x.shape)}")
        total = x.new_zeros(x.shape[0]) if self.reduction == "none" else x.new_zeros(())
        for dim in range(2, x.ndim):
            if x.shape[dim] < 2:
                continue
            diff = (x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)).abs()
            if self.reduction == "mean":
                total = total + diff.mean()
            elif self.reduction == "sum":
                total = total + diff.sum()
            else:
                total = total + diff.flatten(1).mean(1)
        return self.weight * total


class DiversityLoss(nn.Module):
    """Mode-seeking diversity term: different latent codes of the same class must give different inputs.

    A conditional generator tends to collapse every sample of a class onto one input the sites call that class
    confidently; the student then sees one point per class. Following the mode-seeking idea (Mao et al.,
    CVPR 2019), for every pair ``(i, j)`` of samples with the same ``labels`` (all pairs when ``labels`` is
    None) the value is ``-weight * mean_pairs(d_x(i, j) / d_z(i, j))`` with ``d_x`` the mean absolute difference
    of the two inputs and ``d_z`` that of their latent codes. It is ``<= 0``, zero for a batch of identical
    inputs, and bounded below because the generator's output range is bounded; its gradient w.r.t. ``x`` is
    finite (subgradient 0 where two inputs coincide). Returns zero when no pair exists.

    Args:
        weight: scale of the returned value.
        eps: added to ``d_z`` (two identical latent codes would otherwise divide by zero).
    """

    def __init__(self, weight: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = check_weight(weight)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but z has {z.shape[0]}")
        n = x.shape[0]
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        if labels is not None:
            same = labels[i] == labels[j]
            i, j = i[same], j[same]
        if i.numel() == 0:
            return x.new_zeros(())
        # index_select, not x[i]: the backward of advanced indexing with repeated indices adds with atomics on
        # several CPU threads, in an order that changes from run to run (the distillation would not repeat)
        d_x = (x.index_select(0, i) - x.index_select(0, j)).abs().flatten(1).mean(1)
        d_z = (z.index_select(0, i) - z.index_select(0, j)).abs().flatten(1).mean(1).detach()
        return -self.weight * (d_x / (d_z + self.eps)).mean()


def has_batchnorm(network: nn.Module) -> bool:
    """True when ``network`` contains a BatchNorm layer (any ``torch.nn.modules.batchnorm._BatchNorm``).

    MONAI's ``UNet`` with its default instance norm has none; the BatchNorm statistics prior applies only
    to networks for which this is True.
    """
    return any(isinstance(m, _BatchNorm) for m in network.modules())


class BatchNormStatisticsLoss(nn.Module):
    """BatchNorm statistics prior (DeepInversion-style) for synthetic inputs.

    For every ``_BatchNorm`` layer ``l`` with running statistics in the attached network(s), the layer's input
    ``h`` during a forward pass gives the batch mean ``mu = mean(h)`` and (biased) variance
    ``var = var(h, unbiased=False)`` per channel, over dim 0 and the spatial dims. The value is
    ``weight * sum_l (||mu - running_mean||_2 + ||var - running_var||_2)``: ``>= 0``, zero when the synthetic
    batch reproduces the stored statistics, differentiable w.r.t. ``x`` (running statistics are constants).

    Usage::

        bn_loss = BatchNormStatisticsLoss(weight=0.1)
        if has_batchnorm(net):
            bn_loss.attach(net)   # forward hooks; once
        net.eval()                # keep the running statistics unchanged by synthetic batches
        logits = net(x)           # the hooks record each BN layer's term
        loss = bn_loss()          # weight * sum of the recorded terms; clears the record

    The hooks record on every forward pass of the attached network (in train or eval mode; call
    :meth:`clear` to drop records, e.g. after a ``torch.no_grad`` evaluation pass). ``forward`` returns
    ``None`` when nothing was recorded (no BatchNorm layer, or no forward pass since the last call): the caller
    checks :func:`has_batchnorm` and must not add this term for networks without BatchNorm.
    Layers with ``track_running_stats=False`` are skipped. :meth:`detach` removes the hooks.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = check_weight(weight)
        self._handles: list = []
        self._terms: list[torch.Tensor] = []

    def attach(self, network: nn.Module) -> int:
        """Register forward hooks on ``network``'s BatchNorm layers; returns how many layers were hooked."""
        n = 0
        for module in network.modules():
            if isinstance(module, _BatchNorm) and module.running_mean is not None and module.running_var is not None:
                self._handles.append(module.register_forward_hook(self._hook))
                n += 1
        if n == 0:
            warnings.warn("BatchNormStatisticsLoss.attach: the network has no BatchNorm layer with running statistics")
        return n

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach` and drop the recorded terms."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Drop the recorded terms (e.g. before a forward pass whose statistics should count)."""
        self._terms = []

    reset = clear  # alias

    def value(self) -> torch.Tensor | None:
        """Same as calling the module: ``weight *`` the sum of the recorded terms (``None`` if none); clears them."""
        return self.forward()

    def _hook(self, module: _BatchNorm, inputs, output) -> None:
        h = inputs[0].float()  # statistics in float32 also when the forward pass runs under bfloat16 autocast
        dims = [0, *range(2, h.ndim)]
        mean = h.mean(dim=dims)
        var = h.var(dim=dims, unbiased=False)
        running_mean = module.running_mean.detach().to(h.dtype)
        running_var = module.running_var.detach().to(h.dtype)
        self._terms.append(torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var))

    def forward(self) -> torch.Tensor | None:
        if not self._terms:
            return None
        value = torch.stack(self._terms).sum()
        self._terms = []
        return self.weight * value


def bn_statistics_loss(network: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """One-shot BatchNorm statistics prior of ``network`` on inputs ``x`` (unweighted; see
    :class:`BatchNormStatisticsLoss`). Runs ``network(x)`` once with temporary hooks (the output is discarded;
    use the class to share the forward pass with the other terms). Returns ``None`` for networks without
    BatchNorm. The network's mode is not changed: put it in ``eval()`` to keep its running statistics.
    """
    if not has_batchnorm(network):
        return None
    loss = BatchNormStatisticsLoss(weight=1.0)
    if loss.attach(network) == 0:
        return None
    try:
        network(x)
        return loss()
    finally:
        loss.detach()


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``fp(xp)`` read at ``x`` (``xp`` increasing), constant beyond its ends (``numpy.interp``)."""
    hi = torch.searchsorted(xp, x.clamp(xp[0], xp[-1])).clamp(1, len(xp) - 1)
    lo = hi - 1
    t = ((x - xp[lo]) / (xp[hi] - xp[lo]).clamp_min(1e-12)).clamp(0, 1)
    return fp[lo] + t * (fp[hi] - fp[lo])


def _layout_of(x: torch.Tensor, layout) -> torch.Tensor:
    """``layout`` as ``(B, *spatial)`` class indices for ``x`` ``(B, C, *spatial)`` (a channel axis of one is dropped)."""
    layout = torch.as_tensor(layout, device=x.device)
    if layout.ndim == x.ndim:
        layout = layout[:, 0]
    if tuple(layout.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"layout must be {(x.shape[0], *x.shape[2:])}, got {tuple(layout.shape)}")
    return layout


class ClassIntensityLoss(nn.Module):
    """1D Wasserstein-1 distance, per channel and layout class, between the synthetic intensities and the sites'.

    ``forward(x, layout)``: ``x`` ``(B, channels, *spatial)``, ``layout`` ``(B, *spatial)`` class indices. For every
    channel ``h`` and class ``c`` with at least ``min_voxels`` voxels in the batch, the voxels of ``x[:, h]`` where the
    layout is ``c`` are sorted and compared, rank by rank, with the target quantile function (``quantiles[h, c]`` at
    ``levels``, linearly interpolated, constant beyond the outermost levels): ``mean |sorted_i - Q((i + 0.5) / n)|``,
    the optimal-transport cost of moving the batch's histogram onto the target's. The value is the mean over those
    (channel, class) pairs, times ``weight``; ``0`` when none has enough voxels, or the batch follows the target.

    Every voxel of a class gets a gradient (not only those at the published levels), so the term pulls the whole
    intensity distribution of each structure towards what the sites' data show: a generator that paints a bright
    halo the site networks respond to, or stripes, pays for the intensities no real structure has.

    Args:
        levels: ``(L,)`` increasing probabilities in ``[0, 1]``.
        quantiles: ``(channels, classes, L)`` target quantiles; a row of NaN (a class no site reported) is skipped.
        weight: scale of the returned value.
        min_voxels: fewer voxels of a class in the batch (or sample) than this say too little about its distribution.
        per_sample: compare each sample's intensities of a class with the target, not the batch's pooled ones (the
            mean over samples and pairs): a batch in which one sample paints a structure too bright and another too
            dark matches the target pooled, but neither sample looks like a scan.
    """

    def __init__(self, levels, quantiles, weight: float = 1.0, min_voxels: int = 16, per_sample: bool = False) -> None:
        super().__init__()
        self.weight = check_weight(weight)
        levels, quantiles = torch.as_tensor(levels, dtype=torch.float32), torch.as_tensor(quantiles, dtype=torch.float32)
        if levels.ndim != 1 or len(levels) < 2 or not bool((levels[1:] > levels[:-1]).all()) or levels.min() < 0 or levels.max() > 1:
            raise ValueError(f"levels must be at least two increasing probabilities in [0, 1], got {levels.tolist()}")
        if quantiles.ndim != 3 or quantiles.shape[-1] != len(levels):
            raise ValueError(f"quantiles must be (channels, classes, {len(levels)}), got {tuple(quantiles.shape)}")
        known = torch.isfinite(quantiles).all(-1)
        if bool((quantiles[known][:, 1:] < quantiles[known][:, :-1]).any()):
            raise ValueError("quantiles must not decrease along the levels")
        self.register_buffer("levels", levels)
        self.register_buffer("quantiles", quantiles)
        self.min_voxels = int(min_voxels)
        self.per_sample = bool(per_sample)

    def forward(self, x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        channels, classes = self.quantiles.shape[:2]
        if x.ndim < 3 or x.shape[1] != channels:
            raise ValueError(f"x must be (B, {channels}, *spatial), got {tuple(x.shape)}")
        layout = _layout_of(x, layout)
        levels, quantiles = self.levels.to(x), self.quantiles.to(x)
        groups = [(x[b:b + 1], layout[b:b + 1]) for b in range(x.shape[0])] if self.per_sample else [(x, layout)]
        terms = []
        for xs, ls in groups:
            for c in range(classes):
                mask = ls == c
                n = int(mask.sum())
                if n < self.min_voxels:
                    continue
                ranks = (torch.arange(n, device=x.device, dtype=x.dtype) + 0.5) / n
                for h in range(channels):
                    if not bool(torch.isfinite(quantiles[h, c]).all()):
                        continue
                    values = xs[:, h][mask].sort().values
                    terms.append((values - _interpolate(ranks, levels, quantiles[h, c])).abs().mean())
        if not terms:
            return x.new_zeros(())
        return self.weight * torch.stack(terms).mean()


def neighbour_differences(x: torch.Tensor, layout: torch.Tensor, scale: int = 1) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per spatial axis, ``(|x[i + 1] - x[i]|, layout[i])`` of ``x`` ``(B, C, *spatial)`` averaged over blocks of
    ``scale`` voxels per axis (an axis shorter than ``2 * scale`` is not pooled), with ``layout`` ``(B, *spatial)``
    read at each block's first voxel and at each pair's first block; ``None`` for an axis of fewer than two blocks.
    The site computes its published statistics and the server its loss with this one function."""
    dims = x.ndim - 2
    kernel = [int(scale) if n >= 2 * int(scale) else 1 for n in x.shape[2:]]
    if any(k > 1 for k in kernel):
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        x = pool(x, kernel)
        layout = layout[(slice(None), *[slice(0, n * k, k) for n, k in zip(x.shape[2:], kernel)])]
    out = []
    for d in range(dims):
        n = x.shape[d + 2]
        if n < 2:
            out.append(None)
            continue
        out.append(((x.narrow(d + 2, 1, n - 1) - x.narrow(d + 2, 0, n - 1)).abs(), layout.narrow(d + 1, 0, n - 1)))
    return out


class ClassGradientLoss(nn.Module):
    """:class:`ClassIntensityLoss` on the absolute differences between neighbouring voxels, per spatial axis and scale.

    ``forward(x, layout)``: at every scale ``s`` and along every spatial axis ``d``, the differences
    :func:`neighbour_differences` gives are compared, per channel and by the layout class of each pair's first voxel,
    with the target quantile function ``quantiles[s, d]``; the value is the mean over scales and axes, times
    ``weight``. An axis with fewer than two blocks is left out.

    The class intensity term fixes what intensities each structure has, not how they vary: a smooth blob and a patch
    of stripes can both match it. This term holds each structure's local contrast (edges, texture) to the sites' per
    axis, so stripes along one axis and featureless blobs both pay. The coarser scales keep voxel noise from passing
    for contrast: averaging blocks of noise cancels it, while real edges survive.

    Args:
        levels: ``(L,)`` increasing probabilities in ``[0, 1]``.
        quantiles: ``(scales, spatial_dims, channels, classes, L)`` target quantiles of the absolute differences.
        scales: the block size of each scale (``1``: voxels).
        weight / min_voxels / per_sample: as :class:`ClassIntensityLoss`.
    """

    def __init__(self, levels, quantiles, scales=(1,), weight: float = 1.0, min_voxels: int = 16, per_sample: bool = False) -> None:
        super().__init__()
        self.weight = check_weight(weight)
        quantiles = torch.as_tensor(quantiles, dtype=torch.float32)
        self.scales = [int(v) for v in scales]
        if quantiles.ndim != 5 or quantiles.shape[0] != len(self.scales) or quantiles.shape[1] not in (1, 2, 3):
            raise ValueError(f"quantiles must be (scales {len(self.scales)}, spatial_dims, channels, classes, L), got {tuple(quantiles.shape)}")
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be block sizes >= 1, got {self.scales}")
        known = torch.isfinite(quantiles)
        if bool((quantiles[known] < 0).any()):
            raise ValueError("quantiles of absolute differences must not be negative")
        self.dims = quantiles.shape[1]
        self.terms = nn.ModuleList(ClassIntensityLoss(levels, q, 1.0, min_voxels, per_sample) for per_scale in quantiles for q in per_scale)

    def forward(self, x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dims + 2:
            raise ValueError(f"x must be (B, channels, {self.dims} spatial dims), got {tuple(x.shape)}")
        layout = _layout_of(x, layout)
        terms = []
        for i, scale in enumerate(self.scales):
            for d, pair in enumerate(neighbour_differences(x, layout, scale)):
                if pair is not None:
                    terms.append(self.terms[i * self.dims + d](*pair))
        if not terms:
            return x.new_zeros(())
        return self.weight * torch.stack(terms).mean()
