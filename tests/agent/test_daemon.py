"""AgentDaemon run for real over the in-memory broker: no private method is called.

A test-side ``Coordinator`` link on the same broker publishes offers, answers chunk requests
from a ``Release`` (when told to) and collects the statuses the daemon reports. The daemon's
``on_event`` hook says what its worker has handled, so tests wait on that (with a timeout),
and can hold the worker still by blocking in it.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.daemon import MAX_CHUNK_FRAME, MAX_INCOMING, AgentDaemon, mqtt_config_for
from edgefleet.infra.link import HEADER_ALLOWANCE, Link, MessageProps, MqttConfig, OnMessage
from edgefleet.infra.link.memory import InMemoryBroker
from edgefleet.protocol import topics
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.messages import MAX_OFFER, ChunkRequest, DeviceStatus, ReleaseOffer
from edgefleet.protocol.segments import MAX_SEGMENT

from tests.agent.releases import DEVICE, Release
from tests.conftest import Fleet, open_agent

TIMEOUT = 10.0


def config(client_id: str, **changes: Any) -> MqttConfig:
    return MqttConfig(url="mqtt://in-memory.invalid:1883", client_id=client_id, **changes)


class Coordinator:
    """The other end of dev-a's topics: offers out, chunk replies (if ``serving``), statuses in."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self.releases: dict[str, Release] = {}
        self.serving = True
        self.forge_refusals = 0  # "refused" frames sent (unsigned: forged) before each chunk
        self.statuses: list[DeviceStatus] = []
        self.requested: collections.Counter[str] = collections.Counter()  # bundle id -> count
        self._cond = threading.Condition()
        self.link = broker.link(config("coordinator", max_queued=0), self._on_message)
        self.link.start()
        assert self.link.subscribe(f"{topics.PREFIX}/dev/{DEVICE}/up/#").wait(TIMEOUT)

    def offer(self, payload: bytes) -> None:
        self.link.publish(topics.release(DEVICE), payload, qos=1).wait(TIMEOUT)

    def send(self, release: Release) -> None:
        self.releases[release.manifest.bundle_id] = release
        self.offer(release.offer.encode())

    def _on_message(self, topic: str, payload: bytes, props: MessageProps) -> None:
        if topic.endswith("/up/status"):
            with self._cond:
                self.statuses.append(DeviceStatus.decode(payload))
                self._cond.notify_all()
        elif topic.endswith("/up/chunkreq"):
            req = ChunkRequest.decode(payload)
            with self._cond:
                self.requested[req.bundle_id] += 1
                self._cond.notify_all()
            release = self.releases.get(req.bundle_id)
            if self.serving and release is not None:
                for i in req.indexes:
                    for _ in range(self.forge_refusals):
                        self.link.publish(req.reply_to, release.chunk(i, status="refused"), qos=1)
                    self.link.publish(req.reply_to, release.chunk(i), qos=1)

    def wait(self, what: str, predicate: Callable[[], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, TIMEOUT), what


class Running:
    """A started daemon and what its worker has handled."""

    def __init__(self, agent: Agent, broker: InMemoryBroker, **kwargs: Any) -> None:
        self.handled: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self.hold = threading.Event()  # set: the worker blocks in on_event until released
        self.held = threading.Event()  # the worker is blocked
        self.release_hold = threading.Event()
        self.configs: list[MqttConfig] = []

        def factory(cfg: MqttConfig, on_message: OnMessage, **kw: Any) -> Link:
            self.configs.append(cfg)
            return broker.link(cfg, on_message, **kw)

        kwargs.setdefault("request_timeout", 60.0)  # no re-sends unless a test wants them
        self.daemon = AgentDaemon(
            agent,
            config("agent-dev-a", reconnect_min=0.05, reconnect_max=0.2),
            link_factory=factory,
            on_event=self._seen,
            **kwargs,
        )
        self.daemon.start()
        assert self.daemon.link.wait_connected(TIMEOUT), self.daemon.link.last_error

    def _seen(self, kind: str) -> None:
        with self._cond:
            self.handled[kind] += 1
            self._cond.notify_all()
        if self.hold.is_set():
            self.held.set()
            self.release_hold.wait(6 * TIMEOUT)

    def wait(self, kind: str, count: int) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.handled[kind] >= count, TIMEOUT)
        assert ok, f"handled {dict(self.handled)}, wanted {count} {kind}"

    def block_worker(self) -> None:
        self.release_hold.clear()
        self.hold.set()
        assert self.held.wait(TIMEOUT)

    def unblock_worker(self) -> None:
        self.hold.clear()
        self.held.clear()
        self.release_hold.set()

    @property
    def state(self) -> str:
        return self.daemon.flow.state

    def stop(self) -> None:
        self.unblock_worker()
        self.daemon.stop()


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
def broker() -> Iterator[InMemoryBroker]:
    with InMemoryBroker(max_packet=2 * MAX_INCOMING) as b:  # the caps tested are the agent's
        yield b


@pytest.fixture
def coordinator(broker: InMemoryBroker) -> Iterator[Coordinator]:
    c = Coordinator(broker)
    yield c
    c.link.stop()


@pytest.fixture
def home(fleet: Fleet, tmp_path: Path) -> Path:
    return fleet.agent_home(tmp_path / "home", DEVICE, installed=("v1",))


@pytest.fixture
def agent(home: Path) -> Iterator[Agent]:
    a = open_agent(home)
    yield a
    a.close()


@pytest.fixture
def run(agent: Agent, broker: InMemoryBroker) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(**kwargs: Any) -> Running:
        r = Running(agent, broker, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def parts(agent: Agent) -> list[str]:
    return sorted(p.name for p in (agent.config.home / "downloads").glob("*.part"))


def installed(r: Running) -> None:
    assert r.daemon.installed.wait(TIMEOUT)


# -- offers ------------------------------------------------------------------------------------


def test_genuine_release_downloads_and_installs(
    fleet: Fleet,
    agent: Agent,
    broker: InMemoryBroker,
    run: Callable[..., Running],
    coordinator: Coordinator,
) -> None:
    d = run()
    v2 = Release(fleet.bundle_bytes("v2"))
    coordinator.serving = False
    coordinator.send(v2)
    d.wait("release", 1)
    assert d.state == "downloading" and parts(agent) == [f"{v2.manifest.bundle_id}.part"]
    coordinator.serving = True
    assert broker.disconnect("agent-dev-a")  # on reconnect the requests are sent again
    installed(d)
    assert d.state == "idle" and d.daemon.flow.download is None and parts(agent) == []
    assert agent.status().active.sequence == v2.manifest.sequence


def test_release_is_fetched_installed_and_reported(
    fleet: Fleet, agent: Agent, run: Callable[..., Running], coordinator: Coordinator
) -> None:
    d = run()
    v2 = Release(fleet.bundle_bytes("v2"))
    coordinator.send(v2)
    installed(d)
    assert d.state == "idle" and parts(agent) == []
    assert agent.status().active.sequence == v2.manifest.sequence
    coordinator.wait(
        "a status with the new version",
        lambda: any(
            s.active is not None and s.active.sequence == v2.manifest.sequence
            for s in coordinator.statuses
        ),
    )


def test_offer_whose_envelope_does_not_match_the_manifest_is_rejected_before_download(
    fleet: Fleet, agent: Agent, run: Callable[..., Running], coordinator: Coordinator
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    other = Release(fleet.bundle_bytes("v2"), device="dev-b").offer.envelope
    forged = [  # the envelope is not signed itself; only its digest in the manifest is
        Envelope(device_id=DEVICE, kem=other.kem, sealed=other.sealed),  # dev-b's, relabelled
        Envelope(device_id=DEVICE, kem=v2.offer.envelope.kem, sealed=b"\x01" * 64),
    ]
    d = run()
    recorded = Recorded(agent)
    for n, envelope in enumerate(forged, 1):
        coordinator.offer(ReleaseOffer(**{**vars(v2.offer), "envelope": envelope}).encode())
        d.wait("release", n)
        assert d.state == "idle" and parts(agent) == []
    assert recorded.codes == ["integrity", "integrity"]
    assert "digest does not match" in agent.last_result()["reason"]  # type: ignore[index]

    # Not remembered as failed: the genuine offer (same signed manifest) still installs.
    coordinator.send(v2)
    installed(d)


def test_failed_install_is_not_fetched_again_on_redelivery(
    fleet: Fleet,
    agent: Agent,
    run: Callable[..., Running],
    coordinator: Coordinator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edgefleet.agent.flow")
    bad = Release(fleet.release(b"this is not an ONNX model", sequence=10))
    d = run()
    recorded = Recorded(agent)
    coordinator.send(bad)
    coordinator.wait("the failure reported", lambda: recorded.codes == ["model_load"])
    d.wait("installed", 1)
    assert not d.daemon.installed.is_set()
    before = agent.last_result()

    coordinator.send(bad)  # the retained offer again, after a reconnect
    d.wait("release", 2)
    assert d.state == "idle" and parts(agent) == []
    assert recorded.codes == ["model_load"] and agent.last_result() == before  # kept as is
    assert "failed here before (model_load)" in caplog.text

    # A new release is fetched; so is the failed one after a restart (a fresh daemon).
    coordinator.serving = False
    v2 = Release(fleet.bundle_bytes("v2"))
    coordinator.send(v2)
    d.wait("release", 3)
    download = d.daemon.flow.download
    assert download is not None and download.manifest.bundle_id == v2.manifest.bundle_id
    d.stop()
    fresh = run()
    coordinator.send(bad)
    fresh.wait("release", 1)
    download = fresh.daemon.flow.download
    assert download is not None and download.manifest.bundle_id == bad.manifest.bundle_id


def test_failed_bundles_are_remembered_up_to_a_bound(
    fleet: Fleet, run: Callable[..., Running], coordinator: Coordinator
) -> None:
    d = run(remember_failed=2)
    bad = [Release(fleet.release(b"not a model %d" % i, sequence=10 + i)) for i in range(3)]
    for n, r in enumerate(bad, 1):
        coordinator.send(r)
        d.wait("installed", n)
    assert list(d.daemon.flow.failed) == [bad[1].manifest.bundle_id, bad[2].manifest.bundle_id]


# -- disk trouble ------------------------------------------------------------------------------


def _disk_full(*_: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_abandons_the_download_reports_store_and_does_not_retry(
    fleet: Fleet,
    agent: Agent,
    run: Callable[..., Running],
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    d = run()
    recorded = Recorded(agent)
    monkeypatch.setattr(os, "pwrite", _disk_full)
    coordinator.send(v2)
    coordinator.wait("the failure reported", lambda: bool(recorded.codes))
    d.wait("chunk", 1)
    assert d.state == "idle" and parts(agent) == []
    assert recorded.codes == ["store"]
    assert "No space left on device" in recorded.calls[0]["reason"]

    coordinator.send(v2)  # re-delivered: not fetched again
    d.wait("release", 2)
    assert d.state == "idle" and recorded.codes == ["store"]

    monkeypatch.undo()  # space freed, agent restarted: it tries again and installs
    d.stop()
    fresh = run()
    coordinator.send(v2)
    installed(fresh)


def test_disk_full_when_starting_a_download_is_reported_as_store(
    fleet: Fleet,
    agent: Agent,
    run: Callable[..., Running],
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    d = run()
    recorded = Recorded(agent)
    monkeypatch.setattr(os, "ftruncate", _disk_full)
    coordinator.send(v2)
    d.wait("release", 1)
    assert d.state == "idle" and recorded.codes == ["store"]
    coordinator.send(v2)
    d.wait("release", 2)
    assert recorded.codes == ["store"]


def test_read_error_while_installing_is_reported_as_store(
    fleet: Fleet,
    agent: Agent,
    run: Callable[..., Running],
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v2 = Release(fleet.bundle_bytes("v2"))
    d = run()
    recorded = Recorded(agent)

    def broken(*_: object) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", broken)  # a new part file is never re-hashed: only install
    coordinator.send(v2)
    d.wait("installed", 1)
    assert not d.daemon.installed.is_set() and d.daemon.flow.download is None
    assert recorded.codes == ["store"] and d.daemon.flow.failed == {v2.manifest.bundle_id: "store"}
    assert agent.status().active.sequence == 2  # still v1


# -- installs run off the worker ---------------------------------------------------------------


def test_an_install_under_way_does_not_stop_reports_or_offers(
    fleet: Fleet, home: Path, broker: InMemoryBroker, coordinator: Coordinator, x_test: np.ndarray
) -> None:
    gate, inside = threading.Event(), threading.Event()

    def slow(label: str) -> None:
        if label == "staging:created":
            inside.set()
            assert gate.wait(TIMEOUT)

    agent = open_agent(home, checkpoint=slow)
    beat = [1000.0]
    d = Running(agent, broker, heartbeat=30.0, monotonic=lambda: beat[0])
    try:
        v2 = Release(fleet.bundle_bytes("v2"))
        v3 = Release(fleet.release(b"not a model", sequence=10))
        coordinator.send(v2)
        assert inside.wait(TIMEOUT)  # the installer is stuck inside the install
        baseline = agent.predict(x_test)
        seen = len(coordinator.statuses)

        beat[0] += 30.0  # a heartbeat is due: reported while installing
        coordinator.wait("a heartbeat", lambda: len(coordinator.statuses) > seen)
        assert coordinator.statuses[-1].state == "installing"
        handled = d.handled["release"]
        coordinator.send(v3)  # a newer offer: handled now, started after the install
        d.wait("release", handled + 1)
        assert d.state == "installing" and coordinator.requested[v3.manifest.bundle_id] == 0
        np.testing.assert_array_equal(agent.predict(x_test), baseline)  # still serving v1

        gate.set()
        installed(d)
        coordinator.wait("v3 fetched", lambda: coordinator.requested[v3.manifest.bundle_id] > 0)
        assert agent.active is not None and agent.active.manifest.sequence == v2.manifest.sequence
    finally:
        gate.set()
        d.stop()
        agent.close()


# -- the network thread ------------------------------------------------------------------------


def test_connect_with_a_full_queue_never_blocks_the_network_thread(
    broker: InMemoryBroker, run: Callable[..., Running], coordinator: Coordinator
) -> None:
    d = run()
    d.wait("connected", 1)
    coordinator.wait("the first status", lambda: bool(coordinator.statuses))
    d.block_worker()
    for _ in range(1001):  # the queue holds 1000
        coordinator.link.publish(topics.cmd(DEVICE), b"c", qos=1)
    coordinator.wait("a full queue", lambda: d.daemon.dropped == 1)
    seen = len(coordinator.statuses)
    assert broker.disconnect("agent-dev-a")
    assert d.daemon.link.wait_connected(TIMEOUT)  # its on_connect found the queue full
    d.unblock_worker()
    d.wait("connected", 2)  # the worker still sees the connect
    coordinator.wait("a report after the reconnect", lambda: len(coordinator.statuses) > seen)


def test_queue_is_bounded_in_bytes(run: Callable[..., Running], coordinator: Coordinator) -> None:
    d = run(max_queued_bytes=10_000)
    d.block_worker()
    coordinator.offer(b"x" * 6000)
    coordinator.offer(b"y" * 6000)  # would make 12,000 bytes
    coordinator.wait("the second dropped", lambda: d.daemon.dropped == 1)
    coordinator.offer(b"z" * 4000)  # fits: 10,000
    coordinator.offer(b"p" * 1)  # does not
    coordinator.wait("the probe dropped", lambda: d.daemon.dropped == 2)

    handled = d.handled["release"]
    d.unblock_worker()  # the worker drains it: the bytes are free again
    d.wait("release", handled + 2)
    coordinator.offer(b"w" * 6000)
    d.wait("release", handled + 3)
    assert d.daemon.dropped == 2


def test_chunks_are_ignored_without_a_download_and_capped_with_one(
    fleet: Fleet, run: Callable[..., Running], coordinator: Coordinator
) -> None:
    d = run()
    pub = coordinator.link
    pub.publish(topics.chunk(DEVICE), b"stale reply", qos=1)
    pub.publish(topics.cmd(DEVICE), b"sentinel", qos=1)
    d.wait("cmd", 1)
    assert d.handled["chunk"] == 0 and d.daemon.dropped == 0  # a late duplicate: not a warning

    coordinator.serving = False
    coordinator.send(Release(fleet.bundle_bytes("v2")))
    d.wait("release", 1)
    assert d.state == "downloading"
    pub.publish(topics.chunk(DEVICE), b"c" * MAX_CHUNK_FRAME, qos=1)
    d.wait("chunk", 1)
    pub.publish(topics.chunk(DEVICE), b"c" * (MAX_CHUNK_FRAME + 1), qos=1)
    pub.publish(topics.release(DEVICE), b"r" * (MAX_OFFER + 1), qos=1)
    pub.publish(topics.cmd(DEVICE), b"sentinel", qos=1)
    d.wait("cmd", 2)
    assert d.handled["chunk"] == 1 and d.handled["release"] == 1 and d.daemon.dropped == 2


def test_announced_packet_limit_covers_the_largest_legitimate_message(
    agent: Agent, run: Callable[..., Running]
) -> None:
    assert MAX_CHUNK_FRAME == MAX_SEGMENT + 16 + 2048
    assert MAX_INCOMING == max(MAX_OFFER, MAX_CHUNK_FRAME) + HEADER_ALLOWANCE
    assert run().configs[0].max_incoming == MAX_INCOMING
    cfg = mqtt_config_for(agent, broker="mqtt://127.0.0.1:1", password="pw")
    assert cfg.max_incoming == MAX_INCOMING


# -- issue 7: refusals, a broken store, releases already here -----------------------------------


def test_forged_refusals_do_not_stop_a_genuine_download(
    fleet: Fleet, agent: Agent, run: Callable[..., Running], coordinator: Coordinator
) -> None:
    """Three unsigned "refused" frames used to abort the download until a restart."""
    d = run()
    recorded = Recorded(agent)
    coordinator.forge_refusals = 3  # before every genuine chunk
    v2 = Release(fleet.bundle_bytes("v2"))
    coordinator.send(v2)
    installed(d)
    assert agent.status().active.sequence == v2.manifest.sequence
    assert recorded.codes == ["ok"] and d.daemon.flow.failed == {}


def test_a_corrupt_active_model_is_repaired_over_the_air(
    fleet: Fleet, home: Path, broker: InMemoryBroker, coordinator: Coordinator
) -> None:
    """The agent used to refuse to start ("does not load, nor does any other kept version")."""
    v1 = Release(fleet.bundle_bytes("v1"))
    (model,) = (home / "store" / "versions").glob("*/model.onnx")
    model.write_bytes(b"overwritten")
    with open_agent(home) as agent:
        assert agent.active is None and agent.broken is not None
        r = Running(agent, broker)
        try:
            recorded = Recorded(agent)
            coordinator.offer(v1.offer.encode())  # the retained offer of the broken one: current
            r.wait("release", 1)
            assert r.state == "idle" and recorded.codes == []
            v2 = Release(fleet.bundle_bytes("v2"))
            coordinator.send(v2)
            installed(r)
            assert agent.broken is None and agent.status().active.sequence == v2.manifest.sequence
            x = np.zeros((1, 64), np.float32)
            np.testing.assert_allclose(agent.predict(x), fleet.expected("v2", x), atol=1e-5)
        finally:
            r.stop()


def test_the_retained_offer_after_a_local_rollback_is_no_rejection(
    fleet: Fleet, tmp_path: Path, broker: InMemoryBroker, coordinator: Coordinator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    home = fleet.agent_home(tmp_path / "rolled", DEVICE, installed=("v1", "v2"))
    with open_agent(home) as agent:
        agent.rollback()
    with open_agent(home) as agent:  # restarted
        r = Running(agent, broker)
        try:
            recorded = Recorded(agent)
            with caplog.at_level(logging.INFO, logger="edgefleet.agent"):
                coordinator.send(Release(fleet.bundle_bytes("v2")))  # still the retained one
                r.wait("release", 1)
            assert r.state == "idle" and recorded.codes == []
            assert agent.last_install is not None and agent.last_install.code == "rollback"
            logged = [(x.levelno, x.getMessage()) for x in caplog.records
                      if x.name.startswith("edgefleet.agent.flow")]
            assert logged and all(level == logging.INFO for level, _ in logged), logged
            assert any("rolled back locally" in m for _, m in logged)
        finally:
            r.stop()
