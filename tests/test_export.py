"""Exported model bundles run with plain MONAI (monai_fedkd blocked from import) on real NIfTI, DICOM and PNG studies.

A small central model is distilled from tiny site models (IXI segmentation, PneumoniaMNIST classification), exported
with ``monai_fedkd.export`` / ``monai-fedkd export``, and run exactly as a hospital would:
``python -m monai.bundle run --config_file <bundle>/configs/inference.json --input_dir ... --output_dir ...``.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from monai.bundle import verify_metadata, verify_net_in_out

from conftest import PY, ROOT, dataset_info, ok, require, run_bundle
from monai_fedkd.cli import main as cli_main
from monai_fedkd.data.transforms import card_preprocessing
from monai_fedkd.export import ExportError, export_bundle
from monai_fedkd.pipeline import dataset_overrides
from monai_fedkd.site import load_site_model, read_site_card

pytestmark = pytest.mark.slow

SCHEMA = ROOT / "monai_fedkd" / "resources" / "bundle_metadata_schema.json"
DICOM_SERIES = "dicom_mr_series/gre_field_mapping_2"

# runs `python -m monai.bundle` with every import of monai_fedkd refused: the exported bundle must not need it
NO_PLUGIN_RUNNER = '''
import runpy, sys
class RefuseMonaiFedkd:
    def find_spec(self, name, path=None, target=None):
        if name == "monai_fedkd" or name.startswith("monai_fedkd."):
            raise ModuleNotFoundError(f"No module named {name!r} (monai_fedkd is blocked in this test)")
        return None
sys.meta_path.insert(0, RefuseMonaiFedkd())
sys.argv = ["monai.bundle"] + sys.argv[1:]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
'''


def run_exported(bundle: Path, tmp_path: Path, **args) -> subprocess.CompletedProcess:
    runner = tmp_path / "run_without_monai_fedkd.py"
    runner.write_text(NO_PLUGIN_RUNNER)
    cmd = [PY, str(runner), "run", "--config_file", str(bundle / "configs" / "inference.json")]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    # a working directory outside the project, and no PYTHONPATH: nothing of monai_fedkd's source is reachable
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def seg_central(ixi_dir, tmp_path_factory):
    from test_site_bundles import SEG_SMALL

    root = tmp_path_factory.mktemp("seg_export")
    bundle, overrides = dataset_overrides(dataset_info(ixi_dir))
    datalist = str(ixi_dir / "datalist.json")
    site = root / "ixi_site"
    ok(run_bundle(bundle, "train.json", {"datalist": datalist, "output_dir": str(site), **overrides, **SEG_SMALL}))
    sites = root / "sites.json"
    sites.write_text(json.dumps([{"name": "ixi_site", "dir": str(site), "datalist": datalist}]))
    central = root / "central"
    ok(run_bundle("central_distillation", ["train.json", "segmentation.json", "segmentation_unconditional.json"],
                  {"sites": str(sites), "output_dir": str(central), "iterations": 2, "batch_size": 2, "student_batch_size": 2,
                   "generator_def#base_channels": 8, "student_def#channels": [8, 16, 32], "student_def#strides": [2, 2]}))
    out = export_bundle(central, root / "central_bundle", modality="MR")
    return {"site": site, "central": central, "bundle": out}


@pytest.fixture(scope="module")
def cls_central(cls_sites, pneumonia_dir, tmp_path_factory):
    from monai_fedkd.evaluation import evaluate_models

    root = tmp_path_factory.mktemp("cls_export")
    sites = root / "sites.json"
    sites.write_text(json.dumps([{"name": Path(d).name, "dir": str(d), "datalist": str(dl)} for d, dl in cls_sites]))
    central = root / "central"
    ok(run_bundle("central_distillation", "train.json", {"sites": str(sites), "output_dir": str(central), "iterations": 2, "batch_size": 8,
                                                         "student_batch_size": 8}))
    datalist = pneumonia_dir / "datalist.json"
    evaluate_models([d for d, _ in cls_sites], [str(datalist)], root / "eval", extra_models={"central": str(central)})
    out = export_bundle(central, root / "central_bundle", metrics=root / "eval" / "metrics.json")
    return {"central": central, "bundle": out, "metrics": root / "eval" / "metrics.json"}


def _ixi_volumes(n: int) -> list[Path]:
    return sorted(require("ixi_hh", "t1").glob("*.nii.gz"))[:n]


# ---- layout and model-zoo checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["seg_central", "cls_central"])
def test_bundle_files_metadata_and_network(which, request):
    exported = request.getfixturevalue(which)
    bundle = exported["bundle"]
    for f in ["configs/inference.json", "configs/metadata.json", "configs/logging.conf", "models/model.pt", "models/model.ts",
              "docs/README.md", "LICENSE", "scripts/fedkd_inference.py"]:
        assert (bundle / f).is_file(), f
    assert not Path(f"{bundle}.partial").exists()
    assert "monai_fedkd." not in (bundle / "configs" / "inference.json").read_text()  # no component or import of it
    assert not re.search(r"^\s*(import|from)\s+monai_fedkd", (bundle / "scripts" / "fedkd_inference.py").read_text(), re.M)
    meta_file = str(bundle / "configs" / "metadata.json")
    verify_metadata(meta_file=meta_file, filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=str(bundle / "configs" / "inference.json"), n=1)
    card = read_site_card(exported["central"])
    meta = json.loads(Path(meta_file).read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == card["input"]["channels"]
    assert fmt["inputs"]["image"]["spatial_shape"] == card["input"]["spatial_size"]
    assert fmt["outputs"]["pred"]["channel_def"] == {str(i): n for i, n in enumerate(card["classes"]["names"])}
    assert "monai_fedkd" not in meta["required_packages_version"]
    # TorchScript (ckpt_export) and the state dict give the same outputs
    net, _ = load_site_model(exported["central"])
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.rand(1, card["input"]["channels"], *card["input"]["spatial_size"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))


def test_readme_and_metadata_carry_the_measured_scores(cls_central):
    metrics = json.loads(cls_central["metrics"].read_text())
    auroc = metrics["central"]["pooled"]["auroc"]
    readme = (cls_central["bundle"] / "docs" / "README.md").read_text()
    assert f"{auroc:.4f}" in readme
    card = read_site_card(cls_central["central"])
    for site, info in card["sites"].items():
        assert site in readme and str(info["sample_count"]) in readme
    meta = json.loads((cls_central["bundle"] / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"]["pooled_auroc"] == auroc


# ---- segmentation: NIfTI and DICOM in, masks in the original geometry out -------------------------------------------


def test_segmentation_on_nifti_keeps_each_study_geometry(seg_central, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    volumes = _ixi_volumes(2)
    for v in volumes:
        shutil.copy(v, studies / v.name)
    out = tmp_path / "out"
    ok(run_exported(seg_central["bundle"], tmp_path, input_dir=studies, output_dir=out))
    card = read_site_card(seg_central["central"])
    names = card["classes"]["names"]
    rows = {r["study"]: r for r in read_csv(out / "label_volumes.csv")}
    assert read_csv(out / "errors.csv") == []
    assert len(rows) == len(volumes)
    for v in volumes:
        study = v.name[: -len(".nii.gz")]
        src, mask = nib.load(str(v)), nib.load(str(out / f"{study}_seg.nii.gz"))
        assert mask.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-4)
        values = np.asarray(mask.dataobj)
        assert set(np.unique(values)) <= set(range(len(names)))
        voxel = abs(np.linalg.det(src.affine[:3, :3]))
        for label, name in enumerate(names):
            assert float(rows[study][f"{name}_mm3"]) == pytest.approx((values == label).sum() * voxel, rel=1e-5)


def _write_series(src: Path, dst: Path, **changes) -> None:
    """A copy of a real DICOM series as another series (new UIDs), with the given header changes."""
    import pydicom
    from pydicom.uid import generate_uid

    series_uid = generate_uid()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in changes.items():
            setattr(ds, k, v)
        ds.save_as(str(dst / f"{changes.get('Modality', 'MR')}_{series_uid[-6:]}_{f.name}"))


def test_segmentation_on_dicom_series_matches_simpleitk_geometry(seg_central, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    series = require(*DICOM_SERIES.split("/"))
    studies = tmp_path / "studies"
    shutil.copytree(series, studies / "series_a")            # one sub-folder per series
    _write_series(series, studies)                           # loose files of a second MR series ...
    _write_series(series, studies, Modality="CT")            # ... mixed with a CT series (wrong modality)
    sr = pydicom.dcmread(str(sorted(series.iterdir())[0]))   # ... and a non-image object
    del sr.PixelData
    sr.Modality, sr.SeriesInstanceUID, sr.SOPInstanceUID = "SR", generate_uid(), generate_uid()
    sr.save_as(str(studies / "report.dcm"))
    out = tmp_path / "out"
    proc = run_exported(seg_central["bundle"], tmp_path, input_dir=studies, output_dir=out)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # the exit status counts the failed studies
    errors = {r["study"]: r["reason"] for r in read_csv(out / "errors.csv")}
    assert len(errors) == 2
    assert any("modality is CT" in r and "expects MR" in r for r in errors.values())
    assert any("SR" in r and "no image" in r for r in errors.values())
    rows = read_csv(out / "label_volumes.csv")
    assert len(rows) == 2
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ref = reader.Execute()
    uids = {pydicom.dcmread(str(p), stop_before_pixels=True).SeriesInstanceUID for p in studies.rglob("*.dcm")}
    for row in rows:
        assert row["study"] in uids  # the identifier is the SeriesInstanceUID
        mask = sitk.ReadImage(str(out / row["mask"]))
        assert mask.GetSize() == ref.GetSize()
        np.testing.assert_allclose(mask.GetSpacing(), ref.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(mask.GetOrigin(), ref.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetDirection(), ref.GetDirection(), atol=1e-5)
    assert not (out / ".series").exists(), "staged links are removed after the run"


def test_corrupt_study_is_listed_and_the_others_run(seg_central, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    good = _ixi_volumes(1)[0]
    shutil.copy(good, studies / good.name)
    (studies / "broken.nii.gz").write_bytes(good.read_bytes()[:4000])  # a truncated transfer
    out = tmp_path / "out"
    proc = run_exported(seg_central["bundle"], tmp_path, input_dir=studies, output_dir=out)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = read_csv(out / "errors.csv")
    assert [e["study"] for e in errors] == ["broken"] and errors[0]["reason"].startswith("LoadImaged")
    assert [r["study"] for r in read_csv(out / "label_volumes.csv")] == [good.name[: -len(".nii.gz")]]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == [good.name.replace(".nii.gz", "_seg.nii.gz")]
    assert not list(out.glob(".*partial*"))


def test_site_model_exports_through_the_cli(seg_central, tmp_path, capsys):
    bundle = tmp_path / "site_bundle"
    assert cli_main(["export", str(seg_central["site"]), str(bundle), "--modality", "MR"]) == 0
    readme = (bundle / "docs" / "README.md").read_text()
    card = read_site_card(seg_central["site"])
    assert f"Trained at site `{card['site']}`" in readme and str(card["sample_count"]) in readme
    studies = tmp_path / "studies"
    shutil.copytree(require(*DICOM_SERIES.split("/")), studies / "series")
    ok(run_exported(bundle, tmp_path, input_dir=studies, output_dir=tmp_path / "out"))
    assert len(read_csv(tmp_path / "out" / "label_volumes.csv")) == 1
    # a second export into the same folder is refused by name
    assert cli_main(["export", str(seg_central["site"]), str(bundle)]) == 1
    assert "exists" in capsys.readouterr().err


def test_2d_segmentation_on_2d_nifti(seg2d_sites, ixi_axial_dir, tmp_path):
    """A 2D segmentation model (a site of IXI's axial slices) exports and runs on 2D NIfTI slices: one mask per slice,
    in its geometry, and areas in the table."""
    site, _ = seg2d_sites[0]
    bundle = export_bundle(site, tmp_path / "bundle2d", modality="MR")
    studies = tmp_path / "studies"
    studies.mkdir()
    slices = [ixi_axial_dir / item["image"] for item in json.loads((ixi_axial_dir / "datalist.json").read_text())["test"]]
    for s in slices:
        shutil.copy(s, studies / s.name)
    out = tmp_path / "out"
    ok(run_exported(bundle, tmp_path, input_dir=studies, output_dir=out))
    assert read_csv(out / "errors.csv") == []
    names = read_site_card(site)["classes"]["names"]
    assert len(read_csv(out / "label_volumes.csv")) == len(slices) == 2
    for s in slices:
        src, mask = nib.load(str(s)), nib.load(str(out / f"{s.name[: -len('.nii.gz')]}_seg.nii.gz"))
        assert mask.shape == src.shape and len(mask.shape) == 2
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= set(range(len(names)))


# ---- classification: one CSV row per study ------------------------------------------------------------------------


def test_classification_probabilities_match_the_library(cls_central, pneumonia_dir, tmp_path):
    from monai.transforms import Compose

    studies = tmp_path / "studies"
    studies.mkdir()
    pngs = sorted((pneumonia_dir / "images").glob("test_*.png"))[:6]
    for p in pngs:
        shutil.copy(p, studies / p.name)
    from PIL import Image

    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(studies / "colour.png")  # 3 channels for a 1-channel model
    out = tmp_path / "out"
    proc = run_exported(cls_central["bundle"], tmp_path, input_dir=studies, output_dir=out)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = read_csv(out / "errors.csv")
    assert [e["study"] for e in errors] == ["colour"] and "3 channels" in errors[0]["reason"]
    rows = {r["study"]: r for r in read_csv(out / "predictions.csv")}
    net, card = load_site_model(cls_central["central"])
    names = card["classes"]["names"]
    pre = Compose(card_preprocessing(card, with_label=False))
    for p in pngs:
        with torch.no_grad():
            expected = torch.softmax(net(pre({"image": str(p)})["image"][None]), 1)[0]
        row = rows[p.stem]
        got = [float(row[f"prob_{n}"]) for n in names]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
        assert row["predicted_class"] == names[int(expected.argmax())]


def test_classification_from_a_datalist(cls_central, pneumonia_dir, tmp_path):
    datalist = pneumonia_dir / "datalist.json"
    out = tmp_path / "out"
    ok(run_exported(cls_central["bundle"], tmp_path, datalist=datalist, datalist_key="test", output_dir=out))
    assert len(read_csv(out / "predictions.csv")) == len(json.loads(datalist.read_text())["test"])


# ---- refusals ---------------------------------------------------------------------------------------------------------


def test_export_refuses_what_plain_monai_cannot_run(cls_central, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(cls_central["central"] / "models", model / "models")
    card = read_site_card(cls_central["central"])
    card["network_def"] = {"_target_": "my_hospital.nets.Special", "width": 8}
    (model / "central_card.json").write_text(json.dumps(card))
    with pytest.raises(Exception, match="my_hospital.nets.Special"):
        export_bundle(model, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.partial").exists()
    with pytest.raises(ExportError, match="holds no scores"):
        export_bundle(cls_central["central"], tmp_path / "bundle2", metrics=_metrics_without(cls_central["metrics"], tmp_path))
    assert not (tmp_path / "bundle2").exists()


def _metrics_without(metrics: Path, tmp_path: Path) -> Path:
    m = json.loads(metrics.read_text())
    m["meta"]["models"] = {k: v for k, v in m["meta"]["models"].items() if k != "central"}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(m))
    return path


def test_missing_input_folder_fails_with_its_name(cls_central, tmp_path):
    proc = run_exported(cls_central["bundle"], tmp_path, input_dir=tmp_path / "nowhere", output_dir=tmp_path / "out")
    assert proc.returncode != 0 and "nowhere" in proc.stdout + proc.stderr


def test_runner_really_blocks_monai_fedkd(tmp_path):
    runner = tmp_path / "r.py"
    runner.write_text(NO_PLUGIN_RUNNER.replace('runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)', "import monai_fedkd"))
    proc = subprocess.run([PY, str(runner)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_dicom_seg_frames_match_the_nifti_mask_on_each_source_image(seg_central, tmp_path):
    """DICOM-SEG (highdicom extra): every source image's frame holds the labels of the NIfTI mask at its pixels."""
    import highdicom as hd
    import pydicom

    series = require(*DICOM_SERIES.split("/"))
    studies = tmp_path / "studies"
    shutil.copytree(series, studies / "series")
    out = tmp_path / "out"
    ok(run_exported(seg_central["bundle"], tmp_path, input_dir=studies, output_dir=out, dicom_seg=True))
    row = read_csv(out / "label_volumes.csv")[0]
    seg = hd.seg.segread(str(out / row["dicom_seg"]))
    # reference: the NIfTI mask resampled by SimpleITK onto the source series grid (nearest neighbour)
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(studies / "series"))
    reader.SetFileNames(files)
    ref = reader.Execute()
    mask = sitk.ReadImage(str(out / row["mask"]))
    expected = sitk.GetArrayFromImage(sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))  # (slices, rows, cols)
    sop_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, combine_segments=True)
    assert got.shape == expected.shape
    assert (expected > 0).any(), "the test needs foreground to compare"
    agree = (got == expected).mean()
    assert agree > 0.999, agree  # nearest-voxel rounding can differ on the odd boundary voxel
    names = read_site_card(seg_central["central"])["classes"]["names"]
    assert [d.SegmentLabel for d in seg.SegmentSequence] == names[1:]


def test_find_studies_sorts_dicom_by_folder_and_series(tmp_path):
    from monai_fedkd.export.runtime import find_studies

    series = require(*DICOM_SERIES.split("/"))
    studies = tmp_path / "studies"
    shutil.copytree(series, studies / "copy_a")
    shutil.copytree(series, studies / "nested" / "copy_b")  # the same series twice: two studies, two identifiers
    (studies / "notes.dcm").write_bytes(b"not a DICOM file")
    shutil.copy(_ixi_volumes(1)[0], studies / "brain.nii.gz")
    (studies / "readme.txt").write_text("ignored")
    items, errors = find_studies(studies, output_dir=tmp_path / "out")
    import pydicom

    uid = pydicom.dcmread(str(sorted(series.iterdir())[0]), stop_before_pixels=True).SeriesInstanceUID
    assert [(i["study"], Path(i["image"]).name) for i in items] == [("brain", "brain.nii.gz"), (uid, "copy_a"), (f"{uid}_2", "copy_b")]
    assert [e["study"] for e in errors] == ["notes.dcm"] and "unreadable DICOM" in errors[0]["reason"]
    with pytest.raises(ValueError, match="no image files"):
        (tmp_path / "empty").mkdir()
        find_studies(tmp_path / "empty")
    with pytest.raises(ValueError, match="no non-empty 'test'"):
        (tmp_path / "dl.json").write_text(json.dumps({"training": []}))
        find_studies(datalist=tmp_path / "dl.json")
