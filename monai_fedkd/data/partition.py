"""Partition a pooled MONAI (decathlon-layout) datalist into K federated sites.

Input: a pooled datalist ``{"training": [...], "validation": [...], "test": [...]}`` whose paths are
relative to the datalist file's folder, and optionally a ``dataset_info.json`` next to it with
``task`` ("classification" / "segmentation") and ``num_classes``.

``training`` and ``validation`` are pooled into the *training pool*; ``test`` is the *test pool*
(MSD-style test entries that are plain path strings become ``{"image": path}``). If the datalist has
no (or an empty) ``test`` list, ``test_fraction`` of the training pool (default 0.2; stratified by
class for classification) is carved off as the test pool first.

Methods (``method=``):

``dirichlet``  label skew (classification only). For every class c, ``p_c ~ Dir(alpha * 1_K)`` and the
    class-c items of the training pool are split over the sites by ``p_c``; the *same* ``p_c`` split
    the class-c items of the test pool, so a site's test split follows its own label distribution.
    Draws are repeated (deterministically, up to 1000 times) until every site has at least
    ``min_samples`` training-pool items; otherwise a ValueError names the smallest site.
    Multi-label items (label = multi-hot list of 0/1, length > 1) are assigned by their *first
    positive class*; an all-zero multi-hot label is an error for this method.
``quantity``   quantity skew. Site sizes ``min_samples + Dir(quantity_beta * 1_K)`` share of the rest;
    items assigned uniformly at random; the test pool is split in the same proportions.
``metadata``   one site per non-empty group of item column ``column`` (e.g. ``sex``), or of bands of a
    numeric column given ``bins`` (e.g. ``age`` with ``[0, 40, 60, 200]`` -> [0,40), [40,60), [60,200];
    the last band includes its right edge). Groups are ordered by band / value; ``num_sites`` must be
    None or the number of groups. Items with a missing value (absent, null, "" or NaN) are an error
    unless ``drop_missing=True`` (the number dropped is recorded in the manifest).
``acquisition`` balanced uniformly random split; each site gets its own acquisition shift
    (``shifts``, one dict per site, or :func:`monai_fedkd.data.acquisition.default_site_shifts`;
    site 0 of the default is the identity). Every item of the site carries
    ``"acquisition": {...shift..., "seed": <per-item int>}`` for
    :class:`monai_fedkd.data.acquisition.AcquisitionShiftd`.

Each site's training-pool share is split into site-local ``training`` / ``validation`` by
``val_fraction`` (at least one validation item when the share has >= 2 items and val_fraction > 0;
``min_samples`` applies to the share before this split, so every site has >= 1 training item).

Outputs in ``output_dir`` (written to a temporary sibling folder first; the manifest is moved into
place last, and an old manifest is removed before anything else is replaced):

``<site>.json`` (``site0.json``...)  decathlon layout; ``image`` / ``label`` paths relative to
    ``output_dir``; other item keys kept. Load with ``monai.data.load_decathlon_datalist``.
``pooled_test.json``  ``{"test": [...]}`` every site's test items, each with a ``"site"`` key.
``manifest.json``  method, parameters, source datalist (relative path + sha256), and per site its
    name, datalist file, counts, class counts (classification) or voxel-class counts read from the
    label maps (segmentation), group / proportions / acquisition shift.

All randomness comes from ``numpy.random.default_rng`` seeded by ``[seed, stage, ...]``; every JSON
file is written with ``json.dumps(..., indent=2, sort_keys=True)`` so the same inputs and seed give
byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from monai_fedkd.data.acquisition import default_site_shifts, validate_acquisition_params

__all__ = [
    "METHODS",
    "add_partition_arguments",
    "partition_datalist",
    "run_partition",
]

METHODS = ("dirichlet", "quantity", "metadata", "acquisition")
TASKS = ("classification", "segmentation")
SPLITS = ("training", "validation", "test")
MANIFEST_NAME = "manifest.json"
POOLED_TEST_NAME = "pooled_test.json"
MANIFEST_FORMAT_VERSION = 1
DEFAULT_TEST_FRACTION = 0.2
DIRICHLET_MAX_TRIES = 1000

# rng stream ids: default_rng([seed, stream, ...])
_STREAM_TEST = 1
_STREAM_ASSIGN = 2
_STREAM_VAL = 3
_STREAM_ITEM_SEED = 4
_SPLIT_CODE = {"training": 0, "validation": 1, "test": 2}

_SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------- helpers
def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, str) and v.strip() == "":
        return True
    return isinstance(v, float) and math.isnan(v)


def _rel(path: str, base_dir: str, out_dir: str) -> str:
    """``path`` (relative to ``base_dir`` or absolute) rewritten relative to ``out_dir``, '/'-separated."""
    src = os.path.normpath(os.path.join(base_dir, path))
    return Path(os.path.relpath(src, out_dir)).as_posix()


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``weights`` (ties go to the lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    raw = w * total
    counts = np.floor(raw).astype(np.int64)
    left = int(total - counts.sum())
    if left > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:left]] += 1
    return counts


def _split_by_proportions(n: int, p: np.ndarray) -> np.ndarray:
    """Counts per site when ``n`` shuffled items are cut at ``floor(cumsum(p) * n)``."""
    bounds = np.floor(np.cumsum(p) * n).astype(np.int64)
    bounds[-1] = n
    bounds = np.clip(bounds, 0, n)
    return np.diff(np.concatenate([[0], bounds]))


def _too_small_error(site: str, got: int, min_samples: int, hint: str) -> ValueError:
    return ValueError(
        f"site '{site}' would receive only {got} training sample(s), fewer than min_samples={min_samples}; {hint}"
    )


# ----------------------------------------------------------------------------------------------- labels
def _class_label(label: Any, num_classes: int | None, where: str) -> tuple[int | None, list[int], bool]:
    """Parse a classification label -> (primary class or None, positive classes, is_multi_hot).

    int (or integral float) or [int]: a class index. A list of length > 1: a multi-hot vector (0/1)
    whose primary class is its first positive entry.
    """
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if _is_int(label):
        c = int(label)
        if c < 0 or (num_classes is not None and c >= num_classes):
            raise ValueError(f"{where}: class label {c} is out of range 0..{(num_classes or 0) - 1}.")
        return c, [c], False
    if isinstance(label, (list, tuple)):
        vals = []
        for v in label:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not _is_int(v):
                raise ValueError(f"{where}: classification label {label!r} must contain integers.")
            vals.append(int(v))
        if len(vals) == 1:
            return _class_label(vals[0], num_classes, where)
        if any(v not in (0, 1) for v in vals):
            raise ValueError(f"{where}: a multi-label classification label must be a multi-hot 0/1 list, got {label!r}.")
        if num_classes is not None and len(vals) != num_classes:
            raise ValueError(f"{where}: multi-hot label has {len(vals)} entries but num_classes={num_classes}.")
        pos = [i for i, v in enumerate(vals) if v]
        return (pos[0] if pos else None), pos, True
    if isinstance(label, str):
        raise ValueError(
            f"{where}: label {label!r} is a path but the task is classification (use task='segmentation')."
        )
    raise ValueError(f"{where}: unsupported classification label {label!r}.")


def _label_paths(label: Any, where: str) -> list[str]:
    if isinstance(label, str):
        return [label]
    if isinstance(label, (list, tuple)) and label and all(isinstance(v, str) for v in label):
        return list(label)
    raise ValueError(f"{where}: segmentation label must be a path (or list of paths) to a label map, got {label!r}.")


class _VoxelCounter:
    """Reads label maps with nibabel (once each) and counts voxels per label value."""

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}

    def counts(self, path: str) -> np.ndarray:
        if path not in self._cache:
            import nibabel as nib

            if not os.path.isfile(path):
                raise ValueError(f"label map {path} does not exist.")
            arr = np.asanyarray(nib.load(path).dataobj)
            if arr.dtype.kind == "f":
                if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                    raise ValueError(f"label map {path} has non-integer label values.")
            elif arr.dtype.kind not in "iub":
                raise ValueError(f"label map {path} has unsupported dtype {arr.dtype}.")
            flat = arr.reshape(-1).astype(np.int64)
            if flat.size and flat.min() < 0:
                raise ValueError(f"label map {path} has negative label value {int(flat.min())}.")
            self._cache[path] = np.bincount(flat) if flat.size else np.zeros(0, dtype=np.int64)
        return self._cache[path]


# ----------------------------------------------------------------------------------------------- loading
def _load_items(raw: Any, key: str, datalist: Path) -> list[dict]:
    items = raw.get(key) or []
    if not isinstance(items, list):
        raise ValueError(f"{datalist}: '{key}' must be a list.")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and key == "test":
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise ValueError(f"{datalist}: item {i} of '{key}' must be a dict with an 'image' key, got {item!r}.")
        out.append(copy.deepcopy(item))
    return out


def _metadata_groups(
    pool: list[dict], test_pool: list[dict], column: str, bins: list[float] | None, drop_missing: bool
) -> tuple[list[int], list[int], list[Any], list[str], dict[str, int]]:
    """-> per-item group index (pool), (test pool), group values, group labels, dropped counts."""
    if bins is not None:
        b = [float(x) for x in bins]
        if len(b) < 2 or any(not math.isfinite(x) for x in b) or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"bins must be >= 2 strictly increasing finite numbers, got {bins!r}.")

    def value_of(item: dict) -> Any:
        v = item.get(column)
        if _is_missing(v):
            return None
        if bins is not None:
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"column '{column}' value {v!r} of item {item.get('image')!r} is not a number.") from None
            if not math.isfinite(x):
                return None
            if x < b[0] or x > b[-1]:
                raise ValueError(
                    f"column '{column}' value {v!r} of item {item.get('image')!r} is outside the bins [{b[0]:g}, {b[-1]:g}]."
                )
            return min(int(np.searchsorted(b, x, side="right")) - 1, len(b) - 2)
        if isinstance(v, (dict, list)):
            raise ValueError(f"column '{column}' value {v!r} of item {item.get('image')!r} is not a scalar.")
        return v

    pool_vals = [value_of(it) for it in pool]
    test_vals = [value_of(it) for it in test_pool]
    n_missing = sum(v is None for v in pool_vals) + sum(v is None for v in test_vals)
    if n_missing and not drop_missing:
        raise ValueError(
            f"{n_missing} item(s) have no value for column '{column}' "
            f"({sum(v is None for v in pool_vals)} in training/validation, {sum(v is None for v in test_vals)} in test); "
            "fill them in or pass drop_missing=True (--drop-missing) to drop them."
        )
    dropped = {"training_pool": sum(v is None for v in pool_vals), "test_pool": sum(v is None for v in test_vals)}
    present = {v for v in pool_vals if v is not None}
    if bins is not None:
        values = sorted(present)
        labels = [f"{column} in [{b[i]:g}, {b[i + 1]:g}{']' if i == len(b) - 2 else ')'}" for i in values]
        group_values: list[Any] = [[b[i], b[i + 1]] for i in values]
    else:
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in present):
            values = sorted(present, key=float)
        else:
            values = sorted(present, key=lambda v: (type(v).__name__, str(v)))
        labels = [f"{column}={v}" for v in values]
        group_values = list(values)
    index = {v: i for i, v in enumerate(values)}
    orphan = sorted({str(v) for v in test_vals if v is not None and v not in index})
    if orphan:
        raise ValueError(
            f"test items have column '{column}' group(s) {orphan} that no training/validation item has; "
            "such a group would be a site without training samples."
        )
    pool_groups = [index[v] if v is not None else -1 for v in pool_vals]
    test_groups = [index[v] if v is not None else -1 for v in test_vals]
    return pool_groups, test_groups, group_values, labels, dropped


# ----------------------------------------------------------------------------------------------- main API
def partition_datalist(
    datalist: str | Path,
    output_dir: str | Path,
    num_sites: int | None,
    method: str,
    seed: int = 0,
    alpha: float = 0.5,
    min_samples: int = 2,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    column: str | None = None,
    bins: list[float] | None = None,
    quantity_beta: float = 0.5,
    shifts: list[dict] | None = None,
    task: str | None = None,
    num_classes: int | None = None,
    site_names: list[str] | None = None,
    drop_missing: bool = False,
) -> Path:
    """Partition ``datalist`` into federated sites and write them to ``output_dir``.

    See the module docstring for the methods and the output files.
    ``num_sites`` may be None only for ``method="metadata"`` (then it is the number of groups).
    ``min_samples`` (>= 1) is the minimum size of a site's share of the training pool (training +
    validation). ``test_fraction`` is only used when the datalist has no test items (default 0.2).

    Returns:
        the path of ``output_dir/manifest.json``.

    Raises:
        ValueError: invalid arguments, unreadable / inconsistent labels, a site that would get fewer
            than ``min_samples`` (or 0) training samples (the message names the site), missing
            metadata values, label maps with values outside ``0..num_classes-1`` (names the file).
    """
    # ---- arguments
    if method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; choose one of {list(METHODS)}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    seed = int(seed)
    if num_sites is not None and (not _is_int(num_sites) or num_sites < 1):
        raise ValueError(f"num_sites must be a positive integer, got {num_sites!r}.")
    if num_sites is None and method != "metadata":
        raise ValueError(f"num_sites is required for method '{method}'.")
    if not _is_int(min_samples) or min_samples < 1:
        raise ValueError(f"min_samples must be an integer >= 1 (empty sites are never written), got {min_samples!r}.")
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be > 0, got {alpha!r}.")
    if not (isinstance(quantity_beta, numbers.Real) and math.isfinite(quantity_beta) and quantity_beta > 0):
        raise ValueError(f"quantity_beta must be > 0, got {quantity_beta!r}.")
    if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    if test_fraction is not None and not (isinstance(test_fraction, numbers.Real) and 0 <= test_fraction < 1):
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}.")
    if method == "metadata" and not column:
        raise ValueError("method 'metadata' needs column= (the item key to group sites by).")
    if method != "metadata" and (column is not None or bins is not None):
        raise ValueError(f"column/bins only apply to method 'metadata', not '{method}'.")
    if method != "acquisition" and shifts is not None:
        raise ValueError(f"shifts only apply to method 'acquisition', not '{method}'.")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}.")
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")

    datalist = Path(datalist)
    if not datalist.is_file():
        raise ValueError(f"datalist {datalist} does not exist.")
    output_dir = Path(output_dir)
    out_abs = os.path.abspath(output_dir)
    base_abs = os.path.dirname(os.path.abspath(datalist))

    with open(datalist, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not isinstance(raw.get("training"), list):
        raise ValueError(f"{datalist} is not a decathlon datalist (no 'training' list).")
    pool = _load_items(raw, "training", datalist) + _load_items(raw, "validation", datalist)
    test_pool = _load_items(raw, "test", datalist)
    if not pool:
        raise ValueError(f"{datalist} has no training/validation items.")

    info_path = Path(base_abs) / "dataset_info.json"
    info: dict = {}
    has_info = info_path.is_file()
    if has_info:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError(f"{info_path} must hold a JSON object.")
    if task is None:
        task = info.get("task")
    if task is None:
        first = pool[0].get("label")
        task = "segmentation" if isinstance(first, str) or (
            isinstance(first, list) and first and all(isinstance(v, str) for v in first)
        ) else "classification"
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r} (from {info_path}).")
    if num_classes is None and info.get("num_classes") is not None:
        num_classes = info["num_classes"]
        if not _is_int(num_classes) or num_classes < 1:
            raise ValueError(f"{info_path}: num_classes must be a positive integer, got {num_classes!r}.")
    if method == "dirichlet" and task != "classification":
        raise ValueError("method 'dirichlet' (label skew) needs a classification task; use quantity/metadata/acquisition.")

    # ---- labels (classification): primary class per item
    def describe(kind: str, i: int, item: dict) -> str:
        return f"{kind} item {i} ({item.get('image')!r})"

    pool_primary: list[int | None] = []
    test_primary: list[int | None] = []
    if task == "classification":
        if num_classes is None:  # infer
            seen = []
            for kind, items in (("training/validation", pool), ("test", test_pool)):
                for i, it in enumerate(items):
                    if "label" in it:
                        _, pos, multi = _class_label(it["label"], None, describe(kind, i, it))
                        seen.append(len(it["label"]) if multi else (max(pos) + 1))
            num_classes = max(seen) if seen else 1
        for i, it in enumerate(pool):
            if "label" not in it:
                raise ValueError(f"{describe('training/validation', i, it)} has no 'label'.")
            pool_primary.append(_class_label(it["label"], num_classes, describe("training/validation", i, it))[0])
        for i, it in enumerate(test_pool):
            prim = _class_label(it["label"], num_classes, describe("test", i, it))[0] if "label" in it else None
            test_primary.append(prim)
    else:
        for i, it in enumerate(pool):
            if "label" not in it:
                raise ValueError(f"{describe('training/validation', i, it)} has no 'label'.")
            _label_paths(it["label"], describe("training/validation", i, it))
        for i, it in enumerate(test_pool):
            if "label" in it:
                _label_paths(it["label"], describe("test", i, it))
        pool_primary = [None] * len(pool)
        test_primary = [None] * len(test_pool)

    # ---- test pool: given, or carved off the training pool
    test_carved = not test_pool
    if not test_carved and test_fraction is not None:
        raise ValueError(f"{datalist} already has a 'test' list; test_fraction only applies when it has none.")
    effective_test_fraction = None
    if test_carved:
        effective_test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else float(test_fraction)
        rng = np.random.default_rng([seed, _STREAM_TEST])
        strata: dict[Any, list[int]] = {}
        for i, c in enumerate(pool_primary):
            strata.setdefault(-1 if c is None else c, []).append(i)
        chosen: list[int] = []
        for key in sorted(strata):
            idx = np.asarray(strata[key])
            n_take = int(math.floor(effective_test_fraction * len(idx) + 0.5))
            chosen.extend(int(j) for j in rng.permutation(idx)[:n_take])
        chosen_set = set(chosen)
        test_pool = [pool[i] for i in sorted(chosen_set)]
        test_primary = [pool_primary[i] for i in sorted(chosen_set)]
        keep = [i for i in range(len(pool)) if i not in chosen_set]
        pool = [pool[i] for i in keep]
        pool_primary = [pool_primary[i] for i in keep]

    # ---- assignment: site -> indices into pool / test_pool
    rng = np.random.default_rng([seed, _STREAM_ASSIGN])
    site_extra: list[dict[str, Any]]
    dropped = {"training_pool": 0, "test_pool": 0}
    n_pool = len(pool)

    def default_names(k: int) -> list[str]:
        return [f"site{i}" for i in range(k)]

    def resolve_names(k: int) -> list[str]:
        names = default_names(k) if site_names is None else [str(s) for s in site_names]
        if len(names) != k:
            raise ValueError(f"site_names has {len(names)} names but there are {k} sites.")
        if len(set(names)) != k:
            raise ValueError(f"site_names must be unique, got {names}.")
        for s in names:
            if not _SITE_NAME_RE.match(s) or s in ("manifest", "pooled_test"):
                raise ValueError(f"invalid site name {s!r} (letters, digits, '_', '-', '.'; not 'manifest'/'pooled_test').")
        return names

    def precheck(k: int, names: list[str], hint: str) -> None:
        if n_pool < k * min_samples:
            idx = min(n_pool // min_samples, k - 1)
            raise _too_small_error(
                names[idx], max(0, n_pool - idx * min_samples), min_samples,
                f"{n_pool} pooled training samples cannot give {k} sites {min_samples} each; {hint}",
            )

    if method == "metadata":
        pool_groups, test_groups, group_values, group_labels, dropped = _metadata_groups(
            pool, test_pool, column, bins, drop_missing  # type: ignore[arg-type]
        )
        k = len(group_values)
        if num_sites is not None and num_sites != k:
            raise ValueError(
                f"num_sites={num_sites} but column '{column}' has {k} non-empty group(s): {group_labels}; "
                "pass num_sites=None or change bins."
            )
        num_sites = k
        names = resolve_names(k)
        site_pool = [[i for i, g in enumerate(pool_groups) if g == s] for s in range(k)]
        site_test = [[i for i, g in enumerate(test_groups) if g == s] for s in range(k)]
        for s in range(k):
            if len(site_pool[s]) < min_samples:
                raise _too_small_error(
                    names[s], len(site_pool[s]), min_samples,
                    f"its group {group_labels[s]} is too small; merge groups (coarser bins) or lower min_samples.",
                )
        site_extra = [{"group": group_values[s], "group_label": group_labels[s]} for s in range(k)]
    else:
        k = int(num_sites)  # type: ignore[arg-type]
        names = resolve_names(k)
        if method == "dirichlet":
            precheck(k, names, "use fewer sites or a smaller min_samples.")
            classes = list(range(int(num_classes)))  # type: ignore[arg-type]
            for i, c in enumerate(pool_primary):
                if c is None:
                    raise ValueError(f"training/validation item {i} ({pool[i].get('image')!r}) has an all-zero multi-hot label; "
                                     "method 'dirichlet' needs a class per item.")
            for i, c in enumerate(test_primary):
                if c is None:
                    raise ValueError(f"test item {i} ({test_pool[i].get('image')!r}) has no class label; "
                                     "method 'dirichlet' splits the test pool by class and needs labelled test items.")
            pool_by_class = {c: [i for i, p in enumerate(pool_primary) if p == c] for c in classes}
            test_by_class = {c: [i for i, p in enumerate(test_primary) if p == c] for c in classes}
            best: tuple[int, np.ndarray] | None = None
            props = None
            for _ in range(DIRICHLET_MAX_TRIES):
                p = rng.dirichlet(np.full(k, float(alpha)), size=len(classes))  # (C, K)
                sizes = sum(_split_by_proportions(len(pool_by_class[c]), p[c]) for c in classes)
                if best is None or sizes.min() > best[0]:
                    best = (int(sizes.min()), sizes)
                if sizes.min() >= min_samples:
                    props = p
                    break
            if props is None:
                assert best is not None
                worst = int(np.argmin(best[1]))
                raise _too_small_error(
                    names[worst], int(best[1][worst]), min_samples,
                    f"no Dirichlet(alpha={alpha}) draw in {DIRICHLET_MAX_TRIES} tries gave every one of the {k} sites "
                    f"{min_samples} samples; use a larger alpha or fewer sites.",
                )
            site_pool = [[] for _ in range(k)]
            site_test = [[] for _ in range(k)]
            for c in classes:
                for src, dst in ((pool_by_class[c], site_pool), (test_by_class[c], site_test)):
                    perm = rng.permutation(np.asarray(src, dtype=np.int64))
                    cuts = np.cumsum(_split_by_proportions(len(src), props[c]))[:-1]
                    for s, part in enumerate(np.split(perm, cuts)):
                        dst[s].extend(int(j) for j in part)
            site_extra = [{"label_proportions": [float(props[c][s]) for c in classes]} for s in range(k)]
        elif method == "quantity":
            precheck(k, names, "use fewer sites or a smaller min_samples.")
            q = rng.dirichlet(np.full(k, float(quantity_beta)))
            sizes = min_samples + _largest_remainder(q, n_pool - k * min_samples)
            test_sizes = _largest_remainder(sizes.astype(np.float64), len(test_pool))
            perm, tperm = rng.permutation(n_pool), rng.permutation(len(test_pool))
            site_pool = [sorted(int(j) for j in a) for a in np.split(perm, np.cumsum(sizes)[:-1])]
            site_test = [sorted(int(j) for j in a) for a in np.split(tperm, np.cumsum(test_sizes)[:-1])]
            site_extra = [{"size_proportion": float(sizes[s] / n_pool)} for s in range(k)]
        else:  # acquisition
            sizes = np.array([len(a) for a in np.array_split(np.arange(n_pool), k)])
            for s in range(k):
                if sizes[s] < min_samples:
                    raise _too_small_error(
                        names[s], int(sizes[s]), min_samples,
                        f"{n_pool} pooled training samples split evenly over {k} sites; use fewer sites.",
                    )
            perm, tperm = rng.permutation(n_pool), rng.permutation(len(test_pool))
            site_pool = [sorted(int(j) for j in a) for a in np.array_split(perm, k)]
            site_test = [sorted(int(j) for j in a) for a in np.array_split(tperm, k)]
            if shifts is None:
                site_shifts = default_site_shifts(k, seed)
            else:
                if not isinstance(shifts, (list, tuple)) or len(shifts) != k:
                    raise ValueError(f"shifts must be a list of {k} dicts (one per site), got {shifts!r}.")
                site_shifts = []
                for s, sh in enumerate(shifts):
                    if isinstance(sh, dict) and "seed" in sh:
                        raise ValueError(f"shifts[{s}] must not set 'seed': it is derived per item from the partition seed.")
                    try:
                        full = validate_acquisition_params(sh)
                    except ValueError as e:
                        raise ValueError(f"shifts[{s}] (site '{names[s]}'): {e}") from None
                    full.pop("seed")
                    site_shifts.append(full)
            site_extra = [{"acquisition": site_shifts[s]} for s in range(k)]

    for s in range(k):
        if len(site_pool[s]) == 0:
            raise ValueError(f"site '{names[s]}' has no training samples; it would be an empty site.")
        if len(site_test[s]) == 0 and test_pool:
            warnings.warn(f"site '{names[s]}' has no test items.", stacklevel=2)

    # ---- site-local train/val split, path rewriting, acquisition keys
    def out_item(item: dict) -> dict:
        new = copy.deepcopy(item)
        for key in ("image", "label"):
            v = new.get(key)
            if isinstance(v, str):
                new[key] = _rel(v, base_abs, out_abs)
            elif isinstance(v, list) and v and all(isinstance(e, str) for e in v):
                new[key] = [_rel(e, base_abs, out_abs) for e in v]
        return new

    site_lists: list[dict[str, list[dict]]] = []
    site_sources: list[dict[str, list[dict]]] = []  # original items (paths relative to the datalist)
    for s in range(k):
        idx = sorted(site_pool[s])
        n = len(idx)
        n_val = 0
        if n >= 2 and val_fraction > 0:
            n_val = min(n - 1, max(1, int(math.floor(val_fraction * n + 0.5))))
        perm = np.random.default_rng([seed, _STREAM_VAL, s]).permutation(n)
        val_pos = set(int(j) for j in perm[:n_val])
        src = {
            "training": [pool[idx[j]] for j in range(n) if j not in val_pos],
            "validation": [pool[idx[j]] for j in range(n) if j in val_pos],
            "test": [test_pool[j] for j in sorted(site_test[s])],
        }
        lists = {split: [out_item(it) for it in src[split]] for split in SPLITS}
        if method == "acquisition":
            for split in SPLITS:
                for i, it in enumerate(lists[split]):
                    item_seed = int(
                        np.random.SeedSequence([seed, _STREAM_ITEM_SEED, s, _SPLIT_CODE[split], i]).generate_state(1)[0]
                    )
                    it["acquisition"] = {**site_extra[s]["acquisition"], "seed": item_seed}
        site_lists.append(lists)
        site_sources.append(src)

    # ---- statistics
    label_counts: list[dict[str, Any]] = []
    if task == "classification":
        for s in range(k):
            cc, unl = {}, {}
            for split in SPLITS:
                counts = [0] * int(num_classes)  # type: ignore[arg-type]
                n_unl = 0
                for it in site_sources[s][split]:
                    if "label" not in it:
                        n_unl += 1
                        continue
                    for c in _class_label(it["label"], num_classes, "item")[1]:
                        counts[c] += 1
                cc[split], unl[split] = counts, n_unl
            label_counts.append({"class_counts": cc, "unlabelled": unl})
    else:
        counter = _VoxelCounter()

        def files_of(it: dict) -> list[str]:
            return [os.path.normpath(os.path.join(base_abs, p)) for p in _label_paths(it["label"], "item")]

        all_files = sorted({p for s in range(k) for split in SPLITS for it in site_sources[s][split]
                            if "label" in it for p in files_of(it)})
        per_file = {p: counter.counts(p) for p in all_files}
        max_len = max((len(v) for v in per_file.values()), default=1)
        if num_classes is None:
            num_classes = max(max_len, 1)
        for p, v in per_file.items():
            nz = np.nonzero(v)[0]
            if nz.size and nz[-1] >= num_classes:
                raise ValueError(
                    f"label map {p} has label value {int(nz[-1])} outside 0..{num_classes - 1} (num_classes={num_classes})."
                )
        for s in range(k):
            vc, unl = {}, {}
            for split in SPLITS:
                total = np.zeros(int(num_classes), dtype=np.int64)
                n_unl = 0
                for it in site_sources[s][split]:
                    if "label" not in it:
                        n_unl += 1
                        continue
                    for p in files_of(it):
                        v = per_file[p]
                        total[: len(v)] += v
                vc[split] = [int(x) for x in total]
                unl[split] = n_unl
            label_counts.append({"voxel_class_counts": vc, "unlabelled": unl})

    # ---- documents
    files: dict[str, str] = {}
    pooled_test: list[dict] = []
    sites_manifest = []
    for s in range(k):
        fname = f"{names[s]}.json"
        files[fname] = _dumps({split: site_lists[s][split] for split in SPLITS})
        for it in site_lists[s]["test"]:
            pooled_test.append({**copy.deepcopy(it), "site": names[s]})
        entry: dict[str, Any] = {
            "name": names[s],
            "index": s,
            "datalist": fname,
            "counts": {split: len(site_lists[s][split]) for split in SPLITS},
            **label_counts[s],
            **site_extra[s],
        }
        entry.setdefault("acquisition", None)
        sites_manifest.append(entry)
    files[POOLED_TEST_NAME] = _dumps({"test": pooled_test})

    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "method": method,
        "seed": seed,
        "task": task,
        "num_classes": int(num_classes),  # type: ignore[arg-type]
        "num_sites": k,
        "parameters": {
            "alpha": float(alpha),
            "bins": None if bins is None else [float(x) for x in bins],
            "column": column,
            "drop_missing": bool(drop_missing),
            "method": method,
            "min_samples": int(min_samples),
            "num_classes": int(num_classes),  # type: ignore[arg-type]
            "num_sites": k,
            "quantity_beta": float(quantity_beta),
            "seed": seed,
            "shifts": [dict(e["acquisition"]) for e in sites_manifest] if method == "acquisition" else None,
            "site_names": names,
            "task": task,
            "test_fraction": effective_test_fraction,
            "val_fraction": float(val_fraction),
        },
        "source": {
            "datalist": Path(os.path.relpath(os.path.abspath(datalist), out_abs)).as_posix(),
            "sha256": _sha256(datalist),
            "dataset_info": Path(os.path.relpath(str(info_path), out_abs)).as_posix() if has_info else None,
            "dataset_info_sha256": _sha256(info_path) if has_info else None,
            "num_training_pool": n_pool,
            "num_test_pool": len(test_pool),
            "test_carved_from_training_pool": test_carved,
            "dropped_missing": dropped,
        },
        "pooled_test": POOLED_TEST_NAME,
        "sites": sites_manifest,
    }
    files[MANIFEST_NAME] = _dumps(manifest)
    src_abs = os.path.abspath(datalist)
    for name in files:
        if os.path.join(out_abs, name) in (src_abs, os.path.abspath(info_path)):
            raise ValueError(f"writing {name} into {output_dir} would overwrite the pooled datalist; choose another output_dir.")
    _write_atomically(output_dir, files)
    return output_dir / MANIFEST_NAME


def _write_atomically(output_dir: Path, files: dict[str, str]) -> None:
    """Write ``files`` into ``output_dir`` via a temporary sibling folder; the manifest lands last."""
    parent = output_dir.parent if str(output_dir.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} exists and is not a folder.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder should look like any other
        for name, text in files.items():
            with open(tmp / name, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
        if not output_dir.exists():
            os.rename(tmp, output_dir)
            return
        old_manifest = output_dir / MANIFEST_NAME
        stale: list[str] = []
        if old_manifest.is_file():
            try:
                with open(old_manifest, encoding="utf-8") as f:
                    old = json.load(f)
                stale = [e.get("datalist") for e in old.get("sites", []) if isinstance(e, dict)]
            except (OSError, ValueError, AttributeError):
                stale = []
            old_manifest.unlink()
        for name in files:
            if name != MANIFEST_NAME:
                os.replace(tmp / name, output_dir / name)
        for name in stale:
            if isinstance(name, str) and name not in files and "/" not in name and "\\" not in name and name.endswith(".json"):
                (output_dir / name).unlink(missing_ok=True)
        os.replace(tmp / MANIFEST_NAME, output_dir / MANIFEST_NAME)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- CLI
def add_partition_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``monai-fedkd partition`` options to ``parser`` (returns it)."""
    parser.add_argument("--datalist", required=True, help="pooled decathlon datalist JSON")
    parser.add_argument("--output-dir", required=True, help="folder for site*.json, pooled_test.json, manifest.json")
    parser.add_argument("--num-sites", type=int, default=None, help="number of sites (metadata: default = number of groups)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="dirichlet: concentration (small = more label skew)")
    parser.add_argument("--min-samples", type=int, default=2, help="minimum training(+validation) items per site")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="site-local validation fraction")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help=f"carved off the pool when the datalist has no 'test' list (default {DEFAULT_TEST_FRACTION})")
    parser.add_argument("--column", default=None, help="metadata: item key to group sites by")
    parser.add_argument("--bins", type=float, nargs="+", default=None, help="metadata: band edges for a numeric column")
    parser.add_argument("--drop-missing", action="store_true", help="metadata: drop items missing the column")
    parser.add_argument("--quantity-beta", type=float, default=0.5, help="quantity: Dirichlet concentration of site sizes")
    parser.add_argument("--shifts", default=None,
                        help="acquisition: JSON list of per-site shift dicts, or a path to a JSON file holding it")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: dataset_info.json, else inferred from labels")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--site-names", nargs="+", default=None)
    return parser


def _parse_shifts(value: Any) -> list[dict] | None:
    if value is None or isinstance(value, list):
        return value
    text = str(value)
    if not text.lstrip().startswith("[") and os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        shifts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--shifts is neither a JSON list nor a JSON file: {e}") from None
    if not isinstance(shifts, list):
        raise ValueError("--shifts must be a JSON list of dicts (one per site).")
    return shifts


def run_partition(args: argparse.Namespace) -> Path:
    """Run :func:`partition_datalist` from parsed ``add_partition_arguments`` options; returns the manifest path."""
    return partition_datalist(
        datalist=args.datalist,
        output_dir=args.output_dir,
        num_sites=args.num_sites,
        method=args.method,
        seed=args.seed,
        alpha=args.alpha,
        min_samples=args.min_samples,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        column=args.column,
        bins=args.bins,
        quantity_beta=args.quantity_beta,
        shifts=_parse_shifts(getattr(args, "shifts", None)),
        task=args.task,
        num_classes=args.num_classes,
        site_names=args.site_names,
        drop_missing=bool(getattr(args, "drop_missing", False)),
    )
