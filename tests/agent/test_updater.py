"""agent.updater smoke tests on malformed vectors: refused, and nothing is left installed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.updater import smoke_test
from edgefleet.protocol.errors import BundleError, SmokeTestError
from edgefleet.protocol.manifest import SmokeVector

from tests.agent.test_store import manifest
from tests.conftest import Fleet, open_agent

RAGGED = SmokeVector(input=((0.0,) * 64, (0.0,) * 63), expected=((0.1,) * 10, (0.1,) * 10))


class ZerosRuntime:
    """A runtime that answers every row with ten zeros."""

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 10), np.float32)


def test_ragged_smoke_rows_are_a_smoke_test_error() -> None:
    """A manifest built in memory (not decoded) can still carry ragged rows."""
    m = dataclasses.replace(manifest(1)[0], smoke=(RAGGED,))
    with pytest.raises(SmokeTestError, match="smoke vector 0"):
        smoke_test(ZerosRuntime(), m)  # type: ignore[arg-type]


def test_signed_release_with_ragged_smoke_rows_is_refused_cleanly(
    fleet: Fleet, tmp_path: Path
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    bundle = tmp_path / "ragged.efb"
    bundle.write_bytes(
        fleet.release(fleet.models["v1"].onnx.read_bytes(), sequence=60, smoke=[RAGGED])
    )
    agent = open_agent(home)
    before = sorted(p.name for p in (home / "store" / "versions").iterdir())
    with pytest.raises(BundleError, match="rows of equal length"):
        agent.install_file(bundle)
    assert agent.last_result()["ok"] is False  # type: ignore[index]
    assert agent.status()["active"]["version"] == "1"
    assert sorted(p.name for p in (home / "store" / "versions").iterdir()) == before
    assert not any((home / "store" / "staging").iterdir())
    agent.close()
