"""One bad device: the attacks of issue 7 with the rogue's own valid broker credentials.

The hardened broker pins a device account to the client id ``agent-<id>``, so the rogue has
one live connection at a time (a second one as ``agent-<id>`` would kick the first). Like a
real attacker it multiplexes everything onto that one raw MQTT 3.1.1 socket, which it never
reads after set-up (a subscriber that stops reading), and reconnects when the broker closes
it. The client-id takeover attempts use connections of their own (refused, they kick nobody).

Each attack is a small object with a rate (actions per second) and ``act``; ``Rogue.run``
paces them on two threads (the main connection, the side connections) for a bounded time,
stoppable at any moment, and counts every action in ``Rogue.counts``:

1. ``Amplify``: subscribed to its own chunk topic, never reading, it asks for 16 segments per
   request of a release that targets it (each ~90-byte request asks for 16 segment replies).
2. ``JoinShare``: subscribes to the coordinators' ``$share`` group (on every connect, where
   the SUBACK is read and counted as ``share_refused``/``share_granted``, and again unread).
3. ``Flood``: chunk requests with random bundle ids, ~1,500/s.
4. ``Takeover``: connects with its username as ``agent-<other>`` and as coordinator client
   ids; counts the CONNACKs (``takeover_refused``/``takeover_accepted``).
5. ``Oversize``: telemetry at and above the coordinator's caps, up to the broker's maximum
   packet, and now and then one packet above it (the broker closes the connection).
6. ``RetainSpam``: retained messages of up to 256 KiB under its own ``up/`` topics and on
   topics it may not write (other devices', its release topic, stray ones).

Everything is bounded: rates are per second, sizes are below a cap, and ``run`` ends at its
deadline or when ``stop`` is set. ``run_rogue`` is the entry point for a separate process.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet.protocol import topics
from edgefleet.protocol.messages import MAX_INDEXES, MAX_STATUS, MAX_TELEMETRY, ChunkRequest

__all__ = [
    "Amplify",
    "Attack",
    "Flood",
    "JoinShare",
    "Oversize",
    "RawMqtt",
    "RetainSpam",
    "Rogue",
    "RogueTarget",
    "Takeover",
    "default_attacks",
    "run_rogue",
]

log = logging.getLogger(__name__)

SOCKET_TIMEOUT = 10.0  # s for a connect or a blocked send
RECV_BUFFER = 4096  # bytes of kernel receive buffer on the unread socket: the broker holds it
MAX_BURST = 200  # actions of one attack per scheduler tick, at most (after a stall)
TICK = 0.005  # s between scheduler rounds


@dataclass(frozen=True, kw_only=True)
class RogueTarget:
    """What the rogue device knows: its broker, its own credentials and a release for it."""

    host: str
    port: int
    device_id: str
    password: str = field(repr=False)
    bundle_id: str  # a release that targets this device
    segments: int  # ... with this many segments (>= 16 for the full amplification)
    victims: tuple[str, ...] = ()  # client ids to take over (agent-<other>, coordinators)
    max_packet: int  # bytes: the broker's max_packet_size
    coordinator_max: int  # bytes: the coordinator's announced maximum packet size

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "victims": list(self.victims)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RogueTarget:
        return cls(**{**d, "victims": tuple(d.get("victims", ()))})


# -- a bare MQTT 3.1.1 client --------------------------------------------------------------


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _varint(n: int) -> bytes:
    out = b""
    while True:
        n, digit = divmod(n, 128)
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, retain: bool = False) -> bytes:
    """A QoS 0 PUBLISH packet (no acknowledgement to read)."""
    return _packet(0x30 | (1 if retain else 0), _str(topic) + payload)


class RawMqtt:
    """One MQTT 3.1.1 connection over a plain socket that reads only when told to."""

    def __init__(self, host: str, port: int, client_id: str, user: str, password: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=SOCKET_TIMEOUT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        self._ids = itertools.count(1)
        flags = 0x80 | 0x40 | 0x02  # username, password, clean session
        body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", 0)  # keepalive: none
        self.sock.sendall(_packet(0x10, body + _str(client_id) + _str(user) + _str(password)))
        first, connack = self.read_packet()
        if first >> 4 != 2 or len(connack) != 2:
            raise ConnectionError(f"expected CONNACK, got packet type {first >> 4}")
        self.return_code = connack[1]  # 0 accepted, 5 not authorized

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise ConnectionError("the broker closed the connection")
            data += more
        return data

    def read_packet(self) -> tuple[int, bytes]:
        first = self._read_exact(1)[0]
        length, shift = 0, 0
        while True:
            digit = self._read_exact(1)[0]
            length |= (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        return first, self._read_exact(length)

    def subscribe(self, topic: str, *, wait: bool) -> int | None:
        """SUBSCRIBE at QoS 1; with ``wait``, read up to the SUBACK (skipping PUBLISHes)
        and return its code (0x80 = refused); without, return None unread."""
        pid = next(self._ids) % 65535 + 1
        self.sock.sendall(_packet(0x82, struct.pack("!H", pid) + _str(topic) + b"\x01"))
        while wait:
            first, body = self.read_packet()
            if first >> 4 == 9 and body[:2] == struct.pack("!H", pid):
                return body[2]
        return None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Session:
    """The rogue's one connection as ``agent-<id>``: set up (SUBACKs read), then never read;
    re-opened whenever the broker closes it."""

    def __init__(self, target: RogueTarget, counts: collections.Counter[str]) -> None:
        self.target, self.counts = target, counts
        self.client_id = topics.device_client_id(target.device_id)
        self._conn: RawMqtt | None = None

    def conn(self) -> RawMqtt:
        if self._conn is None:
            t = self.target
            conn = RawMqtt(t.host, t.port, self.client_id, t.device_id, t.password)
            if conn.return_code:
                conn.close()
                raise ConnectionError(f"{self.client_id} refused: code {conn.return_code}")
            share = conn.subscribe(topics.chunk_requests_shared(), wait=True)
            self.counts["share_granted" if share is not None and share < 0x80
                        else "share_refused"] += 1  # fmt: skip
            conn.subscribe(topics.chunk(t.device_id), wait=True)
            self.counts["connects"] += 1
            self._conn = conn
        return self._conn

    def send(self, data: bytes, what: str) -> bool:
        """Send one packet; False (and a reconnect next time) if the broker closed us."""
        try:
            self.conn().send(data)
        except OSError:
            self.drop()
            self.counts["send_failed"] += 1
            return False
        self.counts[what] += 1
        return True

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.drop()


# -- the attacks ---------------------------------------------------------------------------


class Attack(Protocol):
    name: str
    rate: float  # actions per second
    main: bool  # on the rogue's one connection (else on connections of its own)
    start_after: float  # s after the start of the run

    def act(self, session: _Session) -> None: ...


@dataclass
class Amplify:
    """Item 1: 16-segment requests for a release that targets the rogue, never read."""

    rate: float = 30.0
    name: str = "amplify"
    main: bool = True
    start_after: float = 0.0

    def act(self, session: _Session) -> None:
        t = session.target
        req = ChunkRequest(bundle_id=t.bundle_id, indexes=tuple(range(min(MAX_INDEXES,
                           t.segments))), reply_to=topics.chunk(t.device_id),
                           corr=secrets.token_hex(4))  # fmt: skip
        session.send(publish_packet(topics.up(t.device_id, "chunkreq"), req.encode()),
                     "amplify_requests")  # fmt: skip


@dataclass
class JoinShare:
    """Item 2: ask to join the coordinators' shared subscription (unread SUBACK)."""

    rate: float = 1.0
    name: str = "share"
    main: bool = True
    start_after: float = 0.0

    def act(self, session: _Session) -> None:
        try:
            session.conn().subscribe(topics.chunk_requests_shared(), wait=False)
        except OSError:
            session.drop()
            return
        session.counts["share_subscribes"] += 1


@dataclass
class Flood:
    """Item 3: chunk requests with random bundle ids."""

    rate: float = 1500.0
    name: str = "flood"
    main: bool = True
    # After the amplification's first requests: random ids use up the device's registry
    # lookup budget, which the bait release's first lookup needs too (an attacker who wants
    # both starts with the amplification).
    start_after: float = 1.0
    _n: int = 0

    def act(self, session: _Session) -> None:
        t = session.target
        self._n += 1
        req = ChunkRequest(bundle_id=secrets.token_hex(16), indexes=(self._n % MAX_INDEXES,),
                           reply_to=topics.chunk(t.device_id), corr=f"f{self._n}")  # fmt: skip
        session.send(publish_packet(topics.up(t.device_id, "chunkreq"), req.encode()),
                     "flood_requests")  # fmt: skip


@dataclass
class Takeover:
    """Item 4: connect with the rogue's username as someone else's client id."""

    rate: float = 4.0
    name: str = "takeover"
    main: bool = False
    start_after: float = 0.0
    _n: int = 0

    def act(self, session: _Session) -> None:
        t = session.target
        if not t.victims:
            return
        victim = t.victims[self._n % len(t.victims)]
        self._n += 1
        session.counts["takeover_attempts"] += 1
        try:
            conn = RawMqtt(t.host, t.port, victim, t.device_id, t.password)
        except OSError:  # closed before CONNACK: refused too
            session.counts["takeover_refused"] += 1
            return
        session.counts["takeover_accepted" if conn.return_code == 0
                       else "takeover_refused"] += 1  # fmt: skip
        conn.close()


@dataclass
class Oversize:
    """Item 5: telemetry at and past the coordinator's caps, up to the broker's packet
    limit; every ``over_every``-th one (the first halfway) is larger than the broker
    accepts: it closes the connection, and the rogue's queue there with it."""

    rate: float = 2.0
    over_every: int = 20
    name: str = "oversize"
    main: bool = True
    start_after: float = 0.0
    _n: int = 0

    def sizes(self, t: RogueTarget) -> list[int]:
        """Payload bytes: at the telemetry cap, just over it, at and just over the
        coordinator's packet limit, and just under the broker's."""
        return [MAX_TELEMETRY, MAX_TELEMETRY + 1, t.coordinator_max - 2048,
                t.coordinator_max + 1024, t.max_packet - 4096]

    def act(self, session: _Session) -> None:
        t = session.target
        self._n += 1
        topic = topics.up(t.device_id, "telemetry")
        if self._n % self.over_every == self.over_every // 2:
            # The header announces max_packet + 1 bytes; the broker closes on the length.
            header = bytes([0x30]) + _varint(t.max_packet + 1) + _str(topic)
            if not session.send(header + b"\x00" * 1024, "over_limit_sent"):
                return
            session.drop()  # it is closed now (or about to be): start afresh
            return
        sizes = self.sizes(t)
        size = sizes[self._n % len(sizes)]
        body = b'{"type":"telemetry","schema_version":1,"metrics":{"x":"'
        payload = body + b"x" * max(0, size - len(body) - 3) + b'"}}'
        session.send(publish_packet(topic, payload), f"oversize_{self._n % len(sizes)}")


@dataclass
class RetainSpam:
    """Item 6: retained messages under the rogue's own ``up/`` topics and elsewhere."""

    rate: float = 20.0
    max_size: int = 256 * 1024
    name: str = "retain"
    main: bool = True
    start_after: float = 0.0
    _n: int = 0

    def topics_for(self, t: RogueTarget, n: int) -> list[tuple[str, str]]:
        """(topic, counter) pairs: its own writable topics first, then forbidden ones."""
        me = t.device_id
        other = next((v.removeprefix("agent-") for v in t.victims if v.startswith("agent-")),
                     "dev-0")  # fmt: skip
        return [
            *((topics.up(me, kind), "retain_own") for kind in topics.UP_KINDS),
            (f"{topics.PREFIX}/dev/{me}/up/x{n}", "retain_denied"),
            (f"{topics.PREFIX}/dev/{me}/up/status/{n}", "retain_denied"),
            (topics.up(other, "status"), "retain_denied"),
            (topics.release(me), "retain_denied"),
            (f"{topics.PREFIX}/stray/{n}", "retain_denied"),
            (f"stray/{n}", "retain_denied"),
        ]

    def act(self, session: _Session) -> None:
        t = session.target
        self._n += 1
        choices = self.topics_for(t, self._n)
        topic, what = choices[self._n % len(choices)]
        size = min(self.max_size, MAX_STATUS << (self._n % 5))  # 16 KiB .. 256 KiB
        session.send(publish_packet(topic, b"R" * size, retain=True), what)


def default_attacks(rate_scale: float = 1.0) -> list[Attack]:
    """Every attack above at its default rate (times ``rate_scale``)."""
    attacks: list[Attack] = [Amplify(), JoinShare(), Flood(), Takeover(), Oversize(),
                             RetainSpam()]  # fmt: skip
    for a in attacks:
        a.rate *= rate_scale
    return attacks


# -- running them --------------------------------------------------------------------------


class Rogue:
    """Runs ``attacks`` for ``target`` until a deadline or ``stop``; ``counts`` says what
    was done (and what the broker answered where it answers)."""

    def __init__(self, target: RogueTarget, attacks: Sequence[Attack] | None = None) -> None:
        self.target = target
        self.attacks = list(attacks if attacks is not None else default_attacks())
        self._counts: list[collections.Counter[str]] = []  # one per pacing thread
        self.started = threading.Event()  # the main connection is up and attacking
        self.errors: list[str] = []

    @property
    def counts(self) -> collections.Counter[str]:
        """Every action so far, by kind (a snapshot summed over the pacing threads)."""
        total: collections.Counter[str] = collections.Counter()
        for c in list(self._counts):
            total.update(dict(c))
        return total

    def run(self, seconds: float, stop: threading.Event | None = None) -> collections.Counter[str]:
        stop = stop or threading.Event()
        deadline = time.monotonic() + seconds
        groups = {True: [a for a in self.attacks if a.main],
                  False: [a for a in self.attacks if not a.main]}  # fmt: skip
        threads = [threading.Thread(target=self._pace, args=(g, main, deadline, stop),
                                    name=f"rogue-{'main' if main else 'side'}", daemon=True)
                   for main, g in groups.items() if g]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.counts

    def _pace(
        self, attacks: list[Attack], main: bool, deadline: float, stop: threading.Event
    ) -> None:
        counts: collections.Counter[str] = collections.Counter()
        self._counts.append(counts)
        session = _Session(self.target, counts)
        done = [0] * len(attacks)
        t0 = time.monotonic()
        try:
            while not stop.is_set() and (now := time.monotonic()) < deadline:
                for i, attack in enumerate(attacks):
                    since = now - t0 - attack.start_after
                    due = min(int(since * attack.rate) - done[i], MAX_BURST)
                    for _ in range(max(0, due)):
                        self._act(attack, session, counts)
                    done[i] += max(0, due)
                if main and session.connected:
                    self.started.set()
                stop.wait(TICK)
        finally:
            session.close()

    def _act(self, attack: Attack, session: _Session, counts: collections.Counter[str]) -> None:
        try:
            attack.act(session)
        except OSError as exc:  # refused or reset while connecting (ConnectionError too)
            session.drop()
            counts["connect_failed"] += 1
            if len(self.errors) < 20:
                self.errors.append(f"{attack.name}: {exc}")


def run_rogue(target: RogueTarget, seconds: float, rate_scale: float = 1.0) -> dict[str, int]:
    """Every attack for ``seconds``; the counts (for a separate process)."""
    return dict(Rogue(target, default_attacks(rate_scale)).run(seconds))
