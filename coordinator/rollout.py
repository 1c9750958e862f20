"""Staged rollouts: the pure controller (spec + state + fleet rows + evidence + now in, the next
decision and the new state out). No I/O, no clock reads: ``coordinator.rollouts`` runs it.

A rollout moves devices from what they run to ``name`` ``version`` in stages: a canary
(``10%`` | ``device:ID,…`` | ``group:G``), then waves (``10%,50%,100%``: the share of the fleet
on the candidate after that wave). Each stage is deployed (one release to exactly its new
devices), then bakes: a device counts as healthy only when it is online, runs the wave's
release, has at least ``min_samples`` inferences on the candidate since the bake began, and
passes every gate. Gates, judged per device (the same device's previous version is the
baseline where a gate is relative; the pooled fleet baseline where that device has none):

- ``error_rate<0.01``     errors / inferences
- ``p95_latency<1.5x``    p95 latency over the previous version's (``<20ms``: absolute)
- ``class_shift<0.25``    PSI of the output-class distribution against the previous version's:
                          a model that "disagrees on live inputs" shows here from inference
                          telemetry alone, when the devices' inputs are not class-balanced
- ``drift<0.2``           the drift engine's input drift (PSI) on the candidate
- ``agreement>0.95``      shadow agreement with the active model
- ``accuracy>0.9``        correct / labelled predictions of the candidate on the device, where
                          labels flow back (``POST /v1/feedback`` on the agent); judged once
                          the device has ``min_labels`` labels since the bake began

A gate that fails on any device with enough samples halts the rollout at once and rolls back
every device it moved (the same model is on all of them). A wave whose devices are not all
healthy ``wave_timeout`` seconds after its bake ended (offline, too few samples or labels,
missing evidence) or not all installed ``wave_timeout`` seconds after its release halts too: an
offline device is never counted healthy. Every decision carries its evidence (gate, numbers,
devices). Rollback is carried out by the service as new signed releases of each device's
previous version (a higher sequence, so anti-rollback keeps working).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ACTIONS", "PHASES", "Decision", "DeviceRow", "Evidence", "Gate", "Health",
           "RolloutSpec", "RolloutState", "Stage", "abort", "decide", "deployed", "pause",
           "psi", "request_rollback", "resume", "rolled_back"]  # fmt: skip

#: phases of a rollout; the last three are final
PHASES = ("pending", "deploying", "baking", "rolling_back", "done", "rolled_back", "aborted")
FINAL = ("done", "rolled_back", "aborted")
#: what a decision asks of the service: start/promote = publish ``devices`` the candidate;
#: halt = publish each of ``devices`` its previous version; wait/done/none: nothing
ACTIONS = ("start", "promote", "wait", "halt", "done", "none")

METRICS = {"error_rate", "p95_latency", "class_shift", "drift", "agreement", "accuracy"}
_GATE = re.compile(r"^\s*([a-z_0-9]+)\s*([<>])\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(x|ms)?\s*$")
_PERCENT = re.compile(r"^([0-9]*\.?[0-9]+)%$")
PSI_SMOOTHING = 0.5  # counts added per class before PSI (a class one side never saw is finite)
MIN_LABELS = 20  # labelled predictions per device before its accuracy gate counts


@dataclass(frozen=True, kw_only=True)
class Gate:
    """``metric<threshold`` or ``metric>threshold``; ``p95_latency`` takes ``1.5x`` (ratio to
    the previous version) or ``20ms``."""

    metric: str
    op: str  # "<" | ">"
    threshold: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> Gate:
        m = _GATE.match(text)
        if m is None:
            raise ValueError(f"gate {text!r}: expected METRIC<NUMBER or METRIC>NUMBER, e.g. "
                             "error_rate<0.01, p95_latency<1.5x, agreement>0.95")  # fmt: skip
        metric, op, number, unit = m.groups()
        if metric not in METRICS:
            raise ValueError(f"gate {text!r}: unknown metric {metric!r} "
                             f"(one of {', '.join(sorted(METRICS))})")  # fmt: skip
        if unit and metric != "p95_latency":
            raise ValueError(f"gate {text!r}: only p95_latency takes a unit (x or ms)")
        return cls(metric=metric, op=op, threshold=float(number), relative=unit == "x")

    def __str__(self) -> str:
        unit = ("x" if self.relative else "ms") if self.metric == "p95_latency" else ""
        return f"{self.metric}{self.op}{self.threshold:g}{unit}"

    def passes(self, value: float) -> bool:
        return value < self.threshold if self.op == "<" else value > self.threshold


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage's selection: ``N%`` of the fleet (cumulative), ``device:ID,…``, ``group:G``."""

    percent: float | None = None
    devices: tuple[str, ...] = ()
    group: str | None = None

    @classmethod
    def parse(cls, text: str) -> Stage:
        text = text.strip()
        if m := _PERCENT.match(text):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise ValueError(f"stage {text!r}: a share must be in (0%, 100%]")
            return cls(percent=pct)
        if text == "all":
            return cls(percent=100.0)
        if text.startswith("group:") and len(text) > 6:
            return cls(group=text[6:])
        if text.startswith("device:") and text[7:].strip(","):
            return cls(devices=tuple(d for d in text[7:].split(",") if d))
        raise ValueError(f"stage {text!r}: expected N%, device:ID[,ID…] or group:G")

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return f"group:{self.group}" if self.group else "device:" + ",".join(self.devices)


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    name: str
    version: str
    canary: Stage
    waves: tuple[Stage, ...]
    gates: tuple[Gate, ...]
    bake: float  # s a stage bakes before it may be promoted
    min_samples: int = 50  # inferences per device on the candidate before its gates count
    wave_timeout: float = 600.0  # s to install, and after the bake to become healthy
    min_labels: int = MIN_LABELS  # labels per device before its accuracy gate counts

    def __post_init__(self) -> None:
        if self.bake < 0 or self.wave_timeout <= 0 or self.min_samples < 1:
            raise ValueError("bake must be >= 0 s, wave timeout > 0 s, min samples >= 1")
        if self.min_labels < 1:
            raise ValueError(f"min labels must be >= 1, got {self.min_labels}")
        if not self.waves:
            raise ValueError("a rollout needs at least one wave (e.g. --waves 100%)")

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (self.canary, *self.waves)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "canary": str(self.canary),
                "waves": [str(w) for w in self.waves], "gates": [str(g) for g in self.gates],
                "bake": self.bake, "min_samples": self.min_samples,
                "wave_timeout": self.wave_timeout, "min_labels": self.min_labels}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutSpec:
        return cls(name=d["name"], version=d["version"], canary=Stage.parse(d["canary"]),
                   waves=tuple(Stage.parse(w) for w in d["waves"]),
                   gates=tuple(Gate.parse(g) for g in d["gates"]), bake=float(d["bake"]),
                   min_samples=int(d["min_samples"]),
                   wave_timeout=float(d["wave_timeout"]),
                   min_labels=int(d.get("min_labels", MIN_LABELS)))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """A device as the registry sees it now (revoked devices are left out by the caller)."""

    device_id: str
    groups: tuple[str, ...] = ()
    online: bool = True
    version: str | None = None  # the model version it runs (of the rollout's model name)
    sequence: int | None = None
    failed_sequence: int | None = None  # its last install failed, for this release...
    failed_reason: str = ""  # ...with this reason


@dataclass(frozen=True, kw_only=True)
class Health:
    """One device's inference evidence for one model version over a window."""

    count: int = 0
    errors: int = 0
    p95_ms: float | None = None
    class_counts: Mapping[str, int] = field(default_factory=dict)
    drift: float | None = None
    agreement: float | None = None
    accuracy: float | None = None  # correct / labelled (None: no labels)
    labelled: int = 0  # predictions a true label flowed back for

    def metric(self, name: str) -> float | None:
        if name == "error_rate":
            return self.errors / self.count if self.count else None
        if name == "p95_latency":
            return self.p95_ms
        value: float | None = getattr(self, name)
        return value


@dataclass(frozen=True, kw_only=True)
class Evidence:
    """The candidate on each device since the bake began; the previous version before it."""

    candidate: Mapping[str, Health] = field(default_factory=dict)
    baseline: Mapping[str, Health] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RolloutState:
    phase: str = "pending"
    wave: int = -1  # index into spec.stages (0 = the canary)
    wave_devices: tuple[str, ...] = ()
    released: tuple[str, ...] = ()  # every device the rollout moved to the candidate
    previous: Mapping[str, str | None] = field(default_factory=dict)  # device -> version before
    sequence: int | None = None  # the current wave's release (None: not built yet)
    since: float | None = None  # unix s: the wave's release (deploying) or bake start (baking)
    paused: bool = False
    reason: str = ""  # why it halted, was aborted or rolled back

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "wave": self.wave, "wave_devices": list(self.wave_devices),
                "released": list(self.released), "previous": dict(self.previous),
                "sequence": self.sequence, "since": self.since, "paused": self.paused,
                "reason": self.reason}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutState:
        return cls(phase=d["phase"], wave=int(d["wave"]), wave_devices=tuple(d["wave_devices"]),
                   released=tuple(d["released"]), previous=dict(d["previous"]),
                   sequence=d["sequence"], since=d["since"], paused=bool(d["paused"]),
                   reason=d["reason"])  # fmt: skip

    @property
    def final(self) -> bool:
        return self.phase in FINAL


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: str  # ACTIONS
    wave: int
    devices: tuple[str, ...] = ()  # start/promote: the new wave's; halt: to roll back
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "wave": self.wave, "devices": list(self.devices),
                "reason": self.reason, "evidence": self.evidence}  # fmt: skip


def psi(observed: Mapping[str, int], expected: Mapping[str, int]) -> float:
    """Population stability index of two count distributions over the same categories, with
    additive smoothing (``PSI_SMOOTHING`` counts per category seen on either side): one rare
    class in a small window must not read as an infinite shift."""
    keys = set(observed) | set(expected)
    n_o, n_e = sum(observed.values()), sum(expected.values())
    if not n_o or not n_e:
        return 0.0
    a = PSI_SMOOTHING
    total = 0.0
    for k in keys:
        o = (observed.get(k, 0) + a) / (n_o + a * len(keys))
        e = (expected.get(k, 0) + a) / (n_e + a * len(keys))
        total += (o - e) * math.log(o / e)
    return total


# -- operator actions ---------------------------------------------------------------------------
def pause(state: RolloutState) -> RolloutState:
    _live(state, "pause")
    return replace(state, paused=True)


def resume(state: RolloutState) -> RolloutState:
    _live(state, "resume")
    return replace(state, paused=False)


def abort(state: RolloutState, reason: str = "aborted by the operator") -> RolloutState:
    """Stop where it is: devices keep what they run."""
    _live(state, "abort")
    return replace(state, phase="aborted", reason=reason)


def request_rollback(state: RolloutState, reason: str) -> RolloutState:
    """Roll back every device the rollout moved (also after it is done or aborted)."""
    if state.phase == "rolled_back":
        raise ValueError("the rollout is already rolled back")
    return replace(state, phase="rolling_back", reason=reason, paused=False)


def deployed(state: RolloutState, sequence: int, now: float) -> RolloutState:
    """The service built (and is publishing) the wave's release ``sequence`` at ``now``."""
    return replace(state, sequence=sequence, since=now)


def rolled_back(state: RolloutState) -> RolloutState:
    """The service published the rollback releases."""
    return replace(state, phase="rolled_back")


def _live(state: RolloutState, what: str) -> None:
    if state.final or state.phase == "rolling_back":
        raise ValueError(f"cannot {what} a rollout that is {state.phase.replace('_', ' ')}")


# -- the controller ---------------------------------------------------------------------------
def decide(
    spec: RolloutSpec,
    state: RolloutState,
    rows: Sequence[DeviceRow],
    evidence: Evidence,
    now: float,
) -> tuple[Decision, RolloutState]:
    """The next decision and the state after it (which the service stores with it)."""
    if state.phase == "rolling_back":
        return _halt(state, state.reason, {})
    if state.final:
        return Decision(action="none", wave=state.wave, reason=state.phase), state
    if state.paused:
        return Decision(action="wait", wave=state.wave, reason="paused"), state
    if state.phase == "pending":
        return _next_stage(spec, state, rows, {})
    if state.sequence is None or state.since is None:  # the wave's release was not built yet
        return _start(state, "start" if state.wave == 0 else "promote", state.wave_devices,
                      "the wave's release is not built yet", {}), state  # fmt: skip
    by_id = {r.device_id: r for r in rows}
    if state.phase == "deploying":
        return _deploying(spec, state, by_id, now)
    return _baking(spec, state, by_id, evidence, now)


def _start(state: RolloutState, action: str, devices: tuple[str, ...], reason: str,
           evidence: dict[str, Any]) -> Decision:  # fmt: skip
    return Decision(action=action, wave=state.wave, devices=devices, reason=reason,
                    evidence=evidence)  # fmt: skip


def _order(spec: RolloutSpec, device_id: str) -> str:
    """A stable, spread-out order of devices for percentage stages."""
    return hashlib.sha256(f"{spec.name}/{spec.version}/{device_id}".encode()).hexdigest()


def _select(spec: RolloutSpec, stage: Stage, rows: Sequence[DeviceRow],
            released: set[str]) -> tuple[str, ...]:  # fmt: skip
    """The stage's new devices. Shares count the fleet and pick online devices only (an
    offline one would only hold the wave up; its retained offer is not published)."""
    if stage.percent is not None:
        want = math.ceil(stage.percent / 100 * len(rows))
        pool = sorted((r.device_id for r in rows if r.online and r.device_id not in released),
                      key=lambda d: _order(spec, d))  # fmt: skip
        return tuple(sorted(pool[: max(0, want - len(released))]))
    known = {r.device_id for r in rows}
    if stage.group is not None:
        picked = [r.device_id for r in rows if stage.group in r.groups]
    else:
        picked = [d for d in stage.devices if d in known]
    return tuple(sorted(d for d in picked if d not in released))


def _next_stage(spec: RolloutSpec, state: RolloutState, rows: Sequence[DeviceRow],
                evidence: dict[str, Any]) -> tuple[Decision, RolloutState]:  # fmt: skip
    """Start the next stage that selects any device, or finish."""
    released = set(state.released)
    wave, skipped = state.wave + 1, []
    while wave < len(spec.stages):
        devices = _select(spec, spec.stages[wave], rows, released)
        if devices:
            break
        skipped.append(str(spec.stages[wave]))
        wave += 1
    if skipped:
        evidence = {**evidence, "skipped_stages": skipped}
    if wave >= len(spec.stages):
        offline = sorted(r.device_id for r in rows if r.device_id not in released)
        done = replace(state, phase="done", wave_devices=(), reason="")
        return Decision(action="done", wave=state.wave, reason="every stage passed",
                        evidence={**evidence, "not_moved": offline}), done  # fmt: skip
    by_id = {r.device_id: r for r in rows}
    previous = {**state.previous, **{d: by_id[d].version for d in devices}}
    new = replace(state, phase="deploying", wave=wave, wave_devices=devices,
                  released=tuple(sorted(released | set(devices))), previous=previous,
                  sequence=None, since=None)  # fmt: skip
    action = "start" if state.wave < 0 else "promote"
    what = "canary" if wave == 0 else f"wave {wave}"
    reason = f"{what} ({spec.stages[wave]}): {len(devices)} devices"
    return _start(new, action, devices, reason, evidence), new


def _halt(
    state: RolloutState, reason: str, evidence: dict[str, Any]
) -> tuple[Decision, RolloutState]:
    new = replace(state, phase="rolling_back", reason=reason)
    return Decision(action="halt", wave=state.wave, devices=state.released, reason=reason,
                    evidence=evidence), new  # fmt: skip


def _wait(
    state: RolloutState, reason: str, evidence: dict[str, Any]
) -> tuple[Decision, RolloutState]:
    return Decision(action="wait", wave=state.wave, devices=state.wave_devices, reason=reason,
                    evidence=evidence), state  # fmt: skip


def _deploying(spec: RolloutSpec, state: RolloutState, rows: Mapping[str, DeviceRow],
               now: float) -> tuple[Decision, RolloutState]:  # fmt: skip
    assert state.sequence is not None and state.since is not None
    failed = {d: rows[d].failed_reason for d in state.wave_devices
              if d in rows and rows[d].failed_sequence == state.sequence}  # fmt: skip
    if failed:
        return _halt(state, f"install failed on {', '.join(sorted(failed))}",
                     {"install_failed": failed})  # fmt: skip
    pending = sorted(d for d in state.wave_devices if not _runs(rows.get(d), spec, state))
    if not pending:
        baking = replace(state, phase="baking", since=now)
        return _wait(baking, "baking", {"installed": list(state.wave_devices)})
    evidence = {"not_installed": {d: _where(rows.get(d)) for d in pending}}
    if now - state.since > spec.wave_timeout:
        return _halt(state, f"{len(pending)} devices did not install release {state.sequence} "
                     f"within {spec.wave_timeout:g} s", evidence)  # fmt: skip
    return _wait(state, "installing", evidence)


def _runs(row: DeviceRow | None, spec: RolloutSpec, state: RolloutState) -> bool:
    return (row is not None and row.version == spec.version
            and (row.sequence or 0) >= (state.sequence or 0))  # fmt: skip


def _where(row: DeviceRow | None) -> str:
    if row is None:
        return "not enrolled"
    running = f"runs {row.version} (release {row.sequence})" if row.version else "runs nothing"
    return running + ("" if row.online else ", offline")


def _baking(spec: RolloutSpec, state: RolloutState, rows: Mapping[str, DeviceRow],
            evidence: Evidence, now: float) -> tuple[Decision, RolloutState]:  # fmt: skip
    assert state.since is not None
    verdict = judge(spec, state, rows, evidence)
    if verdict.failed:
        first = verdict.failed[0]
        reason = (f"gate {first['gate']} failed on {len(verdict.failed)} device(s): "
                  f"{first['device']} {first['metric']}={first['value']:.4g}")  # fmt: skip
        return _halt(state, reason, verdict.to_dict())
    baked = now - state.since
    if baked < spec.bake:
        return _wait(state, "baking", {**verdict.to_dict(), "baked_s": round(baked, 3)})
    if verdict.not_ready:
        if baked > spec.bake + spec.wave_timeout:
            return _halt(state, f"{len(verdict.not_ready)} device(s) not healthy "
                         f"{spec.wave_timeout:g} s after the bake: "
                         + _reasons(verdict.not_ready), verdict.to_dict())  # fmt: skip
        return _wait(state, "waiting for healthy devices", verdict.to_dict())
    return _next_stage(spec, state, list(_all_rows(rows)), {
        "passed": f"{'canary' if state.wave == 0 else f'wave {state.wave}'} healthy",
        **verdict.to_dict()})  # fmt: skip


def _all_rows(rows: Mapping[str, DeviceRow]) -> list[DeviceRow]:
    return [rows[d] for d in sorted(rows)]


def _reasons(not_ready: Mapping[str, str]) -> str:
    items = [f"{d} {why}" for d, why in sorted(not_ready.items())]
    return "; ".join(items[:5]) + (f"; … {len(items) - 5} more" if len(items) > 5 else "")


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The gates on one wave: every judged number, the failures, the devices not ready."""

    results: list[dict[str, Any]]  # {device, gate, metric, value, baseline, passed}
    failed: list[dict[str, Any]]
    not_ready: dict[str, str]  # device -> why it is not healthy yet

    def to_dict(self) -> dict[str, Any]:
        return {"gates": self.results, "not_ready": self.not_ready}


def judge(spec: RolloutSpec, state: RolloutState, rows: Mapping[str, DeviceRow],
          evidence: Evidence) -> Verdict:  # fmt: skip
    """Judge every gate on every device of the wave that has enough samples."""
    fleet = _pooled(evidence.baseline.values(), spec.min_samples)
    results: list[dict[str, Any]] = []
    not_ready: dict[str, str] = {}
    for d in state.wave_devices:
        row, health = rows.get(d), evidence.candidate.get(d, Health())
        if health.count < spec.min_samples:
            not_ready[d] = f"has {health.count} of {spec.min_samples} samples"
        else:
            base = evidence.baseline.get(d)
            if base is None or base.count < spec.min_samples:
                base = fleet
            for gate in spec.gates:
                labels = gate.metric == "accuracy"
                if labels and health.labelled < spec.min_labels:  # no or too few: not healthy
                    not_ready.setdefault(d, f"has {health.labelled} of {spec.min_labels} labels")
                    continue
                value, against = _value(gate, health, base)
                if value is None:
                    not_ready.setdefault(d, f"has no {gate.metric} evidence")
                    continue
                results.append({"device": d, "gate": str(gate), "metric": gate.metric,
                                "value": value, "baseline": against,
                                "passed": gate.passes(value)}
                               | ({"labelled": health.labelled} if labels else {}))  # fmt: skip
        if row is None or not row.online:
            not_ready[d] = "is offline"  # never healthy, whatever its numbers
        elif not _runs(row, spec, state):
            not_ready[d] = f"no longer runs the candidate ({_where(row)})"
    failed = [r for r in results if not r["passed"]]
    return Verdict(results=results, failed=failed, not_ready=not_ready)


def _pooled(healths: Any, min_samples: int) -> Health | None:
    """The fleet's baseline: class counts summed, the median p95, over devices with enough."""
    hs = [h for h in healths if h.count >= min_samples]
    if not hs:
        return None
    counts: dict[str, int] = {}
    for h in hs:
        for k, v in h.class_counts.items():
            counts[k] = counts.get(k, 0) + v
    p95s = sorted(h.p95_ms for h in hs if h.p95_ms is not None)
    p95 = p95s[len(p95s) // 2] if p95s else None
    return Health(count=sum(h.count for h in hs), errors=sum(h.errors for h in hs), p95_ms=p95,
                  class_counts=counts)  # fmt: skip


def _value(gate: Gate, health: Health, base: Health | None) -> tuple[float | None, Any]:
    """The gate's number on this device and the baseline it was compared with.

    A relative gate without any baseline in the fleet (nothing ran before) judges as 0: there
    is nothing to regress from; the evidence says ``baseline: None``."""
    if gate.metric == "class_shift":
        if base is None or not base.class_counts:
            return 0.0, None
        return psi(health.class_counts, base.class_counts), dict(base.class_counts)
    if gate.metric == "p95_latency" and gate.relative:
        if health.p95_ms is None:
            return None, None
        if base is None or not base.p95_ms:
            return 0.0, None
        return health.p95_ms / base.p95_ms, base.p95_ms
    return health.metric(gate.metric), None
