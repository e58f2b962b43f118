"""Shared fixtures: real public data from ../shared/data (see its README), prepared at small size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DATA_MIRROR") or ROOT.parent / "shared" / "data").resolve()


def require(*relative: str) -> Path:
    path = SHARED_DATA.joinpath(*relative)
    if not path.exists():
        pytest.skip(f"real data {path} is not available (set DATA_MIRROR or place ../shared/data beside the project)")
    return path


@contextmanager
def torch_threads(n: int):
    """torch's intra-op CPU threads set to ``n`` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bundle(bundle: str, config, overrides: dict, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the project's bundles exactly as a user does: ``python -m monai.bundle run``."""
    from monai_fedkd.pipeline import bundle_command

    cmd = bundle_command(bundle, config, overrides)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def pneumonia_dir(tmp_path_factory) -> Path:
    """PneumoniaMNIST as PNG files + datalist, 40 images per split, from the local mirror."""
    from monai_fedkd.data.prepare import prepare_dataset

    require("pneumoniamnist", "pneumoniamnist.npz")
    out = tmp_path_factory.mktemp("prepared")
    return Path(prepare_dataset("pneumoniamnist", out, mirror=SHARED_DATA, max_per_split=40)).parent


@pytest.fixture(scope="session")
def adrenal_dir(tmp_path_factory) -> Path:
    from monai_fedkd.data.prepare import prepare_dataset

    require("adrenalmnist3d", "adrenalmnist3d.npz")
    out = tmp_path_factory.mktemp("prepared")
    return Path(prepare_dataset("adrenalmnist3d", out, mirror=SHARED_DATA, max_per_split=16)).parent


@pytest.fixture(scope="session")
def ixi_dir(tmp_path_factory) -> Path:
    from monai_fedkd.data.prepare import prepare_dataset

    require("ixi_hh", "t1")
    out = tmp_path_factory.mktemp("prepared")
    return Path(prepare_dataset("ixi", out, mirror=SHARED_DATA, max_per_split=2)).parent


@pytest.fixture(scope="session")
def ixi_axial_dir(tmp_path_factory) -> Path:
    """IXI as 2D segmentation: one axial slice per subject (``ixi_axial``)."""
    from monai_fedkd.data.prepare import prepare_dataset

    require("ixi_hh", "t1")
    out = tmp_path_factory.mktemp("prepared")
    return Path(prepare_dataset("ixi_axial", out, mirror=SHARED_DATA, max_per_split=2)).parent


def dataset_info(folder: Path) -> dict:
    return json.loads((folder / "dataset_info.json").read_text())


PY = sys.executable


def ok(proc: subprocess.CompletedProcess) -> None:
    """Assert a subprocess succeeded, showing the end of its output otherwise."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="session")
def cls_sites(pneumonia_dir, tmp_path_factory):
    """Two PneumoniaMNIST sites with different architectures (a MONAI Classifier and a small DenseNet)."""
    from monai_fedkd.pipeline import dataset_overrides

    root = tmp_path_factory.mktemp("cls_sites")
    bundle, overrides = dataset_overrides(dataset_info(pneumonia_dir))
    datalist = str(pneumonia_dir / "datalist.json")
    ok(run_bundle(bundle, "train.json", {"datalist": datalist, "output_dir": str(root / "siteA"), "max_epochs": 1, **overrides}))
    dense = {"network_def": {"_target_": "monai_fedkd.networks.build_network", "name": "DenseNet", "spatial_dims": 2, "in_channels": 1,
                             "out_channels": 2, "init_features": 8, "growth_rate": 8, "block_config": [2, 2], "bn_size": 2}}
    ok(run_bundle(bundle, "train.json", {"datalist": datalist, "output_dir": str(root / "siteB"), "max_epochs": 1, "seed": 1, **overrides, **dense}))
    return [(root / "siteA", datalist), (root / "siteB", datalist)]


@pytest.fixture(scope="session")
def seg2d_sites(ixi_axial_dir, tmp_path_factory):
    """Two 2D segmentation sites trained on IXI's axial slices (``ixi_axial``: 2D NIfTI)."""
    from monai_fedkd.pipeline import dataset_overrides

    root = tmp_path_factory.mktemp("seg2d_sites")
    datalist_file = ixi_axial_dir / "datalist.json"
    bundle, overrides = dataset_overrides(dataset_info(ixi_axial_dir))
    small = {"spacing": [4.0, 4.0], "spatial_size": [32, 32], "max_epochs": 1, "batch_size": 1, "samples_per_volume": 1,
             "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2]}
    entries = []
    for k in range(2):
        d = root / f"slices{k}"
        ok(run_bundle(bundle, "train.json", {"datalist": str(datalist_file), "output_dir": str(d), "seed": k, **overrides, **small}))
        (d / "site_policy.json").write_text(json.dumps({"atlas_min_subjects": 1}))  # 2 training subjects per tiny site
        entries.append((d, datalist_file))
    return entries
