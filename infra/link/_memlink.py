"""The client side of ``InMemoryBroker``: ``InMemoryLink``, one thread per link.

The link's thread does what paho's network thread does for ``MqttLink``: it connects (and
reconnects with backoff), hands queued publishes and subscriptions to the broker in order,
and runs every callback. The broker puts messages for this client into the connection's
pipe (``Conn.inbox``); the thread takes them out one by one and calls ``on_message``.

Locks: the broker's lock is taken before a link's condition, never the other way round; the
link's thread calls the broker and the callbacks holding no lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from edgefleet.protocol.errors import TransportError
from edgefleet.protocol.topics import Filter, Topic

from .config import HEADER_ALLOWANCE
from .port import MessageProps, OnMessage

if TYPE_CHECKING:
    from .config import MqttConfig, Will
    from .memory import InMemoryBroker

log = logging.getLogger(__name__)


S = TypeVar("S")


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """One PUBLISH as the broker received it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None
    correlation_data: bytes | None
    sender: str  # client id


@dataclass(frozen=True, kw_only=True, slots=True)
class Queued:
    """A message on its way to one client, at the QoS and retain flag it is delivered with."""

    message: Message
    qos: int
    retain: bool


class Refused(Exception):
    """The broker refused a CONNECT; ``reason`` as an MQTT 5 reason string."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Conn(Generic[S]):
    """One accepted connection. ``inbox`` and ``closed`` are guarded by the link's condition."""

    def __init__(self, link: InMemoryLink, session: S) -> None:
        self.link = link
        self.session = session
        self.inbox: deque[Queued] = deque()
        self.closed: str | None = None  # the reason, once the broker closed it
        self.will: Will | None = None  # from the CONNECT; set by the broker


def packet_size(msg: Message, qos: int, *, v5: bool) -> int:
    """Bytes of the PUBLISH packet for ``msg`` at ``qos`` (what MaximumPacketSize limits)."""
    remaining = 2 + len(msg.topic.encode("utf-8")) + (2 if qos else 0) + len(msg.payload)
    if v5:
        props = 0
        if msg.response_topic is not None:
            props += 3 + len(msg.response_topic.encode("utf-8"))
        if msg.correlation_data is not None:
            props += 3 + len(msg.correlation_data)
        remaining += _varint_len(props) + props
    return 1 + _varint_len(remaining) + remaining


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128**size:
        size += 1
    return size


class _MemoryDelivery:
    """The port's ``Delivery``: set once the broker took the message (or it was dropped)."""

    __slots__ = ("_done", "_ok")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._ok = False

    def finish(self, ok: bool) -> None:
        self._ok = ok
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout) and self._ok

    @property
    def published(self) -> bool:
        return self._done.is_set() and self._ok


@dataclass(frozen=True, kw_only=True, slots=True)
class _Pub:
    message: Message
    size: int
    delivery: _MemoryDelivery


@dataclass(frozen=True, kw_only=True, slots=True)
class _Sub:
    filter: Filter
    qos: int
    acked: threading.Event


class InMemoryLink:
    """A ``Link`` to an ``InMemoryBroker``; behaves as ``MqttLink`` does against mosquitto."""

    def __init__(
        self,
        broker: InMemoryBroker,
        config: MqttConfig,
        on_message: OnMessage,
        *,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> None:
        self._broker = broker
        self._config = config
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self.connected = threading.Event()
        self._cond = threading.Condition()  # guards everything below and every Conn's inbox
        self._subs: dict[str, int] = {}  # filter -> qos, re-sent on every connect
        self._next_connect: list[threading.Event] = []  # subscribe waiters for the next connect
        self._outbox: deque[_Pub | _Sub] = deque()
        self._queued = 0  # QoS 1 publishes in the outbox (bounded by config.max_queued)
        self._unsent = 0  # bytes of publishes in the outbox
        self._up = False  # connected and re-subscribed: QoS 0 may be sent
        self._stopped = False
        self._dead = False  # killed: the thread ends without a DISCONNECT
        self._thread: threading.Thread | None = None
        self._max_packet = config.default_max_packet
        self._last_error: str | None = None

    # -- the Link port ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (with retries); returns immediately."""
        with self._cond:
            if self._thread is not None or self._stopped:
                raise RuntimeError("an InMemoryLink starts once")
            self._thread = threading.Thread(
                target=self._run, name=f"memlink-{self._config.client_id}", daemon=True
            )
        self._thread.start()

    def stop(self) -> None:
        """Disconnect (the broker keeps a persistent session) and join the link's thread."""
        self._halt()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.connected.clear()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1) -> threading.Event:
        """Subscribe now and after every reconnect; the event is set once the broker answered."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        filt = Filter(value=topic)
        acked = threading.Event()
        with self._cond:
            self._subs[topic] = qos
            if self._up:
                self._outbox.append(_Sub(filter=filt, qos=qos, acked=acked))
                self._cond.notify_all()
            else:
                self._next_connect.append(acked)
        return acked

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> _MemoryDelivery:
        """Queue a message; raise TransportError if it cannot be sent as asked."""
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        Topic(value=topic)
        v5 = self._config.protocol == 5
        msg = Message(
            topic=topic,
            payload=bytes(payload),
            qos=qos,
            retain=retain,
            response_topic=response_topic if v5 else None,
            correlation_data=correlation_data if v5 else None,
            sender=self._config.client_id,
        )
        size = packet_size(msg, qos, v5=v5)
        if size > self._max_packet:
            raise TransportError(
                f"PUBLISH to {topic} is {size} bytes; the broker accepts at "
                f"most {self._max_packet} (payload limit {self.max_payload})"
            )
        delivery = _MemoryDelivery()
        with self._cond:
            if qos == 0 and not self._up:
                raise TransportError(f"not connected; QoS 0 publish to {topic} dropped")
            if qos > 0 and self._config.max_queued and self._queued >= self._config.max_queued:
                raise TransportError(
                    f"outgoing queue full ({self._config.max_queued} messages); "
                    f"dropped publish to {topic}"
                )
            self._outbox.append(_Pub(message=msg, size=size, delivery=delivery))
            self._unsent += size
            self._queued += qos > 0
            self._cond.notify_all()
        return delivery

    def wait_writable(self, max_unsent: int, timeout: float) -> bool:
        """Block until at most ``max_unsent`` bytes are unsent; False if still more at timeout."""
        if max_unsent < 0:
            raise ValueError(f"max_unsent must be >= 0, got {max_unsent}")
        with self._cond:
            self._cond.wait_for(lambda: self._unsent <= max_unsent or self._stopped, timeout)
            return self._unsent <= max_unsent

    @property
    def unsent_bytes(self) -> int:
        """Bytes of PUBLISH packets handed to the link and not yet taken by the broker."""
        with self._cond:
            return self._unsent

    @property
    def max_payload(self) -> int:
        return self._max_packet - HEADER_ALLOWANCE

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def __enter__(self) -> InMemoryLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- called by the broker, holding its lock ------------------------------------------------

    def _halt(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _die(self) -> None:
        """The client process died: stop at once, say nothing to the broker."""
        with self._cond:
            self._stopped = self._dead = True
            self._cond.notify_all()

    def _push(self, conn: Conn[Any], item: Queued, *, limit: int) -> bool:
        with self._cond:
            if len(conn.inbox) >= limit:
                return False
            conn.inbox.append(item)
            self._cond.notify_all()
            return True

    def _close_pipe(self, conn: Conn[Any], reason: str) -> list[Queued]:
        with self._cond:
            conn.closed = reason
            pending = list(conn.inbox)
            conn.inbox.clear()
            self._cond.notify_all()
            return pending

    # -- the link's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        cfg = self._config
        delay = cfg.reconnect_min
        while not self._stopped:
            try:
                conn, present, max_packet = self._broker._connect(self, cfg)
            except Refused as exc:
                self._fail(f"connection refused by {cfg.url}: {exc.reason}")
                _guarded(self._on_disconnect, exc.reason)
                if self._pause(delay):
                    break
                delay = min(delay * 2, cfg.reconnect_max)
                continue
            delay = cfg.reconnect_min
            self._max_packet = max_packet or cfg.default_max_packet
            if self._serve(conn, present) or self._pause(delay):
                break

    def _pause(self, delay: float) -> bool:
        """Backoff before the next connect; True if the link was stopped meanwhile."""
        with self._cond:
            return self._cond.wait_for(lambda: self._stopped, delay)

    def _serve(self, conn: Conn[Any], present: bool) -> bool:
        """Run one connection until it closes; True if the link was stopped."""
        with self._cond:
            subs = [(Filter(value=t), q) for t, q in self._subs.items()]
            waiters, self._next_connect = self._next_connect, []
            self._up = True
        refused = self._broker._subscribe(conn, subs)
        if refused is not None:
            self._warn_refused(refused)
            self._last_error = None
            log.info(
                "in-memory MQTT: %s connected (session present: %s, max packet %d bytes)",
                self._config.client_id,
                present,
                self._max_packet,
            )
            _guarded(self._on_connect, present)
            for event in (self.connected, *waiters):
                event.set()
        else:
            with self._cond:
                self._next_connect.extend(waiters)
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopped or conn.closed is not None or self._outbox or conn.inbox
                )
                if self._stopped or conn.closed is not None:
                    break
                op = self._outbox.popleft() if self._outbox else None
                item = conn.inbox.popleft() if conn.inbox else None
            if op is not None:
                self._send(conn, op)
            if item is not None:
                self._deliver(item)
        if self._dead:
            self.connected.clear()
            return True
        if conn.closed is None:
            self._broker._disconnect(conn)
        self._down(conn.closed or "Normal disconnection")
        return self._stopped

    def _send(self, conn: Conn[Any], op: _Pub | _Sub) -> None:
        if isinstance(op, _Sub):
            refused = self._broker._subscribe(conn, [(op.filter, op.qos)])
            if refused is not None:
                self._warn_refused(refused)
                op.acked.set()
            else:
                with self._cond:
                    self._outbox.appendleft(op)
            return
        taken = self._broker._publish(conn, op.message)
        with self._cond:
            if taken:
                self._unsent -= op.size
                self._queued -= op.message.qos > 0
                self._cond.notify_all()
            else:  # the connection closed first: resend (QoS 1) or drop (QoS 0) in _down
                self._outbox.appendleft(op)
        if taken:
            op.delivery.finish(True)

    def _deliver(self, item: Queued) -> None:
        msg, v5 = item.message, self._config.protocol == 5
        props = MessageProps(
            qos=item.qos,
            retain=item.retain,
            response_topic=msg.response_topic if v5 else None,
            correlation_data=msg.correlation_data if v5 else None,
        )
        try:
            self._on_message(msg.topic, msg.payload, props)
        except Exception:
            log.warning("dropped MQTT message on %s: handler failed", msg.topic, exc_info=True)

    def _down(self, reason: str) -> None:
        """The connection is gone: QoS 0 publishes not yet sent are lost, QoS 1 ones kept."""
        lost: list[_MemoryDelivery] = []
        with self._cond:
            self._up = False
            kept: deque[_Pub | _Sub] = deque()
            for op in self._outbox:
                if isinstance(op, _Sub):
                    self._next_connect.append(op.acked)  # the re-subscribe covers it
                elif op.message.qos == 0:
                    self._unsent -= op.size
                    lost.append(op.delivery)
                else:
                    kept.append(op)
            self._outbox = kept
            self._cond.notify_all()
        self.connected.clear()
        for delivery in lost:
            delivery.finish(False)
        self._last_error = f"disconnected from {self._config.url}: {reason}"
        log.info("in-memory MQTT: %s %s", self._config.client_id, self._last_error)
        _guarded(self._on_disconnect, reason)

    def _warn_refused(self, refused: list[str]) -> None:
        """As ``MqttLink`` does for a SUBACK failure: the event is set, a WARNING logged."""
        if refused:
            log.warning("MQTT broker refused a subscription for %s: %s",
                        self._config.client_id, refused)  # fmt: skip

    def _fail(self, error: str) -> None:
        """Record why we are not connected; warn once per distinct reason, not per retry."""
        if error != self._last_error:
            log.warning("MQTT %s; retrying with backoff", error)
        self._last_error = error


def _guarded(callback: Callable[[Any], None] | None, arg: object) -> None:
    if callback is None:
        return
    try:
        callback(arg)
    except Exception:
        log.exception("MQTT user callback %r failed", callback)
