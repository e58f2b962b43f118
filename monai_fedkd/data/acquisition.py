"""Per-site acquisition shift: a deterministic, parameterised image degradation.

Each federated site of an ``acquisition`` partition (see :mod:`monai_fedkd.data.partition`) records
its own "scanner" in every datalist item under the ``"acquisition"`` key, e.g.::

    {"gamma": 1.31, "bias_strength": 0.27, "bias_order": 3, "downsample": 1.5,
     "blur_sigma": 0.8, "noise_std": 0.02, "seed": 2840181723}

:class:`AcquisitionShiftd` applies it when the site loads its images (place it right after
``LoadImaged`` + ``EnsureChannelFirstd`` and before any intensity normalisation).
The result depends only on the image and the parameters (the ``seed`` drives the random bias field
and the noise), so the same item always gives the same shifted image.

Parameters (all optional except where noted; missing ones take the identity value):

``gamma`` (float > 0, identity 1.0)
    gamma correction on intensities min-max normalised to [0, 1] per channel, mapped back to the
    channel's original range. ``gamma < 1`` brightens mid-tones, ``gamma > 1`` darkens them.
``bias_strength`` (float >= 0, identity 0.0) and ``bias_order`` (int >= 0, default 3)
    smooth multiplicative bias field ``exp(strength * f)`` rescaled to mean 1, where ``f`` is a
    random polynomial of total degree ``bias_order`` in the normalised coordinates, centred and
    scaled to max |f| = 1. It multiplies each channel's intensities above that channel's minimum,
    so the background level (e.g. air in CT) is kept. The same field is used for all channels.
``downsample`` (float >= 1, identity 1.0)
    resolution loss: area-downsample every spatial dim by this factor, then linearly
    (bilinear/trilinear) upsample back to the original shape.
``blur_sigma`` (float >= 0 or one per spatial dim, identity 0.0)
    Gaussian blur, sigma in voxels (:class:`monai.transforms.GaussianSmooth`).
``noise_std`` (float >= 0, identity 0.0)
    additive Gaussian noise; std relative to the input image's intensity range (max - min over the
    whole input). A constant image gets no noise.
``seed`` (int >= 0, default 0)
    seeds the bias field and the noise (independently of each other).

The steps are applied in the order above. Output is float32; MetaTensor metadata, affine and
applied operations are kept; the output is of the same kind (MetaTensor / Tensor / ndarray) as the input.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations_with_replacement
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import GaussianSmooth, MapTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = [
    "ACQUISITION_PARAM_DEFAULTS",
    "AcquisitionShiftd",
    "apply_acquisition_shift",
    "default_site_shifts",
    "validate_acquisition_params",
]

#: identity value of each parameter (``bias_order`` is only a shape parameter of the field).
ACQUISITION_PARAM_DEFAULTS: dict[str, Any] = {
    "gamma": 1.0,
    "bias_strength": 0.0,
    "bias_order": 3,
    "downsample": 1.0,
    "blur_sigma": 0.0,
    "noise_std": 0.0,
    "seed": 0,
}

# ranges used by default_site_shifts for sites 1..K-1 (site 0 is the identity / reference scanner)
_DEFAULT_RANGES = {
    "gamma": (0.6, 1.6),
    "bias_strength": (0.1, 0.5),
    "downsample": (1.0, 2.5),
    "blur_sigma": (0.0, 1.5),
    "noise_std": (0.0, 0.05),
}

_BIAS_STREAM = 1
_NOISE_STREAM = 2


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _real(params: Mapping, key: str, low: float, low_inclusive: bool, what: str) -> float:
    value = params[key]
    if not _is_real(value):
        raise ValueError(f"acquisition parameter {key!r} must be a finite number {what}, got {value!r}.")
    value = float(value)
    if value < low or (value == low and not low_inclusive):
        raise ValueError(f"acquisition parameter {key!r} must be {what}, got {value!r}.")
    return value


def _int(params: Mapping, key: str, what: str) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"acquisition parameter {key!r} must be {what}, got {value!r}.")
    return int(value)


def validate_acquisition_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``params`` and return a complete copy (missing keys filled with identity values).

    Raises:
        ValueError: for unknown keys or invalid values (gamma <= 0, negative strength/sigma/noise,
            downsample < 1, negative or non-integer seed / bias_order).
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"acquisition parameters must be a dict, got {type(params).__name__}.")
    unknown = sorted(str(k) for k in params if k not in ACQUISITION_PARAM_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown acquisition parameter(s) {unknown}; allowed: {sorted(ACQUISITION_PARAM_DEFAULTS)}."
        )
    p = {**ACQUISITION_PARAM_DEFAULTS, **dict(params)}
    out: dict[str, Any] = {
        "gamma": _real(p, "gamma", 0.0, False, "> 0"),
        "bias_strength": _real(p, "bias_strength", 0.0, True, ">= 0"),
        "bias_order": _int(p, "bias_order", "an integer >= 0"),
        "downsample": _real(p, "downsample", 1.0, True, ">= 1"),
        "noise_std": _real(p, "noise_std", 0.0, True, ">= 0"),
        "seed": _int(p, "seed", "an integer >= 0"),
    }
    sigma = p["blur_sigma"]
    if isinstance(sigma, (list, tuple)):
        if len(sigma) == 0 or not all(_is_real(s) and float(s) >= 0 for s in sigma):
            raise ValueError(f"acquisition parameter 'blur_sigma' must be >= 0 (one value per spatial dim), got {sigma!r}.")
        out["blur_sigma"] = [float(s) for s in sigma]
    else:
        out["blur_sigma"] = _real(p, "blur_sigma", 0.0, True, ">= 0")
    return out


def default_site_shifts(num_sites: int, seed: int = 0) -> list[dict[str, Any]]:
    """Deterministic per-site acquisition parameters (without the per-item ``seed``).

    Site 0 is the identity (reference scanner); sites 1..K-1 get gamma in [0.6, 1.6] (log-uniform),
    bias strength in [0.1, 0.5], downsample factor in [1, 2.5], blur sigma in [0, 1.5] voxels and
    noise std in [0, 0.05] of the intensity range; values are rounded to 4 decimals.
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, numbers.Integral) or num_sites < 1:
        raise ValueError(f"num_sites must be a positive integer, got {num_sites!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    rng = np.random.default_rng([int(seed), 0xAC0])
    shifts = []
    for k in range(int(num_sites)):
        shift = {key: v for key, v in ACQUISITION_PARAM_DEFAULTS.items() if key != "seed"}
        draws = {
            "gamma": math.exp(rng.uniform(math.log(_DEFAULT_RANGES["gamma"][0]), math.log(_DEFAULT_RANGES["gamma"][1]))),
            **{key: rng.uniform(*_DEFAULT_RANGES[key]) for key in ("bias_strength", "downsample", "blur_sigma", "noise_std")},
        }
        if k > 0:  # site 0 still consumes its draws so that site k's shift does not depend on num_sites
            shift.update({key: round(float(v), 4) for key, v in draws.items()})
        shifts.append(shift)
    return shifts


def _bias_field(spatial: Sequence[int], order: int, strength: float, rng: np.random.Generator) -> torch.Tensor:
    # each monomial is a product of 1D coordinate vectors broadcast against each other, so only the sum is
    # volume-sized (a full-resolution volume has ~10^7 voxels; materialised grids made this the slowest step)
    ndim = len(spatial)
    axes = [torch.linspace(-1.0, 1.0, s, dtype=torch.float64).reshape([s if i == a else 1 for i in range(ndim)])
            for a, s in enumerate(spatial)]
    field = torch.zeros(tuple(spatial), dtype=torch.float64)
    for degree in range(1, order + 1):
        for combo in combinations_with_replacement(range(ndim), degree):
            term = axes[combo[0]]
            for axis in combo[1:]:
                term = term * axes[axis]
            field += float(rng.standard_normal()) * term
    field -= field.mean()
    peak = field.abs().max()
    if peak <= 0:  # constant polynomial (order 0, or a single voxel): no bias
        return torch.ones(tuple(spatial), dtype=torch.float32)
    field = torch.exp(strength * field / peak)
    return (field / field.mean()).to(torch.float32)


def _channel_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], -1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return flat.min(dim=1).values.reshape(shape), flat.max(dim=1).values.reshape(shape)


def apply_acquisition_shift(img: Any, params: Mapping[str, Any] | None) -> Any:
    """Apply the acquisition shift described by ``params`` to a channel-first image.

    ``img``: MetaTensor, torch.Tensor or numpy array shaped ``(C, *spatial)`` with 1 to 3 spatial dims.
    ``params``: see the module docstring; ``None`` or ``{}`` returns ``img`` unchanged.
    Returns a float32 image of the same kind and shape (MetaTensor metadata kept).
    """
    if not params:
        return img
    p = validate_acquisition_params(params)
    x = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
    if x.ndim < 2 or x.ndim > 4:
        raise ValueError(
            f"AcquisitionShift expects a channel-first image with 1 to 3 spatial dims, got shape {tuple(x.shape)}."
        )
    x = x.detach().clone().cpu()
    spatial = tuple(int(s) for s in x.shape[1:])
    if not bool(torch.isfinite(x).all()):
        raise ValueError("AcquisitionShift got an image with NaN or infinite values.")
    intensity_range = float(x.max() - x.min())

    if p["gamma"] != 1.0:
        lo, hi = _channel_min_max(x)
        span = hi - lo
        safe = torch.where(span > 0, span, torch.ones_like(span))
        y = ((x - lo) / safe).clamp(0.0, 1.0) ** p["gamma"] * span + lo
        x = torch.where(span > 0, y, x)

    if p["bias_strength"] > 0 and p["bias_order"] > 0:
        field = _bias_field(spatial, p["bias_order"], p["bias_strength"], np.random.default_rng([p["seed"], _BIAS_STREAM]))
        lo, _ = _channel_min_max(x)
        x = lo + (x - lo) * field[None]

    if p["downsample"] > 1.0:
        small = tuple(max(1, int(round(s / p["downsample"]))) for s in spatial)
        if small != spatial:
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
            low = F.interpolate(x[None], size=small, mode="area")
            x = F.interpolate(low, size=spatial, mode=mode, align_corners=False)[0]

    sigma = p["blur_sigma"]
    if isinstance(sigma, list):
        if len(sigma) != len(spatial):
            raise ValueError(f"blur_sigma has {len(sigma)} values but the image has {len(spatial)} spatial dims.")
        if any(s > 0 for s in sigma):
            x = GaussianSmooth(sigma=sigma)(x)
    elif sigma > 0:
        x = GaussianSmooth(sigma=sigma)(x)
    x = convert_to_tensor(x, dtype=torch.float32, track_meta=False)

    if p["noise_std"] > 0 and intensity_range > 0:
        noise = np.random.default_rng([p["seed"], _NOISE_STREAM]).standard_normal(x.shape, dtype=np.float32)
        x = x + torch.from_numpy(noise) * float(p["noise_std"] * intensity_range)

    out, *_ = convert_to_dst_type(x.to(torch.float32), dst=img, dtype=torch.float32)
    return out


class AcquisitionShiftd(MapTransform):
    """Dictionary transform applying the per-item acquisition shift stored under ``params_key``.

    Args:
        keys: image keys to shift (never the label).
        params_key: key of the parameter dict in the data dictionary. If it is absent, ``None`` or
            empty the transform is the identity.
        allow_missing_keys: don't raise if an image key is missing.
    """

    def __init__(self, keys: KeysCollection = "image", params_key: str = "acquisition", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.params_key = params_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        params = d.get(self.params_key)
        if not params:
            return d
        params = validate_acquisition_params(params)
        for key in self.key_iterator(d):
            d[key] = apply_acquisition_shift(d[key], params)
        return d
