"""Model-zoo conventions of every bundle: files, metadata schema, network in/out, workflow properties, export."""

from __future__ import annotations

import json

import pytest
import torch

from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from conftest import ROOT

BUNDLES = ROOT / "bundles"
SCHEMA = ROOT / "monai_fedkd" / "resources" / "bundle_metadata_schema.json"
SITE_BUNDLES = ["site_classification", "site_segmentation"]
ALL_BUNDLES = SITE_BUNDLES + ["evaluation"]
METADATA_BUNDLES = ALL_BUNDLES + ["central_distillation"]  # every bundle with a metadata.json


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_bundle_layout(bundle):
    root = BUNDLES / bundle
    for f in ["configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE"]:
        assert (root / f).is_file(), f"{bundle} lacks {f}"
    assert not (root / "scripts").exists(), "bundles are pure configuration"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["schema"].startswith("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/")
    assert meta["required_packages_version"].get("monai_fedkd")


@pytest.mark.parametrize("bundle", METADATA_BUNDLES)
def test_parsed_metadata_keeps_required_packages(bundle):
    # MONAI parses a deprecated optional_packages_version as required_packages_version, replacing the real list
    meta_file = BUNDLES / bundle / "configs" / "metadata.json"
    parser = ConfigParser()
    parser.read_meta(str(meta_file))
    assert parser.get("_meta_")["required_packages_version"] == json.loads(meta_file.read_text())["required_packages_version"]


@pytest.mark.parametrize("bundle", SITE_BUNDLES)
def test_site_bundle_files(bundle):
    for f in ["train.json", "evaluate.json", "inference.json"]:
        assert (BUNDLES / bundle / "configs" / f).is_file()


@pytest.mark.parametrize("bundle", METADATA_BUNDLES)
def test_verify_metadata_against_local_schema(bundle):
    verify_metadata(meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_local_schema_rejects_incomplete_metadata(tmp_path):
    meta = json.loads((BUNDLES / "site_classification" / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


def test_local_schema_rejects_deprecated_optional_packages(tmp_path):
    meta = json.loads((BUNDLES / "site_segmentation" / "configs" / "metadata.json").read_text())
    meta["optional_packages_version"] = {"itk": "5.4.0"}
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="optional_packages_version"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", SITE_BUNDLES)
def test_verify_net_in_out(bundle):
    cfg = BUNDLES / bundle / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(cfg / "metadata.json"), config_file=str(cfg / "train.json"), n=2)


@pytest.mark.parametrize("bundle", SITE_BUNDLES)
def test_network_output_matches_metadata_classes(bundle):
    cfg = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(cfg / "train.json"))
    meta = json.loads((cfg / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == parser.get_parsed_content("num_classes")


@pytest.fixture(scope="module")
def tiny_datalists(pneumonia_dir, ixi_dir):
    return {"site_classification": pneumonia_dir / "datalist.json", "site_segmentation": ixi_dir / "datalist.json"}


@pytest.mark.parametrize("bundle", SITE_BUNDLES)
@pytest.mark.parametrize("workflow, config", [("train", "train.json"), ("infer", "inference.json")])
def test_check_properties(bundle, workflow, config, tiny_datalists, tmp_path):
    cfg = BUNDLES / bundle / "configs"
    wf = ConfigWorkflow(config_file=str(cfg / config), meta_file=str(cfg / "metadata.json"), logging_file=str(cfg / "logging.conf"),
                        workflow_type=workflow, datalist=str(tiny_datalists[bundle]), output_dir=str(tmp_path / "out"))
    wf.initialize()
    assert wf.check_properties() == []


@pytest.mark.parametrize("bundle", SITE_BUNDLES)
def test_ckpt_export_torchscript_matches_checkpoint(bundle, tmp_path):
    cfg = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(cfg / "train.json"))
    net = parser.get_parsed_content("network_def")
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt), meta_file=str(cfg / "metadata.json"), config_file=str(cfg / "train.json"))
    scripted = torch.jit.load(str(ts))
    shape = (1, parser.get_parsed_content("in_channels"), *[16] * parser.get_parsed_content("spatial_dims"))
    if bundle == "site_classification":
        shape = (1, 1, *parser.get_parsed_content("spatial_size"))
    x = torch.rand(*shape)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
