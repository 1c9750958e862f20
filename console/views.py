"""Read-only views of the registry as plain JSON-able dicts (the API's GET routes)."""

from __future__ import annotations

from typing import Any

from edgefleet.coordinator.registry import ModelVersion, Registry, Release, ReleaseTarget
from edgefleet.coordinator.tables.console import AuditEntry
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

__all__ = ["audit_row", "drift", "fl_runs", "models", "releases", "rollouts", "telemetry"]

MAX_ROWS = 5000  # newest rows of a list view


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


def fl_runs(registry: Registry) -> list[dict[str, Any]]:
    """FL runs from the versions they registered: each run's rounds as a chain."""
    runs: dict[str, dict[str, Any]] = {}
    for mv in _newest(registry):
        fl = mv.lineage.get("fl") or {}
        run_id = fl.get("run_id")
        if not run_id:
            continue
        run = runs.setdefault(run_id, {"run_id": run_id, "name": mv.name, "rounds": []})
        run["rounds"].append({
            "round": fl.get("round"), "version": mv.version, "parent": mv.lineage.get("parent"),
            "strategy": (fl.get("strategy") or {}).get("name"),
            "contributors": len(fl.get("contributors") or []),
            "accuracy": _accuracy(fl.get("metrics") or {}),
            "epsilon": (fl.get("dp") or {}).get("epsilon"),
        })  # fmt: skip
    for run in runs.values():
        run["rounds"].sort(key=lambda r: r["round"] or 0)
    return list(runs.values())


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
