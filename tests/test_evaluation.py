"""Evaluation of site models and their ensembles (monai_fedkd.evaluation) and the ``bundles/evaluation`` bundle.

Tiny site models are trained in module-scoped fixtures through ``monai.bundle.run`` (the site bundles, 1 epoch)
on a few real PneumoniaMNIST images and IXI volumes from ``../shared/data``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PY = sys.executable

from monai_fedkd.data.datalist import DatalistError  # noqa: E402
from monai_fedkd.data.transforms import InputCheckError  # noqa: E402
from monai_fedkd.evaluation import (  # noqa: E402
    ENSEMBLE_MEAN,
    ENSEMBLE_WEIGHTED,
    POOLED,
    EvaluationError,
    class_count_weights,
    combine_probabilities,
    dice_per_class,
    evaluate_models,
    main,
)
from monai_fedkd.site import SiteCardError, load_site_model  # noqa: E402
from conftest import torch_threads  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny networks on a small shared CPU: one intra-op thread avoids OpenMP stalls when other processes compete."""
    with torch_threads(1):
        yield


def _require(*relative: str) -> Path:
    path = DATA.joinpath(*relative)
    if not path.exists():
        pytest.skip(f"real data {path} is not available")
    return path


def _train_site(bundle: str, datalist: Path, output_dir: Path, **overrides) -> Path:
    from monai.bundle import run

    run(
        config_file=str(ROOT / "bundles" / bundle / "configs" / "train.json"),
        datalist=str(datalist),
        output_dir=str(output_dir),
        **overrides,
    )
    assert (output_dir / "site_card.json").is_file()
    return output_dir


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------------------------------------------------------
# fixtures: classification
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pn(tmp_path_factory):
    """Two PneumoniaMNIST sites (site1 trained on pneumonia images only) and two test datalists."""
    from PIL import Image

    npz = np.load(_require("pneumoniamnist", "pneumoniamnist.npz"))
    root = tmp_path_factory.mktemp("pn")
    (root / "img").mkdir()

    def items(split: str, idx, prefix: str = "") -> list[dict]:
        out = []
        for i in idx:
            name = f"img/{split}_{i}.png"
            Image.fromarray(npz[f"{split}_images"][i]).save(root / name)
            out.append({"image": prefix + name, "label": int(npz[f"{split}_labels"][i, 0])})
        return out

    train_labels = npz["train_labels"][:, 0]
    both = list(range(24))
    pneumonia_only = [int(i) for i in np.flatnonzero(train_labels == 1)[24:44]]
    test_labels = npz["test_labels"][:, 0]
    test_a = [int(i) for i in np.flatnonzero(test_labels == 0)[:6]] + [int(i) for i in np.flatnonzero(test_labels == 1)[:6]]
    test_b = [int(i) for i in np.flatnonzero(test_labels == 0)[6:10]] + [int(i) for i in np.flatnonzero(test_labels == 1)[6:14]]
    val = items("val", range(12))
    dl0 = _write_json(root / "train0.json", {"training": items("train", both), "validation": val})
    dl1 = _write_json(root / "train1.json", {"training": items("train", pneumonia_only), "validation": val})
    sites = root / "sites"
    sites.mkdir()
    t0 = _write_json(sites / "site0.json", {"test": items("test", test_a, "../")})
    t1 = _write_json(sites / "site1.json", {"test": items("test", test_b, "../")})
    s0 = _train_site("site_classification", dl0, root / "runs" / "site0", max_epochs=1, seed=0)
    s1 = _train_site("site_classification", dl1, root / "runs" / "site1", max_epochs=1, seed=1)
    return {"root": root, "sites": [s0, s1], "tests": [t0, t1]}


@pytest.fixture(scope="module")
def pn_eval(pn):
    out = pn["root"] / "eval"
    metrics = evaluate_models(pn["sites"], pn["tests"], out)
    return metrics, out


def _model_probs(site_dir: Path, datalist: Path) -> tuple[np.ndarray, np.ndarray]:
    """The model's own outputs on the test images, prepared with the site's card preprocessing."""
    from monai.data import load_decathlon_datalist
    from monai.transforms import Compose

    from monai_fedkd.data.transforms import card_preprocessing

    net, card = load_site_model(site_dir)
    prep = Compose(card_preprocessing(card))
    items = load_decathlon_datalist(str(datalist), is_segmentation=False, data_list_key="test")
    x = torch.stack([prep(dict(it))["image"].as_tensor() for it in items])
    with torch.no_grad():
        p = torch.softmax(net(x), dim=1).numpy()
    return p, np.array([it["label"] for it in items])


# ---------------------------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------------------------


def test_classification_outputs_written(pn, pn_eval):
    metrics, out = pn_eval
    for name in ("metrics.json", "metrics.csv", "metrics.md"):
        assert (out / name).is_file()
    assert not list(out.glob(".*.tmp"))
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    models = [k for k in metrics if k != "meta"]
    assert models == ["site0", "site1", ENSEMBLE_MEAN, ENSEMBLE_WEIGHTED]
    for m in models:
        assert list(metrics[m]) == ["site0", "site1", POOLED]
        for values in metrics[m].values():
            assert set(values) == {"n", "auroc", "accuracy", "balanced_accuracy"}
            assert 0.0 <= values["auroc"] <= 1.0 and 0.0 <= values["accuracy"] <= 1.0
    meta = metrics["meta"]
    assert meta["task"] == "classification" and meta["primary_metric"] == "auroc" and meta["device"] == "cpu"
    assert meta["models"]["site0"]["role"] == "site" and meta["models"]["site0"]["inference_seconds"] >= 0
    tests = meta["test_sets"]
    assert tests["site0"]["count"] == 12 and tests["site1"]["count"] == 12
    assert tests[POOLED]["count"] == tests["site0"]["count"] + tests["site1"]["count"]
    assert metrics["site0"][POOLED]["n"] == 24
    assert tests["site0"]["class_counts"] == [6, 6]
    # csv: long format, one row per model x test set x metric
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 4 * 3 * 4
    row = next(r for r in rows if r["model"] == "site1" and r["test_set"] == "site0" and r["metric"] == "auroc")
    assert float(row["value"]) == pytest.approx(metrics["site1"]["site0"]["auroc"])
    md = (out / "metrics.md").read_text()
    assert "| model | site0 (n=12) | site1 (n=12) | pooled (n=24) |" in md
    assert "| ensemble_weighted |" in md and "## Accuracy" in md


def test_auroc_matches_sklearn_on_model_outputs(pn, pn_eval):
    from sklearn.metrics import accuracy_score, roc_auc_score

    metrics, _ = pn_eval
    probs = {}
    for site in pn["sites"]:
        for test in pn["tests"]:
            p, y = _model_probs(site, test)
            probs[(site.name, test.stem)] = p
            assert metrics[site.name][test.stem]["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-9)
            assert metrics[site.name][test.stem]["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    # ensemble_mean = mean of the sites' probabilities
    for test in pn["tests"]:
        _, y = _model_probs(pn["sites"][0], test)
        mean = combine_probabilities([probs[("site0", test.stem)], probs[("site1", test.stem)]])
        assert np.allclose(mean, (probs[("site0", test.stem)] + probs[("site1", test.stem)]) / 2, atol=1e-6)
        assert metrics[ENSEMBLE_MEAN][test.stem]["auroc"] == pytest.approx(roc_auc_score(y, mean[:, 1]), abs=1e-6)


def test_weighted_ensemble_uses_class_counts(pn, pn_eval):
    metrics, _ = pn_eval
    info = metrics["meta"]["models"][ENSEMBLE_WEIGHTED]
    assert info["members"] == ["site0", "site1"]
    w = np.array([info["weights"]["site0"], info["weights"]["site1"]])
    assert np.allclose(w.sum(0), 1.0)
    # site1 trained on pneumonia images only: site0 holds every normal sample -> weight 1 for class 0
    assert metrics["meta"]["models"]["site1"]["class_counts"][0] == 0
    assert w[0, 0] == pytest.approx(1.0) and w[1, 0] == pytest.approx(0.0)
    c0, c1 = metrics["meta"]["models"]["site0"]["class_counts"][1], metrics["meta"]["models"]["site1"]["class_counts"][1]
    assert w[0, 1] == pytest.approx(c0 / (c0 + c1))


def test_combine_probabilities_and_weights():
    rng = np.random.default_rng(0)
    p = [rng.dirichlet(np.ones(3), size=5).astype(np.float32) for _ in range(3)]
    assert np.allclose(combine_probabilities(p), np.mean(p, axis=0), atol=1e-6)
    w = class_count_weights([[10, 5, 0], [0, 5, 0], [30, 10, 0]])
    assert w.shape == (3, 3) and np.allclose(w.sum(0), 1.0)
    assert np.allclose(w[:, 0], [0.25, 0.0, 0.75]) and np.allclose(w[:, 2], 1 / 3)  # nobody has class 2: equal
    assert class_count_weights([[7, 0], [0, 3]])[0, 0] == 1.0  # a site holding all samples of a class
    comb = combine_probabilities(p, w)
    expected = sum(w[k][None, :] * p[k] for k in range(3))
    assert np.allclose(comb, expected / expected.sum(1, keepdims=True), atol=1e-6)
    assert np.allclose(comb.sum(1), 1.0, atol=1e-6)
    # spatial probabilities (B, C, H, W) broadcast the per-class weights
    maps = [torch.softmax(torch.randn(2, 3, 4, 4), 1) for _ in range(3)]
    out = combine_probabilities(maps, w)
    assert out.shape == (2, 3, 4, 4) and torch.allclose(out.sum(1), torch.ones(2, 4, 4), atol=1e-5)


def test_null_counts_get_equal_weight(caplog):
    with caplog.at_level(logging.WARNING):
        w = class_count_weights([[10, 0], None, [30, 10]], names=["a", "b", "c"])
    assert np.allclose(w[1], 1 / 3) and np.allclose(w.sum(0), 1.0)
    assert np.allclose(w[[0, 2], 0], [2 / 3 * 0.25, 2 / 3 * 0.75])
    assert "b publishes no class counts" in caplog.text


def test_single_class_test_set_gives_null_auroc(pn, tmp_path, caplog):
    items = [it for it in json.loads(pn["tests"][0].read_text())["test"] if it["label"] == 1]
    one = _write_json(pn["root"] / "sites" / "only_pneumonia.json", {"test": items})
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_models({"a": pn["sites"][0]}, [one], tmp_path, pooled=False)
    assert metrics["a"]["only_pneumonia"]["auroc"] is None
    assert metrics["a"]["only_pneumonia"]["accuracy"] is not None
    assert "AUROC is undefined" in caplog.text
    assert "n/a" in (tmp_path / "metrics.md").read_text()


def test_cli_and_models_json(pn, tmp_path, capsys):
    listing = _write_json(tmp_path / "models.json", {"s0": str(pn["sites"][0]), "s1": str(pn["sites"][1])})
    rc = main(["--models", str(listing), "--test-datalists", *map(str, pn["tests"]), "--output-dir", str(tmp_path / "e"), "--ensemble", "no", "--no-pooled"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| model | site0 (n=12) | site1 (n=12) |" in printed and "| s1 |" in printed
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert [k for k in metrics if k != "meta"] == ["s0", "s1"]
    assert POOLED not in metrics["s0"]


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_card(pn, tmp_path):
    empty = tmp_path / "not_trained"
    empty.mkdir()
    with pytest.raises(SiteCardError, match="site_card.json is missing"):
        evaluate_models([pn["sites"][0], empty], pn["tests"], tmp_path / "e")
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_empty_test_datalist(pn, tmp_path):
    empty = _write_json(tmp_path / "empty.json", {"test": []})
    with pytest.raises(DatalistError, match=r"empty\.json.*'test' is empty"):
        evaluate_models(pn["sites"], [pn["tests"][0], empty], tmp_path / "e")


def test_label_outside_model_classes(pn, tmp_path):
    items = json.loads(pn["tests"][0].read_text())["test"][:3]
    items[1] = dict(items[1], label=2)
    bad = _write_json(pn["root"] / "sites" / "bad_label.json", {"test": items})
    with pytest.raises(InputCheckError, match=r"bad_label.*" + items[1]["image"].split("/")[-1] + r".*outside \[0, 2\)"):
        evaluate_models(pn["sites"], [bad], tmp_path / "e")


def _three_class_site(pn, dest: Path) -> Path:
    from monai_fedkd.networks import build_network

    shutil.copytree(pn["sites"][0], dest)
    card = json.loads((dest / "site_card.json").read_text())
    card["network_def"]["classes"] = 3
    card["classes"] = {"num_classes": 3, "names": ["a", "b", "c"]}
    card["class_counts"] = [1, 1, 1]
    card["site"] = dest.name
    (dest / "site_card.json").write_text(json.dumps(card))
    definition = {k: v for k, v in card["network_def"].items() if k != "_target_"}
    torch.save(build_network(**definition).state_dict(), dest / "models" / "model.pt")
    return dest


def test_disagreeing_models_cannot_be_ensembled(pn, tmp_path):
    three = _three_class_site(pn, tmp_path / "site3c")
    with pytest.raises(EvaluationError, match=r"num_classes \(site0=2, site1=2, site3c=3\)"):
        evaluate_models(pn["sites"] + [three], pn["tests"], tmp_path / "e")
    # 'auto' scores them one by one, no ensembles
    metrics = evaluate_models(pn["sites"] + [three], pn["tests"][:1], tmp_path / "e", ensemble="auto", pooled=False)
    assert [k for k in metrics if k != "meta"] == ["site0", "site1", "site3c"]
    assert metrics["site3c"]["site0"]["auroc"] is not None  # one-vs-rest macro over the classes present


def test_nan_outputs_name_model_and_item(pn, tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 2)
            out[-1, 0] = float("nan")
            return out

    _, card = load_site_model(pn["sites"][0])
    with pytest.raises(EvaluationError, match=r"model broken produced NaN/Inf outputs for test item .*test_\d+\.png"):
        evaluate_models({"broken": (Broken(), card)}, pn["tests"][:1], tmp_path / "e")


def test_extra_models_are_not_ensembled(pn, tmp_path):
    metrics = evaluate_models(pn["sites"], pn["tests"][:1], tmp_path, extra_models={"central": pn["sites"][0]}, pooled=False)
    assert [k for k in metrics if k != "meta"] == ["site0", "site1", "central", ENSEMBLE_MEAN, ENSEMBLE_WEIGHTED]
    assert metrics["meta"]["models"]["central"]["role"] == "extra"
    assert metrics["meta"]["models"][ENSEMBLE_MEAN]["members"] == ["site0", "site1"]
    assert metrics["central"]["site0"] == metrics["site0"]["site0"]


# ---------------------------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------------------------


def test_dice_helper_perfect_and_known():
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, 2:6, 2:6, 2:6] = 1
    label[0, 0, 0:2, 0:2, 0:2] = 2
    perfect = dice_per_class(label, label, 4)
    assert perfect.shape == (1, 3)
    assert np.allclose(perfect[0, :2], 1.0) and np.isnan(perfect[0, 2])  # class 3 absent: ignored
    pred = label.clone()
    pred[0, 0, 2:4, 2:6, 2:6] = 0  # half of class 1 missed
    d = dice_per_class(pred, label, 4)
    assert d[0, 0] == pytest.approx(2 * 32 / (32 + 64)) and d[0, 1] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def ixi(tmp_path_factory):
    """Three IXI subjects at 4 mm with merged labels (0..5); one tiny site trained 1 epoch, resampled to 6 mm."""
    import nibabel as nib

    from monai_fedkd.data.prepare import DEFAULT_IXI_CLASSES, merge_labels

    t1_dir, seg_dir = _require("ixi_hh", "t1"), _require("ixi_hh", "DLMUSE_seg")
    root = tmp_path_factory.mktemp("ixi")
    items = []
    for t1 in sorted(t1_dir.glob("IXI*_T1.nii.gz"))[:3]:
        seg = seg_dir / t1.name.replace("_T1.nii.gz", "_T1_DLMUSE.nii.gz")
        img, lab = nib.load(t1), nib.load(seg)
        affine = img.affine.copy()
        affine[:3, :3] *= 2  # keep every second voxel: 2 mm -> 4 mm
        sub = (slice(None, None, 2),) * 3
        image = np.asarray(img.dataobj, dtype=np.float32)[sub]
        label = merge_labels(np.asarray(lab.dataobj)[sub], DEFAULT_IXI_CLASSES)
        nib.save(nib.Nifti1Image(image, affine), root / t1.name)
        nib.save(nib.Nifti1Image(label, affine), root / t1.name.replace("_T1", "_lab"))
        items.append({"image": t1.name, "label": t1.name.replace("_T1", "_lab")})
    dl = _write_json(root / "datalist.json", {"training": items[:1], "validation": items[1:2], "test": items[1:]})
    site = _train_site(
        "site_segmentation", dl, root / "runs" / "siteA", max_epochs=1, spacing=[6, 6, 6], spatial_size=[16, 16, 16],
        batch_size=1, samples_per_volume=1,
    )
    return {"root": root, "site": site, "datalist": dl, "items": items}


def test_segmentation_dice(ixi, tmp_path):
    other = _write_json(ixi["root"] / "other.json", {"test": ixi["items"][:1]})
    metrics = evaluate_models({"siteA": ixi["site"], "siteA_copy": ixi["site"]}, {"own": ixi["datalist"], "other": other}, tmp_path, sw_batch_size=2)
    assert [k for k in metrics if k != "meta"] == ["siteA", "siteA_copy", ENSEMBLE_MEAN, ENSEMBLE_WEIGHTED]
    names = ["lateral_ventricles", "thalamus", "caudate", "putamen", "hippocampus"]
    for model in ("siteA", ENSEMBLE_MEAN):
        for test in ("own", "other", POOLED):
            m = metrics[model][test]
            dice = [m["dice"][f"class_{c}"] for c in range(1, 6)]
            assert all(v is None or 0.0 <= v <= 1.0 for v in dice)
            vals = np.array([np.nan if v is None else v for v in dice])
            assert m["mean_dice"] == pytest.approx(float(np.nanmean(vals)))
    assert metrics["siteA"]["own"]["n"] == 2 and metrics["siteA"][POOLED]["n"] == 3
    # identical members: both ensembles equal the site
    assert metrics[ENSEMBLE_MEAN]["own"]["mean_dice"] == pytest.approx(metrics["siteA"]["own"]["mean_dice"], abs=1e-6)
    assert metrics[ENSEMBLE_WEIGHTED][POOLED]["mean_dice"] == pytest.approx(metrics["siteA"][POOLED]["mean_dice"], abs=1e-6)
    meta = metrics["meta"]
    assert meta["primary_metric"] == "mean_dice" and meta["test_sets"][POOLED]["count"] == 3
    assert len(names) == 5
    md = (tmp_path / "metrics.md").read_text()
    assert "## Mean Dice (foreground classes)" in md and "## Dice per class: pooled" in md
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert any(r["metric"] == "dice/class_3" for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# the bundle
# ---------------------------------------------------------------------------------------------------------------


def test_bundle_metadata_verifies():
    from monai.bundle import verify_metadata

    verify_metadata(
        meta_file=str(ROOT / "bundles" / "evaluation" / "configs" / "metadata.json"),
        filepath=str(ROOT / "monai_fedkd" / "resources" / "bundle_metadata_schema.json"),
    )
    assert (ROOT / "bundles" / "evaluation" / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_bundle_runs(pn):
    root = pn["root"]
    cfg = ROOT / "bundles" / "evaluation" / "configs"
    cmd = [
        PY, "-m", "monai.bundle", "run",
        "--config_file", str(cfg / "evaluate.json"),
        "--logging_file", str(cfg / "logging.conf"),
        "--models", "['runs/site0','runs/site1']",
        "--test_datalists", "['sites/site0.json','sites/site1.json']",
        "--output_dir", "runs/eval",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((root / "runs" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"site0", "site1", ENSEMBLE_MEAN, ENSEMBLE_WEIGHTED, "meta"}
    assert "| ensemble_mean |" in proc.stdout + proc.stderr


def test_monai_fedkd_cli(pn, tmp_path, capsys):
    from monai_fedkd.cli import main as cli_main

    rc = cli_main(["evaluate", "--models", *map(str, pn["sites"]), "--test-datalists", str(pn["tests"][0]), "--output-dir", str(tmp_path)])
    assert rc == 0 and "| ensemble_mean |" in capsys.readouterr().out
    rc = cli_main(["evaluate", "--models", str(tmp_path / "nothing"), "--test-datalists", str(pn["tests"][0]), "--output-dir", str(tmp_path)])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
