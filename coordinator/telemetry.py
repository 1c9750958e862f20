"""Queries over stored telemetry: what the rollout gates, drift, shadow/A-B views and
``/metrics`` read. Writing is ``ingest.Ingest``'s job; nothing here writes.

- ``recent(registry, namespace=..., since=...)``: the raw rows of one telemetry namespace,
  ``(device_id, time, payload)`` oldest first (``time``: the device's clock, never ahead of
  the coordinator's receive time).
- ``version_health(registry, name=..., version=..., since=...)``: per device, what its
  ``inference`` telemetry for ``name@version`` says since ``since`` (merged windows: count,
  errors, error rate, latency quantiles from the merged histogram, class counts, accuracy
  where labels flowed back) and whether it is ``online``. A device is online when its last
  status is not the ``offline`` will and it was heard from within ``stale_after`` seconds;
  an offline device never counts as healthy, whatever its numbers (``VersionHealth.healthy``).
- ``presence(registry, now)`` and ``version_counts(registry)``: the fleet gauges.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from edgefleet.protocol.messages import LATENCY_BOUNDS_MS
from sqlalchemy import func, select

from .registry import Device, Registry
from .tables.telemetry import InferenceTotalRow, TelemetryRow

__all__ = [
    "INFERENCE",
    "STALE_AFTER",
    "VersionHealth",
    "is_online",
    "merge_inference",
    "presence",
    "quantile_ms",
    "recent",
    "version_counts",
    "version_health",
    "version_totals",
]

INFERENCE = "inference"  # the namespace agent/observe.py reports under
STALE_AFTER = 90  # s without a status or telemetry after which a device counts as offline
MAX_ROWS = 100_000  # rows one ``recent`` call returns at most (the newest are kept)


def recent(
    registry: Registry,
    *,
    namespace: str,
    since: int,
    device_ids: Collection[str] | None = None,
    limit: int = MAX_ROWS,
) -> list[tuple[str, int, dict[str, Any]]]:
    """``(device_id, time, payload)`` of ``namespace`` rows with ``time >= since`` (unix s),
    oldest first; at most ``limit`` (the newest ones)."""
    q = select(TelemetryRow.device_id, TelemetryRow.time, TelemetryRow.payload).where(
        TelemetryRow.namespace == namespace, TelemetryRow.time >= since
    )
    if device_ids is not None:
        q = q.where(TelemetryRow.device_id.in_(list(device_ids)))
    q = q.order_by(TelemetryRow.time.desc(), TelemetryRow.id.desc()).limit(limit)
    with registry.session() as s:
        rows = [(d, int(t), p) for d, t, p in s.execute(q)]
    rows.reverse()
    return rows


def quantile_ms(lat: Iterable[int], q: float) -> float | None:
    """The ``q`` quantile of a ``LATENCY_BOUNDS_MS`` histogram (geometric interpolation in
    the bucket; the open last bucket reads as its lower bound); None if empty."""
    counts = [int(n) for n in lat]
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen, bounds = q * total, 0, LATENCY_BOUNDS_MS
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            hi = bounds[i]
            lo = bounds[i - 1] if i else hi / 2**0.5
            return float(lo * (hi / lo) ** ((rank - seen) / n))
        seen += n
    return float(bounds[-1])


def merge_inference(windows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several ``inference`` windows of one model key summed: count, errors, rows, ``lat``
    (bucket counts), ``classes``, ``conf`` (bin counts), ``conf_sum``, ``lat_sum_ms``,
    ``labelled``/``correct`` (predictions scored against a true label that flowed back).
    Malformed fields (a device's bug) are skipped, not trusted."""
    out: dict[str, Any] = {"count": 0, "errors": 0, "rows": 0, "lat": [], "classes": {},
                           "conf": [], "conf_sum": 0.0, "lat_sum_ms": 0.0, "labelled": 0,
                           "correct": 0}  # fmt: skip
    for w in windows:
        for k in ("count", "errors", "rows", "labelled", "correct"):
            out[k] += _count(w.get(k))
        for k in ("conf_sum", "lat_sum_ms"):
            v = w.get(k)
            out[k] += float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0
        for k in ("lat", "conf"):
            _add_list(out[k], w.get(k))
        classes = w.get("classes")
        if isinstance(classes, dict):
            for c, n in classes.items():
                out["classes"][c] = out["classes"].get(c, 0) + _count(n)
    return out


def _count(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _add_list(into: list[int], v: object) -> None:
    if not isinstance(v, list):
        return
    if len(into) < len(v):
        into.extend([0] * (len(v) - len(into)))
    for i, n in enumerate(v):
        into[i] += _count(n)


@dataclass(frozen=True, kw_only=True)
class VersionHealth:
    """One device's numbers for one model version over a window."""

    device_id: str
    count: int  # predict calls
    errors: int
    error_rate: float  # errors / count (0.0 when count is 0)
    rows: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    class_counts: dict[str, int]
    online: bool
    last_seen: int | None  # unix s of the last status or telemetry
    state: str  # the last reported state ("offline": its will)
    labelled: int = 0  # predictions a true label flowed back for
    accuracy: float | None = None  # correct / labelled (None: no labels)

    @property
    def healthy(self) -> bool:
        """Online; the gates judge the numbers."""
        return self.online

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_online(device: Device, now: int, stale_after: int = STALE_AFTER) -> bool:
    """Not reported offline (its will) and heard from within ``stale_after`` seconds."""
    return (
        device.state != "offline"
        and device.last_seen is not None
        and now - device.last_seen <= stale_after
    )


def version_health(
    registry: Registry,
    *,
    name: str,
    version: str,
    since: int,
    device_ids: Collection[str] | None = None,
    now: int | None = None,
    stale_after: int = STALE_AFTER,
) -> dict[str, VersionHealth]:
    """Per device: the ``inference`` telemetry of ``name@version`` since ``since``. Without
    ``device_ids``: every device that reported on it or runs it now. A device with no
    telemetry has count 0; an unknown id is offline with state ``unknown``."""
    now = int(time.time()) if now is None else now
    key = f"{name}@{version}"
    windows: dict[str, list[dict[str, Any]]] = {}
    for device_id, _, payload in recent(
        registry, namespace=INFERENCE, since=since, device_ids=device_ids
    ):
        w = payload.get(key)
        if isinstance(w, dict):
            windows.setdefault(device_id, []).append(w)
    devices = {d.device_id: d for d in registry.devices()}
    if device_ids is None:
        running = {d for d, dev in devices.items()
                   if (dev.active_name, dev.active_version) == (name, version)}  # fmt: skip
        wanted: Collection[str] = sorted(set(windows) | running)
    else:
        wanted = device_ids
    return {d: _health(d, windows.get(d, []), devices.get(d), now, stale_after) for d in wanted}


def _health(
    device_id: str, windows: list[dict[str, Any]], dev: Device | None, now: int, stale: int
) -> VersionHealth:
    m = merge_inference(windows)
    return VersionHealth(
        device_id=device_id,
        count=m["count"],
        errors=m["errors"],
        error_rate=m["errors"] / m["count"] if m["count"] else 0.0,
        rows=m["rows"],
        p50_ms=quantile_ms(m["lat"], 0.50),
        p95_ms=quantile_ms(m["lat"], 0.95),
        p99_ms=quantile_ms(m["lat"], 0.99),
        class_counts=dict(m["classes"]),
        labelled=m["labelled"],
        accuracy=min(m["correct"], m["labelled"]) / m["labelled"] if m["labelled"] else None,
        online=dev is not None and is_online(dev, now, stale),
        last_seen=None if dev is None else dev.last_seen,
        state="unknown" if dev is None else dev.state,
    )


def version_totals(registry: Registry) -> dict[str, dict[str, int]]:
    """Lifetime ``{model key: {count, errors, rows, devices}}`` over the fleet."""
    q = select(
        InferenceTotalRow.model,
        func.sum(InferenceTotalRow.count),
        func.sum(InferenceTotalRow.errors),
        func.sum(InferenceTotalRow.rows),
        func.count(),
    ).group_by(InferenceTotalRow.model)
    with registry.session() as s:
        return {
            m: {"count": int(c or 0), "errors": int(e or 0), "rows": int(r or 0), "devices": n}
            for m, c, e, r, n in s.execute(q)
        }


def presence(
    registry: Registry, now: int, stale_after: int = STALE_AFTER
) -> dict[str, bool]:
    """Every enrolled, unrevoked device: online or not."""
    return {
        d.device_id: is_online(d, now, stale_after) for d in registry.devices() if not d.revoked
    }


def version_counts(registry: Registry) -> dict[str, int]:
    """Unrevoked devices per running ``name@version`` (``-`` for none)."""
    counts: dict[str, int] = {}
    for d in registry.devices():
        if d.revoked:
            continue
        key = "-" if d.active_name is None else f"{d.active_name}@{d.active_version}"
        counts[key] = counts.get(key, 0) + 1
    return counts
