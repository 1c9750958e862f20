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
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
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
) -> list[DriftAlertRow]:
    """Record an alert for each device and version drifting now without an open alert; the
    new alerts (detached rows)."""
    now = int(time.time()) if now is None else now
    drifting = [r for r in latest(registry, since=now - window, name=name)
                if r.n >= min_samples and r.score > threshold]  # fmt: skip
    if not drifting:
        return []
    new = []
    with registry.session() as s:
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
