"""FedAvg (rounds, in-process through ``monai.fl.client.MonaiAlgo``), one-shot FedAvg, and the centralized model."""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from monai_fedkd import __version__
from monai_fedkd.site.card import CENTRAL_CARD_NAME, atomic_write_json, read_site_card
from monai_fedkd.site.query import site_entries

__all__ = ["centralized", "fedavg", "one_shot_fedavg", "weighted_average", "write_global_model"]

logger = logging.getLogger(__name__)


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg of state dicts: floating tensors averaged with ``weights`` (normalised); integer buffers (BatchNorm's
    ``num_batches_tracked``) taken from the first state. Keys and shapes must agree."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"the averaging weights must sum to a positive number, got {list(weights)}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise ValueError(f"state {i} has other keys than state 0: FedAvg needs one architecture")
    out = {}
    for k in keys:
        first = torch.as_tensor(states[0][k])
        if not first.is_floating_point():
            out[k] = first.clone()
            continue
        shapes = {tuple(torch.as_tensor(s[k]).shape) for s in states}
        if len(shapes) > 1:
            raise ValueError(f"'{k}' has shapes {sorted(shapes)} across the states: FedAvg needs one architecture")
        out[k] = sum(torch.as_tensor(s[k]).float() * (w / total) for s, w in zip(states, weights)).to(first.dtype)
    return out


def _same_architecture(cards: Mapping[str, Mapping]) -> dict:
    (first_name, first), *rest = cards.items()
    for name, card in rest:
        if card["network_def"] != first["network_def"]:
            raise ValueError(f"FedAvg needs one architecture: site '{name}' has {card['network_def'].get('name')}, "
                             f"site '{first_name}' {first['network_def'].get('name')}")
    return first


def write_global_model(state: Mapping[str, torch.Tensor], template_card: Mapping, output_dir, role: str, training: Mapping) -> Path:
    """``models/model.pt`` + ``central_card.json`` for a model built from the sites (FedAvg, one-shot, centralized)."""
    out = Path(output_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    tmp = out / "models" / ".model.pt.tmp"
    torch.save({k: torch.as_tensor(v) for k, v in state.items()}, tmp)
    os.replace(tmp, out / "models" / "model.pt")
    card = dict(template_card)
    card.update({"site": role, "role": role, "checkpoint": "models/model.pt", "sample_count": None, "class_counts": None,
                 "training": dict(training), "validation": None, "monai_fedkd_version": __version__,
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    atomic_write_json(out / CENTRAL_CARD_NAME, card)
    return out / "models" / "model.pt"


def one_shot_fedavg(site_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
    """One round: the trained site models averaged once, weighted by their sample counts."""
    cards = {str(d): read_site_card(d) for d in site_dirs}
    template = _same_architecture(cards)
    states = [torch.load(Path(d) / c["checkpoint"], map_location="cpu", weights_only=True) for d, c in cards.items()]
    counts = [float(c.get("sample_count") or 1) for c in cards.values()]
    state = weighted_average(states, counts)
    return write_global_model(state, template, output_dir, "one_shot_fedavg",
                              {"rounds": 1, "sites": [c["site"] for c in cards.values()], "weights": counts})


def fedavg(sites, bundle: str | os.PathLike, output_dir: str | os.PathLike, rounds: int = 10, local_epochs: int = 1,
           overrides: Mapping | None = None, seed: int = 0) -> Path:
    """FedAvg in rounds, in this process: every site trains its own site bundle for ``local_epochs`` per round through
    ``MonaiAlgo`` from the global weights; the server averages the returned weights by the steps each site ran.

    ``sites``: a sites JSON or entries (``name``, ``datalist``; see :func:`monai_fedkd.site.query.site_entries`); the
    site bundles write to ``output_dir/sites/<name>``. Site ``k`` trains with seed ``seed + k`` (as in the main job).
    """
    from monai.fl.client import MonaiAlgo
    from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    entries = site_entries(sites)
    out = Path(output_dir)
    algos = []
    for k, e in enumerate(entries):
        if not e["datalist"]:
            raise ValueError(f"site '{e['name']}' has no datalist: FedAvg trains at the sites")
        kwargs = {**dict(overrides or {}), "datalist": e["datalist"], "output_dir": str((out / "sites" / e["name"]).resolve()),
                  "site_name": e["name"], "seed": seed + k}
        algo = MonaiAlgo(bundle_root=str(bundle), local_epochs=int(local_epochs), send_weight_diff=False,
                         config_train_filename="configs/train.json", config_evaluate_filename=None, train_kwargs=kwargs)
        algo.initialize(extra={ExtraItems.CLIENT_NAME: e["name"]})
        algos.append(algo)
    try:
        global_weights = algos[0].get_weights().weights  # every site starts from the same network (site 0's initialisation)
        for r in range(int(rounds)):
            states, steps = [], []
            for algo in algos:
                algo.train(ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS))
                got = algo.get_weights()
                states.append(got.weights)
                steps.append(float(got.statistics.get(FlStatistics.NUM_EXECUTED_ITERATIONS, 0)))
            global_weights = weighted_average(states, steps)
            logger.info("FedAvg round %d/%d done (steps per site %s)", r + 1, rounds, steps)
    finally:
        for algo in algos:
            algo.finalize()
    template = _same_architecture({e["name"]: read_site_card(out / "sites" / e["name"]) for e in entries})
    return write_global_model(global_weights, template, out, "fedavg",
                              {"rounds": int(rounds), "local_epochs": int(local_epochs), "sites": [e["name"] for e in entries]})


def centralized(site_datalists: Sequence[str | os.PathLike], bundle: str, output_dir: str | os.PathLike,
                overrides: Mapping | None = None) -> Path:
    """The upper bound: the site bundle trained on the pooled training and validation items of all sites (model
    selection on the pooled validation items; test items are not read)."""
    from monai_fedkd.data.datalist import load_datalist
    from monai_fedkd.pipeline import run_logged, bundle_command

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pooled = {"training": [], "validation": []}
    for d in site_datalists:
        for key in pooled:
            for item in load_datalist(d, key=key, fields=None, allow_empty=key == "validation"):
                # absolute paths: the pooled datalist lives elsewhere than the sites' datalists
                pooled[key].append({k: str(Path(v).resolve()) if k in ("image", "label") and isinstance(v, str) else v for k, v in item.items()})
    if not pooled["validation"]:
        raise ValueError("the sites hold no validation items: the centralized model needs them for model selection")
    datalist = out / "pooled_datalist.json"
    datalist.write_text(json.dumps(pooled, indent=2))
    cmd = bundle_command(bundle, "train.json", {**dict(overrides or {}), "datalist": str(datalist), "output_dir": str(out / "site"),
                                                "site_name": "centralized"})
    run_logged(cmd, out / "train.log", "centralized training")  # raises with the log's tail when training fails
    card = read_site_card(out / "site")
    state = torch.load(out / "site" / card["checkpoint"], map_location="cpu", weights_only=True)
    return write_global_model(state, card, out, "centralized", {"items": {k: len(v) for k, v in pooled.items()},
                                                                  "validation": card.get("validation")})
