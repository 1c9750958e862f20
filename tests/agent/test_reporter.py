"""Reporter over the in-memory broker: typed statuses, heartbeats on the injected clock, and a
bounded telemetry buffer flushed (oldest first) once the link is listening."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from edgefleet.agent.reporter import Facts, Reporter, offline_will
from edgefleet.infra.link import InMemoryBroker, Link, MessageProps, MqttConfig
from edgefleet.protocol import topics
from edgefleet.protocol.messages import ActiveModel, DeviceStatus, InstallResult, Telemetry

DEVICE = "dev-a"
TIMEOUT = 10.0
FACTS = Facts(
    state="idle",
    active=ActiveModel(name="digits", version="1", sequence=2, format="onnx", bundle_id="ab" * 16),
    highest_sequence=2,
    last_result=InstallResult(ok=True, code="ok", sequence=2),
    progress=None,
)


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes, props: MessageProps) -> None:
        with self._cond:
            self.got.append((topic, payload))
            self._cond.notify_all()

    def wait(self, kind: str, n: int) -> list[bytes]:
        topic = topics.up(DEVICE, kind)
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.of(topic)) >= n, TIMEOUT)
            assert ok, f"{len(self.of(topic))} on {topic}, wanted {n}"
            return self.of(topic)

    def of(self, topic: str) -> list[bytes]:
        return [p for t, p in self.got if t == topic]


def cfg(client_id: str) -> MqttConfig:
    return MqttConfig(url="mqtt://in-memory.invalid:1883", client_id=client_id)


@pytest.fixture
def broker() -> Iterator[InMemoryBroker]:
    with InMemoryBroker() as b:
        yield b


@pytest.fixture
def inbox(broker: InMemoryBroker) -> Iterator[Inbox]:
    box = Inbox()
    link = broker.link(cfg("coordinator"), box)
    link.start()
    assert link.subscribe(f"{topics.PREFIX}/dev/{DEVICE}/up/#").wait(TIMEOUT)
    yield box
    link.stop()


def reporter(link: Link, mono: list[float], **kw: Any) -> Reporter:
    return Reporter(
        link,
        device_id=DEVICE,
        facts=lambda: FACTS,
        metrics=lambda: {"n": mono[0]},
        clock=lambda: 1_700_000_000.0,
        monotonic=lambda: mono[0],
        **kw,
    )


def test_status_is_typed_and_counts(broker: InMemoryBroker) -> None:
    r = reporter(broker.link(cfg("agent-dev-a"), lambda *a: None), [0.0])
    first, second = r.status(), r.status()
    assert (first.active, first.last_result, first.state) == (
        FACTS.active,
        FACTS.last_result,
        "idle",
    )
    assert second.counter == first.counter + 1
    assert DeviceStatus.decode(second.encode()) == second


def test_heartbeat_follows_the_injected_clock(broker: InMemoryBroker, inbox: Inbox) -> None:
    link = broker.link(cfg("agent-dev-a"), lambda *a: None)
    link.start()
    assert link.wait_connected(TIMEOUT)
    mono = [100.0]
    r = reporter(link, mono, heartbeat=30.0)
    r.tick()  # the first tick beats
    assert len(inbox.wait("status", 1)) == 1 and len(inbox.wait("telemetry", 1)) == 1
    mono[0] += 29.0
    r.tick()  # not due yet
    mono[0] += 1.0
    r.tick()  # due
    statuses = inbox.wait("status", 2)
    assert [DeviceStatus.decode(s).counter for s in statuses] == [1, 2]
    beats = [Telemetry.decode(t).metrics for t in inbox.wait("telemetry", 2)]
    assert [m["agent"]["n"] for m in beats] == [100, 130]  # the constructor's ``metrics``
    link.stop()


def test_telemetry_buffer_is_bounded_and_flushed_on_connect(
    broker: InMemoryBroker, inbox: Inbox
) -> None:
    link = broker.link(cfg("agent-dev-a"), lambda *a: None)  # not started: offline
    mono = [0.0]
    r = reporter(link, mono, buffer=3)
    for i in range(5):
        mono[0] = float(i)
        r.telemetry({"i": i})
    assert r.buffered == 3 and r.telemetry_dropped == 2
    r.report()  # offline: nothing sent, nothing raised
    link.start()
    assert link.wait_connected(TIMEOUT)
    r.connected()
    r.tick()  # listening now: report and flush (and this tick's heartbeat)
    got = [Telemetry.decode(t).metrics for t in inbox.wait("telemetry", 4)]
    assert got[:3] == [{"i": 2}, {"i": 3}, {"i": 4}] and r.buffered == 0
    assert inbox.wait("status", 1)
    link.stop()


def test_sources_are_namespaces_and_a_failing_one_is_left_out(
    broker: InMemoryBroker, inbox: Inbox
) -> None:
    link = broker.link(cfg("agent-dev-a"), lambda *a: None)
    link.start()
    assert link.wait_connected(TIMEOUT)
    mono = [0.0]
    r = reporter(link, mono)
    calls = [0]

    def drift() -> dict[str, Any] | None:
        calls[0] += 1
        return {"psi": 0.25} if calls[0] == 1 else None  # nothing new: left out

    def broken() -> dict[str, Any]:
        raise RuntimeError("source bug")

    r.add_source("drift", drift)
    r.add_source("shadow", broken)
    for bad in ("agent", "Bad-Name", ""):  # taken, or not a namespace
        with pytest.raises(ValueError):
            r.add_source(bad, drift)
    r.tick()
    mono[0] += 31
    r.tick()
    got = [Telemetry.decode(t).metrics for t in inbox.wait("telemetry", 2)]
    assert got == [{"agent": {"n": 0.0}, "drift": {"psi": 0.25}}, {"agent": {"n": 31.0}}]
    link.stop()


def test_a_message_over_the_bounds_sheds_its_largest_namespace(broker: InMemoryBroker) -> None:
    r = reporter(broker.link(cfg("agent-dev-a"), lambda *a: None), [0.0])
    r.add_source("huge", lambda: {f"k{i}": "x" * 400 for i in range(200)})  # ~82 kB
    r.add_source("deep", lambda: {"a": {"b": {"c": {"d": 1}}}})  # deeper than allowed
    r.add_source("drift", lambda: {"psi": 0.1})
    assert r.collect() == {"agent": {"n": 0.0}, "drift": {"psi": 0.1}}
    assert r.telemetry_shed == 1


def test_the_will_and_the_goodbye_say_offline(broker: InMemoryBroker, inbox: Inbox) -> None:
    will = offline_will(DEVICE, 1_700_000_000)
    status = DeviceStatus.decode(will.payload)
    assert (will.topic, will.retain, status.state, status.device_id) == (
        topics.up(DEVICE, "status"), True, "offline", DEVICE)
    link = broker.link(cfg("agent-dev-a"), lambda *a: None)
    link.start()
    assert link.wait_connected(TIMEOUT)
    reporter(link, [0.0]).goodbye()
    assert DeviceStatus.decode(inbox.wait("status", 1)[0]).state == "offline"
    link.stop()
