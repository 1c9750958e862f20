"""Crash consistency: SIGKILL an installing (or rolling back) agent at every store checkpoint.

A child process (``crash_child.py``) runs the real ``Agent`` with a checkpoint hook that kills
the process at the Nth filesystem step or decrypted segment. After each kill the store must
open, exactly one complete version must be active — the old one up to the pointer write, the
new one from then on — it must predict like its scikit-learn original, leftovers must be gone,
and the interrupted operation must be repeatable.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from edgefleet.protocol.errors import RollbackError, StoreError

from tests.conftest import NOW, Fleet, open_agent

CHILD = Path(__file__).with_name("crash_child.py")
WORKERS = 2  # children are mostly interpreter start-up; two at a time keep both cores busy


@dataclass(frozen=True)
class Scenario:
    id: str
    installed: tuple[str, ...]  # bundles installed before the child starts
    action: str  # a bundle name, or "rollback"
    before: str  # active bundle if the kill came before the pointer switch
    after: str  # active bundle once the pointer was switched
    every_point: bool  # kill at every checkpoint, or only at the structural ones


SCENARIOS = [
    Scenario("install", ("v1",), "v2", "v1", "v2", every_point=True),
    Scenario("install-with-prune", ("v1", "v2"), "v3", "v2", "v3", every_point=False),
    Scenario("rollback", ("v1", "v2"), "rollback", "v2", "v1", every_point=True),
]
STRUCTURAL = ("staging:created", "segment:0", "segment:17", "version:renamed",
              "version:synced", "pointer:before", "pointer:after", "trash:renamed")
MODEL_VERSION = {"v1": "1", "v2": "2", "v3": "1-tflite"}


def run_child(home: Path, action: str, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHILD), str(home), action, str(kill_at), str(NOW)],
                          capture_output=True, text=True, timeout=120, check=False)


def action_arg(fleet: Fleet, s: Scenario) -> str:
    return "rollback" if s.action == "rollback" else str(fleet.bundles[s.action])


def measure(fleet: Fleet, s: Scenario, tmp: Path) -> list[str]:
    """The checkpoint labels of one uninterrupted run."""
    home = fleet.agent_home(tmp / "measure", installed=s.installed)
    done = run_child(home, action_arg(fleet, s), 0)
    assert done.returncode == 0, done.stderr
    labels: list[str] = json.loads(done.stdout)
    assert labels[-1] in ("pointer:after", "trash:renamed")
    return labels


def check_recovered(fleet: Fleet, s: Scenario, home: Path, expected: str,
                    x: np.ndarray) -> None:
    agent = open_agent(home)
    status = agent.status().to_dict()
    assert status["active"] is not None, "no version is active after the crash"
    assert status["active"]["version"] == MODEL_VERSION[expected]
    assert status["active"]["version"] in {MODEL_VERSION[s.before], MODEL_VERSION[s.after]}
    out = agent.predict(x)
    want = fleet.expected(expected, x)
    np.testing.assert_array_equal(out.argmax(axis=1), want.argmax(axis=1))
    np.testing.assert_allclose(out, want, atol=1e-5)
    store = home / "store"
    assert not any((store / "staging").iterdir()) and not any((store / "trash").iterdir())
    on_disk = sorted(p.name for p in (store / "versions").iterdir())
    assert on_disk == sorted(agent.store.state.history)
    assert agent.store.state.active == agent.store.state.history[0]
    # the interrupted operation can be carried out (or is already done)
    if s.action == "rollback":
        if expected == s.before:
            assert agent.rollback().manifest.model_version == MODEL_VERSION[s.after]
        else:
            with pytest.raises(StoreError):
                agent.rollback()
    elif expected == s.before:
        agent.install_file(fleet.bundles[s.action])
        assert agent.status().active.version == MODEL_VERSION[s.after]
    else:
        with pytest.raises(RollbackError):
            agent.install_file(fleet.bundles[s.action])
    agent.close()


@pytest.fixture(scope="module")
def measured(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    return {s.id: measure(fleet, s, tmp_path_factory.mktemp(s.id)) for s in SCENARIOS}


def test_kill_points_cover_the_whole_install(measured: dict[str, list[str]]) -> None:
    """Every step of an install is a checkpoint: at least 50 distinct kill points in total."""
    install = measured["install"]
    assert install[0] == "staging:created" and install[-2:] == ["pointer:before", "pointer:after"]
    segments = [label for label in install if label.startswith("segment:")]
    assert len(segments) >= 30 and segments == [f"segment:{i}" for i in range(len(segments))]
    assert measured["install-with-prune"][-1] == "trash:renamed"
    assert measured["rollback"] == ["pointer:before", "pointer:after", "trash:renamed"]
    assert len(install) + len(measured["rollback"]) + len(STRUCTURAL) >= 50


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_sigkill_at_each_checkpoint_leaves_one_working_version(
        s: Scenario, fleet: Fleet, measured: dict[str, list[str]], tmp_path: Path,
        x_test: np.ndarray) -> None:
    labels = measured[s.id]
    if s.every_point:
        points = list(range(1, len(labels) + 1))
    else:
        points = [labels.index(label) + 1 for label in STRUCTURAL if label in labels]
        assert "trash:renamed" in labels  # this install prunes the oldest version
    if s.action != "rollback":
        assert sum(label.startswith("segment:") for label in labels) >= 30
    homes = {n: fleet.agent_home(tmp_path / f"kill-{n}", installed=s.installed) for n in points}
    with ThreadPoolExecutor(WORKERS) as pool:
        results = dict(zip(points, pool.map(
            lambda n: run_child(homes[n], action_arg(fleet, s), n), points), strict=True))
    switched_at = labels.index("pointer:after") + 1
    for n in points:
        assert results[n].returncode == -signal.SIGKILL, (n, labels[n - 1], results[n].stderr)
        expected = s.after if n >= switched_at else s.before
        check_recovered(fleet, s, homes[n], expected, x_test)

