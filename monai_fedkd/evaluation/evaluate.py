"""Evaluate site models, their ensembles (and e.g. a distilled central model) on one or more test sets.

Usage::

    from monai_fedkd.evaluation import evaluate_models

    metrics = evaluate_models(["runs/site0", "runs/site1"], ["sites/site0.json", "sites/site1.json"], "runs/eval")

What it does:

* every model (a site bundle's ``output_dir``: ``models/model.pt`` + ``site_card.json``) is rebuilt with
  :func:`monai_fedkd.site.load_site_model`;
* every test item is prepared with the model's own :func:`monai_fedkd.data.transforms.card_preprocessing`
  (so acquisition shifts stored in the items are applied exactly as the site saw its data). Models whose
  cards give the same preprocessing share one pass over a test set: one ignite ``Engine`` run per
  (preprocessing group, test set) loads each item once and runs each of the group's models on it once;
* classification: the plain network on the resized image; segmentation:
  ``monai.inferers.SlidingWindowInferer(roi_size=card spatial_size, overlap=sw_overlap)``; softmax of the
  logits gives the probabilities;
* ensembles are derived from those probabilities in the same pass (no model runs twice):
  ``ensemble_mean`` (mean of the sites' softmax probabilities) and ``ensemble_weighted`` (for class ``c``
  site ``k`` gets ``w_kc = n_kc / sum_j n_jc`` from the cards' ``class_counts``; the weighted sum is
  renormalised over classes), see :func:`class_count_weights` and :func:`combine_probabilities`;
* scores each model on each test set and on their concatenation (``pooled``).

Memory: classification keeps each model's probabilities per test set (``N x C`` float32; tiny) and computes
AUROC / accuracy / balanced accuracy at the end (pooled = concatenation). Segmentation does *not* keep
probability maps: the ensembles are combined per volume while all members' maps of that volume are in
memory, and per-volume, per-class Dice is accumulated on the fly (``N x (C-1)`` floats per model and test
set); pooled = concatenation of the per-volume Dice. Peak memory is therefore one volume's probability maps
for the group's models plus the ensembles, e.g. 7 x 6 classes x 60x60x45 x 4 bytes = 27 MB, independent of
the number of volumes (keeping float16 maps instead would need 40 volumes x 6 x 162k x 2 bytes = 78 MB per
model and test set, growing with the data).

Outputs in ``output_dir`` (each written to a temporary name, then renamed):

``metrics.json``
    ``{<model>: {<test set>: {metric: value}}, "meta": {...}}``. Models are the sites (in the given order),
    then the extra models, then ``ensemble_mean`` and ``ensemble_weighted``; test sets in the given order,
    then ``pooled``. Classification metrics: ``n``, ``auroc`` (binary: positive-class probability; more
    classes: one-vs-rest macro over the classes present), ``accuracy``, ``balanced_accuracy`` and, for more
    than two classes, ``auroc_per_class`` ``{class name: value}``. Segmentation: ``n``, ``mean_dice`` (mean
    over foreground classes of the per-class Dice) and ``dice`` ``{class name: value}`` (per foreground class,
    mean over volumes ignoring volumes where the class is absent from the reference). Undefined values
    (e.g. AUROC on a test set holding one class) are ``null``. ``meta`` holds the task, the primary metric,
    each model's card summary (``dir``, ``role``: site / extra / ensemble, ``inference_seconds``, the
    ensemble members and weights), the test sets (``path``, ``count``, ``class_counts``), ``device`` and
    versions.
``metrics.csv``
    long format, one row per model x test set x metric: ``model,test_set,metric,value``; per-class values
    are named ``dice/<class>`` and ``auroc_per_class/<class>``; an undefined value is an empty cell.
``metrics.md``
    markdown tables (rows: models incl. ensembles; columns: test sets + pooled): the primary metric (AUROC
    or mean Dice), then accuracy and balanced accuracy (classification) or the Dice per class for each test
    set (segmentation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

import monai
from monai.data import DataLoader, Dataset
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose, SelectItemsd
from monai.utils import min_version, optional_import

from monai_fedkd import __version__
from monai_fedkd.data.datalist import DatalistError, load_datalist
from monai_fedkd.data.transforms import InputCheckError, card_preprocessing
from monai_fedkd.site.card import SiteCardError, load_site_model

Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = [
    "ENSEMBLE_MEAN",
    "ENSEMBLE_WEIGHTED",
    "POOLED",
    "EvaluationError",
    "add_evaluate_arguments",
    "check_ensemble_compatible",
    "class_count_weights",
    "classification_metrics",
    "combine_probabilities",
    "dice_per_class",
    "evaluate_models",
    "format_markdown",
    "kwargs_from_args",
    "main",
    "primary_table",
    "run_evaluate",
    "segmentation_metrics",
]

logger = logging.getLogger(__name__)

ENSEMBLE_MEAN = "ensemble_mean"
ENSEMBLE_WEIGHTED = "ensemble_weighted"
POOLED = "pooled"
META = "meta"
RESERVED_MODEL_NAMES = (META, ENSEMBLE_MEAN, ENSEMBLE_WEIGHTED)
#: card fields that must agree for models to be ensembled (the same inputs and the same classes)
ENSEMBLE_FIELDS = (
    ("task",),
    ("spatial_dims",),
    ("input", "channels"),
    ("classes", "num_classes"),
    ("input", "spatial_size"),
    ("input", "spacing"),
    ("input", "intensity_range"),
    ("input", "value_range"),
)
_EVAL_INDEX = "_eval_index"
_KNOWN_ERRORS = (InputCheckError, DatalistError, SiteCardError)


_ENGINE_LOGGER = logger.getChild("engine")
_ENGINE_LOGGER.setLevel(logging.CRITICAL)  # failures are re-raised with context below


class EvaluationError(ValueError):
    """Models or test sets that cannot be evaluated as asked (names the models/files concerned)."""


# ----------------------------------------------------------------------------------------------------------------
# ensembles and metrics (small helpers, usable on their own)
# ----------------------------------------------------------------------------------------------------------------


def class_count_weights(
    class_counts: Sequence[Sequence[float] | None], names: Sequence[str] | None = None, num_classes: int | None = None
) -> np.ndarray:
    """Per-class ensemble weights ``w[k, c] = n[k, c] / sum_j n[j, c]`` from the sites' class counts.

    Args:
        class_counts: one entry per site: its samples (or voxels) per class, or ``None`` when the site
            withholds its counts.
        names: site names for the log messages.
        num_classes: the number of classes (checked against the counts; needed when no site has counts).

    Returns:
        ``(K, C)`` float64 array; every column sums to one. A site with ``None`` counts gets ``1/K`` for every
        class and the other sites share the remaining ``(K - m)/K`` in proportion to their counts (``m``:
        sites without counts). A class that no site with counts holds gets equal weights ``1/K``.
    """
    from monai_fedkd.losses import site_weights, withheld_sites

    k_sites = len(class_counts)
    if k_sites == 0:
        raise EvaluationError("class_count_weights needs at least one site")
    names = list(names) if names is not None else [f"site {k}" for k in range(k_sites)]
    if all(c is None for c in class_counts) and num_classes is None:
        logger.warning("no site publishes class counts: ensemble_weighted uses equal weights (same as ensemble_mean)")
        return np.full((k_sites, 1), 1.0 / k_sites)
    for k in withheld_sites(class_counts):
        logger.warning("%s publishes no class counts: it gets equal weight 1/%d for every class in ensemble_weighted", names[k], k_sites)
    n_cls = num_classes or len(next(c for c in class_counts if c is not None))
    try:
        # one definition of the expertise weights, shared with the distillation
        return site_weights(class_counts, n_cls).double().numpy()
    except ValueError as e:
        raise EvaluationError(f"class counts of {names}: {e}") from None


def combine_probabilities(probs: Sequence[torch.Tensor | np.ndarray], weights: np.ndarray | torch.Tensor | None = None):
    """Combine the sites' class probabilities, each ``(B, C, *spatial)`` (classification: ``(B, C)``).

    Without ``weights``: the plain mean. With ``(K, C)`` weights: ``p[c] = sum_k w[k, c] p_k[c]``, renormalised
    over the class dimension (dim 1). Returns the type of the first input (tensor or ndarray).
    """
    if len(probs) == 0:
        raise EvaluationError("combine_probabilities needs at least one probability array")
    as_numpy = isinstance(probs[0], np.ndarray)
    stack = torch.stack([torch.as_tensor(p, dtype=torch.float32) for p in probs])  # (K, B, C, ...)
    if stack.ndim < 3:
        raise EvaluationError(f"probabilities must be (batch, classes, ...), got shape {tuple(stack.shape[1:])}")
    if weights is None:
        out = stack.mean(0)
    else:
        w = torch.as_tensor(weights, dtype=stack.dtype, device=stack.device)
        k_sites, n_cls = stack.shape[0], stack.shape[2]
        if w.ndim == 2 and w.shape[1] == 1:
            w = w.expand(k_sites, n_cls)
        if tuple(w.shape) != (k_sites, n_cls):
            raise EvaluationError(f"weights have shape {tuple(w.shape)}, expected (sites, classes) = {(k_sites, n_cls)}")
        w = w.reshape(k_sites, 1, n_cls, *([1] * (stack.ndim - 3)))
        out = (stack * w).sum(0)
        out = out / out.sum(1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out.cpu().numpy() if as_numpy else out


def dice_per_class(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class for label maps ``(B, 1, *spatial)`` (class indices).

    ``monai.metrics.DiceMetric(include_background=False, reduction="none", ignore_empty=True)`` on the one-hot
    maps; returns ``(B, num_classes - 1)``, NaN where the class is absent from the reference.
    """
    pred_t = torch.as_tensor(pred).long()
    lab_t = torch.as_tensor(label).long()
    if pred_t.shape != lab_t.shape:
        raise EvaluationError(f"prediction shape {tuple(pred_t.shape)} differs from label shape {tuple(lab_t.shape)}")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(y_pred=one_hot(pred_t, num_classes), y=one_hot(lab_t, num_classes))
    return torch.as_tensor(out).float().cpu().numpy().reshape(pred_t.shape[0], num_classes - 1)


def _float_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None, where: str = ""
) -> dict:
    """AUROC, accuracy and balanced accuracy from ``(N, C)`` probabilities and ``(N,)`` integer labels.

    AUROC: binary on the positive-class probability, otherwise one-vs-rest macro over the classes that occur
    (with both positives and negatives) in ``labels``; ``None`` (with a warning) when fewer than two classes
    occur.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).ravel()
    n, n_cls = probs.shape
    names = list(class_names) if class_names else [f"class_{c}" for c in range(n_cls)]
    present = sorted(set(labels.tolist()))
    out: dict[str, Any] = {"n": int(n)}
    if len(present) < 2:
        logger.warning("%sonly class(es) %s present: AUROC is undefined (null)", f"{where}: " if where else "", present)
        auroc = None
        per_class = {names[c]: None for c in range(n_cls)}
    elif n_cls == 2:
        auroc = float(roc_auc_score(labels, probs[:, 1]))
        per_class = None
    else:
        per_class = {}
        for c in range(n_cls):
            pos = labels == c
            per_class[names[c]] = float(roc_auc_score(pos, probs[:, c])) if 0 < pos.sum() < n else None
        absent = [names[c] for c in range(n_cls) if per_class[names[c]] is None]
        if absent:
            logger.warning("%sclasses %s do not occur: AUROC macro-averages the others", f"{where}: " if where else "", absent)
        vals = [v for v in per_class.values() if v is not None]
        auroc = float(np.mean(vals)) if vals else None
    pred = probs.argmax(1)
    out["auroc"] = auroc
    out["accuracy"] = float((pred == labels).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        out["balanced_accuracy"] = _float_or_none(balanced_accuracy_score(labels, pred))
    if n_cls > 2:
        out["auroc_per_class"] = per_class
    return out


def segmentation_metrics(per_case_dice: np.ndarray, class_names: Sequence[str]) -> dict:
    """``mean_dice`` and ``dice`` per foreground class from ``(N, C-1)`` per-volume Dice (NaN: class absent)."""
    arr = np.asarray(per_case_dice, dtype=np.float64).reshape(-1, len(class_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        per_class = np.nanmean(arr, axis=0) if arr.shape[0] else np.full(len(class_names), np.nan)
        mean = np.nanmean(per_class) if np.isfinite(per_class).any() else np.nan
    return {
        "n": int(arr.shape[0]),
        "mean_dice": _float_or_none(mean),
        "dice": {name: _float_or_none(v) for name, v in zip(class_names, per_class)},
    }


def check_ensemble_compatible(cards: Mapping[str, Mapping]) -> None:
    """Raise :class:`EvaluationError` naming the models when their cards differ in task/inputs/classes."""
    problems = []
    for path in ENSEMBLE_FIELDS:
        values = OrderedDict()
        for name, card in cards.items():
            value: Any = card
            for key in path:
                value = value.get(key) if isinstance(value, Mapping) else None
            values[name] = value
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            detail = ", ".join(f"{n}={json.dumps(v)}" for n, v in values.items())
            problems.append(f"{'.'.join(path)} ({detail})")
    if problems:
        raise EvaluationError(
            "models cannot be ensembled, they disagree on " + "; ".join(problems) + ". Ensembles need the same task, "
            "spatial_dims, input channels/spec and num_classes; pass ensemble=False (or 'auto') to score them separately"
        )
    names = {json.dumps(card.get("classes", {}).get("names")) for card in cards.values()}
    if len(names) > 1:
        logger.warning("models name their classes differently (%s); ensembles match classes by index", ", ".join(sorted(names)))


# ----------------------------------------------------------------------------------------------------------------
# inputs: models and test sets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Model:
    name: str
    path: str | None
    network: torch.nn.Module
    card: dict
    role: str  # "site" or "extra"
    seconds: float = 0.0


@dataclass
class _TestSet:
    name: str
    path: str
    items: list[dict]
    labels: list[int] | None = None  # classification


@dataclass
class _Scores:
    """Per (model, test set) raw results: probabilities + labels (classification) or per-volume Dice."""

    probs: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    dice: list[np.ndarray] = field(default_factory=list)


def _read_json_list(path: Path) -> Any:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON: {e}") from None
    base = path.resolve().parent

    def fix(p):
        return p if not isinstance(p, str) or os.path.isabs(p) else str(base / p)

    if isinstance(data, Mapping) and "models" in data and not isinstance(data["models"], str):
        data = data["models"]
    if isinstance(data, list):
        return [fix(p) for p in data]
    if isinstance(data, Mapping):
        return OrderedDict((k, fix(v)) for k, v in data.items())
    raise EvaluationError(f"{path} must hold a JSON list of model directories or an object name -> directory")


def _as_named(spec, what: str) -> list[tuple[str | None, Any]]:
    """``(name or None, value)`` pairs from a list / mapping / single path (or JSON file listing the models)."""
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if what == "models" and p.is_file() and p.suffix.lower() == ".json":
            spec = _read_json_list(p)
        else:
            spec = [spec]
    if isinstance(spec, Mapping):
        return [(str(k), v) for k, v in spec.items()]
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], torch.nn.Module):
        return [(None, spec)]
    return [(None, v) for v in spec]


def _load_models(spec, role: str, device, taken: set[str]) -> list[_Model]:
    out: list[_Model] = []
    pending: list[tuple[str | None, Any, torch.nn.Module, dict]] = []
    for name, value in _as_named(spec, "models"):
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.nn.Module):
            net, card = value  # an in-memory (network, card) pair, e.g. a freshly distilled model
            net = net.to(device).eval()
            path = None
        else:
            path = os.fspath(value)
            net, card = load_site_model(path, device)
        pending.append((name, path, net, card))
    # default names: the card's site name; fall back to the folder name where these collide
    defaults = [n or str(c.get("site") or (Path(p).name if p else "model")) for n, p, _, c in pending]
    for i, (name, path, net, card) in enumerate(pending):
        chosen = defaults[i]
        if name is None and (defaults.count(chosen) > 1 or chosen in taken) and path:
            chosen = Path(path).resolve().name
        if chosen in RESERVED_MODEL_NAMES:
            raise EvaluationError(f"model name '{chosen}' is reserved; give the models as a mapping name -> directory")
        if chosen in taken:
            raise EvaluationError(f"two models are named '{chosen}'; give the models as a mapping name -> directory")
        taken.add(chosen)
        out.append(_Model(chosen, os.path.abspath(path) if path else None, net, card, role))
    return out


def _name_test_sets(spec) -> list[tuple[str, str]]:
    pairs = _as_named(spec, "test_sets")
    named: list[tuple[str, str]] = []
    stems = [Path(os.fspath(v)).stem for _, v in pairs]
    for (name, value), stem in zip(pairs, stems):
        path = os.fspath(value)
        if name is None:
            name = stem
            if stems.count(stem) > 1:
                name = f"{Path(path).resolve().parent.name}_{stem}"
        named.append((name, path))
    seen: set[str] = set()
    for name, _ in named:
        if name == POOLED:
            raise EvaluationError(f"test set name '{POOLED}' is reserved; give the test sets as a mapping name -> datalist")
        if name in seen:
            raise EvaluationError(f"two test sets are named '{name}'; give the test sets as a mapping name -> datalist")
        seen.add(name)
    return named


def _load_test_set(name: str, path: str, key: str, task: str) -> _TestSet:
    items = load_datalist(path, key=key, task=task, base_dir=os.path.dirname(os.path.abspath(path)))
    labels = None
    if task == "classification":
        labels = []
        for i, item in enumerate(items):
            if isinstance(item["label"], list):
                raise EvaluationError(
                    f"datalist {path}: {key}[{i}] has a multi-label vector; the evaluation scores single-label classification only"
                )
            labels.append(int(item["label"]))
    prepared = []
    for i, item in enumerate(items):
        d = dict(item)
        d[_EVAL_INDEX] = i
        prepared.append(d)
    return _TestSet(name, os.path.abspath(path), prepared, labels)


def _preprocessing_signature(card: Mapping) -> str:
    spec = card["input"]
    return json.dumps(
        [
            card["task"],
            card["spatial_dims"],
            spec.get("channels"),
            spec.get("spatial_size"),
            card["classes"]["num_classes"],
            spec.get("spacing"),
            spec.get("intensity_range"),
        ]
    )


def _find_known_error(exc: BaseException) -> BaseException | None:
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, _KNOWN_ERRORS + (EvaluationError,)):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _resolve_device(device) -> torch.device:
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------------------
# the inference pass
# ----------------------------------------------------------------------------------------------------------------


def _item_source(test: _TestSet, index: int) -> str:
    return str(test.items[index].get("image"))


def _run_pass(
    group: list[_Model],
    test: _TestSet,
    ensembles: Mapping[str, np.ndarray | None],
    members: list[str],
    scores: dict[tuple[str, str], _Scores],
    ens_seconds: dict[str, float],
    device: torch.device,
    batch_size: int,
    sw_batch_size: int,
    sw_overlap: float,
    num_workers: int,
) -> None:
    """One ignite Engine run over ``test``: load/preprocess each item once, run every model of ``group`` on it."""
    card = group[0].card
    task = card["task"]
    num_classes = int(card["classes"]["num_classes"])
    keep = ["image", "label", _EVAL_INDEX]
    transform = Compose(card_preprocessing(card, with_label=True) + [SelectItemsd(keys=keep)])
    dataset = Dataset(data=test.items, transform=transform)
    loader = DataLoader(
        dataset, batch_size=batch_size if task == "classification" else 1, shuffle=False, num_workers=num_workers
    )
    if task == "segmentation":
        inferer = SlidingWindowInferer(
            roi_size=list(card["input"]["spatial_size"]), sw_batch_size=sw_batch_size, overlap=sw_overlap
        )
    else:
        inferer = SimpleInferer()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def record(name: str, probs: torch.Tensor, label: torch.Tensor) -> None:
        s = scores.setdefault((name, test.name), _Scores())
        if task == "classification":
            s.probs.append(probs.detach().float().cpu().numpy())
            s.labels.append(label.detach().cpu().numpy().reshape(-1))
        else:
            pred = probs.argmax(dim=1, keepdim=True)
            s.dice.append(dice_per_class(pred, label.to(pred.device), num_classes))

    def step(engine, batch) -> None:
        x = batch["image"].to(device)
        label = torch.as_tensor(batch["label"])
        index = [int(i) for i in torch.as_tensor(batch[_EVAL_INDEX]).reshape(-1)]
        probs: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for model in group:
                t0 = time.perf_counter()
                logits = inferer(x, model.network)
                logits = torch.as_tensor(logits)
                finite = torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)
                if not bool(finite.all()):
                    bad = index[int((~finite).nonzero()[0])]
                    raise EvaluationError(
                        f"model {model.name} produced NaN/Inf outputs for test item {_item_source(test, bad)} "
                        f"(test set {test.name})"
                    )
                probs[model.name] = torch.softmax(logits.float(), dim=1)
                sync()
                model.seconds += time.perf_counter() - t0
            if ensembles and all(m in probs for m in members):
                for ens_name, weights in ensembles.items():
                    t0 = time.perf_counter()
                    probs[ens_name] = combine_probabilities([probs[m] for m in members], weights)
                    sync()
                    ens_seconds[ens_name] = ens_seconds.get(ens_name, 0.0) + time.perf_counter() - t0
            for name, p in probs.items():
                record(name, p, label)

    engine = Engine(step)
    engine.logger = _ENGINE_LOGGER  # ignite logs every run (and a failure before re-raising it): kept quiet
    names = ", ".join(m.name for m in group)
    logger.info("test set %s (%d items): running %s", test.name, len(test.items), names)
    try:
        engine.run(loader)
    except Exception as e:
        known = _find_known_error(e)
        if known is None:
            raise
        if isinstance(known, EvaluationError):
            raise known from None
        raise type(known)(f"test set {test.name} ({test.path}), model(s) {names}: {known}") from known


# ----------------------------------------------------------------------------------------------------------------
# the public entry point
# ----------------------------------------------------------------------------------------------------------------


def evaluate_models(
    models,
    test_sets,
    output_dir: str | os.PathLike,
    ensemble: bool | str = True,
    pooled: bool = True,
    device: str | torch.device = "cpu",
    sw_batch_size: int = 4,
    sw_overlap: float = 0.25,
    num_workers: int = 0,
    extra_models=None,
    test_key: str = "test",
    batch_size: int = 64,
) -> dict:
    """Score site models (and their ensembles) on test datalists; write ``metrics.json/csv/md`` to ``output_dir``.

    Args:
        models: the site models: a list of site output directories, a mapping name -> directory, or the path of
            a JSON file holding such a list/mapping (relative entries are relative to that file). A value may
            also be an in-memory ``(network, card)`` pair. Names default to ``card["site"]`` (the folder name
            where two cards give the same site name).
        test_sets: test datalists (decathlon layout): a list of paths, a mapping name -> path, or one path.
            Names default to the file stem (``sites/site0.json`` -> ``site0``).
        output_dir: where the metric files go (created).
        ensemble: ``True``: add ``ensemble_mean`` and ``ensemble_weighted`` of ``models`` (error if the models
            disagree on task/inputs/classes); ``"auto"``: skip them with a warning in that case; ``False``: none.
            Ensembles need at least two models.
        pooled: also score the concatenation of all test sets as ``pooled``.
        device: torch device for inference (``"auto"``: CUDA when available).
        sw_batch_size, sw_overlap: sliding-window inference (segmentation).
        num_workers: DataLoader workers.
        extra_models: further models scored on their own and never ensembled (e.g. a distilled central model);
            same forms as ``models``.
        test_key: the datalist list to score.
        batch_size: classification batch size (segmentation runs one volume at a time).

    Returns:
        the metrics dict written to ``metrics.json`` (see the module docstring).
    """
    if ensemble not in (True, False, "auto"):
        raise EvaluationError(f"ensemble must be True, False or 'auto', got {ensemble!r}")
    t_start = time.perf_counter()
    dev = _resolve_device(device)
    taken: set[str] = set()
    sites = _load_models(models, "site", dev, taken)
    extras = _load_models(extra_models, "extra", dev, taken)
    all_models = sites + extras
    if not all_models:
        raise EvaluationError("no models to evaluate")
    tasks = OrderedDict((m.name, m.card["task"]) for m in all_models)
    if len(set(tasks.values())) > 1:
        raise EvaluationError("models disagree on the task (" + ", ".join(f"{n}={t}" for n, t in tasks.items()) + ")")
    task = all_models[0].card["task"]
    if task not in ("classification", "segmentation"):
        raise EvaluationError(f"unknown task {task!r} in the site cards")

    # ensembles
    ensembles: OrderedDict[str, np.ndarray | None] = OrderedDict()
    members = [m.name for m in sites]
    ensemble_meta: dict[str, dict] = {}
    if ensemble and len(sites) < 2:
        logger.info("ensembles need at least two site models; %d given, none formed", len(sites))
    elif ensemble:
        try:
            check_ensemble_compatible(OrderedDict((m.name, m.card) for m in sites))
        except EvaluationError as e:
            if ensemble != "auto":
                raise
            logger.warning("ensembles skipped: %s", e)
        else:
            counts = [m.card.get("class_counts") for m in sites]
            weights = class_count_weights(counts, members, int(sites[0].card["classes"]["num_classes"]))
            ensembles[ENSEMBLE_MEAN] = None
            ensembles[ENSEMBLE_WEIGHTED] = weights
            ensemble_meta[ENSEMBLE_MEAN] = {"members": members, "weights": None}
            ensemble_meta[ENSEMBLE_WEIGHTED] = {
                "members": members,
                "weights": {m: [float(w) for w in weights[k]] for k, m in enumerate(members)},
                "equal_weight_sites": [m for m, c in zip(members, counts) if c is None],
                "count_unit": sites[0].card.get("count_unit"),
            }

    # test sets
    named = _name_test_sets(test_sets)
    if not named:
        raise EvaluationError("no test datalists given")
    tests = [_load_test_set(name, path, test_key, task) for name, path in named]

    # one pass per (preprocessing group, test set)
    groups: OrderedDict[str, list[_Model]] = OrderedDict()
    for m in all_models:
        groups.setdefault(_preprocessing_signature(m.card), []).append(m)
    scores: dict[tuple[str, str], _Scores] = {}
    ens_seconds: dict[str, float] = {}
    for group in groups.values():
        in_group = {m.name for m in group}
        group_ens = ensembles if ensembles and set(members) <= in_group else {}
        for test in tests:
            _run_pass(group, test, group_ens, members, scores, ens_seconds, dev, batch_size, sw_batch_size, sw_overlap, num_workers)

    # metrics
    result_names = [m.name for m in all_models] + list(ensembles)
    cards = {m.name: m.card for m in all_models}
    for ens in ensembles:
        cards[ens] = sites[0].card
    test_names = [t.name for t in tests] + ([POOLED] if pooled else [])
    metrics: OrderedDict[str, Any] = OrderedDict()
    for name in result_names:
        card = cards[name]
        class_names = list(card["classes"].get("names") or [f"class_{c}" for c in range(card["classes"]["num_classes"])])
        per_model: OrderedDict[str, dict] = OrderedDict()
        for tname in test_names:
            parts = [scores[(name, t.name)] for t in tests] if tname == POOLED else [scores[(name, tname)]]
            where = f"test set {tname}, model {name}"
            if task == "classification":
                probs = np.concatenate([p for s in parts for p in s.probs])
                labels = np.concatenate([lab for s in parts for lab in s.labels])
                per_model[tname] = classification_metrics(probs, labels, class_names, where=where)
            else:
                dice = np.concatenate([d for s in parts for d in s.dice]) if parts else np.zeros((0, len(class_names) - 1))
                per_model[tname] = segmentation_metrics(dice, class_names[1:])
        metrics[name] = per_model

    # meta
    model_meta: OrderedDict[str, dict] = OrderedDict()
    for m in all_models:
        card = m.card
        model_meta[m.name] = {
            "role": m.role,
            "dir": m.path,
            "site": card.get("site"),
            "task": card["task"],
            "spatial_dims": card["spatial_dims"],
            "input": card["input"],
            "num_classes": card["classes"]["num_classes"],
            "class_names": card["classes"].get("names"),
            "class_counts": card.get("class_counts"),
            "count_unit": card.get("count_unit"),
            "sample_count": card.get("sample_count"),
            "network": (card.get("network_def") or {}).get("name"),
            "inference_seconds": round(m.seconds, 4),
        }
    for ens, info in ensemble_meta.items():
        model_meta[ens] = {"role": "ensemble", **info, "inference_seconds": round(ens_seconds.get(ens, 0.0), 4)}
    test_meta: OrderedDict[str, dict] = OrderedDict()
    n_cls_max = max(int(m.card["classes"]["num_classes"]) for m in all_models)
    for t in tests:
        entry: dict[str, Any] = {"path": t.path, "key": test_key, "count": len(t.items)}
        if t.labels is not None:
            entry["class_counts"] = np.bincount(np.asarray(t.labels, dtype=np.int64), minlength=n_cls_max).tolist()
        test_meta[t.name] = entry
    if pooled:
        entry = {"members": [t.name for t in tests], "count": sum(len(t.items) for t in tests)}
        if task == "classification":
            entry["class_counts"] = np.sum([test_meta[t.name]["class_counts"] for t in tests], axis=0).tolist()
        test_meta[POOLED] = entry
    metrics[META] = {
        "task": task,
        "primary_metric": "auroc" if task == "classification" else "mean_dice",
        "models": model_meta,
        "test_sets": test_meta,
        "device": str(dev),
        "sw_batch_size": sw_batch_size if task == "segmentation" else None,
        "sw_overlap": sw_overlap if task == "segmentation" else None,
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"monai_fedkd": __version__, "monai": monai.__version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    metrics = _jsonable(metrics)
    _write_outputs(Path(output_dir), metrics)
    logger.info("metrics written to %s", Path(output_dir) / "metrics.json")
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# output files
# ----------------------------------------------------------------------------------------------------------------


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _float_or_none(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _model_names(metrics: Mapping) -> list[str]:
    return [k for k in metrics if k != META]


def _test_names(metrics: Mapping) -> list[str]:
    meta = metrics.get(META, {})
    if meta.get("test_sets"):
        return list(meta["test_sets"])
    names: list[str] = []
    for model in _model_names(metrics):
        names.extend(t for t in metrics[model] if t not in names)
    return names


def _csv_rows(metrics: Mapping) -> Iterable[tuple[str, str, str, Any]]:
    for model in _model_names(metrics):
        for test, values in metrics[model].items():
            for metric, value in values.items():
                if isinstance(value, Mapping):
                    for sub, v in value.items():
                        yield model, test, f"{metric}/{sub}", v
                else:
                    yield model, test, metric, value


def _write_outputs(output_dir: Path, metrics: Mapping) -> None:
    import csv
    import io

    output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "test_set", "metric", "value"])
    for model, test, metric, value in _csv_rows(metrics):
        writer.writerow([model, test, metric, "" if value is None else (repr(value) if isinstance(value, float) else value)])
    _atomic_write_text(output_dir / "metrics.csv", buf.getvalue())
    _atomic_write_text(output_dir / "metrics.md", format_markdown(metrics))


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _metric_table(metrics: Mapping, metric: str) -> list[str]:
    tests = _test_names(metrics)
    meta = metrics.get(META, {}).get("test_sets", {})
    header = ["model"] + [f"{t} (n={meta[t]['count']})" if t in meta and "count" in meta[t] else t for t in tests]
    rows = [[m] + [_fmt(metrics[m].get(t, {}).get(metric)) for t in tests] for m in _model_names(metrics)]
    return _table(header, rows)


def primary_table(metrics: Mapping) -> str:
    """The main markdown table: rows = models (incl. ensembles), columns = test sets (+ pooled), cell = AUROC
    (classification) or mean Dice (segmentation)."""
    meta = metrics.get(META, {})
    metric = meta.get("primary_metric") or ("auroc" if meta.get("task") == "classification" else "mean_dice")
    return "\n".join(_metric_table(metrics, metric)) + "\n"


def format_markdown(metrics: Mapping) -> str:
    """All markdown tables of ``metrics.md``."""
    meta = metrics.get(META, {})
    task = meta.get("task", "classification")
    lines = [f"# Evaluation ({task})", ""]
    if task == "classification":
        sections = [("AUROC", "auroc"), ("Accuracy", "accuracy"), ("Balanced accuracy", "balanced_accuracy")]
        for title, metric in sections:
            lines += [f"## {title}", ""] + _metric_table(metrics, metric) + [""]
    else:
        lines += ["## Mean Dice (foreground classes)", ""] + _metric_table(metrics, "mean_dice") + [""]
        for test in _test_names(metrics):
            classes: list[str] = []
            for m in _model_names(metrics):
                classes.extend(c for c in metrics[m].get(test, {}).get("dice", {}) if c not in classes)
            rows = [[m] + [_fmt(metrics[m].get(test, {}).get("dice", {}).get(c)) for c in classes] for m in _model_names(metrics)]
            lines += [f"## Dice per class: {test}", ""] + _table(["model"] + classes, rows) + [""]
    models = meta.get("models", {})
    weighted = models.get(ENSEMBLE_WEIGHTED)
    if weighted and weighted.get("weights"):
        lines += [
            "ensemble_mean: mean of the sites' softmax probabilities; ensemble_weighted: per-class weights from the "
            "sites' class counts (rows: sites, columns: classes):",
            "",
        ]
        n = len(next(iter(weighted["weights"].values())))
        first = models.get(weighted["members"][0], {}) if weighted.get("members") else {}
        names = first.get("class_names") or [f"class {c}" for c in range(n)]
        rows = [[s] + [_fmt(float(w)) for w in ws] for s, ws in weighted["weights"].items()]
        lines += _table(["site"] + list(names)[:n], rows) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def _split_named(values: Sequence[str] | None):
    """``["a", "b"]`` -> list; ``["x=a", "y=b"]`` -> mapping (``NAME=PATH``); a lone ``.json`` model list as is."""
    if not values:
        return None
    named = [v.split("=", 1) if ("=" in v and os.sep not in v.split("=", 1)[0]) else (None, v) for v in values]
    if all(n is not None for n, _ in named):
        return OrderedDict((n, p) for n, p in named)
    if any(n is not None for n, _ in named):
        raise EvaluationError("give either all or none of the paths as NAME=PATH")
    return [p for _, p in named]


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``monai-fedkd evaluate``."""
    parser.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="DIR",
        help="site output directories (site_card.json + models/model.pt), optionally as NAME=DIR, or one JSON file listing them",
    )
    parser.add_argument(
        "--extra-models", nargs="+", default=None, metavar="DIR", help="models scored on their own, never ensembled (e.g. a distilled model)"
    )
    parser.add_argument(
        "--test-datalists", nargs="+", required=True, metavar="FILE", help="test datalists (optionally NAME=FILE); names default to the file stem"
    )
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where metrics.json/.csv/.md go")
    parser.add_argument("--test-key", default="test", help="datalist list to score (default: test)")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda:0 when available, else cpu)")
    parser.add_argument(
        "--ensemble", choices=("yes", "no", "auto"), default="yes", help="add the mean and class-count weighted ensembles (auto: skip if the models disagree)"
    )
    parser.add_argument("--no-pooled", action="store_true", help="do not score the concatenation of the test sets")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="sliding-window batch size (segmentation)")
    parser.add_argument("--sw-overlap", type=float, default=0.25, help="sliding-window overlap (segmentation)")
    parser.add_argument("--batch-size", type=int, default=64, help="classification batch size")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")


def kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate_models`` keyword arguments from the options of :func:`add_evaluate_arguments`."""
    models = _split_named(args.models)
    if isinstance(models, list) and len(models) == 1:
        models = models[0]  # a single directory or a JSON file listing the models
    return {
        "models": models,
        "test_sets": _split_named(args.test_datalists),
        "output_dir": args.output_dir,
        "extra_models": _split_named(args.extra_models),
        "test_key": args.test_key,
        "device": args.device,
        "ensemble": {"yes": True, "no": False, "auto": "auto"}[args.ensemble],
        "pooled": not args.no_pooled,
        "sw_batch_size": args.sw_batch_size,
        "sw_overlap": args.sw_overlap,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
    }


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation for parsed options (``monai-fedkd evaluate``) and print the markdown tables.

    Errors propagate (the ``monai-fedkd`` entry point turns them into one line); returns the exit code 0.
    """
    metrics = evaluate_models(**kwargs_from_args(args))
    print(format_markdown(metrics))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone ``python -m monai_fedkd.evaluation.evaluate``: as ``monai-fedkd evaluate``. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="monai-fedkd evaluate",
        description="Score site models (and their mean / class-count weighted ensembles) on test datalists; "
        "writes metrics.json, metrics.csv and metrics.md to --output-dir.",
    )
    add_evaluate_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return run_evaluate(args)
    except (EvaluationError, SiteCardError, DatalistError, InputCheckError) as exc:
        if args.verbose:
            raise
        sys.stderr.write(f"monai-fedkd evaluate: error: {exc}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
