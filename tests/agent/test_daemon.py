"""AgentDaemon decisions without a broker: the worker's handlers are driven directly.

The daemon is built but not started, so its MQTT link never connects (reports are skipped
while disconnected) and each test feeds offers and chunk replies to ``_handle`` as the worker
thread would, or to ``_on_message`` / ``_on_connect`` as paho's network thread would.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.daemon import MAX_CHUNK_FRAME, MAX_INCOMING, AgentDaemon, mqtt_config_for
from edgefleet.infra.link.mqtt import HEADER_ALLOWANCE, MessageProps, MqttConfig
from edgefleet.protocol.container import HEADER_SIZE, decode_envelopes, parse_header
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import MAX_OFFER, ChunkReply, ReleaseOffer
from edgefleet.protocol.segments import MAX_SEGMENT

from tests.conftest import Fleet, open_agent

DEVICE = "dev-a"
PROPS = MessageProps(qos=1, retain=False)
TOPIC = f"ef/v1/dev/{DEVICE}"


class Release:
    """An ``.efb`` split into what the coordinator sends: the offer and the chunk replies."""

    def __init__(self, efb: bytes, device: str = DEVICE) -> None:
        layout = parse_header(efb[:HEADER_SIZE], file_size=len(efb), max_payload=1 << 30)

        def section(name: str) -> bytes:
            off, length = layout[name]
            return efb[off : off + length]

        self.offer = ReleaseOffer(
            keyring=section("keyring"),
            keyring_sig=section("keyring_sig"),
            manifest=section("manifest"),
            signature=section("signature"),
            envelope=next(
                e for e in decode_envelopes(section("envelopes")) if e.device_id == device
            ),
        )
        self.manifest = Manifest.decode(self.offer.manifest)
        self.payload = section("payload")

    def chunk(self, i: int) -> bytes:
        off, length = self.manifest.segment_span(i)
        return ChunkReply(
            bundle_id=self.manifest.bundle_id,
            index=i,
            corr=f"{i}.1",
            data=self.payload[off : off + length],
        ).encode()


class Recorded:
    """Counts ``Agent.record`` calls (what the daemon reports as its last result)."""

    def __init__(self, agent: Agent) -> None:
        self.calls: list[dict[str, Any]] = []
        self._record = agent.record
        agent.record = self  # type: ignore[method-assign]

    def __call__(self, **result: Any) -> None:
        self.calls.append(result)
        self._record(**result)

    @property
    def codes(self) -> list[str]:
        return [c["code"] for c in self.calls]


@pytest.fixture
def agent(fleet: Fleet, tmp_path: Path) -> Agent:
    a = open_agent(fleet.agent_home(tmp_path / "home", DEVICE, installed=("v1",)))
    yield a  # type: ignore[misc]
    a.close()


class Observed(AgentDaemon):
    """Counts what the worker thread has finished handling, so a test can wait for it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()

    def _handle(self, kind: str, payload: Any) -> None:
        try:
            super()._handle(kind, payload)
        finally:
            with self._cond:
                self.handled[kind] += 1
                self._cond.notify_all()

    def run_until_handled(self, kind: str, count: int) -> None:
        """Run the worker thread alone (no link) until it handled ``count`` ``kind`` items."""
        self._thread.start()
        try:
            with self._cond:
                assert self._cond.wait_for(lambda: self.handled[kind] >= count, 10.0), self.handled
        finally:
            self._stop.set()
            self._thread.join(10)


def daemon_for(agent: Agent, **kwargs: Any) -> Observed:
    return Observed(agent, MqttConfig(url="mqtt://127.0.0.1:1", client_id="agent-dev-a"), **kwargs)


def deliver(d: AgentDaemon, release: Release) -> None:
    """Every chunk reply, as the worker thread would handle them."""
    for i in range(release.manifest.segments):
        d._handle("chunk", release.chunk(i))


def parts(agent: Agent) -> list[str]:
    return sorted(p.name for p in (agent.config.home / "downloads").glob("*.part"))


# -- offers ------------------------------------------------------------------------------------


def test_genuine_release_downloads_and_installs(fleet: Fleet, agent: Agent) -> None:
    d = daemon_for(agent)
    v2 = Release(fleet.bundle_bytes("v2"))
    d._handle("release", v2.offer.encode())
    assert d._download is not None and parts(agent) == [f"{v2.manifest.bundle_id}.part"]
    deliver(d, v2)
    assert d.installed.is_set() and d._download is None and parts(agent) == []
    assert agent.status()["active"]["sequence"] == v2.manifest.sequence


def test_offer_whose_envelope_does_not_match_the_manifest_is_rejected_before_download(
    fleet: Fleet, agent: Agent
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    other = Release(fleet.bundle_bytes("v2"), device="dev-b").offer.envelope
    forged = [  # the envelope is not signed itself; only its digest in the manifest is
        Envelope(device_id=DEVICE, kem=other.kem, sealed=other.sealed),  # dev-b's, relabelled
        Envelope(device_id=DEVICE, kem=v2.offer.envelope.kem, sealed=b"\x01" * 64),
    ]
    d = daemon_for(agent)
    recorded = Recorded(agent)
    for envelope in forged:
        offer = ReleaseOffer(**{**vars(v2.offer), "envelope": envelope})
        d._handle("release", offer.encode())
        assert d._download is None and parts(agent) == []
    assert recorded.codes == ["integrity", "integrity"]
    assert "digest does not match" in agent.last_result()["reason"]  # type: ignore[index]

    # Not remembered as failed: the genuine offer (same signed manifest) still installs.
    d._handle("release", v2.offer.encode())
    deliver(d, v2)
    assert d.installed.is_set()


def test_failed_install_is_not_fetched_again_on_redelivery(
    fleet: Fleet, agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgefleet.agent.daemon")
    bad = Release(fleet.release(b"this is not an ONNX model", sequence=10))
    d = daemon_for(agent)
    recorded = Recorded(agent)
    d._handle("release", bad.offer.encode())
    deliver(d, bad)
    assert not d.installed.is_set() and recorded.codes == ["model_load"]
    before = agent.last_result()

    d._handle("release", bad.offer.encode())  # the retained offer again, after a reconnect
    assert d._download is None and parts(agent) == []
    assert recorded.codes == ["model_load"] and agent.last_result() == before  # kept as is
    assert "failed here before (model_load)" in caplog.text

    # A new release is fetched; so is the failed one after a restart (a fresh daemon).
    v2 = Release(fleet.bundle_bytes("v2"))
    d._handle("release", v2.offer.encode())
    assert d._download is not None and d._download.manifest.bundle_id == v2.manifest.bundle_id
    d._download.close()
    fresh = daemon_for(agent)
    fresh._handle("release", bad.offer.encode())
    assert fresh._download is not None
    fresh._download.close()


def test_failed_bundles_are_remembered_up_to_a_bound(fleet: Fleet, agent: Agent) -> None:
    d = daemon_for(agent, remember_failed=2)
    bad = [Release(fleet.release(b"not a model %d" % i, sequence=10 + i)) for i in range(3)]
    for r in bad:
        d._handle("release", r.offer.encode())
        deliver(d, r)
    assert list(d._failed) == [bad[1].manifest.bundle_id, bad[2].manifest.bundle_id]


# -- disk trouble ------------------------------------------------------------------------------


def _disk_full(*_: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_abandons_the_download_reports_store_and_does_not_retry(
    fleet: Fleet, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    d = daemon_for(agent)
    recorded = Recorded(agent)
    d._handle("release", v2.offer.encode())
    assert d._download is not None
    monkeypatch.setattr(os, "pwrite", _disk_full)
    d._handle("chunk", v2.chunk(0))
    assert d._download is None and d._state == "idle" and parts(agent) == []
    assert recorded.codes == ["store"]
    assert "No space left on device" in recorded.calls[0]["reason"]

    d._handle("release", v2.offer.encode())  # re-delivered: not fetched again
    assert d._download is None and recorded.codes == ["store"]

    monkeypatch.undo()  # space freed, agent restarted: it tries again and installs
    fresh = daemon_for(agent)
    fresh._handle("release", v2.offer.encode())
    deliver(fresh, v2)
    assert fresh.installed.is_set()


def test_disk_full_when_starting_a_download_is_reported_as_store(
    fleet: Fleet, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    d = daemon_for(agent)
    recorded = Recorded(agent)
    monkeypatch.setattr(os, "ftruncate", _disk_full)
    d._handle("release", v2.offer.encode())
    assert d._download is None and recorded.codes == ["store"]
    d._handle("release", v2.offer.encode())
    assert recorded.codes == ["store"]


def test_read_error_while_installing_is_reported_as_store(
    fleet: Fleet, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    d = daemon_for(agent)
    recorded = Recorded(agent)
    d._handle("release", v2.offer.encode())
    for i in range(v2.manifest.segments - 1):
        d._handle("chunk", v2.chunk(i))

    def broken(*_: object) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", broken)
    d._handle("chunk", v2.chunk(v2.manifest.segments - 1))  # complete: installs, reads fail
    assert not d.installed.is_set() and d._download is None
    assert recorded.codes == ["store"] and d._failed == {v2.manifest.bundle_id: "store"}
    assert agent.status()["active"]["sequence"] == 2  # still v1


# -- the network thread ------------------------------------------------------------------------


def test_on_connect_never_blocks_the_network_thread(agent: Agent) -> None:
    d = daemon_for(agent)
    while not d._q.full():
        d._q.put_nowait(("tick", None))
    caller = threading.Thread(target=d._on_connect, args=(True,), daemon=True)
    caller.start()
    caller.join(5)
    assert not caller.is_alive(), "_on_connect blocked on a full queue"

    assert d._q.full()
    d.run_until_handled("connected", 1)  # the worker still sees the connect
    assert d._announce  # it will report once the link is listening


def test_queue_is_bounded_in_bytes(agent: Agent) -> None:
    d = daemon_for(agent, max_queued_bytes=10_000)
    d._on_message(f"{TOPIC}/release", b"x" * 6000, PROPS)
    d._on_message(f"{TOPIC}/release", b"y" * 6000, PROPS)  # would make 12,000 bytes
    assert d.dropped == 1 and d._q.qsize() == 1 and d._q_bytes == 6000
    d._on_message(f"{TOPIC}/release", b"z" * 4000, PROPS)  # fits
    assert d.dropped == 1 and d._q_bytes == 10_000

    d.run_until_handled("release", 2)  # the worker drains it: the bytes are free again
    assert d._q.empty() and d._q_bytes == 0
    d._on_message(f"{TOPIC}/release", b"w" * 6000, PROPS)
    assert d.dropped == 1


def test_chunks_are_ignored_without_a_download_and_capped_with_one(
    fleet: Fleet, agent: Agent
) -> None:
    d = daemon_for(agent)
    d._on_message(f"{TOPIC}/chunk", b"stale reply", PROPS)
    assert d._q.empty() and d.dropped == 0  # a late duplicate is normal: not even a warning
    d._handle("release", Release(fleet.bundle_bytes("v2")).offer.encode())
    assert d._download is not None
    d._on_message(f"{TOPIC}/chunk", b"c" * MAX_CHUNK_FRAME, PROPS)
    assert d._q.qsize() == 1
    d._on_message(f"{TOPIC}/chunk", b"c" * (MAX_CHUNK_FRAME + 1), PROPS)
    assert d._q.qsize() == 1 and d.dropped == 1
    d._on_message(f"{TOPIC}/release", b"r" * (MAX_OFFER + 1), PROPS)
    assert d._q.qsize() == 1 and d.dropped == 2
    d._download.close()


def test_announced_packet_limit_covers_the_largest_legitimate_message(agent: Agent) -> None:
    assert MAX_CHUNK_FRAME == MAX_SEGMENT + 16 + 2048
    assert MAX_INCOMING == max(MAX_OFFER, MAX_CHUNK_FRAME) + HEADER_ALLOWANCE
    assert daemon_for(agent).link._config.max_incoming == MAX_INCOMING
    cfg = mqtt_config_for(agent, broker="mqtt://127.0.0.1:1", password="pw")
    assert cfg.max_incoming == MAX_INCOMING
