"""Upstream ingestion: device statuses and telemetry into registry updates, in batches.

Free of MQTT: the service's worker calls ``add`` for each message it took off its queue and
``flush`` once the queue is empty (or a batch is full), so a fan-out in which every agent
reports several times costs one commit per batch, not one per message. Within a batch the
updates of one device are merged, later messages winning. Every message is counted: decoded,
dropped (the sender's fault: malformed, oversize, or a status naming another device),
ignored (nothing to store), stored, or from a device that is not enrolled.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from edgefleet.protocol.errors import DecodeError, EdgeFleetError
from edgefleet.protocol.messages import DeviceStatus, Telemetry

from .registry import Registry

__all__ = ["STATUS", "TELEMETRY", "Ingest", "status_values"]

log = logging.getLogger(__name__)

STATUS = "up/status"  # topic kinds (protocol.topics.route)
TELEMETRY = "up/telemetry"


def _plain(obj: Any) -> dict[str, Any] | None:
    """A typed status field as the registry stores it: its set fields."""
    if obj is None:
        return None
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


def status_values(st: DeviceStatus, now: int) -> dict[str, Any]:
    """The registry columns one status sets."""
    a = st.active
    return {
        "last_seen": now,
        "state": st.state,
        "active_name": None if a is None else a.name,
        "active_version": None if a is None else a.version,
        "active_sequence": None if a is None else a.sequence,
        "last_result": {**(_plain(st.last_result) or {}), "progress": _plain(st.progress)},
    }


class Ingest:
    """Decode, coalesce and store upstream messages; one instance per worker thread."""

    def __init__(self, registry: Registry, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.clock = clock
        self._pending: dict[str, dict[str, Any]] = {}
        self.decoded = 0  # messages that became an update
        self.dropped = 0  # malformed or misaddressed: the sender's fault
        self.ignored = 0  # cleared retained statuses, kinds we do not ingest
        self.stored = 0  # device updates written
        self.unknown = 0  # updates for devices not enrolled
        self.statuses = 0  # status updates written

    @property
    def pending(self) -> int:
        """Devices with an update waiting for ``flush``."""
        return len(self._pending)

    def add(self, device_id: str, kind: str, payload: bytes) -> bool:
        """Decode one message from ``device_id``'s topic of ``kind``; True if it was queued."""
        try:
            values = self._decode(device_id, kind, payload)
        except EdgeFleetError as exc:  # DecodeError, TooLargeError: the sender's fault
            self.dropped += 1
            log.warning("dropped %s from %s: %s", kind, device_id, exc)
            return False
        if values is None:
            self.ignored += 1
            return False
        self.decoded += 1
        self._pending.setdefault(device_id, {}).update(values)  # later messages win
        return True

    def _decode(self, device_id: str, kind: str, payload: bytes) -> dict[str, Any] | None:
        now = int(self.clock())
        if kind == TELEMETRY:
            t = Telemetry.decode(payload)
            log.debug("telemetry from %s: %s", t.device_id, t.metrics)
            return {"last_seen": now}
        if kind != STATUS or not payload:
            return None  # a cleared retained status, or nothing we ingest
        st = DeviceStatus.decode(payload)
        if st.device_id != device_id:
            raise DecodeError(f"status on {device_id}'s topic names {st.device_id}")
        return status_values(st, now)

    def flush(self) -> int:
        """Write what is pending in one transaction (per device if that fails); return the
        number of statuses stored."""
        updates, self._pending = self._pending, {}
        if not updates:
            return 0
        found = self._store(updates)
        for device_id in sorted(set(updates) - found):
            log.warning("status from unenrolled device %s ignored", device_id)
        statuses = sum(1 for d in found if "state" in updates[d])
        self.stored += len(found)
        self.unknown += len(updates) - len(found)
        self.statuses += statuses
        return statuses

    def _store(self, updates: dict[str, dict[str, Any]]) -> set[str]:
        try:
            return self.registry.update_devices(updates)
        except Exception:  # one bad row must not cost the others their update
            log.warning("batch of %d device updates failed; storing one by one", len(updates))
        found: set[str] = set()
        for device_id, values in updates.items():
            try:
                found |= self.registry.update_devices({device_id: values})
            except Exception:
                log.exception("storing the update of %s failed", device_id)
        return found
