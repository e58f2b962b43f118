"""Reading MONAI decathlon-layout datalists with errors that name the file and the cause."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from monai.data import load_decathlon_datalist

__all__ = ["DatalistError", "inference_items", "load_datalist", "load_datalists"]

TASKS = ("classification", "segmentation")


class DatalistError(ValueError):
    """A datalist that does not follow the decathlon layout, is empty, or points at missing files."""


def _image_exists(path: str) -> bool:
    # a DICOM series is given as a directory of files
    return os.path.isfile(path) or (os.path.isdir(path) and any(os.scandir(path)))


def load_datalist(
    datalist: str | os.PathLike,
    key: str = "training",
    task: str | None = None,
    num_classes: int | None = None,
    base_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    allow_empty: bool = False,
    fields: Sequence[str] | None = ("image", "label", "acquisition"),
) -> list[dict]:
    """Load ``datalist[key]`` with ``monai.data.load_decathlon_datalist`` after checking its layout.

    Checks: the file exists and is JSON with a list under ``key``; the list is not empty (an empty site is an
    error, not a silent no-op); each item has ``image`` (and ``label`` when ``task`` is given) of the right
    kind for the task; classification labels lie in ``[0, num_classes)``; and, with ``check_files``, every
    referenced image/label exists (a DICOM series may be a directory).

    Only ``fields`` of each item are returned (``None``: all): datalists may carry metadata such as subject, age
    or sex, which training does not need and which cannot be batched when some items hold ``null``.
    """
    path = Path(datalist)
    if not path.is_file():
        raise DatalistError(f"datalist {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatalistError(f"datalist {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DatalistError(f"datalist {path} must be a JSON object with keys such as 'training'/'validation'/'test'")
    if key not in raw:
        raise DatalistError(f"datalist {path} has no '{key}' list (keys: {sorted(raw)})")
    items = raw[key]
    if not isinstance(items, list):
        raise DatalistError(f"datalist {path}: '{key}' must be a list of items, got {type(items).__name__}")
    if not items:
        if allow_empty:
            return []
        raise DatalistError(f"datalist {path}: '{key}' is empty (a site with no samples cannot be used)")
    if task is not None and task not in TASKS:
        raise DatalistError(f"unknown task '{task}', expected one of {TASKS}")
    for i, item in enumerate(items):
        where = f"datalist {path}: {key}[{i}]"
        if not isinstance(item, dict) or "image" not in item:
            raise DatalistError(f"{where} must be an object with an 'image' entry")
        if task is None:
            continue
        if "label" not in item:
            raise DatalistError(f"{where} has no 'label'")
        label = item["label"]
        if task == "segmentation" and not isinstance(label, str):
            raise DatalistError(f"{where}: a segmentation label must be a path to a label map, got {label!r}")
        if task == "classification":
            labels = label if isinstance(label, list) else [label]
            if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
                raise DatalistError(f"{where}: a classification label must be an int or a list of ints, got {label!r}")
            if num_classes is not None and not isinstance(label, list) and not 0 <= label < num_classes:
                raise DatalistError(f"{where}: label {label} is outside [0, {num_classes}) for num_classes={num_classes}")
            if num_classes is not None and isinstance(label, list) and len(label) != num_classes:
                raise DatalistError(f"{where}: multi-label vector has {len(label)} entries, num_classes={num_classes}")
    data = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=key, base_dir=base_dir)
    if fields is not None:
        data = [{k: v for k, v in item.items() if k in fields} for item in data]
    if check_files:
        for i, item in enumerate(data):
            for k in ("image", "label"):
                v = item.get(k)
                if isinstance(v, str) and not _image_exists(v):
                    raise DatalistError(f"datalist {path}: {key}[{i}] {k} file {v} does not exist")
    return data


def load_datalists(datalists: Sequence[str | os.PathLike], key: str = "test", **kwargs) -> list[dict]:
    """Concatenate ``key`` of several datalists (e.g. the pooled test set of several sites)."""
    out: list[dict] = []
    for d in datalists:
        out.extend(load_datalist(d, key=key, **kwargs))
    return out


from monai_fedkd.export.runtime import IMAGE_SUFFIXES  # noqa: E402  (one list for the library and exported bundles)


def inference_items(input_dir: str | os.PathLike | None = None, datalist: str | os.PathLike | None = None, key: str = "test") -> list[dict]:
    """Items ``{"image": path}`` for inference: from a datalist key, or every image file in ``input_dir``.

    In a folder, each image file is one study and each sub-folder holding DICOM files is one DICOM series.
    """
    if datalist:
        return [{"image": d["image"]} for d in load_datalist(datalist, key=key)]
    if not input_dir:
        raise DatalistError("give either a datalist or an input_dir for inference")
    root = Path(input_dir)
    if not root.is_dir():
        raise DatalistError(f"input_dir {root} does not exist")
    entries = sorted(root.iterdir())
    items = [{"image": str(p)} for p in entries if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)]
    # each sub-folder with files is one DICOM series; DICOM files lying directly in the folder form one more
    items += [{"image": str(p)} for p in entries if p.is_dir() and any(f.is_file() for f in p.iterdir())]
    if any(p.is_file() and p.name.lower().endswith(".dcm") for p in entries):
        items.append({"image": str(root)})
    if not items:
        raise DatalistError(f"input_dir {root} holds no image files or DICOM series folders")
    return items
