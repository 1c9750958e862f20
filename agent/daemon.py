"""The agent daemon: receive release offers over MQTT, pull chunks, install, report.

Paho's network thread only checks sizes and queues messages (never blocking); one worker
thread owns all download and install state, so there are no locks around it. Inference
(``Agent.predict``, the HTTP API) runs on other threads and keeps serving the active model
throughout: the runtime is swapped only after a new version passed every check.

Memory stays bounded on a small device: the broker is told the largest packet we accept
(``MAX_INCOMING``), each message kind has its own size cap, and the hand-over queue is capped
in bytes. A release that failed here (bad model, disk full...) is remembered and not fetched
again when its retained offer is re-delivered on reconnect; a restart or a new release retries.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from edgefleet.infra.link.mqtt import HEADER_ALLOWANCE, MessageProps, MqttConfig, MqttLink
from edgefleet.infra.settings import mqtt_config
from edgefleet.protocol import topics
from edgefleet.protocol.errors import (
    BundleError,
    EdgeFleetError,
    RollbackError,
    StoreError,
    TransportError,
)
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import MAX_OFFER, ChunkReply, DeviceStatus, ReleaseOffer, Telemetry
from edgefleet.protocol.segments import MAX_SEGMENT
from edgefleet.protocol.verify import select_envelope

from .agent import Agent
from .download import Download
from .updater import Offer

__all__ = ["MAX_CHUNK_FRAME", "MAX_INCOMING", "AgentDaemon"]

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]  # (phase, done bytes, total bytes)

#: bytes: a chunk reply frame (sealed segment + tag, header of at most 1 KiB, with room to spare)
MAX_CHUNK_FRAME = MAX_SEGMENT + 16 + 2048
MAX_COMMAND = 64 * 1024  # bytes, anything on the cmd topic
#: bytes: the largest MQTT packet the agent accepts (CONNECT MaximumPacketSize, MQTT 5)
MAX_INCOMING = max(MAX_OFFER, MAX_CHUNK_FRAME) + HEADER_ALLOWANCE
_LIMITS = {"release": MAX_OFFER, "chunk": MAX_CHUNK_FRAME}


class AgentDaemon:
    def __init__(
        self,
        agent: Agent,
        mqtt: MqttConfig,
        *,
        heartbeat: float = 30.0,
        request_timeout: float = 5.0,  # s before an unanswered chunk request is re-sent
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        progress: ProgressFn | None = None,
        max_queued_bytes: int = 64 * 1024 * 1024,  # payload bytes waiting for the worker
        remember_failed: int = 64,  # bundle ids of failed releases kept (not fetched again)
    ) -> None:
        if mqtt.max_incoming is None:
            mqtt = dataclasses.replace(mqtt, max_incoming=MAX_INCOMING)
        self.agent = agent
        self.device_id = agent.identity.device_id
        self.heartbeat, self.request_timeout = heartbeat, request_timeout
        self.clock, self.monotonic, self.progress = clock, monotonic, progress
        self.link = MqttLink(mqtt, self._on_message, on_connect=self._on_connect)
        self.downloads_dir = agent.config.home / "downloads"
        self.downloads_dir.mkdir(exist_ok=True)
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1000)
        self._q_lock = threading.Lock()
        self._q_bytes = 0  # payload bytes in _q; guarded by _q_lock
        self.max_queued_bytes = max_queued_bytes
        self._connect_missed = threading.Event()  # a connect that found the queue full
        self._failed: dict[str, str] = {}  # bundle id -> error code, oldest first
        self._remember = remember_failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-daemon", daemon=True)
        self._state = "idle"
        self._download: Download | None = None
        self._offer: ReleaseOffer | None = None
        self._counter = 0
        self._last_beat = 0.0
        self._announce = False  # report and flush telemetry once the link is listening
        self._telemetry: collections.deque[bytes] = collections.deque(
            maxlen=agent.config.telemetry_buffer
        )
        self.installed = threading.Event()  # set after every successful install (tests)
        self.dropped = 0  # messages dropped unread (oversize, queue full)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self.link.start()
        for topic in (
            topics.release(self.device_id),
            topics.chunk(self.device_id),
            topics.cmd(self.device_id),
        ):
            self.link.subscribe(topic, qos=1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._download is not None:
            self._download.close()
        self.link.stop()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- network thread: size check and hand over (never blocks) -------------------------------
    def _on_message(self, topic: str, payload: bytes, props: MessageProps) -> None:
        kind = topic.rsplit("/", 1)[-1]
        limit = _LIMITS.get(kind, MAX_COMMAND)
        if len(payload) > limit:
            self._drop(topic, f"{len(payload)} bytes, limit {limit}")
            return
        if kind == "chunk" and self._download is None:
            log.debug("ignored chunk reply on %s: no download under way", topic)
            return
        with self._q_lock:
            if self._q_bytes + len(payload) > self.max_queued_bytes:
                full = f"{self._q_bytes} bytes queued"
            else:
                self._q_bytes += len(payload)
                full = ""
        if full:
            self._drop(topic, full)
            return
        try:
            self._q.put_nowait((kind, payload))
        except queue.Full:
            self._unqueued(payload)
            self._drop(topic, "agent queue full")

    def _drop(self, topic: str, why: str) -> None:
        self.dropped += 1
        log.warning("dropped message on %s (%s)", topic, why)

    def _unqueued(self, payload: Any) -> None:
        if isinstance(payload, bytes):
            with self._q_lock:
                self._q_bytes -= len(payload)

    def _on_connect(self, session_present: bool) -> None:
        try:
            self._q.put_nowait(("connected", session_present))
        except queue.Full:  # the worker checks this flag on every turn
            self._connect_missed.set()

    # -- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if self._connect_missed.is_set():
                self._connect_missed.clear()
                kind, payload = "connected", None
            else:
                try:
                    kind, payload = self._q.get(timeout=0.2)
                except queue.Empty:
                    kind, payload = "tick", None
                self._unqueued(payload)
            try:
                self._handle(kind, payload)
                self._tick()
            except Exception:  # never let one bad message kill the daemon
                log.exception("agent daemon: unexpected error handling %s", kind)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "release":
            self._on_offer(payload)
        elif kind == "chunk":
            self._on_chunk(payload)
        elif kind == "connected":
            if self._download is not None:
                self._download.resend_all()
            # on_connect runs before the broker acknowledged our subscriptions, so
            # ``link.connected`` is not set yet: report from _tick once it is.
            self._announce = True

    def _tick(self) -> None:
        now = self.monotonic()
        if self._announce and self.link.connected.is_set():
            self._announce = False
            self._report()
            self._flush_telemetry()
        if self._download is not None and self.link.connected.is_set():
            for req in self._download.pump(now):
                self.link.publish(topics.up(self.device_id, "chunkreq"), req.encode(), qos=1)
        if now - self._last_beat >= self.heartbeat:
            self._last_beat = now
            self._telemetry.append(
                Telemetry(
                    device_id=self.device_id, time=int(self.clock()), metrics=self._metrics()
                ).encode()
            )
            self._report()
            self._flush_telemetry()

    def _metrics(self) -> dict[str, Any]:
        d = self._download
        return {
            "state": self._state,
            "dropped": self.dropped,
            "failed": len(self._failed),
            "download": None if d is None else vars(d.stats),
        }

    # -- releases --------------------------------------------------------------------------------
    def _on_offer(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained release
        try:
            offer = ReleaseOffer.decode(payload)
            active = self.agent.active  # in memory: no disk read per offer
            if active is not None and offer.manifest == active.manifest_raw:
                return  # the retained offer of what we already run
            manifest = self.agent.updater.check(self._as_offer(offer))
            code = self._failed.get(manifest.bundle_id)
            if code is not None:  # e.g. the retained offer again, after a reconnect
                log.info(
                    "release %d (%s) failed here before (%s); not fetching it again",
                    manifest.sequence,
                    manifest.bundle_id,
                    code,
                )
                return
            # The envelope is not signed itself: its digest in the manifest is.
            select_envelope(manifest, [offer.envelope], self.device_id)
        except RollbackError as exc:
            log.info("ignored release offer: %s", exc)
            self._reject(exc)
            return
        except BundleError as exc:
            self._reject(exc)
            return
        current = self._download
        if current is not None and current.manifest.sequence >= manifest.sequence:
            return  # same or newer download already under way
        self._begin(offer, manifest)

    def _begin(self, offer: ReleaseOffer, manifest: Manifest) -> None:
        if self._download is not None:
            self._download.close()
            self._download, self._state = None, "idle"
        keep = f"{manifest.bundle_id}.part"
        try:
            for old in self.downloads_dir.glob("*.part"):
                if old.name != keep:
                    old.unlink()
            download = Download(
                manifest,
                self.downloads_dir / keep,
                topics.chunk(self.device_id),
                window=self.agent.config.window,
                timeout=self.request_timeout,
            )
        except OSError as exc:
            self._reject(StoreError(f"{self.downloads_dir}: {exc.strerror or exc}"), manifest)
            return
        except StoreError as exc:
            self._reject(exc, manifest)
            return
        self._offer, self._download = offer, download
        log.info(
            "release %d (%s %s): fetching %d of %d chunks",
            manifest.sequence,
            manifest.name,
            manifest.model_version,
            len(self._download.missing),
            manifest.segments,
        )
        self._state = "downloading"
        self._report()
        if self._download.done:
            self._install()

    def _on_chunk(self, payload: bytes) -> None:
        d = self._download
        if d is None:
            return
        try:
            reply = ChunkReply.decode(payload, max_data=d.manifest.segment_size + 16)
            fresh = d.accept(reply)
        except (TransportError, StoreError) as exc:  # the coordinator refused us; disk trouble
            self._abandon(exc)
            return
        except EdgeFleetError as exc:
            log.warning("dropped chunk reply: %s", exc)
            return
        if fresh and self.progress:
            self.progress("download", d.bytes_done, d.manifest.payload_size)
        if d.done:
            self._install()

    def _install(self) -> None:
        d, offer = self._download, self._offer
        assert d is not None and offer is not None
        self._state = "installing"
        self._report()
        try:  # the part file is the source: its read errors arrive as StoreError
            self.agent.install(self._as_offer(offer), offer.envelope, d)  # records the result
            self.installed.set()
        except EdgeFleetError as exc:
            log.warning("release %d not installed: %s", d.manifest.sequence, exc)
            self._remember_failed(d.manifest, exc)
        finally:
            self._download, self._state = None, "idle"
            self._discard(d)
        if self.progress:
            self.progress("installed", d.manifest.payload_size, d.manifest.payload_size)
        self._report()

    def _abandon(self, exc: EdgeFleetError) -> None:
        d = self._download
        self._download, self._state = None, "idle"
        if d is not None:
            self._discard(d)
        log.warning("download abandoned (%s): %s", exc.code, exc)
        if d is not None and not isinstance(exc, TransportError):  # refusals may be retried
            self._remember_failed(d.manifest, exc)
        self.agent.record(ok=False, code=exc.code, reason=str(exc))
        self._report()

    @staticmethod
    def _discard(d: Download) -> None:
        d.close()
        try:
            d.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", d.path, exc.strerror or exc)

    def _reject(self, exc: EdgeFleetError, manifest: Manifest | None = None) -> None:
        """Record and report a refused offer; remember it if ``manifest`` (verified) is given."""
        log.warning("rejected release offer (%s): %s", exc.code, exc)
        if manifest is not None:
            self._remember_failed(manifest, exc)
        self.agent.record(ok=False, code=exc.code, reason=str(exc))
        self._report()

    def _remember_failed(self, manifest: Manifest, exc: EdgeFleetError) -> None:
        self._failed.pop(manifest.bundle_id, None)
        self._failed[manifest.bundle_id] = exc.code
        while len(self._failed) > self._remember:
            del self._failed[next(iter(self._failed))]

    @staticmethod
    def _as_offer(o: ReleaseOffer) -> Offer:
        return Offer(
            keyring=o.keyring, keyring_sig=o.keyring_sig, manifest=o.manifest, signature=o.signature
        )

    # -- reporting -------------------------------------------------------------------------------
    def status(self) -> DeviceStatus:
        st = self.agent.status()
        d = self._download
        progress = (
            None
            if d is None
            else {
                "bundle_id": d.manifest.bundle_id,
                "sequence": d.manifest.sequence,
                "done": d.bytes_done,
                "total": d.manifest.payload_size,
                **vars(d.stats),
            }
        )
        self._counter += 1
        return DeviceStatus(
            device_id=self.device_id,
            time=int(self.clock()),
            state=self._state,
            active=st["active"],
            highest_sequence=st["highest_sequence"],
            last_result=st["last_install"],
            progress=progress,
            counter=self._counter,
        )

    def _report(self) -> None:
        if not self.link.connected.is_set():
            return  # re-sent on connect; retained, so only the latest matters
        try:
            self.link.publish(
                topics.up(self.device_id, "status"), self.status().encode(), qos=1, retain=True
            )
        except TransportError as exc:
            log.warning("status not sent: %s", exc)

    def _flush_telemetry(self) -> None:
        while self._telemetry and self.link.connected.is_set():
            try:
                self.link.publish(topics.up(self.device_id, "telemetry"), self._telemetry[0], qos=1)
            except TransportError:
                return
            self._telemetry.popleft()


def mqtt_config_for(
    agent: Agent, *, broker: str | None = None, password: str | None = None
) -> MqttConfig:
    """The agent's broker settings (client id ``agent-<id>``, username = device id)."""
    cfg = agent.config
    return mqtt_config(
        cfg,
        client_id=f"agent-{cfg.device_id}",
        username=cfg.username or cfg.device_id,
        broker=broker,
        password=password,
        max_incoming=MAX_INCOMING,
    )
