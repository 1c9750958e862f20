"""Read-only views of the registry as plain JSON-able dicts (the API's GET routes)."""

from __future__ import annotations

from typing import Any

from edgefleet.coordinator.registry import ModelVersion, Registry, Release, ReleaseTarget
from edgefleet.coordinator.tables.console import AuditEntry
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

__all__ = ["audit_row", "fl_runs", "models", "releases", "rollouts"]

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
