"""Inference runtime of an exported model bundle: finds the studies, runs them one by one, writes the reports.

This file is copied into every exported bundle as ``scripts/fedkd_inference.py`` and runs there with plain MONAI,
PyTorch and NumPy (pydicom, which MONAI's DICOM reader needs anyway, sorts loose DICOM files into series). It must
therefore import nothing from ``monai_fedkd``.

What it adds to a MONAI ``SupervisedEvaluator``, because a hospital pipeline needs it and MONAI has no such part:

- :func:`find_studies`: a folder of image files, of DICOM series (one sub-folder per series, or loose files sorted
  into series by SeriesInstanceUID) or a datalist becomes a list of studies, each with an identifier;
- :class:`StudyDataset` and :class:`StudyIteration`: a study that cannot be read, has the wrong channel count or
  modality, or fails during inference is recorded with its reason and the run goes on with the next study;
- :class:`StudyReport`: the masks (segmentation, written under a temporary name and renamed; optionally a DICOM-SEG
  object per DICOM study, with highdicom), the per-study CSV (class probabilities, or label volumes in mm^3),
  ``errors.csv``, and an exit status equal to the number of failed studies (capped at 100), so a pipeline can tell
  a clean run from a partial one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from monai.config import KeysCollection
from monai.data import Dataset
from monai.transforms import MapTransform

__all__ = ["CheckStudyd", "StudyDataset", "StudyError", "StudyIteration", "StudyReport", "bundle_root", "find_studies", "write_dicom_seg", "EXIT_CAP"]

logger = logging.getLogger("fedkd_inference")

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".mha", ".mhd", ".nrrd")
# DICOM objects that carry no image a model can read
NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC", "AU", "ECG"}
EXIT_CAP = 100  # exit statuses above 125 mean signals to a shell; 100 reads "100 or more studies failed"
STAGING = ".series"  # loose DICOM files of one series are linked here, one folder per series


def bundle_root() -> str:
    """The exported bundle's folder (this file is its ``scripts/fedkd_inference.py``), wherever it is run from."""
    return str(Path(__file__).resolve().parents[1])


class StudyError(ValueError):
    """A study that this model cannot be run on; the message is the reason written to ``errors.csv``."""


def _strip_suffix(name: str) -> str:
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_header(path: Path):
    import pydicom

    return pydicom.dcmread(str(path), stop_before_pixels=True)


def _series_items(files: Sequence[Path], output_dir: Path, modality: str | None) -> tuple[list[dict], list[dict]]:
    """Group DICOM files by folder and SeriesInstanceUID; a series that fills its folder is read from there, others
    are staged as a folder of links. The same series copied into two folders stays two studies."""
    series: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    info: dict[tuple[Path, str], str] = {}
    errors = []
    for f in files:
        try:
            ds = _dicom_header(f)
            key = (f.parent, str(ds.SeriesInstanceUID))
        except Exception as e:  # not DICOM after all, truncated, or no series UID
            errors.append({"study": f.name, "source": str(f), "reason": f"unreadable DICOM file: {type(e).__name__}: {e}"})
            continue
        series[key].append(f)
        info.setdefault(key, str(getattr(ds, "Modality", "") or "").upper())
    items = []
    for n, ((folder, uid), members) in enumerate(sorted(series.items())):
        found, source = info[(folder, uid)], str(folder)
        if found in NON_IMAGE_MODALITIES:
            errors.append({"study": uid, "source": source, "reason": f"DICOM series of modality {found} holds no image"})
            continue
        if modality and found and found != modality.upper():
            errors.append({"study": uid, "source": source, "reason": f"DICOM series modality is {found}, the model expects {modality}"})
            continue
        folder_files = {p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
        if folder_files == set(members):
            image = folder
        else:  # the folder holds other series or other files: read this series from a folder of links
            image = output_dir / STAGING / f"{n}_{uid}"
            if image.exists():
                shutil.rmtree(image)
            image.mkdir(parents=True)
            for m in members:
                try:
                    (image / m.name).symlink_to(m.resolve())
                except OSError:  # file systems without symbolic links
                    shutil.copy2(m, image / m.name)
        items.append({"image": str(image), "study": uid, "source": source})
    return items, errors


def find_studies(
    input_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    datalist_key: str = "test",
    output_dir: str | os.PathLike = ".",
    modality: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """The studies to run, as ``(items, errors)``.

    ``items`` are ``{"image", "study", "source"}``: ``image`` is what MONAI's ``LoadImaged`` reads (a file or a
    folder holding one DICOM series), ``study`` the identifier in the reports (file name without suffix, or the
    SeriesInstanceUID), ``source`` where it came from. ``errors`` are studies refused before reading, with a reason:
    DICOM files that cannot be parsed, non-image series (SR, PR, ...) and series of another ``modality`` than the
    model's (``None`` accepts any).

    From ``input_dir``: every image file directly in it is one study; DICOM files anywhere below it are sorted into
    series by SeriesInstanceUID. From ``datalist`` (MONAI decathlon layout): each item of ``datalist_key``.
    """
    output_dir = Path(output_dir)
    if datalist:
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist {path} does not exist")
        entries = json.loads(path.read_text()).get(datalist_key)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"datalist {path} has no non-empty '{datalist_key}' list")
        items = []
        for i, e in enumerate(entries):
            image = e["image"] if isinstance(e, dict) else e
            image = Path(image) if os.path.isabs(image) else path.parent / image
            study = _strip_suffix(image.name) if image.is_file() or not image.exists() else image.name
            items.append({"image": str(image), "study": study, "source": str(image)})
        return _unique_ids(items), []
    if not input_dir:
        raise ValueError("give the studies as input_dir (a folder) or datalist")
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir {root} does not exist or is not a folder")
    items, dicom_files = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or any(part.startswith(".") for part in p.relative_to(root).parts[:-1]):
            continue
        if p.parent == root and p.name.lower().endswith(IMAGE_SUFFIXES):
            items.append({"image": str(p), "study": _strip_suffix(p.name), "source": str(p)})
        elif _is_dicom(p):
            dicom_files.append(p)
    series, errors = _series_items(dicom_files, output_dir, modality)
    items += series
    if not items and not errors:
        raise ValueError(f"input_dir {root} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series")
    return _unique_ids(items), errors


def _unique_ids(items: list[dict]) -> list[dict]:
    """Two studies with the same file name (from different folders) get ``_2``, ``_3``... so outputs never collide."""
    seen: dict[str, int] = defaultdict(int)
    for item in items:
        seen[item["study"]] += 1
        if seen[item["study"]] > 1:
            item["study"] = f"{item['study']}_{seen[item['study']]}"
    return items


class CheckStudyd(MapTransform):
    """Right after loading: the image must have the model's spatial dimensions and channels, and finite values.

    A wrong channel count (an RGB export for a grey-scale model) would otherwise surface as a shape error deep
    inside the network, or not at all after resizing.
    """

    def __init__(self, keys: KeysCollection = "image", spatial_dims: int = 3, in_channels: int = 1) -> None:
        super().__init__(keys)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != self.spatial_dims + 1:
                raise StudyError(f"image has shape {tuple(image.shape)} (channel first): the model expects {self.spatial_dims} spatial dimensions")
            if image.shape[0] != self.in_channels:
                raise StudyError(f"image has {image.shape[0]} channels, the model expects {self.in_channels}")
            if not torch.isfinite(torch.as_tensor(image)).all():
                raise StudyError("image contains NaN or Inf values")
        return d


class StudyDataset(Dataset):
    """A ``monai.data.Dataset`` whose failing items become ``{"study", "source", "error"}`` instead of an exception."""

    def _transform(self, index: int):
        item = self.data[index]
        start = time.perf_counter()
        try:
            d = super()._transform(index)
        except Exception as e:
            return {"study": item["study"], "source": item["source"], "error": _reason(e)}
        d["load_seconds"] = time.perf_counter() - start  # reported per study with the inference time
        d["path"] = item["image"]  # what was read: a DICOM-SEG refers to the files of this series
        return d


def _reason(e: BaseException) -> str:
    """``<transform>: <error type>: <first line>``, looking through MONAI's "applying transform" wrappers."""
    stage = None
    while True:
        inner = e.__cause__ or e.__context__
        wrapper = re.match(r"applying transform <([\w.]+)", str(e))
        if wrapper is None or inner is None:
            break
        stage, e = wrapper.group(1).rsplit(".", 1)[-1], inner
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    reason = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return f"{stage}: {reason}" if stage else reason


def _frames_on_source_grid(mask: np.ndarray, affine: np.ndarray, sources: Sequence) -> np.ndarray:
    """The label map sampled at every pixel of every source DICOM image (nearest voxel): ``(frames, rows, cols)``.

    Works from geometry alone (ImagePositionPatient, ImageOrientationPatient, PixelSpacing against the mask's RAS
    affine), so it does not depend on how the reader ordered slices or axes.
    """
    inv = np.linalg.inv(affine)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    frames = []
    for ds in sources:
        rows, cols = int(ds.Rows), int(ds.Columns)
        origin = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_dir, col_dir = iop[:3], iop[3:]  # direction of increasing column index, of increasing row index
        dr, dc = (float(v) for v in ds.PixelSpacing)  # spacing between rows, between columns
        i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = origin + j[..., None] * dc * row_dir + i[..., None] * dr * col_dir
        ras = lps * lps_to_ras
        vox = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        inside = np.all((vox >= 0) & (vox < np.asarray(mask.shape)), axis=-1)
        frame = np.zeros((rows, cols), dtype=np.uint8)
        v = vox[inside]
        frame[inside] = mask[v[:, 0], v[:, 1], v[:, 2]]
        frames.append(frame)
    return np.stack(frames)


def write_dicom_seg(mask, series_dir: str | os.PathLike, class_names: Sequence[str], path: str | os.PathLike, model_name: str) -> None:
    """A DICOM Segmentation object (highdicom) of ``mask`` over the source series in ``series_dir``.

    Segment ``k`` is label value ``k`` (``class_names[k]``); background (0) is no segment.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = sorted(p for p in Path(series_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    sources = [pydicom.dcmread(str(f)) for f in files]
    array = np.asarray(torch.as_tensor(mask).cpu(), dtype=np.uint8)
    array = array[0] if array.ndim == 4 else array
    frames = _frames_on_source_grid(array, np.asarray(mask.affine, dtype=np.float64), sources)
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version="1", family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(segment_number=k, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
                                  segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                  algorithm_identification=algorithm)
        for k, name in enumerate(class_names) if k > 0
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=999, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="monai_fedkd", manufacturer_model_name=model_name[:64], software_versions="1",
        device_serial_number="none", omit_empty_frames=False,
    )
    seg.save_as(str(path))


class StudyReport:
    """Collects per-study results and errors; writes the CSVs (and the masks) and sets the exit status.

    Args:
        output_dir: where ``predictions.csv`` or ``label_volumes.csv``, ``errors.csv`` and the masks go.
        task: ``"classification"`` or ``"segmentation"``.
        class_names: the model's classes, in output-channel order (label value ``i`` is ``class_names[i]``).
        mask_saver: a ``monai.transforms.SaveImage`` for the masks (segmentation).
        exit_on_failure: end the process with the number of failed studies as its status.
    """

    def __init__(self, output_dir: str, task: str, class_names: Sequence[str], mask_saver=None, dicom_seg: bool = False,
                 model_name: str = "model", exit_on_failure: bool = True) -> None:
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
        if dicom_seg:
            try:
                import highdicom  # noqa: F401
            except ImportError:
                raise ImportError("dicom_seg=true needs highdicom: pip install highdicom (or set dicom_seg false)") from None
        self.output_dir = Path(output_dir)
        self.task, self.class_names = task, list(class_names)
        self.mask_saver, self.dicom_seg, self.model_name, self.exit_on_failure = mask_saver, dicom_seg, model_name, exit_on_failure
        self.rows: list[dict] = []
        self.errors: list[dict] = []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.table_path, self.errors_path):  # an earlier run's reports must not look like this run's
            if stale.exists():
                stale.unlink()

    @property
    def table_path(self) -> Path:
        return self.output_dir / ("predictions.csv" if self.task == "classification" else "label_volumes.csv")

    @property
    def errors_path(self) -> Path:
        return self.output_dir / "errors.csv"

    def add_errors(self, errors: Sequence[Mapping]) -> None:
        for e in errors:
            logger.error("study %s (%s) failed: %s", e["study"], e["source"], e["reason"])
            self.errors.append(dict(e))

    def add_result(self, item: Mapping, pred: torch.Tensor, seconds: float | None = None) -> None:
        study, source = _first(item["study"]), _first(item["source"])
        timing = {"seconds": f"{seconds:.3f}" if seconds is not None else ""}
        if self.task == "classification":
            probs = torch.as_tensor(pred).detach().float().cpu().reshape(-1)
            if probs.numel() != len(self.class_names):
                raise StudyError(f"model gave {probs.numel()} outputs for {len(self.class_names)} classes")
            row = {"study": study, "source": source}
            row.update({f"prob_{n}": f"{float(p):.6f}" for n, p in zip(self.class_names, probs)})
            row["predicted_class"] = self.class_names[int(probs.argmax())]
            self.rows.append({**row, **timing})
            return
        mask = pred  # channel-first label map in the study's own geometry
        affine = np.asarray(getattr(mask, "affine", np.eye(4)), dtype=np.float64)
        spatial = affine.shape[0] - 1
        voxel_mm3 = float(abs(np.linalg.det(affine[:spatial, :spatial])))
        counts = np.bincount(np.asarray(torch.as_tensor(mask).cpu(), dtype=np.int64).ravel(), minlength=len(self.class_names))
        ext = self.mask_saver.output_ext
        row = {"study": study, "source": source, "mask": f"{study}_seg{ext}", "voxel_mm3": f"{voxel_mm3:.6g}"}
        # every file of the study is written under a temporary name and renamed only when all of them are complete
        staged = [(self.output_dir / f".{study}_seg.partial{ext}", self.output_dir / row["mask"])]
        try:
            self.mask_saver(mask, filename=str(self.output_dir / f".{study}_seg.partial"))
            if self.dicom_seg:  # studies read from a DICOM series (NIfTI studies have no source images to refer to)
                series = Path(_first(item["path"]))
                row["dicom_seg"] = f"{study}_seg.dcm" if series.is_dir() else ""
                if series.is_dir():
                    staged.append((self.output_dir / f".{study}_seg.partial.dcm", self.output_dir / row["dicom_seg"]))
                    write_dicom_seg(mask, series, self.class_names, staged[-1][0], self.model_name)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in staged:
            os.replace(tmp, final)
        row.update({f"{n}_mm3": f"{c * voxel_mm3:.6g}" for n, c in zip(self.class_names, counts)})
        self.rows.append({**row, **timing})

    def add_failure(self, item: Mapping, reason: str) -> None:
        self.add_errors([{"study": _first(item["study"]), "source": _first(item["source"]), "reason": reason}])

    def finish(self) -> int:
        """Write the CSVs (temporary name, then rename); return, or exit with, the number of failed studies."""
        _write_csv(self.table_path, self.rows)
        _write_csv(self.errors_path, self.errors, fields=["study", "source", "reason"])
        staging = self.output_dir / STAGING
        if staging.exists():
            shutil.rmtree(staging)
        failed = len(self.errors)
        total = failed + len(self.rows)
        msg = f"{len(self.rows)} of {total} studies done, {failed} failed; results in {self.table_path}"
        print(msg + (f", reasons in {self.errors_path}" if failed else ""), flush=True)
        if failed and self.exit_on_failure:
            sys.exit(min(failed, EXIT_CAP))
        return failed


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) else v


def _write_csv(path: Path, rows: Sequence[Mapping], fields: Sequence[str] | None = None) -> None:
    fields = list(fields or (rows[0].keys() if rows else ["study", "source"]))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class StudyIteration:
    """``iteration_update`` for a ``SupervisedEvaluator`` (batch size 1): run one study, or record why it failed.

    Reading errors arrive from :class:`StudyDataset` as an ``error`` entry; errors during inference or
    post-processing are caught here. Either way the engine goes on with the next study.
    """

    def __init__(self, report: StudyReport) -> None:
        self.report = report

    def __call__(self, engine, batch: Mapping) -> dict:
        if "error" in batch:
            self.report.add_failure(batch, _first(batch["error"]))
            return {}
        start = time.perf_counter()
        try:
            output = engine._iteration(engine, batch)
            results = output if isinstance(output, list) else [output]  # decollated by the postprocessing
            if len(results) != 1:
                raise StudyError(f"expected one study per batch, got {len(results)} (set batch_size to 1)")
            seconds = float(_first(batch["load_seconds"])) + time.perf_counter() - start
            self.report.add_result(batch, results[0]["pred"], seconds)
            return {}
        except Exception as e:
            self.report.add_failure(batch, _reason(e))
            return {}
