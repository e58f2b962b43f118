"""A segmentation site's class-probability atlas: the coarse average of its training labels, shared under its policy.

The layout-conditioned generator (:class:`~monai_fedkd.networks.generators.LayoutGenerator`) needs label layouts
with the anatomy the sites know; the server samples them from the atlases the sites publish in their cards
(:class:`~monai_fedkd.server.layouts.LayoutSampler`). The atlas is computed at the site, from its own training
label maps, in the frame of its network's input:

1. every label map after the card's preprocessing (orientation, spacing) is cropped or padded to one frame: the
   first subject's volume size, at least the network's patch size (``spatial_size``). With ``align="foreground"``
   (the policy's ``atlas_align``) the centroid of the subject's structures (all non-background voxels) goes to the
   frame's centre; with ``"centre"`` the volume centres are aligned. Subjects are placed differently in their fields
   of view, so centre alignment blurs every structure across subjects: on IXI a leave-one-out layout drawn from a
   centre-aligned atlas matches a subject with Dice 0.39, from a foreground-aligned one 0.59. The alignment is a
   translation only (no registration), and the frame still covers the whole field of view, so the layouts (and the
   generator's patches cut from them) also cover the regions without any structure, which the central model must
   learn too;
2. one-hot, averaged over subjects: ``mean[c, v]`` is the share of subjects whose voxel ``v`` is class ``c``;
3. the mean image intensity of the same subjects in the same frame (first channel), likewise;
4. per channel and class, the quantiles of the intensities of all the subjects' voxels of that class (from a
   histogram of ``INTENSITY_BINS`` bins over the input value range, at ``INTENSITY_LEVELS``): published only by a
   policy that adds no atlas noise, since no noise mechanism covers them. They let the server keep each synthetic
   structure's intensities where the sites' are (:class:`~monai_fedkd.losses.ClassIntensityLoss`); likewise, per
   spatial axis and at the block sizes ``GRADIENT_SCALES``, the quantiles of the absolute difference between
   neighbouring voxels (blocks) along that axis, by the class of each pair's first voxel (the local contrast of each
   structure and its boundary: what a smooth blob lacks and what stripes along one axis exceed;
   :class:`~monai_fedkd.losses.ClassGradientLoss`);
5. averaged over blocks of ``atlas_pool`` voxels per axis (``adaptive_avg_pool`` to ``ceil(size / pool)``), and,
   when the policy says so, Gaussian noise of ``atlas_noise`` added per cell before the class distribution of every
   cell is renormalised.

What it reveals: the site's average anatomy and average image at ``atlas_pool x spacing`` resolution, its class
volumes, and (without atlas noise) the intensity distribution of each class pooled over all its subjects, and the
distribution of its neighbour differences per axis (a pooled texture statistic, no voxel's position). One
subject moves each cell's class distribution by at most ``2 / n`` in L1 (``n`` subjects), so over ``G`` cells the
replace-one L2 sensitivity is ``sqrt(2 G) / n``; with noise the release is a Gaussian mechanism whose epsilon the card
reports. A site with fewer than ``atlas_min_subjects`` training subjects publishes none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from monai_fedkd.losses import neighbour_differences
from monai_fedkd.site.policy import ATLAS_ALIGNMENTS, AnswerPolicy, gaussian_epsilon

__all__ = ["GRADIENT_SCALES", "INTENSITY_BINS", "INTENSITY_LEVELS", "AtlasAccumulator", "atlas_class_gradient", "atlas_class_intensity", "atlas_intensity", "atlas_tensor", "pool_cells", "preprocessed_subjects", "publish_atlas"]

logger = logging.getLogger(__name__)

INTENSITY_BINS = 256
INTENSITY_LEVELS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99)
GRADIENT_SCALES = (1, 2)  # block sizes of the neighbour differences: voxels, and 2-voxel blocks (where noise cancels)


class AtlasAccumulator:
    """Running sums of one-hot label maps (and of images) in the network-input frame (``spatial_size``), one subject
    at a time."""

    def __init__(self, num_classes: int, spatial_size: Sequence[int], align: str = "foreground",
                 value_range: Sequence[float] | None = None) -> None:
        if align not in ATLAS_ALIGNMENTS:
            raise ValueError(f"atlas align must be one of {ATLAS_ALIGNMENTS}, got {align!r}")
        if value_range is not None and not float(value_range[0]) < float(value_range[1]):
            raise ValueError(f"atlas value_range must be (low, high) with low < high, got {value_range}")
        self.align = align
        # class intensity histograms need a bounded input range (the card's value_range); without one, none
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.histogram: torch.Tensor | None = None  # (channels, classes, INTENSITY_BINS) voxel counts
        # (scales, axes, channels, classes, INTENSITY_BINS) counts of |neighbour difference| over [0, high - low]
        self.gradient_histogram: torch.Tensor | None = None
        self.num_classes, self.min_size = int(num_classes), [int(s) for s in spatial_size]
        self.spatial_size = list(self.min_size)  # the frame: set by the first subject
        self.total: torch.Tensor | None = None
        self.image_total: torch.Tensor | None = None
        self.subjects = 0

    def add(self, label: torch.Tensor, image: torch.Tensor | None = None) -> None:
        """``label``: ``(1, *spatial)`` or ``(*spatial)`` class indices of one subject (any spatial size); ``image``:
        its preprocessed image, same geometry (first channel used); without images the intensity atlas stays 0."""
        from monai.transforms import ResizeWithPadOrCrop

        label = torch.as_tensor(label)
        if label.ndim == len(self.spatial_size):
            label = label[None]
        if label.ndim != len(self.spatial_size) + 1 or label.shape[0] != 1:
            raise ValueError(f"atlas: a label map of shape {tuple(label.shape)} is not (1, {len(self.spatial_size)} spatial dims)")
        if self.total is None:
            self.spatial_size = [max(int(a), b) for a, b in zip(label.shape[1:], self.min_size)]
            self.total = torch.zeros((self.num_classes, *self.spatial_size), dtype=torch.float64)
            self.image_total = torch.zeros(self.spatial_size, dtype=torch.float64)
        centre = None
        if self.align == "foreground":
            foreground = (torch.as_tensor(label)[0] > 0).nonzero()
            if len(foreground):  # a subject without structures keeps its volume centre
                centre = [math.floor(float(c) + 0.5) for c in foreground.float().mean(0)]  # halves round up alike
        frame = ResizeWithPadOrCrop(self.spatial_size, mode="constant", value=0) if centre is None else \
            (lambda t: _window(torch.as_tensor(t), centre, self.spatial_size))
        if image is not None:
            full = torch.as_tensor(image).float()
            full = full[None] if full.ndim == len(self.spatial_size) else full
            image = full[:1]
            if tuple(image.shape[1:]) != tuple(label.shape[1:]):
                raise ValueError(f"atlas: image {tuple(image.shape)} and label {tuple(label.shape)} differ in size")
            if self.value_range is not None:
                self._add_histogram(torch.as_tensor(label).long()[0], torch.as_tensor(full).float())
            self.image_total += torch.as_tensor(frame(image))[0].to(torch.float64)
        # padding is background (class 0): outside the subject's field of view nothing is known
        label = torch.as_tensor(frame(torch.as_tensor(label).float())).long()[0]
        if label.min() < 0 or label.max() >= self.num_classes:
            raise ValueError(f"atlas: label values {int(label.min())}..{int(label.max())} outside [0, {self.num_classes})")
        self.total += F.one_hot(torch.as_tensor(label), self.num_classes).movedim(-1, 0).to(torch.float64)
        self.subjects += 1

    def _add_histogram(self, label: torch.Tensor, image: torch.Tensor) -> None:
        """Voxel counts per channel, class and intensity bin of one whole subject (not only its atlas frame), and per
        axis the counts of its neighbour differences by the class of each pair's first voxel."""
        if label.min() < 0 or label.max() >= self.num_classes:
            raise ValueError(f"atlas: label values {int(label.min())}..{int(label.max())} outside [0, {self.num_classes})")
        lo, hi = self.value_range
        channels, dims = image.shape[0], label.ndim
        if self.histogram is None:
            self.histogram = torch.zeros((channels, self.num_classes, INTENSITY_BINS), dtype=torch.float64)
            self.gradient_histogram = torch.zeros((len(GRADIENT_SCALES), dims, channels, self.num_classes, INTENSITY_BINS), dtype=torch.float64)
        if channels != self.histogram.shape[0]:
            raise ValueError(f"atlas: a subject with {channels} channels after subjects with {self.histogram.shape[0]}")
        self.histogram += _class_histogram(label, image - lo, hi - lo, self.num_classes)
        for i, scale in enumerate(GRADIENT_SCALES):
            for d, pair in enumerate(neighbour_differences(image[None], label[None], scale)):
                if pair is not None:  # a single slice has no neighbours along its axis
                    self.gradient_histogram[i, d] += _class_histogram(pair[1][0], pair[0][0], hi - lo, self.num_classes)

    def class_quantiles(self) -> list | None:
        """``(channels, classes, len(INTENSITY_LEVELS))`` quantiles (nested lists; ``None`` for a class without voxels),
        linear within the bin where the cumulative count crosses each level; ``None`` without histograms."""
        if self.histogram is None:
            return None
        lo, hi = self.value_range
        return [[_quantiles(counts, lo, hi) for counts in per_class] for per_class in self.histogram]

    def class_gradient_quantiles(self) -> list | None:
        """``(len(GRADIENT_SCALES), axes, channels, classes, len(INTENSITY_LEVELS))`` quantiles of the absolute
        neighbour differences (``None`` for a class without pairs); ``None`` without histograms."""
        if self.gradient_histogram is None:
            return None
        lo, hi = self.value_range
        return [[[[_quantiles(counts, 0.0, hi - lo) for counts in per_class] for per_class in per_axis] for per_axis in per_scale]
                for per_scale in self.gradient_histogram]

    def mean(self) -> torch.Tensor:
        if not self.subjects:
            raise ValueError("atlas: no label maps were added")
        return (self.total / self.subjects).float()

    def mean_image(self) -> torch.Tensor:
        if not self.subjects:
            raise ValueError("atlas: no label maps were added")
        return (self.image_total / self.subjects).float()


def _class_histogram(label: torch.Tensor, values: torch.Tensor, span: float, num_classes: int) -> torch.Tensor:
    """``(channels, num_classes, INTENSITY_BINS)`` counts of ``values`` ``(channels, *spatial)`` in ``[0, span]`` by
    the class of ``label`` ``(*spatial)`` at the same voxel."""
    bins = (values / span * INTENSITY_BINS).floor().clamp(0, INTENSITY_BINS - 1).long()
    out = torch.zeros((values.shape[0], num_classes, INTENSITY_BINS), dtype=torch.float64)
    for h in range(values.shape[0]):
        key = label.flatten() * INTENSITY_BINS + bins[h].flatten()
        out[h] = torch.bincount(key, minlength=num_classes * INTENSITY_BINS).view(num_classes, INTENSITY_BINS).double()
    return out


def _quantiles(counts: torch.Tensor, lo: float, hi: float) -> list | None:
    """The ``INTENSITY_LEVELS`` quantiles of a histogram over ``[lo, hi]``, linear within the bin where the cumulative
    count crosses each level; ``None`` for an empty histogram."""
    total = float(counts.sum())
    if total <= 0:
        return None
    width = (hi - lo) / len(counts)
    levels = torch.tensor(INTENSITY_LEVELS, dtype=torch.float64)
    cdf = counts.cumsum(0) / total
    b = torch.searchsorted(cdf, levels).clamp(max=len(counts) - 1)  # first bin whose cdf reaches the level
    below = torch.where(b > 0, cdf[(b - 1).clamp(min=0)], torch.zeros_like(levels))
    frac = ((levels - below) / (cdf[b] - below).clamp_min(1e-12)).clamp(0, 1)
    return [round(float(v), 4) for v in lo + (b.double() + frac) * width]


def preprocessed_subjects(card: dict, datalist, key: str = "training"):
    """``(label, image)`` of every ``key`` subject of ``datalist`` after the card's preprocessing: what a site
    averages into its atlas."""
    from monai.transforms import Compose

    from monai_fedkd.data.datalist import load_datalist
    from monai_fedkd.data.transforms import card_preprocessing

    items = load_datalist(datalist, key=key, task="segmentation", num_classes=card["classes"]["num_classes"])
    xforms = Compose(card_preprocessing(card, with_label=True))
    for item in items:
        data = xforms({k: v for k, v in item.items() if k in ("image", "label", "acquisition")})
        yield data["label"], data["image"]


def _window(t: torch.Tensor, centre: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``t`` ``(C, *spatial)`` cut (and zero-padded) to ``(C, *size)`` so that voxel ``centre`` lands at ``size // 2``."""
    out = torch.zeros((t.shape[0], *size), dtype=t.dtype)
    src, dst = [], []
    for c, s, n in zip(centre, size, t.shape[1:]):
        start = int(c) - s // 2  # the window's first voxel, in t's coordinates
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[(slice(None), *dst)] = t[(slice(None), *src)]
    return out


def pool_cells(t: torch.Tensor, pool: int) -> torch.Tensor:
    """``(C, *spatial)`` averaged over cells of ``pool`` voxels per axis: ``(C, *ceil(spatial / pool))``."""
    grid = [int(math.ceil(s / pool)) for s in t.shape[1:]]
    pool_fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]
    return pool_fn(t[None], grid)[0]


def publish_atlas(acc: AtlasAccumulator, policy: AnswerPolicy, spacing: Sequence[float] | None,
                  generator: torch.Generator | None = None) -> dict | None:
    """What the site publishes in its card under ``policy`` (a JSON-able dict), or ``None`` when it publishes nothing."""
    if not policy.share_atlas:
        return None
    if acc.subjects < int(policy.atlas_min_subjects):
        logger.info("atlas not shared: %d training subjects, the policy needs at least %d", acc.subjects, policy.atlas_min_subjects)
        return None
    pool = int(policy.atlas_pool)
    pooled = pool_cells(acc.mean(), pool)
    intensity = pool_cells(acc.mean_image()[None], pool)[0]
    grid = list(pooled.shape[1:])
    cells = math.prod(grid)
    sensitivity = math.sqrt(2.0 * cells) / acc.subjects
    epsilon = None
    if policy.atlas_noise > 0:
        pooled = pooled + torch.randn(pooled.shape, generator=generator) * float(policy.atlas_noise)
        intensity = intensity + torch.randn(intensity.shape, generator=generator) * float(policy.atlas_noise)
        pooled = pooled.clamp_min(0.0)
        total = pooled.sum(0, keepdim=True)
        # a cell the noise pushed below zero in every class says nothing: uniform
        pooled = torch.where(total > 1e-8, pooled / total.clamp_min(1e-8), torch.full_like(pooled, 1.0 / pooled.shape[0]))
        epsilon = gaussian_epsilon(float(policy.atlas_noise) / sensitivity, 1, policy.delta)
    quantiles = acc.class_quantiles() if policy.atlas_noise == 0 else None
    gradient = acc.class_gradient_quantiles() if policy.atlas_noise == 0 else None
    if policy.atlas_noise > 0 and acc.histogram is not None:
        logger.info("class intensity and gradient quantiles not shared: the policy adds noise to its atlas, and no noise mechanism covers them")
    return {
        "grid": grid,
        "pool": pool,
        "align": acc.align,
        "spatial_size": list(acc.spatial_size),
        "spacing_mm": None if spacing is None else [float(s) * pool for s in spacing],
        "subjects": acc.subjects,
        "noise": float(policy.atlas_noise),
        "l2_sensitivity": sensitivity,
        "epsilon": epsilon,
        "delta": policy.delta,
        "probabilities": [round(float(v), 4) for v in pooled.flatten()],  # flat, classes first, then the grid in C order
        "intensity": [round(float(v), 4) for v in intensity.flatten()],  # mean network-input intensity per cell
        "class_intensity": None if quantiles is None else {"levels": list(INTENSITY_LEVELS), "value_range": list(acc.value_range),
                                                           "quantiles": quantiles},  # channels x classes x levels
        "class_gradient": None if gradient is None else {"levels": list(INTENSITY_LEVELS), "scales": list(GRADIENT_SCALES),
                                                         "value_range": [0.0, acc.value_range[1] - acc.value_range[0]],
                                                         "quantiles": gradient},  # scales x axes x channels x classes x levels
    }


def atlas_intensity(atlas: dict) -> torch.Tensor | None:
    """The ``(*grid)`` mean-intensity map of a published atlas, or ``None`` when it has none."""
    if atlas.get("intensity") is None:
        return None
    grid = [int(g) for g in atlas["grid"]]
    values = torch.tensor(atlas["intensity"], dtype=torch.float32)
    if values.numel() != math.prod(grid) or not torch.isfinite(values).all():
        raise ValueError(f"atlas intensity has {values.numel()} values for grid {grid} (or is not finite)")
    return values.reshape(grid)


def atlas_class_intensity(atlas: dict, num_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(levels (L,), quantiles (channels, num_classes, L))`` of a published atlas (NaN rows for classes without
    voxels), or ``None`` when it shares none; raises naming what is malformed."""
    shared = atlas.get("class_intensity")
    if shared is None:
        return None
    try:
        levels = torch.tensor(shared["levels"], dtype=torch.float32)
        rows = [[[float("nan")] * len(levels) if r is None else r for r in per_class] for per_class in shared["quantiles"]]
        quantiles = torch.tensor(rows, dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"atlas class_intensity is malformed ({type(e).__name__}: {e}); expected 'levels' and 'quantiles'") from None
    if quantiles.ndim != 3 or quantiles.shape[1:] != (num_classes, len(levels)):
        raise ValueError(f"atlas class_intensity quantiles are {tuple(quantiles.shape)}, expected (channels, {num_classes}, {len(levels)})")
    return levels, quantiles


def atlas_class_gradient(atlas: dict, num_classes: int, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """``(levels (L,), quantiles (scales, spatial_dims, channels, num_classes, L), scales)`` of the neighbour
    differences a published atlas shares (NaN rows for classes without pairs), or ``None`` when it shares none; raises
    naming what is malformed."""
    shared = atlas.get("class_gradient")
    if shared is None:
        return None
    try:
        levels = torch.tensor(shared["levels"], dtype=torch.float32)
        scales = [int(v) for v in shared["scales"]]
        rows = [[[[[float("nan")] * len(levels) if r is None else r for r in per_class] for per_class in per_axis] for per_axis in per_scale]
                for per_scale in shared["quantiles"]]
        quantiles = torch.tensor(rows, dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"atlas class_gradient is malformed ({type(e).__name__}: {e}); expected 'levels', 'scales' and 'quantiles'") from None
    if quantiles.ndim != 5 or quantiles.shape[:2] != (len(scales), spatial_dims) or quantiles.shape[3:] != (num_classes, len(levels)):
        raise ValueError(f"atlas class_gradient quantiles are {tuple(quantiles.shape)}, expected ({len(scales)}, {spatial_dims}, channels, "
                         f"{num_classes}, {len(levels)})")
    return levels, quantiles, scales


def atlas_tensor(atlas: dict, num_classes: int) -> torch.Tensor:
    """The ``(num_classes, *grid)`` tensor of a published atlas; raises naming what is wrong with it."""
    try:
        grid = [int(g) for g in atlas["grid"]]
        values = torch.tensor(atlas["probabilities"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"atlas is malformed ({type(e).__name__}: {e}); expected 'grid' and 'probabilities'") from None
    if values.numel() != num_classes * math.prod(grid):
        raise ValueError(f"atlas has {values.numel()} values, expected {num_classes} classes x grid {grid}")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("atlas has negative or non-finite probabilities")
    return values.reshape(num_classes, *grid)
