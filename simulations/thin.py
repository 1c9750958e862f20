"""Thin, protocol-faithful pullers: many simulated devices per process, each on its own
broker connection with its own credentials, doing on the wire what an agent does.

A ``ThinPuller`` is one device's protocol, sans I/O: it verifies an offer as the agent's
updater does (keyring signed by the pinned root, manifest by a release key of it, sequence
above the last accepted, expiry, this device a target, its envelope matching the signed
digest, the content key unwrapped with the device's own KEM key), pulls the chunks with the
agent's window and request timeout (one index per request, timed-out ones re-sent, refusals
backed off), checks each chunk against its signed SHA-256, and reports ``DeviceStatus`` es
retained at QoS 1 at the same transitions (downloading, installing, idle with the new active
model) and as a heartbeat (no telemetry). What it leaves out is the device's own work: no
decryption of segments, no disk, no runtime load. It also counts what a test wants to know:
duplicates (a reply to a request already answered), hash failures, re-sent requests.

``ThinPool`` carries many pullers in one process: one paho-mqtt 2.x client per device (client
id ``agent-<id>``, the device's username and password, MQTT 5, a persistent session, the
agent's CONNECT MaximumPacketSize, TCP_NODELAY), all driven by one thread through paho's
external-loop API (``loop_read`` / ``loop_write`` / ``loop_misc`` on an epoll selector)
rather than one network thread per device. ``ThinProcess`` runs a pool in a spawned child
process (``multiprocessing``), so the pullers' CPU is not the coordinator's.

Set-up: ``enroll_thin`` makes device identities in memory and enrolls their public keys (the
private keys never touch the disk: nothing is installed); ``thin_specs`` pairs them with their
broker passwords (``coordinator.brokerconf.credentials``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgefleet.agent.daemon import MAX_INCOMING
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.coordinator.brokerconf import credentials
from edgefleet.coordinator.home import Coordinator
from edgefleet.protocol import topics
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.errors import EdgeFleetError
from edgefleet.protocol.keyring import Keyring
from edgefleet.protocol.keys import KEM_X25519, KemPrivateKey, SigningKey, generate_kem_key
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import (
    ActiveModel,
    ChunkReply,
    ChunkRequest,
    DeviceStatus,
    DownloadProgress,
    InstallResult,
    ReleaseOffer,
)
from edgefleet.protocol.segments import sha256_hex
from edgefleet.protocol.verify import select_envelope, verify_keyring, verify_manifest

from .brokers import start_broker
from .fleet import Fleet
from .homes import ModelFile, point_agents_at, provision_fleet

__all__ = [
    "AGENT_HEARTBEAT",
    "AGENT_TIMEOUT",
    "AGENT_WINDOW",
    "Out",
    "ThinPool",
    "ThinProcess",
    "ThinPuller",
    "ThinSpec",
    "ThinFleet",
    "enroll_thin",
    "open_thin_fleet",
    "thin_specs",
]

log = logging.getLogger(__name__)

AGENT_WINDOW = 8  # chunk requests in flight: AgentConfig.window's default
AGENT_TIMEOUT = 5.0  # s before an unanswered request is re-sent: AgentDaemon's default
AGENT_HEARTBEAT = 30.0  # s between status reports when nothing happens: AgentDaemon's default
MAX_BACKOFF = 300.0  # s, the longest wait before re-sending a refused request (as Download)
#: s: MQTT keepalive of a thin device. An agent uses 30 s; hundreds of thin devices share one
#: Python thread, which can be busy for longer than 1.5 x 30 s verifying a burst of offers
#: (a signature check, an HPKE unwrap and a manifest decode each), and the broker would then
#: drop connections the simulator, not the fleet, failed to keep alive.
KEEPALIVE = 300
Out = tuple[str, bytes, int, bool]  # (topic, payload, qos, retain) to publish


@dataclass
class _Pull:
    """A download in memory: which segments are still missing and which are asked for."""

    manifest: Manifest
    raw: bytes  # the signed manifest bytes (an identical offer again is ignored)
    started: float  # monotonic s
    missing: set[int] = field(default_factory=set)
    queue: collections.deque[int] = field(default_factory=collections.deque)
    outstanding: dict[int, float] = field(default_factory=dict)  # index -> re-send at
    answered: set[str] = field(default_factory=set)  # corr ids answered (duplicates)
    refusals: int = 0
    done_bytes: int = 0


@dataclass
class ThinStats:
    offers: int = 0
    rejected: int = 0  # offers refused (bad signature, not a target, rollback...)
    requests: int = 0  # chunk requests sent, re-sends included
    resent: int = 0  # of those, re-sends after the request timeout
    fetched: int = 0  # fresh, verified chunks
    duplicates: int = 0  # replies to a request that was answered already
    late: int = 0  # replies for a segment we had already (a re-send crossed the reply)
    bad_hash: int = 0
    refused: int = 0  # "refused"/"unknown" chunk frames
    statuses: int = 0
    bytes_in: int = 0  # payload bytes received (offers + chunk frames)
    bytes_out: int = 0  # payload bytes sent (requests + statuses)


class ThinPuller:
    """One device's side of the protocol (no I/O): feed it ``offer`` / ``chunk`` payloads
    and ``tick(now)``; publish what they return."""

    def __init__(
        self,
        identity: DeviceIdentity,
        root_public: bytes,
        *,
        window: int = AGENT_WINDOW,
        timeout: float = AGENT_TIMEOUT,
        heartbeat: float = AGENT_HEARTBEAT,  # s between statuses when nothing changes
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window < 1 or timeout <= 0:
            raise ValueError(f"need window >= 1 and timeout > 0, got {window}, {timeout}")
        self.identity, self.device_id = identity, identity.device_id
        self._root, self.window, self.timeout, self._clock = root_public, window, timeout, clock
        self._keyring: Keyring | None = None
        self.highest = 0  # highest accepted sequence
        self.active: ActiveModel | None = None
        self._active_raw: bytes | None = None
        self.last_result: InstallResult | None = None
        self.state = "idle"
        self.pull: _Pull | None = None
        self._attempt = 0
        self._counter = 0
        self.heartbeat, self._last_status = heartbeat, -1e18
        self.stats = ThinStats()
        self.offered_at: dict[int, float] = {}  # sequence -> monotonic s the offer arrived
        self.completed_at: dict[int, float] = {}  # sequence -> monotonic s all chunks were in

    # -- events -------------------------------------------------------------------------------
    def offer(self, payload: bytes, now: float) -> list[Out]:
        if not payload:
            return []
        self.stats.offers += 1
        self.stats.bytes_in += len(payload)
        try:
            offer = ReleaseOffer.decode(payload)
            if offer.manifest in (self._active_raw, self.pull and self.pull.raw):
                return []  # the retained offer of what we run or fetch already
            manifest = self._check(offer)
            select_envelope(manifest, [offer.envelope], self.device_id)
            unwrap_key(offer.envelope, self.identity.kem, bundle_id=manifest.bundle_id)
        except EdgeFleetError as exc:
            self.stats.rejected += 1
            log.warning("%s: rejected release offer (%s): %s", self.device_id, exc.code, exc)
            self.last_result = InstallResult(ok=False, code=exc.code, reason=str(exc)[:500],
                                             time=int(self._clock()))  # fmt: skip
            return [self._status(now)]
        if self.pull is not None and self.pull.manifest.sequence >= manifest.sequence:
            return []
        self.offered_at[manifest.sequence] = now
        pull = self.pull = _Pull(manifest=manifest, raw=offer.manifest, started=now)
        pull.missing.update(range(manifest.segments))
        pull.queue.extend(range(manifest.segments))
        self.state = "downloading"
        return [self._status(now), *self.tick(now)]

    def _check(self, offer: ReleaseOffer) -> Manifest:
        now = int(self._clock())
        self._keyring = verify_keyring(self._root, offer.keyring, offer.keyring_sig, now=now,
                                       current=self._keyring)  # fmt: skip
        return verify_manifest(self._keyring, offer.manifest, offer.signature, now=now,
                               device_id=self.device_id, highest_sequence=self.highest)  # fmt: skip

    def chunk(self, payload: bytes, now: float) -> list[Out]:
        self.stats.bytes_in += len(payload)
        p = self.pull
        if p is None:
            return []
        try:
            reply = ChunkReply.decode(payload, max_data=p.manifest.segment_size + 16)
        except EdgeFleetError as exc:
            log.warning("%s: dropped chunk reply: %s", self.device_id, exc)
            return []
        if reply.bundle_id != p.manifest.bundle_id:
            return []
        if reply.corr in p.answered:
            self.stats.duplicates += 1
            return []
        p.answered.add(reply.corr)
        if reply.status != "ok":
            self.stats.refused += 1
            p.refusals += 1
            if reply.index in p.outstanding:
                back_off = min(MAX_BACKOFF, self.timeout * 2 ** min(p.refusals - 1, 30))
                p.outstanding[reply.index] = now + back_off
            return []
        return self._accept(p, reply, now)

    def _accept(self, p: _Pull, reply: ChunkReply, now: float) -> list[Out]:
        i = reply.index
        if i not in p.missing:
            self.stats.late += 1
            return []
        off, length = p.manifest.segment_span(i)
        if len(reply.data) != length or sha256_hex(reply.data) != p.manifest.segment_hashes[i]:
            self.stats.bad_hash += 1
            if p.outstanding.pop(i, None) is not None:
                p.queue.appendleft(i)
            return self.tick(now)
        p.missing.discard(i)
        p.outstanding.pop(i, None)
        p.refusals = 0
        p.done_bytes += length
        self.stats.fetched += 1
        if p.missing:
            return self.tick(now)
        return self._finish(p, now)

    def _finish(self, p: _Pull, now: float) -> list[Out]:
        """Every chunk verified: what an agent reports around its install (which we skip)."""
        m = p.manifest
        self.completed_at[m.sequence] = now
        self.state = "installing"
        installing = self._status(now)
        self.pull, self.state, self.highest = None, "idle", m.sequence
        self._active_raw = p.raw
        self.active = ActiveModel(name=m.name, version=m.model_version, sequence=m.sequence,
                                  format=m.format, bundle_id=m.bundle_id)  # fmt: skip
        self.last_result = InstallResult(
            ok=True, code="ok", time=int(self._clock()), sequence=m.sequence, name=m.name,
            model_version=m.model_version, bundle_id=m.bundle_id,
        )  # fmt: skip
        return [installing, self._status(now)]

    def beat(self, now: float) -> list[Out]:
        """A status every ``heartbeat`` s, as the agent's reporter sends one (a status the
        broker or the coordinator lost is so replaced)."""
        if now - self._last_status < self.heartbeat:
            return []
        return [self._status(now)]

    def tick(self, now: float) -> list[Out]:
        """Re-send timed-out requests and fill the window (as ``Download.pump``)."""
        p = self.pull
        if p is None:
            return []
        due = [i for i, t in p.outstanding.items() if now >= t]
        self.stats.resent += len(due)
        fresh: list[int] = []
        while p.queue and len(p.outstanding) + len(fresh) < self.window:
            i = p.queue.popleft()
            if i in p.missing and i not in p.outstanding:
                fresh.append(i)
        out = []
        topic, reply_to = topics.up(self.device_id, "chunkreq"), topics.chunk(self.device_id)
        for i in due + fresh:
            self._attempt += 1
            p.outstanding[i] = now + self.timeout
            req = ChunkRequest(bundle_id=p.manifest.bundle_id, indexes=(i,), reply_to=reply_to,
                               corr=f"{i}.{self._attempt}").encode()  # fmt: skip
            self.stats.requests += 1
            self.stats.bytes_out += len(req)
            out.append((topic, req, 1, False))
        return out

    def connected(self, now: float) -> list[Out]:
        """A (re)connect: report, and treat every outstanding request as lost."""
        if self.pull is not None:
            for i in self.pull.outstanding:
                self.pull.outstanding[i] = float("-inf")
        return [self._status(now), *self.tick(now)]

    def _status(self, now: float) -> Out:
        self._last_status = now
        p = self.pull
        progress = None
        if p is not None:
            progress = DownloadProgress(bundle_id=p.manifest.bundle_id,
                                        sequence=p.manifest.sequence, done=p.done_bytes,
                                        total=p.manifest.payload_size,
                                        fetched=self.stats.fetched,
                                        requests=self.stats.requests)  # fmt: skip
        self._counter += 1
        status = DeviceStatus(
            device_id=self.device_id, time=int(self._clock()), state=self.state,
            active=self.active, highest_sequence=self.highest, last_result=self.last_result,
            progress=progress, counter=self._counter,
        ).encode()  # fmt: skip
        self.stats.statuses += 1
        self.stats.bytes_out += len(status)
        return topics.up(self.device_id, "status"), status, 1, True


# -- set-up -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ThinSpec:
    """What a (child) process needs to run one thin device: identity and broker password."""

    device_id: str
    sign_seed: bytes
    kem: str
    kem_raw: bytes
    password: str

    def identity(self) -> DeviceIdentity:
        return DeviceIdentity(device_id=self.device_id,
                              signing=SigningKey.from_raw(self.sign_seed),
                              kem=KemPrivateKey(self.kem, self.kem_raw))  # fmt: skip


def enroll_thin(
    coordinator: Coordinator, device_ids: Iterable[str], *, kem: str = KEM_X25519
) -> dict[str, DeviceIdentity]:
    """Device identities made in memory, their public keys enrolled (``coordinator enroll``)."""
    out = {}
    for d in device_ids:
        ident = DeviceIdentity(device_id=d, signing=SigningKey.generate(),
                               kem=generate_kem_key(kem))  # fmt: skip
        coordinator.enroll(ident.public())
        out[d] = ident
    return out


def thin_specs(identities: dict[str, DeviceIdentity], users: dict[str, str]) -> list[ThinSpec]:
    """Pair identities with their broker passwords (``brokerconf.credentials``)."""
    return [
        ThinSpec(device_id=d, sign_seed=i.signing.raw(), kem=i.kem.kem, kem_raw=i.kem.raw,
                 password=users[d])  # fmt: skip
        for d, i in identities.items()
    ]


# -- many pullers, one thread -----------------------------------------------------------------
class _Device:
    """One puller and its paho client."""

    def __init__(self, pool: ThinPool, spec: ThinSpec, puller: ThinPuller) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.pool, self.puller, self.subscribed = pool, puller, False
        self.reconnect_at: float | None = None
        c = self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                      client_id=topics.device_client_id(spec.device_id),
                                      protocol=paho.MQTTv5)  # fmt: skip
        c.username_pw_set(spec.device_id, spec.password)
        c.max_inflight_messages_set(20)
        c.on_socket_open = pool._opened
        c.on_socket_close = pool._closed
        c.on_socket_register_write = pool._want_write
        c.on_socket_unregister_write = pool._no_write
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._release = topics.release(spec.device_id)
        self._chunk = topics.chunk(spec.device_id)

    def connect(self, host: str, port: int) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        props.MaximumPacketSize = MAX_INCOMING
        try:
            self.client.connect(host, port, keepalive=KEEPALIVE, clean_start=False,
                                properties=props)  # fmt: skip
        except OSError as exc:
            log.warning("%s: cannot connect (%s); retrying", self.puller.device_id, exc)
            self.reconnect_at = time.monotonic() + 1.0

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("%s: connection refused: %s", self.puller.device_id, reason)
            return
        d = self.puller.device_id
        client.subscribe([(self._release, 1), (self._chunk, 1), (topics.cmd(d), 1)])

    def _on_subscribe(self, *_a: Any) -> None:
        self.subscribed = True
        self.send(self.puller.connected(time.monotonic()))
        self.pool._changed()

    def _on_disconnect(self, *_a: Any) -> None:
        if self.pool.running:
            self.subscribed = False
            self.reconnect_at = time.monotonic() + 0.5

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        payload = bytes(msg.payload)
        if msg.topic == self._chunk:
            out = self.puller.chunk(payload, now)
        elif msg.topic == self._release:
            out = self.puller.offer(payload, now)
        else:
            return
        self.send(out)
        if out and self.puller.pull is None:
            self.pool._changed()

    def send(self, out: list[Out]) -> None:
        for topic, payload, qos, retain in out:
            self.client.publish(topic, payload, qos=qos, retain=retain)


class ThinPool:
    """Thin devices over their own connections, all served by one thread (``start``)."""

    def __init__(
        self,
        specs: Sequence[ThinSpec],
        root_public: bytes,
        url_host: str,
        port: int,
        *,
        window: int = AGENT_WINDOW,
        timeout: float = AGENT_TIMEOUT,
        heartbeat: float = AGENT_HEARTBEAT,
        tick: float = 0.2,  # s between timeout checks (the agent's worker wakes as often)
    ) -> None:
        self.host, self.port, self._tick = url_host, port, tick
        self._sel = selectors.DefaultSelector()
        self.devices = [
            _Device(self, s, ThinPuller(s.identity(), root_public, window=window,
                                        timeout=timeout, heartbeat=heartbeat))  # fmt: skip
            for s in specs
        ]
        self._cond = threading.Condition()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self.running = False
        self._thread = threading.Thread(target=self._loop, name="thin-pool", daemon=True)

    # -- the selector's callbacks (loop thread) ------------------------------------------------
    def _opened(self, client: Any, _u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _closed(self, _client: Any, _u: Any, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client: Any, _u: Any, sock: Any) -> None:
        self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _no_write(self, client: Any, _u: Any, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Connect every device (from the loop thread) and wait until all are subscribed."""
        self.running = True
        for d in self.devices:
            self._calls.append(lambda d=d: d.connect(self.host, self.port))  # type: ignore[misc]
        self._thread.start()
        if not self.wait(lambda: all(d.subscribed for d in self.devices), timeout):
            n = sum(d.subscribed for d in self.devices)
            raise TimeoutError(f"thin pool: {n} of {len(self.devices)} devices subscribed")

    def stop(self) -> None:
        self.running = False
        self._thread.join(timeout=10)
        for d in self.devices:
            try:
                d.client.disconnect()
                d.client.loop_write()
            except Exception:  # the socket may be gone already
                pass
            sock = d.client.socket()
            if sock is not None:
                self._closed(d.client, None, sock)
                sock.close()
        self._sel.close()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_sequence(self, sequence: int, timeout: float) -> bool:
        """Until every device has every chunk of ``sequence`` (or a newer one) verified."""
        return self.wait(lambda: all(d.puller.highest >= sequence for d in self.devices), timeout)

    def set_timeout(self, timeout: float) -> None:
        """The request timeout of every puller from now on (s; requests already out keep
        theirs)."""
        for d in self.devices:
            d.puller.timeout = timeout

    def totals(self) -> dict[str, int]:
        total: collections.Counter[str] = collections.Counter()
        for d in self.devices:
            total.update(vars(d.puller.stats))
        return dict(total)

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = next_misc = 0.0
        while self.running:
            for key, mask in self._sel.select(timeout=self._tick / 2) if self._sel.get_map() \
                    else ():  # fmt: skip
                client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE and client.socket() is not None:
                    client.loop_write()
            now = time.monotonic()
            for _ in range(min(len(self._calls), 64)):  # connects, paced
                self._calls.popleft()()
            if not self._sel.get_map():
                time.sleep(0.01)
            if now >= next_tick:
                next_tick = now + self._tick
                self._timers(now)
            if now >= next_misc:
                next_misc = now + 1.0
                for d in self.devices:
                    d.client.loop_misc()

    def _timers(self, now: float) -> None:
        for d in self.devices:
            if d.reconnect_at is not None and now >= d.reconnect_at:
                d.reconnect_at = None
                try:
                    d.client.reconnect()
                except OSError:
                    d.reconnect_at = now + 1.0
            elif d.subscribed:
                d.send(d.puller.tick(now) if d.puller.pull is not None else [])
                d.send(d.puller.beat(now))


# -- a pool in a child process ----------------------------------------------------------------
def _child(specs: list[ThinSpec], root: bytes, host: str, port: int, opts: dict[str, Any],
           conn: Any) -> None:  # fmt: skip
    """Child process: run a ``ThinPool``; obey ("wait", sequence, timeout), ("totals",),
    ("stop",)."""
    import traceback

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s [thin]: %(message)s")
    pool = None
    try:
        pool = ThinPool(specs, root, host, port, **opts)
        pool.start()
        conn.send(("ready", None))
        while True:
            cmd, *args = conn.recv()
            if cmd == "wait":
                ok = pool.wait_sequence(args[0], args[1])
                conn.send(("done", ok))
            elif cmd == "totals":
                conn.send(("totals", pool.totals()))
            elif cmd == "times":
                conn.send(("times", [(d.puller.device_id, d.puller.offered_at.get(args[0]),
                                      d.puller.completed_at.get(args[0]))
                                     for d in pool.devices]))  # fmt: skip
            elif cmd == "stop":
                break
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        if pool is not None:
            pool.stop()
        conn.close()


class ThinProcess:
    """A ``ThinPool`` in a spawned child process (its CPU is its own: ``pid``)."""

    def __init__(self, specs: Sequence[ThinSpec], root_public: bytes, host: str, port: int,
                 **opts: Any) -> None:  # fmt: skip
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # never fork a process with threads
        self._conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(list(specs), root_public, host, port,
                                                     opts, theirs),
                                name="thin-pool", daemon=True)  # fmt: skip
        self.proc.start()
        theirs.close()

    @property
    def pid(self) -> int:
        return int(self.proc.pid or 0)

    def _ask(self, want: str, timeout: float, *msg: Any) -> Any:
        if msg:
            self._conn.send(msg)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"thin process: no {want!r} within {timeout} s")
        what, arg = self._conn.recv()
        if what != want:
            raise RuntimeError(f"thin process: {what}: {arg}")
        return arg

    def ready(self, timeout: float = 120.0) -> None:
        self._ask("ready", timeout)

    def wait_sequence(self, sequence: int, timeout: float) -> bool:
        return bool(self._ask("done", timeout + 10, "wait", sequence, timeout))

    def totals(self) -> dict[str, int]:
        return dict(self._ask("totals", 30, "totals"))

    def times(self, sequence: int) -> list[tuple[str, float | None, float | None]]:
        """(device, offer arrived, all chunks verified) in monotonic s, per device."""
        return list(self._ask("times", 30, "times", sequence))

    def stop(self) -> None:
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()


# -- a fleet of thin devices and a few real agents --------------------------------------------
@dataclass
class ThinFleet:
    """``fleet``: the rig (coordinator, broker, the real agents' homes); ``specs``: the thin
    devices; ``procs`` / ``pools``: the pools started with ``start_pools`` / ``local_pool``."""

    fleet: Fleet
    specs: list[ThinSpec]
    procs: list[ThinProcess] = field(default_factory=list)
    pools: list[ThinPool] = field(default_factory=list)

    @property
    def thin_ids(self) -> list[str]:
        return [s.device_id for s in self.specs]

    def start_pools(self, processes: int = 1, **opts: Any) -> list[ThinProcess]:
        """The thin devices split over ``processes`` child processes, connected and listening."""
        url = urlsplit(self.fleet.broker.url)
        assert url.hostname is not None and url.port is not None
        root = self.fleet.setup.root_public
        procs = [ThinProcess(self.specs[k::processes], root, url.hostname, url.port, **opts)
                 for k in range(processes)]  # fmt: skip
        self.procs += procs
        for p in procs:
            p.ready()
        return procs

    def local_pool(self, **opts: Any) -> ThinPool:
        """All thin devices in one ``ThinPool`` of this process (its counters readable at any
        time), connected and listening; stopped with the fleet."""
        url = urlsplit(self.fleet.broker.url)
        assert url.hostname is not None and url.port is not None
        pool = ThinPool(self.specs, self.fleet.setup.root_public, url.hostname, url.port, **opts)
        self.pools.append(pool)
        pool.start()
        return pool

    def _all(self) -> list[ThinProcess | ThinPool]:
        return [*self.procs, *self.pools]

    def wait_sequence(self, sequence: int, timeout: float) -> bool:
        return all(p.wait_sequence(sequence, timeout) for p in self._all())

    def totals(self) -> dict[str, int]:
        total: collections.Counter[str] = collections.Counter()
        for p in self._all():
            total.update(p.totals())
        return dict(total)

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        for pool in self.pools:
            pool.stop()


@contextmanager
def open_thin_fleet(
    work: Path,
    thin: int,
    agents: Sequence[str] = (),
    *,
    models: Sequence[ModelFile],
    segment_size: int | None = None,
    database: str = "",
    broker_options: dict[str, Any] | None = None,
    prefix: str = "thin-",
) -> Iterator[ThinFleet]:
    """``thin`` thin devices (``<prefix>00000`` ...) and the real agents ``agents`` enrolled in
    one coordinator (registry at ``database``), on a mosquitto with all their passwords."""
    homes = provision_fleet(work, agents, models=models, segment_size=segment_size,
                            database=database)  # fmt: skip
    c = homes.coordinator
    identities = enroll_thin(c, (f"{prefix}{i:05d}" for i in range(thin)))
    users = credentials(c)
    homes = dataclasses.replace(homes, users=users)
    running = start_broker("mosquitto", users=users, data_dir=work / "broker",
                           coordinator_user=c.config.username,
                           **(broker_options or {}))  # fmt: skip
    tf = None
    try:
        point_agents_at(c, homes.homes, running.url, running.protocol)
        tf = ThinFleet(Fleet(work, homes, running), thin_specs(identities, users))
        yield tf
    finally:
        if tf is not None:
            tf.close()
            tf.fleet.close()
        running.close()
