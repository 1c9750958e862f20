"""The one release path: build a sequence, make each target's offer, publish them retained."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.coordinator import release as releases
from edgefleet.infra.link import InMemoryBroker
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.errors import DecryptError, TransportError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ReleaseOffer
from edgefleet.protocol.verify import check_envelopes

from .homes import T0, TIMEOUT, Home, Inbox, make_home, mqtt


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


def test_build_allocates_a_new_sequence_and_records_the_release(home: Home) -> None:
    first, _ = releases.build(home.coordinator, "m", "1", "dev-a", now=T0)
    second, built = releases.build(home.coordinator, "m", "2", "all", now=T0)
    assert second.sequence == first.sequence + 1
    stored = home.coordinator.registry.release(sequence=second.sequence)
    assert stored is not None and stored.manifest == built.manifest_raw
    assert sorted(t.device_id for t in stored.targets) == ["dev-a", "dev-b", "dev-c"]


def test_offers_carry_the_signed_bytes_and_each_devices_own_envelope(home: Home) -> None:
    r = home.build("1", "dev-a,dev-c")
    got = releases.offers(r)
    assert sorted(got) == ["dev-a", "dev-c"]
    manifest = Manifest.decode(r.manifest)
    keys = set()
    for device, offer in got.items():
        assert ReleaseOffer.decode(offer.encode()) == offer  # what goes on the wire
        assert (offer.manifest, offer.signature) == (r.manifest, r.signature)
        assert (offer.keyring, offer.keyring_sig) == (r.keyring, r.keyring_sig)
        assert offer.envelope.device_id == device
        check_envelopes(manifest, [offer.envelope])
        keys.add(unwrap_key(offer.envelope, home.kem_private[device],
                            bundle_id=manifest.bundle_id))
    assert keys == {r.content_key}  # one content key, wrapped per device


def test_a_device_cannot_open_another_devices_envelope(home: Home) -> None:
    r = home.build("1", "dev-a,dev-b")
    offer = releases.offers(r)["dev-a"]
    with pytest.raises(DecryptError, match="HPKE open failed"):
        unwrap_key(offer.envelope, home.kem_private["dev-b"],
                   bundle_id=Manifest.decode(r.manifest).bundle_id)


def test_publish_sequence_of_an_unknown_release(home: Home) -> None:
    with pytest.raises(LookupError, match="release 99 does not exist"):
        releases.publish_sequence(home.coordinator.registry, None, 99)  # type: ignore[arg-type]


def listen(broker: InMemoryBroker, client_id: str, topic: str) -> tuple[Link, Inbox]:
    inbox = Inbox()
    sub = broker.link(mqtt(client_id), inbox)
    sub.start()
    assert sub.subscribe(topic).wait(TIMEOUT) and sub.wait_connected(TIMEOUT)
    return sub, inbox


def test_publish_puts_each_targets_offer_retained_on_its_topic(
        home: Home, broker: InMemoryBroker, link: Link) -> None:
    live, inbox = listen(broker, "observer", "ef/v1/dev/+/release")
    r = home.build("1", "dev-a,dev-b")
    report = releases.publish(link, r, timeout=TIMEOUT)
    assert report == releases.PublishReport(
        sequence=r.sequence, devices=("dev-a", "dev-b"), batches=1,
        bytes=sum(len(o.encode()) for o in releases.offers(r).values()))
    want = {topics.release(d): o.encode() for d, o in releases.offers(r).items()}
    assert broker.retained == want  # dev-c, not a target, has no offer
    got = inbox.wait_for(2)
    assert {m.topic: m.payload for m in got} == want
    live.stop()

    late, inbox = listen(broker, "dev-a", topics.release("dev-a"))  # connects after the release
    [m] = inbox.wait_for(1)
    assert m.retain and ReleaseOffer.decode(m.payload) == releases.offers(r)["dev-a"]
    late.stop()


def test_publish_in_acknowledged_batches(home: Home, broker: InMemoryBroker, link: Link,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(releases, "PUBLISH_BATCH", 2)
    r = home.build("1", "all")
    assert releases.publish(link, r, timeout=TIMEOUT).batches == 2  # 2 + 1 offers
    assert len(broker.retained) == 3


def test_release_builds_then_publishes_and_supersedes(home: Home, broker: InMemoryBroker,
                                                      link: Link) -> None:
    first = releases.release(home.coordinator, link, "m", "1", "all", timeout=TIMEOUT, now=T0)
    second = releases.release(home.coordinator, link, "m", "2", "dev-b", timeout=TIMEOUT,
                              now=T0)
    assert second.sequence == first.sequence + 1 and second.targets == ("dev-b",)
    assert first.targets == ("dev-a", "dev-b", "dev-c")
    assert Manifest.decode(second.release.manifest).model_version == "2"
    retained = broker.retained
    assert retained[topics.release("dev-b")] == releases.offers(second.release)["dev-b"].encode()
    assert retained[topics.release("dev-a")] == releases.offers(first.release)["dev-a"].encode()
    again = releases.publish_sequence(home.coordinator.registry, link, first.sequence,
                                      timeout=TIMEOUT)
    assert again.devices == first.targets  # publishing again is allowed (and harmless)


def test_unacknowledged_offers_are_a_transport_error(home: Home) -> None:
    """A link that never gets through (wrong password) queues QoS 1 and never confirms it."""
    r = home.build("1", "dev-a")
    with InMemoryBroker(users={"coordinator": "right"}) as broker:
        link = broker.link(mqtt("coordinator", username="coordinator", password="wrong"),
                           Inbox())
        link.start()
        try:
            with pytest.raises(TransportError, match="1 offers not acknowledged"):
                releases.publish(link, r, timeout=0.05)
        finally:
            link.stop()
        assert broker.retained == {}


def test_connect_refuses_a_broker_it_cannot_reach() -> None:
    with InMemoryBroker(users={"coordinator": "right"}) as broker:
        config = mqtt("coordinator", username="coordinator", password="wrong")
        with pytest.raises(ConnectionError, match="cannot reach the broker"), \
                releases.connect(config, link_factory=broker.link, timeout=0.05):
            pass  # pragma: no cover - never reached


def test_the_retained_offer_is_the_newest_release_whatever_the_publish_order(
        home: Home, broker: InMemoryBroker, link: Link) -> None:
    """Item 8: two releases built at once, the newer published first: the older one's
    publish must not leave it as any device's retained desired state."""
    older = home.build("1", "all")
    newer = home.build("2", "dev-a,dev-b")  # built meanwhile: a higher sequence
    assert newer.sequence > older.sequence
    registry = home.coordinator.registry
    releases.publish(link, newer, timeout=TIMEOUT, registry=registry)
    report = releases.publish(link, older, timeout=TIMEOUT, registry=registry)
    assert report.republished == 2  # dev-a and dev-b got the newer offer again
    for dev, want in (("dev-a", newer), ("dev-b", newer), ("dev-c", older)):
        fresh, inbox = listen(broker, f"fresh-{dev}", topics.release(dev))  # subscribe anew
        [m] = inbox.wait_for(1)
        offer = ReleaseOffer.decode(m.payload)
        assert Manifest.decode(offer.manifest).sequence == want.sequence, dev
        fresh.stop()
    assert releases.publish(link, newer, timeout=TIMEOUT, registry=registry).republished == 0
