"""The coordinator's MQTT shell: publish releases, serve chunks, ingest device status.

The link's thread only routes: it checks each upstream message against its kind's size cap,
decodes chunk requests (small, pure) and hands work to bounded queues, counting every drop per
device and reason (``drops``). Three worker threads do the rest:

- ``chunks`` answers requests whose release facts are cached, round-robin over per-device
  queues (``chunks.ChunkQueues``: at most ``window`` segments per device queued or being
  answered, so one device's flood neither starves the others nor grows our memory);
- ``lookups`` resolves bundle ids the caches do not know, against the registry with a short
  busy timeout and a per-device budget (a locked registry or random ids never stall the chunk
  stream);
- ``ingest`` stores statuses (the latest per device, coalesced) and telemetry (a queue
  bounded in messages and bytes) through ``ingest.Ingest``, in batches, and raises drift
  alerts for the devices whose drift telemetry it stored (``drift.DriftWatch``: at most one
  check every ``drift_every`` seconds), the alerts ``fleet drift`` and the dashboard show.

Release offers go out on a second connection of their own (``offer_link``): a fan-out's chunk
replies, queued on the main link, never delay them.

The link announces ``MAX_INCOMING`` as its MQTT 5 maximum packet size, so the broker never
sends it anything larger. Several ``coordinator serve`` processes can run against one registry:
chunk requests arrive through a shared subscription and are split between them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.infra.fsutil import os_errors
from edgefleet.infra.link.config import HEADER_ALLOWANCE
from edgefleet.infra.link.mqtt import MqttConfig, MqttLink
from edgefleet.infra.link.port import Link, LinkFactory, MessageProps
from edgefleet.infra.settings import mqtt_config
from edgefleet.protocol import topics
from edgefleet.protocol.errors import EdgeFleetError, StoreError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import MAX_REQUEST, MAX_STATUS, MAX_TELEMETRY, ChunkRequest

from . import release as releases
from .candidates import candidate_facts
from .chunks import ChunkQueues, ChunkServer, LookupBudget, ReleaseFacts
from .drift import DriftWatch
from .home import Coordinator
from .ingest import STATUS, TELEMETRY, Ingest
from .release import offers

__all__ = ["MAX_INCOMING", "CoordinatorService", "ServiceLimits", "mqtt_config_for", "offers"]

log = logging.getLogger(__name__)

UNSENT_LIMIT = 16 * 1024 * 1024  # bytes of chunk replies queued in the link before we wait
INGEST_BATCH = 500  # upstream messages per registry transaction, at most
INGEST_LINGER = 0.05  # s the ingest worker waits for a batch to fill once something is queued
CHUNKREQ = "up/chunkreq"  # topic kinds (protocol.topics.route) the service subscribes to
#: bytes reserved for a future upstream kind (``up/fl``: federated-learning updates)
FL_RESERVE = 1 << 20
#: bytes: the largest upstream packet we accept (CONNECT MaximumPacketSize)
MAX_INCOMING = max(MAX_REQUEST, MAX_STATUS, MAX_TELEMETRY, FL_RESERVE) + HEADER_ALLOWANCE
_CAPS = {CHUNKREQ: MAX_REQUEST, STATUS: MAX_STATUS, TELEMETRY: MAX_TELEMETRY}  # payload bytes
STATUSES_PER_DEVICE = 4  # pending for ingest; older ones are superseded by the newest
ROUTES_CACHED = 65_536  # topics whose parsed route the link thread keeps (two per device)
LOOKUP_BUSY_TIMEOUT = 1.0  # s a chunk-path registry lookup waits for a locked database


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """What one device (and all of them) can make the service hold."""

    window: int = 16  # chunk segments per device, queued or being answered
    max_releases: int = 64  # release facts (manifests) cached
    max_unknown: int = 4096  # unknown bundle ids cached (negative lookups)
    max_files: int = 8  # payload blobs open at once
    resend_after: float = 0.5  # s before the same segment goes to the same device again
    lookup_rate: float = 1.0  # registry lookups of uncached bundle ids per device per second
    lookup_burst: int = 8  # ... in a burst
    lookups_queued: int = 256  # chunk requests waiting for a lookup, all devices
    telemetry_messages: int = 10_000  # telemetry queued for ingest
    telemetry_bytes: int = 16 * 1024 * 1024
    status_bytes: int = 16 * 1024 * 1024  # latest statuses waiting for ingest, all devices

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value <= 0:
                raise ValueError(f"ServiceLimits.{name} must be > 0, got {value}")


def _no_messages(topic: str, payload: bytes, props: MessageProps) -> None:
    """The offer link subscribes to nothing."""


def _worth_logging(n: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th… drop of a kind per device: a flood is visible in the log
    without flooding it (``drops`` has every count)."""
    return n & (n - 1) == 0


class _FileReader:
    """A payload blob opened for positioned reads (``chunks.PayloadReader``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        with os_errors(f"{path}: cannot open the payload"):
            self._fd = os.open(path, os.O_RDONLY)

    def read_at(self, offset: int, length: int) -> bytes:
        with os_errors(f"{self._path}: cannot read the payload"):
            return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


class CoordinatorService:
    def __init__(
        self,
        coordinator: Coordinator,
        mqtt: MqttConfig,
        *,
        link_factory: LinkFactory = MqttLink,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        limits: ServiceLimits = ServiceLimits(),  # noqa: B008 - frozen
        separate_offers: bool = True,  # offers on a connection of their own (offer_link)
        drift_every: float = 10.0,  # s: drift alerts checked at most this often
    ) -> None:
        self.coordinator = coordinator
        self.registry = coordinator.registry
        self.limits = limits
        self.chunks = ChunkServer(
            self._facts,
            self._open_payload,
            max_releases=limits.max_releases,
            max_unknown=limits.max_unknown,
            max_files=limits.max_files,
            resend_after=limits.resend_after,
            clock=monotonic,
        )
        self.queues = ChunkQueues(window=limits.window)
        self.budget = LookupBudget(rate=limits.lookup_rate, burst=limits.lookup_burst,
                                   clock=monotonic)  # fmt: skip
        self.ingest = Ingest(self.registry, clock=clock)
        self.drift = DriftWatch(self.registry, every=drift_every, clock=clock,
                                monotonic=monotonic)  # fmt: skip
        if mqtt.protocol == 5 and mqtt.max_incoming is None:
            mqtt = dataclasses.replace(mqtt, max_incoming=MAX_INCOMING)
        self.link = link_factory(mqtt, self._on_message)
        self.offer_link = self._make_offer_link(link_factory, mqtt, separate_offers)
        self._shared = mqtt.protocol == 5
        self._lookup_q: queue.Queue[tuple[str, ChunkRequest] | None] = queue.Queue(
            maxsize=limits.lookups_queued
        )
        self._lookup_lock = threading.Lock()
        self._drops_lock = threading.Lock()
        self._looking_up: collections.Counter[str] = collections.Counter()  # queued, per id
        self._up = threading.Condition()  # guards the ingest queues below
        self._statuses: dict[str, collections.deque[bytes]] = {}  # device -> its statuses
        self._status_bytes = 0
        self._status_count = 0  # statuses in _statuses
        self._telemetry: collections.deque[tuple[str, bytes]] = collections.deque()
        self._telemetry_bytes = 0
        self._stopping = False
        self._routes: dict[str, topics.Route | None] = {}  # topic -> route (the link thread's)
        self._threads = [
            threading.Thread(target=self._serve_chunks, name="chunks", daemon=True),
            threading.Thread(target=self._serve_lookups, name="lookups", daemon=True),
            threading.Thread(target=self._ingest, name="ingest", daemon=True),
        ]
        #: messages dropped, per (device id, reason): the sender's or the load's fault
        self.drops: collections.Counter[tuple[str, str]] = collections.Counter()
        self.received: collections.Counter[str] = collections.Counter()  # messages per kind
        self.largest_received = 0  # bytes of the largest upstream payload seen
        self.peak_ingest_bytes = 0  # most bytes waiting for ingest at once
        self.status_event = threading.Event()  # set on every ingested status (tests, demo)

    @property
    def statuses(self) -> int:
        """Statuses stored in the registry so far."""
        return self.ingest.statuses

    @property
    def queue_drops(self) -> int:
        """Messages dropped because a bound was reached (all devices, all reasons)."""
        return sum(self.drops.values()) + sum(self.queues.dropped.values())

    def chunk_drops(self, device_id: str) -> int:
        """Chunk requests of ``device_id`` dropped: window full, lookup budget, malformed."""
        mine = sum(n for (d, _), n in self.drops.items() if d == device_id)
        return mine + self.queues.dropped[device_id]

    def peak_chunk_bytes(self, device_id: str) -> int:
        """Most chunk reply bytes ``device_id`` had queued or being answered at once."""
        return self.queues.peak[device_id] * self.coordinator.config.segment_size

    def _facts(self, bundle_id: str) -> ReleaseFacts | None:
        r = self.registry.release_by_bundle(bundle_id, busy_timeout=LOOKUP_BUSY_TIMEOUT)
        if r is None:  # a shadow / A/B candidate is served like a release (coordinator.candidates)
            return candidate_facts(self.registry, bundle_id, busy_timeout=LOOKUP_BUSY_TIMEOUT)
        return ReleaseFacts(
            sequence=r.sequence,
            targets=frozenset(t.device_id for t in r.targets),
            manifest=Manifest.decode(r.manifest),
            payload_blob=r.payload_blob,
        )

    def _open_payload(self, blob: str) -> _FileReader:
        # Payloads are stored as they are (already AES-GCM ciphertext): served by path.
        return _FileReader(self.coordinator.blobs.path(blob))

    def start(self, timeout: float = 10.0) -> None:
        for t in self._threads:
            t.start()
        # Subscribe before connecting: ``connected`` then means "connected and listening".
        self.link.subscribe(
            topics.chunk_requests_shared() if self._shared else topics.up_all("chunkreq"), qos=1
        )
        self.link.subscribe(topics.up_all("status"), qos=1)
        self.link.subscribe(topics.up_all("telemetry"), qos=1)  # agents send QoS 1: keep it
        self.link.start()
        if self.offer_link is not self.link:
            self.offer_link.start()
        if not self.link.wait_connected(timeout):
            log.warning("coordinator not connected to the broker yet (%s)", self.link.last_error)

    def stop(self) -> None:
        self.queues.stop()
        self._lookup_q.put(None)
        with self._up:
            self._stopping = True
            self._up.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self.link.stop()
        if self.offer_link is not self.link:
            self.offer_link.stop()
        self.chunks.close()
        self._log_served()

    def _log_served(self) -> None:
        """One INFO line of what this process served (several ``serve`` processes split the
        chunk requests: their lines add up to the fleet's)."""
        c = self.chunks
        log.info("coordinator stopped: sent %d chunks (%d bytes), %d refused, %d held back, "
                 "%d registry lookups, %d messages dropped", c.sent_chunks, c.sent_bytes,
                 c.refused, c.held_back, c.lookups, self.queue_drops)  # fmt: skip

    def release(self, sequence: int) -> int:
        """Publish the offers of release ``sequence`` (built earlier); return their bytes."""
        return releases.publish_sequence(self.registry, self.offer_link, sequence).bytes

    def release_model(
        self, name: str, version: str, selector: str, *, now: int | None = None
    ) -> releases.Released:
        """Build a release (signed at ``now``, unix seconds) and publish it on this link."""
        return releases.release(self.coordinator, self.offer_link, name, version, selector,
                                now=now)

    def _make_offer_link(self, factory: LinkFactory, mqtt: MqttConfig, separate: bool) -> Link:
        """The link offers go out on: with ``separate``, a second connection (client id
        ``<id>-offers``, subscribed to nothing), so an offer never waits behind the chunk
        replies queued on the main link (up to ``UNSENT_LIMIT`` bytes, QoS 0) nor for its
        network thread; without, the main link itself."""
        if not separate:
            return self.link
        cfg = dataclasses.replace(mqtt, client_id=f"{mqtt.client_id}-offers", max_incoming=1024)
        return factory(cfg, _no_messages)

    # -- the link's thread: route only -----------------------------------------------------
    def _drop(self, device_id: str, reason: str, what: str) -> None:
        with self._drops_lock:  # the router, chunk and lookup threads all drop
            self.drops[device_id, reason] += 1
            n = self.drops[device_id, reason]
        if _worth_logging(n):
            log.warning("dropped %s from %s: %s (%d so far)", what, device_id, reason, n)

    def _route(self, topic: str) -> topics.Route | None:
        """``topics.route``, remembered: parsing and validating a topic cost the link thread
        more than the rest of routing a message."""
        try:
            return self._routes[topic]
        except KeyError:
            if len(self._routes) >= ROUTES_CACHED:
                self._routes.clear()
            where = self._routes[topic] = topics.route(topic)
            return where

    def _on_message(self, topic: str, payload: bytes, props: MessageProps) -> None:
        where = self._route(topic)
        if where is None or where.kind not in _CAPS:
            log.warning("dropped message on unexpected topic %s", topic)
            return
        device_id, kind = where.device_id, where.kind
        self.received[kind] += 1
        self.largest_received = max(self.largest_received, len(payload))
        if len(payload) > _CAPS[kind]:
            self._drop(device_id, "too large", f"{kind} of {len(payload)} bytes")
            return
        if kind == CHUNKREQ:
            self._route_request(device_id, payload)
        else:
            self._route_upstream(device_id, kind, payload)

    def _route_request(self, device_id: str, payload: bytes) -> None:
        try:
            req = ChunkRequest.decode(payload)
        except EdgeFleetError as exc:
            self._drop(device_id, "malformed", f"chunk request ({exc})")
            return
        if self.queues.put(device_id, req) and _worth_logging(self.queues.dropped[device_id]):
            log.warning("dropped chunk requests from %s: window of %d segments full (%d so far)",
                        device_id, self.queues.window, self.queues.dropped[device_id])  # fmt: skip

    def _route_upstream(self, device_id: str, kind: str, payload: bytes) -> None:
        with self._up:
            before = self._status_count + len(self._telemetry)
            if kind == STATUS:
                ok = self._queue_status(device_id, payload)
            elif (len(self._telemetry) >= self.limits.telemetry_messages
                    or self._telemetry_bytes + len(payload) > self.limits.telemetry_bytes):
                ok = False
            else:
                self._telemetry.append((device_id, payload))
                self._telemetry_bytes += len(payload)
                ok = True
            self.peak_ingest_bytes = max(self.peak_ingest_bytes, self.ingest_bytes)
            # Wake the worker when work arrives and when a batch is full, not per message
            # (each wake-up hands it the GIL this thread needs to keep reading).
            after = self._status_count + len(self._telemetry)
            if ok and (not before or before < INGEST_BATCH <= after):
                self._up.notify()
        if not ok:
            self._drop(device_id, f"{kind} queue full", kind)

    def _queue_status(self, device_id: str, payload: bytes) -> bool:
        """Queue a status; under pressure the device's older pending ones make room (only
        its latest status matters): they are counted as superseded."""
        pending = self._statuses.setdefault(device_id, collections.deque())
        while pending and (len(pending) >= STATUSES_PER_DEVICE
                           or self._status_bytes + len(payload) > self.limits.status_bytes):
            self._status_bytes -= len(pending.popleft())
            self._status_count -= 1
            with self._drops_lock:
                self.drops[device_id, "status superseded"] += 1
        if self._status_bytes + len(payload) > self.limits.status_bytes:
            if not pending:
                del self._statuses[device_id]
            return False
        pending.append(payload)
        self._status_bytes += len(payload)
        self._status_count += 1
        return True

    @property
    def ingest_queue(self) -> tuple[int, int]:
        """(statuses, telemetry messages) waiting for ingest now (``/metrics``)."""
        return self._status_count, len(self._telemetry)

    @property
    def ingest_bytes(self) -> int:
        """Bytes of statuses and telemetry waiting for ingest now."""
        return self._status_bytes + self._telemetry_bytes

    # -- workers ---------------------------------------------------------------------------
    def _serve_chunks(self) -> None:
        while (item := self.queues.take()) is not None:
            device_id, req = item
            if self.chunks.cached(req.bundle_id):
                self._answer_and_free(device_id, req)
                continue
            with self._lookup_lock:
                pending = req.bundle_id in self._looking_up  # being looked up: costs nothing
                if not pending and not self.budget.allow(device_id):
                    reason = "lookup budget"
                else:
                    try:
                        self._lookup_q.put_nowait(item)
                        self._looking_up[req.bundle_id] += 1
                        continue
                    except queue.Full:
                        reason = "lookup queue full"
            self.queues.done(device_id, req)
            self._drop(device_id, reason, f"chunk request for {req.bundle_id}")

    def _serve_lookups(self) -> None:
        """Requests whose release is not cached: the lookup (which may wait for a locked
        registry) happens here, never on the chunk thread."""
        while (item := self._lookup_q.get()) is not None:
            self._answer_and_free(*item)
            with self._lookup_lock:
                bundle_id = item[1].bundle_id
                self._looking_up[bundle_id] -= 1
                if not self._looking_up[bundle_id]:
                    del self._looking_up[bundle_id]

    def _answer_and_free(self, device_id: str, req: ChunkRequest) -> None:
        try:
            self._answer(device_id, req)
        except StoreError as exc:  # the registry is locked or the blob unreadable: retried
            self._drop(device_id, "store error", f"chunk request ({exc})")
        except EdgeFleetError as exc:
            log.warning("dropped chunk request from %s: %s", device_id, exc)
        except Exception:
            log.exception("chunk request from %s failed", device_id)
        finally:
            self.queues.done(device_id, req)

    def _answer(self, device_id: str, req: ChunkRequest) -> None:
        for reply in self.chunks.answer(device_id, req):
            # Backpressure: QoS 0 publishes bypass paho's queue limit, so wait until the
            # socket has taken what is queued (memory stays bounded).
            if not self.link.wait_writable(UNSENT_LIMIT, timeout=30.0):
                log.warning("dropped chunk replies for %s: link not draining", device_id)
                return
            # QoS 0: the pull protocol is the reliability layer (hash check and re-request
            # on timeout); QoS 1 only stalled fan-out on 20 in-flight acks.
            self.link.publish(req.reply_to, reply.encode(), qos=0)

    def _take_upstream(
        self,
    ) -> tuple[dict[str, collections.deque[bytes]], list[tuple[str, bytes]]] | None:
        """The next batch: every device's pending statuses and up to ``INGEST_BATCH``
        telemetry messages, once something waited ``INGEST_LINGER`` or a batch is full."""
        with self._up:
            if not self._up.wait_for(lambda: self._statuses or self._telemetry
                                     or self._stopping, self.drift.wait()):  # fmt: skip
                return {}, []  # a drift check is due
            self._up.wait_for(lambda: self._stopping or self._status_count + len(
                self._telemetry) >= INGEST_BATCH, INGEST_LINGER)  # fmt: skip
            if self._stopping and not (self._statuses or self._telemetry):
                return None
            statuses = self._statuses
            self._statuses, self._status_bytes, self._status_count = {}, 0, 0
            n = min(len(self._telemetry), INGEST_BATCH)
            telemetry = [self._telemetry.popleft() for _ in range(n)]
            self._telemetry_bytes -= sum(len(p) for _, p in telemetry)
            return statuses, telemetry

    def _ingest(self) -> None:
        """Decode what is queued, then write it in one transaction (one commit per batch,
        not per message: during a fan-out every agent reports several times)."""
        while (batch := self._take_upstream()) is not None:
            statuses, telemetry = batch
            try:
                for device_id, payload in telemetry:
                    self.ingest.add(device_id, TELEMETRY, payload)
                for device_id, payloads in statuses.items():
                    self.ingest.add_statuses(device_id, payloads)
                if self.ingest.flush():
                    self.status_event.set()
            except Exception:
                log.exception("ingesting %d statuses and %d telemetry messages failed",
                              len(statuses), len(telemetry))  # fmt: skip
            self._check_drift()

    def _check_drift(self) -> None:
        self.drift.note(self.ingest.drift_devices)
        self.ingest.drift_devices.clear()
        try:
            new = self.drift.run()
        except Exception:  # a locked registry: the devices are checked again with the next
            log.exception("checking drift failed")
            return
        for a in new:
            log.warning("drift alert %d: %s runs %s@%s with drift %.3f > %g on %.0f samples",
                        a.id, a.device_id, a.name, a.version, a.score, a.threshold,
                        a.samples)  # fmt: skip


def mqtt_config_for(
    coordinator: Coordinator,
    *,
    client_id: str,
    broker: str | None = None,
    password: str | None = None,
    protocol: int | None = None,
) -> MqttConfig:
    """The coordinator's broker settings from its config, with overrides."""
    cfg = coordinator.config
    # No persistent session: retained statuses are re-sent on subscribe and agents re-request
    # chunks, while a restarted `serve` with a new client id would otherwise leave its old
    # session in the shared-subscription group, receiving (and losing) half the requests.
    return mqtt_config(
        cfg,
        client_id=client_id,
        username=cfg.username,
        broker=broker,
        password=password,
        protocol=protocol,
        clean_start=True,
        session_expiry=0,
    )
