"""Central distillation over NVIDIA FLARE (Collab API, simulator): same result as in-process, faults named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ok, run_bundle
from monai_fedkd.site import load_site_model

pytest.importorskip("nvflare.collab", reason="NVIDIA FLARE is an optional extra: pip install 'nvflare==2.9.*'")

pytestmark = pytest.mark.slow

# small but complete runs: 3 generator steps with a checkpoint, a montage and the final outputs
RUN = {"iterations": 3, "batch_size": 8, "student_batch_size": 8, "checkpoint_interval": 2, "montage_interval": 2}
SAME_THREADS = ["--site-threads", str(torch.get_num_threads())]


def _sites_json(path: Path, entries) -> Path:
    path.write_text(json.dumps([{"name": n, "dir": str(d), "datalist": str(dl)} for n, (d, dl) in entries.items()]))
    return path


def _flare_cmd(sites: Path, out: Path, workspace: Path, extra=(), run=None) -> list[str]:
    cmd = [sys.executable, "-m", "monai_fedkd.cli", "flare-distill", "--sites", str(sites), "--output-dir", str(out),
           "--workspace", str(workspace), *extra]
    for k, v in (run or RUN).items():
        cmd += ["--override", f"{k}={json.dumps(v)}"]
    return cmd


def _flare(sites: Path, out: Path, workspace: Path, extra=(), run=None) -> subprocess.CompletedProcess:
    return subprocess.run(_flare_cmd(sites, out, workspace, extra, run), capture_output=True, text=True, timeout=600)


def test_site_entries_match_in_process_seeds(cls_sites, tmp_path):
    from monai_fedkd.site.query import load_query_sites, site_entries

    sites = _sites_json(tmp_path / "sites.json", {"a": cls_sites[0], "b": cls_sites[1]})
    entries = site_entries(sites, seed=5)
    in_process = load_query_sites(sites, seed=5)
    assert [e["name"] for e in entries] == [s.name for s in in_process] == ["a", "b"]
    assert [e["seed"] for e in entries] == [s.seed for s in in_process]
    with pytest.raises(ValueError, match="unique"):
        site_entries([{"name": "a", "dir": str(cls_sites[0][0])}, {"name": "a", "dir": str(cls_sites[1][0])}])


def test_flare_simulator_matches_in_process(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "siteB": cls_sites[1]})
    # sites with the in-process run's CPU thread count: the same float reduction order, so the same bits
    proc = _flare(sites, tmp_path / "flare", tmp_path / "ws", SAME_THREADS)
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


def test_flare_server_killed_then_resumed_matches_uninterrupted(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "siteB": cls_sites[1]})
    run = {**RUN, "iterations": 8, "checkpoint_interval": 2}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_flare_cmd(sites, out, tmp_path / "ws1", SAME_THREADS, run=run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "distill_checkpoint_2.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the FLARE run ended before its first checkpoint"
        time.sleep(0.05)
    # kill -9 the whole FLARE system mid-run: the simulator starts the server and sites in their own sessions
    tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree[1:]), "a FLARE process survived kill -9"
    assert not (out / "models" / "model.pt").exists(), "a killed run must not leave a complete-looking model"
    # restart: the server resumes from its newest checkpoint, each site reloads its own discriminator state
    ok(_flare(sites, out, tmp_path / "ws2", SAME_THREADS, run={**run, "resume": True}))
    ok(run_bundle("central_distillation", "train.json", {"sites": str(sites), "output_dir": str(tmp_path / "reference"), **run}))
    a = torch.load(out / "models" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "models" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after kill -9 and resume")
    assert json.loads((out / "central_card.json").read_text())["iterations"] == 8


def test_flare_fedavg_through_monai_algo(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "siteC": cls_sites[0]})
    proc = subprocess.run([sys.executable, "-m", "monai_fedkd.cli", "flare-fedavg", "--sites", str(sites), "--output-dir", str(tmp_path / "fedavg"),
                           "--workspace", str(tmp_path / "ws"), "--rounds", "2", "--local-epochs", "1"], capture_output=True, text=True, timeout=600)
    ok(proc)
    net, card = load_site_model(tmp_path / "fedavg")
    assert card["role"] == "fedavg" and card["training"]["rounds"] == 2
    # every site trained through its own site bundle, in rounds (its site card counts 2 local epochs)
    for name in ("siteA", "siteC"):
        site_card = json.loads((tmp_path / "fedavg" / "sites" / name / "site_card.json").read_text())
        assert site_card["training"]["epochs"] == 2
    local, _ = load_site_model(cls_sites[0][0])
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), local.state_dict().values()))
    with pytest.raises(ValueError, match="one architecture"):
        from monai_fedkd.transport.flare_fedavg import fedavg_recipe

        fedavg_recipe(_sites_json(tmp_path / "mixed.json", {"siteA": cls_sites[0], "siteB": cls_sites[1]}), "bundles/site_classification", tmp_path)


def test_flare_site_dropping_out_mid_run_is_dropped_and_named(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "siteB": cls_sites[1]})
    run = {**RUN, "iterations": 30, "checkpoint_interval": 2, "drop_failed_sites": True}
    out = tmp_path / "out"
    proc = subprocess.Popen(_flare_cmd(sites, out, tmp_path / "ws", ["--timeout", "20"], run=run), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "distill_checkpoint_2.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the FLARE run ended before its first checkpoint"
        time.sleep(0.05)
    # the simulator runs each site in a worker process started with "--client <name>"
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if " --client siteB" in " ".join(p.cmdline())]
    assert workers, "no FLARE process for siteB found"
    for p in [*workers, *(c for w in workers for c in w.children(recursive=True))]:
        p.kill()  # the hospital's machine goes away mid-run
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    card = json.loads((out / "central_card.json").read_text())
    assert card["sites"]["siteB"]["dropped"] and "siteB" not in card["expertise_weights"], card["sites"]["siteB"]
    assert card["sites"]["siteA"]["dropped"] is None and card["iterations"] == 30


def test_flare_site_missing_its_deadline_is_named(cls_sites, tmp_path):
    sites = _sites_json(tmp_path / "sites.json", {"siteA": cls_sites[0], "siteB": cls_sites[1]})
    proc = _flare(sites, tmp_path / "out", tmp_path / "ws", ["--timeout", "0.001"])
    assert proc.returncode == 1
    assert "timed out" in proc.stderr and "site" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "models" / "model.pt").exists()
