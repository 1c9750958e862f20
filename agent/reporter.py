"""Status reports and telemetry: what the device tells the coordinator, through the link port.

``Reporter`` builds the typed ``DeviceStatus`` from injected facts, publishes it retained on
the device's status topic, and owns the bounded telemetry buffer: telemetry queued while
offline is flushed, oldest first, once the link is up; past ``buffer`` messages the oldest
are dropped. Heartbeats (a status and a telemetry message every ``heartbeat`` seconds) are
timed with the injected monotonic clock. It runs on the daemon's worker thread only.

On a (re)connect the link's ``on_connect`` comes before the broker acknowledged our
subscriptions, so ``connected()`` only notes it; the report and the flush follow on the first
``tick`` that finds ``link.connected`` set.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.errors import TransportError
from edgefleet.protocol.messages import (
    ActiveModel,
    DeviceStatus,
    DownloadProgress,
    InstallResult,
    Telemetry,
)

from .store import InstalledVersion

__all__ = ["Facts", "Reporter", "active_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Facts:
    """What a status report says, as the daemon sees it now."""

    state: str  # DeviceStatus.STATES
    active: ActiveModel | None
    highest_sequence: int
    last_result: InstallResult | None
    progress: DownloadProgress | None


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


class Reporter:
    def __init__(
        self,
        link: Link,
        *,
        device_id: str,
        facts: Callable[[], Facts],
        metrics: Callable[[], dict[str, Any]],
        clock: Callable[[], float],  # unix seconds, for the messages' time
        monotonic: Callable[[], float],  # seconds, for the heartbeat
        heartbeat: float = 30.0,  # seconds between heartbeats
        buffer: int = 1000,  # telemetry messages kept while offline
        capabilities: tuple[str, ...] = (),  # DeviceStatus.capabilities, e.g. ("fl",)
    ) -> None:
        self.link, self.device_id = link, device_id
        self.capabilities = tuple(sorted(set(capabilities)))
        self._facts, self._metrics = facts, metrics
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
            self.telemetry(self._metrics())
            self.report()

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
