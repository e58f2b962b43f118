"""Shared fixtures: real public data from ../shared/data (see its README), prepared at small size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DATA_MIRROR") or ROOT.parent / "shared" / "data").resolve()


def require(*relative: str) -> Path:
    path = SHARED_DATA.joinpath(*relative)
    if not path.exists():
        pytest.skip(f"real data {path} is not available (set DATA_MIRROR or place ../shared/data beside the project)")
    return path


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


def dataset_info(folder: Path) -> dict:
    return json.loads((folder / "dataset_info.json").read_text())


PY = sys.executable
