"""The coordinator service as an MQTT shell, over the in-memory broker: offers go out
retained, chunk requests are answered on the requester's chunk topic, statuses reach the
registry, and whatever is malformed or misaddressed is dropped and counted."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgefleet.coordinator import release as releases
from edgefleet.coordinator.service import CoordinatorService
from edgefleet.infra.link import InMemoryBroker
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import (
    ActiveModel,
    ChunkReply,
    ChunkRequest,
    DeviceStatus,
    ReleaseOffer,
)

from .homes import T0, TIMEOUT, Home, Inbox, make_home, mqtt


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
    link_a.publish(topics.up("dev-a", "status"), b"{garbage", retain=True)
    link_a.publish("ef/v1/dev/dev-a/up/other", b"?")  # no such kind: dropped at the router
    link_a.publish(topics.up("dev-a", "status"), status("dev-a", 3), retain=True)
    assert service.status_event.wait(TIMEOUT)
    d = home.coordinator.registry.device("dev-a")
    assert d is not None and (d.active_sequence, d.last_seen) == (3, T0 + 5)
    b = home.coordinator.registry.device("dev-b")
    assert b is not None and b.active_sequence is None
    assert service.statuses == 1 and service.ingest.dropped == 2
