"""``edgefleet demo --fl`` end to end, as a user runs it (``make demo DEMO_ARGS=--fl``): one
subprocess. The release part (v1 to all, v2 to the canary group only), then the FL part: the
agents opt in with their own non-IID partitions, 2 Flower rounds register 2 versions, and the
last one is released to every agent and served over its local HTTP API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from edgefleet.coordinator.home import Coordinator

pytestmark = pytest.mark.timeout(600)


def test_demo_runs_only_the_canary_switches_then_fl_rounds_are_served(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "demo", "--workdir", str(workdir),
                           "--fl", "--fl-rounds", "2"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=590)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "only the canary group switched to v2: device-3" in out, out[-4000:]
    assert "demo finished" in out
    for dev in ("device-1", "device-2", "device-3"):
        assert (workdir / dev / "last_install.json").exists()
    # the FL part: a progress line per round, a version per round, released to all, served
    rounds = re.findall(r"^round (\d)/2 \[.*\] [\d.]+ s version (\d): 3 devices", out, re.M)
    assert rounds == [("1", "1"), ("2", "2")], out[-4000:]
    assert "release 3: digits-fl 2 to 3 devices" in out
    served = re.search(r"digits-fl 2 served by 3 agents: test accuracy ([\d.]+)", out)
    assert served is not None and float(served.group(1)) > 0.5, out[-2000:]
    c = Coordinator.open(workdir / "coordinator")
    try:
        fl = [m for m in c.registry.models() if m.name == "digits-fl"]
        assert [m.lineage["parent"] for m in fl] == [None, "1"]
        assert {d.device_id: d.active_version for d in c.registry.devices()} == {
            "device-1": "2", "device-2": "2", "device-3": "2"}
        assert {d.active_name for d in c.registry.devices()} == {"digits-fl"}
    finally:
        c.registry.engine.dispose()
