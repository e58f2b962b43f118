"""Federated baselines on the same sites and site bundles: FedAvg in rounds (MonaiAlgo, in-process), one-shot FedAvg,
centralized. Each writes a model the evaluation scores like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import dataset_info, ok, run_bundle
from monai_fedkd.baselines import centralized, fedavg, one_shot_fedavg, weighted_average
from monai_fedkd.pipeline import BUNDLES_DIR, dataset_overrides
from monai_fedkd.site import load_site_model, read_site_card

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_sites(pneumonia_dir, tmp_path_factory):
    """Two PneumoniaMNIST sites (label-skew partition) trained 1 epoch with the same site bundle and architecture."""
    from monai_fedkd.data.partition import partition_datalist

    root = tmp_path_factory.mktemp("baselines")
    info = dataset_info(pneumonia_dir)
    partition_datalist(pneumonia_dir / "datalist.json", root / "sites", num_sites=2, method="dirichlet", seed=0, alpha=5.0,
                       task=info["task"], num_classes=info["num_classes"])
    bundle, overrides = dataset_overrides(info)
    overrides.update(max_epochs=1, batch_size=8)
    entries = []
    for k in range(2):
        datalist = root / "sites" / f"site{k}.json"
        ok(run_bundle(bundle, "train.json", {"datalist": str(datalist), "output_dir": str(root / f"site{k}"), "seed": k, **overrides}))
        entries.append({"name": f"site{k}", "dir": str(root / f"site{k}"), "datalist": str(datalist)})
    sites_json = root / "sites.json"
    sites_json.write_text(json.dumps(entries))
    return {"root": root, "sites": sites_json, "entries": entries, "bundle": bundle, "overrides": overrides}


def test_weighted_average_is_fedavg():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    avg = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(avg["w"], torch.tensor([2.5, 5.0]))
    assert int(avg["n"]) == 3  # integer buffers are not averaged
    with pytest.raises(ValueError, match="one architecture"):
        weighted_average([a, {"w": torch.zeros(3), "n": torch.tensor(1)}], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([a, b], [0, 0])


def test_one_shot_fedavg_averages_the_trained_sites_by_sample_count(two_sites, tmp_path):
    dirs = [e["dir"] for e in two_sites["entries"]]
    path = one_shot_fedavg(dirs, tmp_path / "one_shot")
    net, card = load_site_model(tmp_path / "one_shot")
    assert card["role"] == "one_shot_fedavg" and path.is_file()
    states = [torch.load(Path(d) / "models" / "model.pt", weights_only=True) for d in dirs]
    counts = [read_site_card(d)["sample_count"] for d in dirs]
    expected = weighted_average(states, counts)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_fedavg_rounds_through_monai_algo(two_sites, tmp_path):
    out = tmp_path / "fedavg"
    fedavg(two_sites["sites"], BUNDLES_DIR / two_sites["bundle"], out, rounds=2, local_epochs=1,
           overrides={k: v for k, v in two_sites["overrides"].items() if k != "max_epochs"})
    net, card = load_site_model(out)
    assert card["role"] == "fedavg" and card["training"]["rounds"] == 2
    x = torch.rand(4, 1, 28, 28)
    assert net(x).shape == (4, 2) and torch.isfinite(net(x)).all()
    # each site trained its own bundle in its own folder, 2 rounds of 1 epoch
    for e in two_sites["entries"]:
        site_card = read_site_card(out / "sites" / e["name"])
        assert site_card["training"]["epochs"] == 2


def test_centralized_trains_on_the_pooled_sites(two_sites, tmp_path):
    datalists = [e["datalist"] for e in two_sites["entries"]]
    centralized(datalists, two_sites["bundle"], tmp_path / "central", overrides=two_sites["overrides"])
    _, card = load_site_model(tmp_path / "central")
    pooled = sum(len(json.loads(Path(d).read_text())["training"]) for d in datalists)
    assert card["role"] == "centralized" and card["training"]["items"]["training"] == pooled


def test_fedavg_refuses_sites_of_different_architectures(cls_sites, tmp_path):
    with pytest.raises(ValueError, match="one architecture"):
        one_shot_fedavg([d for d, _ in cls_sites], tmp_path / "x")


def test_dense_config_runs_the_one_shot_peer(cls_sites, tmp_path):
    """DENSE through the central bundle: unconditional generator, pseudo-label CE, plain-mean ensemble, no discriminators."""
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps([{"name": Path(d).name, "dir": str(d), "datalist": str(dl)} for d, dl in cls_sites]))
    out = tmp_path / "dense"
    ok(run_bundle("central_distillation", ["train.json", "dense.json"], {"sites": str(sites), "output_dir": str(out), "iterations": 2,
                                                                          "batch_size": 8, "student_batch_size": 8}))
    _, card = load_site_model(out)
    assert card["weights"]["pseudo_label"] == 1.0 and card["weights"]["consensus"] == 0.0 and card["ensemble_weighting"] == "mean"
    assert card["generator_def"]["num_classes"] is None
    for weights in card["expertise_weights"].values():
        assert weights == pytest.approx([0.5, 0.5])
    assert not any(out.glob("site_state/*/*.pt")) or all("discriminator" not in torch.load(p, weights_only=True)
                                                         for p in out.glob("site_state/*/*.pt"))
