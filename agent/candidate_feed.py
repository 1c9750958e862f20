"""The daemon's candidate channel: a second ``ReleaseFlow`` for the candidate slot.

The coordinator offers a candidate retained on ``ef/v1/dev/<id>/cmd/candidate``
(``protocol.candidate.candidate_topic``); an empty message there drops it. ``CandidateFeed``
runs the same sans-I/O ``ReleaseFlow`` as the active release, with the candidate slot's
``check`` (the same signed-parts verification, plus the role check) and its own downloads
directory (``<home>/candidate/downloads``), and carries out its actions: chunk requests go
out on the device's ``up/chunkreq`` like any, the chunk replies for its bundle id are handed
to it by the daemon (``claims``), and the install runs on a thread of its own (one at a time),
so neither the active release's flow nor inference waits for it. Everything except the offer
and chunk handling runs on the daemon's worker thread (``tick``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from edgefleet.infra.fsutil import os_errors
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.candidate import candidate_topic
from edgefleet.protocol.errors import EdgeFleetError, StoreError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply

from . import flow as F
from .candidate import CandidateSlot
from .download import Download

if TYPE_CHECKING:
    from .agent import Agent
    from .observe import Recorder
    from .reporter import Reporter

__all__ = ["CandidateFeed", "CandidateSide"]

log = logging.getLogger(__name__)


class CandidateFeed:
    def __init__(
        self,
        slot: CandidateSlot,
        link: Link,
        *,
        device_id: str,
        window: int = 8,
        request_timeout: float = 5.0,
    ) -> None:
        self.slot, self.link, self.device_id = slot, link, device_id
        self.topic = candidate_topic(topics.cmd(device_id))
        self.window, self.request_timeout = window, request_timeout
        self.downloads = slot.root / "downloads"
        with os_errors(f"{self.downloads}: cannot create it"):
            self.downloads.mkdir(mode=0o700, exist_ok=True)
        self.flow = F.ReleaseFlow(device_id=device_id, check=slot.check, served=slot.served_raw,
                                  new_download=self._new_download)  # fmt: skip
        self._finished: queue.SimpleQueue[EdgeFleetError | None] = queue.SimpleQueue()
        self.installed = threading.Event()  # set after every candidate install (tests)
        self.on_change: Callable[[], None] = lambda: None  # e.g. report the status

    # -- events (the daemon's worker thread) -----------------------------------------------
    def offer(self, payload: bytes) -> None:
        if not payload:  # the coordinator cleared the candidate
            if self.slot.drop():
                self.on_change()
            return
        self._carry(self.flow.offer(payload))

    def claims(self, payload: bytes) -> bool:
        """Is this chunk reply for the candidate download under way?"""
        d = self.flow.download
        if d is None or not self.flow.downloading:
            return False
        try:
            reply = ChunkReply.decode(payload, max_data=d.manifest.segment_size + 16)
        except EdgeFleetError:
            return False
        return reply.bundle_id == d.manifest.bundle_id

    def chunk(self, payload: bytes) -> None:
        self._carry(self.flow.chunk(payload))

    def tick(self, now: float) -> None:
        while True:
            try:
                error = self._finished.get_nowait()
            except queue.Empty:
                break
            self._carry(self.flow.install_finished(error))
            if error is None:
                self.installed.set()
                self.on_change()
        if self.link.connected.is_set():
            self._carry(self.flow.tick(now))

    def connected(self) -> None:
        self._carry(self.flow.connected())

    # -- actions ---------------------------------------------------------------------------
    def _carry(self, actions: list[F.Action]) -> None:
        for a in actions:
            if isinstance(a, F.SendRequests):
                for req in a.requests:
                    self.link.publish(topics.up(self.device_id, "chunkreq"), req.encode(), qos=1)
            elif isinstance(a, F.StartInstall):
                threading.Thread(target=self._install, args=(a,), name="candidate-install",
                                 daemon=True).start()  # fmt: skip
            elif isinstance(a, F.Reject):
                self.slot.last_error = f"{a.error.code}: {a.error}"
                log.warning("candidate refused (%s): %s", a.error.code, a.error)
            elif isinstance(a, F.Discard):
                a.download.close()
                try:
                    a.download.path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("cannot remove %s: %s", a.download.path, exc)

    def _install(self, job: F.StartInstall) -> None:
        error: EdgeFleetError | None = None
        try:
            self.slot.install(job.offer, job.download, manifest=job.manifest)
        except EdgeFleetError as exc:
            error = exc
        except Exception as exc:  # a bug: a failed install, the daemon keeps running
            log.exception("candidate install of release %d failed", job.manifest.sequence)
            error = StoreError(f"candidate install failed unexpectedly: {exc}")
        self._finished.put(error)

    def _new_download(self, manifest: Manifest) -> Download:
        keep = f"{manifest.bundle_id}.part"
        with os_errors(str(self.downloads)):
            for old in self.downloads.glob("*.part"):
                if old.name != keep:
                    old.unlink()
            return Download(manifest, self.downloads / keep, topics.chunk(self.device_id),
                            window=self.window, timeout=self.request_timeout)  # fmt: skip

    def close(self) -> None:
        d, self.flow.download = self.flow.download, None
        if d is not None:
            d.close()


class _DaemonLike(Protocol):
    agent: Agent
    link: Link
    recorder: Recorder
    reporter: Reporter


class CandidateSide:
    """Everything the daemon runs for candidates, built from its agent, link, recorder and
    reporter: the slot, its feed, the ``Shadow`` (registered as a recorder observer, sampling
    ``shadow_sample`` of the calls, once a shadow candidate is first served) and the
    ``ABRouter`` (the agent's router while an ``ab`` candidate is served); the ``shadow`` and
    ``ab`` telemetry sources."""

    def __init__(self, daemon: _DaemonLike, *, window: int, request_timeout: float) -> None:
        from .ab import ABRouter
        from .shadow import Shadow

        agent = daemon.agent
        self.slot = agent.open_candidate()
        self.feed = CandidateFeed(self.slot, daemon.link, device_id=agent.identity.device_id,
                                  window=window, request_timeout=request_timeout)  # fmt: skip
        self.feed.on_change = daemon.reporter.report
        self.shadow = Shadow(self.slot, lambda: agent.serving,
                             queue_size=agent.config.shadow_queue)  # fmt: skip
        self.ab = ABRouter(self.slot, agent.predict_active,
                           attach=lambda router: setattr(agent, "router", router))  # fmt: skip
        self._recorder, self._sample = daemon.recorder, agent.config.shadow_sample
        self._observing = False
        self.slot.listeners.append(self._observe)
        self._observe(self.slot.serving)
        daemon.reporter.add_source("shadow", self.shadow.telemetry)
        daemon.reporter.add_source("ab", self.ab.telemetry)

    def _observe(self, serving: object) -> None:
        if not self._observing and self.shadow.running and self._sample > 0:
            self._recorder.add_observer(self.shadow.observe, share=self._sample)
            self._observing = True

    def close(self) -> None:
        """Idempotent (the daemon's ``stop`` may run twice)."""
        if self._observe in self.slot.listeners:
            self.slot.listeners.remove(self._observe)
        self.feed.close()
        self.shadow.close()
        self.ab.close()
