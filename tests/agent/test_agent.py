"""The Agent facade: install, status, rollback, network-path install, fallback at start-up."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import edgefleet.agent.agent as agent_module
import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.runtime import Runtime, RuntimeLoadError
from edgefleet.agent.updater import AlreadyAcceptedError
from edgefleet.protocol.container import HEADER_SIZE, decode_envelopes, parse_header
from edgefleet.protocol.errors import RollbackError, StoreError
from edgefleet.protocol.messages import ReleaseOffer

from tests.agent.releases import Release
from tests.conftest import Fleet, open_agent


class BytesSource:
    """An in-memory ``SegmentSource`` (what a finished download looks like to the updater)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.payload[offset: offset + length]


def offer_parts(data: bytes) -> dict[str, bytes]:
    layout = parse_header(data[:HEADER_SIZE], file_size=len(data), max_payload=1 << 40)
    return {n: data[layout[n][0]: layout[n][0] + layout[n][1]] for n in layout.spans}


def test_install_rollback_and_status(fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    agent.install_file(fleet.bundles["v2"])
    typed = agent.status()
    assert typed.active is not None and typed.active.version == "2"
    assert typed.last_install is not None and typed.last_install.ok
    status = json.loads(json.dumps(typed.to_dict()))  # plain JSON for `agent status --json`
    assert set(status) == {"device_id", "active", "highest_sequence", "keyring_version", "kept",
                           "last_install", "broken"}
    assert status["broken"] is None
    assert set(status["active"]) == {"name", "version", "sequence", "format", "bundle_id"}
    assert status["device_id"] == "dev-a" and status["keyring_version"] == 1
    assert status["active"]["version"] == "2" and status["highest_sequence"] == 3
    assert [k["version"] for k in status["kept"]] == ["2", "1"]
    assert status["last_install"]["ok"] is True and status["last_install"]["sequence"] == 3

    assert agent.rollback().manifest.model_version == "1"
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v1", x_test), atol=1e-5)
    status = agent.status().to_dict()
    assert status["last_install"]["code"] == "rollback"
    assert [k["version"] for k in status["kept"]] == ["1"]
    assert status["highest_sequence"] == 3  # the rolled-back release stays refused
    with pytest.raises(RollbackError, match="rolled back locally"):
        agent.install_file(fleet.bundles["v2"])
    with pytest.raises(StoreError):
        agent.rollback()
    agent.close()


def test_a_release_already_here_is_current_not_a_rollback(
        fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Re-installing the active bundle used to say "rollback"; so did the retained offer of the
    release a local rollback left. Both are "already have it": code ``current``, nothing
    recorded, nothing logged above INFO; an older release nobody accepted stays a rollback."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    with caplog.at_level(logging.INFO), open_agent(home) as agent:
        last = agent.last_install
        cases = [("v2", r"already installed \(active\)", "2"), ("v1", "kept, not active", "1")]
        for bundle, words, version in cases:
            with pytest.raises(AlreadyAcceptedError, match=words) as info:
                agent.install_file(fleet.bundles[bundle])
            assert info.value.code == "current" and info.value.version is not None
            assert info.value.version.manifest.model_version == version
        v2_offer = Release(fleet.bundle_bytes("v2")).offer
        with pytest.raises(AlreadyAcceptedError):
            agent.updater.check(v2_offer)
        with pytest.raises(RollbackError) as replay:  # over the air a kept, older one: a replay
            agent.updater.check(Release(fleet.bundle_bytes("v1")).offer)
        assert type(replay.value) is RollbackError
        agent.rollback()
        last = agent.last_install
        with pytest.raises(AlreadyAcceptedError, match="rolled back locally") as info:
            agent.updater.check(v2_offer)  # the retained offer after the rollback
        assert info.value.version is None
        assert agent.last_install == last  # nothing recorded
        with pytest.raises(RollbackError) as older:
            agent.install_file(fleet.bundles["old"])
        assert type(older.value) is RollbackError and older.value.code == "rollback"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and "current" in r.getMessage()] == []


def test_a_successful_install_leaves_an_info_line(
        fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.agent"), open_agent(home) as agent:
        agent.install_file(fleet.bundles["v2"])
    lines = [r.getMessage() for r in caplog.records if r.name == "edgefleet.agent.agent"]
    assert lines == ["installed digits 2 (release 3, onnx): active"]


def test_network_install_through_a_segment_source(fleet: Fleet, tmp_path: Path,
                                                  x_test: np.ndarray) -> None:
    parts = offer_parts(fleet.bundle_bytes("v2"))
    mine = next(e for e in decode_envelopes(parts["envelopes"]) if e.device_id == "dev-a")
    offer = ReleaseOffer(keyring=parts["keyring"], keyring_sig=parts["keyring_sig"],
                         manifest=parts["manifest"], signature=parts["signature"], envelope=mine)
    source = BytesSource(parts["payload"])
    progress: list[tuple[int, int]] = []
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    manifest = agent.updater.check(offer)
    agent.install(offer, source, progress=lambda done, total: progress.append((done, total)))
    assert agent.status().active.sequence == manifest.sequence == 3
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v2", x_test), atol=1e-5)
    assert len(source.reads) == manifest.segments
    assert progress[-1] == (manifest.payload_size, manifest.payload_size)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    agent.close()


def test_start_up_falls_back_when_the_active_model_no_longer_loads(
        fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    agent = open_agent(home)
    active = agent.store.active()
    assert active is not None
    agent.close()
    active.model_path.write_bytes(b"bit rot")
    agent = open_agent(home)
    assert agent.status().active.version == "1"
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v1", x_test), atol=1e-5)
    agent.close()


def test_start_up_without_a_loadable_version_serves_nothing_and_can_be_repaired(
        fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    """A corrupt active model used to brick the device: the agent refused to open."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    active = agent.store.active()
    assert active is not None
    agent.close()
    active.model_path.write_bytes(b"bit rot")
    before = _versions(home)
    with open_agent(home) as agent:
        assert agent.active is None and agent.broken is not None
        assert "does not load" in agent.broken
        status = agent.status()
        assert status.active is None and status.broken == agent.broken
        assert status.to_dict()["broken"] == agent.broken
        for call in (agent.predict, agent.predict_versioned):
            with pytest.raises(RuntimeError, match="no working model"):
                call(x_test)
        assert _versions(home) == before  # nothing deleted
        agent.install_file(fleet.bundles["v2"])  # a valid newer release repairs it
        assert agent.broken is None and agent.status().broken is None
        np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v2", x_test), atol=1e-5)


def test_a_missing_active_version_directory_does_not_brick_the_device(
        fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    """The store used to refuse to open when the active version's directory was gone."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    active = agent.store.active()
    assert active is not None
    agent.close()
    shutil.rmtree(active.dir)
    with open_agent(home) as agent:
        assert agent.active is None and agent.broken is not None
        agent.install_file(fleet.bundles["v2"])  # a valid newer release repairs it
        assert agent.broken is None
        np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v2", x_test), atol=1e-5)


def _versions(home: Path) -> dict[str, bytes | None]:
    """The store but its lock file (which names the writer while one holds it)."""
    return {k: v for k, v in _store_files(home).items() if k != "LOCK"}


def _store_files(home: Path) -> dict[str, bytes | None]:
    store = home / "store"
    return {str(p.relative_to(store)): p.read_bytes() if p.is_file() else None
            for p in sorted(store.rglob("*"))}


def test_start_up_falls_back_by_moving_the_pointer_only(
        fleet: Fleet, tmp_path: Path, x_test: np.ndarray, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The runtime of the active model will not load (LiteRT broken): serve the older ONNX
    version, keep both; restarting used to delete the newest version for good."""
    home = fleet.agent_home(tmp_path / "home", installed=["v2", "v3"])  # v3: TFLite, active
    real = agent_module.load_runtime

    def no_litert(path: Path, fmt: str | None = None, threads: int = 1) -> Runtime:
        if fmt == "tflite":
            raise RuntimeLoadError("cannot load TFLite models: ai_edge_litert is broken")
        return real(path, fmt, threads)

    monkeypatch.setattr(agent_module, "load_runtime", no_litert)
    before = _store_files(home)
    with Agent.open(home, readonly=True) as observer:  # serves v2, changes nothing
        assert observer.status().active.version == "2"
    assert _store_files(home) == before

    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.agent"):
        agent = open_agent(home)
    assert any("does not load" in r.getMessage() for r in caplog.records)
    status = agent.status().to_dict()
    assert status["active"]["version"] == "2" and status["highest_sequence"] == 5
    assert [k["version"] for k in status["kept"]] == ["2", "1-tflite"]  # both still kept
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v2", x_test), atol=1e-5)
    agent.close()


def test_start_up_with_no_loadable_version_changes_nothing(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    real = agent_module.load_runtime

    def no_runtime(path: Path, fmt: str | None = None, threads: int = 1) -> Runtime:
        raise RuntimeLoadError("cannot load ONNX models: onnxruntime is not installed")

    before = _store_files(home)
    with monkeypatch.context() as mp:
        mp.setattr(agent_module, "load_runtime", no_runtime)
        with open_agent(home) as broken:
            assert broken.active is None and "onnxruntime is not installed" in str(broken.broken)
    assert _store_files(home) == before  # not one version trashed
    assert agent_module.load_runtime is real
    with open_agent(home) as agent:  # the runtime is back: so is the newest model
        assert agent.status().active.version == "2"


def test_predict_versioned_reads_one_snapshot(fleet: Fleet, tmp_path: Path,
                                              x_test: np.ndarray) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    with open_agent(home) as agent:
        version, out = agent.predict_versioned(x_test)
        assert version is agent.active and version.manifest.model_version == "2"
        np.testing.assert_array_equal(out, agent.predict(x_test))
        older = agent.store.kept()[1]
        agent._swap(older, agent_module.load_runtime(older.model_path, "onnx"))
        version, out = agent.predict_versioned(x_test)
        assert version.manifest.model_version == "1"
        np.testing.assert_allclose(out, fleet.expected("v1", x_test), atol=1e-5)
    with pytest.raises(RuntimeError, match="no model is active"):
        agent.predict_versioned(x_test)
