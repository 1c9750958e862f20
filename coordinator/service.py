"""The coordinator's MQTT side: publish releases, serve chunks, ingest device status.

Paho's network thread only decodes topics and hands messages to two worker threads (chunk
serving and status ingestion), so a slow database never stalls the chunk stream. Several
``coordinator serve`` processes can run against one registry: chunk requests arrive through a
shared subscription and are split between them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from edgefleet.infra.link.mqtt import MessageProps, MqttConfig, MqttLink
from edgefleet.infra.settings import mqtt_config
from edgefleet.protocol import topics
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.errors import DecodeError, EdgeFleetError, TransportError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkRequest, DeviceStatus, ReleaseOffer, Telemetry

from .chunks import ChunkServer, ReleaseFacts
from .home import Coordinator
from .registry import Release

__all__ = ["CoordinatorService", "publish_release"]

log = logging.getLogger(__name__)

Work = tuple[str, str, bytes] | None  # (device id, topic kind, payload)


def offers(release: Release) -> dict[str, ReleaseOffer]:
    """Each target device's release offer."""
    return {
        t.device_id: ReleaseOffer(
            keyring=release.keyring,
            keyring_sig=release.keyring_sig,
            manifest=release.manifest,
            signature=release.signature,
            envelope=Envelope.from_dict(json.loads(t.envelope)),
        )
        for t in release.targets
    }


UNSENT_LIMIT = 16 * 1024 * 1024  # bytes of chunk replies queued in paho before we wait
PUBLISH_BATCH = 200  # offers in flight before waiting for acks (paho queues at most 1000)


def publish_release(link: MqttLink, release: Release, *, timeout: float = 30.0) -> int:
    """Publish (retained, QoS 1) every target's offer, in acknowledged batches; return bytes.

    Raises ``TransportError`` if the broker did not acknowledge every offer within
    ``timeout`` seconds (per batch): publishing the same release again is harmless.
    """
    items = list(offers(release).items())
    sent = 0
    for start in range(0, len(items), PUBLISH_BATCH):
        infos = []
        for device_id, offer in items[start : start + PUBLISH_BATCH]:
            payload = offer.encode()
            infos.append(link.publish(topics.release(device_id), payload, qos=1, retain=True))
            sent += len(payload)
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait(max(0.0, deadline - time.monotonic()))
        unacked = sum(1 for info in infos if not info.published)
        if unacked:
            raise TransportError(
                f"release {release.sequence}: {unacked} offers not acknowledged "
                f"by the broker within {timeout:.0f} s; publish it again"
            )
    log.info("published release %d to %d devices (%d bytes)", release.sequence, len(items), sent)
    return sent


class CoordinatorService:
    def __init__(
        self, coordinator: Coordinator, mqtt: MqttConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.coordinator = coordinator
        self.registry = coordinator.registry
        self.clock = clock
        self.chunks = ChunkServer(self._facts)
        self.link = MqttLink(mqtt, self._on_message)
        self._shared = mqtt.protocol == 5
        self._chunk_q: queue.Queue[Work] = queue.Queue(maxsize=2_000)
        self._ingest_q: queue.Queue[Work] = queue.Queue(maxsize=10_000)
        self._threads = [
            threading.Thread(target=self._serve_chunks, name="chunks", daemon=True),
            threading.Thread(target=self._ingest, name="ingest", daemon=True),
        ]
        self.statuses = 0
        self.status_event = threading.Event()  # set on every ingested status (tests, demo)

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
        r = self.registry.release(sequence=sequence)
        if r is None:
            raise LookupError(f"release {sequence} does not exist")
        return publish_release(self.link, r)

    # -- network thread: route only --------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, props: MessageProps) -> None:
        where = topics.device_of(topic)
        if where is None:
            log.warning("dropped message on unexpected topic %s", topic)
            return
        target = self._chunk_q if where[1] == "up/chunkreq" else self._ingest_q
        try:
            target.put_nowait((where[0], where[1], payload))
        except queue.Full:
            log.warning("dropped %s from %s: work queue full", where[1], where[0])

    # -- workers ---------------------------------------------------------------------------
    def _serve_chunks(self) -> None:
        while (item := self._chunk_q.get()) is not None:
            device_id, _, payload = item
            try:
                req = ChunkRequest.decode(payload)
                for reply in self.chunks.answer(device_id, req):
                    # Backpressure: QoS 0 publishes bypass paho's queue limit, so wait until
                    # the socket has taken what is queued (memory stays bounded).
                    if not self.link.wait_writable(UNSENT_LIMIT, timeout=30.0):
                        log.warning("dropped chunk replies for %s: link not draining", device_id)
                        break
                    # QoS 0: the pull protocol is the reliability layer (hash check and
                    # re-request on timeout); QoS 1 only stalled fan-out on 20 in-flight acks.
                    self.link.publish(req.reply_to, reply.encode(), qos=0)
            except EdgeFleetError as exc:
                log.warning("dropped chunk request from %s: %s", device_id, exc)
            except Exception:
                log.exception("chunk request from %s failed", device_id)

    def _ingest(self) -> None:
        """Decode what is queued, then write it in one transaction (one commit per batch,
        not per message: during a fan-out every agent reports several times)."""
        stopping = False
        while not stopping:
            batch = [self._ingest_q.get()]
            while len(batch) < 500 and not self._ingest_q.empty():
                batch.append(self._ingest_q.get_nowait())
            updates: dict[str, dict[str, Any]] = {}
            for item in batch:
                if item is None:
                    stopping = True
                    continue
                device_id, kind, payload = item
                try:
                    values = self._decode_upstream(device_id, kind, payload)
                except EdgeFleetError as exc:  # DecodeError, TooLargeError: the sender's fault
                    log.warning("dropped %s from %s: %s", kind, device_id, exc)
                    continue
                if values is not None:
                    updates.setdefault(device_id, {}).update(values)  # later messages win
            if updates:
                self._store(updates)

    def _store(self, updates: dict[str, dict[str, Any]]) -> None:
        try:
            found = self.registry.update_devices(updates)
        except Exception:  # one bad row must not cost the others their update
            log.warning("batch of %d device updates failed; storing one by one", len(updates))
            found = set()
            for device_id, values in updates.items():
                try:
                    found |= self.registry.update_devices({device_id: values})
                except Exception:
                    log.exception("storing the update of %s failed", device_id)
        for device_id in set(updates) - found:
            log.warning("status from unenrolled device %s ignored", device_id)
        statuses = sum(1 for d in found if "state" in updates[d])
        if statuses:
            self.statuses += statuses
            self.status_event.set()

    def _decode_upstream(self, device_id: str, kind: str, payload: bytes) -> dict[str, Any] | None:
        now = int(self.clock())
        if kind == "up/telemetry":
            t = Telemetry.decode(payload)
            log.debug("telemetry from %s: %s", t.device_id, t.metrics)
            return {"last_seen": now}
        if kind != "up/status" or not payload:
            return None  # a cleared retained status, or nothing we ingest
        st = DeviceStatus.decode(payload)
        if st.device_id != device_id:
            raise DecodeError(f"status on {device_id}'s topic names {st.device_id}")
        active = st.active or {}
        return dict(
            last_seen=now,
            state=st.state,
            active_name=active.get("name"),
            active_version=active.get("version"),
            active_sequence=active.get("sequence"),
            last_result={**(st.last_result or {}), "progress": st.progress},
        )


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
