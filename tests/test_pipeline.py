"""How the pipeline runs a bundle in a process of its own: its wall time, its own peak memory, its failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monai_fedkd import pipeline

# a child that touches about 64 MB of its own, then exits with the code it is given
CHILD = "import sys; x = bytearray(64 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('child ran'); sys.exit(int(sys.argv[1]))"


def test_peak_is_the_childs_own_not_the_parents(tmp_path):
    held = bytearray(512 * 2**20)  # this process's resident set, which a plain fork + exec would pass on
    held[::4096] = b"1" * len(held[::4096])
    before = len(pipeline.CHILD_PEAKS_MB)
    pipeline.run_logged([sys.executable, "-c", CHILD, "0"], tmp_path / "child.log", "child")
    (what, peak_mb), = pipeline.CHILD_PEAKS_MB[before:]
    assert what == "child" and 64 <= peak_mb < 256, peak_mb
    assert "child ran" in (tmp_path / "child.log").read_text()
    del held


def test_a_failing_child_raises_with_its_exit_code_and_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)child failed \(exit 3\).*child ran"):
        pipeline.run_logged([sys.executable, "-c", CHILD, "3"], tmp_path / "child.log", "child")


def test_a_none_override_reaches_the_bundle_config(tmp_path):
    """``monai.bundle run`` drops a top-level ``--key None``; the pipeline's command line must still set None."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"value": "default", "kept": 1, "run": ["$print('VALUE=' + repr(@value) + ' KEPT=' + repr(@kept))"]}))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    cmd += ["--value", pipeline._cli_value(None), "--kept", pipeline._cli_value(2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "VALUE=None KEPT=2" in proc.stdout
