"""FedAvg baseline over NVIDIA FLARE: the site bundles trained in rounds through ``monai.fl.client.MonaiAlgo``.

The server side is FLARE's PyTorch ``FedAvgRecipe`` (Client API); each site runs
:mod:`monai_fedkd.transport.flare_fedavg_client`. The global model after the last round is written like a central
model (``models/model.pt`` + ``central_card.json`` with ``role: "fedavg"``), so the evaluation bundle scores it
beside the site models, their ensemble and the distilled central model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from monai.utils import optional_import

from monai_fedkd.site.card import read_site_card
from monai_fedkd.site.query import site_entries

_, has_nvflare = optional_import("nvflare.collab")

__all__ = ["fedavg_recipe", "write_fedavg_model"]


def fedavg_recipe(
    sites: str | os.PathLike,
    bundle: str | os.PathLike,
    workdir: str | os.PathLike,
    num_rounds: int = 10,
    local_epochs: int = 1,
    overrides: Mapping | None = None,
    name: str = "monai_fedkd_fedavg",
):
    """FLARE ``FedAvgRecipe`` over the sites of a sites JSON (``name``, ``dir``, ``datalist``): the global network is the
    one the first site's card records (every site must share it for FedAvg)."""
    if not has_nvflare:
        raise ImportError("FedAvg over FLARE needs NVIDIA FLARE: pip install 'nvflare==2.9.*' (or monai_fedkd[nvflare])")
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    entries = site_entries(sites)
    definition = dict(read_site_card(entries[0]["site_dir"])["network_def"])
    for e in entries[1:]:
        other = read_site_card(e["site_dir"])["network_def"]
        if other != definition:
            raise ValueError(f"FedAvg needs one architecture: site '{e['name']}' has {other.get('name')}, "
                             f"site '{entries[0]['name']}' {definition.get('name')}")
    definition.pop("_target_", None)
    model = {"class_path": definition.pop("name"), "args": definition}
    script = Path(__file__).with_name("flare_fedavg_client.py")
    config = Path(workdir).resolve() / "fedavg_client.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    # each site's datalist resolved here, once: the client script only looks its own up by its FLARE name
    config.write_text(json.dumps({"datalists": {e["name"]: e["datalist"] for e in entries}, "bundle": str(Path(bundle).resolve()),
                                  "workdir": str(Path(workdir).resolve() / "sites"), "local_epochs": int(local_epochs),
                                  "overrides": dict(overrides or {})}, indent=2))
    if any(c.isspace() for c in str(config)):
        raise ValueError(f"FLARE splits train_args on white space: the output path {config} must not contain any")
    train_args = f"--config {config}"
    return FedAvgRecipe(name=name, min_clients=len(entries), num_rounds=int(num_rounds), model=model, train_script=str(script),
                        train_args=train_args)


def write_fedavg_model(global_model: str | os.PathLike, sites: str | os.PathLike, output_dir: str | os.PathLike, num_rounds: int,
                       local_epochs: int) -> Path:
    """Write FLARE's final global weights as ``models/model.pt`` + a card (from the first site's card, ``role: fedavg``)."""
    from monai_fedkd.baselines import write_global_model

    state = torch.load(global_model, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # PTFileModelPersistor's layout
    entries = site_entries(sites)
    return write_global_model(state, read_site_card(entries[0]["site_dir"]), output_dir, "fedavg",
                              {"rounds": int(num_rounds), "local_epochs": int(local_epochs), "sites": [e["name"] for e in entries]})
