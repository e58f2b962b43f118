"""Label layouts for the layout-conditioned generator, sampled from the atlases the sites publish (server side).

A layout is a label map of the network's patch size with the anatomy of the sites' training data: the sites'
class-probability atlases (:mod:`monai_fedkd.site.atlas`) are combined, weighted by their subject counts, and
upsampled to the patch size; each sample then

1. deforms the combined atlas by a random affine map (rotation, scaling, translation) and a smooth random
   displacement field (a coarse Gaussian grid, upsampled), both by ``grid_sample``;
2. adds smooth random fields per class, so that no two layouts of one deformation share their boundaries;
3. draws a volume per foreground class, its atlas volume times ``U(1 - volume_jitter, 1 + volume_jitter)``, and gives
   that many voxels to the class where its perturbed probability is highest; smaller classes choose first, the
   voxels no class takes are background.

Class volumes therefore follow the atlas even for small structures whose atlas probability nowhere exceeds 0.5 (an
argmax would drop them). Everything is drawn from the ``torch.Generator`` the caller passes: a seeded step repeats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from monai_fedkd.site.atlas import atlas_class_gradient, atlas_class_intensity, atlas_intensity, atlas_tensor

__all__ = ["LayoutSampler", "combined_atlas", "combined_class_gradient", "combined_class_intensity", "combined_intensity", "normalised_atlas", "upsampled_atlas"]


def combined_atlas(atlases: Mapping[str, Mapping], num_classes: int, spatial_size: Sequence[int]) -> torch.Tensor:
    """The subject-weighted mean of the sites' atlases at ``spatial_size``: ``(num_classes, *spatial_size)``."""
    if not atlases:
        raise ValueError("no site shares an atlas")
    total, subjects = None, 0
    for name, atlas in atlases.items():
        try:
            a = atlas_tensor(atlas, num_classes)
        except ValueError as e:
            raise ValueError(f"site '{name}': {e}") from None
        if a.ndim - 1 != len(spatial_size):
            raise ValueError(f"site '{name}' shares a {a.ndim - 1}D atlas, the sites' inputs are {len(spatial_size)}D")
        up = _upsampled(a, spatial_size)
        n = int(atlas.get("subjects") or 1)
        total = up * n if total is None else total + up * n
        subjects += n
    return normalised_atlas(total / subjects)


def _upsampled(cells: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """``(C, *grid)`` cells read back at ``spatial_size`` (linear interpolation)."""
    mode = "bilinear" if len(spatial_size) == 2 else "trilinear"
    return F.interpolate(cells[None].float(), size=list(spatial_size), mode=mode, align_corners=False)[0]


def upsampled_atlas(cells: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """One atlas ``(C, *grid)`` at ``spatial_size``, as :func:`combined_atlas` reads a published one."""
    return normalised_atlas(_upsampled(cells, spatial_size))


def normalised_atlas(a: torch.Tensor) -> torch.Tensor:
    a = a.clamp_min(0)
    return a / a.sum(0, keepdim=True).clamp_min(1e-8)


def combined_intensity(atlases: Mapping[str, Mapping], spatial_size: Sequence[int]) -> torch.Tensor | None:
    """The subject-weighted mean intensity map of the sites' atlases at ``spatial_size``; ``None`` when a site
    shares none (the generator then starts from a constant)."""
    total, subjects = None, 0
    for name, atlas in atlases.items():
        try:
            t = atlas_intensity(atlas)
        except ValueError as e:
            raise ValueError(f"site '{name}': {e}") from None
        if t is None:
            return None
        up = _upsampled(t[None], spatial_size)[0]
        n = int(atlas.get("subjects") or 1)
        total = up * n if total is None else total + up * n
        subjects += n
    return None if total is None else total / subjects


def combined_class_intensity(atlases: Mapping[str, Mapping], num_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(levels, quantiles (channels, num_classes, L))``: the sites' class intensity quantiles averaged, weighted by
    their subjects, over the sites that report each class. Averaging quantile functions gives the distribution
    closest to every site's in the 1D Wasserstein sense (their barycenter). ``None`` when no site shares them."""
    return _quantile_barycenter(atlases, lambda atlas: atlas_class_intensity(atlas, num_classes), "class intensity")


def combined_class_gradient(atlases: Mapping[str, Mapping], num_classes: int, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """``(levels, quantiles (scales, spatial_dims, channels, num_classes, L), scales)``: the sites' quantiles of
    neighbour differences per scale, axis and class, combined as :func:`combined_class_intensity` combines
    intensities. ``None`` when no site shares them."""
    scales = {}

    def read(atlas):
        shared = atlas_class_gradient(atlas, num_classes, spatial_dims)
        if shared is None:
            return None
        scales.setdefault("first", shared[2])
        if shared[2] != scales["first"]:
            raise ValueError(f"class gradient quantiles at scales {shared[2]}, another site's are at {scales['first']}")
        return shared[:2]

    combined = _quantile_barycenter(atlases, read, "class gradient")
    return None if combined is None else (*combined, scales["first"])


def _quantile_barycenter(atlases: Mapping[str, Mapping], read, what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Subject-weighted mean of the quantile rows ``read(atlas)`` returns (``(levels, (..., L))`` or ``None``), per row
    over the sites that report it (a NaN row is a class a site has no voxels of)."""
    total, weight, levels = None, None, None
    for name, atlas in atlases.items():
        try:
            shared = read(atlas)
        except ValueError as e:
            raise ValueError(f"site '{name}': {e}") from None
        if shared is None:
            continue
        lv, q = shared
        if levels is None:
            levels, total, weight = lv, torch.zeros_like(q), torch.zeros(q.shape[:-1])
        if not torch.equal(lv, levels) or q.shape != total.shape:
            raise ValueError(f"site '{name}' shares {what} quantiles at other levels or of another shape than the first site's")
        n = float(atlas.get("subjects") or 1)
        known = torch.isfinite(q).all(-1)
        total[known] += n * q[known]
        weight[known] += n
    if levels is None:
        return None
    quantiles = torch.where(weight[..., None] > 0, total / weight.clamp_min(1e-12)[..., None], torch.full_like(total, float("nan")))
    return levels, quantiles


class LayoutSampler:
    """Random label layouts ``(B, *spatial_size)`` from a combined class atlas (see the module docstring).

    Args:
        atlas: ``(num_classes, *spatial_size)`` class probabilities (:func:`combined_atlas`).
        rotate: largest rotation per axis, degrees.
        scale: largest relative scaling per axis (0.1: 0.9 to 1.1).
        translate: largest shift per axis as a share of the size.
        elastic: largest smooth displacement as a share of the size, on a grid of ``elastic_grid`` control points.
        texture: amplitude of the smooth per-class fields added to the probabilities (0: layouts differ only by
            deformation and volume).
        volume_jitter: relative spread of each class's volume around its atlas volume.
        crop_size: when the generator synthesizes patches smaller than the sites' patch frame, each layout is a
            random crop of this size out of a layout of the atlas's size (the anatomy keeps its scale).
        intensity: ``(*spatial_size)`` mean-intensity map (:func:`combined_intensity`); :meth:`sample_with_prior`
            deforms and crops it with each layout, as the generator's starting image.
        foreground_crop: probability that a crop is centred on a random foreground voxel of its layout (as the
            sites' own ``RandCropByPosNegLabeld`` samples their training patches; ``pos / (pos + neg)``), instead of
            placed uniformly. Uniform crops of a large field of view are mostly background, where the ensemble's
            answers teach the student little about the structures.
        class_balanced_crops: a centred crop first draws one of the foreground classes present in its layout, each
            alike, then a voxel of that class (as MONAI's ``RandCropByLabelClassesd`` with equal ratios), instead of a
            voxel of any foreground class: small structures get as many crops as large ones.
    """

    def __init__(self, atlas: torch.Tensor, rotate: float = 10.0, scale: float = 0.1, translate: float = 0.05,
                 elastic: float = 0.03, elastic_grid: int = 4, texture: float = 0.3, volume_jitter: float = 0.2,
                 crop_size: Sequence[int] | None = None, intensity: torch.Tensor | None = None, foreground_crop: float = 0.0,
                 class_balanced_crops: bool = False) -> None:
        if atlas.ndim not in (3, 4):
            raise ValueError(f"atlas must be (classes, H, W) or (classes, H, W, D), got {tuple(atlas.shape)}")
        for name, v in (("rotate", rotate), ("scale", scale), ("translate", translate), ("elastic", elastic), ("texture", texture)):
            if v < 0:
                raise ValueError(f"layout {name} must be >= 0, got {v}")
        if not 0 <= volume_jitter < 1:
            raise ValueError(f"layout volume_jitter must be in [0, 1), got {volume_jitter}")
        if not 0 <= foreground_crop <= 1:
            raise ValueError(f"layout foreground_crop must be in [0, 1], got {foreground_crop}")
        self.foreground_crop = float(foreground_crop)
        self.class_balanced_crops = bool(class_balanced_crops)
        self.atlas = atlas.float()
        self.num_classes, self.spatial_size = atlas.shape[0], list(atlas.shape[1:])
        self.spatial_dims = len(self.spatial_size)
        self.rotate, self.scale, self.translate = float(rotate), float(scale), float(translate)
        self.elastic, self.elastic_grid = float(elastic), max(int(elastic_grid), 2)
        self.texture, self.volume_jitter = float(texture), float(volume_jitter)
        self.volumes = self.atlas.flatten(1).sum(1)  # expected voxels per class
        if intensity is not None and list(intensity.shape) != self.spatial_size:
            raise ValueError(f"intensity map {list(intensity.shape)} does not match the atlas size {self.spatial_size}")
        self.intensity = None if intensity is None else intensity.float()
        self.crop_size = list(self.spatial_size) if crop_size is None else [int(c) for c in crop_size]
        if len(self.crop_size) != self.spatial_dims or any(not 0 < c <= s for c, s in zip(self.crop_size, self.spatial_size)):
            raise ValueError(f"layout crop_size {self.crop_size} must have {self.spatial_dims} sides within the atlas size {self.spatial_size}")

    def _affine(self, n: int, g: torch.Generator) -> torch.Tensor:
        d = self.spatial_dims
        u = lambda *shape: 2 * torch.rand(*shape, generator=g) - 1  # noqa: E731  U(-1, 1)
        angles = u(n, 1 if d == 2 else 3) * math.radians(self.rotate)
        rot = torch.eye(d).repeat(n, 1, 1)
        axes = [(0, 1)] if d == 2 else [(1, 2), (0, 2), (0, 1)]
        for k, (i, j) in enumerate(axes):
            r = torch.eye(d).repeat(n, 1, 1)
            c, s = torch.cos(angles[:, k]), torch.sin(angles[:, k])
            r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
            rot = rot @ r
        scale = 1 + u(n, d) * self.scale
        shift = u(n, d) * 2 * self.translate  # grid units: the volume spans [-1, 1]
        return torch.cat([rot * scale[:, None, :], shift[:, :, None]], dim=2)  # (n, d, d + 1)

    def _smooth_field(self, n: int, channels: int, g: torch.Generator, grid: int) -> torch.Tensor:
        coarse = torch.randn(n, channels, *[grid] * self.spatial_dims, generator=g)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return F.interpolate(coarse, size=self.spatial_size, mode=mode, align_corners=True)

    def _crop_start(self, layout: torch.Tensor, g: torch.Generator) -> list[int]:
        """Corner of one crop of ``layout``: centred on a random foreground voxel with probability
        ``foreground_crop`` (moved inside the volume where the centre is near a border), else uniform."""
        # both random draws happen whatever the outcome, so the stream (and a resumed run) does not depend on it
        centred = float(torch.rand(1, generator=g)) < self.foreground_crop
        uniform = [int(torch.randint(s - c + 1, (1,), generator=g)) for s, c in zip(self.spatial_size, self.crop_size)]
        pick = float(torch.rand(1, generator=g))
        # drawn only in class-balanced mode, so that the default's stream (and its published runs) stays as it was
        pick_class = float(torch.rand(1, generator=g)) if self.class_balanced_crops else 0.0
        if not centred:
            return uniform
        candidates = layout > 0
        if self.class_balanced_crops:
            present = layout[candidates].unique()
            if len(present):
                candidates = layout == present[min(int(pick_class * len(present)), len(present) - 1)]
        foreground = candidates.nonzero()
        if len(foreground) == 0:
            return uniform
        centre = foreground[min(int(pick * len(foreground)), len(foreground) - 1)].tolist()
        return [min(max(int(p) - c // 2, 0), s - c) for p, c, s in zip(centre, self.crop_size, self.spatial_size)]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` layouts ``(n, *crop_size)`` of class indices (``crop_size`` defaults to the atlas size)."""
        return self.sample_with_prior(n, generator)[0]

    @torch.no_grad()
    def sample_with_prior(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` layouts ``(n, *crop_size)`` and the intensity map deformed and cropped alike ``(n, 1, *crop_size)``
        (``None`` without an intensity map)."""
        g, d = generator, self.spatial_dims
        theta = self._affine(n, g)
        grid = F.affine_grid(theta, [n, self.num_classes, *self.spatial_size], align_corners=False)
        if self.elastic > 0:
            disp = self._smooth_field(n, d, g, self.elastic_grid) * (2 * self.elastic)
            grid = grid + disp.movedim(1, -1)
        probs = F.grid_sample(self.atlas.expand(n, *self.atlas.shape), grid, mode="bilinear", padding_mode="border", align_corners=False)
        prior = None
        if self.intensity is not None:
            prior = F.grid_sample(self.intensity.expand(n, 1, *self.spatial_size), grid, mode="bilinear", padding_mode="border", align_corners=False)
        score = probs + self.texture * self._smooth_field(n, self.num_classes, g, max(2, min(self.spatial_size) // 6)) * probs.clamp_max(0.5)
        volumes = self.volumes * (1 + (2 * torch.rand(n, self.num_classes, generator=g) - 1) * self.volume_jitter)
        layout = torch.zeros(n, *self.spatial_size, dtype=torch.long)
        flat_layout, flat_score = layout.view(n, -1), score.flatten(2)
        for c in sorted(range(1, self.num_classes), key=lambda k: float(self.volumes[k])):  # small structures first
            for b in range(n):
                k = int(round(float(volumes[b, c])))
                if k < 1:
                    continue
                free = flat_layout[b] == 0
                s = torch.where(free & (flat_score[b, c] > 0), flat_score[b, c], torch.full_like(flat_score[b, c], -1.0))
                k = min(k, int((s > 0).sum()))
                if k:
                    flat_layout[b, s.topk(k).indices] = c
        if self.crop_size == self.spatial_size:
            return layout, prior
        crops, prior_crops = [], []
        for b in range(n):
            starts = self._crop_start(layout[b], g)
            window = [slice(a, a + c) for a, c in zip(starts, self.crop_size)]
            crops.append(layout[(b, *window)])
            if prior is not None:
                prior_crops.append(prior[(b, slice(None), *window)])
        return torch.stack(crops), (torch.stack(prior_crops) if prior is not None else None)
