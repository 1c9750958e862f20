"""Operating-system errors during an install (disk full, I/O error) are ``StoreError``s.

The store's checkpoint hook raises ``OSError(ENOSPC)`` at each step before the pointer
switch, as a full disk would there; or a real function (``os.fsync``, ``fsync_dir``) fails.
Each time the install is refused as a ``StoreError`` (code ``store``), recorded in
``last_install.json``, the active model is unchanged, nothing is left in ``staging/`` or
``versions/``, and the same release installs once the disk is back.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import edgefleet.agent.store as store_module
import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.protocol.errors import StoreError

from edgefleet.cli import main
from tests.conftest import NOW, Fleet, open_agent

BEFORE_SWITCH = [
    "staging:created",
    "segment:0",
    "segment:17",
    "version:renamed",
    "version:synced",
    "pointer:before",
]


def disk_full(*_: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def io_error(*_: Any) -> None:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def snapshot(home: Path, agent: Agent, x: np.ndarray) -> dict[str, Any]:
    store = home / "store"
    return {
        "active": agent.status().active,
        "pointer": (store / "ACTIVE.json").read_bytes(),
        "versions": sorted(p.name for p in (store / "versions").iterdir()),
        "predictions": agent.predict(x),
    }


def assert_unchanged(home: Path, agent: Agent, x: np.ndarray, before: dict[str, Any]) -> None:
    after = snapshot(home, agent, x)
    np.testing.assert_array_equal(after.pop("predictions"), before["predictions"])
    assert after == {k: v for k, v in before.items() if k != "predictions"}
    assert not any((home / "store" / "staging").iterdir())
    assert not any((home / "store" / "trash").iterdir())


@pytest.mark.parametrize("label", BEFORE_SWITCH)
def test_disk_full_before_the_switch_is_a_recorded_store_error(
    label: str, fleet: Fleet, tmp_path: Path, x_test: np.ndarray
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home, checkpoint=lambda at: disk_full() if at == label else None)
    before = snapshot(home, agent, x_test)

    with pytest.raises(StoreError, match="No space left on device") as info:
        agent.install_file(fleet.bundles["v2"])

    assert isinstance(info.value.__cause__, OSError)
    last = agent.last_result()
    assert last is not None and (last["ok"], last["code"]) == (False, "store")
    assert_unchanged(home, agent, x_test, before)
    agent.close()
    with open_agent(home) as again:  # the disk has room again: the same release installs
        assert_unchanged(home, again, x_test, before)
        assert again.install_file(fleet.bundles["v2"]).manifest.sequence == 3


def test_failing_fsync_is_a_store_error_and_is_recorded(
    fleet: Fleet, tmp_path: Path, x_test: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``last_install.json`` is a report, written without fsync: it records the failure."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    before = snapshot(home, agent, x_test)
    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(StoreError, match="Input/output error"):
        agent.install_file(fleet.bundles["v2"])
    monkeypatch.undo()
    last = json.loads((home / "last_install.json").read_bytes())
    assert (last["ok"], last["code"]) == (False, "store")
    assert_unchanged(home, agent, x_test, before)
    agent.close()


def test_failing_fsync_is_a_store_error_even_when_it_cannot_be_recorded(
    fleet: Fleet,
    tmp_path: Path,
    x_test: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    before = snapshot(home, agent, x_test)
    (home / "last_install.json").unlink(missing_ok=True)
    (home / "last_install.json").mkdir()  # the report cannot be replaced either
    monkeypatch.setattr(os, "fsync", io_error)
    with (
        caplog.at_level(logging.ERROR, logger="edgefleet.agent.agent"),
        pytest.raises(StoreError, match="Input/output error"),
    ):
        agent.install_file(fleet.bundles["v2"])
    assert any("cannot record" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert_unchanged(home, agent, x_test, before)
    agent.close()


def test_failure_to_prune_after_the_switch_does_not_fail_the_install(
    fleet: Fleet, tmp_path: Path, x_test: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    agent = open_agent(home, checkpoint=lambda at: disk_full() if at == "trash:renamed" else None)
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.store"):
        agent.install_file(fleet.bundles["v3"])  # keep = 2: v1 is pruned
    assert any("prune" in r.getMessage() for r in caplog.records)
    assert agent.status().active.version == "1-tflite"
    assert agent.last_result()["ok"] is True  # type: ignore[index]
    agent.close()
    with open_agent(home) as again:  # the leftover goes on the next open
        assert not any((home / "store" / "trash").iterdir())
        assert [k.version for k in again.status().kept] == ["1-tflite", "2"]
        np.testing.assert_allclose(again.predict(x_test), fleet.expected("v3", x_test), atol=1e-5)


def test_cli_install_on_a_full_disk_exits_2_with_one_line(
    fleet: Fleet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    real_open = Agent.open.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        Agent,
        "open",
        classmethod(  # the CLI at the fixture's time
            lambda cls, h, **kw: real_open(cls, h, clock=lambda: NOW, **kw)
        ),
    )
    monkeypatch.setattr(store_module, "fsync_dir", disk_full)
    capsys.readouterr()

    code = main(["agent", "install", "--home", str(home), str(fleet.bundles["v2"])])

    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("edgefleet: rejected (store): ")
    assert "No space left on device" in err
    monkeypatch.undo()
    with Agent.open(home, readonly=True) as agent:
        status = agent.status().to_dict()
    assert status["active"]["version"] == "1" and status["last_install"]["code"] == "store"
    assert not any((home / "store" / "staging").iterdir())
    assert len(list((home / "store" / "versions").iterdir())) == 1
