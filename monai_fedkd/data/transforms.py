"""Input checks that turn shape/channel/label mistakes into errors naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping

import torch

from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["CheckInputd", "InputCheckError", "card_preprocessing", "site_preprocessing"]


class InputCheckError(ValueError):
    """An image or label that does not fit the bundle's configuration."""


def _unreadable_dicom_files(folder: Path) -> list[str]:
    import pydicom

    bad = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(str(f))
            _ = ds.pixel_array
        except Exception:
            bad.append(f.name)
    return bad


def check_dicom_series(img, src: str) -> None:
    """ITK silently skips unreadable files of a DICOM series; a series with a missing slice is an error here."""
    folder = Path(src)
    if not folder.is_dir():
        return
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    depth = int(img.shape[-1])
    if len(files) > depth:  # multi-frame files hold more slices than files, never fewer
        bad = _unreadable_dicom_files(folder)
        detail = f"unreadable: {bad[:5]}" if bad else "some files belong to no slice of the series"
        raise InputCheckError(f"DICOM series {src}: {len(files)} files but only {depth} slices could be read ({detail})")


def _source(d: Mapping, key: Hashable) -> str:
    meta = getattr(d.get(key), "meta", None) or {}
    return str(meta.get("filename_or_obj", f"<{key}>"))


class CheckInputd(MapTransform):
    """Check a loaded, channel-first sample against the configuration.

    Args:
        image_key: the image entry (channel-first).
        label_key: the label entry: a label map (segmentation) or class index/vector (classification).
        spatial_dims: expected number of spatial dimensions (2 or 3).
        in_channels: expected number of image channels.
        num_classes: label values (segmentation) or class indices (classification) must be in ``[0, num_classes)``.
        task: "classification" or "segmentation".
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int | None = None,
        task: str = "segmentation",
    ) -> None:
        keys: KeysCollection = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key
        self.spatial_dims, self.in_channels, self.num_classes, self.task = spatial_dims, in_channels, num_classes, task

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        img = d[self.image_key]
        src = _source(d, self.image_key)
        if img.ndim != self.spatial_dims + 1:
            raise InputCheckError(
                f"{src}: image has shape {tuple(img.shape)} (channel first), expected {self.spatial_dims} spatial "
                f"dimensions plus a channel (spatial_dims={self.spatial_dims})"
            )
        if img.shape[0] != self.in_channels:
            raise InputCheckError(f"{src}: image has {img.shape[0]} channels, the configuration expects in_channels={self.in_channels}")
        check_dicom_series(img, src)
        if not torch.isfinite(torch.as_tensor(img)).all():
            raise InputCheckError(f"{src}: image contains NaN or Inf values")
        if self.label_key is None or self.label_key not in d:
            return d
        label = d[self.label_key]
        if self.task == "segmentation":
            lsrc = _source(d, self.label_key)
            if label.ndim != img.ndim or label.shape[0] != 1:
                raise InputCheckError(f"{lsrc}: label map has shape {tuple(label.shape)}, expected one channel and {self.spatial_dims} spatial dims")
            if tuple(label.shape[1:]) != tuple(img.shape[1:]):
                raise InputCheckError(
                    f"{lsrc}: label spatial shape {tuple(label.shape[1:])} does not match image {src} shape {tuple(img.shape[1:])}"
                )
            lab = torch.as_tensor(label)
            if self.num_classes is not None:
                bad = (lab < 0) | (lab >= self.num_classes) | (lab != lab.round())
                if bad.any():
                    values = torch.unique(lab[bad])[:5].tolist()
                    raise InputCheckError(f"{lsrc}: label values {values} are not integers in [0, {self.num_classes}) (num_classes={self.num_classes})")
        elif self.num_classes is not None:
            lab = torch.as_tensor(label)
            if lab.numel() == 1 and not 0 <= int(lab) < self.num_classes:
                raise InputCheckError(f"{src}: class label {int(lab)} is outside [0, {self.num_classes})")
        return d


def site_preprocessing(
    task: str,
    spatial_dims: int,
    in_channels: int,
    spatial_size,
    num_classes: int | None = None,
    spacing=None,
    intensity_range=None,
    with_label: bool = True,
    image_key: str = "image",
    label_key: str = "label",
) -> list:
    """The deterministic preprocessing that maps a stored image to a site network's input.

    One definition serves the site bundles, the evaluation and (later) the site side of the distillation, so a
    model always sees inputs prepared as in training. Everything is driven by the site card's input spec:

    - classification: load, channel first, check, acquisition shift, intensity ``intensity_range`` -> [0, 1]
      (per-image 0.5/99.5 percentiles when ``None``), resize to ``spatial_size``;
    - segmentation: load, channel first, check, acquisition shift, RAS orientation (3D), resampling to
      ``spacing`` (native when ``None``), intensity as above; patches of ``spatial_size`` are taken later by
      random crops (training) or sliding windows (inference), so the full volume is kept here.
    """
    from monai import transforms as mt

    from monai_fedkd.data.acquisition import AcquisitionShiftd

    seg = task == "segmentation"
    keys = [image_key, label_key] if (seg and with_label) else [image_key]
    xforms = [
        mt.LoadImaged(keys=keys, image_only=True),
        mt.EnsureChannelFirstd(keys=keys),
        CheckInputd(
            image_key=image_key,
            label_key=label_key if with_label else None,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            task=task,
        ),
        AcquisitionShiftd(keys=image_key, params_key="acquisition"),
    ]
    if seg:
        if spatial_dims == 3:
            xforms.append(mt.Orientationd(keys=keys, axcodes="RAS"))
        if spacing is not None:
            modes = ["bilinear", "nearest"][: len(keys)]
            xforms.append(mt.Spacingd(keys=keys, pixdim=list(spacing), mode=modes))
    if intensity_range is None:
        xforms.append(mt.ScaleIntensityRangePercentilesd(keys=image_key, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True))
    else:
        lo, hi = intensity_range
        xforms.append(mt.ScaleIntensityRanged(keys=image_key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if not seg:
        xforms.append(mt.Resized(keys=image_key, spatial_size=list(spatial_size)))
    xforms.append(mt.EnsureTyped(keys=image_key, dtype=torch.float32))
    if seg and with_label:
        xforms.append(mt.EnsureTyped(keys=label_key, dtype=torch.long))
    return xforms


def card_preprocessing(card: dict, with_label: bool = True) -> list:
    """:func:`site_preprocessing` for the input spec recorded in a site card."""
    spec = card["input"]
    return site_preprocessing(
        task=card["task"],
        spatial_dims=card["spatial_dims"],
        in_channels=spec["channels"],
        spatial_size=spec["spatial_size"],
        num_classes=card["classes"]["num_classes"],
        spacing=spec.get("spacing"),
        intensity_range=spec.get("intensity_range"),
        with_label=with_label,
    )
