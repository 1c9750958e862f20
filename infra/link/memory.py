"""``InMemoryBroker``: an in-process MQTT broker for unit tests and simulations.

It implements the link port (``infra/link/port.py``) the way ``MqttLink`` over mosquitto 2.0
behaves, so the agent daemon, the coordinator service and the fleet simulations run on it
unchanged: ``broker.link`` is a ``LinkFactory``. Shipped in the package like httpx's
``MockTransport`` or python-tuf's ``RepositorySimulator``; no paho, no sockets.

What it models (mosquitto 2.0 with a password file and an ``acl_file``):

- **Authentication** (``users``: username -> password): a refused CONNECT ("Not authorized")
  calls ``on_disconnect`` and is retried with the link's backoff, as paho does.
- **The ACL** (``acl``: ``topics.acl(...)`` rules, evaluated with ``topics.allowed``): a publish
  the ACL denies is acknowledged and silently dropped; each delivery (retained ones too) is
  checked against the subscriber's read access. With ``auth="acl_file"`` (mosquitto's
  ``acl_file``) a SUBSCRIBE is always granted, and a ``$share`` member picked for a message it
  may not read *loses* it: the message is not offered to another member (measured on mosquitto
  2.0). With ``auth="dynsec"`` (the dynamic-security plugin of the generated broker config) a
  SUBSCRIBE is granted only if ``topics.may_subscribe`` says so (a refused filter is answered,
  not stored, and counted in ``refused_subscriptions``): devices cannot join ``$share`` groups
  nor subscribe outside their own topics. ``client_ids`` (username -> the one client id it may
  use, as the plugin's ``clientid``) refuses any other id ("Not authorized").
- **Retained messages**: an empty retained payload clears the topic (and is still delivered to
  current subscribers); every SUBSCRIBE to a non-shared filter delivers the matching retained
  messages again, flagged ``retain=True``. Live deliveries carry ``retain=False``.
- **Shared subscriptions** ``$share/<group>/<filter>``: each message goes to one member of the
  group, round-robin over the members in the order their sessions were created (online or
  not: an offline persistent member queues QoS 1 and loses QoS 0). Plain subscribers all get
  one copy each; a client with several matching plain subscriptions gets one copy, at the
  highest of their QoS.
- **QoS 0 loss**: QoS 0 messages for an offline client are lost, so are QoS 0 messages still
  in a connection's pipe when it drops; QoS 1 ones go back to a persistent session's queue.
- **Packet sizes**: ``max_packet`` is the broker's own limit, announced to v5 clients (so
  ``max_payload`` = ``max_packet - HEADER_ALLOWANCE`` as with ``MqttLink``; None announces
  nothing and the link assumes ``config.default_max_packet``). A v5 client's
  ``config.max_incoming`` is its CONNECT MaximumPacketSize: larger messages are not delivered
  to it.
- **Sessions**: persistent when the CONNECT had ``clean_start=False`` and (v5)
  ``session_expiry > 0``: subscriptions and up to ``max_queued`` QoS 1 messages are kept while
  the client is offline (past that dropped and counted) and ``session_present`` is True on
  reconnect; ``clean_start=True`` discards the old session. Sessions do not expire by time
  (there is no clock). A second connection with the same client id takes the session over
  and kicks the first one off ("Session taken over").
- **Flow**: a connection's pipe holds at most ``max_inflight + max_queued`` messages (what
  mosquitto keeps for a slow subscriber); more are dropped ("queue_full").
- **MQTT 3.1.1** (``config.protocol == 311``): response topic and correlation data are not
  carried, and ``max_incoming`` cannot be announced.
- **Wills** (``config.will``): a will whose topic the client may not write is refused at
  CONNECT ("Not authorized", as mosquitto 2.0 does); the will is published, as if by the
  client, when its connection ends uncleanly: ``kill(client_id)`` (the process died: the
  socket closes at once), ``kill(client_id, hang=True)`` (it hung: the broker notices when 1.5
  keep-alives pass without a packet, on a timer) and a take-over by a clean start (one that
  resumes the session publishes nothing, as with mosquitto 2.0). A clean DISCONNECT,
  ``disconnect()`` (an administrative kick, as the dynamic-security plugin does it) and
  ``restart()`` do not publish it.
- **Fault injection**: ``drop(predicate)``, ``disconnect(client_id)``, ``restart()`` (every
  client disconnected, QoS 0 in flight lost, retained messages and persistent sessions kept;
  clients reconnect after their backoff).

Delivery is asynchronous and ordered: a publish is handed to the broker on the publishing
link's thread, which fans it out into each subscriber's pipe; each link's own thread runs its
callbacks. Not modelled: keep-alive pings (a live link never expires), QoS 2 handshakes (QoS
2 is treated as QoS 1), session expiry by time, mosquitto's disconnect of a client sending an
oversize packet (the message is dropped and counted instead).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from edgefleet.protocol.topics import AclRule, Filter, Topic, allowed, may_subscribe

from ._memlink import Conn, InMemoryLink, Message, Queued, Refused, packet_size
from .port import OnMessage

if TYPE_CHECKING:
    from .config import Will

if TYPE_CHECKING:
    from .config import MqttConfig
    from .port import LinkFactory

__all__ = ["DROP_REASONS", "DropRule", "InMemoryBroker", "InMemoryLink"]

log = logging.getLogger(__name__)

#: why the broker dropped a message (keys of ``InMemoryBroker.dropped``)
DROP_REASONS = (
    "acl_write",  # the sender may not publish to the topic
    "acl_read",  # a subscriber may not read it (not delivered to that one)
    "acl_share",  # the $share member picked may not read it: lost for the whole group
    "offline_qos0",  # QoS 0 for an offline client
    "queue_full",  # the client's offline queue or connection pipe is full
    "too_large",  # larger than the broker's max_packet
    "too_large_for_client",  # larger than the client's max_incoming
    "disconnect",  # in a connection's pipe when it closed (QoS 0, or no session kept)
    "session_discarded",  # queued for a session that a clean start discarded
    "injected",  # a drop() predicate matched
)

Predicate = Callable[[str, bytes, str], bool]  # (topic, payload, sender client id)


class _Session:
    """Broker-side state of one client id; guarded by the broker's lock."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.username: str | None = None
        self.persistent = False
        self.v5 = True
        self.max_incoming: int | None = None
        self.subs: dict[str, tuple[Filter, int]] = {}  # filter -> (filter, qos)
        self.queue: deque[Queued] = deque()  # QoS 1 messages while offline
        self.conn: Conn[_Session] | None = None


class DropRule:
    """A ``drop()`` predicate in force; ``remove()`` (or leaving ``with``) lifts it."""

    def __init__(self, broker: InMemoryBroker, predicate: Predicate) -> None:
        self._broker = broker
        self.predicate = predicate
        self.hits = 0  # messages it dropped; guarded by the broker's lock

    def remove(self) -> None:
        self._broker._remove_drop(self)

    def __enter__(self) -> DropRule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class InMemoryBroker:
    """An in-process MQTT broker; ``link(config, on_message, ...)`` is a ``LinkFactory``."""

    #: a URL for ``MqttConfig``: the in-memory links ignore it
    url = "mqtt://in-memory.invalid:1883"

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,  # None: anyone may connect
        acl: Sequence[AclRule] | None = None,  # None: everyone may read and write everything
        max_packet: int | None = None,  # bytes, announced in CONNACK; None: none announced
        max_queued: int = 1000,  # QoS 1 messages kept per offline session / slow connection
        max_inflight: int = 20,  # messages a connection's pipe holds beyond max_queued
        auth: Literal["acl_file", "dynsec"] = "acl_file",  # how SUBSCRIBE is checked
        client_ids: Mapping[str, str] | None = None,  # username -> its only client id
    ) -> None:
        if max_packet is not None and max_packet <= 0 or max_queued < 0 or max_inflight < 0:
            raise ValueError("need max_packet > 0 (or None), max_queued >= 0, max_inflight >= 0")
        if auth not in ("acl_file", "dynsec"):
            raise ValueError(f"auth must be 'acl_file' or 'dynsec', got {auth!r}")
        self._users = dict(users) if users is not None else None
        self._acl = list(acl) if acl is not None else None
        self._auth = auth
        self._client_ids = dict(client_ids or {})
        self.refused_subscriptions = 0  # SUBSCRIBE filters refused (dynsec); guarded by _lock
        self.max_packet = max_packet
        self.max_queued = max_queued
        self.max_inflight = max_inflight
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}
        self._next_member: dict[tuple[str, str], int] = {}  # (group, filter) -> round robin
        self._drops: list[DropRule] = []
        self._dropped: Counter[str] = Counter()
        self._links: list[InMemoryLink] = []
        self._closed = False

    # -- the LinkFactory ---------------------------------------------------------------------

    def link(
        self,
        config: MqttConfig,
        on_message: OnMessage,
        *,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> InMemoryLink:
        """An unstarted link to this broker (``config.url`` is ignored)."""
        link = InMemoryLink(
            self, config, on_message, on_connect=on_connect, on_disconnect=on_disconnect
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("the broker is closed")
            self._links.append(link)
        return link

    # -- inspection ----------------------------------------------------------------------------

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped so far, per reason (see ``DROP_REASONS``); a snapshot."""
        with self._lock:
            return dict(self._dropped)

    @property
    def retained(self) -> dict[str, bytes]:
        """Retained payloads by topic; a snapshot."""
        with self._lock:
            return {topic: m.payload for topic, m in self._retained.items()}

    def connected_clients(self) -> set[str]:
        with self._lock:
            return {cid for cid, s in self._sessions.items() if s.conn is not None}

    def session_queue(self, client_id: str) -> int:
        """QoS 1 messages queued for an offline session (0 if none)."""
        with self._lock:
            session = self._sessions.get(client_id)
            return len(session.queue) if session is not None else 0

    # -- fault injection -----------------------------------------------------------------------

    def drop(self, predicate: Predicate) -> DropRule:
        """Drop every message for which ``predicate(topic, payload, sender_client_id)`` holds.

        The sender's publish is still acknowledged (lost inside the broker). The predicate runs
        under the broker's lock: keep it pure.
        """
        rule = DropRule(self, predicate)
        with self._lock:
            self._drops.append(rule)
        return rule

    def disconnect(self, client_id: str) -> bool:
        """Kick one client off; it reconnects after its backoff. False if it was not online."""
        with self._lock:
            session = self._sessions.get(client_id)
            if session is None or session.conn is None:
                return False
            self._close(session.conn, "Administrative action")
        log.info("in-memory broker: kicked %s", client_id)
        return True

    def kill(self, client_id: str, *, hang: bool = False) -> bool:
        """The client's process dies (``hang``: stops responding): its link stops without a
        DISCONNECT and the broker publishes its will, at once or, with ``hang``, once 1.5
        keep-alives have passed (a timer). False if it was not online."""
        with self._lock:
            session = self._sessions.get(client_id)
            if session is None or session.conn is None:
                return False
            conn = session.conn
            conn.link._die()
            if not hang:
                self._close(conn, "Unspecified error", will=True)
        if hang:
            timer = threading.Timer(1.5 * conn.link._config.keepalive, self._expire, (conn,))
            timer.daemon = True
            timer.start()
        log.info("in-memory broker: %s %s", client_id, "hung" if hang else "died")
        return True

    def _expire(self, conn: Conn[_Session]) -> None:
        with self._lock:
            if conn.session.conn is conn and not self._closed:
                self._close(conn, "Keep alive timeout", will=True)

    def restart(self) -> None:
        """Disconnect every client; keep retained messages and persistent sessions."""
        with self._lock:
            for session in list(self._sessions.values()):
                if session.conn is not None:
                    self._close(session.conn, "Server shutting down")
            self._next_member.clear()
        log.info("in-memory broker: restarted")

    def close(self) -> None:
        """Stop every link made by ``link()``; later connects are refused."""
        with self._lock:
            self._closed = True
            links, self._links = self._links, []
            for link in links:  # no reconnect attempt between the close and the join
                link._halt()
            for session in list(self._sessions.values()):
                if session.conn is not None:
                    self._close(session.conn, "Server shutting down")
        for link in links:
            link.stop()

    def __enter__(self) -> InMemoryBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called by the links' threads ----------------------------------------------------------

    def _connect(
        self, link: InMemoryLink, cfg: MqttConfig
    ) -> tuple[Conn[_Session], bool, int | None]:
        """CONNECT: (connection, session present, announced max packet) or ``Refused``."""
        with self._lock:
            if self._closed:
                raise Refused("Server unavailable")
            if self._users is not None and (
                cfg.username is None or self._users.get(cfg.username) != cfg.password
            ):
                raise Refused("Not authorized")
            bound = self._client_ids.get(cfg.username or "")
            if bound is not None and cfg.client_id != bound:
                raise Refused("Not authorized")  # the plugin's clientid check
            if cfg.will is not None and self._acl is not None:
                if not allowed(self._acl, cfg.username, "write", cfg.will.topic):
                    raise Refused("Not authorized")  # mosquitto checks the will at CONNECT
            session = self._sessions.get(cfg.client_id)
            if session is not None and session.conn is not None:
                # mosquitto publishes the old connection's will only if the session ends here
                self._close(session.conn, "Session taken over", will=cfg.clean_start)
                session = self._sessions.get(cfg.client_id)
            present = session is not None and not cfg.clean_start
            if session is None or not present:
                if session is not None:
                    self._count("session_discarded", len(session.queue))
                    del self._sessions[cfg.client_id]
                session = self._sessions[cfg.client_id] = _Session(cfg.client_id)
            v5 = cfg.protocol == 5
            session.username = cfg.username
            session.v5 = v5
            session.max_incoming = cfg.max_incoming if v5 else None
            session.persistent = not cfg.clean_start and (not v5 or cfg.session_expiry > 0)
            conn = session.conn = Conn(link, session)
            conn.will = cfg.will
            queued, session.queue = session.queue, deque()
            for item in queued:
                self._to_conn(conn, item)
            return conn, present, self.max_packet if v5 else None

    def _subscribe(
        self, conn: Conn[_Session], filters: Iterable[tuple[Filter, int]]
    ) -> list[str] | None:
        """SUBSCRIBE: the filters refused (always none with ``acl_file``); None if the
        connection is gone."""
        refused: list[str] = []
        with self._lock:
            if conn.session.conn is not conn:
                return None
            for filt, qos in filters:
                if self._auth == "dynsec" and self._acl is not None:
                    if not may_subscribe(self._acl, conn.session.username, filt):
                        self.refused_subscriptions += 1
                        refused.append(filt.value)
                        continue
                conn.session.subs[filt.value] = (filt, qos)
                if filt.group is not None:
                    continue  # no retained messages for shared subscriptions (MQTT 5 §4.8.2)
                for msg in self._retained.values():
                    if filt.matches(msg.topic):
                        self._offer(conn.session, msg, min(qos, msg.qos), retain=True)
            return refused

    def _publish(self, conn: Conn[_Session], msg: Message) -> bool:
        """PUBLISH: True once the broker took it (delivered or dropped), False if disconnected."""
        with self._lock:
            if conn.session.conn is not conn:
                return False
            sender = conn.session
            size = packet_size(msg, msg.qos, v5=sender.v5)
            if self.max_packet is not None and size > self.max_packet:
                log.warning("in-memory broker: %d-byte PUBLISH from %s dropped", size, msg.sender)
                self._count("too_large")
            elif self._injected(msg):
                self._count("injected")
            elif not self._may(sender, "write", msg.topic):
                log.debug("in-memory broker: ACL denied %s writing %s", sender.username, msg.topic)
                self._count("acl_write")
            else:
                if msg.retain and msg.payload:
                    self._retained[msg.topic] = msg
                elif msg.retain:
                    self._retained.pop(msg.topic, None)
                self._fan_out(msg)
            return True

    def _disconnect(self, conn: Conn[_Session]) -> None:
        """A client's own DISCONNECT."""
        with self._lock:
            if conn.session.conn is conn:
                self._close(conn, "Normal disconnection")

    def _remove_drop(self, rule: DropRule) -> None:
        with self._lock:
            if rule in self._drops:
                self._drops.remove(rule)

    # -- internals (broker lock held) ----------------------------------------------------------

    def _count(self, reason: str, n: int = 1) -> None:
        if n:
            self._dropped[reason] += n

    def _may(self, session: _Session, access: Literal["read", "write"], topic: str) -> bool:
        return self._acl is None or allowed(self._acl, session.username, access, topic)

    def _injected(self, msg: Message) -> bool:
        for rule in self._drops:
            try:
                hit = rule.predicate(msg.topic, msg.payload, msg.sender)
            except Exception:
                log.exception("in-memory broker: drop predicate %r failed", rule.predicate)
                continue
            if hit:
                rule.hits += 1
                return True
        return False

    def _fan_out(self, msg: Message) -> None:
        topic = Topic(value=msg.topic)
        plain: dict[str, tuple[_Session, int]] = {}
        groups: dict[tuple[str, str], list[tuple[_Session, int]]] = {}
        for session in self._sessions.values():
            for filt, qos in session.subs.values():
                if not filt.matches(topic):
                    continue
                if filt.group is None:
                    best = plain.get(session.client_id, (session, -1))[1]
                    plain[session.client_id] = (session, max(best, qos))
                else:
                    groups.setdefault((filt.group, filt.filter), []).append((session, qos))
        for session, qos in plain.values():
            self._offer(session, msg, min(msg.qos, qos), retain=False)
        for key, members in groups.items():
            turn = self._next_member.get(key, 0)
            self._next_member[key] = turn + 1
            session, qos = members[turn % len(members)]
            self._offer(session, msg, min(msg.qos, qos), retain=False, denied="acl_share")

    def _offer(
        self, session: _Session, msg: Message, qos: int, *, retain: bool, denied: str = "acl_read"
    ) -> None:
        """Deliver ``msg`` to one session: ACL, size, then its connection or offline queue."""
        if not self._may(session, "read", msg.topic):
            log.debug("in-memory broker: ACL denied %s reading %s", session.username, msg.topic)
            self._count(denied)
            return
        if session.max_incoming is not None:
            if packet_size(msg, qos, v5=session.v5) > session.max_incoming:
                self._count("too_large_for_client")
                return
        item = Queued(message=msg, qos=qos, retain=retain)
        if session.conn is not None:
            self._to_conn(session.conn, item)
        elif qos == 0:
            self._count("offline_qos0")
        elif len(session.queue) >= self.max_queued:
            self._count("queue_full")
        else:
            session.queue.append(item)

    def _publish_will(self, session: _Session, will: Will) -> None:
        msg = Message(
            topic=will.topic,
            payload=will.payload,
            qos=will.qos,
            retain=will.retain,
            response_topic=None,
            correlation_data=None,
            sender=session.client_id,
        )
        size = packet_size(msg, msg.qos, v5=session.v5)
        if self.max_packet is not None and size > self.max_packet:
            self._count("too_large")
            return
        if msg.retain and msg.payload:
            self._retained[msg.topic] = msg
        elif msg.retain:
            self._retained.pop(msg.topic, None)
        self._fan_out(msg)

    def _to_conn(self, conn: Conn[_Session], item: Queued) -> None:
        if not conn.link._push(conn, item, limit=self.max_inflight + self.max_queued):
            self._count("queue_full")

    def _close(self, conn: Conn[_Session], reason: str, *, will: bool = False) -> None:
        """Close a connection: what is still in its pipe is lost or requeued; ``will``: the
        connection ended uncleanly, so its will (if any) is published."""
        session = conn.session
        pending = conn.link._close_pipe(conn, reason)
        session.conn = None
        if will and conn.will is not None:
            self._publish_will(session, conn.will)
        if session.persistent:
            kept = [item for item in pending if item.qos > 0]
            self._count("disconnect", len(pending) - len(kept))
            session.queue.extendleft(reversed(kept))
        else:
            self._count("disconnect", len(pending))
            if self._sessions.get(session.client_id) is session:
                del self._sessions[session.client_id]


if TYPE_CHECKING:

    def _is_a_link_factory(broker: InMemoryBroker) -> LinkFactory:
        return broker.link
