"""InMemoryBroker semantics: what mosquitto 2.0 does, in process (see infra/link/memory.py).

"Never arrives" is shown with sentinels: a publisher's later message reaches a subscriber
after its earlier ones would have (delivery is ordered per publisher and subscriber).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from edgefleet.infra.link import InMemoryBroker, InMemoryLink, LinkFactory, MessageProps
from edgefleet.infra.link.mqtt import MqttConfig
from edgefleet.protocol import topics
from edgefleet.protocol.errors import TransportError

from tests.integration.brokers import TIMEOUT, Events, Inbox

pytestmark = pytest.mark.timeout(60)

SENTINEL = b"sentinel"


class Clients:
    """Links to one in-memory broker, stopped at teardown."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker
        self.links: list[InMemoryLink] = []

    def make(
        self,
        client_id: str,
        *,
        subscribe: tuple[str, ...] = (),
        start: bool = True,
        wait: bool = True,
        inbox: Inbox | None = None,
        **config: Any,
    ) -> tuple[InMemoryLink, Inbox, Events]:
        config.setdefault("reconnect_min", 0.01)
        config.setdefault("reconnect_max", 0.05)
        inbox, events = inbox or Inbox(), Events()
        factory: LinkFactory = self.broker.link
        link = factory(
            MqttConfig(url=self.broker.url, client_id=client_id, **config),
            inbox,
            on_connect=events.on_connect,
            on_disconnect=events.on_disconnect,
        )
        assert isinstance(link, InMemoryLink)
        for topic in subscribe:
            link.subscribe(topic)
        self.links.append(link)
        if start:
            link.start()
            if wait:
                assert link.wait_connected(TIMEOUT), f"{client_id}: {link.last_error}"
        return link, inbox, events


@pytest.fixture
def broker() -> Iterator[InMemoryBroker]:
    with InMemoryBroker() as running:
        yield running


@pytest.fixture
def clients(broker: InMemoryBroker) -> Iterator[Clients]:
    made = Clients(broker)
    yield made
    for link in made.links:
        link.stop()


def _flush(pub: InMemoryLink, inbox: Inbox, topic: str = "t/sentinel") -> None:
    """Publish a sentinel and wait for it: everything ``pub`` sent before has arrived too."""
    pub.publish(topic, SENTINEL, qos=1)
    assert inbox.wait_for(lambda ms: any(m.payload == SENTINEL for m in ms))


def _payloads(inbox: Inbox, topic: str) -> list[bytes]:
    return [m.payload for m in inbox.messages if m.topic == topic]


# -- basics ------------------------------------------------------------------------------------


def test_publish_subscribe_in_order_on_the_links_own_thread(clients: Clients) -> None:
    import threading

    threads: set[str] = set()
    sub, inbox, _ = clients.make("sub", subscribe=("a/#",))
    pub, _, _ = clients.make("pub")
    original = sub._on_message

    def record(topic: str, payload: bytes, props: Any) -> None:
        threads.add(threading.current_thread().name)
        original(topic, payload, props)

    sub._on_message = record
    for i in range(50):
        pub.publish("a/b", str(i).encode(), qos=i % 2)
    assert inbox.wait_for(lambda ms: len(ms) == 50)
    assert [m.payload for m in inbox.messages] == [str(i).encode() for i in range(50)]
    assert threads == {"memlink-sub"}


def test_delivery_handle_and_unsent_bytes(clients: Clients) -> None:
    pub, _, _ = clients.make("pub")
    delivery = pub.publish("a", b"x" * 100, qos=1)
    assert delivery.wait(TIMEOUT) and delivery.published
    assert pub.wait_writable(0, TIMEOUT) and pub.unsent_bytes == 0


def test_v5_properties_carried_and_dropped_on_311(clients: Clients) -> None:
    _, v5, _ = clients.make("v5", subscribe=("q",))
    _, v3, _ = clients.make("v3", subscribe=("q",), protocol=311)
    pub, _, _ = clients.make("pub")
    pub.publish("q", b"1", qos=1, response_topic="r", correlation_data=b"c")
    got5, got3 = v5.wait_topic("q").props, v3.wait_topic("q").props
    assert (got5.response_topic, got5.correlation_data) == ("r", b"c")
    assert (got3.response_topic, got3.correlation_data) == (None, None)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda link: link.publish("a/+", b"x"), ValueError),
        (lambda link: link.publish("a", b"x", qos=3), ValueError),
        (lambda link: link.subscribe("a/#/b"), ValueError),
        (lambda link: link.subscribe("a", qos=-1), ValueError),
        (lambda link: link.wait_writable(-1, 1.0), ValueError),
        (lambda link: link.start(), RuntimeError),  # already started
    ],
)
def test_bad_calls(clients: Clients, call: Any, error: type[Exception]) -> None:
    link, _, _ = clients.make("c")
    with pytest.raises(error):
        call(link)


def test_memory_link_does_not_import_paho() -> None:
    code = "import sys, edgefleet.infra.link as m; m.InMemoryBroker(); print('paho' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- retained ----------------------------------------------------------------------------------


def test_retained_delivered_on_every_subscribe_and_cleared_by_empty_payload(
    clients: Clients, broker: InMemoryBroker
) -> None:
    pub, _, _ = clients.make("pub")
    assert pub.publish("r/1", b"one", qos=1, retain=True).wait(TIMEOUT)
    assert pub.publish("r/2", b"two", qos=1, retain=True).wait(TIMEOUT)
    sub, inbox, _ = clients.make("sub", subscribe=("r/+",))
    assert inbox.wait_for(lambda ms: len(ms) == 2)
    assert {(m.topic, m.payload, m.props.retain) for m in inbox.messages} == {
        ("r/1", b"one", True),
        ("r/2", b"two", True),
    }
    assert sub.subscribe("r/1").wait(TIMEOUT)  # a new SUBSCRIBE delivers it again
    assert inbox.wait_for(lambda ms: len(ms) == 3)
    pub.publish("r/1", b"", qos=1, retain=True)  # clears, and is delivered live
    pub.publish("r/2", b"live", qos=1)
    assert inbox.wait_for(lambda ms: len(ms) == 5)
    assert [(m.payload, m.props.retain) for m in inbox.messages[3:]] == [
        (b"", False),
        (b"live", False),
    ]
    assert broker.retained == {"r/2": b"two"}
    _, again, _ = clients.make("late", subscribe=("r/#",))
    assert again.wait_for(lambda ms: len(ms) == 1)
    _flush(pub, again, "r/sentinel")
    assert [m.topic for m in again.messages] == ["r/2", "r/sentinel"]


def test_no_retained_for_shared_subscriptions(clients: Clients) -> None:
    pub, _, _ = clients.make("pub")
    assert pub.publish("s/1", b"kept", qos=1, retain=True).wait(TIMEOUT)
    _, inbox, _ = clients.make("member", subscribe=("$share/g/s/#",))
    _flush(pub, inbox, "s/sentinel")
    assert inbox.topics() == ["s/sentinel"]


# -- shared subscriptions ----------------------------------------------------------------------


def test_share_round_robin_and_plain_subscribers_get_all(clients: Clients) -> None:
    _, a, _ = clients.make("a", subscribe=("$share/g/job/+",))
    _, b, _ = clients.make("b", subscribe=("$share/g/job/+",))
    _, other, _ = clients.make("other", subscribe=("$share/h/job/+",))
    _, plain, _ = clients.make("plain", subscribe=("job/+", "job/#"))  # overlapping: one copy
    pub, _, _ = clients.make("pub")
    for i in range(10):
        pub.publish(f"job/{i}", b"x", qos=1)
    assert plain.wait_for(lambda ms: len(ms) == 10)
    assert a.wait_for(lambda ms: len(ms) == 5) and b.wait_for(lambda ms: len(ms) == 5)
    assert other.wait_for(lambda ms: len(ms) == 10)
    assert set(a.topics()).isdisjoint(b.topics())
    _flush(pub, plain, "job/done")
    assert len(plain.messages) == 11


# -- ACL ---------------------------------------------------------------------------------------


PASSWORDS = {"coordinator": "pw-c", "dev-a": "pw-a", "dev-b": "pw-b"}


@pytest.fixture
def secure() -> Iterator[Clients]:
    with InMemoryBroker(users=PASSWORDS, acl=topics.acl("coordinator")) as broker:
        made = Clients(broker)
        yield made
        for link in made.links:
            link.stop()


def _login(secure: Clients, user: str, client_id: str, subscribe: tuple[str, ...] = ()) -> Any:
    return secure.make(client_id, username=user, password=PASSWORDS[user], subscribe=subscribe)


def test_acl_denied_publish_is_dropped_and_reads_confined(secure: Clients) -> None:
    _, watch, _ = _login(secure, "coordinator", "watch", ("ef/v1/#",))
    rogue, seen, _ = _login(secure, "dev-a", "rogue", ("ef/v1/#",))
    coord, _, _ = _login(secure, "coordinator", "coord")
    denied = [topics.release("dev-a"), topics.up("dev-b", "status"), "ef/v1/other"]
    for topic in denied:
        assert rogue.publish(topic, b"rogue", qos=1).wait(TIMEOUT)  # acknowledged anyway
    rogue.publish(topics.up("dev-a", "status"), SENTINEL, qos=1)
    assert watch.wait_for(lambda ms: any(m.payload == SENTINEL for m in ms))
    assert watch.topics() == [topics.up("dev-a", "status")]
    assert secure.broker.dropped["acl_write"] == 3
    coord.publish(topics.release("dev-b"), b"for b", qos=1)
    coord.publish(topics.release("dev-a"), SENTINEL, qos=1)
    assert seen.wait_for(lambda ms: any(m.payload == SENTINEL for m in ms))
    assert seen.topics() == [topics.release("dev-a")]  # not dev-b's, not its own up/status


def test_acl_applies_to_retained_messages(secure: Clients) -> None:
    coord, _, _ = _login(secure, "coordinator", "coord")
    for dev in ("dev-a", "dev-b"):
        assert coord.publish(topics.release(dev), dev.encode(), qos=1, retain=True).wait(TIMEOUT)
    _, seen, _ = _login(secure, "dev-a", "a", ("ef/v1/dev/+/release",))
    _flush(coord, seen, topics.release("dev-a"))
    assert seen.topics() == [topics.release("dev-a")] * 2
    assert secure.broker.dropped["acl_read"] >= 1


def test_share_member_without_read_loses_its_share(secure: Clients) -> None:
    """mosquitto 2.0: the share is granted, then the messages picked for it are lost."""
    shared = topics.chunk_requests_shared()
    _, coord_in, _ = _login(secure, "coordinator", "coord", (shared,))
    _, rogue_in, _ = _login(secure, "dev-b", "rogue", (shared,))
    dev, _, _ = _login(secure, "dev-a", "dev-a")
    for i in range(6):
        dev.publish(topics.up("dev-a", "chunkreq"), str(i).encode(), qos=1)
    assert coord_in.wait_for(lambda ms: len(ms) == 3)
    dev.publish(topics.up("dev-a", "status"), b"done", qos=1).wait(TIMEOUT)
    assert secure.broker.dropped["acl_share"] == 3
    assert rogue_in.messages == []
    assert len(coord_in.messages) == 3


@pytest.fixture
def hardened() -> Iterator[Clients]:
    """The generated broker config: dynamic-security SUBSCRIBE checks, device client ids."""
    bound = {d: topics.device_client_id(d) for d in ("dev-a", "dev-b")}
    with InMemoryBroker(users=PASSWORDS, acl=topics.acl("coordinator"), auth="dynsec",
                        client_ids=bound) as broker:  # fmt: skip
        made = Clients(broker)
        yield made
        for link in made.links:
            link.stop()


def test_dynsec_refuses_a_device_the_coordinators_share(hardened: Clients) -> None:
    shared = topics.chunk_requests_shared()
    _, coord_in, _ = _login(hardened, "coordinator", "coord", (shared,))
    _, rogue_in, _ = _login(hardened, "dev-b", "agent-dev-b", (shared, "ef/v1/dev/#"))
    dev, _, _ = _login(hardened, "dev-a", "agent-dev-a")
    for i in range(6):
        dev.publish(topics.up("dev-a", "chunkreq"), str(i).encode(), qos=1)
    assert coord_in.wait_for(lambda ms: len(ms) == 6)  # every request: none lost to the rogue
    assert hardened.broker.refused_subscriptions == 2
    assert hardened.broker.dropped.get("acl_share", 0) == 0
    assert rogue_in.messages == []


def test_dynsec_grants_a_device_only_its_own_filters(hardened: Clients) -> None:
    wanted = (topics.release("dev-a"), topics.chunk("dev-a"), "ef/v1/dev/+/release")
    _, seen, _ = _login(hardened, "dev-a", "agent-dev-a", wanted)
    coord, _, _ = _login(hardened, "coordinator", "coord")
    coord.publish(topics.release("dev-b"), b"for b", qos=1)
    coord.publish(topics.release("dev-a"), SENTINEL, qos=1)
    assert seen.wait_for(lambda ms: any(m.payload == SENTINEL for m in ms))
    assert seen.topics() == [topics.release("dev-a")]
    assert hardened.broker.refused_subscriptions == 1
    assert hardened.broker.dropped.get("acl_read", 0) == 0  # refused up front, not filtered


def test_dynsec_binds_device_accounts_to_their_client_id(hardened: Clients) -> None:
    victim, _, victim_events = _login(hardened, "dev-a", "agent-dev-a")
    coord, _, coord_events = _login(hardened, "coordinator", "coordinator-1")
    _login(hardened, "coordinator", "coordinator-2")  # coordinators: any id, side by side
    for stolen in ("agent-dev-a", "coordinator-1"):
        rogue, _, events = hardened.make(stolen, username="dev-b", password=PASSWORDS["dev-b"],
                                         wait=False)  # fmt: skip
        assert events.wait_disconnects(2) and set(events.disconnects) == {"Not authorized"}
        rogue.stop()
    assert victim_events.disconnects == [] and coord_events.disconnects == []
    assert hardened.broker.connected_clients() == {"agent-dev-a", "coordinator-1", "coordinator-2"}


def test_auth_refused_then_retried(secure: Clients) -> None:
    link, _, events = secure.make("x", username="dev-a", password="wrong", wait=False)
    assert events.wait_disconnects(2)  # refused, and retried with backoff
    assert set(events.disconnects) == {"Not authorized"}
    assert "Not authorized" in str(link.last_error)
    assert not link.connected.is_set() and events.connects == []
    anon, _, anon_events = secure.make("anon", wait=False)
    assert anon_events.wait_disconnects(1) and not anon.connected.is_set()


# -- QoS 0, packet sizes -----------------------------------------------------------------------


def test_qos0_lost_while_offline_qos1_queued(clients: Clients, broker: InMemoryBroker) -> None:
    sub, inbox, events = clients.make("sub", subscribe=("q/#",))
    pub, _, _ = clients.make("pub")
    sub.stop()
    pub.publish("q/0", b"lost", qos=0)
    pub.publish("q/1", b"kept", qos=1).wait(TIMEOUT)
    assert broker.session_queue("sub") == 1
    again, inbox2, events2 = clients.make("sub", subscribe=("q/#",))
    assert events2.connects == [True]
    _flush(pub, inbox2, "q/sentinel")
    assert inbox2.topics() == ["q/1", "q/sentinel"]
    assert broker.dropped["offline_qos0"] == 1


def test_qos0_publish_while_disconnected_raises_qos1_is_sent_on_connect(
    clients: Clients,
) -> None:
    _, inbox, _ = clients.make("sub", subscribe=("q",))
    pub, _, _ = clients.make("pub", start=False)
    with pytest.raises(TransportError, match="not connected"):
        pub.publish("q", b"0", qos=0)
    delivery = pub.publish("q", b"1", qos=1)
    assert not delivery.published and pub.unsent_bytes > 0
    pub.start()
    assert delivery.wait(TIMEOUT)
    assert inbox.wait_topic("q").payload == b"1"


def test_outgoing_queue_bound(clients: Clients) -> None:
    pub, _, _ = clients.make("pub", start=False, max_queued=2)
    pub.publish("q", b"1")
    pub.publish("q", b"2")
    with pytest.raises(TransportError, match="queue full"):
        pub.publish("q", b"3")


def test_oversize_publish_raises_before_anything_is_queued() -> None:
    with InMemoryBroker(max_packet=4096) as broker:
        made = Clients(broker)
        pub, _, _ = made.make("pub")
        assert pub.max_payload == 4096 - 1024
        with pytest.raises(TransportError, match="at most 4096"):
            pub.publish("big", b"x" * 4096, qos=1)
        assert pub.unsent_bytes == 0
        assert pub.publish("ok", b"x" * pub.max_payload, qos=1).wait(TIMEOUT)
        v3, _, _ = made.make("v3", protocol=311, default_max_packet=8192)
        assert v3.max_payload == 8192 - 1024  # 3.1.1 hears no maximum
        assert v3.publish("big", b"x" * 5000, qos=1).wait(TIMEOUT)  # broker drops it
        assert broker.dropped["too_large"] == 1
        for link in made.links:
            link.stop()


def test_message_over_max_incoming_not_delivered(clients: Clients, broker: InMemoryBroker) -> None:
    _, small, _ = clients.make("small", subscribe=("m/#",), max_incoming=2048)
    _, big, _ = clients.make("big", subscribe=("m/#",))
    pub, _, _ = clients.make("pub")
    pub.publish("m/large", b"x" * 4096, qos=1)
    _flush(pub, small, "m/sentinel")
    assert small.topics() == ["m/sentinel"]
    assert big.wait_for(lambda ms: len(ms) == 2)
    assert broker.dropped["too_large_for_client"] == 1


def test_slow_subscriber_pipe_is_bounded() -> None:
    import threading

    release = threading.Event()
    with InMemoryBroker(max_queued=5, max_inflight=0) as broker:
        made = Clients(broker)
        got = Inbox()

        def slow(topic: str, payload: bytes, props: Any) -> None:
            release.wait(TIMEOUT)
            got(topic, payload, props)

        sub, _, _ = made.make("sub", subscribe=("s",))
        sub._on_message = slow
        pub, _, _ = made.make("pub")
        last = None
        for i in range(20):
            last = pub.publish("s", str(i).encode(), qos=1)
        assert last is not None and last.wait(TIMEOUT)
        dropped = broker.dropped["queue_full"]  # final: the broker took all 20
        assert 14 <= dropped <= 15  # five in the pipe, perhaps one more in the handler
        release.set()
        assert got.wait_for(lambda ms: len(ms) == 20 - dropped)
        for link in made.links:
            link.stop()


# -- sessions, restart, takeover, faults -------------------------------------------------------


def test_persistent_session_survives_restart_with_queued_qos1(clients: Clients) -> None:
    broker = clients.broker
    sub, inbox, events = clients.make("sub", subscribe=("p/#",))
    pub, _, pub_events = clients.make("pub")
    assert events.connects == [False]
    sub.stop()  # offline, its session kept
    assert pub.publish("p/1", b"before", qos=1).wait(TIMEOUT)
    pub.publish("p/0", b"lost", qos=0)
    broker.restart()
    assert pub_events.wait_connects(2) and pub.wait_connected(TIMEOUT)
    assert pub.publish("p/2", b"after", qos=1).wait(TIMEOUT)
    assert broker.session_queue("sub") == 2
    _, inbox2, events2 = clients.make("sub")  # no subscribe: the session has it
    assert inbox2.wait_for(lambda ms: len(ms) == 2)
    assert [m.payload for m in inbox2.messages] == [b"before", b"after"]
    assert events2.connects == [True]
    assert inbox.messages == []


def test_restart_disconnects_everyone_and_they_reconnect(clients: Clients) -> None:
    broker = clients.broker
    sub, inbox, events = clients.make("sub", subscribe=("r/#",))
    pub, _, pub_events = clients.make("pub")
    broker.restart()
    assert events.wait_connects(2) and pub_events.wait_connects(2)
    assert events.disconnects == ["Server shutting down"]
    assert events.connects == [False, True]
    assert sub.wait_connected(TIMEOUT) and pub.wait_connected(TIMEOUT)
    _flush(pub, inbox, "r/after")


def test_clean_session_discarded(clients: Clients, broker: InMemoryBroker) -> None:
    sub, _, _ = clients.make("sub", subscribe=("c/#",), clean_start=True)
    pub, _, _ = clients.make("pub")
    sub.stop()
    assert pub.publish("c/1", b"gone", qos=1).wait(TIMEOUT)
    assert broker.session_queue("sub") == 0
    _, inbox, events = clients.make("sub", clean_start=True)  # no subscriptions this time
    pub.publish("c/2", b"also gone", qos=1).wait(TIMEOUT)
    _, watch, _ = clients.make("watch", subscribe=("c/#",))
    _flush(pub, watch, "c/sentinel")
    assert inbox.messages == [] and events.connects == [False]


def test_session_expiry_zero_is_not_persistent(clients: Clients, broker: InMemoryBroker) -> None:
    sub, _, _ = clients.make("sub", subscribe=("e/#",), session_expiry=0)
    pub, _, _ = clients.make("pub")
    sub.stop()
    assert pub.publish("e/1", b"x", qos=1).wait(TIMEOUT)
    assert broker.session_queue("sub") == 0
    _, _, events = clients.make("sub")
    assert events.connects == [False]


def test_offline_queue_bounded_and_counted() -> None:
    with InMemoryBroker(max_queued=3) as broker:
        made = Clients(broker)
        sub, _, _ = made.make("sub", subscribe=("b/#",))
        pub, _, _ = made.make("pub")
        sub.stop()
        for i in range(5):
            assert pub.publish("b/x", str(i).encode(), qos=1).wait(TIMEOUT)
        assert broker.session_queue("sub") == 3
        assert broker.dropped["queue_full"] == 2
        _, inbox, _ = made.make("sub")
        assert inbox.wait_for(lambda ms: len(ms) == 3)
        assert [m.payload for m in inbox.messages] == [b"0", b"1", b"2"]
        for link in made.links:
            link.stop()


def test_client_id_takeover_kicks_the_first(clients: Clients) -> None:
    first, _, events = clients.make(
        "same", subscribe=("t/#",), reconnect_min=60.0, reconnect_max=60.0
    )
    second, inbox, events2 = clients.make("same")
    assert events.wait_disconnects(1)
    assert events.disconnects == ["Session taken over"]
    assert not first.connected.is_set() and second.connected.is_set()
    assert events2.connects == [True]  # it took over the session, subscriptions and all
    pub, _, _ = clients.make("pub")
    pub.publish("t/1", b"to the second", qos=1)
    assert inbox.wait_topic("t/1").payload == b"to the second"


def test_disconnect_kicks_one_client_which_comes_back(clients: Clients) -> None:
    broker = clients.broker
    sub, inbox, events = clients.make("sub", subscribe=("k/#",))
    other, _, other_events = clients.make("other")
    assert broker.disconnect("sub") and not broker.disconnect("ghost")
    assert events.wait_connects(2)
    assert events.disconnects == ["Administrative action"]
    assert other_events.disconnects == []
    assert sub.wait_connected(TIMEOUT)
    _flush(other, inbox, "k/back")


def test_drop_predicate_and_its_removal(clients: Clients, broker: InMemoryBroker) -> None:
    _, inbox, _ = clients.make("sub", subscribe=("d/#",))
    pub, _, _ = clients.make("pub")
    rule = broker.drop(lambda topic, payload, sender: topic == "d/x" and sender == "pub")
    with rule:
        assert pub.publish("d/x", b"1", qos=1).wait(TIMEOUT)  # acknowledged, then lost
        pub.publish("d/y", b"2", qos=1)
        _flush(pub, inbox, "d/sentinel")
        assert inbox.topics() == ["d/y", "d/sentinel"]
    assert rule.hits == 1 and broker.dropped["injected"] == 1
    pub.publish("d/x", b"3", qos=1)
    assert inbox.wait_topic("d/x").payload == b"3"


def test_close_stops_every_link_and_refuses_new_ones() -> None:
    broker = InMemoryBroker()
    made = Clients(broker)
    link, _, events = made.make("c")
    broker.close()
    assert not link.connected.is_set()
    assert events.disconnects == ["Server shutting down"]
    with pytest.raises(RuntimeError, match="closed"):
        made.make("late")


# -- wills --------------------------------------------------------------------------------------
def _will_cfg(client_id: str, **kw: object) -> MqttConfig:
    from edgefleet.infra.link import Will

    will = Will(topic=f"ef/v1/dev/{client_id}/up/status", payload=b"gone", qos=1, retain=True)
    return MqttConfig(url=InMemoryBroker.url, client_id=client_id, will=will,
                      reconnect_min=0.05, reconnect_max=0.2, **kw)  # type: ignore[arg-type]


def test_a_killed_client_s_will_is_published_at_once_and_it_stays_down() -> None:
    got: list[tuple[str, bytes, bool]] = []
    seen = threading.Event()

    def watch(topic: str, payload: bytes, props: MessageProps) -> None:
        got.append((topic, payload, props.retain))
        seen.set()

    with InMemoryBroker() as broker:
        watcher = broker.link(MqttConfig(url=broker.url, client_id="watch"), watch)
        watcher.subscribe("ef/v1/dev/+/up/status")
        watcher.start()
        assert watcher.wait_connected(10)
        dev = broker.link(_will_cfg("d1"), lambda *a: None)
        dev.start()
        assert dev.wait_connected(10)
        assert broker.kill("d1") and not broker.kill("nobody")
        assert seen.wait(10)
        assert got == [("ef/v1/dev/d1/up/status", b"gone", False)]
        assert broker.retained["ef/v1/dev/d1/up/status"] == b"gone"
        assert "d1" not in broker.connected_clients()  # a dead process does not reconnect


def test_a_hung_client_s_will_waits_for_one_and_a_half_keepalives() -> None:
    seen = threading.Event()
    with InMemoryBroker() as broker:
        watcher = broker.link(MqttConfig(url=broker.url, client_id="watch"),
                              lambda *a: seen.set())  # fmt: skip
        watcher.subscribe("ef/v1/dev/+/up/status")
        watcher.start()
        assert watcher.wait_connected(10)
        dev = broker.link(_will_cfg("d2", keepalive=1), lambda *a: None)
        dev.start()
        assert dev.wait_connected(10)
        assert broker.kill("d2", hang=True)
        assert "d2" in broker.connected_clients()  # the broker has not noticed yet
        assert seen.wait(10)  # after 1.5 s
        assert "d2" not in broker.connected_clients()


def test_a_will_the_acl_forbids_is_refused_at_connect() -> None:
    acl = topics.acl()
    with InMemoryBroker(acl=acl) as broker:
        events: list[str] = []
        cfg = MqttConfig(url=broker.url, client_id="agent-d3", username="d3",
                         reconnect_min=0.05, reconnect_max=0.1,
                         will=_will_cfg("other").will)  # another device's status topic
        link = broker.link(cfg, lambda *a: None, on_disconnect=events.append)
        link.start()
        assert not link.wait_connected(0.5)
        assert "Not authorized" in events
        link.stop()
