"""Site bundles run end to end through ``python -m monai.bundle run`` on real data, and fail cleanly on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import dataset_info, require, run_bundle
from monai_fedkd.pipeline import dataset_overrides
from monai_fedkd.site import SITE_CARD_NAME, load_site_model, read_site_card

pytestmark = pytest.mark.slow


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_failed_cleanly(proc, out_dir: Path, *fragments: str):
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-2000:]
    for f in fragments:
        assert f in text, f"expected {f!r} in the error output:\n{text[-3000:]}"
    assert not (out_dir / "models" / "model.pt").exists()
    assert not (out_dir / SITE_CARD_NAME).exists()


@pytest.fixture(scope="module")
def pneumonia_site(pneumonia_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "hospital_a"
    bundle, overrides = dataset_overrides(dataset_info(pneumonia_dir))
    proc = run_bundle(bundle, "train.json", {"datalist": str(pneumonia_dir / "datalist.json"), "output_dir": str(out), "max_epochs": 2, **overrides})
    _assert_ok(proc)
    return out


def test_classification_site_writes_model_and_card(pneumonia_site, pneumonia_dir):
    card = read_site_card(pneumonia_site)
    items = json.loads((pneumonia_dir / "datalist.json").read_text())["training"]
    assert card["task"] == "classification" and card["spatial_dims"] == 2
    assert card["site"] == "hospital_a"
    assert card["sample_count"] == len(items)
    assert card["class_counts"] == [sum(1 for i in items if i["label"] == c) for c in range(2)]
    assert card["classes"]["names"] == ["normal", "pneumonia"]
    assert card["input"]["spatial_size"] == [28, 28] and card["input"]["channels"] == 1
    assert card["validation"]["metric"] == "val_auc" and 0.0 <= card["validation"]["best"] <= 1.0
    # the final model is the best-validation checkpoint (a copy: federated rounds keep training from the staging dir)
    staged = pneumonia_site / "models" / ".staging" / "model.pt"
    assert staged.read_bytes() == (pneumonia_site / "models" / "model.pt").read_bytes()
    assert any((pneumonia_site / "tensorboard").iterdir())
    net, _ = load_site_model(pneumonia_site)
    out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    # the checkpoint is the best-validation network, loadable into the card's definition
    state = torch.load(pneumonia_site / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_classification_evaluate_and_inference_configs(pneumonia_site, pneumonia_dir):
    _, overrides = dataset_overrides(dataset_info(pneumonia_dir))
    common = {"datalist": str(pneumonia_dir / "datalist.json"), "output_dir": str(pneumonia_site), **overrides}
    proc = run_bundle("site_classification", ["train.json", "evaluate.json"], common)
    _assert_ok(proc)
    assert (pneumonia_site / "eval" / "test_auc_raw.csv").exists() or any((pneumonia_site / "eval").iterdir())
    proc = run_bundle("site_classification", "inference.json", {k: v for k, v in common.items() if k != "class_names"})
    _assert_ok(proc)
    rows = (pneumonia_site / "predictions" / "predictions.csv").read_text().strip().splitlines()
    n_test = len(json.loads((pneumonia_dir / "datalist.json").read_text())["test"])
    assert len(rows) == n_test
    probs = np.array([[float(v) for v in r.split(",")[1:]] for r in rows])
    assert probs.shape == (n_test, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_3d_classification_site(adrenal_dir, tmp_path):
    bundle, overrides = dataset_overrides(dataset_info(adrenal_dir))
    assert overrides["spatial_dims"] == 3
    out = tmp_path / "adrenal_site"
    _assert_ok(run_bundle(bundle, "train.json", {"datalist": str(adrenal_dir / "datalist.json"), "output_dir": str(out), "max_epochs": 1, "batch_size": 8, **overrides}))
    net, card = load_site_model(out)
    assert card["spatial_dims"] == 3 and card["input"]["spatial_size"] == [28, 28, 28]
    assert net(torch.rand(2, 1, 28, 28, 28)).shape == (2, 2)


SEG_SMALL = {"spacing": [6.0, 6.0, 6.0], "spatial_size": [16, 16, 16], "max_epochs": 1, "batch_size": 1, "samples_per_volume": 1,
             "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2]}


def test_3d_segmentation_site_and_inference_geometry(ixi_dir, tmp_path):
    info = dataset_info(ixi_dir)
    bundle, overrides = dataset_overrides(info)
    assert bundle == "site_segmentation"
    out = tmp_path / "ixi_site"
    datalist = str(ixi_dir / "datalist.json")
    _assert_ok(run_bundle(bundle, "train.json", {"datalist": datalist, "output_dir": str(out), **overrides, **SEG_SMALL}))
    card = read_site_card(out)
    assert card["task"] == "segmentation" and card["count_unit"] == "voxels"
    labels = [nib.load(str(ixi_dir / i["label"])).get_fdata() for i in json.loads(Path(datalist).read_text())["training"]]
    expected = np.bincount(np.concatenate([l.ravel().astype(int) for l in labels]), minlength=info["num_classes"])
    assert card["class_counts"] == expected.tolist()
    assert card["input"]["spacing"] == [6.0, 6.0, 6.0]
    # inference writes one mask per study in the original image geometry
    infer = {k: v for k, v in {**overrides, **SEG_SMALL}.items() if k not in ("class_names", "max_epochs", "batch_size", "samples_per_volume")}
    _assert_ok(run_bundle(bundle, "inference.json", {"datalist": datalist, "output_dir": str(out), **infer}))
    test_items = json.loads(Path(datalist).read_text())["test"]
    masks = sorted((out / "predictions").glob("*_seg.nii.gz"))
    assert len(masks) == len(test_items)
    for item in test_items:
        src = nib.load(str(ixi_dir / item["image"]))
        pred = nib.load(str(out / "predictions" / Path(item["image"]).name.replace(".nii.gz", "_seg.nii.gz")))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(info["num_classes"]))


def test_dicom_series_as_datalist_image(tmp_path):
    """A datalist item's image may be a DICOM series folder (read by MONAI's ITK reader)."""
    from monai.transforms import LoadImage, SaveImage

    series = require("dicom_mr_series", "gre_field_mapping_2")
    img = LoadImage(image_only=True)(str(series))
    assert tuple(img.shape) == (64, 64, 36)
    np.testing.assert_allclose(img.pixdim, [3.0, 3.0, 3.6], atol=1e-3)
    label = (img > np.percentile(img, 90)).to(torch.uint8)
    saver = SaveImage(output_dir=str(tmp_path), output_postfix="", separate_folder=False, output_dtype=np.uint8, resample=False)
    saver(label[None])
    label_path = next(tmp_path.glob("*.nii.gz"))
    datalist = tmp_path / "dicom_site.json"
    item = {"image": str(series), "label": str(label_path)}
    datalist.write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))
    out = tmp_path / "dicom_site"
    overrides = {"datalist": str(datalist), "output_dir": str(out), "num_classes": 2, "spacing": [6.0, 6.0, 6.0],
                 "spatial_size": [16, 16, 8], "max_epochs": 1, "batch_size": 1, "samples_per_volume": 1,
                 "network_def#channels": [8, 16], "network_def#strides": [2]}
    _assert_ok(run_bundle("site_segmentation", "train.json", overrides))
    assert read_site_card(out)["class_counts"][1] == int(label.sum())


# ---- bad input: a clear error naming the cause, non-zero exit, nothing that looks complete ----------------------

def _cls_overrides(datalist: Path, out: Path, **extra) -> dict:
    return {"datalist": str(datalist), "output_dir": str(out), "max_epochs": 1, "spatial_size": [28, 28], **extra}


def _copy_pneumonia(pneumonia_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    dst = tmp_path / "data"
    shutil.copytree(pneumonia_dir, dst)
    return dst / "datalist.json", json.loads((dst / "datalist.json").read_text())


def test_missing_image_file(pneumonia_dir, tmp_path):
    datalist, d = _copy_pneumonia(pneumonia_dir, tmp_path)
    missing = datalist.parent / d["training"][3]["image"]
    missing.unlink()
    out = tmp_path / "site"
    _assert_failed_cleanly(run_bundle("site_classification", "train.json", _cls_overrides(datalist, out)), out, str(missing), "does not exist")


def test_corrupt_nifti(ixi_dir, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(ixi_dir, dst)
    d = json.loads((dst / "datalist.json").read_text())
    bad = dst / d["training"][0]["image"]
    bad.write_bytes(b"\x1f\x8b" + b"not a volume" * 20)
    out = tmp_path / "site"
    proc = run_bundle("site_segmentation", "train.json", {"datalist": str(dst / "datalist.json"), "output_dir": str(out), **SEG_SMALL})
    _assert_failed_cleanly(proc, out, bad.name)


def test_image_label_shape_mismatch(ixi_dir, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(ixi_dir, dst)
    d = json.loads((dst / "datalist.json").read_text())
    lab_path = dst / d["training"][0]["label"]
    lab = nib.load(str(lab_path))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, :40], lab.affine), str(lab_path))
    out = tmp_path / "site"
    proc = run_bundle("site_segmentation", "train.json", {"datalist": str(dst / "datalist.json"), "output_dir": str(out), **SEG_SMALL})
    _assert_failed_cleanly(proc, out, lab_path.name, "does not match image")


def test_label_values_outside_num_classes(ixi_dir, tmp_path):
    out = tmp_path / "site"
    proc = run_bundle("site_segmentation", "train.json", {"datalist": str(ixi_dir / "datalist.json"), "output_dir": str(out), **SEG_SMALL, "num_classes": 3})
    _assert_failed_cleanly(proc, out, "label values", "num_classes=3")


def test_channel_count_mismatch(pneumonia_dir, tmp_path):
    out = tmp_path / "site"
    proc = run_bundle("site_classification", "train.json", _cls_overrides(pneumonia_dir / "datalist.json", out, in_channels=3))
    _assert_failed_cleanly(proc, out, "1 channels", "in_channels=3")


def test_class_label_outside_num_classes(pneumonia_dir, tmp_path):
    datalist, d = _copy_pneumonia(pneumonia_dir, tmp_path)
    d["training"][5]["label"] = 7
    datalist.write_text(json.dumps(d))
    out = tmp_path / "site"
    _assert_failed_cleanly(run_bundle("site_classification", "train.json", _cls_overrides(datalist, out)), out, "training[5]", "label 7")


def test_datalist_not_in_decathlon_layout(tmp_path):
    datalist = tmp_path / "flat.json"
    datalist.write_text(json.dumps([{"image": "a.png", "label": 0}]))
    out = tmp_path / "site"
    _assert_failed_cleanly(run_bundle("site_classification", "train.json", _cls_overrides(datalist, out)), out, "must be a JSON object")


def test_empty_site(tmp_path, pneumonia_dir):
    datalist, d = _copy_pneumonia(pneumonia_dir, tmp_path)
    d["training"] = []
    datalist.write_text(json.dumps(d))
    out = tmp_path / "site"
    _assert_failed_cleanly(run_bundle("site_classification", "train.json", _cls_overrides(datalist, out)), out, "'training' is empty")


def test_failed_rerun_removes_earlier_outputs(pneumonia_dir, tmp_path):
    """A rerun that fails mid-training must not leave the previous run's card beside a half-trained state."""
    datalist, d = _copy_pneumonia(pneumonia_dir, tmp_path)
    out = tmp_path / "site"
    _assert_ok(run_bundle("site_classification", "train.json", _cls_overrides(datalist, out)))
    assert (out / SITE_CARD_NAME).exists()
    # corrupt a validation image: the failure happens after training has started
    (datalist.parent / d["validation"][0]["image"]).write_bytes(b"\x89PNG broken")
    proc = run_bundle("site_classification", "train.json", _cls_overrides(datalist, out, cache_rate=0.0))
    _assert_failed_cleanly(proc, out, d["validation"][0]["image"].split("/")[-1])


def test_corrupt_dicom_series(tmp_path):
    """ITK would skip an unreadable slice silently; the site run must stop and name the file instead."""
    series = require("dicom_mr_series", "gre_field_mapping_2")
    bad_series = tmp_path / "series"
    shutil.copytree(series, bad_series)
    for f in bad_series.iterdir():
        f.chmod(0o644)
    victim = sorted(bad_series.iterdir())[4]
    victim.write_bytes(victim.read_bytes()[:600])
    datalist = tmp_path / "site.json"
    item = {"image": str(bad_series), "label": 0}
    datalist.write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))
    out = tmp_path / "site"
    proc = run_bundle("site_classification", "train.json", _cls_overrides(datalist, out, spatial_dims=3, spatial_size=[16, 16, 16], intensity_range=None))
    _assert_failed_cleanly(proc, out, "DICOM series", victim.name)


def test_items_with_missing_metadata_still_batch(ixi_dir, tmp_path):
    """IXI subjects without participants.csv rows have age/sex null; such items must still batch."""
    dst = tmp_path / "data"
    shutil.copytree(ixi_dir, dst)
    d = json.loads((dst / "datalist.json").read_text())
    d["training"][0]["age"], d["training"][1]["age"] = None, 42.0
    (dst / "datalist.json").write_text(json.dumps(d))
    out = tmp_path / "site"
    _assert_ok(run_bundle("site_segmentation", "train.json", {"datalist": str(dst / "datalist.json"), "output_dir": str(out), **SEG_SMALL, "batch_size": 2}))


def test_inference_items_from_a_folder(tmp_path):
    from monai_fedkd.data.datalist import DatalistError, inference_items

    series = require("dicom_mr_series", "gre_field_mapping_2")
    shutil.copytree(series, tmp_path / "series")
    shutil.copy(next(require("ixi_hh", "t1").glob("*.nii.gz")), tmp_path / "study.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    assert sorted(Path(i["image"]).name for i in inference_items(tmp_path)) == ["series", "study.nii.gz"]
    # DICOM files directly in the folder form one series
    assert inference_items(tmp_path / "series") == [{"image": str(tmp_path / "series")}]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatalistError, match="no image files"):
        inference_items(empty)


def test_classification_postprocessing_keeps_labels_on_the_prediction_device():
    """Decollating a batch turns a scalar label into a Python int; its one-hot must go back to the bundle's device, or
    ROCAUC fails on a GPU with indices on two devices. "meta" stands in for a device other than the CPU."""
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch

    from conftest import ROOT

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "site_classification" / "configs" / "train.json"))
    parser["device"] = "$torch.device('meta')"
    post = parser.get_parsed_content("validate#postprocessing")
    batch = {"pred": torch.rand(3, 2, device="meta"), "label": torch.tensor([0, 1, 1])}
    for item in decollate_batch(batch):
        assert isinstance(item["label"], int)  # what the evaluator's postprocessing receives, whatever the batch's device
        out = post(item)
        assert out["label"].device.type == "meta" and out["pred"].device.type == "meta"
        assert tuple(out["label"].shape) == (2,)
