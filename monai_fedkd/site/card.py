"""Site card: the small JSON a site publishes beside its trained model.

The central distillation and the evaluation use only ``models/model.pt`` and ``site_card.json`` from a site
bundle's ``output_dir``. Both are written only when training completes, through a temporary name and an atomic
rename, so a failed run never leaves a complete-looking pair behind.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from monai.bundle import ConfigParser
from monai.transforms import LoadImage
from monai.utils import min_version, optional_import

from monai_fedkd import __version__
from monai_fedkd.networks import network_definition

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = ["SITE_CARD_NAME", "SiteCardError", "SiteOutputWriter", "class_counts", "load_site_model", "read_site_card", "atomic_write_json"]

logger = logging.getLogger(__name__)

SITE_CARD_NAME = "site_card.json"
CENTRAL_CARD_NAME = "central_card.json"  # the central model's card has the same keys (plus how it was distilled)
CARD_FORMAT_VERSION = 1
REQUIRED_CARD_KEYS = ("task", "spatial_dims", "input", "classes", "network_def", "checkpoint")


class SiteCardError(ValueError):
    """A missing, incomplete or inconsistent site output."""


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def class_counts(items: Sequence[dict], task: str, num_classes: int, label_key: str = "label") -> list[int]:
    """Samples per class (classification) or voxels per class (segmentation, counted on the label maps as stored)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    if task == "classification":
        for item in items:
            label = item[label_key]
            if isinstance(label, (list, tuple)):  # multi-label vector: count positives
                counts += np.asarray(label, dtype=np.int64)
            else:
                counts[int(label)] += 1
        return counts.tolist()
    loader = LoadImage(image_only=True)
    for item in items:
        lab = np.asarray(loader(item[label_key])).astype(np.int64).ravel()
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise SiteCardError(f"label map {item[label_key]} has values outside [0, {num_classes})")
        counts += np.bincount(lab, minlength=num_classes)[:num_classes]
    return counts.tolist()


class SiteOutputWriter:
    """Ignite handler that turns a finished site training run into ``models/model.pt`` + ``site_card.json``.

    During training the best-validation checkpoint is kept in ``staging_dir`` (the ``CheckpointSaver``'s
    ``save_dir``). On ``STARTED`` stale outputs from an earlier run are removed (the staging dir too, unless the
    engine continues an earlier run, as in federated rounds); on ``COMPLETED`` the best checkpoint is copied to
    ``output_dir/models/model.pt`` and the card is written, both by atomic rename. If the run fails, neither final
    file exists.
    """

    def __init__(
        self,
        output_dir: str,
        task: str,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        network: torch.nn.Module,
        train_items: Sequence[dict],
        spatial_size: Sequence[int],
        class_names: Sequence[str] | None = None,
        spacing: Sequence[float] | None = None,
        intensity_range: Sequence[float] | None = None,
        value_range: Sequence[float] = (0.0, 1.0),
        validator=None,
        key_metric: str | None = None,
        staging_dir: str | None = None,
        checkpoint_name: str = "model.pt",
        site_name: str | None = None,
        seed: int | None = None,
        publish_counts: bool = True,
        answer_policy: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        if task not in ("classification", "segmentation"):
            raise SiteCardError(f"task must be 'classification' or 'segmentation', got {task!r}")
        self.output_dir = Path(output_dir)
        self.staging_dir = Path(staging_dir) if staging_dir else self.output_dir / "models" / ".staging"
        self.checkpoint_name = checkpoint_name
        self.network = network
        self.network_def = network_definition(network)  # fail before training if it cannot be recorded
        from monai_fedkd.site.policy import AnswerPolicy  # a policy that cannot be enforced fails before training too

        policy = AnswerPolicy.from_dict(answer_policy).as_dict()
        self.train_items = list(train_items)
        self.validator, self.key_metric = validator, key_metric
        names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise SiteCardError(f"class_names has {len(names)} entries but num_classes={num_classes}")
        self.card: dict[str, Any] = {
            "format_version": CARD_FORMAT_VERSION,
            "site": site_name or self.output_dir.name,
            "task": task,
            "spatial_dims": int(spatial_dims),
            "input": {
                "channels": int(in_channels),
                "spatial_size": [int(s) for s in spatial_size],
                "spacing": [float(s) for s in spacing] if spacing is not None else None,
                "intensity_range": [float(v) for v in intensity_range] if intensity_range is not None else None,
                "value_range": [float(v) for v in value_range],
            },
            "classes": {"num_classes": int(num_classes), "names": names},
            "network_def": self.network_def,
            "checkpoint": f"models/{checkpoint_name}",
            "answer_policy": policy,
            "seed": seed,
            "monai_fedkd_version": __version__,
            **(extra or {}),
        }
        self.publish_counts = publish_counts

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    @property
    def final_checkpoint(self) -> Path:
        return self.output_dir / "models" / self.checkpoint_name

    def started(self, engine) -> None:
        for stale in (self.final_checkpoint, self.output_dir / SITE_CARD_NAME):
            if stale.exists():
                logger.info("removing output of an earlier run: %s", stale)
                stale.unlink()
        # a continued run (a federated round through MonaiAlgo) keeps its best checkpoint so far
        if self.staging_dir.exists() and engine.state.epoch == 0:
            shutil.rmtree(self.staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    def completed(self, engine) -> None:
        staged = self.staging_dir / self.checkpoint_name
        if not staged.is_file():
            # no validation round ran (e.g. max_epochs below the validation interval): keep the last weights
            logger.warning("no best-validation checkpoint in %s; saving the final weights", self.staging_dir)
            torch.save(self.network.state_dict(), staged)
        card = dict(self.card)
        card["sample_count"] = len(self.train_items)
        if self.publish_counts:
            task, n = card["task"], card["classes"]["num_classes"]
            card["class_counts"] = class_counts(self.train_items, task, n)
            card["count_unit"] = "samples" if task == "classification" else "voxels"
        else:
            card["class_counts"] = None
            card["count_unit"] = None
        card["training"] = {"epochs": int(engine.state.epoch), "iterations": int(engine.state.iteration)}
        if self.validator is not None and getattr(self.validator, "state", None) is not None:
            st = self.validator.state
            card["validation"] = {
                "metric": self.key_metric or getattr(st, "key_metric_name", None),
                "best": float(st.best_metric) if st.best_metric is not None and st.best_metric > -1 else None,
                "best_epoch": int(st.best_metric_epoch) if st.best_metric_epoch is not None else None,
            }
        card["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.final_checkpoint.parent.mkdir(parents=True, exist_ok=True)
        # copied, not moved: the CheckpointSaver still owns the staged file if the run continues (federated rounds)
        tmp = self.final_checkpoint.with_name(f".{self.checkpoint_name}.tmp")
        shutil.copyfile(staged, tmp)
        os.replace(tmp, self.final_checkpoint)
        atomic_write_json(self.output_dir / SITE_CARD_NAME, card)
        logger.info("site outputs written: %s and %s", self.final_checkpoint, self.output_dir / SITE_CARD_NAME)


def read_site_card(output_dir: str | os.PathLike) -> dict:
    """Read and check ``output_dir/site_card.json`` (a site bundle's output) or ``central_card.json`` (a central model)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise SiteCardError(f"site directory {output_dir} does not exist")
    path = output_dir / SITE_CARD_NAME
    if not path.is_file() and (output_dir / CENTRAL_CARD_NAME).is_file():
        path = output_dir / CENTRAL_CARD_NAME
    if not path.is_file():
        raise SiteCardError(f"{path} is missing: the site has not finished training (or training failed)")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SiteCardError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise SiteCardError(f"{path} lacks {missing}")
    return card


def load_site_model(output_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a site's network from its card and load its trained weights; returns ``(network, card)``."""
    card = read_site_card(output_dir)
    ckpt = Path(output_dir) / card["checkpoint"]
    if not ckpt.is_file():
        raise SiteCardError(f"checkpoint {ckpt} named by the site card is missing")
    net = ConfigParser({"network_def": card["network_def"]}).get_parsed_content("network_def")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file
        raise SiteCardError(f"checkpoint {ckpt} cannot be read: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise SiteCardError(f"checkpoint {ckpt} does not fit the network in the site card: {str(e).splitlines()[0]}") from None
    return net.to(device).eval(), card
