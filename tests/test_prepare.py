"""Tests of monai_fedkd.data.prepare on the real public data in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monai_fedkd.data import prepare
from monai_fedkd.data.prepare import (
    DATASETS,
    ChecksumError,
    DatasetNotFoundError,
    file_md5,
    prepare_dataset,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PNEUMONIA_NPZ = SHARED_DATA / "pneumoniamnist" / "pneumoniamnist.npz"
ADRENAL_NPZ = SHARED_DATA / "adrenalmnist3d" / "adrenalmnist3d.npz"
IXI_ROOT = SHARED_DATA / "ixi_hh"

needs_pneumonia = pytest.mark.skipif(
    not PNEUMONIA_NPZ.is_file(), reason=f"real data not available: {PNEUMONIA_NPZ} is missing"
)
needs_adrenal = pytest.mark.skipif(
    not ADRENAL_NPZ.is_file(), reason=f"real data not available: {ADRENAL_NPZ} is missing"
)
needs_ixi = pytest.mark.skipif(not (IXI_ROOT / "t1").is_dir(), reason=f"real data not available: {IXI_ROOT} is missing")


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch):
    monkeypatch.delenv("DATA_MIRROR", raising=False)


def _load(datalist: Path, key: str):
    from monai.data import load_decathlon_datalist

    return load_decathlon_datalist(str(datalist), is_segmentation=False, data_list_key=key)


def _loader(keys):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    return Compose([LoadImaged(keys), EnsureChannelFirstd(keys)])


def test_api_constants():
    assert DATASETS == ("pneumoniamnist", "adrenalmnist3d", "adrenalmnist3d_64", "ixi", "ixi_axial")
    assert issubclass(DatasetNotFoundError, FileNotFoundError)
    assert issubclass(ChecksumError, RuntimeError)


# ------------------------------------------------------------------------------------------------ MedMNIST


@needs_pneumonia
def test_pneumoniamnist_png_from_mirror(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="monai_fedkd.data.prepare")
    datalist = prepare_dataset("pneumoniamnist", tmp_path, mirror=SHARED_DATA, max_per_split=20)
    assert datalist == tmp_path / "pneumoniamnist" / "datalist.json"

    # the shared copy is not the official release: accepted through the mirror's MD5SUMS, with a warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not the official release" in r.getMessage() and "MD5SUMS" in r.getMessage() for r in warnings)

    raw = json.loads(datalist.read_text())
    assert set(raw) == {"training", "validation", "test"}
    assert all(not Path(item["image"]).is_absolute() for items in raw.values() for item in items)

    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    assert info["task"] == "classification" and info["spatial_dims"] == 2 and info["in_channels"] == 1
    assert info["num_classes"] == 2 and info["class_names"] == ["normal", "pneumonia"]
    assert info["spatial_size"] == [28, 28] and info["intensity_range"] == [0, 255]
    assert info["image_format"] == "png" and info["counts"] == {"training": 20, "validation": 20, "test": 20}
    assert info["source"]["md5"] == "28209eda62fecd6e6a2d98b1501bb15f" and info["source"]["official"] is False
    assert info["source"]["file_md5"] == file_md5(PNEUMONIA_NPZ)

    load = _loader(["image"])
    with np.load(PNEUMONIA_NPZ) as npz:
        for key, split in (("training", "train"), ("validation", "val"), ("test", "test")):
            items = _load(datalist, key)
            assert len(items) == 20
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"][:, 0]
            for i in (0, 7, 19):
                assert Path(items[i]["image"]).is_absolute() and Path(items[i]["image"]).is_file()
                assert items[i]["label"] == int(labels[i])
                image = load(items[i])["image"]
                assert tuple(image.shape) == (1, 28, 28)
                # MONAI's PILReader returns (x, y): the loaded array is the npz image transposed
                np.testing.assert_array_equal(image[0].numpy(), images[i].T.astype(np.float32))
        # and the PNG itself is in the natural (row, column) orientation
        from PIL import Image

        png = np.asarray(Image.open(datalist.parent / "images" / "train_00003.png"))
        assert png.dtype == np.uint8
        np.testing.assert_array_equal(png, npz["train_images"][3])


@needs_pneumonia
def test_pneumoniamnist_nifti_matches_png_orientation(tmp_path):
    datalist = prepare_dataset("pneumoniamnist", tmp_path, mirror=SHARED_DATA, image_format="nifti", max_per_split=3)
    items = _load(datalist, "validation")
    assert items[0]["image"].endswith(".nii.gz")
    image = _loader(["image"])(items[1])["image"]
    with np.load(PNEUMONIA_NPZ) as npz:
        np.testing.assert_array_equal(image[0].numpy(), npz["val_images"][1].T.astype(np.float32))
    assert json.loads((datalist.parent / "dataset_info.json").read_text())["image_format"] == "nifti"


@needs_adrenal
def test_adrenalmnist3d_nifti_roundtrip(tmp_path):
    datalist = prepare_dataset("adrenalmnist3d", tmp_path, mirror=SHARED_DATA, max_per_split=4)
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    assert info["spatial_dims"] == 3 and info["spatial_size"] == [28, 28, 28]
    assert info["class_names"] == ["normal", "hyperplasia"] and info["intensity_range"] == [0, 255]
    assert info["source"]["official"] is True and info["image_format"] == "nifti"
    load = _loader(["image"])
    with np.load(ADRENAL_NPZ) as npz:
        for key, split in (("training", "train"), ("test", "test")):
            items = _load(datalist, key)
            assert len(items) == 4
            for i, item in enumerate(items):
                assert item["image"].endswith(".nii.gz")
                assert item["label"] == int(npz[f"{split}_labels"][i, 0])
                image = load(item)["image"]
                assert tuple(image.shape) == (1, 28, 28, 28)
                np.testing.assert_array_equal(image[0].numpy(), npz[f"{split}_images"][i].astype(np.float32))
                np.testing.assert_allclose(np.diag(image.affine.numpy())[:3], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="NIfTI"):
        prepare_dataset("adrenalmnist3d", tmp_path / "png", mirror=SHARED_DATA, image_format="png")


@needs_adrenal
def test_download_path_verifies_md5(tmp_path, monkeypatch):
    """No network here: exercise the download code with a file:// URL to the official file."""
    url = ADRENAL_NPZ.as_uri()
    datalist = prepare_dataset("adrenalmnist3d", tmp_path, max_per_split=1, url=url)
    assert (tmp_path / "downloads" / "adrenalmnist3d.npz").is_file()
    assert not [p for p in (tmp_path / "downloads").iterdir() if p.name.endswith(".part")]
    assert len(_load(datalist, "training")) == 1

    # a download whose MD5 is wrong is rejected and leaves nothing behind
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not the release")
    with pytest.raises(ChecksumError, match="bbd3c5a5576322bc4cdfea780653b1ce"):
        prepare_dataset("adrenalmnist3d", tmp_path / "other", max_per_split=1, url=bad.as_uri())
    assert not (tmp_path / "other" / "downloads" / "adrenalmnist3d.npz").exists()
    assert not (tmp_path / "other" / "adrenalmnist3d").exists()

    # an unreachable source gives a one-line DatasetNotFoundError that mentions the mirror option
    with pytest.raises(DatasetNotFoundError) as err:
        prepare_dataset("adrenalmnist3d", tmp_path / "x", url=(tmp_path / "nope.npz").as_uri())
    assert "\n" not in str(err.value) and "--mirror" in str(err.value)


# ------------------------------------------------------------------------------------------------ errors


@needs_pneumonia
def test_missing_file_in_mirror(tmp_path):
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        prepare_dataset("pneumoniamnist", tmp_path / "out", mirror=empty)
    message = str(err.value)
    assert "\n" not in message and "mirror" in message
    assert str(empty / "pneumoniamnist" / "pneumoniamnist.npz") in message
    assert "zenodo.org/records/10519652" in message
    assert not (tmp_path / "out" / "pneumoniamnist").exists()


@needs_adrenal
def test_corrupted_copy_raises_checksum_error(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    corrupted = mirror / "adrenalmnist3d.npz"
    data = bytearray(ADRENAL_NPZ.read_bytes())
    for pos in (100, len(data) // 2, len(data) - 100):
        data[pos] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    actual = file_md5(corrupted)
    with pytest.raises(ChecksumError) as err:
        prepare_dataset("adrenalmnist3d", tmp_path / "out", mirror=mirror)
    message = str(err.value)
    assert str(corrupted) in message and "bbd3c5a5576322bc4cdfea780653b1ce" in message and actual in message
    assert not (tmp_path / "out" / "adrenalmnist3d").exists()


@needs_pneumonia
def test_md5sums_that_disagree_raises(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "pneumoniamnist").mkdir(parents=True)
    copy = mirror / "pneumoniamnist" / "pneumoniamnist.npz"
    shutil.copyfile(PNEUMONIA_NPZ, copy)
    wrong = "0" * 32
    (mirror / "MD5SUMS").write_text(f"{wrong}  pneumoniamnist/pneumoniamnist.npz\n")
    with pytest.raises(ChecksumError) as err:
        prepare_dataset("pneumoniamnist", tmp_path / "out", mirror=mirror, max_per_split=2)
    assert wrong in str(err.value) and file_md5(copy) in str(err.value)

    # the same copy without any MD5SUMS is not the official release either
    (mirror / "MD5SUMS").unlink()
    with pytest.raises(ChecksumError, match="28209eda62fecd6e6a2d98b1501bb15f"):
        prepare_dataset("pneumoniamnist", tmp_path / "out", mirror=mirror, max_per_split=2)

    # and with a correct MD5SUMS it is accepted
    (mirror / "MD5SUMS").write_text(f"{file_md5(copy)} *pneumoniamnist/pneumoniamnist.npz\n")
    assert prepare_dataset("pneumoniamnist", tmp_path / "out", mirror=mirror, max_per_split=2).is_file()


def test_ixi_without_mirror(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        prepare_dataset("ixi", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "--mirror" in message and "IXI-T1.tar" in message and "DLMUSE" in message


def test_unknown_dataset_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare_dataset("mnist", tmp_path)
    with pytest.raises(TypeError, match="classes"):
        prepare_dataset("pneumoniamnist", tmp_path, mirror=SHARED_DATA, classes={"a": [1]})


# ------------------------------------------------------------------------------------------------ idempotency


@needs_pneumonia
def test_idempotent_and_atomic(tmp_path, monkeypatch):
    datalist = prepare_dataset("pneumoniamnist", tmp_path, mirror=SHARED_DATA, max_per_split=5)
    info_file = datalist.parent / "dataset_info.json"
    png = datalist.parent / "images" / "train_00000.png"
    stamps = {p: p.stat().st_mtime_ns for p in (datalist, info_file, png)}
    inode = datalist.parent.stat().st_ino

    # same parameters: nothing is rewritten, even if writing would now fail
    def boom(*args, **kwargs):
        raise AssertionError("must not write")

    monkeypatch.setattr(prepare, "_write_png", boom)
    assert prepare_dataset("pneumoniamnist", tmp_path, mirror=SHARED_DATA, max_per_split=5) == datalist
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and datalist.parent.stat().st_ino == inode
    monkeypatch.undo()
    monkeypatch.delenv("DATA_MIRROR", raising=False)

    # other parameters: rebuilt
    prepare_dataset("pneumoniamnist", tmp_path, mirror=SHARED_DATA, max_per_split=6)
    assert json.loads(info_file.read_text())["counts"]["training"] == 6

    # a failure half-way through leaves the previous complete result untouched ...
    calls = {"n": 0}
    real_write = prepare._write_png

    def fail_after_three(path, image):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk full (simulated)")
        real_write(path, image)

    monkeypatch.setattr(prepare, "_write_png", fail_after_three)
    with pytest.raises(OSError, match="simulated"):
        prepare_dataset("pneumoniamnist", tmp_path, mirror=SHARED_DATA, max_per_split=7)
    assert json.loads(info_file.read_text())["counts"]["training"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pneumoniamnist"]  # no temp folders left

    # ... and in a fresh output folder, leaves no datalist.json at all
    calls["n"] = 0
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="simulated"):
        prepare_dataset("pneumoniamnist", fresh, mirror=SHARED_DATA, max_per_split=7)
    assert not list(fresh.rglob("datalist.json")) and not list(fresh.rglob("dataset_info.json"))
    assert not (fresh / "pneumoniamnist").exists()


# ------------------------------------------------------------------------------------------------ IXI


@needs_ixi
def test_ixi_from_mirror(tmp_path):
    import nibabel as nib

    datalist = prepare_dataset("ixi", tmp_path, mirror=SHARED_DATA, max_per_split=2)
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    assert info["task"] == "segmentation" and info["spatial_dims"] == 3 and info["in_channels"] == 1
    assert info["num_classes"] == 6
    assert info["class_names"] == ["background", "lateral_ventricles", "thalamus", "caudate", "putamen", "hippocampus"]
    assert info["spatial_size"] == [120, 120, 90] and info["spacing"] == [2.0, 2.0, 2.0]
    assert info["counts"] == {"training": 2, "validation": 2, "test": 2}
    lo, hi = info["intensity_range"]
    assert lo < hi and info["source"]["md5"] is None and "IXI-T1.tar" in info["source"]["url"]

    participants = {}
    for line in (IXI_ROOT / "participants" / "participants.csv").read_text().splitlines()[1:]:
        mrid, age, sex = line.split(",")[:3]
        participants[mrid] = (float(age), sex)

    classes = list(prepare.DEFAULT_IXI_CLASSES.values())
    load = _loader(["image", "label"])
    subjects = []
    for key in ("training", "validation", "test"):
        from monai.data import load_decathlon_datalist

        items = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=key)
        assert len(items) == 2
        for item in items:
            subjects.append(item["subject"])
            assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
            if item["subject"] in participants:
                assert (item["age"], item["sex"]) == participants[item["subject"]]
            else:
                assert item["age"] is None and item["sex"] is None
            # the image is a byte copy of the mirror's T1
            original_t1 = IXI_ROOT / "t1" / f"{item['subject']}_T1.nii.gz"
            assert file_md5(item["image"]) == file_md5(original_t1)

            label_img = nib.load(item["label"])
            image_img = nib.load(item["image"])
            assert label_img.get_data_dtype() == np.uint8
            np.testing.assert_array_equal(label_img.affine, image_img.affine)
            assert int(label_img.header["sform_code"]) == int(image_img.header["sform_code"])
            assert int(label_img.header["qform_code"]) == int(image_img.header["qform_code"])
            merged = np.asarray(label_img.dataobj)
            original = np.asarray(nib.load(IXI_ROOT / "DLMUSE_seg" / f"{item['subject']}_T1_DLMUSE.nii.gz").dataobj)
            assert set(np.unique(merged).tolist()) <= set(range(6))
            for index, ids in enumerate(classes, start=1):
                np.testing.assert_array_equal(merged == index, np.isin(original, ids))
                assert (merged == index).any()
            assert ((merged == 0) == ~np.isin(original, sum(classes, []))).all()

            data = load(item)
            assert data["image"].shape == data["label"].shape == (1, 120, 120, 90)
            np.testing.assert_allclose(data["image"].affine.numpy(), data["label"].affine.numpy())
    assert len(set(subjects)) == 6

    # the split is deterministic and max_per_split takes a prefix of the full split
    full = prepare._split_subjects(sorted(p.name[: -len("_T1.nii.gz")] for p in (IXI_ROOT / "t1").glob("*_T1.nii.gz")),
                                   prepare.DEFAULT_SPLIT_FRACTIONS, 0)
    assert subjects == full["training"][:2] + full["validation"][:2] + full["test"][:2]
    n = sum(len(v) for v in full.values())
    assert len(full["validation"]) == round(0.1 * n) and len(full["test"]) == round(0.2 * n)
    assert prepare._split_subjects(sorted(full["training"]), (1, 1, 1), 1) != prepare._split_subjects(
        sorted(full["training"]), (1, 1, 1), 2
    )


@needs_ixi
def test_ixi_axial_slices(tmp_path):
    """ixi_axial: the same subjects and split as ixi, one 2D axial slice each through the centre of its structures,
    placed in the world where it lies in the volume; the sample script's --plane asks for it."""
    import nibabel as nib
    from monai.data import load_decathlon_datalist

    volumes = prepare_dataset("ixi", tmp_path / "3d", mirror=SHARED_DATA, max_per_split=2)
    code = subprocess.run([sys.executable, str(PROJECT_ROOT / "sample_data_scripts" / "prepare_ixi.py"), "--plane", "axial",
                           "--output", str(tmp_path / "2d"), "--mirror", str(SHARED_DATA), "--max-per-split", "2"],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    datalist = tmp_path / "2d" / "ixi_axial" / "datalist.json"
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    assert info["name"] == "ixi_axial" and info["spatial_dims"] == 2 and info["task"] == "segmentation"
    assert info["spacing"] == [2.0, 2.0] and len(info["spatial_size"]) == 2 and info["parameters"]["slice_axis"] == 2
    three = json.loads((tmp_path / "3d" / "ixi" / "dataset_info.json").read_text())
    assert info["class_names"] == [c for c in three["class_names"] if c != "hippocampus"] and info["counts"] == three["counts"]
    load = _loader(["image", "label"])
    for key in ("training", "validation", "test"):
        slices = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=key)
        whole = load_decathlon_datalist(str(volumes), is_segmentation=True, data_list_key=key)
        assert [s["subject"] for s in slices] == [w["subject"] for w in whole], "same subjects in the same splits"
        for s, w in zip(slices, whole):
            image, label = nib.as_closest_canonical(nib.load(w["image"])), nib.as_closest_canonical(nib.load(w["label"]))
            labels = np.asarray(label.dataobj) * (np.asarray(label.dataobj) != 5)  # the hippocampus is not an axial class
            assert s["slice"] == round(float(np.nonzero(labels)[2].mean())), "through the structures' centre"
            np.testing.assert_array_equal(np.asarray(nib.load(s["label"]).dataobj), labels[:, :, s["slice"]])
            np.testing.assert_allclose(np.asarray(nib.load(s["image"]).dataobj), np.asarray(image.dataobj)[:, :, s["slice"]], rtol=1e-6)
            # voxel (i, j) of the slice is where voxel (i, j, slice) of the volume is
            world = nib.load(s["image"]).affine @ np.array([3.0, 5.0, 0.0, 1.0])
            np.testing.assert_allclose(world, image.affine @ np.array([3.0, 5.0, s["slice"], 1.0]), atol=1e-4)
            data = load(s)
            assert data["image"].shape == data["label"].shape == (1, *info["spatial_size"])
            assert (data["label"] > 0).any()


@needs_ixi
def test_ixi_custom_classes_and_checks(tmp_path):
    import nibabel as nib

    datalist = prepare_dataset(
        "ixi", tmp_path, mirror=IXI_ROOT, max_per_split=1, classes="ventricles=51,52,4,11; brainstem=35"
    )
    info = json.loads((datalist.parent / "dataset_info.json").read_text())
    assert info["class_names"] == ["background", "ventricles", "brainstem"] and info["num_classes"] == 3
    item = json.loads(datalist.read_text())["training"][0]
    merged = np.asarray(nib.load(datalist.parent / item["label"]).dataobj)
    original = np.asarray(nib.load(IXI_ROOT / "DLMUSE_seg" / f"{item['subject']}_T1_DLMUSE.nii.gz").dataobj)
    np.testing.assert_array_equal(merged == 2, original == 35)

    with pytest.raises(ValueError, match="51"):
        prepare.parse_classes({"a": [51], "b": [51, 52]})

    # a mirror whose MD5SUMS disagrees with a used file: error naming the file
    mirror = tmp_path / "mirror"
    subjects = sorted(p.name[: -len("_T1.nii.gz")] for p in (IXI_ROOT / "t1").glob("*_T1.nii.gz"))[:3]
    for sub in ("t1", "DLMUSE_seg"):
        (mirror / sub).mkdir(parents=True)
    lines = []
    for mrid in subjects:
        for rel in (f"t1/{mrid}_T1.nii.gz", f"DLMUSE_seg/{mrid}_T1_DLMUSE.nii.gz"):
            shutil.copyfile(IXI_ROOT / rel, mirror / rel)
            lines.append(f"{file_md5(mirror / rel)}  {rel}")
    bad_rel = f"DLMUSE_seg/{subjects[1]}_T1_DLMUSE.nii.gz"
    lines = [("f" * 32 + f"  {bad_rel}") if line.endswith(bad_rel) else line for line in lines]
    (mirror / "MD5SUMS").write_text("\n".join(lines) + "\n")
    with pytest.raises(ChecksumError) as err:
        prepare_dataset("ixi", tmp_path / "out", mirror=mirror, split_fractions=(1, 1, 1))
    assert bad_rel.split("/")[1] in str(err.value)
    assert not (tmp_path / "out" / "ixi").exists()

    # shape mismatch between image and label: error naming the subject, nothing left behind
    (mirror / "MD5SUMS").unlink()
    seg = nib.load(IXI_ROOT / bad_rel)
    small = nib.Nifti1Image(np.asarray(seg.dataobj)[:100], seg.affine)
    nib.save(small, str(mirror / bad_rel))
    with pytest.raises(ValueError, match=subjects[1]):
        prepare_dataset("ixi", tmp_path / "out", mirror=mirror, split_fractions=(1, 1, 1))
    assert not (tmp_path / "out" / "ixi").exists()
    assert not list((tmp_path / "out").glob(".ixi*"))


# ------------------------------------------------------------------------------------------------ wrappers


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATA_MIRROR"}
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "sample_data_scripts" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(PROJECT_ROOT),
        timeout=120,
    )


@needs_adrenal
def test_wrapper_script(tmp_path):
    result = _run_script(
        "prepare_adrenalmnist3d.py", "--output", str(tmp_path), "--mirror", str(SHARED_DATA), "--max-per-split", "2"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "adrenalmnist3d" / "datalist.json").is_file()

    result = _run_script(
        "prepare_pneumoniamnist.py", "--output", str(tmp_path), "--mirror", str(tmp_path / "no_such_mirror")
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "mirror" in lines[0] and "pneumoniamnist.npz" in lines[0]
    assert not (tmp_path / "pneumoniamnist").exists()
