"""The agent daemon: a thin shell that runs the release flow over a link.

Three threads, each with one job:

- the link's network thread (``_route``) only checks sizes and hands messages over through a
  queue bounded in bytes; it never blocks;
- the worker (``_run``) owns the ``ReleaseFlow`` and the ``Reporter``: it feeds them events
  (offers, chunk replies, connects, ticks, finished installs) and carries out the actions
  the flow returns;
- the installer (``_install_loop``) runs one install at a time, so while a model is being
  decrypted, loaded and smoke-tested the worker keeps answering offers (a newer one is
  started after the install), reporting status and buffering telemetry.

Candidates (``agent.candidate_feed``): a second ``ReleaseFlow`` for the shadow / A/B slot, fed
from ``cmd/candidate`` and the chunk replies of its bundle id, installs on a thread of its own;
a ``cmd/predlog`` request, once ``predlog.RequestGate`` verified it (signed by the coordinator,
for this device, unexpired, not replayed), is answered with the prediction log as ``predlog``
telemetry.

Inference (``Agent.predict``, the HTTP API) runs on other threads and keeps serving the active
model throughout: the runtime is swapped only after a new version passed every check.

Memory stays bounded on a small device: the broker is told the largest packet we accept
(``MAX_INCOMING``), each message kind has its own size cap, and the hand-over queue is capped
in bytes. The link is built by an injected ``LinkFactory`` (default ``MqttLink``), so tests and
simulations run the same daemon over an ``InMemoryBroker``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgefleet.infra.fsutil import os_errors
from edgefleet.infra.link import HEADER_ALLOWANCE, LinkFactory, MessageProps, MqttConfig
from edgefleet.infra.link.mqtt import MqttLink
from edgefleet.infra.settings import mqtt_config
from edgefleet.protocol import topics
from edgefleet.protocol.errors import EdgeFleetError, StoreError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import MAX_OFFER, DeviceStatus, DownloadProgress
from edgefleet.protocol.segments import MAX_SEGMENT

from . import flow as F
from .agent import Agent
from .candidate_feed import CandidateSide
from .download import Download
from .drift import DriftMonitor
from .observe import Recorder
from .predlog import RequestGate, open_log, predlog_topic, upload_messages
from .reporter import Facts, Reporter, active_model, candidate_model, offline_will

__all__ = ["MAX_CHUNK_FRAME", "MAX_INCOMING", "AgentDaemon", "mqtt_config_for"]

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]  # (phase, done bytes, total bytes)
EventFn = Callable[[str], None]  # the kind of event the worker has just handled

#: bytes: a chunk reply frame (sealed segment + tag, header of at most 1 KiB, with room to spare)
MAX_CHUNK_FRAME = MAX_SEGMENT + 16 + 2048
MAX_COMMAND = 64 * 1024  # bytes, anything on the cmd topic
#: bytes: the largest MQTT packet the agent accepts (CONNECT MaximumPacketSize, MQTT 5)
MAX_INCOMING = max(MAX_OFFER, MAX_CHUNK_FRAME) + HEADER_ALLOWANCE
_LIMITS = {"release": MAX_OFFER, "chunk": MAX_CHUNK_FRAME, "candidate": MAX_OFFER}


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
        link_factory: LinkFactory = MqttLink,
        on_event: EventFn | None = None,  # observer, called on the worker thread
        # topic kind (ef/v1/dev/<id>/<kind>) -> handler, e.g. {"fl": FlClient.handle}: subscribed,
        # size-capped like chunks, called on the worker thread (never the network or installer)
        extra_handlers: Mapping[str, Callable[[bytes], None]] | None = None,
        candidates: bool = True,  # shadow / A/B candidates on cmd/candidate (agent.candidate_feed)
    ) -> None:
        if mqtt.max_incoming is None:
            mqtt = dataclasses.replace(mqtt, max_incoming=MAX_INCOMING)
        if mqtt.will is None:  # the broker says "offline" for us if we vanish
            will = offline_will(agent.identity.device_id, int(clock()))
            mqtt = dataclasses.replace(mqtt, will=will)
        self.agent = agent
        self.device_id = agent.identity.device_id
        self.request_timeout = request_timeout
        self.monotonic, self.progress, self.on_event = monotonic, progress, on_event
        self._extra = dict(extra_handlers or {})
        if taken := set(self._extra) & {*_LIMITS, "cmd", "connected", "installed", "tick"}:
            raise ValueError(f"extra_handlers may not take over the daemon's own {taken}")
        self.link = link_factory(mqtt, self._route, on_connect=self._on_connect)
        self.downloads_dir = agent.config.home / "downloads"
        self.downloads_dir.mkdir(exist_ok=True)
        self.flow = F.ReleaseFlow(
            device_id=self.device_id,
            check=agent.updater.check,
            served=self._served,
            new_download=self._new_download,
            remember=remember_failed,
        )
        self.reporter = Reporter(
            self.link,
            device_id=self.device_id,
            facts=self._facts,
            metrics=self._metrics,
            clock=clock,
            monotonic=monotonic,
            heartbeat=heartbeat,
            buffer=agent.config.telemetry_buffer,
            # opted in (agent.toml fl_enabled) and listening for instructions: FL presence
            capabilities=(DeviceStatus.FL,) if agent.config.fl_enabled and "fl" in self._extra
            else (),
        )  # fmt: skip
        #: predict with recording (the HTTP API uses it): the ``inference`` telemetry source
        self.recorder = Recorder(agent)
        self.reporter.add_source("inference", self.recorder.telemetry)
        #: sketches of sampled inputs/outputs per model against the manifest's reference
        #: statistics: the ``drift`` telemetry source (``agent.drift``)
        self.drift = DriftMonitor(agent)
        self.drift.attach(self.recorder, self.reporter)
        self.predlog = open_log(agent.config, self.recorder)  # opt in: predlog_sample > 0
        #: verifies upload requests (signed by the coordinator, unexpired, never replayed)
        self.predlog_gate = RequestGate(
            device_id=self.device_id, trusted_keys=lambda: agent.trust.keyring, clock=clock,
            state=None if agent.readonly else agent.config.home / "predlog-replay.json",
        )  # fmt: skip
        #: the candidate slot's own release flow, shadow and A/B (``shadow``, ``ab`` telemetry)
        self.candidate = (
            CandidateSide(self, window=agent.config.window, request_timeout=request_timeout)
            if candidates and not agent.readonly
            else None
        )
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1000)
        self._q_lock = threading.Lock()
        self._q_bytes = 0  # payload bytes in _q; guarded by _q_lock
        self.max_queued_bytes = max_queued_bytes
        self._connect_missed = threading.Event()  # a connect that found the queue full
        self._finished: queue.SimpleQueue[EdgeFleetError | None] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[F.StartInstall | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-daemon", daemon=True)
        self._installer = threading.Thread(
            target=self._install_loop, name="agent-installer", daemon=True
        )
        self.installed = threading.Event()  # set after every successful install (tests)
        self.dropped = 0  # messages dropped unread (oversize, queue full)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._installer.start()
        for topic in (  # before connecting: ``link.connected`` then means "listening"
            topics.release(self.device_id),
            topics.chunk(self.device_id),
            topics.cmd(self.device_id),
            *(f"{topics.PREFIX}/dev/{self.device_id}/{kind}" for kind in self._extra),
            *(() if self.candidate is None else (self.candidate.feed.topic,)),
            *(() if self.predlog is None else (predlog_topic(topics.cmd(self.device_id)),)),
        ):
            self.link.subscribe(topic, qos=1)
        self.link.start()

    @property
    def alive(self) -> bool:
        """True while the worker and installer threads run (a crash in either ends it)."""
        return self._thread.is_alive() and self._installer.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self._installer.join(timeout=60)  # an install under way finishes first
        if self.flow.download is not None:
            self.flow.download.close()
        if self.candidate is not None:
            self.candidate.close()
        if self.predlog is not None:
            self.predlog.close()
        self.reporter.goodbye()  # a clean DISCONNECT discards the will: say "offline" ourselves
        self.link.stop()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def status(self) -> DeviceStatus:
        return self.reporter.status()

    # -- network thread: size check and hand over (never blocks) -------------------------------
    def _route(self, topic: str, payload: bytes, props: MessageProps) -> None:
        route = topics.route(topic)
        kind = "other" if route is None or route.device_id != self.device_id else route.kind
        if (own := topics.device_of(topic)) and own[0] == self.device_id and own[1] in self._extra:
            kind = own[1]
        if self.candidate is not None and topic == self.candidate.feed.topic:
            kind = "candidate"
        elif self.predlog is not None and topic == predlog_topic(topics.cmd(self.device_id)):
            kind = "predlog"
        limit = _LIMITS.get(kind, MAX_CHUNK_FRAME if kind in self._extra else MAX_COMMAND)
        if len(payload) > limit:
            self._drop(topic, f"{len(payload)} bytes, limit {limit}")
            return
        if kind == "chunk" and not self.flow.downloading and not self._candidate_downloading():
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

    def _upload(self, payload: bytes) -> None:
        """Answer a verified prediction-log upload request with ``predlog`` telemetry chunks."""
        request = self.predlog_gate.open(payload)  # refusals: logged and counted
        if request is None:
            return
        corr, since, limit = request
        assert self.predlog is not None
        for chunk in upload_messages(self.predlog, corr, since, limit):
            self.reporter.telemetry({"predlog": chunk})

    def _candidate_downloading(self) -> bool:
        return self.candidate is not None and self.candidate.feed.flow.downloading

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
            kind, payload = self._next_event()
            try:
                self._carry_out(self._feed(kind, payload))
                if self.link.connected.is_set():
                    self._carry_out(self.flow.tick(self.monotonic()))
                if self.candidate is not None:
                    self.candidate.feed.tick(self.monotonic())
                self.reporter.tick()
            except Exception:  # never let one bad message kill the daemon
                log.exception("agent daemon: unexpected error handling %s", kind)
            if kind == "installed" and payload is None:
                self.installed.set()  # after the part file is gone and the status reported
            if self.on_event is not None:
                try:
                    self.on_event(kind)
                except Exception:  # an observer's bug must not stop the daemon either
                    log.exception("agent daemon: on_event(%r) failed", kind)

    def _next_event(self) -> tuple[str, Any]:
        if self._connect_missed.is_set():
            self._connect_missed.clear()
            return "connected", None
        try:
            return "installed", self._finished.get_nowait()
        except queue.Empty:
            pass
        try:
            kind, payload = self._q.get(timeout=0.2)
        except queue.Empty:
            return "tick", None
        self._unqueued(payload)
        return kind, payload

    def _feed(self, kind: str, payload: Any) -> list[F.Action]:
        if kind == "release":
            return self.flow.offer(payload)
        if kind == "chunk":
            if self.candidate is not None and self.candidate.feed.claims(payload):
                self.candidate.feed.chunk(payload)
                return []
            return self.flow.chunk(payload)
        if kind == "candidate" and self.candidate is not None:
            self.candidate.feed.offer(payload)
            return []
        if kind == "predlog" and self.predlog is not None:
            self._upload(payload)
            return []
        if kind == "installed":
            return self.flow.install_finished(payload)
        if kind == "connected":
            self.reporter.connected()
            if self.candidate is not None:
                self.candidate.feed.connected()
            return self.flow.connected()
        if kind in self._extra:
            self._extra[kind](payload)
        return []  # "tick", a wake-up, commands (none yet)

    def _carry_out(self, actions: list[F.Action]) -> None:
        for a in actions:
            if isinstance(a, F.SendRequests):
                for req in a.requests:
                    self.link.publish(topics.up(self.device_id, "chunkreq"), req.encode(), qos=1)
            elif isinstance(a, F.StartInstall):
                self._jobs.put(a)
            elif isinstance(a, F.Report):
                self.reporter.report()
            elif isinstance(a, F.Reject):
                self.agent.record_failure(a.error)
            elif isinstance(a, F.Discard):
                _discard(a.download)
            elif isinstance(a, F.Progress) and self.progress is not None:
                self.progress(a.phase, a.done, a.total)

    # -- installer thread ------------------------------------------------------------------------
    def _install_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            error: EdgeFleetError | None = None
            try:  # the part file is the source: its read errors arrive as StoreError
                self.agent.install(job.offer, job.download, manifest=job.manifest)  # records
            except EdgeFleetError as exc:
                error = exc
            except Exception as exc:  # a bug: report it as a failed install, keep running
                log.exception("install of release %d failed", job.manifest.sequence)
                error = StoreError(f"install failed unexpectedly: {exc}")
            self._finished.put(error)
            try:
                self._q.put_nowait(("wake", None))  # the worker picks the result up now
            except queue.Full:
                pass  # it will within one turn anyway

    # -- what the flow and the reporter are given ----------------------------------------------
    def _served(self) -> bytes | None:
        active = self.agent.active  # in memory: no disk read per offer
        return None if active is None else active.manifest_raw

    def _new_download(self, manifest: Manifest) -> Download:
        keep = f"{manifest.bundle_id}.part"
        with os_errors(str(self.downloads_dir)):
            for old in self.downloads_dir.glob("*.part"):
                if old.name != keep:
                    old.unlink()
            return Download(
                manifest,
                self.downloads_dir / keep,
                topics.chunk(self.device_id),
                window=self.agent.config.window,
                timeout=self.request_timeout,
            )

    def _facts(self) -> Facts:
        d = self.flow.download
        progress = None
        if d is not None:
            m = d.manifest
            progress = DownloadProgress(
                bundle_id=m.bundle_id,
                sequence=m.sequence,
                done=d.bytes_done,
                total=m.payload_size,
                **vars(d.stats),
            )
        side = self.candidate
        return Facts(
            state=self.flow.state,
            active=active_model(self.agent.active),
            highest_sequence=self.agent.store.state.highest_sequence,
            last_result=self.agent.last_install,
            progress=progress,
            candidate=None if side is None else candidate_model(side.slot.version),
        )

    def _metrics(self) -> dict[str, Any]:
        d = self.flow.download
        return {
            "state": self.flow.state,
            "dropped": self.dropped,
            "predlog_refused": self.predlog_gate.refused,
            "failed": len(self.flow.failed),
            "download": None if d is None else vars(d.stats),
        }


def _discard(d: F.DownloadLike) -> None:
    d.close()
    try:
        d.path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", d.path, exc.strerror or exc)


def mqtt_config_for(
    agent: Agent, *, broker: str | None = None, password: str | None = None
) -> MqttConfig:
    """The agent's broker settings: username = device id, and the client id ``agent-<id>``,
    the only one the generated broker config lets that account use (``topics.device_client_id``)."""
    cfg = agent.config
    return mqtt_config(
        cfg,
        client_id=topics.device_client_id(cfg.device_id),
        username=cfg.username or cfg.device_id,
        broker=broker,
        password=password,
        max_incoming=MAX_INCOMING,
    )
