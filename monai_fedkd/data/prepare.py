"""Dataset preparation: fetch a public release (or read a local mirror), verify it, and convert it to
plain image files plus a MONAI decathlon-style datalist.

Supported datasets (``DATASETS``):

* ``pneumoniamnist``      MedMNIST v2 PneumoniaMNIST, 2D 28x28 binary classification (PNG or NIfTI).
* ``adrenalmnist3d``      MedMNIST v2 AdrenalMNIST3D, 3D 28^3 binary classification (NIfTI).
* ``adrenalmnist3d_64``   the same at 64^3.
* ``ixi``                 IXI T1 brain MRI with DLMUSE region maps merged into a few classes, 3D
                          segmentation (NIfTI). Needs a local mirror (see ``prepare_ixi``).
* ``ixi_axial``           the same subjects and splits as 2D segmentation: one axial slice per subject (2D
                          NIfTI), the one through the centre of its labelled structures; by default the
                          classes without the hippocampus, which few such slices show.

Output layout, ``<output_dir>/<name>/``::

    images/                 one file per sample (train_00000.png, IXI012-HH-1211_T1.nii.gz, ...)
    labels/                 (ixi only) merged uint8 label maps, same geometry as the image
    datalist.json           {"training": [...], "validation": [...], "test": [...]}, relative paths
    dataset_info.json       task description, source, counts and the preparation parameters

Orientation conventions (what MONAI's ``LoadImage`` returns):

* 2D PNG: written in the natural orientation (an image viewer shows the X-ray upright).  MONAI's
  ``PILReader`` returns spatial axes as (x, y), i.e. ``LoadImage()(png) == npz_image.T``.  The 2D NIfTI
  option stores ``npz_image.T`` so that both formats load to the same array in MONAI.
* 3D NIfTI (MedMNIST): the npz array is stored as-is (uint8, identity affine, nominal 1 mm voxels),
  so ``LoadImage()(nii) == npz_volume`` exactly.
* IXI: the T1 file is copied byte-for-byte; the label map gets the image's exact affine and
  qform/sform codes.  ``intensity_range`` in dataset_info.json is the (0.5, 99.5) percentile pair of the
  voxel values as MONAI loads them (after NIfTI scaling), pooled over up to 5 training volumes.

Checksums: a MedMNIST file is accepted when its MD5 equals the official one, or (with a warning) when the
mirror's ``MD5SUMS`` (md5sum format, paths relative to the folder holding it: the mirror root, or the
file's own folder) lists it with its actual MD5.  IXI files are checked against such ``MD5SUMS`` when one is
present (the official T1 tarball publishes no MD5).

Everything is written to a temporary folder next to the target and renamed into place at the end, so a
failed run never leaves a folder that looks complete.  Re-running with the same parameters and the same
source data is a no-op.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "DATASETS",
    "DEFAULT_IXI_CLASSES",
    "ChecksumError",
    "DatasetNotFoundError",
    "add_prepare_arguments",
    "file_md5",
    "kwargs_from_args",
    "main_for",
    "parse_classes",
    "prepare_dataset",
]

logger = logging.getLogger(__name__)

DATASETS = ("pneumoniamnist", "adrenalmnist3d", "adrenalmnist3d_64", "ixi", "ixi_axial")
#: the 2D IXI datasets: name -> the anatomical axis (RAS: 0 sagittal, 1 coronal, 2 axial) a slice is taken across
IXI_PLANES = {"ixi_axial": 2}

#: Bumped when the output layout changes, so older prepared folders are rebuilt.
LAYOUT_VERSION = 1

MIRROR_ENV = "DATA_MIRROR"

ZENODO_RECORD = "https://zenodo.org/records/10519652"

MEDMNIST_CITATION = (
    "Yang J, Shi R, Wei D, Liu Z, Zhao L, Ke B, Pfister H, Ni B. MedMNIST v2 - A large-scale lightweight "
    "benchmark for 2D and 3D biomedical image classification. Scientific Data 10, 41 (2023)."
)

MEDMNIST: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {
        "file": "pneumoniamnist.npz",
        "md5": "28209eda62fecd6e6a2d98b1501bb15f",
        "spatial_dims": 2,
        "class_names": ["normal", "pneumonia"],
        "mirror_subdirs": ("pneumoniamnist",),
        "citation": MEDMNIST_CITATION
        + " Kermany DS et al. Identifying medical diagnoses and treatable diseases by image-based deep "
        "learning. Cell 172(5), 1122-1131 (2018).",
    },
    "adrenalmnist3d": {
        "file": "adrenalmnist3d.npz",
        "md5": "bbd3c5a5576322bc4cdfea780653b1ce",
        "spatial_dims": 3,
        "class_names": ["normal", "hyperplasia"],
        "mirror_subdirs": ("adrenalmnist3d",),
        "citation": MEDMNIST_CITATION,
    },
    "adrenalmnist3d_64": {
        "file": "adrenalmnist3d_64.npz",
        "md5": "17721accfe9fb005146a47d33bc54b2f",
        "spatial_dims": 3,
        "class_names": ["normal", "hyperplasia"],
        # the 64^3 file usually sits next to the 28^3 one
        "mirror_subdirs": ("adrenalmnist3d_64", "adrenalmnist3d"),
        "citation": MEDMNIST_CITATION,
    },
}
for _name, _spec in MEDMNIST.items():
    _spec["url"] = f"{ZENODO_RECORD}/files/{_spec['file']}?download=1"
    _spec["license"] = "CC BY 4.0"

#: MedMNIST split name -> decathlon datalist key
MEDMNIST_SPLITS = (("train", "training"), ("val", "validation"), ("test", "test"))
SPLIT_KEYS = ("training", "validation", "test")

IXI_T1_URL = "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/IXI-T1.tar"
IXI_LICENSE = "CC BY-SA 3.0"
IXI_CITATION = (
    "IXI dataset, https://brain-development.org/ixi-dataset/ (CC BY-SA 3.0). Region label maps: DLMUSE "
    "(CBICA NiChart), produced by a segmentation model, not drawn by hand."
)
IXI_MIRROR_SUBDIRS = (".", "ixi_hh", "ixi", "IXI")
IXI_LAYOUT = (
    "t1/IXI<id>-<site>-<n>_T1.nii.gz, DLMUSE_seg/IXI<id>-<site>-<n>_T1_DLMUSE.nii.gz, participants/participants.csv"
)

#: MUSE region ids merged into each class (background = 0 is implicit), in label order 1..K.
DEFAULT_IXI_CLASSES: dict[str, list[int]] = {
    "lateral_ventricles": [51, 52],
    "thalamus": [59, 60],
    "caudate": [36, 37],
    "putamen": [57, 58],
    "hippocampus": [47, 48],
}
#: the 2D IXI datasets' default: the structures an axial slice through the basal ganglia shows (the hippocampus lies
#: below them, and shows in few such slices, a few voxels of its tail)
DEFAULT_IXI_AXIAL_CLASSES = {k: v for k, v in DEFAULT_IXI_CLASSES.items() if k != "hippocampus"}
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
#: how many training volumes are pooled to estimate the IXI intensity range (0.5 / 99.5 percentiles)
IXI_INTENSITY_SAMPLES = 5
IXI_INTENSITY_PERCENTILES = (0.5, 99.5)


class DatasetNotFoundError(FileNotFoundError):
    """A source file (or the whole mirror) is missing; the message is one line saying where and how to get it."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format "[Errno ...]" variants
        return str(self.args[0]) if self.args else ""


class ChecksumError(RuntimeError):
    """A source file does not match its expected MD5."""


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def file_md5(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _abs(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def read_md5sums(md5sums_file: str | Path) -> dict[str, str]:
    """Parse an ``md5sum``-format file into {absolute normalised path: md5}; paths are relative to its folder."""
    md5sums_file = Path(md5sums_file)
    base = md5sums_file.parent
    table: dict[str, str] = {}
    with open(md5sums_file, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                continue
            digest, rel = parts[0].lower(), parts[1]
            if rel.startswith("*"):  # binary-mode marker
                rel = rel[1:]
            rel = rel.strip()
            if rel.startswith("./"):
                rel = rel[2:]
            table[_abs(base / rel)] = digest
    return table


def _mirror_checksums(mirror: Path, *folders: Path) -> tuple[dict[str, str], list[Path]]:
    """Merge the MD5SUMS found in the mirror root and in the given folders (if inside the mirror)."""
    table: dict[str, str] = {}
    found: list[Path] = []
    candidates = [mirror, *folders]
    seen: set[str] = set()
    for folder in candidates:
        key = _abs(folder)
        if key in seen:
            continue
        seen.add(key)
        md5sums = Path(folder) / "MD5SUMS"
        if md5sums.is_file():
            found.append(md5sums)
            table.update(read_md5sums(md5sums))
    return table, found


def _resolve_mirror(mirror: str | Path | None) -> Path | None:
    if mirror is None or str(mirror) == "":
        env = os.environ.get(MIRROR_ENV, "")
        if not env:
            return None
        mirror = env
    return Path(os.path.expanduser(os.fspath(mirror)))


def _mirror_words(mirror: Path) -> str:
    return f"mirror {mirror}" if mirror.is_dir() else f"mirror {mirror} (no such folder)"


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------------------
# atomic output folder
# ----------------------------------------------------------------------------------------------------------


def _existing_matches(target: Path, parameters: Mapping[str, Any]) -> bool:
    info_file = target / "dataset_info.json"
    datalist_file = target / "datalist.json"
    if not (info_file.is_file() and datalist_file.is_file()):
        return False
    try:
        info = _read_json(info_file)
    except (OSError, ValueError):
        return False
    recorded = info.get("parameters") if isinstance(info, dict) else None
    # compare through JSON so tuples/lists and int/float spellings agree
    return json.loads(json.dumps(recorded)) == json.loads(json.dumps(dict(parameters)))


class _StagingDir:
    """Context manager: a temporary folder next to ``target`` that replaces it on success, vanishes on error."""

    def __init__(self, target: Path):
        self.target = target
        self.path: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like a normal folder
        return self.path

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        old: Path | None = None
        if self.target.exists() or self.target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.rmdir(old)
            os.replace(self.target, old)
        try:
            os.replace(self.path, self.target)
        except BaseException:
            if old is not None:
                os.replace(old, self.target)
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        return False


# ----------------------------------------------------------------------------------------------------------
# getting a MedMNIST source file
# ----------------------------------------------------------------------------------------------------------


def _verify_mirror_file(path: Path, official_md5: str, mirror: Path) -> tuple[str, bool]:
    """Return (actual md5, is_official). Raise ChecksumError unless official or listed in the mirror's MD5SUMS."""
    actual = file_md5(path)
    if actual == official_md5:
        return actual, True
    table, found = _mirror_checksums(mirror, path.parent)
    listed = table.get(_abs(path))
    if listed is not None and listed == actual:
        logger.warning(
            "%s is not the official release (MD5 %s, official %s); accepted because the mirror's %s lists it "
            "with this MD5",
            path,
            actual,
            official_md5,
            " / ".join(str(f) for f in found),
        )
        return actual, False
    if listed is not None:
        raise ChecksumError(
            f"{path}: MD5 {actual} matches neither the official release (expected {official_md5}) nor the "
            f"mirror's MD5SUMS (expected {listed})"
        )
    raise ChecksumError(f"{path}: MD5 mismatch, expected {official_md5} (official release), actual {actual}")


def _download(url: str, dest: Path, expected_md5: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    logger.info("downloading %s -> %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "monai_fedkd-prepare"})
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (fixed https/file URLs)
                shutil.copyfileobj(response, out, length=1 << 20)
        actual = file_md5(tmp)
        if actual != expected_md5:
            raise ChecksumError(f"{url}: downloaded file MD5 mismatch, expected {expected_md5}, actual {actual}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DatasetNotFoundError(
            _one_line(
                f"could not download {url} to {dest} ({reason}); download it by hand to that path, "
                f"or use --mirror DIR / {MIRROR_ENV}=DIR with the file at DIR/{dest.name}"
            )
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _locate_medmnist(name: str, output_dir: Path, mirror: Path | None, url: str | None) -> tuple[Path, str, bool]:
    """Find (or download) the npz; return (path, actual md5, is_official)."""
    spec = MEDMNIST[name]
    filename, official = spec["file"], spec["md5"]
    if mirror is not None:
        candidates = [mirror / sub / filename for sub in spec["mirror_subdirs"]] + [mirror / filename]
        for candidate in candidates:
            if candidate.is_file():
                md5, is_official = _verify_mirror_file(candidate, official, mirror)
                logger.info("using %s (MD5 %s)", candidate, md5)
                return candidate, md5, is_official
        raise DatasetNotFoundError(
            _one_line(
                f"{filename} not found in {_mirror_words(mirror)}: expected {candidates[0]} or {candidates[-1]}; "
                f"put the official file ({spec['url']}) there, or point --mirror DIR / {MIRROR_ENV}=DIR "
                f"at a folder that has it"
            )
        )
    dest = output_dir / "downloads" / filename
    if dest.is_file():
        actual = file_md5(dest)
        if actual == official:
            logger.info("using cached download %s", dest)
            return dest, actual, True
        logger.warning("cached %s has MD5 %s, expected %s; downloading again", dest, actual, official)
    _download(url or spec["url"], dest, official)
    return dest, official, True


# ----------------------------------------------------------------------------------------------------------
# MedMNIST conversion
# ----------------------------------------------------------------------------------------------------------


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image.astype(np.uint8, copy=False))).save(path, format="PNG")


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, header: Any = None) -> None:
    import nibabel as nib

    if affine is None:
        affine = np.eye(4)
    img = nib.Nifti1Image(np.asarray(array), affine, header=header)
    img.set_data_dtype(array.dtype)
    if header is None:
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _prepare_medmnist(
    name: str,
    output_dir: Path,
    mirror: Path | None,
    image_format: str | None,
    max_per_split: int | None,
    seed: int,
    url: str | None = None,
) -> Path:
    spec = MEDMNIST[name]
    dims = spec["spatial_dims"]
    if image_format is None:
        image_format = "png" if dims == 2 else "nifti"
    image_format = image_format.lower()
    if image_format not in ("png", "nifti"):
        raise ValueError(f"unknown image format {image_format!r}; use 'png' or 'nifti'")
    if dims == 3 and image_format != "nifti":
        raise ValueError(f"{name} is 3D and is always written as NIfTI; --format {image_format} is not possible")

    target = output_dir / name
    source, md5, is_official = _locate_medmnist(name, output_dir, mirror, url)
    parameters = {
        "layout_version": LAYOUT_VERSION,
        "source_md5": md5,
        "image_format": image_format,
        "max_per_split": max_per_split,
        "seed": seed,
    }
    if _existing_matches(target, parameters):
        logger.info("%s is already prepared with these parameters; nothing to do", target)
        return target / "datalist.json"

    ext = ".png" if image_format == "png" else ".nii.gz"
    datalist: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    spatial_size: list[int] | None = None
    with np.load(source, allow_pickle=False) as npz, _StagingDir(target) as stage:
        (stage / "images").mkdir()
        for split, key in MEDMNIST_SPLITS:
            images = npz[f"{split}_images"]
            labels = npz[f"{split}_labels"].reshape(len(images), -1)[:, 0]
            if images.ndim != dims + 1:
                raise ValueError(f"{source}: {split}_images has shape {images.shape}, expected {dims}D images")
            n = len(images) if max_per_split is None else min(len(images), max_per_split)
            spatial_size = [int(s) for s in images.shape[1:]]
            items = []
            for i in range(n):
                rel = f"images/{split}_{i:05d}{ext}"
                image = images[i]
                if image_format == "png":
                    _write_png(stage / rel, image)
                elif dims == 2:
                    # stored transposed so MONAI loads the same (x, y) array as from the PNG
                    _write_nifti(stage / rel, np.ascontiguousarray(image.T))
                else:
                    _write_nifti(stage / rel, np.ascontiguousarray(image))
                items.append({"image": rel, "label": int(labels[i])})
            datalist[key] = items
            counts[key] = n
            logger.info("%s: wrote %d %s images", name, n, key)
        if dims == 2 and image_format == "png":
            spacing = None
        else:
            spacing = [1.0] * dims
        info = {
            "name": name,
            "task": "classification",
            "spatial_dims": dims,
            "in_channels": 1,
            "num_classes": len(spec["class_names"]),
            "class_names": list(spec["class_names"]),
            "spatial_size": spatial_size,
            "spacing": spacing,
            "intensity_range": [0, 255],
            "image_format": image_format,
            "orientation": (
                "PNG in natural orientation; MONAI LoadImage returns it as (x, y) = npz image transposed"
                if dims == 2 and image_format == "png"
                else (
                    "NIfTI stores the npz image transposed, so MONAI LoadImage returns (x, y) like the PNG option"
                    if dims == 2
                    else "NIfTI stores the npz volume as-is (identity affine, nominal 1 mm voxels)"
                )
            ),
            "source": {
                "url": spec["url"],
                "md5": spec["md5"],
                "file_md5": md5,
                "official": is_official,
                "license": spec["license"],
                "citation": spec["citation"],
            },
            "counts": counts,
            "parameters": parameters,
        }
        _write_json(stage / "datalist.json", datalist)
        _write_json(stage / "dataset_info.json", info)
    logger.info("prepared %s in %s", name, target)
    return target / "datalist.json"


# ----------------------------------------------------------------------------------------------------------
# IXI
# ----------------------------------------------------------------------------------------------------------


def parse_classes(classes: str | Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Normalise a class spec: a mapping name -> region ids, a JSON object string, or
    ``"name=51,52;other=59,60"``.  ``None`` gives ``DEFAULT_IXI_CLASSES``."""
    if classes is None:
        return {k: list(v) for k, v in DEFAULT_IXI_CLASSES.items()}
    if isinstance(classes, str):
        text = classes.strip()
        if text.startswith("{"):
            parsed: Any = json.loads(text)
        else:
            parsed = {}
            for part in text.replace("\n", ";").split(";"):
                part = part.strip()
                if not part:
                    continue
                if "=" not in part:
                    raise ValueError(f"bad class spec {part!r}; expected name=id,id,...")
                cname, ids = part.split("=", 1)
                parsed[cname.strip()] = [int(x) for x in ids.replace(" ", ",").split(",") if x.strip()]
        classes = parsed
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError("classes must be a non-empty mapping name -> list of region ids")
    result: dict[str, list[int]] = {}
    used: dict[int, str] = {}
    for cname, ids in classes.items():
        cname = str(cname)
        if cname == "background":
            raise ValueError("'background' is implicit (label 0); do not list it in classes")
        if isinstance(ids, (int, np.integer)):
            ids = [ids]
        id_list = [int(i) for i in ids]
        if not id_list:
            raise ValueError(f"class {cname!r} has no region ids")
        for rid in id_list:
            if rid in used:
                raise ValueError(f"region id {rid} is listed in both {used[rid]!r} and {cname!r}")
            used[rid] = cname
        result[cname] = id_list
    if len(result) > 254:
        raise ValueError("at most 254 classes fit in a uint8 label map")
    return result


def merge_labels(seg: np.ndarray, classes: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Map region ids to class indices 1..K (in ``classes`` order); everything else is 0."""
    out = np.zeros(seg.shape, dtype=np.uint8)
    for index, ids in enumerate(classes.values(), start=1):
        out[np.isin(seg, list(ids))] = index
    return out


def _locate_ixi(mirror: Path | None) -> Path:
    if mirror is None:
        raise DatasetNotFoundError(
            _one_line(
                f"IXI needs a local mirror: the official T1 release ({IXI_T1_URL}) has no published MD5 and the "
                f"DLMUSE label maps (CBICA NiChart) have no official direct download; pass --mirror DIR "
                f"(or set {MIRROR_ENV}=DIR) for a folder laid out as {IXI_LAYOUT}"
            )
        )
    for sub in IXI_MIRROR_SUBDIRS:
        root = mirror / sub if sub != "." else mirror
        if (root / "t1").is_dir():
            return root
    raise DatasetNotFoundError(
        _one_line(
            f"IXI not found in {_mirror_words(mirror)}: expected {mirror}/t1/ "
            f"(or {mirror}/ixi_hh/t1/, {mirror}/ixi/t1/) "
            f"laid out as {IXI_LAYOUT}; point --mirror DIR / {MIRROR_ENV}=DIR at such a folder "
            f"(T1 release: {IXI_T1_URL})"
        )
    )


def _read_participants(path: Path) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        logger.warning("no participants table at %s; age and sex will be null", path)
        return table
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for row in csv.DictReader(fh):
            row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            mrid = row.get("mrid") or row.get("subject") or row.get("id")
            if not mrid:
                continue
            try:
                age: float | None = float(row.get("age", ""))
                if not np.isfinite(age):
                    age = None
            except ValueError:
                age = None
            sex_raw = row.get("sex", "").upper()
            sex = {"M": "M", "MALE": "M", "1": "M", "F": "F", "FEMALE": "F", "2": "F"}.get(sex_raw)
            table[mrid] = {"age": age, "sex": sex}
    return table


def _split_subjects(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    order = sorted(subjects)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    n_train = n - n_val - n_test
    return {
        "training": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def _verify_listed(path: Path, table: Mapping[str, str], unlisted: list[Path]) -> str:
    actual = file_md5(path)
    expected = table.get(_abs(path))
    if expected is None:
        unlisted.append(path)
    elif expected != actual:
        raise ChecksumError(f"{path}: MD5 mismatch with the mirror's MD5SUMS, expected {expected}, actual {actual}")
    return actual


def _prepare_ixi(
    output_dir: Path,
    mirror: Path | None,
    image_format: str | None,
    max_per_split: int | None,
    seed: int,
    classes: str | Mapping[str, Sequence[int]] | None = None,
    split_fractions: Sequence[float] | None = None,
    name: str = "ixi",
) -> Path:
    import nibabel as nib

    axis = IXI_PLANES.get(name)  # None: whole 3D volumes
    if image_format not in (None, "nifti"):
        raise ValueError(f"{name} is always written as NIfTI; --format {image_format} is not possible")
    class_map = parse_classes(DEFAULT_IXI_AXIAL_CLASSES if classes is None and axis is not None else classes)
    fractions = tuple(float(f) for f in (split_fractions or DEFAULT_SPLIT_FRACTIONS))
    root = _locate_ixi(mirror)
    assert mirror is not None

    t1_files = sorted((root / "t1").glob("IXI*_T1.nii.gz"))
    subjects: dict[str, tuple[Path, Path]] = {}
    missing_labels = []
    for t1 in t1_files:
        mrid = t1.name[: -len("_T1.nii.gz")]
        seg = root / "DLMUSE_seg" / f"{mrid}_T1_DLMUSE.nii.gz"
        if seg.is_file():
            subjects[mrid] = (t1, seg)
        else:
            missing_labels.append(mrid)
    if missing_labels:
        logger.warning(
            "%d IXI subjects have no DLMUSE label map and are skipped: %s", len(missing_labels), missing_labels
        )
    if not subjects:
        raise DatasetNotFoundError(
            _one_line(
                f"no IXI subject with both {root}/t1/<MRID>_T1.nii.gz and {root}/DLMUSE_seg/<MRID>_T1_DLMUSE.nii.gz; "
                f"point --mirror DIR / {MIRROR_ENV}=DIR at a folder laid out as {IXI_LAYOUT}"
            )
        )

    splits = _split_subjects(list(subjects), fractions, seed)
    if max_per_split is not None:
        splits = {k: v[:max_per_split] for k, v in splits.items()}

    # verify every file that will be used, and fingerprint them for the idempotency check
    table, found = _mirror_checksums(mirror, root)
    if not found:
        logger.warning("no MD5SUMS in %s or %s; IXI files are used without verification", mirror, root)
    participants_file = root / "participants" / "participants.csv"
    used = [p for key in SPLIT_KEYS for mrid in splits[key] for p in subjects[mrid]]
    if participants_file.is_file():
        used.append(participants_file)
    unlisted: list[Path] = []
    fingerprint = hashlib.md5()
    for path in used:
        digest = _verify_listed(path, table, unlisted)
        fingerprint.update(f"{digest}  {os.path.relpath(path, root)}\n".encode())
    if found and unlisted:
        logger.warning(
            "%d used IXI files are not listed in %s (not verified), e.g. %s",
            len(unlisted),
            " / ".join(str(f) for f in found),
            unlisted[0],
        )

    target = output_dir / name
    parameters = {
        "layout_version": LAYOUT_VERSION,
        "source_md5": fingerprint.hexdigest(),
        "image_format": "nifti",
        "max_per_split": max_per_split,
        "seed": seed,
        "classes": class_map,
        "split_fractions": list(fractions),
        **({} if axis is None else {"slice_axis": axis}),
    }
    if _existing_matches(target, parameters):
        logger.info("%s is already prepared with these parameters; nothing to do", target)
        return target / "datalist.json"

    participants = _read_participants(participants_file)
    no_meta = [m for key in SPLIT_KEYS for m in splits[key] if m not in participants]
    if no_meta:
        logger.warning(
            "%d IXI subjects are missing from %s (age/sex null): %s", len(no_meta), participants_file, no_meta
        )

    datalist: dict[str, list[dict[str, Any]]] = {}
    shapes: set[tuple[int, ...]] = set()
    spacings: set[tuple[float, ...]] = set()
    intensity_samples: list[np.ndarray] = []
    with _StagingDir(target) as stage:
        (stage / "images").mkdir()
        (stage / "labels").mkdir()
        for key in SPLIT_KEYS:
            items = []
            for mrid in splits[key]:
                t1_path, seg_path = subjects[mrid]
                image = nib.load(str(t1_path))
                seg = nib.load(str(seg_path))
                if tuple(image.shape) != tuple(seg.shape):
                    raise ValueError(
                        f"IXI subject {mrid}: image shape {tuple(image.shape)} ({t1_path}) differs from label shape "
                        f"{tuple(seg.shape)} ({seg_path})"
                    )
                if not np.allclose(image.affine, seg.affine, atol=1e-3):
                    logger.warning("IXI subject %s: label affine differs from the image's; using the image's", mrid)
                seg_data = np.asarray(seg.dataobj)
                merged = merge_labels(seg_data, class_map)
                label_img = nib.Nifti1Image(merged, image.affine)
                label_img.set_data_dtype(np.uint8)
                qform, qcode = image.header.get_qform(coded=True)
                sform, scode = image.header.get_sform(coded=True)
                label_img.set_qform(qform if qform is not None else image.affine, code=int(qcode))
                label_img.set_sform(sform if sform is not None else image.affine, code=int(scode))
                label_img.header.set_xyzt_units(*image.header.get_xyzt_units())
                image_rel = f"images/{mrid}_T1.nii.gz"
                label_rel = f"labels/{mrid}_seg.nii.gz"
                extra: dict[str, Any] = {}
                if axis is None:
                    shutil.copyfile(t1_path, stage / image_rel)
                    nib.save(label_img, str(stage / label_rel))
                else:
                    image, label_img, index = _ixi_slice(image, label_img, axis, mrid)
                    nib.save(image, str(stage / image_rel))
                    nib.save(label_img, str(stage / label_rel))
                    extra["slice"] = index
                shapes.add(tuple(int(s) for s in image.shape))
                spacings.add(tuple(round(float(z), 6) for z in image.header.get_zooms()[: 3 if axis is None else 2]))
                if key == "training" and len(intensity_samples) < IXI_INTENSITY_SAMPLES:
                    intensity_samples.append(np.asarray(image.dataobj).ravel())
                meta = participants.get(mrid, {})
                items.append(
                    {
                        "image": image_rel,
                        "label": label_rel,
                        "subject": mrid,
                        "age": meta.get("age"),
                        "sex": meta.get("sex"),
                        **extra,
                    }
                )
            datalist[key] = items
            logger.info("%s: wrote %d %s subjects", name, len(items), key)
        if len(shapes) > 1:
            logger.warning("IXI volumes have different shapes %s; spatial_size is null", sorted(shapes))
        if len(spacings) > 1:
            logger.warning("IXI volumes have different spacings %s; spacing is null", sorted(spacings))
        intensity_range = None
        if intensity_samples:
            lo, hi = np.percentile(np.concatenate(intensity_samples), IXI_INTENSITY_PERCENTILES)
            intensity_range = [float(lo), float(hi)]
        info = {
            "name": name,
            "task": "segmentation",
            "spatial_dims": 3 if axis is None else 2,
            "in_channels": 1,
            "modality": "MR",
            "num_classes": 1 + len(class_map),
            "class_names": ["background", *class_map],
            "classes": class_map,
            "spatial_size": list(next(iter(shapes))) if len(shapes) == 1 else None,
            "spacing": list(next(iter(spacings))) if len(spacings) == 1 else None,
            "intensity_range": intensity_range,
            "intensity_range_note": (
                f"percentiles {list(IXI_INTENSITY_PERCENTILES)} of the voxel values as loaded (stored values after the "
                f"NIfTI scl_slope/scl_inter scaling, as MONAI's readers return them) pooled over the first "
                f"{len(intensity_samples)} training {'volumes' if axis is None else 'slices'} (all voxels, background included)"
            ),
            "image_format": "nifti",
            "metadata_keys": ["subject", "age", "sex", *([] if axis is None else ["slice"])],
            "source": {
                "url": IXI_T1_URL,
                "md5": None,
                "mirror": str(root),
                "license": IXI_LICENSE,
                "citation": IXI_CITATION,
            },
            "counts": {key: len(datalist[key]) for key in SPLIT_KEYS},
            "parameters": parameters,
        }
        _write_json(stage / "datalist.json", datalist)
        _write_json(stage / "dataset_info.json", info)
    logger.info("prepared %s in %s", name, target)
    return target / "datalist.json"


def _ixi_slice(image, label, axis: int, mrid: str):
    """The 2D slice across RAS ``axis`` through the centre of mass of the subject's labelled structures, as 2D NIfTI
    images (image and label) whose affine places the slice where it lies in the volume, and the slice's index.

    The slice is chosen from the label so that every subject's slice shows the merged structures (a fixed index would
    miss them in heads placed differently in the field of view)."""
    import nibabel as nib

    image, label = nib.as_closest_canonical(image), nib.as_closest_canonical(label)
    labels = np.asarray(label.dataobj)
    foreground = np.nonzero(labels)[axis]
    if foreground.size == 0:
        raise ValueError(f"IXI subject {mrid}: its merged label map has no foreground voxel; no slice through its structures")
    index = int(round(float(foreground.mean())))
    take = [slice(None)] * 3
    take[axis] = index
    kept = [a for a in range(3) if a != axis]
    # the 2D affine keeps the in-plane voxel axes' columns and moves the origin to the slice
    affine = np.eye(4)
    affine[:3, :2] = image.affine[:3, kept]
    affine[:3, 3] = image.affine[:3, 3] + image.affine[:3, axis] * index
    plane = np.ascontiguousarray(np.asarray(image.dataobj)[tuple(take)])
    out_image = nib.Nifti1Image(plane.astype(np.float32) if plane.dtype.kind == "f" else plane, affine)
    out_label = nib.Nifti1Image(np.ascontiguousarray(labels[tuple(take)]).astype(np.uint8), affine)
    for out in (out_image, out_label):
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        out.header.set_xyzt_units(*image.header.get_xyzt_units())
    return out_image, out_label, index


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------


def prepare_dataset(
    name: str,
    output_dir: str | Path,
    mirror: str | Path | None = None,
    image_format: str | None = None,
    max_per_split: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Path:
    """Prepare ``name`` under ``output_dir/<name>/`` and return the path of its ``datalist.json``.

    Args:
        name: one of ``DATASETS``.
        output_dir: parent folder of the prepared dataset (downloads go to ``output_dir/downloads/``).
        mirror: local folder with the source files (``DIR/<name>/<file>`` or ``DIR/<file>``; for IXI a folder
            laid out like ``ixi_hh``, or its parent).  ``None`` falls back to ``$DATA_MIRROR``, then to
            downloading the official release (MedMNIST only).
        image_format: ``"png"`` (2D default) or ``"nifti"``; 3D data is always NIfTI.
        max_per_split: keep at most this many samples per split (the first N; for quick tests).
        seed: IXI subject split seed (recorded for MedMNIST too, whose official splits are kept).
        kwargs: ``classes`` (IXI: mapping name -> region ids, or ``"a=1,2;b=3"``), ``split_fractions``
            (IXI: train/val/test, default 0.7/0.1/0.2), ``url`` (MedMNIST: override the download URL).
            Options that do not apply to ``name`` must be ``None``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if "format" in kwargs and image_format is None:
        image_format = kwargs.pop("format")
    kwargs.pop("format", None)
    if max_per_split is not None:
        max_per_split = int(max_per_split)
        if max_per_split < 0:
            raise ValueError("max_per_split must be >= 0")
    seed = int(seed if seed is not None else 0)
    allowed = {"classes", "split_fractions"} if name.startswith("ixi") else {"url"}
    extra = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise TypeError(f"option(s) {unknown} do not apply to {name}")
    output_dir = Path(os.path.expanduser(os.fspath(output_dir)))
    mirror_path = _resolve_mirror(mirror)
    if name.startswith("ixi"):
        return _prepare_ixi(output_dir, mirror_path, image_format, max_per_split, seed, **extra, name=name)
    return _prepare_medmnist(name, output_dir, mirror_path, image_format, max_per_split, seed, **extra)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options shared by ``monai-fedkd prepare NAME`` and the ``sample_data_scripts`` wrappers."""
    parser.add_argument(
        "--output", default="data", metavar="DIR", help="parent folder; the dataset goes to DIR/<name>/ (default: data)"
    )
    parser.add_argument(
        "--mirror",
        default=None,
        metavar="DIR",
        help=f"local copy of the source files instead of downloading (default: ${MIRROR_ENV} if set)",
    )
    parser.add_argument(
        "--format",
        dest="format",
        choices=("png", "nifti"),
        default=None,
        help="2D image file format (default png); 3D data is always NIfTI",
    )
    parser.add_argument(
        "--max-per-split", type=int, default=None, metavar="N", help="keep the first N samples per split"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the IXI subject split (default 0)")
    parser.add_argument(
        "--classes",
        default=None,
        metavar="SPEC",
        help="ixi only: merged classes as 'name=id,id;name=id,id' or a JSON object "
        "(default: lateral_ventricles=51,52;thalamus=59,60;caudate=36,37;putamen=57,58;hippocampus=47,48; "
        "--plane axial leaves the hippocampus out)",
    )
    parser.add_argument(
        "--split-fractions",
        default=None,
        metavar="TR,VA,TE",
        help="ixi only: train/validation/test fractions (default 0.7,0.1,0.2)",
    )


def kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Turn the options added by ``add_prepare_arguments`` into ``prepare_dataset`` keyword arguments."""
    fractions = getattr(args, "split_fractions", None)
    if isinstance(fractions, str):
        fractions = [float(x) for x in fractions.split(",") if x.strip()]
    return {
        "mirror": getattr(args, "mirror", None),
        "image_format": getattr(args, "format", None),
        "max_per_split": getattr(args, "max_per_split", None),
        "seed": getattr(args, "seed", 0),
        "classes": getattr(args, "classes", None),
        "split_fractions": fractions,
    }


def main_for(name: str, argv: Sequence[str] | None = None) -> int:
    """Command-line entry for one dataset (used by ``sample_data_scripts/prepare_*.py``). Returns the exit code."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    parser = argparse.ArgumentParser(
        prog=f"prepare_{name}",
        description=f"Prepare {name}: download the official release or read a local mirror, verify checksums, "
        "write plain image files, datalist.json (MONAI decathlon layout) and dataset_info.json.",
    )
    add_prepare_arguments(parser)
    if name.startswith("adrenalmnist3d"):
        parser.add_argument(
            "--size", type=int, choices=(28, 64), default=64 if name.endswith("_64") else 28, help="volume size"
        )
    if name.startswith("ixi"):
        parser.add_argument(
            "--plane", choices=[n[len("ixi_"):] for n in IXI_PLANES], default=None,
            help="write 2D slices across this plane (one per subject, through its structures) instead of 3D volumes",
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if name.startswith("adrenalmnist3d"):
        name = "adrenalmnist3d_64" if args.size == 64 else "adrenalmnist3d"
    if name.startswith("ixi") and args.plane is not None:
        name = f"ixi_{args.plane}"
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    kwargs = kwargs_from_args(args)
    if not name.startswith("ixi"):
        for key in ("classes", "split_fractions"):
            if kwargs.pop(key) is not None:
                parser.error(f"--{key.replace('_', '-')} applies to ixi only")
    try:
        datalist = prepare_dataset(name, args.output, **kwargs)
    except (DatasetNotFoundError, ChecksumError, ValueError, TypeError, OSError) as exc:
        sys.stderr.write(f"error: {_one_line(str(exc))}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    logger.info("datalist: %s", datalist)
    return 0
