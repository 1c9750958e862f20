"""Read-only views of the registry as plain JSON-able dicts (the API's GET routes), and the
*generations* of the polled ones: one cheap query whose value changes whenever the view would
(``console/cache.py`` serves a cached body while it stays the same)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from edgefleet.coordinator import fleet
from edgefleet.coordinator.registry import (
    Device,
    ModelVersion,
    Registry,
    Release,
    ReleaseTarget,
    group_members,
)
from edgefleet.coordinator.tables.console import AuditEntry
from edgefleet.coordinator.tables.rollouts import RolloutDecisionRow, RolloutRow
from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import selectinload
from sqlalchemy.sql.elements import ColumnElement

__all__ = [
    "audit_row", "devices", "drift", "fl_runs", "fl_versions", "fleet_generation", "models",
    "models_generation", "releases", "releases_generation", "rollouts", "rollouts_generation",
    "telemetry",
]  # fmt: skip

MAX_ROWS = 5000  # newest rows of a list view


def devices(registry: Registry, now: int) -> dict[str, Any]:
    """``fleet status --json``'s rows (with ``in_sync``) as of ``now``, which the body names
    (``as_of``): ``last_seen_s`` counts to it, so the body stays the same while the fleet does
    (a client adds the time since ``as_of``)."""
    rows = fleet.rows(registry, now)
    return {"as_of": now, "devices": [r.to_dict() | {"in_sync": r.in_sync} for r in rows]}


def _joined(*columns: Any, order: Any) -> Any:
    """Every row's columns as one string, joined by the database (no row objects made): unit
    separators between columns, record separators between rows (neither can be in a value:
    ids and names are checked names, states an enum, ``last_result`` JSON text), NULL as ''
    (no checked name is empty)."""
    texts = [func.coalesce(cast(c, String), "") for c in columns]
    row: ColumnElement[str] = texts[0]
    for text in texts[1:]:
        row = row + "\x1f" + text
    rows = select(row.label("row")).order_by(*order).subquery()
    return select(func.aggregate_strings(rows.c.row, "\x1e")).scalar_subquery()


def _one(value: Any, table: Any = None) -> Any:
    """``value`` (an aggregate) as a scalar subquery, over ``table`` if it names no column."""
    q = select(value)
    return (q if table is None else q.select_from(table)).scalar_subquery()


def _digest(*values: Any) -> str:
    return hashlib.sha256(repr(values).encode()).hexdigest()


_d, _g, _r, _rd = Device, group_members.c, RolloutRow, RolloutDecisionRow
# built once: making these statements costs more than running them on a small fleet
_FLEET_GENERATION = select(
    _joined(_d.device_id, _d.state, _d.active_name, _d.active_version, _d.active_sequence,
            _d.last_seen, _d.last_result, _d.revoked, order=[_d.device_id]),
    _joined(_g.group_name, _g.device_id, order=[_g.group_name, _g.device_id]),
    _one(func.count(), ReleaseTarget), _one(func.max(ReleaseTarget.sequence)),
)  # fmt: skip
_MODELS_GENERATION = select(_one(func.count(), ModelVersion), _one(func.max(ModelVersion.id)))
_RELEASES_GENERATION = select(_one(func.count(), Release), _one(func.max(Release.sequence)),
                              _one(func.count(), ReleaseTarget))  # fmt: skip
_ROLLOUTS_GENERATION = select(_one(func.count(), _r), _one(func.sum(_r.revision)),
                              _one(func.count(), _rd), _one(func.max(_rd.id)))  # fmt: skip


def _generation(registry: Registry, statement: Any) -> tuple[Any, ...]:
    with registry.session() as s:
        return tuple(s.execute(statement).one())


def fleet_generation(registry: Registry) -> str:
    """Changes whenever ``fleet.rows`` would (but for the clock): a digest of every device's
    columns that a row shows and of the group memberships (all of them, joined by the
    database: a status that changes only the state, as an offline will does, changes it too),
    and the count and newest sequence of release targets (only ever added). One SELECT."""
    return _digest(*_generation(registry, _FLEET_GENERATION))


def models_generation(registry: Registry) -> tuple[Any, ...]:
    """Of ``models`` and ``fl_runs``: model versions are only ever added (never changed)."""
    return _generation(registry, _MODELS_GENERATION)


def releases_generation(registry: Registry) -> tuple[Any, ...]:
    """Of ``releases``: releases and their targets are only ever added."""
    return _generation(registry, _RELEASES_GENERATION)


def rollouts_generation(registry: Registry) -> tuple[Any, ...]:
    """Of ``rollouts``: every state change bumps its rollout's revision; decisions are only
    ever added."""
    return _generation(registry, _ROLLOUTS_GENERATION)


def _version(mv: ModelVersion) -> dict[str, Any]:
    fl = mv.lineage.get("fl") or {}
    return {
        "name": mv.name,
        "version": mv.version,
        "format": mv.format,
        "size": mv.size,
        "created": mv.created,
        "metrics": mv.metrics,
        "parent": mv.lineage.get("parent"),
        "fl_run": fl.get("run_id"),
        "fl_round": fl.get("round"),
    }


def _newest(registry: Registry) -> list[ModelVersion]:
    """The newest ``MAX_ROWS`` model versions, oldest first."""
    with registry.session() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.id.desc()).limit(MAX_ROWS))
        return list(reversed(list(rows)))


def models(registry: Registry) -> list[dict[str, Any]]:
    """Every model version with its lineage summary (parent, FL run and round), oldest first."""
    return [_version(mv) for mv in _newest(registry)]


def releases(registry: Registry) -> list[dict[str, Any]]:
    with registry.session() as s:
        per = select(ReleaseTarget.sequence, func.count()).group_by(ReleaseTarget.sequence)
        counts = {int(seq): int(n) for seq, n in s.execute(per).all()}
        rows = s.scalars(
            select(Release).options(selectinload(Release.model))
            .order_by(Release.sequence.desc()).limit(MAX_ROWS)
        )  # fmt: skip
        return [
            {
                "sequence": r.sequence,
                "name": r.model.name,
                "version": r.model.version,
                "selector": r.selector,
                "created": r.created,
                "targets": counts.get(r.sequence, 0),
            }
            for r in rows
        ]


def fl_versions(versions: Iterable[ModelVersion]) -> dict[str, list[ModelVersion]]:
    """FL run id -> the versions it registered, by round; runs in the order of their first
    version in ``versions`` (what ``fl runs|status`` and the API's FL view group)."""
    runs: dict[str, list[ModelVersion]] = {}
    for mv in versions:
        run_id = (mv.lineage.get("fl") or {}).get("run_id")
        if run_id:
            runs.setdefault(run_id, []).append(mv)
    for run in runs.values():
        run.sort(key=lambda mv: int(mv.lineage["fl"].get("round") or 0))
    return runs


def fl_runs(registry: Registry) -> list[dict[str, Any]]:
    """FL runs from the versions they registered: each run's rounds as a chain."""
    return [
        {"run_id": run_id, "name": versions[0].name, "rounds": [_round(mv) for mv in versions]}
        for run_id, versions in fl_versions(_newest(registry)).items()
    ]


def _round(mv: ModelVersion) -> dict[str, Any]:
    fl = mv.lineage["fl"]
    return {
        "round": fl.get("round"), "version": mv.version, "parent": mv.lineage.get("parent"),
        "strategy": (fl.get("strategy") or {}).get("name"),
        "contributors": len(fl.get("contributors") or []),
        "accuracy": _accuracy(fl.get("metrics") or {}),
        "epsilon": (fl.get("dp") or {}).get("epsilon"),
    }  # fmt: skip


def _accuracy(metrics: dict[str, Any]) -> float | None:
    for part in ("central", "eval"):
        value = (metrics.get(part) or {}).get("accuracy")
        if isinstance(value, int | float):
            return float(value)
    return None


def audit_row(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id, "time": e.time, "actor": e.actor, "role": e.role, "action": e.action,
        "target": e.target, "source": e.source, "result": e.result, "detail": e.detail,
    }  # fmt: skip


def rollouts(registry: Registry) -> list[dict[str, Any]]:
    """Every rollout with its spec, state and recorded decisions (with their evidence)."""
    from edgefleet.coordinator.rollouts import RolloutStore

    store = RolloutStore(registry)
    return [
        {"id": r.id, "spec": r.spec.to_dict(), "state": r.state.to_dict(), "created": r.created,
         "updated": r.updated, "decisions": store.decisions(r.id)[-200:]}
        for r in store.all()[-MAX_ROWS:]
    ]  # fmt: skip


def telemetry(registry: Registry, *, since: int, now: int, points: int = 30) -> dict[str, Any]:
    """Per model version, the fleet's inference telemetry since ``since`` in ``points`` time
    buckets: calls, error rate and latency p50/p95/p99 (from the merged histograms)."""
    from edgefleet.coordinator import telemetry as tm

    width = max(1, (now - since) // points)
    buckets: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for _, t, payload in tm.recent(registry, namespace=tm.INFERENCE, since=since):
        for key, window in payload.items():
            if isinstance(window, dict):
                slot = since + (t - since) // width * width
                buckets.setdefault(str(key), {}).setdefault(slot, []).append(window)
    out: dict[str, list[dict[str, Any]]] = {}
    for key, slots in sorted(buckets.items()):
        series = []
        for slot, windows in sorted(slots.items()):
            m = tm.merge_inference(windows)
            series.append({
                "time": slot, "count": m["count"],
                "error_rate": m["errors"] / m["count"] if m["count"] else 0.0,
                "p50_ms": tm.quantile_ms(m["lat"], 0.50), "p95_ms": tm.quantile_ms(m["lat"], 0.95),
                "p99_ms": tm.quantile_ms(m["lat"], 0.99),
            })  # fmt: skip
        out[key] = series
    return {"since": since, "bucket_s": width, "versions": out,
            "totals": tm.version_totals(registry)}  # fmt: skip


def drift(registry: Registry, *, since: int) -> dict[str, Any]:
    """Fleet drift per version, group and device, each version's highest PSI per feature,
    and the recorded alerts."""
    from edgefleet.coordinator import drift as dr

    reports = dr.latest(registry, since=since)
    per_feature: dict[str, dict[int, float]] = {}
    for r in reports:
        mine = per_feature.setdefault(f"{r.name}@{r.version}", {})
        for index, psi, _ks in r.features:
            mine[int(index)] = max(mine.get(int(index), 0.0), float(psi))
    return {
        "aggregates": [a.to_dict() for a in dr.view(reports, registry.groups())],
        "features": {k: sorted(v.items()) for k, v in sorted(per_feature.items())},
        "alerts": [{"id": a.id, "created": a.created, "device": a.device_id, "name": a.name,
                    "version": a.version, "score": a.score, "features": a.features,
                    "state": a.state, "run_id": a.run_id}
                   for a in dr.alerts(registry)[-MAX_ROWS:]],
    }  # fmt: skip
