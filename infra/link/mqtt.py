"""A thin, robust paho-mqtt 2.x link shared by the agent and the coordinator.

It handles the traps measured in ARCHITECTURE §4 so callers do not have to:

- TCP_NODELAY is set on every socket (paho leaves Nagle on: 44 ms per QoS 1 round trip).
- Sessions are persistent: clean_start=False plus a SessionExpiryInterval on v5,
  clean_session=False on 3.1.1, so subscriptions and queued QoS 1 messages survive a broker
  restart.
- Publish checks the packet size against the CONNACK MaximumPacketSize before paho sees it
  (paho would otherwise reconnect and resend the oversize packet forever) and raises
  ``TransportError``.
- Subscriptions are remembered and re-sent on every connect; ``connected`` is set only once the
  broker acknowledged them, so "connected" means "connected and listening". Each SUBSCRIBE
  makes the broker send the retained message again, so handlers must be idempotent (release
  offers are: they carry a sequence number).

Flow control choices: at most ``max_inflight`` (20) unacknowledged QoS 1 publishes, which matches
mosquitto's default ``max_inflight_messages`` (its v5 Receive Maximum; exceeding it is a protocol
error). paho bounds only its QoS 1/2 queue (``max_queued``, 1000 messages; a full queue raises
``TransportError`` so the caller decides what to drop). QoS 0 publishes bypass that limit and
go straight into paho's unbounded packet queue, so the link counts their bytes: a bulk sender
calls ``wait_writable(max_unsent, timeout)`` before each publish and blocks until the socket
has taken enough (``unsent_bytes``). Incoming packets are bounded by ``max_incoming``, sent as
the v5 CONNECT MaximumPacketSize: the broker then never sends us anything larger (it drops
such messages for this client), so an oversize message is never read into memory.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

import paho.mqtt.client as paho
from edgefleet.protocol.errors import TransportError
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .config import HEADER_ALLOWANCE, MqttConfig
from .port import Delivery, MessageProps, OnMessage

__all__ = ["MessageProps", "MqttConfig", "MqttLink", "TransportError"]

log = logging.getLogger(__name__)

RECV_CHUNK = 256 * 1024  # bytes asked of the socket per recv() (paho asks 1 byte at a time)
READ_REFILLS = 8  # recv() calls per network-loop iteration at most, before acks are written


class _Client(paho.Client):
    """paho's client reading the socket in large blocks and every available packet per
    network-loop iteration.

    paho 2.x reads a packet with 3-5 ``recv`` calls (the fixed header byte by byte) and one
    packet per ``select`` (``loop_read``'s ``max_packets`` is not used), so every inbound
    message costs several system calls, each of which hands the GIL to whatever other thread
    is busy: under load the coordinator read 1,000 messages/s and mosquitto dropped the rest
    of its queue. Here ``_sock_recv`` serves paho's small reads from one ``recv`` of up to
    ``RECV_CHUNK`` bytes, and ``loop_read`` goes on until what was received is used up (after
    ``READ_REFILLS`` reads the socket counts as empty until the next iteration: what is in the
    buffer is always used up, as ``select`` cannot see it), then writes the acknowledgements
    it queued in one ``send``. What paho parses and how is unchanged. paho also writes a byte
    to its wake-up socket pair for every packet it queues, to interrupt its own ``select``;
    from the network thread itself (the ack of every QoS 1 message received) that is a wasted
    system call, which ``_Wakeup`` leaves out.
    """

    _rsock: object = None  # the socket _rdata came from (a reconnect starts afresh)
    _rdata = b""
    _rpos = 0
    _refills: int | None = None  # socket reads left in this loop_read (None: outside one)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:
            self._rsock, self._rdata, self._rpos = self._sock, b"", 0
        if self._rpos >= len(self._rdata):
            if self._refills is not None:
                if self._refills <= 0:
                    raise BlockingIOError  # enough for one iteration: paho keeps its place
                self._refills -= 1
            data = super()._sock_recv(max(bufsize, RECV_CHUNK))
            if len(data) <= bufsize:
                return data  # all of it asked for (or the end of the stream): no copy
            self._rdata, self._rpos = data, 0
        start, self._rpos = self._rpos, min(self._rpos + bufsize, len(self._rdata))
        return self._rdata[start : self._rpos]

    @property  # type: ignore[override]  # paho's plain attribute, wrapped on assignment
    def _sockpairW(self) -> _Wakeup | None:  # noqa: N802 - paho's name
        return self.__dict__.get("_wakeup")

    @_sockpairW.setter
    def _sockpairW(self, sock: socket.socket | None) -> None:  # noqa: N802
        self.__dict__["_wakeup"] = None if sock is None else _Wakeup(sock, self)

    def _buffered(self) -> bool:
        return self._sock is not None and self._rsock is self._sock and (
            self._rpos < len(self._rdata))  # fmt: skip

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        self._refills = READ_REFILLS
        try:
            rc = super().loop_read(max_packets)
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffered():
                rc = super().loop_read(max_packets)
        finally:
            self._refills = None
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self.want_write():
            self._merge_acks()
            rc = self.loop_write()  # the acks of what was read, without another select()
        return rc

    def _merge_acks(self) -> None:
        """The PUBACKs at the head of paho's packet queue as one write (paho sends each
        packet with a ``send`` of its own), in the order the messages arrived."""
        out = self._out_packet
        if len(out) < 2 or out[0]["command"] != paho.PUBACK or out[1]["command"] != paho.PUBACK:
            return
        first = out.popleft()
        acks = [first["packet"][first["pos"] :]]
        while out and out[0]["command"] == paho.PUBACK and out[0]["pos"] == 0:
            acks.append(out.popleft()["packet"])
        data = b"".join(acks)
        out.appendleft({**first, "pos": 0, "to_process": len(data), "packet": data})


class _Wakeup:
    """paho's wake-up socket, silent when the network thread wakes itself: it is not in
    ``select`` then, and writes what it queued before it selects again (``want_write``)."""

    __slots__ = ("_client", "_sock")

    def __init__(self, sock: socket.socket, client: paho.Client) -> None:
        self._sock, self._client = sock, client

    def send(self, data: bytes) -> int:
        if threading.current_thread() is self._client._thread:
            return len(data)
        return self._sock.send(data)

    def close(self) -> None:
        self._sock.close()


class _PahoDelivery:
    """The port's ``Delivery`` over paho's ``MQTTMessageInfo`` (which never leaves this module)."""

    __slots__ = ("_info",)

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):  # paho: not queued, or the queue was dropped
            return False
        return self._info.is_published()

    @property
    def published(self) -> bool:
        return self._info.is_published()


class MqttLink:
    """One MQTT connection with a background network thread; thread-safe publish/subscribe.

    Callbacks run on paho's network thread: keep them short and hand work to a queue.
    ``on_connect(session_present)`` follows every accepted CONNACK; ``on_disconnect(reason)``
    follows a lost connection and also every failed attempt (unreachable, bad credentials).
    """

    def __init__(
        self,
        config: MqttConfig,
        on_message: OnMessage,
        *,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._subs: dict[str, int] = {}  # topic filter -> qos, re-sent on every connect
        self._acks: dict[int, list[threading.Event]] = {}  # SUBSCRIBE mid -> waiters
        self._next_connect: list[threading.Event] = []  # waiters for the next re-subscribe
        self._session_up = False  # CONNACK accepted and re-subscribe sent; guarded by _lock
        self._attempt_reported = False  # this connection attempt's failure was reported
        self._max_packet = config.default_max_packet
        self._last_error: str | None = None
        self._started = False
        # Bytes handed to paho and not yet published (``unsent_bytes``); all guarded by _sent.
        self._sent = threading.Condition()
        self._held: dict[int, list[tuple[int, int]]] = {}  # mid -> [(qos, bytes)], oldest first
        self._unsent = 0
        self._publishing = 0  # publish() calls inside paho right now
        self._early: set[int] = set()  # mids paho published before publish() could record them
        self._epoch = 0  # connections lost so far: QoS 0 packets queued on an older one are gone
        self._stopped = False
        self._client = self._make_client()

    # -- public API -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (with retries); returns immediately."""
        if self._started:
            raise RuntimeError("MqttLink.start() called twice")
        self._started = True
        cfg = self._config
        if cfg.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry
            if cfg.max_incoming is not None:
                props.MaximumPacketSize = cfg.max_incoming
            self._client.connect_async(
                cfg.host, cfg.port, cfg.keepalive, clean_start=cfg.clean_start, properties=props
            )
        else:
            self._client.connect_async(cfg.host, cfg.port, cfg.keepalive)
        self._client.loop_start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(timeout)

    def subscribe(self, topic: str, qos: int = 1) -> threading.Event:
        """Subscribe now and after every reconnect; the event is set once the broker answered.

        A refused subscription (SUBACK failure code) also sets it, with a WARNING logged.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        acked = threading.Event()
        with self._lock:
            self._subs[topic] = qos
            rc, mid = (
                self._client.subscribe(topic, qos)
                if self._session_up
                else (MQTTErrorCode.MQTT_ERR_NO_CONN, 0)
            )
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._acks.setdefault(mid, []).append(acked)
            else:  # the re-subscribe on the next connect covers it
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
    ) -> Delivery:
        """Queue a message; raise TransportError if it cannot be sent as asked.

        On 3.1.1 ``response_topic`` and ``correlation_data`` are not sent (the wire protocol
        carries them in the payload too). QoS 1/2 messages published while disconnected are
        queued and sent on reconnect; QoS 0 ones raise.
        """
        props = self._publish_props(response_topic, correlation_data)
        size = _publish_size(topic, len(payload), qos, props, v5=self._config.protocol == 5)
        if size > self._max_packet:
            raise TransportError(
                f"PUBLISH to {topic} is {size} bytes; the broker accepts at "
                f"most {self._max_packet} (payload limit {self.max_payload})"
            )
        with self._sent:
            self._publishing += 1
            epoch = self._epoch
        mid = None
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            queued = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
                info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
            )
            mid = info.mid if queued else None
        finally:
            self._track(mid, qos, size, epoch)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(
                f"outgoing queue full ({self._config.max_queued} messages); "
                f"dropped publish to {topic}"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                raise TransportError(f"not connected; QoS 0 publish to {topic} dropped")
            # Queued: paho sends it after reconnecting. Its NO_CONN rc would make
            # wait_for_publish() raise at once instead of waiting for that PUBACK.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        return _PahoDelivery(info)

    def wait_writable(self, max_unsent: int, timeout: float) -> bool:
        """Block until at most ``max_unsent`` bytes are unsent; False if still more at timeout.

        Backpressure for bulk QoS 0 senders, which paho's ``max_queued`` does not limit: call
        it before each publish. Returns False at once (if over the limit) after ``stop()``.
        """
        if max_unsent < 0:
            raise ValueError(f"max_unsent must be >= 0, got {max_unsent}")
        with self._sent:
            self._sent.wait_for(lambda: self._unsent <= max_unsent or self._stopped, timeout)
            return self._unsent <= max_unsent

    @property
    def unsent_bytes(self) -> int:
        """Bytes of PUBLISH packets handed to paho and not yet published.

        What "published" means is paho's ``on_publish``: a QoS 0 packet counts until it is
        written to the socket, a QoS 1/2 message until the broker acknowledged it (paho keeps
        it for a resend until then, across reconnects). QoS 0 packets still queued when the
        connection drops are discarded by paho (never written), so they stop counting then.
        """
        with self._sent:
            return self._unsent

    def stop(self) -> None:
        """Disconnect (the broker keeps the session) and join the network thread.

        Does not flush: wait on the returned ``Delivery`` first if delivery matters.
        """
        with self._sent:
            self._stopped = True
            self._sent.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    @property
    def max_payload(self) -> int:
        """Largest payload (bytes) that fits with an ordinary topic and v5 properties."""
        return self._max_packet - HEADER_ALLOWANCE

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt was refused or the connection dropped."""
        return self._last_error

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paho wiring (runs on the network thread) ------------------------------------------

    def _make_client(self) -> paho.Client:
        cfg = self._config
        v5 = cfg.protocol == 5
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else cfg.clean_start,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            client.tls_set(
                ca_certs=str(cfg.tls_ca) if cfg.tls_ca else None,
                certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                keyfile=str(cfg.tls_key) if cfg.tls_key else None,
            )
        # paho annotates the delays as int but computes with floats.
        client.reconnect_delay_set(cast(int, cfg.reconnect_min), cast(int, cfg.reconnect_max))
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(cfg.max_queued)
        if cfg.will is not None:  # sent in every CONNECT, reconnects included
            w = cfg.will
            client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client.on_socket_open = self._handle_socket_open
        client.on_connect = self._handle_connect  # type: ignore[assignment]  # paho's union
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        return client

    def _publish_props(
        self, response_topic: str | None, correlation: bytes | None
    ) -> Properties | None:
        if self._config.protocol != 5 or (response_topic is None and correlation is None):
            return None  # nothing to send: skip building and packing empty properties
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        return props

    def _track(self, mid: int | None, qos: int, size: int, epoch: int) -> None:
        """Count a publish paho queued (``mid``), unless paho already reported it published."""
        with self._sent:
            self._publishing -= 1
            if mid is not None:
                if mid in self._early:
                    self._early.discard(mid)
                elif qos > 0 or epoch == self._epoch:  # else its connection is gone: dropped
                    self._held.setdefault(mid, []).append((qos, size))
                    self._unsent += size
            if not self._publishing:
                self._early.clear()

    def _handle_publish(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason: ReasonCode,
        _props: Properties,
    ) -> None:
        # QoS 0: the packet was written to the socket. QoS 1/2: PUBACK/PUBCOMP arrived.
        if reason.is_failure:
            log.warning("MQTT broker refused publish (mid %d): %s", mid, reason)
        with self._sent:
            held = self._held.get(mid)
            if held:
                self._unsent -= held.pop(0)[1]
                if not held:
                    del self._held[mid]
                self._sent.notify_all()
            elif self._publishing:  # publish() of this mid has not recorded it yet
                self._early.add(mid)

    def _drop_unsent_qos0(self) -> None:
        """The connection is gone: paho discards its queued QoS 0 packets on reconnect."""
        with self._sent:
            self._epoch += 1
            for mid, entries in list(self._held.items()):
                self._unsent -= sum(size for qos, size in entries if qos == 0)
                kept = [(qos, size) for qos, size in entries if qos > 0]
                if kept:
                    self._held[mid] = kept
                else:
                    del self._held[mid]
            self._sent.notify_all()

    def _handle_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties,
    ) -> None:
        if reason.is_failure:
            self._refusal(f"connection refused by {self._config.url}: {reason}", str(reason))
            return
        self._max_packet = getattr(props, "MaximumPacketSize", self._config.default_max_packet)
        receive_max = getattr(props, "ReceiveMaximum", None)
        if receive_max is not None and receive_max < self._config.max_inflight:
            log.warning(
                "broker Receive Maximum %d < max_inflight %d: lower max_inflight",
                receive_max,
                self._config.max_inflight,
            )
        self._last_error = None
        log.info(
            "MQTT connected to %s as %s (session present: %s, max packet %d bytes)",
            self._config.url,
            self._config.client_id,
            flags.session_present,
            self._max_packet,
        )
        with self._lock:
            self._session_up = True
            waiters, self._next_connect = self._next_connect, []
            if self._subs:
                rc, mid = client.subscribe(list(self._subs.items()))
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._acks.setdefault(mid, []).extend([self.connected, *waiters])
                    waiters = []
            else:
                waiters.append(self.connected)
        for event in waiters:
            event.set()
        if self._on_connect is not None:
            _guarded(self._on_connect, flags.session_present)

    def _handle_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self._refusal(f"cannot connect to {self._config.url}", "cannot connect")

    def _refusal(self, error: str, reason: str) -> None:
        """A connection attempt failed: say why once and tell the user callback once."""
        self._attempt_reported = True
        self._fail(error)
        if self._on_disconnect is not None:
            _guarded(self._on_disconnect, reason)

    def _handle_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._attempt_reported = False  # a new attempt
        _set_nodelay(client, userdata, sock)

    def _fail(self, error: str) -> None:
        """Record why we are not connected; warn once per distinct reason, not per retry."""
        if error != self._last_error:
            log.warning("MQTT %s; retrying with backoff", error)
        self._last_error = error

    def _handle_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._drop_unsent_qos0()
        with self._lock:
            was_up, self._session_up = self._session_up, False
            for waiters in self._acks.values():  # SUBACKs that will never come
                self._next_connect.extend(w for w in waiters if w is not self.connected)
            self._acks.clear()
        self.connected.clear()
        if not was_up:
            if not self._attempt_reported:  # closed before any CONNACK (e.g. amqtt 0.11 on
                # a bad password): a failed attempt all the same
                self._refusal(
                    f"connection to {self._config.url} closed before it was accepted", str(reason)
                )
            return
        self._last_error = f"disconnected from {self._config.url}: {reason}"
        log.info("MQTT %s", self._last_error)
        if self._on_disconnect is not None:
            _guarded(self._on_disconnect, str(reason))

    def _handle_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _props: Properties,
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.warning("MQTT broker refused a subscription (mid %d): %s", mid, refused)
        with self._lock:
            waiters = self._acks.pop(mid, [])
        for event in waiters:
            event.set()

    def _handle_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        meta = MessageProps(
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )
        try:
            self._on_message(msg.topic, bytes(msg.payload), meta)
        except Exception:
            log.warning("dropped MQTT message on %s: handler failed", msg.topic, exc_info=True)


def _guarded(callback: Callable[[Any], None], arg: Any) -> None:
    try:
        callback(arg)
    except Exception:
        log.exception("MQTT user callback %r failed", callback)


def _set_nodelay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _publish_size(
    topic: str, payload_len: int, qos: int, props: Properties | None, *, v5: bool
) -> int:
    """Size in bytes of the PUBLISH packet paho will build (what MaximumPacketSize limits)."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + payload_len
    if props is not None:
        remaining += len(props.pack())
    elif v5:
        remaining += 1  # v5 always carries a property length, 0 here
    varint = 1
    while remaining >= 128**varint:
        varint += 1
    return 1 + varint + remaining
