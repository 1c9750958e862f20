"""Fleet views over the registry: one row per device, and "wait until these devices run N".

``rows`` is what ``edgefleet fleet status`` prints (and the HTTP API will serve): what each
device reports running (*actual*) beside the newest release that targets it (*desired*), and
the shadow / A/B candidate it reports serving beside it (kept with the download progress in
the device's ``last_result``). ``wait_for`` polls the registry (which the service's ingest
keeps current) until every target reports a sequence at least N (with ``candidate=True``: a
candidate of sequence at least N); clock and sleep are injected, so tests need no time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from .registry import Device, ModelVersion, Registry, Release, ReleaseTarget

__all__ = [
    "FleetRow",
    "TargetState",
    "WaitResult",
    "latest_targets",
    "rows",
    "targets_state",
    "wait_for",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FleetRow:
    device: str
    groups: tuple[str, ...]
    state: str
    model: str | None  # actual: what the device reports running
    version: str | None
    sequence: int | None
    last_seen_s: int | None  # seconds since the last status or telemetry; None = never
    last_result: str | None  # "ok" or "<code>: <reason>"
    desired_sequence: int | None  # desired: the newest release that targets the device
    desired_version: str | None
    revoked: bool
    #: the candidate it reports serving: {name, version, sequence, bundle_id, mode}
    candidate: dict[str, Any] | None = None

    @property
    def in_sync(self) -> bool:
        """The device runs its newest release (or no release targets it yet)."""
        return self.desired_sequence is None or self.sequence == self.desired_sequence

    def to_dict(self) -> dict[str, Any]:
        """The ``fleet status --json`` form (the original keys first, in their order;
        ``candidate`` only when the device serves one)."""
        return {
            "device": self.device,
            "groups": list(self.groups),
            "state": self.state,
            "model": self.model,
            "version": self.version,
            "sequence": self.sequence,
            "last_seen_s": self.last_seen_s,
            "last_result": self.last_result,
            "desired_sequence": self.desired_sequence,
            "desired_version": self.desired_version,
            "revoked": self.revoked,
        } | ({"candidate": self.candidate} if self.candidate else {})


def _result_text(last: dict[str, Any]) -> str | None:
    if "ok" not in last:  # no install reported yet (only download progress, if any)
        return None
    if last["ok"]:
        return "ok"
    return f"{last.get('code') or 'failed'}: {str(last.get('reason', ''))[:60]}"


def latest_targets(registry: Registry) -> dict[str, tuple[int, str]]:
    """Each device's newest release: ``device id -> (sequence, model version)``."""
    newest = (
        select(ReleaseTarget.device_id, func.max(ReleaseTarget.sequence).label("seq"))
        .group_by(ReleaseTarget.device_id)
        .subquery()
    )
    q = (
        select(newest.c.device_id, newest.c.seq, ModelVersion.version)
        .join(Release, Release.sequence == newest.c.seq)
        .join(ModelVersion, ModelVersion.id == Release.model_id)
    )
    with registry.session() as s:
        return {d: (int(seq), version) for d, seq, version in s.execute(q)}


def rows(registry: Registry, now: int) -> list[FleetRow]:
    """Every enrolled device, by id; ``now`` in unix seconds."""
    of: dict[str, list[str]] = {}  # device id -> its groups, by name
    for g, members in registry.groups().items():
        for m in members:
            of.setdefault(m, []).append(g)
    desired = latest_targets(registry)
    out = []
    for d in registry.devices():
        want = desired.get(d.device_id)
        out.append(
            FleetRow(
                device=d.device_id,
                groups=tuple(of.get(d.device_id, ())),
                state=d.state,
                model=d.active_name,
                version=d.active_version,
                sequence=d.active_sequence,
                # never negative: a clock ahead of ``now`` (another host's) reads as 0
                last_seen_s=None if d.last_seen is None else max(0, now - d.last_seen),
                last_result=_result_text(d.last_result or {}),
                desired_sequence=None if want is None else want[0],
                desired_version=None if want is None else want[1],
                revoked=d.revoked,
                candidate=_candidate(d),
            )
        )
    return out


def _candidate(d: Device) -> dict[str, Any] | None:
    """The candidate ``d`` last reported serving (ingest keeps it in ``last_result``)."""
    c = (d.last_result or {}).get("candidate")
    return c if isinstance(c, dict) else None


@dataclass(frozen=True, kw_only=True)
class TargetState:
    """One target of a wait, as the registry last heard from it."""

    device_id: str
    state: str  # "unknown" if the device is not enrolled
    sequence: int | None  # what it runs (a candidate wait: the candidate it serves)
    version: str | None
    done: int | None  # download progress (bytes) of what it fetches now, if it reported any
    total: int | None
    arrived: bool  # runs the awaited sequence or a newer one


@dataclass(frozen=True, kw_only=True)
class WaitResult:
    sequence: int
    arrived: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.pending


def _state(device_id: str, d: Device | None, sequence: int, candidate: bool) -> TargetState:
    if d is None:
        return TargetState(
            device_id=device_id,
            state="unknown",
            sequence=None,
            version=None,
            done=None,
            total=None,
            arrived=False,
        )
    progress = (d.last_result or {}).get("progress") or {}
    running, version = d.active_sequence, d.active_version
    if candidate:
        c = _candidate(d) or {}
        running, version = c.get("sequence"), c.get("version")
    return TargetState(
        device_id=device_id,
        state=d.state,
        sequence=running,
        version=version,
        done=progress.get("done"),
        total=progress.get("total"),
        arrived=(running or 0) >= sequence,
    )


def targets_state(
    registry: Registry, sequence: int, targets: Iterable[str], *, candidate: bool = False
) -> list[TargetState]:
    devices = {d.device_id: d for d in registry.devices()}
    return [_state(t, devices.get(t), sequence, candidate) for t in targets]


def wait_for(
    registry: Registry,
    sequence: int,
    targets: Iterable[str],
    timeout: float,
    *,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_progress: Callable[[list[TargetState]], None] | None = None,
    candidate: bool = False,
) -> WaitResult:
    """Poll every ``poll`` seconds until each target runs ``sequence`` (or newer; with
    ``candidate``: serves it as its candidate) or ``timeout`` seconds passed; ``on_progress``
    sees every poll's states."""
    wanted = list(targets)
    deadline = clock() + timeout
    while True:
        states = targets_state(registry, sequence, wanted, candidate=candidate)
        if on_progress is not None:
            on_progress(states)
        result = WaitResult(
            sequence=sequence,
            arrived=tuple(s.device_id for s in states if s.arrived),
            pending=tuple(s.device_id for s in states if not s.arrived),
        )
        left = deadline - clock()
        if result.ok or left <= 0:
            if not result.ok:
                log.info(
                    "release %d: %d targets pending at the timeout", sequence, len(result.pending)
                )
            return result
        sleep(min(poll, left))
