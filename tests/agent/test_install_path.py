"""The install path's work, counted: fsyncs, hashes per segment, parallel opening, status cache.

An install hashes each segment once (none again for a finished download, which checked them on
arrival), fsyncs seven times (model, manifest, signature, staged directory, ``versions/``, the
pointer's file and the store root), opens segments on a bounded pool when given several
workers, and reports the same first failing segment whatever the worker count.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import edgefleet.agent.opener as opener_module
import numpy as np
import pytest
from edgefleet.agent.download import Download
from edgefleet.agent.opener import SegmentOpener
from edgefleet.agent.store import ModelStore
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.errors import DecryptError, IntegrityError
from edgefleet.protocol.messages import ChunkReply
from edgefleet.protocol.segments import SegmentCipher

from tests.agent.releases import Release
from tests.agent.test_tamper import edited_manifest, payload_byte, xor
from tests.conftest import Fleet, open_agent

INSTALL_FSYNCS = 7  # model, manifest.json, manifest.sig, staged dir, versions/, pointer, root


class Counter:
    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        with self._lock:
            self.calls += 1
        return self.real(*args)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counter = Counter(os.fsync)
    monkeypatch.setattr(os, "fsync", counter)
    return counter


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counter = Counter(opener_module._sha256)
    monkeypatch.setattr(opener_module, "_sha256", counter)
    return counter


def downloaded(release: Release, part: Path) -> Download:
    d = Download(release.manifest, part, "reply")
    for i in range(release.manifest.segments):
        assert d.accept(ChunkReply.decode(release.chunk(i), max_data=1 << 20))
    assert d.done and d.verified
    return d


def snapshot(home: Path) -> tuple[bytes, list[str], list[str]]:
    store = home / "store"
    return ((store / "ACTIVE.json").read_bytes(), sorted(os.listdir(store / "versions")),
            os.listdir(store / "staging"))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_install_hashes_each_segment_once_and_fsyncs_seven_times(
        workers: int, fleet: Fleet, tmp_path: Path, x_test: np.ndarray, fsyncs: Counter,
        hashes: Counter) -> None:
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    agent.updater.workers = workers
    fsyncs.calls = hashes.calls = 0
    version = agent.install_file(fleet.bundles["v2"])
    assert version.manifest.segments >= 30
    assert hashes.calls == version.manifest.segments
    assert fsyncs.calls == INSTALL_FSYNCS
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v2", x_test), atol=1e-5)
    agent.close()


def test_a_finished_download_is_not_hashed_again(
        fleet: Fleet, tmp_path: Path, x_test: np.ndarray, fsyncs: Counter,
        hashes: Counter) -> None:
    release = Release(fleet.bundle_bytes("v2"))
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    download = downloaded(release, tmp_path / "v2.part")
    hashes.calls = fsyncs.calls = 0
    agent.install(release.offer, download)
    download.close()
    assert hashes.calls == 0
    assert fsyncs.calls == INSTALL_FSYNCS  # the part file is a cache: never fsynced
    assert agent.status().active.version == "2"  # type: ignore[union-attr]
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v2", x_test), atol=1e-5)
    agent.close()


def test_a_part_file_changed_after_its_download_fails_aes_gcm(
        fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    release = Release(fleet.bundle_bytes("v2"))
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    before = snapshot(home)
    part = tmp_path / "v2.part"
    download = downloaded(release, part)
    off, _ = release.manifest.segment_span(5)
    with open(part, "r+b") as f:  # e.g. bit rot between the download and the install
        f.seek(off + 7)
        f.write(bytes([f.read(1)[0] ^ 0x04]))
    with pytest.raises(DecryptError, match="segment 5 "):
        agent.install(release.offer, download)
    download.close()
    assert snapshot(home) == before
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v1", x_test), atol=1e-5)
    agent.close()


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_the_first_failing_segment_is_reported_whatever_the_workers(
        workers: int, fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    data = fleet.bundle_bytes("v2")
    for i in (30, 9):  # the later one fails first in any pool that runs ahead
        data = xor(data, payload_byte(data, i, "middle"), 0x10)
    bundle = tmp_path / "bad.efb"
    bundle.write_bytes(data)
    agent = open_agent(home)
    agent.updater.workers = workers
    before = snapshot(home)
    for _ in range(3):
        with pytest.raises(IntegrityError, match="^segment 9: "):
            agent.install_file(bundle)
        assert snapshot(home) == before  # nothing half-installed, staging empty
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v1", x_test), atol=1e-5)
    agent.close()


class CountingSource:
    """Counts the segments read so far (from any thread)."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.reads = payload, 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.reads += 1
        return self.payload[offset: offset + length]


def test_the_pool_reads_ahead_a_bounded_number_of_segments(
        fleet: Fleet, tmp_path: Path) -> None:
    """While the caller holds on to segment 0's result, the pool reads at most
    ``in_flight`` segments: it cannot run ahead and fill memory."""
    release = Release(fleet.bundle_bytes("v2"))
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    m = release.manifest
    content = unwrap_key(release.offer.envelope, agent.identity.kem, bundle_id=m.bundle_id)
    cipher = SegmentCipher(content, bytes.fromhex(m.bundle_id), m.segment_size)
    source = CountingSource(release.payload)
    order: list[int] = []
    ahead: list[int] = []

    def done(i: int) -> None:
        if i == 0:  # the pool had every chance to run ahead meanwhile
            for _ in range(200):
                threading.Event().wait(0.001)
                ahead.append(source.reads)
        order.append(i)

    fd = os.open(tmp_path / "model", os.O_RDWR | os.O_CREAT, 0o600)
    written, digest = SegmentOpener(m, cipher, verified=False).open_into(
        source, fd, workers=2, done=done)
    os.close(fd)
    assert written == m.plaintext_size and order == list(range(m.segments))
    assert digest == m.plaintext_sha256  # hashed beside the workers
    assert max(ahead) == 4  # 2 x workers in flight: segments 0-3 (IN_FLIGHT_BYTES allows it)
    assert opener_module.IN_FLIGHT_BYTES // (2 * m.segment_size) >= 4
    agent.close()


def test_status_reads_nothing_until_the_store_changes(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    assert [k.version for k in agent.status().kept] == ["1"]
    reads = Counter(ModelStore.kept)
    monkeypatch.setattr(ModelStore, "kept", lambda self: reads(self))
    for _ in range(5):
        assert [k.version for k in agent.status().kept] == ["1"]
    assert reads.calls == 0
    agent.install_file(fleet.bundles["v2"])
    for _ in range(3):
        assert [k.version for k in agent.status().kept] == ["2", "1"]
    assert reads.calls == 1  # once after the install, then cached again
    agent.rollback()
    assert [k.version for k in agent.status().kept] == ["1"] and reads.calls == 2
    agent.close()


def test_kept_manifests_are_not_read_from_disk_once_known(
        fleet: Fleet, tmp_path: Path) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    agent.install_file(fleet.bundles["v2"])
    for v in (home / "store" / "versions").iterdir():  # only this test would do this
        (v / "manifest.json").unlink()
    assert [k.version for k in agent.status().kept] == ["2", "1"]
    assert [k.manifest.model_version for k in agent.store.kept()] == ["2", "1"]
    agent.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_signed_but_wrong_plaintext_digest_is_caught_either_way(
        workers: int, fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    """Workers hash the plaintext as it comes back; one core hashes the file during the fsync."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    bundle = tmp_path / "bad.efb"
    bundle.write_bytes(edited_manifest(fleet, fleet.bundle_bytes("v2"),
                                       lambda m: m.update(plaintext_sha256="0" * 64)))
    agent = open_agent(home)
    agent.updater.workers = workers
    before = snapshot(home)
    with pytest.raises(IntegrityError, match="^plaintext: "):
        agent.install_file(bundle)
    assert snapshot(home) == before
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v1", x_test), atol=1e-5)
    agent.close()
