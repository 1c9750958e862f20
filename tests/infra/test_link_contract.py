"""The link port's contract (infra/link/port.py), run on both implementations.

``memory``: ``InMemoryBroker.link``, always. ``mosquitto``: ``MqttLink`` against a real
mosquitto on loopback (started by the test; skipped where the binary is missing). Both get a
broker maximum packet size of 4096 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from edgefleet.infra.broker import EmbeddedBroker
from edgefleet.infra.link import InMemoryBroker, Link, LinkFactory
from edgefleet.infra.link.mqtt import MqttConfig, MqttLink
from edgefleet.protocol.errors import TransportError

from tests.integration.brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO, TIMEOUT, Events, Inbox

pytestmark = pytest.mark.timeout(60)

MAX_PACKET = 4096  # bytes, the broker's limit in every backend


@dataclass
class Backend:
    """Makes links of one kind to one running broker; stops them at teardown."""

    factory: LinkFactory
    url: str
    restart: Callable[[], None]
    links: list[Link]

    def make(
        self,
        client_id: str,
        *,
        subscribe: tuple[str, ...] = (),
        start: bool = True,
        **config: Any,
    ) -> tuple[Link, Inbox, Events]:
        config.setdefault("reconnect_min", 0.05)
        config.setdefault("reconnect_max", 0.5)
        inbox, events = Inbox(), Events()
        link = self.factory(
            MqttConfig(url=self.url, client_id=client_id, **config),
            inbox,
            on_connect=events.on_connect,
            on_disconnect=events.on_disconnect,
        )
        for topic in subscribe:
            link.subscribe(topic)
        self.links.append(link)
        if start:
            link.start()
            assert link.wait_connected(TIMEOUT), f"{client_id}: {link.last_error}"
        return link, inbox, events

    def close(self) -> None:
        while self.links:
            self.links.pop().stop()


@pytest.fixture(params=["memory", "mosquitto"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        with InMemoryBroker(max_packet=MAX_PACKET) as memory:
            made = Backend(memory.link, memory.url, memory.restart, [])
            yield made
            made.close()
        return
    if not HAVE_MOSQUITTO:
        pytest.skip(NEED_MOSQUITTO)
    with EmbeddedBroker(
        data_dir=tmp_path / "broker", max_packet_size=MAX_PACKET, force_kind="mosquitto"
    ) as real:
        made = Backend(MqttLink, real.url, real.restart, [])
        yield made
        made.close()


def test_connected_means_subscribed(backend: Backend) -> None:
    _, inbox, events = backend.make("sub", subscribe=("c/#",))
    pub, _, _ = backend.make("pub")
    pub.publish("c/1", b"right away", qos=1)  # no wait between connected and publish
    assert inbox.wait_topic("c/1").payload == b"right away"
    assert events.connects == [False]


def test_subscribe_event_set_when_answered(backend: Backend) -> None:
    sub, inbox, _ = backend.make("sub")
    assert sub.subscribe("s/#").wait(TIMEOUT)
    pub, _, _ = backend.make("pub")
    pub.publish("s/1", b"x", qos=1)
    assert inbox.wait_topic("s/1").props.retain is False


def test_retained_on_subscribe(backend: Backend) -> None:
    pub, _, _ = backend.make("pub")
    assert pub.publish("r/1", b"kept", qos=1, retain=True).wait(TIMEOUT)
    _, inbox, _ = backend.make("sub", subscribe=("r/#",))
    got = inbox.wait_topic("r/1")
    assert (got.payload, got.props.retain) == (b"kept", True)


def test_oversize_publish_raises(backend: Backend) -> None:
    pub, _, _ = backend.make("pub")
    assert pub.max_payload == MAX_PACKET - 1024
    with pytest.raises(TransportError, match=f"at most {MAX_PACKET}"):
        pub.publish("big", b"x" * MAX_PACKET, qos=1)
    assert pub.unsent_bytes == 0
    assert pub.publish("fits", b"x" * pub.max_payload, qos=1).wait(TIMEOUT)


def test_delivery_wait_true_after_the_ack(backend: Backend) -> None:
    pub, _, _ = backend.make("pub")
    delivery = pub.publish("d", b"x", qos=1)
    assert delivery.wait(TIMEOUT) and delivery.published
    assert pub.wait_writable(0, TIMEOUT)


def test_qos1_published_while_offline_is_sent_on_connect(backend: Backend) -> None:
    _, inbox, _ = backend.make("sub", subscribe=("o/#",))
    pub, _, _ = backend.make("pub", start=False)
    with pytest.raises(TransportError, match="not connected"):
        pub.publish("o/0", b"qos0", qos=0)
    delivery = pub.publish("o/1", b"queued", qos=1)
    assert not delivery.published
    pub.start()
    assert delivery.wait(TIMEOUT)
    assert inbox.wait_topic("o/1").payload == b"queued"


def test_qos1_queued_for_an_offline_session_arrives_after_reconnect(backend: Backend) -> None:
    sub, _, _ = backend.make("sub", subscribe=("q/#",))
    pub, _, _ = backend.make("pub")
    sub.stop()
    assert pub.publish("q/1", b"while away", qos=1).wait(TIMEOUT)
    _, inbox, events = backend.make("sub", subscribe=("q/#",))
    assert inbox.wait_topic("q/1").payload == b"while away"
    assert events.connects == [True]


def test_session_survives_a_broker_restart(backend: Backend) -> None:
    _, inbox, events = backend.make("sub", subscribe=("b/#",))
    pub, _, _ = backend.make("pub")
    backend.restart()
    assert events.wait_connects(2) and events.connects[-1] is True
    pub.publish("b/1", b"after restart", qos=1)
    assert inbox.wait_topic("b/1").payload == b"after restart"


def test_message_over_max_incoming_is_not_delivered(backend: Backend) -> None:
    _, small, _ = backend.make("small", subscribe=("m/#",), max_incoming=1024)
    _, big, _ = backend.make("big", subscribe=("m/#",))
    pub, _, _ = backend.make("pub")
    pub.publish("m/large", b"x" * 2048, qos=1)
    pub.publish("m/sentinel", b"s", qos=1)  # ordered after the large one
    assert big.wait_for(lambda ms: len(ms) == 2)
    small.wait_topic("m/sentinel")
    assert small.topics() == ["m/sentinel"]


def _will(topic: str = "w/dev") -> Any:
    from edgefleet.infra.link import Will

    return Will(topic=topic, payload=b"offline", qos=1, retain=True)


def test_a_clean_stop_discards_the_will(backend: Backend) -> None:
    _, inbox, _ = backend.make("watch", subscribe=("w/#",))
    dev, _, _ = backend.make("dev", will=_will())
    dev.stop()
    marker, _, _ = backend.make("marker")
    assert marker.publish("w/marker", b"after", qos=1).wait(TIMEOUT)
    inbox.wait_topic("w/marker")
    assert inbox.topics() == ["w/marker"]


@pytest.mark.parametrize("clean_start", [False, True])
def test_a_session_takeover_publishes_the_will_only_if_the_session_ends(
    backend: Backend, clean_start: bool
) -> None:
    """As mosquitto 2.0 does: the same client resuming its session is not its death; a clean
    start (the old session discarded) is."""
    _, inbox, _ = backend.make("watch", subscribe=("w/#",))
    backend.make("dev", will=_will())
    backend.make("dev", clean_start=clean_start)  # the same client id: the first is taken over
    marker, _, _ = backend.make("marker")
    assert marker.publish("w/marker", b"after", qos=1).wait(TIMEOUT)
    inbox.wait_topic("w/marker")
    assert sorted(inbox.topics()) == (["w/dev", "w/marker"] if clean_start else ["w/marker"])
