"""``edgefleet demo`` end to end, as a user runs it: one subprocess, about 20 s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)


def test_demo_runs_and_only_the_canary_switches(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "demo", "--workdir", str(workdir)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "only the canary group switched to v2: device-3" in out, out[-4000:]
    assert "demo finished" in out
    for dev in ("device-1", "device-2", "device-3"):
        assert (workdir / dev / "last_install.json").exists()
