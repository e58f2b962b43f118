"""Central distillation over NVIDIA FLARE (Collab API, simulator): same result as in-process, faults named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ok, run_bundle
from monai_fedkd.site import load_site_model

pytest.importorskip("nvflare.collab", reason="NVIDIA FLARE is an optional extra: pip install 'nvflare==2.9.*'")

pytestmark = pytest.mark.slow

# small but complete runs: 3 generator steps with a checkpoint, a montage and the final outputs
RUN = {"iterations": 3, "batch_size": 8, "student_batch_size": 8, "checkpoint_interval": 2, "montage_interval": 2}


def _sites_json(path: Path, entries) -> Path:
    path.write_text(json.dumps([{"name": n, "dir": str(d), "datalist": str(dl)} for n, (d, dl) in entries.items()]))
    return path


def _flare(sites: Path, out: Path, workspace: Path, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai_fedkd.cli", "flare-distill", "--sites", str(sites), "--output-dir", str(out),
           "--workspace", str(workspace), *extra]
    for k, v in RUN.items():
        cmd += ["--override", f"{k}={v}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_site_entries_match_in_process_seeds(cls_sites, tmp_path):
    from monai_fedkd.site.query import load_query_sites
    from monai_fedkd.transport.flare import site_entries

    sites = _sites_json(tmp_path / "sites.json", {"a": cls_sites[0], "b": cls_sites[1]})
    entries = site_entries(sites, seed=5)
    in_process = load_query_sites(sites, seed=5)
    assert [e["name"] for e in entries] == [s.name for s in in_process] == ["a", "b"]
    assert [e["seed"] for e in entries] == [s.seed for s in in_process]
    with pytest.raises(ValueError, match="unique"):
        site_entries([{"name": "a", "dir": str(cls_sites[0][0])}, {"name": "a", "dir": str(cls_sites[1][0])}])


def test_flare_simulator_matches_in_process(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "siteB": cls_sites[1]})
    proc = _flare(sites, tmp_path / "flare", tmp_path / "ws")
    ok(proc)
    ok(run_bundle("central_distillation", "train.json", {"sites": str(sites), "output_dir": str(tmp_path / "local"), **RUN}))
    flare_net, flare_card = load_site_model(tmp_path / "flare")
    local_net, local_card = load_site_model(tmp_path / "local")
    # same seed, same config, lossless transfer (safetensors) and the same order of operations: identical weights
    for (k, a), b in zip(flare_net.state_dict().items(), local_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs between FLARE and in-process")
    for name in ("siteA", "siteB"):
        f, i = flare_card["sites"][name]["transport"], local_card["sites"][name]["transport"]
        assert f["queries"] == i["queries"] == 3 and f["vjps"] == i["vjps"]
        assert f["bytes_sent"] == i["bytes_received"] and f["bytes_received"] == i["bytes_sent"]  # server view vs site view
    # the sites kept their own discriminator checkpoints, where the per-site config put them
    assert (tmp_path / "flare" / "site_state" / "siteA" / "iter_2.pt").is_file()


def _nan_site(site_dir: Path, dest: Path) -> Path:
    shutil.copytree(site_dir, dest)
    state = torch.load(dest / "models" / "model.pt", weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, dest / "models" / "model.pt")
    return dest


def test_flare_site_answering_nan_is_named_or_dropped(cls_sites, tmp_path):
    broken = _nan_site(cls_sites[1][0], tmp_path / "broken")
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "broken": (broken, cls_sites[1][1])})
    proc = _flare(sites, tmp_path / "stop", tmp_path / "ws1")
    assert proc.returncode == 1
    assert "broken" in proc.stderr and "NaN" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "stop" / "models" / "model.pt").exists()

    proc = _flare(sites, tmp_path / "drop", tmp_path / "ws2", ["--override", "drop_failed_sites=true"])
    ok(proc)
    card = json.loads((tmp_path / "drop" / "central_card.json").read_text())
    assert "NaN" in card["sites"]["broken"]["dropped"] and card["sites"]["siteA"]["dropped"] is None
    assert list(card["expertise_weights"]) == ["siteA"]


def test_flare_job_export(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "siteB": cls_sites[1]})
    proc = _flare(sites, tmp_path / "out", tmp_path / "ws", ["--export", str(tmp_path / "job")])
    ok(proc)
    job = tmp_path / "job" / "monai_fedkd_distillation"
    meta = json.loads((job / "meta.json").read_text())
    assert set(meta["deploy_map"]) >= {"app_server", "app_siteA", "app_siteB"}
    client_cfg = json.loads((job / "app_siteA" / "config" / "config_fed_client.json").read_text())
    assert str(cls_sites[0][0]) in json.dumps(client_cfg) and str(cls_sites[1][0]) not in json.dumps(client_cfg)
