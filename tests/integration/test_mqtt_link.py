"""MqttLink against a real broker on loopback: the traps of ARCHITECTURE §4, one test each."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from edgefleet.infra.broker import EmbeddedBroker
from edgefleet.infra.link.mqtt import HEADER_ALLOWANCE, MqttConfig, MqttLink, TransportError

from .brokers import (
    HAVE_MOSQUITTO,
    NEED_MOSQUITTO,
    TIMEOUT,
    Client,
    Events,
    Inbox,
    LinkFactory,
    SecureBroker,
    make_tls,
)

needs_mosquitto = pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
pytestmark = pytest.mark.timeout(60)


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://127.0.0.1:1884", "127.0.0.1", 1884, False),
        ("mqtt://broker.local", "broker.local", 1883, False),
        ("mqtts://broker.local", "broker.local", 8883, True),
        ("mqtts://[::1]:9999/", "::1", 9999, True),
    ],
)
def test_config_parses_url(url: str, host: str, port: int, tls: bool) -> None:
    config = MqttConfig(url=url, client_id="c")
    assert (config.host, config.port, config.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "http://h:1"}, "expected mqtt"),
        ({"url": "mqtt://:1883"}, "expected mqtt"),
        ({"url": "mqtt://h:99999"}, "bad MQTT URL"),
        ({"url": "mqtt://h:1/topic"}, "scheme://host:port only"),
        ({"url": "mqtt://u:p@h:1"}, "scheme://host:port only"),
        ({"client_id": ""}, "client_id"),
        ({"protocol": 4}, "protocol"),
        ({"password": "x"}, "without username"),
        ({"url": "mqtts://h", "tls_cert": Path("c")}, "together"),
        ({"tls_ca": Path("ca")}, "use mqtts"),
        ({"keepalive": 0}, "keepalive"),
        ({"reconnect_min": 5, "reconnect_max": 1}, "reconnect_min"),
        ({"max_inflight": 0}, "max_inflight"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"url": "mqtt://127.0.0.1:1883", "client_id": "c", **kwargs}
    with pytest.raises(ValueError, match=match):
        MqttConfig(**args)  # type: ignore[arg-type]


def test_config_repr_hides_password() -> None:
    config = MqttConfig(url="mqtt://h", client_id="c", username="u", password="s3cret-pw")
    assert "s3cret-pw" not in repr(config)


# -- pub/sub -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [5, 311])
def test_round_trip_qos1(broker: EmbeddedBroker, links: LinkFactory, protocol: int) -> None:
    if protocol == 5 and broker.protocol != 5:
        pytest.skip("amqtt speaks MQTT 3.1.1 only")
    sub = links.make(broker, "sub", subscribe=("ef/v1/dev/d1/chunk",), protocol=protocol)
    pub = links.make(broker, "pub", protocol=protocol)
    info = pub.link.publish(
        "ef/v1/dev/d1/chunk", b"\x00payload\xff", response_topic="r/t", correlation_data=b"id-1"
    )
    info.wait(TIMEOUT)
    got = sub.inbox.wait_topic("ef/v1/dev/d1/chunk")
    assert got.payload == b"\x00payload\xff"
    assert got.props.qos == 1
    v5 = protocol == 5
    assert got.props.response_topic == ("r/t" if v5 else None)
    assert got.props.correlation_data == (b"id-1" if v5 else None)


def test_tcp_nodelay_is_set(broker: EmbeddedBroker, links: LinkFactory) -> None:
    client = links.make(broker, "nodelay")
    sock = client.link._client.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_subscribe_after_connect_is_acknowledged(
    broker: EmbeddedBroker, links: LinkFactory
) -> None:
    sub = links.make(broker, "late-sub")
    assert sub.link.subscribe("late/topic").wait(TIMEOUT)
    links.make(broker, "pub").link.publish("late/topic", b"x")
    assert sub.inbox.wait_topic("late/topic").payload == b"x"


def test_failing_handler_drops_message_and_link_survives(
    broker: EmbeddedBroker, links: LinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sub = links.make(broker, "fragile", subscribe=("t/#",))
    original = sub.link._on_message

    def explode(topic: str, payload: bytes, props: object) -> None:
        if payload == b"bad":
            raise RuntimeError("handler bug")
        original(topic, payload, props)  # type: ignore[arg-type]

    sub.link._on_message = explode
    pub = links.make(broker, "pub")
    pub.link.publish("t/1", b"bad")
    pub.link.publish("t/2", b"good")
    assert sub.inbox.wait_topic("t/2").payload == b"good"
    assert sub.link.connected.is_set()
    assert "dropped MQTT message on t/1" in caplog.text


# -- packet size ---------------------------------------------------------------------------


@needs_mosquitto
def test_oversize_publish_raises_and_link_stays_connected(
    tmp_path: Path, links: LinkFactory
) -> None:
    limit = 8192
    with EmbeddedBroker(data_dir=tmp_path, max_packet_size=limit) as small:
        sub = links.make(small, "sub", subscribe=("big/#",))
        pub = links.make(small, "pub")
        assert pub.link.max_payload == limit - HEADER_ALLOWANCE
        with pytest.raises(TransportError, match="at most 8192"):
            pub.link.publish("big/1", b"x" * limit)
        # A packet of exactly the limit is accepted: our size arithmetic matches paho's framing.
        topic = "big/2"
        exact = limit - (1 + 2 + 2 + len(topic) + 2 + 1)  # fixed hdr, topic len, id, props
        pub.link.publish(topic, b"y" * exact).wait(TIMEOUT)
        with pytest.raises(TransportError):
            pub.link.publish(topic, b"y" * (exact + 1))
        assert len(sub.inbox.wait_topic(topic).payload) == exact
        assert pub.link.connected.is_set() and pub.events.disconnects == []
        assert [m.topic for m in sub.inbox.messages] == [topic]
        links.close()


def test_default_max_packet_applies_when_broker_announces_none(
    broker: EmbeddedBroker, links: LinkFactory
) -> None:
    pub = links.make(broker, "pub", default_max_packet=4096)
    assert pub.link.max_payload == 4096 - HEADER_ALLOWANCE
    with pytest.raises(TransportError):
        pub.link.publish("t", b"z" * 4096)
    assert pub.link.connected.is_set()


def test_full_outgoing_queue_raises(broker: EmbeddedBroker, links: LinkFactory) -> None:
    pub = links.make(broker, "queued", start=False, max_queued=3)
    for i in range(3):  # not connected yet: QoS 1 messages wait in paho's queue
        pub.link.publish("q", bytes([i]))
    with pytest.raises(TransportError, match="queue full"):
        pub.link.publish("q", b"overflow")
    with pytest.raises(TransportError, match="QoS 0"):
        pub.link.publish("q", b"lost", qos=0)


@needs_mosquitto
def test_max_incoming_is_announced_and_larger_messages_never_arrive(
    broker: EmbeddedBroker, links: LinkFactory
) -> None:
    limit = 8192
    sub = links.make(broker, "small-sub", subscribe=("in/#",), max_incoming=limit)
    pub = links.make(broker, "big-pub", default_max_packet=1 << 22)
    pub.link.publish("in/big", b"b" * limit).wait(TIMEOUT)  # the broker takes it...
    pub.link.publish("in/small", b"s" * (limit - 100)).wait(TIMEOUT)
    assert len(sub.inbox.wait_topic("in/small").payload) == limit - 100
    assert sub.inbox.topics() == ["in/small"]  # ...but never sends it to us: same publisher,
    assert sub.link.connected.is_set() and sub.events.disconnects == []  # so it was dropped


@pytest.mark.parametrize("bad", [0, 268_435_456])
def test_max_incoming_must_fit_mqtt(bad: int) -> None:
    with pytest.raises(ValueError, match="max_incoming"):
        MqttConfig(url="mqtt://h", client_id="c", max_incoming=bad)


# -- backpressure: unsent bytes ------------------------------------------------------------


class StalledBroker:
    """A fake MQTT server on loopback: it accepts one CONNECT and then reads nothing until
    ``drain()`` (a consumer that stopped), so what a client publishes piles up unsent."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self._server.getsockname()[1]}"
        self._conn: socket.socket | None = None
        self._drain = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        self._conn = conn
        assert conn.recv(1) == b"\x10"  # CONNECT
        remaining, shift = 0, 0
        while (byte := conn.recv(1)[0]) & 0x80:
            remaining, shift = remaining | (byte & 0x7F) << shift, shift + 7
        remaining |= byte << shift
        while remaining:
            remaining -= len(conn.recv(remaining))
        conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK v5: accepted, no properties
        self._drain.wait()
        try:
            while conn.recv(1 << 20):
                pass
        except OSError:
            pass

    def drain(self) -> None:
        self._drain.set()

    def drop_connection(self) -> None:
        assert self._conn is not None
        self._conn.shutdown(socket.SHUT_RDWR)
        self._conn.close()

    def close(self) -> None:
        self._drain.set()
        self._server.close()


def test_unsent_bytes_rise_with_qos0_publishes_and_fall_as_the_socket_takes_them() -> None:
    stalled = StalledBroker()
    events = Events()
    config = MqttConfig(url=stalled.url, client_id="bulk", default_max_packet=1 << 21)
    link = MqttLink(config, Inbox(), on_disconnect=events.on_disconnect)
    try:
        link.start()
        assert link.wait_connected(TIMEOUT)
        assert link.unsent_bytes == 0 and link.wait_writable(0, timeout=0)
        chunk = b"c" * (1 << 20)
        for _ in range(48):  # 48 MB: far more than loopback socket buffers hold
            link.publish("bulk/chunk", chunk, qos=0)
        assert link.unsent_bytes > 16 << 20  # the consumer reads nothing: it stays queued
        assert not link.wait_writable(16 << 20, timeout=0.2)  # nothing drains: times out
        assert link.wait_writable(1 << 40, timeout=0)  # under a larger limit: at once

        stalled.drain()
        assert link.wait_writable(0, timeout=TIMEOUT)  # each write -> on_publish -> less unsent
        assert link.unsent_bytes == 0
    finally:
        link.stop()
        stalled.close()


def test_unsent_qos0_bytes_are_forgotten_when_the_connection_drops() -> None:
    stalled = StalledBroker()
    events = Events()
    config = MqttConfig(url=stalled.url, client_id="bulk", reconnect_min=5, reconnect_max=5)
    link = MqttLink(config, Inbox(), on_disconnect=events.on_disconnect)
    try:
        link.start()
        assert link.wait_connected(TIMEOUT)
        for _ in range(48):
            link.publish("bulk/chunk", b"c" * 1000_000, qos=0)
        assert link.unsent_bytes > 16 << 20
        results: list[bool] = []
        waiter = threading.Thread(target=lambda: results.append(link.wait_writable(0, TIMEOUT)))
        waiter.start()
        stalled.drop_connection()  # paho discards queued QoS 0 packets: nothing will drain them
        waiter.join(TIMEOUT)
        assert results == [True] and link.unsent_bytes == 0
        assert events.wait_disconnects(1)
    finally:
        link.stop()
        stalled.close()


def test_qos1_bytes_count_until_acknowledged(broker: EmbeddedBroker, links: LinkFactory) -> None:
    pub = links.make(broker, "acked", start=False)
    info = pub.link.publish("q1", b"x" * 1000)  # not connected: paho queues it
    assert 1000 < pub.link.unsent_bytes < 1100
    assert not pub.link.wait_writable(0, timeout=0)
    pub.link.start()
    assert pub.link.wait_writable(0, timeout=TIMEOUT)  # sent on connect, then PUBACKed
    assert info.published and pub.link.unsent_bytes == 0


def test_wait_writable_returns_after_stop(broker: EmbeddedBroker, links: LinkFactory) -> None:
    pub = links.make(broker, "stopping", start=False)
    pub.link.publish("q1", b"x" * 1000)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(pub.link.wait_writable(0, TIMEOUT)))
    waiter.start()
    pub.link.stop()  # nothing will ever drain it: the waiter gets False now, not at the timeout
    waiter.join(TIMEOUT)
    assert results == [False]
    with pytest.raises(ValueError, match="max_unsent"):
        pub.link.wait_writable(-1, timeout=0)


# -- sessions and reconnects ---------------------------------------------------------------


@needs_mosquitto
@pytest.mark.parametrize("protocol", [5, 311])
def test_session_survives_broker_restart(
    broker: EmbeddedBroker, links: LinkFactory, protocol: int
) -> None:
    topic = "ef/v1/dev/d1/chunk"
    sub = links.make(broker, "d1", subscribe=(topic,), protocol=protocol)
    sub.link.stop()  # offline; the broker keeps the session and queues for it
    pub = links.make(broker, "coord", protocol=protocol)
    pub.link.publish(topic, b"while-offline").wait(TIMEOUT)
    broker.restart()  # persistence must carry the session and the queued message
    again = links.make(broker, "d1", protocol=protocol)  # same client id, no subscribe call
    assert again.events.connects == [True]  # session present
    assert again.inbox.wait_topic(topic).payload == b"while-offline"


@needs_mosquitto
def test_publish_during_broker_outage_is_delivered(
    broker: EmbeddedBroker, links: LinkFactory
) -> None:
    topic = "ef/v1/dev/d1/chunk"
    sub = links.make(broker, "d1", subscribe=(topic,))
    pub = links.make(broker, "coord")
    broker.stop()
    assert sub.events.wait_disconnects(1) and pub.events.wait_disconnects(1)
    info = pub.link.publish(topic, b"during-outage")  # queued by paho until reconnect
    broker.start()
    info.wait(TIMEOUT)
    assert sub.inbox.wait_topic(topic).payload == b"during-outage"
    assert sub.events.connects == [False, True]


def test_resubscribes_after_reconnect_when_session_lost(
    broker: EmbeddedBroker, links: LinkFactory
) -> None:
    # session_expiry=0 (v5) / clean_start (3.1.1): the broker forgets us on disconnect.
    sub = links.make(broker, "forgetful", subscribe=("re/sub",), session_expiry=0, clean_start=True)
    broker.restart()
    assert sub.events.wait_connects(2), sub.link.last_error
    assert sub.events.connects == [False, False]  # nothing kept: only our re-subscribe helps
    assert sub.link.wait_connected(TIMEOUT)  # set only after the re-subscribe was acked
    pub = links.make(broker, "pub")
    pub.link.publish("re/sub", b"after-restart")
    assert sub.inbox.wait_topic("re/sub").payload == b"after-restart"


# -- auth, ACL, TLS ------------------------------------------------------------------------


def test_wrong_password_is_refused_with_a_reason(
    secure_broker: SecureBroker, links: LinkFactory
) -> None:
    bad = links.make(
        secure_broker.broker, "dev-a", wait=False, username="dev-a", password="not-the-password"
    )
    assert bad.events.wait_disconnects(1)
    assert not bad.link.connected.is_set()
    assert bad.link.last_error is not None
    assert "Not authorized" in bad.link.last_error or "password" in bad.link.last_error


def test_unreachable_broker_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as placeholder:  # a loopback port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        url = f"mqtt://127.0.0.1:{placeholder.getsockname()[1]}"
        events = Events()
        config = MqttConfig(url=url, client_id="lonely", reconnect_min=0.05, reconnect_max=0.05)
        link = MqttLink(config, Inbox(), on_disconnect=events.on_disconnect)
        link.start()
        try:
            assert events.wait_disconnects(3)
        finally:
            link.stop()
    assert events.disconnects[:3] == ["cannot connect"] * 3
    assert not link.connected.is_set()
    assert link.last_error == f"cannot connect to {url}"
    assert caplog.text.count("cannot connect to") == 1  # one WARNING, not one per retry


def _login(
    secure: SecureBroker,
    links: LinkFactory,
    user: str,
    client_id: str | None = None,
    subscribe: tuple[str, ...] = (),
    inbox: Inbox | None = None,
) -> Client:
    return links.make(
        secure.broker,
        client_id or user,
        subscribe=subscribe,
        inbox=inbox,
        username=user,
        password=secure.passwords[user],
    )


def test_acl_device_reads_only_its_own_topics(
    secure_broker: SecureBroker, links: LinkFactory
) -> None:
    coord = _login(secure_broker, links, "coordinator", subscribe=("ef/v1/#",))
    dev_a = _login(
        secure_broker, links, "dev-a", subscribe=("ef/v1/dev/+/release", "ef/v1/dev/dev-b/release")
    )
    for device in ("dev-b", "dev-a"):  # dev-a's message is the sentinel: same order everywhere
        coord.link.publish(f"ef/v1/dev/{device}/release", device.encode(), retain=True)
    dev_a.inbox.wait_topic("ef/v1/dev/dev-a/release")
    coord.inbox.wait_topic("ef/v1/dev/dev-a/release")
    assert coord.inbox.topics() == ["ef/v1/dev/dev-b/release", "ef/v1/dev/dev-a/release"]
    assert dev_a.inbox.topics() == ["ef/v1/dev/dev-a/release"]
    # Retained copies obey the ACL too: a fresh dev-a session sees only its own offer.
    late = _login(
        secure_broker,
        links,
        "dev-a",
        "dev-a-late",
        subscribe=("ef/v1/dev/+/release", "ef/v1/dev/dev-a/chunk"),
    )
    coord.link.publish("ef/v1/dev/dev-a/chunk", b"sentinel")
    late.inbox.wait_topic("ef/v1/dev/dev-a/chunk")
    assert [(m.topic, m.payload) for m in late.inbox.messages][0] == (
        "ef/v1/dev/dev-a/release",
        b"dev-a",
    )
    assert "ef/v1/dev/dev-b/release" not in late.inbox.topics()


def test_acl_device_writes_only_its_own_up_topics(
    secure_broker: SecureBroker, links: LinkFactory
) -> None:
    coord = _login(secure_broker, links, "coordinator", subscribe=("ef/v1/#",))
    dev_a = _login(secure_broker, links, "dev-a", subscribe=("ef/v1/dev/dev-a/release",))
    dev_a.link.publish("ef/v1/dev/dev-a/release", b"forged offer", retain=True)
    dev_a.link.publish("ef/v1/dev/dev-b/up/status", b"impersonation")
    dev_a.link.publish("ef/v1/dev/dev-a/up/status", b"ok", retain=True)  # allowed: sentinel
    assert coord.inbox.wait_topic("ef/v1/dev/dev-a/up/status").payload == b"ok"
    assert coord.inbox.topics() == ["ef/v1/dev/dev-a/up/status"]
    assert dev_a.inbox.topics() == []  # its own forged release never came back either


def test_coordinators_share_chunk_requests(secure_broker: SecureBroker, links: LinkFactory) -> None:
    shared = "$share/g/ef/v1/dev/+/up/chunkreq"
    cond = threading.Condition()  # one condition: a wait sees messages to either coordinator
    coords = [
        _login(secure_broker, links, "coordinator", f"coord-{i}", (shared,), Inbox(cond))
        for i in (1, 2)
    ]
    devices = {d: _login(secure_broker, links, d) for d in ("dev-a", "dev-b")}
    for n in range(10):
        for name, dev in devices.items():
            dev.link.publish(f"ef/v1/dev/{name}/up/chunkreq", f"{n}".encode())

    def total() -> int:
        return sum(len(c.inbox.messages) for c in coords)

    assert coords[0].inbox.wait_for(lambda _: total() >= 20)
    assert total() == 20
    assert all(c.inbox.messages for c in coords), "both coordinators must get a share"
    seen = sorted((m.topic, m.payload) for c in coords for m in c.inbox.messages)
    assert len(set(seen)) == 20


@needs_mosquitto
def test_tls_with_client_certificate(tmp_path: Path, links: LinkFactory) -> None:
    tls = make_tls(tmp_path)
    with EmbeddedBroker(data_dir=tmp_path / "data", tls=tls.server) as secure:
        assert secure.url.startswith("mqtts://")
        sub = links.make(
            secure,
            "tls-sub",
            subscribe=("t",),
            tls_ca=tls.server.ca,
            tls_cert=tls.client_cert,
            tls_key=tls.client_key,
        )
        pub = links.make(
            secure,
            "tls-pub",
            tls_ca=tls.server.ca,
            tls_cert=tls.client_cert,
            tls_key=tls.client_key,
        )
        pub.link.publish("t", b"over tls")
        assert sub.inbox.wait_topic("t").payload == b"over tls"
        tls_sock = sub.link._client.socket()
        assert tls_sock is not None
        assert tls_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        links.close()
