"""Export a trained model (central or site) as a self-contained MONAI bundle that runs without monai_fedkd.

    monai-fedkd export runs/demo/central runs/demo/central_bundle --metrics runs/demo/eval/metrics.json

The bundle holds ``configs/inference.json`` (plain MONAI components plus the bundle's own
``scripts/fedkd_inference.py``, a copy of :mod:`monai_fedkd.export.runtime`), ``configs/metadata.json`` with
``network_data_format`` from the model's card, ``configs/logging.conf``, ``models/model.pt``, ``models/model.ts``
(TorchScript through ``monai.bundle.ckpt_export``), ``docs/README.md`` (how the model was produced and how it
scored) and ``LICENSE``. It is assembled in ``<bundle_dir>.partial`` and renamed when complete, so a failed export
never leaves a bundle that looks finished.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

import monai
from monai.bundle import ckpt_export

from monai_fedkd import __version__
from monai_fedkd.site.card import load_site_model
from monai_fedkd.site.policy import AnswerPolicy

__all__ = ["ExportError", "export_bundle", "plain_network_def", "RUNTIME_MODULE"]

logger = logging.getLogger(__name__)

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
RUNTIME_MODULE = "fedkd_inference"  # scripts/fedkd_inference.py in the exported bundle
TEMPLATES = resources.files("monai_fedkd.export") / "templates"


class ExportError(ValueError):
    """A model that cannot be exported as a plain-MONAI bundle (the message says why)."""


def plain_network_def(network_def: Mapping) -> dict:
    """A card's ``network_def`` without monai_fedkd: ``build_network(name=monai.X, **kw)`` -> ``{"_target_": monai.X, **kw}``."""
    definition = copy.deepcopy(dict(network_def))
    target = definition.get("_target_", "")
    if target == "monai_fedkd.networks.build_network":
        target = definition.pop("name")
        if "." not in target:
            target = f"monai.networks.nets.{target}"
    if not str(target).startswith("monai."):
        raise ExportError(
            f"network {target!r} is not a MONAI network: an exported bundle must run with plain MONAI, so its "
            "network has to come from monai.networks (train the site or the central student with one)"
        )
    definition["_target_"] = target
    return definition


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _metadata(card: Mapping, name: str, version: str, modality: str | None, metrics: Mapping | None) -> dict:
    task, spec, classes = card["task"], card["input"], card["classes"]
    names = list(classes.get("names") or [f"class_{i}" for i in range(classes["num_classes"])])
    seg = task == "segmentation"
    spatial = [int(s) for s in spec["spatial_size"]]
    role = card.get("role", "site")
    # the readers LoadImage picks for NIfTI, DICOM and PNG; one dict only: MONAI 1.6.1 parses a (deprecated)
    # optional_packages_version as required_packages_version and drops the real one
    required = {k: v for k, v in {"nibabel": _version("nibabel"), "pydicom": _version("pydicom"), "pillow": _version("pillow")}.items() if v}
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by monai_fedkd {__version__} from the {role} model '{card.get('site')}'"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required,
        "name": name,
        "task": f"{card['spatial_dims']}D {task} ({', '.join(names)})",
        "description": (
            f"The {role} model of a monai_fedkd federation, exported to run with plain MONAI on a folder of NIfTI files, "
            "DICOM series or a datalist; see docs/README.md for how it was produced and how it scored."
        ),
        "authors": "monai_fedkd contributors",
        "copyright": "Copyright (c) monai_fedkd contributors",
        "intended_use": "Research on federated learning; not for diagnostic use.",
        "data_source": "the sites' own data, which never left the sites (see docs/README.md)",
        "data_type": "nifti, dicom (series), png",
        "image_classes": f"{spec['channels']} channel(s), intensity {spec.get('intensity_range') or 'per-image 0.5-99.5 percentiles'} scaled to [0, 1]",
        "label_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(names)),
        "pred_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(names)),
        "eval_metrics": _headline_metrics(metrics, task),
        "references": ["Gong et al. Federated Learning via Input-Output Collaborative Distillation. AAAI 2024."],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": modality or "n/a",
                    "num_channels": int(spec["channels"]),
                    "spatial_shape": spatial,
                    "dtype": "float32",
                    "value_range": [float(v) for v in spec.get("value_range") or (0.0, 1.0)],
                    "is_patch_data": seg,
                    "channel_def": {str(i): "image" for i in range(int(spec["channels"]))},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image" if seg else "probabilities",
                    "format": "segmentation" if seg else "classes",
                    "modality": "n/a",
                    "num_channels": len(names),
                    "spatial_shape": spatial if seg else [len(names)],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": seg,
                    "channel_def": {str(i): n for i, n in enumerate(names)},
                }
            },
        },
    }


def _model_metrics(metrics: Mapping | None, model_dir: Path) -> dict | None:
    """This model's rows of an evaluation ``metrics.json`` (matched by its directory)."""
    if not metrics:
        return None
    for name, meta in (metrics.get("meta", {}).get("models") or {}).items():
        if meta.get("dir") and Path(meta["dir"]).resolve() == model_dir.resolve():
            return {"model": name, "scores": metrics.get(name, {}), "test_sets": metrics["meta"].get("test_sets", {})}
    return None


def _headline_metrics(found: Mapping | None, task: str) -> dict:
    key = "auroc" if task == "classification" else "mean_dice"
    if not found:
        return {}
    return {f"{test}_{key}": v[key] for test, v in found["scores"].items() if isinstance(v, dict) and v.get(key) is not None}


def _readme(card: Mapping, name: str, found: Mapping | None, modality: str | None) -> str:
    task = card["task"]
    spec = card["input"]
    names = card["classes"].get("names") or []
    role = card.get("role", "site")
    lines = [f"# {name}", "", f"A {card['spatial_dims']}D {task} model ({role}) exported by monai_fedkd {__version__}. "
             "It runs with plain MONAI (no monai_fedkd needed). Research use only; not for diagnosis.", "", "## Run", "",
             "```bash", "python -m monai.bundle run --config_file <bundle>/configs/inference.json \\",
             "    --input_dir <folder of NIfTI files or DICOM series> --output_dir <out>",
             "# or --datalist <decathlon datalist.json> --datalist_key test", "```", "",
             "Inputs: every image file directly in `input_dir` is one study (NIfTI, PNG, other ITK formats); DICOM files anywhere "
             "below it are sorted into series by SeriesInstanceUID (one study per series)."
             + (f" DICOM series whose Modality is not {modality} are refused." if modality else ""), ""]
    if task == "segmentation":
        lines += ["Outputs in `output_dir`: `<study>_seg.nii.gz` per study, a label map in the study's own geometry (spacing, "
                  "orientation, origin and shape of the input), label values " + ", ".join(f"{i} = {n}" for i, n in enumerate(names))
                  + "; `label_volumes.csv` (one row per study: volume of every label in mm^3); `errors.csv`."]
    else:
        lines += ["Outputs in `output_dir`: `predictions.csv` (one row per study: `study` = file name or SeriesInstanceUID, "
                  "`prob_<class>` for " + ", ".join(names) + ", `predicted_class`); `errors.csv`."]
    lines += ["", "Studies that cannot be read (corrupt file, non-image DICOM, wrong modality or channel count) are listed in "
              "`errors.csv` with the reason and the others still run; the exit status is the number of failed studies "
              "(0: all done; capped at 100).", "",
              "## Input contract", "",
              f"- {spec['channels']} channel(s), {card['spatial_dims']} spatial dimensions",
              f"- intensity: {spec.get('intensity_range') or 'per-image 0.5/99.5 percentiles'} mapped to [0, 1]",
              (f"- resampled to spacing {spec.get('spacing')} mm in RAS orientation, sliding windows of {spec['spatial_size']}"
               if task == "segmentation" else f"- resized to {spec['spatial_size']}"), "", "## How it was produced", ""]
    if role == "central":
        lines += [f"Distilled centrally in query mode (FedIOD-style): the server saw only the sites' answers on synthetic "
                  f"inputs, never their images or weights. Seed {card.get('seed')}, {card.get('iterations')} generator steps, "
                  f"model selection `{card.get('selection')}` (no test data).", "",
                  "| site | samples | class counts | answer policy | epsilon (delta) | dropped |", "|---|---|---|---|---|---|"]
        for site, s in (card.get("sites") or {}).items():
            lines.append(f"| {site} | {s.get('sample_count')} | {s.get('class_counts')} | {_policy_text(s.get('policy'))} | "
                         f"{_epsilon_text(s.get('privacy'))} | {s.get('dropped') or ''} |")
    else:
        val = card.get("validation") or {}
        lines += [f"Trained at site `{card.get('site')}` on {card.get('sample_count')} samples (class counts "
                  f"{card.get('class_counts')}, unit {card.get('count_unit')}), seed {card.get('seed')}; checkpoint chosen on the "
                  f"site's validation split ({val.get('metric')} = {val.get('best')} at epoch {val.get('best_epoch')})."]
    lines += ["", "## Measured quality", ""]
    if found:
        key = "auroc" if task == "classification" else "mean_dice"
        extra = "accuracy" if task == "classification" else "dice"
        lines += [f"From the monai_fedkd evaluation (model `{found['model']}`), on each site's held-out test split and the pooled set:", "",
                  f"| test set | n | {key} | {extra} |", "|---|---|---|---|"]
        for test, v in found["scores"].items():
            if isinstance(v, dict):
                lines.append(f"| {test} | {v.get('n')} | {_fmt(v.get(key))} | {_fmt(v.get(extra))} |")
    else:
        lines += ["Not measured at export time (give `--metrics <evaluation metrics.json>` to `monai-fedkd export`)."]
    lines += ["", "## Files", "", "`configs/inference.json`, `configs/metadata.json`, `configs/logging.conf`, `models/model.pt` (state dict), "
              "`models/model.ts` (TorchScript, for MONAI Deploy or other runtimes), `scripts/fedkd_inference.py` (study discovery, "
              "per-study errors, reports), `LICENSE`.", ""]
    return "\n".join(lines)


def _policy_text(policy: Mapping | None) -> str:
    if policy is None:
        return "not recorded"
    changed = {k: v for k, v in policy.items() if v != getattr(AnswerPolicy(), k)}
    return "full answers (logits and gradients)" if not changed else ", ".join(f"{k}={v}" for k, v in changed.items())


def _epsilon_text(privacy: Mapping | None) -> str:
    if not privacy:
        return "not recorded"
    if privacy.get("epsilon") is None:
        return "unbounded (no noise)"
    return f"{privacy['epsilon']:.3g} ({privacy.get('delta')})"


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _inference_config(card: Mapping, modality: str | None, name: str) -> dict:
    task = card["task"]
    config = json.loads((TEMPLATES / f"inference_{task}.json").read_text())
    spec, classes = card["input"], card["classes"]
    config.update({
        "spatial_dims": int(card["spatial_dims"]),
        "in_channels": int(spec["channels"]),
        "num_classes": int(classes["num_classes"]),
        "class_names": list(classes.get("names") or [f"class_{i}" for i in range(classes["num_classes"])]),
        "spatial_size": [int(s) for s in spec["spatial_size"]],
        "intensity_range": spec.get("intensity_range"),
        "modality": modality,
        "network_def": plain_network_def(card["network_def"]),
    })
    if task == "segmentation":
        config["spacing"] = spec.get("spacing")
        config["model_name"] = name  # the algorithm name in DICOM-SEG objects
    return config


def export_bundle(
    model_dir: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    metrics: str | os.PathLike | None = None,
    modality: str | None = None,
    name: str | None = None,
    version: str = "0.1.0",
    overwrite: bool = False,
) -> Path:
    """Export the model in ``model_dir`` (``models/model.pt`` + site or central card) as a MONAI bundle.

    Args:
        model_dir: a site bundle's or the central distillation's ``output_dir``.
        bundle_dir: the bundle to create (must not exist unless ``overwrite``).
        metrics: an evaluation ``metrics.json`` that scored this model; its scores go into the README and metadata.
        modality: DICOM Modality the model accepts (e.g. ``"MR"``); other series are refused. ``None``: any.
        name: the bundle's name (default: ``monai_fedkd <role> <task>``).
        version: the bundle's version.
        overwrite: replace an existing ``bundle_dir``.
    Returns:
        ``bundle_dir``.
    """
    model_dir, bundle_dir = Path(model_dir), Path(bundle_dir)
    net, card = load_site_model(model_dir)  # checks the card and that the weights fit its network
    if bundle_dir.exists() and not overwrite:
        raise ExportError(f"{bundle_dir} exists; choose another folder or pass overwrite")
    found = None
    if metrics:
        metrics_path = Path(metrics)
        if not metrics_path.is_file():
            raise ExportError(f"metrics file {metrics_path} does not exist")
        found = _model_metrics(json.loads(metrics_path.read_text()), model_dir)
        if found is None:
            raise ExportError(f"{metrics_path} holds no scores for the model in {model_dir}")
    name = name or f"monai_fedkd {card.get('role', 'site')} {card['task']}"
    plain_network_def(card["network_def"])  # refuse a non-MONAI network before writing anything

    stage = bundle_dir.with_name(f"{bundle_dir.name}.partial")
    if stage.exists():
        shutil.rmtree(stage)
    try:
        _write_bundle(stage, model_dir, net, card, name, version, modality, found, metrics)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    os.replace(stage, bundle_dir)
    logger.info("exported %s -> %s", model_dir, bundle_dir)
    return bundle_dir


def _write_bundle(stage: Path, model_dir: Path, net: torch.nn.Module, card: Mapping, name: str, version: str,
                  modality: str | None, found: Mapping | None, metrics) -> None:
    config = _inference_config(card, modality, name)
    for sub in ("configs", "models", "scripts", "docs"):
        (stage / sub).mkdir(parents=True)
    (stage / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
    (stage / "configs" / "metadata.json").write_text(json.dumps(_metadata(card, name, version, modality, found), indent=4) + "\n")
    shutil.copyfile(TEMPLATES / "logging.conf", stage / "configs" / "logging.conf")
    shutil.copyfile(TEMPLATES / "LICENSE", stage / "LICENSE")
    runtime = resources.files("monai_fedkd.export") / "runtime.py"
    (stage / "scripts" / f"{RUNTIME_MODULE}.py").write_text(runtime.read_text())
    (stage / "scripts" / "__init__.py").write_text('"""Code of this bundle (copied from monai_fedkd.export.runtime by monai-fedkd export)."""\n')
    torch.save(net.state_dict(), stage / "models" / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(stage / "models" / "model.ts"), ckpt_file=str(stage / "models" / "model.pt"),
                meta_file=str(stage / "configs" / "metadata.json"), config_file=str(stage / "configs" / "inference.json"),
                bundle_root=str(stage))
    (stage / "docs" / "README.md").write_text(_readme(card, name, found, modality))
    (stage / "docs" / "export.json").write_text(json.dumps({
        "source": str(model_dir.resolve()), "card": card, "metrics": str(Path(metrics).resolve()) if metrics else None,
        "monai_fedkd_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, indent=2) + "\n")
