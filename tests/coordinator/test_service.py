"""The coordinator service as an MQTT shell, over the in-memory broker: offers go out
retained, chunk requests are answered on the requester's chunk topic, statuses reach the
registry, and whatever is malformed or misaddressed is dropped and counted."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from edgefleet.coordinator import release as releases
from edgefleet.coordinator.registry import Device
from edgefleet.coordinator.service import (
    LOOKUP_BUSY_TIMEOUT,
    MAX_INCOMING,
    CoordinatorService,
    ServiceLimits,
)
from edgefleet.infra.link import InMemoryBroker
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import (
    MAX_TELEMETRY,
    ActiveModel,
    ChunkReply,
    ChunkRequest,
    DeviceStatus,
    ReleaseOffer,
    Telemetry,
)
from edgefleet.simulations.wait import wait_until

from .homes import SEGMENT, T0, TIMEOUT, Home, Inbox, make_home, mqtt

DEV = Device(device_id="none")  # stands in for a device not found, in waits


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


@pytest.fixture
def broker() -> Iterator[InMemoryBroker]:
    with InMemoryBroker() as b:
        yield b


@pytest.fixture
def service(home: Home, broker: InMemoryBroker) -> Iterator[CoordinatorService]:
    svc = CoordinatorService(home.coordinator, mqtt("coordinator"), link_factory=broker.link,
                             clock=lambda: T0 + 5)
    svc.start(timeout=TIMEOUT)
    assert svc.link.wait_connected(TIMEOUT), svc.link.last_error
    yield svc
    svc.stop()


@pytest.fixture
def devices(broker: InMemoryBroker) -> Iterator[dict[str, tuple[Link, Inbox]]]:
    """dev-a and dev-b as a device sees the broker: its release and chunk topics."""
    out = {}
    for dev in ("dev-a", "dev-b"):
        inbox = Inbox()
        link = broker.link(mqtt(dev), inbox)
        link.start()
        for topic in (topics.release(dev), topics.chunk(dev)):
            assert link.subscribe(topic).wait(TIMEOUT)
        out[dev] = (link, inbox)
    yield out
    for link, _ in out.values():
        link.stop()


def test_a_release_arrives_retained_on_each_targets_topic(
        home: Home, service: CoordinatorService, devices: dict[str, tuple[Link, Inbox]]) -> None:
    r = home.build("1", "dev-a,dev-b")
    sent = service.release(r.sequence)
    want = releases.offers(r)
    assert sent == sum(len(o.encode()) for o in want.values())
    for dev, (_, inbox) in devices.items():
        [m] = inbox.wait_for(1, topics.release(dev))
        assert ReleaseOffer.decode(m.payload) == want[dev]
    with pytest.raises(LookupError, match="does not exist"):
        service.release(r.sequence + 1)


def test_release_model_builds_and_publishes(
        home: Home, broker: InMemoryBroker, service: CoordinatorService) -> None:
    done = service.release_model("m", "2", "dev-c", now=T0)
    assert done.targets == ("dev-c",)
    assert broker.retained == {topics.release("dev-c"): releases.offers(done.release)["dev-c"]
                               .encode()}


def request(bundle_id: str, indexes: tuple[int, ...], reply_to: str, corr: str) -> bytes:
    return ChunkRequest(bundle_id=bundle_id, indexes=indexes, reply_to=reply_to,
                        corr=corr).encode()


def test_a_chunk_request_is_answered_on_the_requesters_chunk_topic(
        home: Home, broker: InMemoryBroker, service: CoordinatorService,
        devices: dict[str, tuple[Link, Inbox]]) -> None:
    r = home.build("1", "dev-a")
    manifest = Manifest.decode(r.manifest)
    link_a, inbox_a = devices["dev-a"]
    link_b, inbox_b = devices["dev-b"]
    up = topics.up("dev-a", "chunkreq")
    # pointed at another device's topic: never answered there (nor anywhere)
    link_a.publish(up, request(r.bundle_id, (0,), topics.chunk("dev-b"), "evil"))
    # dev-b is not a target: refused, on its own topic
    link_b.publish(topics.up("dev-b", "chunkreq"),
                   request(r.bundle_id, (0,), topics.chunk("dev-b"), "b1"))
    link_a.publish(up, request(r.bundle_id, (0, manifest.segments - 1, manifest.segments),
                               topics.chunk("dev-a"), "a1"))
    replies = [ChunkReply.decode(m.payload, max_data=1 << 20)
               for m in inbox_a.wait_for(3, topics.chunk("dev-a"))]
    assert [(c.index, c.status, c.corr) for c in replies] == [
        (0, "ok", "a1"), (manifest.segments - 1, "ok", "a1"),
        (manifest.segments, "refused", "a1")]
    for c in replies[:2]:
        assert hashlib.sha256(c.data).hexdigest() == manifest.segment_hashes[c.index]
    [refusal] = [ChunkReply.decode(m.payload, max_data=0)
                 for m in inbox_b.wait_for(1, topics.chunk("dev-b"))]
    assert (refusal.status, refusal.corr) == ("refused", "b1")
    assert "not a target" in refusal.reason
    assert all(ChunkReply.decode(m.payload, max_data=1 << 20).corr != "evil"
               for m in inbox_b.on(topics.chunk("dev-b")))
    assert service.chunks.sent_chunks == 2


def status(device: str, sequence: int) -> bytes:
    return DeviceStatus(device_id=device, time=T0, state="idle", active=ActiveModel(
        name="m", version="1", sequence=sequence, format="onnx", bundle_id="ab" * 16)).encode()


def test_statuses_reach_the_registry_and_bad_ones_are_counted(
        home: Home, broker: InMemoryBroker, service: CoordinatorService,
        devices: dict[str, tuple[Link, Inbox]]) -> None:
    link_a, _ = devices["dev-a"]
    link_b, _ = devices["dev-b"]
    link_b.publish(topics.up("dev-b", "status"), status("dev-a", 9), retain=True)  # not its own
    link_a.publish(topics.up("dev-a", "status"), status("dev-a", 3), retain=True)
    link_a.publish("ef/v1/dev/dev-a/up/other", b"?")  # no such kind: dropped at the router
    # after the good one: a garbage status older than a good one is coalesced, never decoded
    link_a.publish(topics.up("dev-a", "status"), b"{garbage", retain=True)
    assert service.status_event.wait(TIMEOUT)
    d = home.coordinator.registry.device("dev-a")
    assert d is not None and (d.active_sequence, d.last_seen) == (3, T0 + 5)
    b = home.coordinator.registry.device("dev-b")
    assert b is not None and b.active_sequence is None
    wait_until(lambda: service.ingest.dropped == 2, "both bad statuses counted as dropped")
    assert service.statuses == 1


# -- bounds (issue 7) ------------------------------------------------------------------------


def start_service(home: Home, broker: InMemoryBroker, **limits: Any) -> CoordinatorService:
    svc = CoordinatorService(home.coordinator, mqtt("coordinator"), link_factory=broker.link,
                             clock=lambda: T0 + 5, limits=ServiceLimits(**limits))
    svc.start(timeout=TIMEOUT)
    assert svc.link.wait_connected(TIMEOUT), svc.link.last_error
    return svc


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_serving_many_releases_keeps_a_bounded_number_of_files_open(
        home: Home, broker: InMemoryBroker, devices: dict[str, tuple[Link, Inbox]]) -> None:
    """Item 7: one descriptor per served release, forever, ran out at 1,024."""
    built = [home.build(str(1 + n % 2), "dev-a") for n in range(50)]
    assert len({r.payload_blob for r in built}) == 50  # a fresh content key each time
    svc = start_service(home, broker, max_files=8, max_releases=8, lookup_burst=64)
    link, inbox = devices["dev-a"]
    steady = 0
    try:
        for n, r in enumerate(built):
            if n == 8:  # 8 files and the registry's connections open: nothing more after this
                steady = open_fds()
            link.publish(topics.up("dev-a", "chunkreq"),
                         request(r.bundle_id, (0,), topics.chunk("dev-a"), f"r{n}"))
            [m] = inbox.wait_for(n + 1, topics.chunk("dev-a"))[n:]
            reply = ChunkReply.decode(m.payload, max_data=1 << 20)
            assert (reply.status, reply.corr) == ("ok", f"r{n}")
            want = Manifest.decode(r.manifest).segment_hashes[0]
            assert hashlib.sha256(reply.data).hexdigest() == want
            assert svc.chunks.open_files <= 8
        assert open_fds() <= steady + 1, f"{open_fds() - steady} more descriptors open"
    finally:
        svc.stop()
    assert svc.chunks.open_files == 0


class Gate:
    """Wraps a callable so that it blocks until ``open`` (the work piles up meanwhile)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.entered, self.opened = fn, threading.Event(), threading.Event()

    def __call__(self, *args: Any) -> Any:
        self.entered.set()
        assert self.opened.wait(TIMEOUT), "gate never opened"
        return self.fn(*args)


def test_one_devices_flood_of_chunk_requests_stays_within_its_window(
        home: Home, broker: InMemoryBroker, devices: dict[str, tuple[Link, Inbox]]) -> None:
    """Item 1 (coordinator side): 300 requests of a full window each hold one window.
    (The window is 16 segments by default; these releases have 4.)"""
    r = home.build("2", "dev-a,dev-b")
    window = Manifest.decode(r.manifest).segments
    assert window == 4
    svc = start_service(home, broker, window=window)
    gate = Gate(svc.chunks.answer)
    svc.chunks.answer = gate  # type: ignore[method-assign]
    rogue, _ = devices["dev-a"]
    try:
        for n in range(300):
            rogue.publish(topics.up("dev-a", "chunkreq"),
                          request(r.bundle_id, tuple(range(4)), topics.chunk("dev-a"), f"f{n}"),
                          qos=0)
        assert gate.entered.wait(TIMEOUT), (svc.drops, svc.received, svc.queues.dropped)
        wait_until(lambda: svc.received["up/chunkreq"] == 300,
                   f"300 requests routed {broker.dropped} {svc.received}")
        assert svc.peak_chunk_bytes("dev-a") == window * SEGMENT
        assert svc.queues.pending("dev-a") == window
        assert svc.chunk_drops("dev-a") == 299  # the window was full for every other one
        gate.opened.set()
        link_b, inbox_b = devices["dev-b"]
        link_b.publish(topics.up("dev-b", "chunkreq"),
                       request(r.bundle_id, (0,), topics.chunk("dev-b"), "b0"))
        [m] = inbox_b.wait_for(1, topics.chunk("dev-b"))
        assert ChunkReply.decode(m.payload, max_data=1 << 20).status == "ok"
        wait_until(lambda: svc.chunks.sent_chunks == window + 1, "the admitted request answered")
        assert svc.chunk_drops("dev-b") == 0 and svc.queues.pending("dev-a") == 0
    finally:
        gate.opened.set()
        svc.stop()


def test_telemetry_and_statuses_queue_apart_bounded_in_bytes(
        home: Home, broker: InMemoryBroker, devices: dict[str, tuple[Link, Inbox]]) -> None:
    """Item 5: what waits for ingest is bounded in bytes; the latest status always arrives."""
    svc = start_service(home, broker, telemetry_bytes=1 << 20)
    gate = Gate(svc.ingest.add)
    svc.ingest.add = gate  # type: ignore[method-assign]
    link, _ = devices["dev-a"]
    big = Telemetry(device_id="dev-a", time=T0,
                    metrics={f"k{i}": "x" * 400 for i in range(140)}).encode()
    assert 50_000 < len(big) <= MAX_TELEMETRY
    try:
        link.publish(topics.up("dev-a", "telemetry"), big, qos=0)
        assert gate.entered.wait(TIMEOUT)  # the worker holds the first one: the rest queue
        for _ in range(100):
            link.publish(topics.up("dev-a", "telemetry"), big, qos=0)
        for seq in range(1, 11):
            link.publish(topics.up("dev-a", "status"), status("dev-a", seq), qos=1)
        wait_until(lambda: svc.received["up/telemetry"] == 101 and svc.received["up/status"] == 10,
                   "the flood routed")
        assert svc.peak_ingest_bytes <= (1 << 20) + 16 * 1024
        full = svc.drops["dev-a", "up/telemetry queue full"]
        assert full >= 100 - (1 << 20) // len(big)
        assert svc.drops["dev-a", "status superseded"] == 10 - 4  # 4 pending per device
        gate.opened.set()
        wait_until(lambda: (home.coordinator.registry.device("dev-a") or DEV).active_sequence
                   == 10, "the latest status stored")
        # of the 4 pending statuses only the newest is decoded; the 3 older are coalesced
        assert (svc.ingest.decoded, svc.ingest.coalesced) == (101 - full + 1, 3)
    finally:
        gate.opened.set()
        svc.stop()


def test_an_oversize_message_never_reaches_the_service(
        home: Home, broker: InMemoryBroker) -> None:
    """Item 5: the link announces MAX_INCOMING; what is larger is the broker's to drop."""
    svc = start_service(home, broker)
    inbox = Inbox()
    rogue = broker.link(mqtt("rogue", default_max_packet=8 << 20), inbox)
    rogue.start()
    try:
        assert rogue.wait_connected(TIMEOUT)
        rogue.publish(topics.up("dev-a", "telemetry"), b"x" * (3 << 20), qos=1).wait(TIMEOUT)
        rogue.publish(topics.up("dev-a", "telemetry"), b"{" + b" " * MAX_TELEMETRY + b"}",
                      qos=1).wait(TIMEOUT)  # under MAX_INCOMING, over the telemetry cap
        rogue.publish(topics.up("dev-a", "status"), status("dev-a", 7), qos=1)
        assert svc.status_event.wait(TIMEOUT)
        assert svc.largest_received <= MAX_INCOMING < 3 << 20
        assert svc.drops["dev-a", "too large"] == 1 and svc.ingest.dropped == 0
        assert broker.dropped["too_large_for_client"] == 1
    finally:
        rogue.stop()
        svc.stop()


def test_a_locked_registry_does_not_stall_chunks_of_cached_releases(
        home: Home, broker: InMemoryBroker, devices: dict[str, tuple[Link, Inbox]]) -> None:
    """Item 13: another process holds the SQLite write lock; chunk serving goes on."""
    cached = home.build("1", "dev-a")
    uncached = home.build("2", "dev-b")
    svc = start_service(home, broker)
    link_a, inbox_a = devices["dev-a"]
    link_b, inbox_b = devices["dev-b"]
    try:
        link_a.publish(topics.up("dev-a", "chunkreq"),
                       request(cached.bundle_id, (0,), topics.chunk("dev-a"), "a0"))
        inbox_a.wait_for(1, topics.chunk("dev-a"))
        db = home.coordinator.config.database_url.removeprefix("sqlite:///")
        locker = sqlite3.connect(db, timeout=0)
        locker.execute("BEGIN EXCLUSIVE")  # as a second process would
        try:
            link_b.publish(topics.up("dev-b", "chunkreq"),  # needs a lookup: waits, then fails
                           request(uncached.bundle_id, (0,), topics.chunk("dev-b"), "b0"))
            wait_until(lambda: svc.chunks.lookups == 2, "dev-b's lookup to start")
            started = time.monotonic()
            link_a.publish(topics.up("dev-a", "chunkreq"),
                           request(cached.bundle_id, (1,), topics.chunk("dev-a"), "a1"))
            [_, m] = inbox_a.wait_for(2, topics.chunk("dev-a"))
            waited = time.monotonic() - started
            assert ChunkReply.decode(m.payload, max_data=1 << 20).corr == "a1"
            wait_until(lambda: svc.drops["dev-b", "store error"] == 1, "dev-b's lookup to fail")
            print(f"chunk request during an exclusive registry lock: answered in "
                  f"{waited * 1000:.1f} ms (lookup busy timeout {LOOKUP_BUSY_TIMEOUT} s)")
        finally:
            locker.rollback()
            locker.close()
        link_b.publish(topics.up("dev-b", "chunkreq"),  # the agent re-sends after its timeout
                       request(uncached.bundle_id, (0,), topics.chunk("dev-b"), "b1"))
        [m] = inbox_b.wait_for(1, topics.chunk("dev-b"))
        assert ChunkReply.decode(m.payload, max_data=1 << 20).corr == "b1"
    finally:
        svc.stop()
