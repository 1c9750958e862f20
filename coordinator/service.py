"""The coordinator's MQTT shell: publish releases, serve chunks, ingest device status.

The link's thread only routes topics and hands messages to two worker threads (chunk
serving and status ingestion), so a slow database never stalls the chunk stream. What the
workers do is decided elsewhere: ``chunks.ChunkServer`` (who may have which chunk),
``ingest.Ingest`` (statuses into the registry) and ``release`` (offers). Several
``coordinator serve`` processes can run against one registry: chunk requests arrive through a
shared subscription and are split between them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from edgefleet.infra.link.mqtt import MqttConfig, MqttLink
from edgefleet.infra.link.port import LinkFactory, MessageProps
from edgefleet.infra.settings import mqtt_config
from edgefleet.protocol import topics
from edgefleet.protocol.errors import EdgeFleetError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkRequest

from . import release as releases
from .chunks import ChunkServer, ReleaseFacts
from .home import Coordinator
from .ingest import STATUS, TELEMETRY, Ingest
from .release import offers

__all__ = ["CoordinatorService", "mqtt_config_for", "offers"]

log = logging.getLogger(__name__)

Work = tuple[str, str, bytes] | None  # (device id, topic kind, payload); None stops a worker

UNSENT_LIMIT = 16 * 1024 * 1024  # bytes of chunk replies queued in the link before we wait
INGEST_BATCH = 500  # upstream messages per registry transaction, at most
CHUNKREQ = "up/chunkreq"  # topic kinds (protocol.topics.route) the service subscribes to
_UPSTREAM = (CHUNKREQ, STATUS, TELEMETRY)


class CoordinatorService:
    def __init__(
        self,
        coordinator: Coordinator,
        mqtt: MqttConfig,
        *,
        link_factory: LinkFactory = MqttLink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.registry = coordinator.registry
        self.chunks = ChunkServer(self._facts)
        self.ingest = Ingest(self.registry, clock=clock)
        self.link = link_factory(mqtt, self._on_message)
        self._shared = mqtt.protocol == 5
        self._chunk_q: queue.Queue[Work] = queue.Queue(maxsize=2_000)
        self._ingest_q: queue.Queue[Work] = queue.Queue(maxsize=10_000)
        self._threads = [
            threading.Thread(target=self._serve_chunks, name="chunks", daemon=True),
            threading.Thread(target=self._ingest, name="ingest", daemon=True),
        ]
        self.queue_drops = 0  # messages dropped because a work queue was full
        self.status_event = threading.Event()  # set on every ingested status (tests, demo)

    @property
    def statuses(self) -> int:
        """Statuses stored in the registry so far."""
        return self.ingest.statuses

    def _facts(self, bundle_id: str) -> ReleaseFacts | None:
        r = self.registry.release(bundle_id=bundle_id)
        if r is None:
            return None
        return ReleaseFacts(
            sequence=r.sequence,
            targets=frozenset(t.device_id for t in r.targets),
            manifest=Manifest.decode(r.manifest),
            payload_path=self.coordinator.blobs.path(r.payload_blob),
        )

    def start(self, timeout: float = 10.0) -> None:
        for t in self._threads:
            t.start()
        self.link.start()
        self.link.subscribe(
            topics.chunk_requests_shared() if self._shared else topics.up_all("chunkreq"), qos=1
        )
        self.link.subscribe(topics.up_all("status"), qos=1)
        self.link.subscribe(topics.up_all("telemetry"), qos=0)
        if not self.link.wait_connected(timeout):
            log.warning("coordinator not connected to the broker yet (%s)", self.link.last_error)

    def stop(self) -> None:
        self._chunk_q.put(None)  # stop
        self._ingest_q.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self.link.stop()
        self.chunks.close()

    def release(self, sequence: int) -> int:
        """Publish the offers of release ``sequence`` (built earlier); return their bytes."""
        return releases.publish_sequence(self.registry, self.link, sequence).bytes

    def release_model(
        self, name: str, version: str, selector: str, *, now: int | None = None
    ) -> releases.Released:
        """Build a release (signed at ``now``, unix seconds) and publish it on this link."""
        return releases.release(self.coordinator, self.link, name, version, selector, now=now)

    # -- the link's thread: route only -----------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, props: MessageProps) -> None:
        where = topics.route(topic)
        if where is None or where.kind not in _UPSTREAM:
            log.warning("dropped message on unexpected topic %s", topic)
            return
        target = self._chunk_q if where.kind == CHUNKREQ else self._ingest_q
        try:
            target.put_nowait((where.device_id, where.kind, payload))
        except queue.Full:
            self.queue_drops += 1
            log.warning("dropped %s from %s: work queue full", where.kind, where.device_id)

    # -- workers ---------------------------------------------------------------------------
    def _serve_chunks(self) -> None:
        while (item := self._chunk_q.get()) is not None:
            device_id, _, payload = item
            try:
                self._answer(device_id, ChunkRequest.decode(payload))
            except EdgeFleetError as exc:
                log.warning("dropped chunk request from %s: %s", device_id, exc)
            except Exception:
                log.exception("chunk request from %s failed", device_id)

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

    def _ingest(self) -> None:
        """Decode what is queued, then write it in one transaction (one commit per batch,
        not per message: during a fan-out every agent reports several times)."""
        stopping = False
        while not stopping:
            batch = [self._ingest_q.get()]
            while len(batch) < INGEST_BATCH and not self._ingest_q.empty():
                batch.append(self._ingest_q.get_nowait())
            try:
                for item in batch:
                    if item is None:
                        stopping = True
                    else:
                        self.ingest.add(*item)
                if self.ingest.flush():
                    self.status_event.set()
            except Exception:
                log.exception("ingesting a batch of %d messages failed", len(batch))


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
