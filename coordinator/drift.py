"""Fleet drift: the devices' ``drift`` telemetry per device, version and group, and alerts.

Devices report, per model key ``name@version``, the summary of their recent window
(``agent.drift``: ``n``, ``psi`` and ``ks`` per feature, ``max_psi``, ``output_psi``). Reports
are untrusted: ``parse_report`` checks every field and bound and drops what does not pass.
``latest(registry, since=...)`` reads each device's newest ``drift`` message (one row per
device); a device's drift ``score`` is ``max(max_psi, output_psi)``.

``view(reports, groups, threshold=..., min_samples=...)`` aggregates them per version, per
group (and version) and per device: devices reporting, how many drift (score above the
threshold on at least ``min_samples`` samples), the highest and median score, and the features
that drift on most devices. ``check(registry, ...)`` records an alert (``drift_alerts``) for
every device and version drifting now that has no open alert yet; the alert names the device,
the version, the drifted features with their PSI and KS, and the samples. A retraining run
marks the alerts it takes as handled (``mark_handled``).

``DriftWatch`` is how ``coordinator serve`` raises the same alerts as drift telemetry arrives:
the ingest worker notes the devices whose ``drift`` rows it stored, and at most every
``every`` seconds ``check`` runs over those devices only (one row read per device), so the
cost follows what arrived, not the fleet's size or history.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.protocol._fields import NAME_RE
from sqlalchemy import func, select

from .registry import Registry
from .tables.drift import DriftAlertRow
from .tables.telemetry import TelemetryRow

__all__ = [
    "DEFAULT_THRESHOLD",
    "MIN_SAMPLES",
    "NAMESPACE",
    "WINDOW",
    "Aggregate",
    "DeviceDrift",
    "DriftWatch",
    "alerts",
    "check",
    "latest",
    "mark_handled",
    "parse_report",
    "view",
]

NAMESPACE = "drift"
DEFAULT_THRESHOLD = 0.2  # PSI: above 0.2 is the usual "significant shift"
MIN_SAMPLES = 500  # rows in a device's window before its drift counts: max PSI over the 64
# digits features without drift is above 0.2 in 93 % of 100-row windows, 1 % at 300, 0 at 500
WINDOW = 3600  # s: reports older than this are not looked at
MAX_FEATURES = 1024
TOP = 5  # features named per device / alert
_CHECKING = threading.Lock()  # one check's read of the open alerts and its inserts at a time


@dataclass(frozen=True, kw_only=True)
class DeviceDrift:
    device_id: str
    name: str
    version: str
    time: int  # unix s (the device's, clamped by ingest)
    n: float
    max_psi: float
    max_ks: float
    output_psi: float | None
    features: tuple[tuple[int, float, float], ...]  # (index, psi, ks), highest PSI first

    @property
    def score(self) -> float:
        return max(self.max_psi, self.output_psi or 0.0)

    def top(self, threshold: float, k: int = TOP) -> list[list[float]]:
        """Up to ``k`` features whose PSI is above ``threshold``: ``[index, psi, ks]``."""
        return [[i, p, s] for i, p, s in self.features[:k] if p > threshold]


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def parse_report(device_id: str, t: int, key: object, report: object) -> DeviceDrift | None:
    """One model's drift summary from a device, or None if any part is malformed."""
    if not isinstance(key, str) or not isinstance(report, Mapping) or key.count("@") != 1:
        return None
    name, version = key.split("@")
    if not (NAME_RE.fullmatch(name) and NAME_RE.fullmatch(version)):
        return None
    n, psi, ks = _num(report.get("n")), report.get("psi"), report.get("ks")
    if n is None or not isinstance(psi, list) or not isinstance(ks, list):
        return None
    if not 0 < len(psi) == len(ks) <= MAX_FEATURES:
        return None
    values = [(_num(p), _num(s)) for p, s in zip(psi, ks, strict=True)]
    if any(p is None or s is None for p, s in values):
        return None
    index = report.get("features", list(range(len(psi))))
    if not isinstance(index, list) or len(index) != len(psi) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 20 for i in index
    ):
        return None
    out = report.get("output_psi")
    out_psi = None if out is None else _num(out)
    if out is not None and out_psi is None:
        return None
    feats = sorted(((int(i), float(p or 0), float(s or 0)) for i, (p, s) in zip(index, values,
                   strict=True)), key=lambda f: (-f[1], f[0]))  # fmt: skip
    return DeviceDrift(device_id=device_id, name=name, version=version, time=int(t), n=n,
                       max_psi=feats[0][1], max_ks=max(f[2] for f in feats),
                       output_psi=out_psi, features=tuple(feats))  # fmt: skip


def latest(
    registry: Registry,
    *,
    since: int,
    name: str | None = None,
    device_ids: Collection[str] | None = None,
) -> list[DeviceDrift]:
    """The reports in each device's newest ``drift`` message since ``since`` (one message
    holds every model the device fed since its previous one), by device then model key. One
    row per device is read, whatever the history kept."""
    newest: dict[tuple[str, str, str], DeviceDrift] = {}
    last = select(func.max(TelemetryRow.id)).where(
        TelemetryRow.namespace == NAMESPACE, TelemetryRow.time >= since)
    if device_ids is not None:
        last = last.where(TelemetryRow.device_id.in_(list(device_ids)))
    q = select(TelemetryRow.device_id, TelemetryRow.time, TelemetryRow.payload).where(
        TelemetryRow.id.in_(last.group_by(TelemetryRow.device_id).scalar_subquery()))
    with registry.session() as s:
        rows = [(d, int(t), p) for d, t, p in s.execute(q)]
    for device_id, t, payload in rows:
        if not isinstance(payload, Mapping):
            continue
        for key, report in payload.items():
            d = parse_report(device_id, t, key, report)
            if d is None or (name is not None and d.name != name):
                continue
            newest[(d.device_id, d.name, d.version)] = d
    return [newest[k] for k in sorted(newest)]


@dataclass(frozen=True, kw_only=True)
class Aggregate:
    scope: str  # "version" | "group" | "device"
    key: str  # name@version, group:G name@version, or the device id
    name: str
    version: str
    devices: int  # reporting with enough samples
    drifting: int
    max_score: float
    median_score: float
    samples: float
    features: tuple[tuple[int, int], ...] = field(default=())  # (index, devices drifting on it)

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "key": self.key, "name": self.name,
                "version": self.version, "devices": self.devices, "drifting": self.drifting,
                "max_score": self.max_score, "median_score": self.median_score,
                "samples": self.samples, "features": [list(f) for f in self.features]}  # fmt: skip


def _aggregate(scope: str, key: str, rows: list[DeviceDrift], threshold: float) -> Aggregate:
    scores = [r.score for r in rows]
    counts: Counter[int] = Counter(int(f[0]) for r in rows for f in r.top(threshold))
    return Aggregate(scope=scope, key=key, name=rows[0].name, version=rows[0].version,
                     devices=len(rows), drifting=sum(s > threshold for s in scores),
                     max_score=max(scores), median_score=statistics.median(scores),
                     samples=sum(r.n for r in rows),
                     features=tuple(counts.most_common(TOP)))  # fmt: skip


def view(
    reports: Iterable[DeviceDrift],
    groups: Mapping[str, list[str]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_samples: float = MIN_SAMPLES,
) -> list[Aggregate]:
    """Per version, per group and version, and per device (reports under ``min_samples``
    are left out: too few rows for their PSI to mean anything)."""
    rows = [r for r in reports if r.n >= min_samples]
    by_version: dict[tuple[str, str], list[DeviceDrift]] = {}
    for r in rows:
        by_version.setdefault((r.name, r.version), []).append(r)
    out = [_aggregate("version", f"{n}@{v}", rs, threshold)
           for (n, v), rs in sorted(by_version.items())]  # fmt: skip
    for group, members in sorted(groups.items()):
        inside = set(members)
        for (n, v), rs in sorted(by_version.items()):
            mine = [r for r in rs if r.device_id in inside]
            if mine:
                out.append(_aggregate("group", f"{group} {n}@{v}", mine, threshold))
    out += [_aggregate("device", r.device_id, [r], threshold) for r in rows]
    return out


def check(
    registry: Registry,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_samples: float = MIN_SAMPLES,
    name: str | None = None,
    now: int | None = None,
    window: int = WINDOW,
    device_ids: Collection[str] | None = None,
) -> list[DriftAlertRow]:
    """Record an alert for each device (of ``device_ids``; None: all) and version drifting
    now without an open alert; the new alerts (detached rows)."""
    now = int(time.time()) if now is None else now
    drifting = [r for r in latest(registry, since=now - window, name=name, device_ids=device_ids)
                if r.n >= min_samples and r.score > threshold]  # fmt: skip
    if not drifting:
        return []
    new = []
    # serve's DriftWatch and a retraining trigger may check at once in one process: without
    # the lock both would see no open alert and record the same one twice
    with _CHECKING, registry.session() as s:
        open_ = {(a.device_id, a.name, a.version) for a in s.scalars(
            select(DriftAlertRow).where(DriftAlertRow.state == "open"))}  # fmt: skip
        for r in drifting:
            if (r.device_id, r.name, r.version) in open_:
                continue
            row = DriftAlertRow(created=now, device_id=r.device_id, name=r.name,
                                version=r.version, score=r.score, threshold=threshold,
                                samples=r.n, output_psi=r.output_psi,
                                features=r.top(threshold), state="open", run_id=None)  # fmt: skip
            s.add(row)
            new.append(row)
        s.flush()
        s.expunge_all()
    return new


def alerts(registry: Registry, *, state: str | None = None, name: str | None = None
           ) -> list[DriftAlertRow]:  # fmt: skip
    """Recorded alerts, oldest first."""
    q = select(DriftAlertRow).order_by(DriftAlertRow.id)
    if state is not None:
        q = q.where(DriftAlertRow.state == state)
    if name is not None:
        q = q.where(DriftAlertRow.name == name)
    with registry.session() as s:
        rows = list(s.scalars(q))
        s.expunge_all()
    return rows


def mark_handled(registry: Registry, ids: Iterable[int], run_id: str) -> int:
    """Alerts ``ids`` taken by retraining run ``run_id``; how many were still open."""
    done = 0
    with registry.session() as s:
        for row in s.scalars(select(DriftAlertRow).where(DriftAlertRow.id.in_(list(ids)),
                                                         DriftAlertRow.state == "open")):
            row.state, row.run_id = "handled", run_id[:128]
            done += 1
    return done


class DriftWatch:
    """Alerts raised as drift telemetry arrives (``coordinator serve``): ``note`` the devices
    whose drift was stored; ``run`` checks them once ``every`` seconds have passed since the
    last check. At most ``max_pending`` devices wait (a larger fleet reporting in one interval
    is checked whole, as ``fleet drift`` does)."""

    def __init__(
        self,
        registry: Registry,
        *,
        every: float = 10.0,  # s between checks, at most one per interval
        threshold: float = DEFAULT_THRESHOLD,
        min_samples: float = MIN_SAMPLES,
        max_pending: int = 10_000,  # devices
        clock: Callable[[], float] = time.time,  # unix s: the alerts' time
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not every > 0 or not threshold > 0 or max_pending < 1:
            raise ValueError(f"DriftWatch: every and threshold must be > 0 and max_pending "
                             f">= 1, got {every}, {threshold}, {max_pending}")  # fmt: skip
        self.registry, self.every = registry, every
        self.threshold, self.min_samples, self.max_pending = threshold, min_samples, max_pending
        self._clock, self._monotonic = clock, monotonic
        self._pending: set[str] = set()
        self._everyone = False  # more than max_pending noted: check them all
        self._next = 0.0
        self.raised = 0  # alerts recorded so far
        self.checks = 0

    def note(self, device_ids: Iterable[str]) -> None:
        if self._everyone:
            return
        self._pending.update(device_ids)
        if len(self._pending) > self.max_pending:
            self._pending.clear()
            self._everyone = True

    def wait(self) -> float | None:
        """Seconds until a check is due (0: now); None when nothing waits."""
        if not (self._pending or self._everyone):
            return None
        return max(0.0, self._next - self._monotonic())

    def run(self) -> list[DriftAlertRow]:
        """Check what was noted if a check is due; the new alerts."""
        if self.wait() != 0.0:
            return []
        ids = None if self._everyone else sorted(self._pending)
        self._pending, self._everyone = set(), False
        self._next = self._monotonic() + self.every
        self.checks += 1
        try:
            new = check(self.registry, threshold=self.threshold, min_samples=self.min_samples,
                        now=int(self._clock()), device_ids=ids)  # fmt: skip
        except Exception:  # a locked registry, say: these devices wait for the next check
            if ids is None:
                self._everyone = True
            else:
                self.note(ids)
            raise
        self.raised += len(new)
        return new
