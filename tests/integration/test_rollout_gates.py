"""The ``agreement`` and ``drift`` gates in a simulated fleet, fed by the agents' real telemetry.

The rig is ``test_rollout``'s: every device on digits v1 with its baseline telemetry, the
deliberately worse model (trained on shifted labels: it installs, passes its own smoke test,
never errs) registered as v3; v2 is the same MLP as v1 exported to TFLite.

- agreement: a candidate is first released as a *shadow* (``coordinator.candidates``), live
  inputs flow through the agents' recorders and the shadow's agreement reaches the registry.
  The worse model, shadowed on the canary, is halted there by ``agreement>0.95`` and rolled
  back; v2, shadowed on every device, passes every wave; a device that never ran the shadow
  has no agreement evidence and is never counted healthy (the wave halts at its timeout).
- drift: v2 rolled out with ``drift<0.2``: the canary's inputs shifted (centre pixels, as
  ``test_drift`` does) halt it on its own input PSI; with normal inputs everywhere the same
  rollout passes. Drift counts only from windows of ``coordinator.drift.MIN_SAMPLES`` rows.

Assertions are on decisions, evidence and what the devices run, never on time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet.coordinator.candidates import build_candidate, publish_candidate, shadow_summary
from edgefleet.coordinator.drift import MIN_SAMPLES as DRIFT_ROWS
from edgefleet.coordinator.rollout import Gate, RolloutSpec, Stage
from edgefleet.coordinator.rollouts import Rollouts
from edgefleet.coordinator.telemetry import recent
from edgefleet.models.digits import load_digits_split
from edgefleet.protocol.candidate import CandidateSpec
from edgefleet.simulations.workload import Workload

from tests.conftest import Digits

from .fleet import TIMEOUT, FleetHarness, wait_until
from .test_drift import _shift
from .test_rollout import DEVICES, drive, running_fleet, spec, worse  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(240)]
CANARY = "dev-0"
AGREEMENT, DRIFT = "agreement>0.95", "drift<0.2"
SHADOWED = 20  # rows each shadow compares before the rollout starts
BATCH = 50  # rows per predict call of the drift traffic (the monitor samples whole calls)


def gated(version: str, gate: str, **kw: object) -> RolloutSpec:
    return spec(version, canary=Stage.parse(f"device:{CANARY}"), gates=(Gate.parse(gate),), **kw)


def shadow(fleet: FleetHarness, work: Workload, version: str, selector: str) -> list[str]:
    """``version`` as the shadow candidate of the selected devices, until each compared
    ``SHADOWED`` live rows and its agreement reached the registry; the devices."""
    assert fleet.service is not None
    cand = build_candidate(fleet.coordinator, "digits", version, selector,
                           CandidateSpec(mode="shadow"))  # fmt: skip
    publish_candidate(fleet.service.link, cand)
    devices = sorted(cand.targets)
    for d in devices:
        side = fleet.agents[d].daemon.candidate
        assert side is not None and side.feed.installed.wait(TIMEOUT), d

    def compared() -> bool:
        work.step(2, devices)
        rows = recent(fleet.coordinator.registry, namespace="shadow", since=0, device_ids=devices)
        return all(shadow_summary(p for dev, _, p in rows if dev == d)["compared"] >= SHADOWED
                   for d in devices)  # fmt: skip

    wait_until(compared, f"shadow agreement of {version} from {devices}", interval=0.05)
    return devices


def test_a_disagreeing_shadow_halts_the_canary_on_agreement_and_it_is_rolled_back(
    tmp_path: Path,
    digits_v1: Digits,
    worse: Path,  # noqa: F811
) -> None:
    with running_fleet(tmp_path, digits_v1, "memory", worse, shadow_sample=1.0) as (fleet, work):
        assert fleet.service is not None
        assert shadow(fleet, work, "3", f"device:{CANARY}") == [CANARY]
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(gated("3", AGREEMENT))
        r = drive(ro, rid, work)

        assert r.state.phase == "rolled_back" and r.state.released == (CANARY,)
        decisions = ro.store.decisions(rid)
        assert [d["action"] for d in decisions if d["action"] != "wait"] == ["start", "halt"]
        start, halt = decisions[0], decisions[-1]
        assert halt["devices"] == [CANARY]
        assert f"gate {AGREEMENT} failed on 1 device(s): {CANARY} agreement=" in halt["reason"]
        [gate] = halt["evidence"]["gates"]
        assert gate["device"] == CANARY and gate["metric"] == "agreement"
        # the shadow's agreement before the rollout (~0): the windows after v3 became active
        # compare it with itself and are no evidence
        assert not gate["passed"] and gate["value"] < 0.2
        assert halt["evidence"]["rollback"] == {"1": [CANARY]}
        [back] = halt["sequences"]
        assert back > start["sequences"][0]
        fleet.wait_active([CANARY], back)
        assert fleet.agents[CANARY].agent.status().active.version == "1"
        for d in DEVICES:
            if d != CANARY:
                assert fleet.device(d).active_version == "1"


def test_an_agreeing_shadow_passes_the_agreement_gate_on_every_wave(
    tmp_path: Path, digits_v1: Digits
) -> None:
    with running_fleet(tmp_path, digits_v1, "memory", shadow_sample=1.0) as (fleet, work):
        assert fleet.service is not None
        assert shadow(fleet, work, "2", "all") == DEVICES
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(gated("2", AGREEMENT))
        r = drive(ro, rid, work)

        assert r.state.phase == "done" and set(r.state.released) == set(DEVICES)
        judged = [d for d in ro.store.decisions(rid) if d["action"] in ("promote", "done")]
        assert len(judged) == 3  # canary, wave 1, wave 2
        seen = [g["device"] for d in judged for g in d["evidence"]["gates"]]
        assert sorted(seen) == DEVICES  # each judged once, in its own wave
        for d in judged:
            assert all(g["passed"] and g["value"] > 0.95 for g in d["evidence"]["gates"])
        for dev in DEVICES:
            assert fleet.agents[dev].agent.status().active.version == "2"


def test_a_device_without_shadow_evidence_is_never_counted_healthy(
    tmp_path: Path, digits_v1: Digits
) -> None:
    with running_fleet(tmp_path, digits_v1, "memory", shadow_sample=1.0) as (fleet, work):
        assert fleet.service is not None
        shadow(fleet, work, "2", f"device:{CANARY}")  # only the canary ran the shadow
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(gated("2", AGREEMENT, waves=(Stage.parse("100%"),), wave_timeout=2.0))
        r = drive(ro, rid, work)

        assert r.state.phase == "rolled_back"
        decisions = ro.store.decisions(rid)
        assert [d["action"] for d in decisions if d["action"] != "wait"] == [
            "start", "promote", "halt"]  # fmt: skip
        halt = decisions[-1]
        others = sorted(set(DEVICES) - {CANARY})
        assert halt["evidence"]["not_ready"] == dict.fromkeys(others, "has no agreement evidence")
        assert halt["evidence"]["gates"] == []  # nothing judged, nothing passed
        assert "not healthy" in halt["reason"]
        assert halt["evidence"]["rollback"] == {"1": DEVICES}  # the canary too
        fleet.wait_active(DEVICES, max(halt["sequences"]))
        for dev in DEVICES:
            assert fleet.agents[dev].agent.status().active.version == "1"


class Batches(Workload):
    """Batches of the whole digits test split (class-balanced, as the drift reference is) on
    each running agent; the ``shifted`` devices' inputs with ``test_drift``'s pixel shift."""

    def __init__(self, fleet: FleetHarness, shifted: set[str]) -> None:
        super().__init__(fleet)
        self.x = load_digits_split(0).X_test.astype(np.float32)
        self.rng = np.random.default_rng(2)
        self.shifted = shifted

    def step(self, calls: int = 10, devices: list[str] | None = None) -> int:
        for device in devices or sorted(self.fleet.agents):
            for _ in range(calls):
                x = self.x[self.rng.integers(0, len(self.x), size=BATCH)]
                self.fleet.agents[device].daemon.recorder.predict(
                    _shift(x) if device in self.shifted else x)  # fmt: skip
        return calls * BATCH


@pytest.mark.parametrize("shifted", [{CANARY}, set()], ids=["canary-shifted", "all-normal"])
def test_the_drift_gate_halts_on_the_canary_s_shifted_inputs_only(
    tmp_path: Path, digits_v1: Digits, shifted: set[str]
) -> None:
    with running_fleet(tmp_path, digits_v1, "memory") as (fleet, _):
        assert fleet.service is not None
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(gated("2", DRIFT))
        r = drive(ro, rid, Batches(fleet, shifted), calls=5)

        decisions = ro.store.decisions(rid)
        judged = [d for d in decisions if d["action"] in ("promote", "done", "halt")]
        gates = [g for d in judged for g in d["evidence"]["gates"]]
        assert gates and all(g["metric"] == "drift" for g in gates)
        if shifted:
            assert r.state.phase == "rolled_back" and r.state.released == (CANARY,)
            [halt] = judged
            assert f"gate {DRIFT} failed on 1 device(s): {CANARY} drift=" in halt["reason"]
            [gate] = halt["evidence"]["gates"]
            assert gate["device"] == CANARY and not gate["passed"] and gate["value"] > 0.2
            assert halt["evidence"]["rollback"] == {"1": [CANARY]}
            fleet.wait_active([CANARY], halt["sequences"][0])
            assert fleet.agents[CANARY].agent.status().active.version == "1"
        else:
            assert r.state.phase == "done" and set(r.state.released) == set(DEVICES)
            assert len(judged) == 3 and sorted(g["device"] for g in gates) == DEVICES
            assert all(g["passed"] and g["value"] < 0.2 for g in gates)
        # only full windows were evidence: the shifted canary was judged on DRIFT_ROWS+ rows
        rows = recent(fleet.coordinator.registry, namespace="drift", since=int(r.created),
                      device_ids=[CANARY])  # fmt: skip
        assert max(p["digits@2"]["n"] for _, _, p in rows if "digits@2" in p) >= DRIFT_ROWS
