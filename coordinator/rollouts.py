"""The rollout service: runs the pure controller (``coordinator.rollout``) on a tick and carries
out its decisions through ``coordinator.release``.

Each ``tick`` reads the rollout's spec and state from the registry, the fleet rows and the
telemetry evidence, asks ``rollout.decide`` and then:

- start/promote: puts the wave's devices in a group of their own (``rollout-<id>-w<k>``, so
  ``fleet status`` and ``group list`` show who is in which wave) and releases the candidate to
  exactly that group (one signed build, one retained offer per device);
- halt: releases, per previous version, that version again to the devices the rollout moved
  (``rollout-<id>-rb<n>``): a new signed release with a higher sequence pointing at the old
  content, so the devices' anti-rollback check keeps working;
- wait/done: stores the state when it changed.

Every state change is a compare-and-set on the row's ``revision``: two processes ticking the
same rollout never both act on one state. Release before record: a crash between the two
repeats the release on the next tick (harmless: the newer release is retained) rather than
losing it. Decisions are stored with their evidence; a ``wait`` only when its reason changed,
so a bake of hours does not write a row per tick.

Who ticks: ``edgefleet rollout start --follow`` / ``rollout run [ID]`` in the foreground (a
publishing link of its own), or anything holding a link (tests use the rig's service link).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgefleet.infra.link.port import Link
from edgefleet.protocol.errors import StoreError, TransportError
from sqlalchemy import select, update

from . import release as releases
from .home import Coordinator
from .registry import Registry
from .rollout import (
    Decision,
    DeviceRow,
    Evidence,
    Health,
    RolloutSpec,
    RolloutState,
    abort,
    decide,
    deployed,
    pause,
    request_rollback,
    resume,
    rolled_back,
)
from .tables.rollouts import RolloutDecisionRow, RolloutRow

__all__ = ["EvidenceSource", "Rollout", "RolloutStore", "Rollouts", "TelemetryEvidence",
           "fleet_rows"]  # fmt: skip

log = logging.getLogger(__name__)

OFFLINE_AFTER = 90.0  # s without a status or telemetry before a device counts as offline
BASELINE_WINDOW = 3600.0  # s before the rollout whose telemetry is the previous version's


@dataclass(frozen=True, kw_only=True)
class Rollout:
    id: int
    spec: RolloutSpec
    state: RolloutState
    revision: int
    created: int
    updated: int


class RolloutStore:
    """Rollouts and their decisions in the registry; every method is one transaction."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def create(self, spec: RolloutSpec, now: int) -> int:
        with self.registry.session() as s:
            row = RolloutRow(name=spec.name, version=spec.version, phase="pending",
                             spec=spec.to_dict(), state=RolloutState().to_dict(), revision=0,
                             created=now, updated=now)  # fmt: skip
            s.add(row)
            s.flush()
            return int(row.id)

    def get(self, rollout_id: int) -> Rollout:
        with self.registry.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise LookupError(f"rollout {rollout_id} does not exist")
            return _rollout(row)

    def all(self) -> list[Rollout]:
        with self.registry.session() as s:
            return [_rollout(r) for r in s.scalars(select(RolloutRow).order_by(RolloutRow.id))]

    def latest(self) -> Rollout:
        every = self.all()
        if not every:
            raise LookupError("no rollout yet (edgefleet rollout start …)")
        return every[-1]

    def save(self, r: Rollout, state: RolloutState, now: int, decision: Decision | None = None,
             sequences: Sequence[int] = ()) -> Rollout | None:  # fmt: skip
        """Store ``state`` (and the decision) if the row is still at ``r.revision``; the
        updated rollout, or None if another process changed it first."""
        with self.registry.session() as s:
            res = s.execute(update(RolloutRow)
                            .where(RolloutRow.id == r.id, RolloutRow.revision == r.revision)
                            .values(state=state.to_dict(), phase=state.phase,
                                    revision=r.revision + 1, updated=now))  # fmt: skip
            if not getattr(res, "rowcount", 0):
                return None
            if decision is not None:
                s.add(_decision_row(r.id, decision, now, sequences))
        return Rollout(id=r.id, spec=r.spec, state=state, revision=r.revision + 1,
                       created=r.created, updated=now)  # fmt: skip

    def record(self, rollout_id: int, decision: Decision, now: int,
               sequences: Sequence[int] = ()) -> None:  # fmt: skip
        with self.registry.session() as s:
            s.add(_decision_row(rollout_id, decision, now, sequences))

    def decisions(self, rollout_id: int) -> list[dict[str, Any]]:
        with self.registry.session() as s:
            q = (select(RolloutDecisionRow).where(RolloutDecisionRow.rollout_id == rollout_id)
                 .order_by(RolloutDecisionRow.id))  # fmt: skip
            return [{"at": d.at, "action": d.action, "wave": d.wave, "reason": d.reason,
                     "devices": d.devices, "evidence": d.evidence, "sequences": d.sequences}
                    for d in s.scalars(q)]  # fmt: skip

    def last_decision(self, rollout_id: int) -> tuple[str, str] | None:
        with self.registry.session() as s:
            q = (select(RolloutDecisionRow.action, RolloutDecisionRow.reason)
                 .where(RolloutDecisionRow.rollout_id == rollout_id)
                 .order_by(RolloutDecisionRow.id.desc()).limit(1))  # fmt: skip
            row = s.execute(q).first()
            return None if row is None else (row[0], row[1])


def _rollout(row: RolloutRow) -> Rollout:
    return Rollout(id=row.id, spec=RolloutSpec.from_dict(row.spec),
                   state=RolloutState.from_dict(row.state), revision=row.revision,
                   created=row.created, updated=row.updated)  # fmt: skip


def _decision_row(rollout_id: int, d: Decision, now: int,
                  sequences: Sequence[int]) -> RolloutDecisionRow:  # fmt: skip
    return RolloutDecisionRow(rollout_id=rollout_id, at=now, action=d.action, wave=d.wave,
                              reason=d.reason[:500], devices=list(d.devices),
                              evidence=d.evidence, sequences=list(sequences))  # fmt: skip


# -- adapters: registry rows and telemetry into the controller's input ---------------------------
def fleet_rows(registry: Registry, spec: RolloutSpec, now: float,
               offline_after: float = OFFLINE_AFTER) -> list[DeviceRow]:  # fmt: skip
    """Every enrolled, unrevoked device; ``online`` as ``telemetry.is_online`` has it: heard
    from within ``offline_after`` seconds and its last status is not the ``offline`` will."""
    from .telemetry import is_online

    groups = registry.groups()
    out = []
    for d in registry.devices():
        if d.revoked:
            continue
        last = d.last_result or {}
        failed = last.get("sequence") if last.get("ok") is False else None
        mine = d.active_name == spec.name
        out.append(DeviceRow(
            device_id=d.device_id,
            groups=tuple(g for g, members in groups.items() if d.device_id in members),
            online=is_online(d, int(now), int(offline_after)),
            version=d.active_version if mine else None,
            sequence=d.active_sequence if mine else None,
            failed_sequence=failed, failed_reason=str(last.get("reason", ""))[:200],
        ))  # fmt: skip
    return out


class EvidenceSource(Protocol):
    def __call__(self, registry: Registry, r: Rollout, now: float) -> Evidence: ...


class TelemetryEvidence:
    """Evidence from ``coordinator.telemetry``: the candidate on the wave's devices since its
    bake began (``inference`` windows merged, with the labels that flowed back since then:
    ``accuracy``; ``drift``: the newest window's PSI;
    ``shadow``: agreement over the windows where it was the shadow), and each previous
    version over ``BASELINE_WINDOW`` seconds before the rollout, on every device that ran it
    (a moved device's own baseline is its own previous version).

    The baseline is read once per wave and kept (``version_health`` decodes every row of its
    window: at fleet scale that is most of a step's cost, and the previous version's numbers
    before the wave do not change)."""

    def __init__(self, max_cached: int = 64) -> None:
        self._baselines: dict[tuple[int, int], dict[str, Health]] = {}
        self._max = max_cached

    def __call__(self, registry: Registry, r: Rollout, now: float) -> Evidence:
        from . import telemetry

        st, spec = r.state, r.spec
        if st.phase != "baking" or st.since is None:
            return Evidence()
        wave, since = list(st.wave_devices), int(st.since)
        healths = telemetry.version_health(registry, name=spec.name, version=spec.version,
                                           since=since, device_ids=wave, now=int(now))  # fmt: skip
        key = f"{spec.name}@{spec.version}"
        drift = _drift(telemetry.recent(registry, namespace="drift", since=since,
                                        device_ids=wave), key)  # fmt: skip
        agreement = _agreement(telemetry.recent(registry, namespace="shadow", since=int(
            r.created - BASELINE_WINDOW), device_ids=wave), key)  # fmt: skip
        candidate = {d: _health(h, drift=drift.get(d), agreement=agreement.get(d))
                     for d, h in healths.items()}  # fmt: skip
        return Evidence(candidate=candidate, baseline=self._baseline(registry, r, now))

    def _baseline(self, registry: Registry, r: Rollout, now: float) -> dict[str, Health]:
        from . import telemetry

        cached = self._baselines.get((r.id, r.state.wave))
        if cached is not None:
            return cached
        st, baseline = r.state, {}
        for version in sorted({v for v in st.previous.values() if v and v != r.spec.version}):
            before = telemetry.version_health(registry, name=r.spec.name, version=version,
                                              since=int(r.created - BASELINE_WINDOW),
                                              now=int(now))  # fmt: skip
            baseline.update({d: _health(h) for d, h in before.items()  # a moved one: its own
                             if h.count and st.previous.get(d, version) == version})  # fmt: skip
        if len(self._baselines) >= self._max:
            self._baselines.pop(next(iter(self._baselines)))
        self._baselines[r.id, r.state.wave] = baseline
        return baseline


def _health(h: Any, **extra: float | None) -> Health:
    return Health(count=h.count, errors=h.errors, p95_ms=h.p95_ms,
                  class_counts=dict(h.class_counts), labelled=h.labelled, accuracy=h.accuracy,
                  **extra)  # fmt: skip


def _number(v: object) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None  # type: ignore[arg-type]


def _drift(rows: list[tuple[str, int, dict[str, Any]]], key: str) -> dict[str, float]:
    """Each device's newest drift score for ``key`` (``drift.DeviceDrift.score``), read as the
    fleet's drift view and alerts read it (``drift.parse_report``; a drift report is the state
    of its window), from a window of at least ``drift.MIN_SAMPLES`` rows: the PSI of a
    smaller one is noise (no evidence yet)."""
    from .drift import MIN_SAMPLES, parse_report

    out = {}
    for device, t, payload in rows:  # oldest first: the newest wins
        r = parse_report(device, t, key, payload.get(key))
        if r is not None and r.n >= MIN_SAMPLES:
            out[device] = r.score
    return out


def _agreement(rows: list[tuple[str, int, dict[str, Any]]], key: str) -> dict[str, float]:
    """Each device's shadow agreement of ``key`` with its active model, over every window
    where the active model was another one (once ``key`` is active, a shadow of it compares
    it with itself: agreement 1, no evidence)."""
    agree: dict[str, list[float]] = {}
    for device, _, p in rows:
        compared, agreed = _number(p.get("compared")), _number(p.get("agree"))
        other = p.get("active") != key
        if p.get("candidate") == key and other and compared and agreed is not None:
            a = agree.setdefault(device, [0.0, 0.0])
            a[0], a[1] = a[0] + agreed, a[1] + compared
    return {d: a / n for d, (a, n) in agree.items() if n}


# -- the service ----------------------------------------------------------------------------------
class Rollouts:
    """Start, tick and steer rollouts; ``link`` publishes the releases."""

    def __init__(
        self,
        coordinator: Coordinator,
        link: Link | None,
        *,
        evidence: EvidenceSource | None = None,
        clock: Callable[[], float] = time.time,
        offline_after: float = OFFLINE_AFTER,
        publish_timeout: float = 30.0,
    ) -> None:
        self.coordinator, self.link = coordinator, link
        self.registry = coordinator.registry
        self.store = RolloutStore(self.registry)
        self.evidence: EvidenceSource = evidence or TelemetryEvidence()
        self.clock = clock
        self.offline_after, self.publish_timeout = offline_after, publish_timeout

    def start(self, spec: RolloutSpec) -> int:
        """Record a new rollout (checked: the model exists, the canary selects a device)."""
        self.registry.model(spec.name, spec.version)  # LookupError if not registered
        rows = fleet_rows(self.registry, spec, self.clock(), self.offline_after)
        first, _ = decide(spec, RolloutState(), rows, Evidence(), self.clock())
        if first.action != "start" or first.wave != 0:
            raise ValueError(f"canary {spec.canary} selects no online device")
        rollout_id = self.store.create(spec, int(self.clock()))
        log.info("rollout %d: %s %s, canary %s", rollout_id, spec.name, spec.version, spec.canary)
        return rollout_id

    def tick(self, rollout_id: int) -> Decision:
        """One controller step for the rollout, carried out; the decision made."""
        r = self.store.get(rollout_id)
        now = self.clock()
        rows = fleet_rows(self.registry, r.spec, now, self.offline_after)
        evidence = self.evidence(self.registry, r, now) if r.state.phase == "baking" else Evidence()
        d, state = decide(r.spec, r.state, rows, evidence, now)
        if d.action in ("start", "promote"):
            self._deploy(r, d, state, now)
        elif d.action == "halt":
            self._roll_back(r, d, state, now)
        elif state != r.state or self._new(r.id, d):
            self.store.save(r, state, int(now), d if d.action != "none" else None)
        return d

    def _new(self, rollout_id: int, d: Decision) -> bool:
        return d.action == "wait" and self.store.last_decision(rollout_id) != (d.action, d.reason)

    def _publishing_link(self) -> Link:
        if self.link is None:
            raise RuntimeError("this Rollouts has no link to publish releases on")
        return self.link

    def _deploy(self, r: Rollout, d: Decision, state: RolloutState, now: float) -> None:
        claimed = self.store.save(r, state, int(now))  # ours to carry out
        if claimed is None:
            return
        group = f"rollout-{r.id}-w{state.wave}"
        self.registry.add_to_group(group, list(d.devices))
        built, _ = releases.build(self.coordinator, r.spec.name, r.spec.version, f"group:{group}")
        releases.publish(self._publishing_link(), built, timeout=self.publish_timeout,
                         registry=self.registry)  # fmt: skip
        log.info("rollout %d: %s, release %d to %s", r.id, d.reason, built.sequence, group)
        self.store.save(claimed, deployed(state, built.sequence, now), int(now), d,
                        [built.sequence])  # fmt: skip

    def _roll_back(self, r: Rollout, d: Decision, state: RolloutState, now: float) -> None:
        claimed = self.store.save(r, state, int(now))
        if claimed is None:
            return
        by_version: dict[str, list[str]] = {}
        for device in d.devices:
            version = state.previous.get(device)
            if version:
                by_version.setdefault(version, []).append(device)
        sequences = []
        for n, (version, devices) in enumerate(sorted(by_version.items())):
            group = f"rollout-{r.id}-rb{n}"
            self.registry.add_to_group(group, devices)
            built, _ = releases.build(self.coordinator, r.spec.name, version, f"group:{group}")
            releases.publish(self._publishing_link(), built, timeout=self.publish_timeout,
                             registry=self.registry)  # fmt: skip
            sequences.append(built.sequence)
        log.warning("rollout %d halted: %s; rolled back with releases %s", r.id, d.reason,
                    sequences)  # fmt: skip
        unmoved = sorted(set(d.devices) - {x for ds in by_version.values() for x in ds})
        evidence = {**d.evidence, "rollback": {v: ds for v, ds in by_version.items()}}
        if unmoved:
            evidence["no_previous_version"] = unmoved
        recorded = Decision(action=d.action, wave=d.wave, devices=d.devices, reason=d.reason,
                            evidence=evidence)  # fmt: skip
        self.store.save(claimed, rolled_back(state), int(now), recorded, sequences)

    # -- operator actions ------------------------------------------------------------------
    def _operate(self, rollout_id: int, change: Callable[[RolloutState], RolloutState],
                 what: str) -> Rollout:  # fmt: skip
        r = self.store.get(rollout_id)
        state = change(r.state)
        record = Decision(action=what, wave=r.state.wave, reason=f"{what} by the operator")
        saved = self.store.save(r, state, int(self.clock()), record)
        if saved is None:
            raise ValueError(f"rollout {rollout_id} changed meanwhile; try again")
        return saved

    def pause(self, rollout_id: int) -> Rollout:
        return self._operate(rollout_id, pause, "pause")

    def resume(self, rollout_id: int) -> Rollout:
        return self._operate(rollout_id, resume, "resume")

    def abort(self, rollout_id: int) -> Rollout:
        return self._operate(rollout_id, abort, "abort")

    def rollback(self, rollout_id: int) -> Decision:
        """Roll back every device the rollout moved, now (also after it is done)."""
        self._operate(rollout_id, lambda s: request_rollback(s, "rollback by the operator"),
                      "rollback")  # fmt: skip
        return self.tick(rollout_id)

    # -- running -----------------------------------------------------------------------------
    def follow(
        self,
        rollout_id: int,
        *,
        interval: float = 2.0,
        stop: threading.Event | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> Rollout:
        """Tick every ``interval`` seconds until the rollout is final (or ``stop`` is set). A
        step the broker or the registry failed is logged and retried: the state only moves on
        after its releases are published, so nothing is skipped."""
        stop = stop or threading.Event()
        while True:
            try:
                d: Decision | None = self.tick(rollout_id)
            except (TransportError, StoreError) as exc:  # the broker or the registry: retried
                log.warning("rollout %d: step failed, retrying in %g s: %s", rollout_id,
                            interval, exc)  # fmt: skip
                d = None
            if d is not None and on_decision is not None:
                on_decision(d)
            r = self.store.get(rollout_id)
            if r.state.final or stop.wait(interval):
                return r

    def run_all(self, *, interval: float = 2.0, stop: threading.Event) -> None:
        """Tick every rollout that is not final, until ``stop`` is set."""
        while not stop.is_set():
            for r in self.store.all():
                if not r.state.final:
                    try:
                        self.tick(r.id)
                    except Exception:  # one rollout's trouble must not stop the others
                        log.exception("rollout %d: tick failed", r.id)
            stop.wait(interval)
