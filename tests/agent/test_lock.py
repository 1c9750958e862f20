"""One writer per model store: the store lock, read-only agents, and the CLI next to a daemon.

The daemon (``edgefleet agent run``) holds an exclusive lock on ``store/LOCK`` for as long as
its agent is open. ``agent status`` and in-process ``agent predict`` open the store read-only:
no lock, no recovery of "leftovers" (which may be the daemon's install in progress), no
writes. ``agent install`` / ``agent rollback`` are writers and are refused while the daemon
runs. ``flock`` locks belong to the open file, so two opens in one process conflict as two
processes do: most of these tests need no subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.store import ModelStore
from edgefleet.protocol.errors import StoreError

from edgefleet.cli import main
from tests.agent.test_store import install, manifest, stage
from tests.conftest import NOW, Fleet, open_agent

IN_USE = r"in use by another process \(is `edgefleet agent run` running\?\)"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: any write changes it."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def reader(home: Path) -> Agent:
    return Agent(AgentConfig.load(home), clock=lambda: NOW, readonly=True)


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- the store ---------------------------------------------------------------------------------
def test_a_second_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1 = install(store, 1)
    with pytest.raises(StoreError, match=IN_USE) as info:
        ModelStore(tmp_path)
    assert type(info.value).__name__ == "StoreBusyError" and info.value.code == "store"
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.activate(v1)
    with ModelStore(tmp_path) as again:
        assert again.state == store.state
    ModelStore(tmp_path).close()  # the context manager let go of it


def test_read_only_store_takes_no_lock_and_touches_nothing(tmp_path: Path) -> None:
    writer = ModelStore(tmp_path)
    v1 = install(writer, 1)
    committed = stage(writer, 2)  # a writer's install, between commit and activate
    m3, _ = manifest(3)
    half = writer.begin(m3)  # and another one still staging
    half.write(b"half a model")
    before = tree(tmp_path)

    store = ModelStore(tmp_path, readonly=True)
    assert store.state == writer.state and store.readonly
    active = store.active()
    assert active is not None and active.dir == v1.dir
    assert tree(tmp_path) == before  # nothing "recovered": the writer's work is all there
    for call in (
        lambda: store.begin(m3),
        store.rollback,
        lambda: store.activate(committed),
        lambda: store.discard(committed),
    ):
        with pytest.raises(RuntimeError, match="read-only"):
            call()
    assert tree(tmp_path) == before
    store.close()

    writer.abort(half)
    writer.activate(committed)  # the writer carries on undisturbed
    writer.close()
    assert ModelStore(tmp_path, readonly=True).state.active == committed.dir.name


def test_read_only_store_of_a_fresh_home_creates_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", readonly=True)
    assert store.active() is None and store.kept() == [] and store.state.highest_sequence == 0
    assert not (tmp_path / "store").exists()


# -- agents ------------------------------------------------------------------------------------
def test_writer_agent_holds_the_lock_until_closed(fleet: Fleet, tmp_path: Path) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    daemon = open_agent(home)
    with pytest.raises(StoreError, match=IN_USE):
        open_agent(home)
    daemon.close()
    with open_agent(home) as agent:
        assert agent.active is not None and agent.active.manifest.model_version == "1"
    open_agent(home).close()  # ``with`` closed it


def test_read_only_agent_serves_and_writes_nothing(
    fleet: Fleet, tmp_path: Path, x_test: np.ndarray
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    daemon = open_agent(home)
    before = tree(home)
    with Agent.open(home, readonly=True) as agent:
        assert agent.readonly and agent.status() == daemon.status()
        np.testing.assert_array_equal(agent.predict(x_test), daemon.predict(x_test))
        with pytest.raises(RuntimeError, match="read-only"):
            agent.install_file(fleet.bundles["v3"])
        with pytest.raises(RuntimeError, match="read-only"):
            agent.rollback()
    assert tree(home) == before  # not even last_install.json
    daemon.close()


def test_status_skips_a_kept_version_pruned_while_it_reads(fleet: Fleet, tmp_path: Path) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    observer = reader(home)  # its state still names v1 as kept
    with open_agent(home) as daemon:
        daemon.install_file(fleet.bundles["v3"])  # keep = 2: v1 is pruned
    status = observer.status().to_dict()
    assert status["active"]["version"] == "2"  # what this process serves
    assert [k["version"] for k in status["kept"]] == ["2"]
    observer.close()


# -- the CLI next to a running daemon -----------------------------------------------------------
@pytest.mark.parametrize("label", ["segment:5", "version:renamed"])
def test_cli_status_during_a_daemon_install_leaves_the_install_alone(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str], label: str
) -> None:
    """``agent status`` mid-install used to delete the daemon's staging dir (``segment:5``) or
    its committed, not yet active version (``version:renamed``): the pointer then named a
    missing directory and the device could not start."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    seen: list[dict[str, object]] = []

    def checkpoint(at: str) -> None:
        if at == label:
            code, out, err = cli(capsys, "agent", "status", "--home", home, "--json")
            assert code == 0, err
            seen.append(json.loads(out))

    with open_agent(home, checkpoint=checkpoint) as daemon:
        daemon.install_file(fleet.bundles["v2"])
    assert len(seen) == 1 and seen[0]["active"]["version"] == "1"  # type: ignore[index]
    with open_agent(home) as restarted:  # the device starts, on the new model
        assert restarted.status().active.version == "2"


def test_cli_install_and_rollback_are_refused_while_the_daemon_runs(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the lock, a CLI install of sequence 5 beside a daemon that then installed
    sequence 3 (checked against its stale state) lowered the accepted sequence from 5 to 3."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    daemon = open_agent(home)
    for argv in (("install", "--home", home, fleet.bundles["v3"]), ("rollback", "--home", home)):
        code, out, err = cli(capsys, "agent", *argv)
        assert code == 1 and out == "", err
        assert err.count("\n") == 1 and err.startswith("edgefleet: ")
        assert "stop `edgefleet agent run`" in err
    assert cli(capsys, "agent", "status", "--home", home)[0] == 0  # reading is fine
    daemon.install_file(fleet.bundles["v2"])  # sequence 3
    daemon.close()
    with open_agent(home) as agent:
        assert agent.store.state.highest_sequence == 3
        assert agent.last_result()["sequence"] == 3  # type: ignore[index]
    code, out, err = cli(capsys, "agent", "rollback", "--home", home)  # the daemon is gone
    assert code == 0 and out.startswith("rolled back: digits 1"), err


def test_cli_install_in_another_process_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    with open_agent(home):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgefleet",
                "agent",
                "install",
                "--home",
                str(home),
                str(fleet.bundles["v2"]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and "stop `edgefleet agent run`" in done.stderr
