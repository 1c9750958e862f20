"""The rollout service over the rig's in-memory broker with real agents: waves are released to
exactly their devices, a halt rolls them back with a higher sequence, state changes are
compare-and-set, decisions are stored with their evidence. Evidence comes from a fake source
here (the telemetry path is tests/integration/test_rollout.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from edgefleet.coordinator.registry import Registry
from edgefleet.coordinator.rollout import Evidence, Gate, Health, RolloutSpec, Stage
from edgefleet.coordinator.rollouts import Rollout, Rollouts

from tests.conftest import Digits
from tests.integration.fleet import FleetHarness, open_fleet, wait_until

pytestmark = [pytest.mark.timeout(120)]
DEVICES = [f"dev-{i}" for i in range(4)]


@dataclass
class FakeEvidence:
    """Every candidate device gets ``health``; the previous version had ``baseline``."""

    health: Health
    baseline: Health = field(default_factory=lambda: Health(count=100, class_counts={"1": 100}))
    asked: int = 0

    def __call__(self, registry: Registry, r: Rollout, now: float) -> Evidence:
        self.asked += 1
        return Evidence(candidate=dict.fromkeys(r.state.wave_devices, self.health),
                        baseline=dict.fromkeys(r.state.previous, self.baseline))  # fmt: skip


GOOD = Health(count=100, errors=0, p95_ms=1.0, class_counts={"1": 100})
WORSE = Health(count=100, errors=0, p95_ms=1.0, class_counts={"7": 100})


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = dict(
        name="digits", version="2", canary=Stage.parse("25%"),
        waves=(Stage.parse("50%"), Stage.parse("100%")),
        gates=(Gate.parse("error_rate<0.01"), Gate.parse("class_shift<0.25")),
        bake=0, min_samples=10, wave_timeout=60)  # fmt: skip
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def fleet(tmp_path: Path, digits_v1: Digits) -> Iterator[FleetHarness]:
    with open_fleet(tmp_path, digits_v1, DEVICES, kind="memory") as fleet:
        fleet.start_service()
        for d in DEVICES:
            fleet.start_agent(d)
        first = fleet.release("1", "all")
        fleet.wait_active(DEVICES, first.sequence)
        yield fleet


def run(rollouts: Rollouts, rollout_id: int) -> Rollout:
    """Tick until the rollout is final (each tick reads the registry the agents report to)."""
    def final() -> Rollout | None:
        rollouts.tick(rollout_id)
        r = rollouts.store.get(rollout_id)
        return r if r.state.final else None

    return wait_until(final, f"rollout {rollout_id} to finish", interval=0.05)


def test_a_good_model_is_promoted_through_every_wave(fleet: FleetHarness) -> None:
    assert fleet.service is not None
    ro = Rollouts(fleet.coordinator, fleet.service.link, evidence=FakeEvidence(GOOD))
    rid = ro.start(spec())
    r = run(ro, rid)
    assert r.state.phase == "done" and set(r.state.released) == set(DEVICES)
    decisions = ro.store.decisions(rid)
    actions = [d["action"] for d in decisions]
    assert actions[0] == "start" and actions.count("promote") == 2 and actions[-1] == "done"
    waves = [d for d in decisions if d["action"] in ("start", "promote")]
    assert [len(d["devices"]) for d in waves] == [1, 1, 2]  # 25%, 50%, 100% of 4
    groups = fleet.coordinator.registry.groups()
    for k, d in enumerate(waves):  # each wave released to exactly its devices
        assert groups[f"rollout-{rid}-w{k}"] == sorted(d["devices"])
        release = fleet.coordinator.registry.release(sequence=d["sequences"][0])
        assert release is not None and {t.device_id for t in release.targets} == set(d["devices"])
    promoted = [d for d in decisions if d["action"] == "promote"]
    assert all(g["passed"] for d in promoted for g in d["evidence"]["gates"])
    for dev in DEVICES:
        assert fleet.device(dev).active_version == "2"


def test_a_worse_model_is_halted_and_rolled_back_with_a_higher_sequence(
    fleet: FleetHarness,
) -> None:
    assert fleet.service is not None
    ro = Rollouts(fleet.coordinator, fleet.service.link, evidence=FakeEvidence(WORSE))
    rid = ro.start(spec())
    r = run(ro, rid)
    assert r.state.phase == "rolled_back"
    [canary] = r.state.released
    decisions = ro.store.decisions(rid)
    assert [d["action"] for d in decisions if d["action"] != "wait"] == ["start", "halt"]
    halt = decisions[-1]
    assert "class_shift<0.25" in halt["reason"] and halt["devices"] == [canary]
    assert halt["evidence"]["rollback"] == {"1": [canary]}
    [failed] = [g for g in halt["evidence"]["gates"] if not g["passed"]]
    assert failed["device"] == canary and failed["value"] > 0.25
    candidate = decisions[0]["sequences"][0]
    [back] = halt["sequences"]
    assert back > candidate
    fleet.wait_active([canary], back)
    assert fleet.device(canary).active_version == "1"
    assert fleet.agents[canary].active_sequence() == back  # the agent accepted it: higher
    others = [d for d in DEVICES if d != canary]
    assert {fleet.device(d).active_version for d in others} == {"1"}  # never moved
    assert ro.tick(rid).action == "none"


def test_state_changes_are_compare_and_set(fleet: FleetHarness) -> None:
    assert fleet.service is not None
    ro = Rollouts(fleet.coordinator, fleet.service.link, evidence=FakeEvidence(GOOD))
    rid = ro.start(spec(bake=3600))
    stale = ro.store.get(rid)
    ro.tick(rid)  # the canary starts: the revision moves on
    assert ro.store.save(stale, stale.state, 0) is None
    assert ro.store.get(rid).state.phase == "deploying"


def test_operator_actions(fleet: FleetHarness) -> None:
    assert fleet.service is not None
    ro = Rollouts(fleet.coordinator, fleet.service.link, evidence=FakeEvidence(GOOD))
    rid = ro.start(spec(bake=3600))
    ro.tick(rid)
    canary = ro.store.get(rid).state.wave_devices
    assert ro.pause(rid).state.paused
    assert ro.tick(rid).reason == "paused"
    assert not ro.resume(rid).state.paused
    d = ro.rollback(rid)
    assert d.action == "halt" and d.reason == "rollback by the operator"
    assert ro.store.get(rid).state.phase == "rolled_back"
    with pytest.raises(ValueError, match="cannot abort a rollout that is rolled back"):
        ro.abort(rid)
    actions = [d["action"] for d in ro.store.decisions(rid)]
    assert {"pause", "resume", "rollback", "halt"} <= set(actions)
    back = ro.store.decisions(rid)[-1]["sequences"][0]
    fleet.wait_active(list(canary), back)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(version="9"), "model digits version 9 is not registered"),
    (dict(canary=Stage.parse("group:nobody")), "canary group:nobody selects no online device"),
])  # fmt: skip
def test_a_rollout_that_cannot_start_is_refused(fleet: FleetHarness, kw: dict[str, object],
                                                message: str) -> None:  # fmt: skip
    ro = Rollouts(fleet.coordinator, None, evidence=FakeEvidence(GOOD))
    with pytest.raises((LookupError, ValueError), match=message):
        ro.start(spec(**kw))
    assert ro.store.all() == []


def test_drift_and_shadow_telemetry_become_evidence() -> None:
    """The adapters over the ``drift`` and ``shadow`` namespaces (rows oldest first)."""
    from edgefleet.coordinator.drift import MIN_SAMPLES
    from edgefleet.coordinator.rollouts import _agreement, _drift

    n = MIN_SAMPLES

    def report(psi: list[object], rows: int = n, **extra: object) -> dict[str, object]:
        return {"n": rows, "psi": psi, "ks": [0.1] * len(psi), **extra}  # as agents send it

    drift_rows = [("a", 1, {"digits@2": report([0.9, 0.2], output_psi=0.1)}),
                  ("a", 2, {"digits@2": report([0.05, 0.01], output_psi=0.3)}),
                  ("b", 1, {"digits@1": report([5.0])}),
                  ("c", 1, {"digits@2": report(["bad"], output_psi=None)}),
                  # too few rows behind it: its PSI is noise, not evidence
                  ("d", 1, {"digits@2": report([0.9], rows=n - 1)}),
                  ("e", 1, {"digits@2": report([0.1])}),
                  ("e", 2, {"digits@2": {"max_psi": 0.9}})]  # fmt: skip
    assert _drift(drift_rows, "digits@2") == {"a": 0.3, "e": 0.1}  # the newest, its larger PSI
    shadow_rows = [("a", 1, {"candidate": "digits@2", "compared": 10, "agree": 9}),
                   ("a", 2, {"candidate": "digits@2", "compared": 30, "agree": 15}),
                   # once digits@2 is active its shadow compares it with itself
                   ("a", 3, {"candidate": "digits@2", "active": "digits@2", "compared": 90,
                             "agree": 90}),
                   ("b", 1, {"candidate": "digits@3", "compared": 10, "agree": 0}),
                   ("c", 1, {"candidate": "digits@2", "compared": 0, "agree": 0})]  # fmt: skip
    assert _agreement(shadow_rows, "digits@2") == {"a": 24 / 40}


class FlakyLink:
    """The service's link, whose first ``failures`` publishes fail as a gone broker would."""

    def __init__(self, link: object, failures: int) -> None:
        self.link, self.failures = link, failures

    def publish(self, *args: object, **kwargs: object) -> object:
        if self.failures:
            self.failures -= 1
            from edgefleet.protocol.errors import TransportError

            raise TransportError("broker away")
        return self.link.publish(*args, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.link, name)


def test_a_failed_publish_is_retried_and_nothing_is_skipped(fleet: FleetHarness) -> None:
    assert fleet.service is not None
    link = FlakyLink(fleet.service.link, failures=1)
    ro = Rollouts(fleet.coordinator, link, evidence=FakeEvidence(GOOD))  # type: ignore[arg-type]
    rid = ro.start(spec(waves=(Stage.parse("100%"),)))
    r = ro.follow(rid, interval=0.05)
    assert r.state.phase == "done" and link.failures == 0
    starts = [d for d in ro.store.decisions(rid) if d["action"] == "start"]
    assert len(starts) == 1  # recorded once: when its release was published
    canary = starts[0]["devices"]
    assert fleet.device(canary[0]).active_sequence == starts[0]["sequences"][0]
