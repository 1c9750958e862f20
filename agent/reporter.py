"""Status reports and telemetry: what the device tells the coordinator, through the link port.

``Reporter`` builds the typed ``DeviceStatus`` from injected facts, publishes it retained on
the device's status topic, and owns the bounded telemetry buffer: telemetry queued while
offline is flushed, oldest first, once the link is up; past ``buffer`` messages the oldest
are dropped. Heartbeats (a status and a telemetry message every ``heartbeat`` seconds) are
timed with the injected monotonic clock. It runs on the daemon's worker thread only. The
status carries the ``capabilities`` it was built with (the daemon passes ``("fl",)`` when the
device opted in to federated rounds) and, while the candidate slot serves one, the shadow / A/B
``candidate`` (``candidate_model``), so ``model release --candidate --wait`` sees it arrive.

Telemetry sources: ``add_source(namespace, fn)`` registers ``fn() -> dict | None``; each
telemetry message's ``metrics`` is ``{namespace: fn()}`` over the sources (a source returning
None, or raising, is left out of that message; a raise is logged). ``metrics`` given to the
constructor is the ``agent`` source. A message over the ``Telemetry`` bounds (depth, 1,024
items, ``MAX_TELEMETRY`` bytes) sheds its largest namespaces until it fits, counted in
``telemetry_shed`` with a WARNING. Sources report the time since their previous call (deltas),
so what waits in the offline buffer is not counted twice nor lost.

Presence: ``offline_will(device_id, now)`` is the MQTT last will the daemon connects with (a
retained ``offline`` status on the device's own status topic, which the broker publishes when
the connection drops uncleanly or its keep-alive expires); ``goodbye()`` publishes the same on
a clean stop, since a clean DISCONNECT discards the will.

On a (re)connect the link's ``on_connect`` comes before the broker acknowledged our
subscriptions, so ``connected()`` only notes it; the report and the flush follow on the first
``tick`` that finds ``link.connected`` set.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgefleet.infra.link.config import Will
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.errors import DecodeError, TransportError
from edgefleet.protocol.messages import (
    MAX_TELEMETRY,
    ActiveModel,
    CandidateModel,
    DeviceStatus,
    DownloadProgress,
    InstallResult,
    Telemetry,
)

from .store import InstalledVersion

__all__ = ["NAMESPACE", "Facts", "Reporter", "Source", "active_model", "candidate_model",
           "offline_will"]  # fmt: skip

Source = Callable[[], dict[str, Any] | None]  # a telemetry source: its payload, or None
NAMESPACE = re.compile(r"[a-z][a-z0-9_]{0,31}")  # telemetry source names

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Facts:
    """What a status report says, as the daemon sees it now."""

    state: str  # DeviceStatus.STATES
    active: ActiveModel | None
    highest_sequence: int
    last_result: InstallResult | None
    progress: DownloadProgress | None
    candidate: CandidateModel | None = None  # what the candidate slot serves


def active_model(version: InstalledVersion | None) -> ActiveModel | None:
    if version is None:
        return None
    m = version.manifest
    return ActiveModel(
        name=m.name,
        version=m.model_version,
        sequence=m.sequence,
        format=m.format,
        bundle_id=m.bundle_id,
    )


def candidate_model(version: InstalledVersion | None) -> CandidateModel | None:
    """The status form of the candidate slot's version (None: it serves none)."""
    m = None if version is None else version.manifest
    if m is None or m.candidate is None:
        return None
    return CandidateModel(name=m.name, version=m.model_version, sequence=m.sequence,
                          bundle_id=m.bundle_id, mode=m.candidate.mode)  # fmt: skip


class Reporter:
    def __init__(
        self,
        link: Link,
        *,
        device_id: str,
        facts: Callable[[], Facts],
        metrics: Source | None = None,  # the ``agent`` telemetry source
        clock: Callable[[], float],  # unix seconds, for the messages' time
        monotonic: Callable[[], float],  # seconds, for the heartbeat
        heartbeat: float = 30.0,  # seconds between heartbeats
        buffer: int = 1000,  # telemetry messages kept while offline
        capabilities: tuple[str, ...] = (),  # DeviceStatus.capabilities, e.g. ("fl",)
    ) -> None:
        self.link, self.device_id = link, device_id
        self.capabilities = tuple(sorted(set(capabilities)))
        self._facts = facts
        self._sources: dict[str, Source] = {}
        if metrics is not None:
            self.add_source("agent", metrics)
        self.telemetry_shed = 0  # messages that had namespaces left out to fit the bounds
        self._clock, self._monotonic, self.heartbeat = clock, monotonic, heartbeat
        self._telemetry: collections.deque[bytes] = collections.deque(maxlen=buffer)
        self.telemetry_dropped = 0  # oldest telemetry dropped past the buffer
        self._counter = 0
        self._last_beat: float | None = None
        self._announce = False

    @property
    def buffered(self) -> int:
        return len(self._telemetry)

    def status(self) -> DeviceStatus:
        """The status as of now (each call counts: ``counter`` increases)."""
        f = self._facts()
        self._counter += 1
        return DeviceStatus(
            device_id=self.device_id,
            time=int(self._clock()),
            state=f.state,
            active=f.active,
            highest_sequence=f.highest_sequence,
            last_result=f.last_result,
            progress=f.progress,
            counter=self._counter,
            capabilities=self.capabilities,
            candidate=f.candidate,
        )

    def report(self) -> None:
        """Publish the status, if connected: it is retained, so only the latest matters and
        it is sent again on connect."""
        if not self.link.connected.is_set():
            return
        try:
            self.link.publish(
                topics.up(self.device_id, "status"), self.status().encode(), qos=1, retain=True
            )
        except TransportError as exc:
            log.warning("status not sent: %s", exc)

    def connected(self) -> None:
        """A (re)connect: report and flush once the link is listening."""
        self._announce = True

    def tick(self) -> None:
        now = self._monotonic()
        if self._announce and self.link.connected.is_set():
            self._announce = False
            self.report()
            self.flush()
        if self._last_beat is None or now - self._last_beat >= self.heartbeat:
            self._last_beat = now
            self.telemetry(self.collect())
            self.report()

    def add_source(self, namespace: str, fn: Source) -> None:
        """Put ``fn()`` under ``namespace`` in every telemetry message from now on."""
        if not NAMESPACE.fullmatch(namespace):
            raise ValueError(f"telemetry namespace must match {NAMESPACE.pattern}: {namespace!r}")
        if namespace in self._sources:
            raise ValueError(f"telemetry namespace {namespace!r} is taken")
        self._sources[namespace] = fn

    def collect(self) -> dict[str, Any]:
        """``{namespace: payload}`` from every source, shed to fit the ``Telemetry`` bounds."""
        metrics: dict[str, Any] = {}
        for namespace, fn in list(self._sources.items()):
            try:
                payload = fn()
            except Exception:
                log.exception("telemetry source %r failed: left out", namespace)
                continue
            if payload is not None:
                metrics[namespace] = payload
        return self._fit(metrics)

    def _fit(self, metrics: dict[str, Any]) -> dict[str, Any]:
        shed: list[str] = []
        while metrics:
            try:
                size = len(Telemetry(device_id=self.device_id, time=0, metrics=metrics).encode())
            except DecodeError:
                size = MAX_TELEMETRY + 1  # too deep, too many items, not finite: shed
            if size <= MAX_TELEMETRY - 64:  # room for a longer time field
                break
            biggest = max(metrics, key=lambda k: len(repr(metrics[k])))
            shed.append(biggest)
            metrics = {k: v for k, v in metrics.items() if k != biggest}
        if shed:
            self.telemetry_shed += 1
            log.warning("telemetry over its bounds: left out %s", ", ".join(shed))
        return metrics

    def goodbye(self) -> None:
        """A clean stop: publish the ``offline`` status the will would have (best effort)."""
        if not self.link.connected.is_set():
            return
        will = offline_will(self.device_id, int(self._clock()))
        try:
            self.link.publish(will.topic, will.payload, qos=1, retain=True).wait(2.0)
        except TransportError as exc:
            log.warning("offline status not sent: %s", exc)

    def telemetry(self, metrics: dict[str, Any]) -> None:
        """Queue a telemetry message and send what the link takes."""
        if len(self._telemetry) == self._telemetry.maxlen:
            self.telemetry_dropped += 1
            log.warning("telemetry buffer full (%d): dropped the oldest", len(self._telemetry))
        message = Telemetry(device_id=self.device_id, time=int(self._clock()), metrics=metrics)
        self._telemetry.append(message.encode())
        self.flush()

    def flush(self) -> None:
        while self._telemetry and self.link.connected.is_set():
            try:
                self.link.publish(topics.up(self.device_id, "telemetry"), self._telemetry[0], qos=1)
            except TransportError:
                return
            self._telemetry.popleft()


def offline_will(device_id: str, now: int) -> Will:
    """The last will of ``device_id``'s connection: a retained ``offline`` status."""
    status = DeviceStatus(device_id=device_id, time=now, state="offline")
    return Will(topic=topics.up(device_id, "status"), payload=status.encode(), qos=1, retain=True)
