"""The pure rollout controller, table-driven: spec parsing, wave selection, every gate on both
sides of its threshold, bake, min samples, offline devices, timeouts, operator actions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from edgefleet.coordinator.rollout import (
    MIN_LABELS,
    Decision,
    DeviceRow,
    Evidence,
    Gate,
    Health,
    RolloutSpec,
    RolloutState,
    Stage,
    abort,
    decide,
    deployed,
    pause,
    psi,
    request_rollback,
    resume,
    rolled_back,
)

DEVICES = [f"d{i:02d}" for i in range(10)]
UNIFORM = {str(c): 10 for c in range(10)}
SKEWED = {"0": 60, "1": 30, "2": 10}
SHIFTED = {"5": 60, "6": 30, "7": 10}  # the same inputs through a label-permuted model


def spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = dict(
        name="digits", version="2", canary=Stage.parse("10%"),
        waves=(Stage.parse("50%"), Stage.parse("100%")),
        gates=tuple(Gate.parse(g) for g in ("error_rate<0.01", "p95_latency<1.5x",
                                            "class_shift<0.25")),
        bake=60, min_samples=50, wave_timeout=120,
    )  # fmt: skip
    base.update(kw)
    return RolloutSpec(**base)


def rows(version: str = "1", sequence: int = 1, offline: tuple[str, ...] = (),
         on: dict[str, tuple[str, int]] | None = None) -> list[DeviceRow]:  # fmt: skip
    on = on or {}
    return [DeviceRow(device_id=d, groups=("canary",) if d in ("d03", "d07") else (),
                      online=d not in offline, version=on.get(d, (version, sequence))[0],
                      sequence=on.get(d, (version, sequence))[1]) for d in DEVICES]  # fmt: skip


GOOD = Health(count=100, errors=0, p95_ms=1.0, class_counts=SKEWED)
BASE = Health(count=200, errors=0, p95_ms=1.0, class_counts=SKEWED)


def evidence(devices: tuple[str, ...], health: Health = GOOD, **per: Health) -> Evidence:
    cand = {d: per.get(d, health) for d in devices}
    return Evidence(candidate=cand, baseline=dict.fromkeys(DEVICES, BASE))


def started(s: RolloutSpec, now: float = 0.0) -> tuple[Decision, RolloutState]:
    return decide(s, RolloutState(), rows(), Evidence(), now)


def baking(s: RolloutSpec, now: float = 0.0) -> RolloutState:
    """The canary built (release 5), installed everywhere, baking since ``now``."""
    _, st = started(s, now)
    st = deployed(st, 5, now)
    on = dict.fromkeys(st.wave_devices, ("2", 5))
    _, st = decide(s, st, rows(on=on), Evidence(), now)
    assert st.phase == "baking"
    return st


def on_candidate(st: RolloutState, sequence: int = 5, offline: tuple[str, ...] = ()
                 ) -> list[DeviceRow]:  # fmt: skip
    return rows(on=dict.fromkeys(st.released, ("2", sequence)), offline=offline)


# -- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "metric", "op", "threshold", "relative"), [
    ("error_rate<0.01", "error_rate", "<", 0.01, False),
    ("p95_latency<1.5x", "p95_latency", "<", 1.5, True),
    ("p95_latency<20ms", "p95_latency", "<", 20.0, False),
    ("drift<0.2", "drift", "<", 0.2, False),
    ("agreement>0.95", "agreement", ">", 0.95, False),
    ("accuracy>.9", "accuracy", ">", 0.9, False),
    (" class_shift < 0.25 ", "class_shift", "<", 0.25, False),
])  # fmt: skip
def test_gates_parse(text: str, metric: str, op: str, threshold: float, relative: bool) -> None:
    g = Gate.parse(text)
    assert (g.metric, g.op, g.threshold, g.relative) == (metric, op, threshold, relative)
    assert Gate.parse(str(g)) == g


@pytest.mark.parametrize(("text", "message"), [
    ("error_rate", "expected METRIC<NUMBER"),
    ("error_rate<=0.01", "expected METRIC<NUMBER"),
    ("error_rate<abc", "expected METRIC<NUMBER"),
    ("speed<3", "unknown metric 'speed'"),
    ("drift<0.2x", "only p95_latency takes a unit"),
    ("", "expected METRIC<NUMBER"),
])  # fmt: skip
def test_bad_gates_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Gate.parse(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "stage"), [
    ("10%", Stage(percent=10.0)),
    ("100%", Stage(percent=100.0)),
    ("all", Stage(percent=100.0)),
    ("0.5%", Stage(percent=0.5)),
    ("device:a,b", Stage(devices=("a", "b"))),
    ("group:canary", Stage(group="canary")),
])  # fmt: skip
def test_stages_parse(text: str, stage: Stage) -> None:
    assert Stage.parse(text) == stage
    assert Stage.parse(str(stage)) == stage


@pytest.mark.parametrize("text", ["0%", "101%", "ten", "device:", "group:", "-5%", "10"])
def test_bad_stages_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="stage"):
        Stage.parse(text)


def test_spec_and_state_round_trip() -> None:
    s = spec(canary=Stage.parse("device:d01,d02"))
    assert RolloutSpec.from_dict(s.to_dict()) == s
    _, st = started(s)
    assert RolloutState.from_dict(st.to_dict()) == st


def test_a_spec_stored_before_min_labels_reads_with_the_default() -> None:
    s = spec(gates=(Gate.parse("accuracy>0.9"),), min_labels=7)
    assert RolloutSpec.from_dict(s.to_dict()).min_labels == 7
    old = {k: v for k, v in s.to_dict().items() if k != "min_labels"}
    assert RolloutSpec.from_dict(old) == replace(s, min_labels=MIN_LABELS)


@pytest.mark.parametrize("kw", [dict(bake=-1), dict(min_samples=0), dict(wave_timeout=0),
                                dict(waves=()), dict(min_labels=0)])  # fmt: skip
def test_bad_specs_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        spec(**kw)


# -- selection ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("canary", "expect"), [
    ("10%", 1), ("25%", 3), ("100%", 10), ("device:d02,d05", ("d02", "d05")),
    ("group:canary", ("d03", "d07")), ("device:d02,nope", ("d02",)),
])  # fmt: skip
def test_the_canary_selects(canary: str, expect: int | tuple[str, ...]) -> None:
    d, st = started(spec(canary=Stage.parse(canary)))
    assert d.action == "start" and st.phase == "deploying" and st.wave == 0
    if isinstance(expect, int):
        assert len(d.devices) == expect
    else:
        assert d.devices == expect
    assert st.released == d.devices and st.previous == dict.fromkeys(d.devices, "1")


def test_shares_pick_online_devices_only_and_are_deterministic() -> None:
    s = spec(canary=Stage.parse("50%"))
    offline = ("d00", "d01", "d02")
    d, _ = decide(s, RolloutState(), rows(offline=offline), Evidence(), 0)
    assert len(d.devices) == 5 and not set(d.devices) & set(offline)
    assert decide(s, RolloutState(), rows(offline=offline), Evidence(), 99)[0].devices == d.devices


def test_a_stage_selecting_nobody_is_skipped_and_recorded() -> None:
    s = spec(canary=Stage.parse("group:canary"), waves=(Stage.parse("10%"), Stage.parse("100%")))
    st = baking(s)
    d, st = decide(s, st, on_candidate(st), evidence(st.wave_devices), 60)
    assert d.action == "promote" and st.wave == 2 and len(d.devices) == 8
    assert d.evidence["skipped_stages"] == ["10%"]


# -- the happy path ----------------------------------------------------------------------------
def test_a_good_model_goes_through_every_wave_to_done() -> None:
    s = spec()
    now, seq = 0.0, 5
    d, st = started(s, now)
    actions = [d.action]
    while not st.final:
        if d.action in ("start", "promote"):
            st = deployed(st, seq, now)
        rs = on_candidate(st, seq)
        d, st = decide(s, st, rs, evidence(st.wave_devices), now)
        actions.append(d.action)
        if d.action in ("start", "promote"):
            seq += 1
        now += 30
        assert now < 10_000
    assert actions.count("promote") == 2 and actions[-1] == "done"
    assert st.phase == "done" and st.released == tuple(DEVICES)
    assert d.evidence["not_moved"] == []


def test_a_wave_is_installing_until_every_device_runs_its_release() -> None:
    s = spec()
    _, st = started(s)
    st = deployed(st, 5, 0)
    d, st2 = decide(s, st, rows(), Evidence(), 10)
    assert (d.action, d.reason, st2.phase) == ("wait", "installing", "deploying")
    assert set(d.evidence["not_installed"]) == set(st.wave_devices)
    older = rows(on=dict.fromkeys(st.wave_devices, ("2", 4)))  # an older release of v2
    assert decide(s, st, older, Evidence(), 10)[0].reason == "installing"


def test_a_wave_whose_release_was_never_built_is_reissued() -> None:
    s = spec()
    d1, st = started(s)
    d2, st2 = decide(s, st, rows(), Evidence(), 5)
    assert d2.action == "start" and d2.devices == d1.devices and st2 == st


# -- gates -------------------------------------------------------------------------------------
BAD = {
    "error_rate": (replace(GOOD, errors=2), "error_rate<0.01", 0.02),
    "p95_latency": (replace(GOOD, p95_ms=2.0), "p95_latency<1.5x", 2.0),
    "p95_absolute": (replace(GOOD, p95_ms=30.0), "p95_latency<20ms", 30.0),
    "class_shift": (replace(GOOD, class_counts=SHIFTED), "class_shift<0.25", None),
    "drift": (replace(GOOD, drift=0.5), "drift<0.2", 0.5),
    "agreement": (replace(GOOD, agreement=0.6), "agreement>0.95", 0.6),
    "accuracy": (replace(GOOD, accuracy=0.1, labelled=40), "accuracy>0.9", 0.1),
}
FINE = {
    "error_rate": replace(GOOD, errors=0),
    "p95_latency": replace(GOOD, p95_ms=1.4),
    "p95_absolute": replace(GOOD, p95_ms=19.0),
    "class_shift": replace(GOOD, class_counts={"0": 55, "1": 33, "2": 12}),
    "drift": replace(GOOD, drift=0.1),
    "agreement": replace(GOOD, agreement=0.99),
    "accuracy": replace(GOOD, accuracy=0.97, labelled=40),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_failing_gate_halts_at_once_and_rolls_back_every_moved_device(case: str) -> None:
    health, gate, value = BAD[case]
    s = spec(gates=(Gate.parse(gate),), canary=Stage.parse("20%"))
    st = baking(s)
    bad = st.wave_devices[0]
    d, st2 = decide(s, st, on_candidate(st), evidence(st.wave_devices, **{bad: health}), 1)
    assert d.action == "halt" and st2.phase == "rolling_back"
    assert d.devices == st.released and gate in d.reason and bad in d.reason
    [failed] = [g for g in d.evidence["gates"] if not g["passed"]]
    assert failed["device"] == bad and failed["gate"] == gate
    if value is not None:
        assert failed["value"] == pytest.approx(value)
    d, st3 = decide(s, st2, on_candidate(st), Evidence(), 2)  # re-issued until carried out
    assert d.action == "halt" and d.devices == st.released
    assert rolled_back(st3).phase == "rolled_back"
    assert decide(s, rolled_back(st3), [], Evidence(), 3)[0].action == "none"


@pytest.mark.parametrize("case", sorted(FINE))
def test_a_passing_gate_promotes_after_the_bake(case: str) -> None:
    gate = BAD[case][1]
    s = spec(gates=(Gate.parse(gate),))
    st = baking(s)
    ev = evidence(st.wave_devices, FINE[case])
    d, _ = decide(s, st, on_candidate(st), ev, 30)
    assert (d.action, d.reason) == ("wait", "baking")
    d, st2 = decide(s, st, on_candidate(st), ev, 60)
    assert d.action == "promote" and st2.wave == 1
    assert all(g["passed"] for g in d.evidence["gates"]) and d.evidence["gates"]


def test_a_label_permuted_model_passes_error_and_latency_but_not_class_shift() -> None:
    s = spec()
    st = baking(s)
    d, _ = decide(s, st, on_candidate(st), evidence(st.wave_devices, replace(
        GOOD, class_counts=SHIFTED)), 1)  # fmt: skip
    assert d.action == "halt" and "class_shift" in d.reason
    assert {g["metric"] for g in d.evidence["gates"] if g["passed"]} == {
        "error_rate",
        "p95_latency",
    }


def test_class_shift_uses_the_device_baseline_then_the_fleet_one() -> None:
    s = spec(gates=(Gate.parse("class_shift<0.25"),))
    st = baking(s)
    dev = st.wave_devices[0]
    # the device's own baseline is skewed like its candidate: no shift, though the fleet is uniform
    ev = Evidence(candidate={dev: GOOD}, baseline={dev: BASE, "d09": replace(
        BASE, class_counts=UNIFORM)})  # fmt: skip
    d, _ = decide(s, st, on_candidate(st), ev, 60)
    assert d.action == "promote"
    # no baseline on the device: the pooled fleet baseline (uniform) shows the skew
    ev = Evidence(candidate={dev: GOOD}, baseline={"d09": replace(BASE, class_counts=UNIFORM)})
    d, _ = decide(s, st, on_candidate(st), ev, 60)
    assert d.action == "halt" and d.evidence["gates"][0]["baseline"] == UNIFORM


def test_relative_gates_without_any_baseline_pass_and_say_so() -> None:
    s = spec()
    st = baking(s)
    ev = Evidence(candidate=dict.fromkeys(st.wave_devices, GOOD))
    d, _ = decide(s, st, on_candidate(st), ev, 60)
    assert d.action == "promote"
    assert {g["baseline"] is None for g in d.evidence["gates"]} == {True}


def test_missing_evidence_for_a_gate_means_not_healthy_yet() -> None:
    s = spec(gates=(Gate.parse("agreement>0.95"),))
    st = baking(s)
    d, _ = decide(s, st, on_candidate(st), evidence(st.wave_devices), 60)
    assert d.action == "wait" and "no agreement evidence" in str(d.evidence["not_ready"])


@pytest.mark.parametrize("labelled", [0, 19])
def test_accuracy_without_enough_labels_is_not_healthy_and_halts_after_the_timeout(
    labelled: int,
) -> None:
    """No labels (or too few) in the bake window: like any missing evidence, the device is not
    healthy; the wave waits, then halts at its timeout; the accuracy is never judged."""
    s = spec(gates=(Gate.parse("error_rate<0.01"), Gate.parse("accuracy>0.9")))
    st = baking(s)
    unlabelled = replace(GOOD, labelled=labelled, accuracy=None if not labelled else 0.0)
    ev = evidence(st.wave_devices, unlabelled)
    d, _ = decide(s, st, on_candidate(st), ev, 60)
    [dev] = st.wave_devices
    assert d.action == "wait" and d.evidence["not_ready"] == {
        dev: f"has {labelled} of {s.min_labels} labels"
    }
    assert [g["gate"] for g in d.evidence["gates"]] == ["error_rate<0.01"]  # judged: the rest
    d, _ = decide(s, st, on_candidate(st), ev, 60 + 121)
    assert d.action == "halt" and f"{dev} has {labelled} of 20 labels" in d.reason


def test_accuracy_is_judged_from_min_labels_on_with_the_count_in_the_evidence() -> None:
    s = spec(gates=(Gate.parse("accuracy>0.9"),), min_labels=20)
    st = baking(s)
    d, _ = decide(s, st, on_candidate(st), evidence(st.wave_devices, replace(
        GOOD, labelled=20, accuracy=0.95)), 60)  # fmt: skip
    assert d.action == "promote"
    [g] = d.evidence["gates"]
    assert (g["metric"], g["value"], g["labelled"], g["passed"]) == ("accuracy", 0.95, 20, True)
    d, _ = decide(s, st, on_candidate(st), evidence(st.wave_devices, replace(
        GOOD, labelled=25, accuracy=0.6)), 1)  # fmt: skip
    assert d.action == "halt" and "accuracy>0.9" in d.reason and "accuracy=0.6" in d.reason
    assert d.evidence["gates"][0]["labelled"] == 25


# -- samples, offline, timeouts ----------------------------------------------------------------
def test_too_few_samples_is_not_healthy_and_its_gates_are_not_judged() -> None:
    s = spec()
    st = baking(s)
    few = replace(GOOD, count=10, errors=5, class_counts=SHIFTED)  # bad, but too little evidence
    d, _ = decide(s, st, on_candidate(st), evidence(st.wave_devices, few), 60)
    assert d.action == "wait" and d.evidence["gates"] == []
    assert "10 of 50 samples" in next(iter(d.evidence["not_ready"].values()))


def test_an_offline_device_is_never_healthy_and_halts_the_wave_after_the_timeout() -> None:
    s = spec(canary=Stage.parse("20%"))
    st = baking(s)
    gone = st.wave_devices[1]
    rs = on_candidate(st, offline=(gone,))
    d, _ = decide(s, st, rs, evidence(st.wave_devices), 60)  # its numbers are good...
    assert d.action == "wait" and d.evidence["not_ready"] == {gone: "is offline"}
    d, _ = decide(s, st, rs, evidence(st.wave_devices), 60 + 120)
    assert d.action == "wait"
    d, st2 = decide(s, st, rs, evidence(st.wave_devices), 60 + 121)
    assert d.action == "halt" and f"{gone} is offline" in d.reason
    assert st2.phase == "rolling_back" and gone in d.devices


def test_a_device_that_comes_back_healthy_lets_the_wave_pass() -> None:
    s = spec(canary=Stage.parse("20%"))
    st = baking(s)
    gone = st.wave_devices[1]
    assert decide(s, st, on_candidate(st, offline=(gone,)), evidence(st.wave_devices),
                  90)[0].action == "wait"  # fmt: skip
    assert decide(s, st, on_candidate(st), evidence(st.wave_devices), 91)[0].action == "promote"


def test_a_device_moved_off_the_candidate_is_not_healthy() -> None:
    s = spec()
    st = baking(s)
    dev = st.wave_devices[0]
    rs = rows(on={dev: ("1", 9)})  # someone released the old version over it
    d, _ = decide(s, st, rs, evidence(st.wave_devices), 60)
    assert d.action == "wait" and "no longer runs the candidate" in d.evidence["not_ready"][dev]


def test_a_wave_not_installed_in_time_halts() -> None:
    s = spec()
    _, st = started(s)
    st = deployed(st, 5, 0)
    d, st2 = decide(s, st, rows(), Evidence(), 121)
    assert d.action == "halt" and "did not install release 5" in d.reason
    assert st2.phase == "rolling_back"


def test_an_install_failure_of_the_wave_release_halts_at_once() -> None:
    s = spec()
    _, st = started(s)
    st = deployed(st, 5, 0)
    dev = st.wave_devices[0]
    rs = [replace(r, failed_sequence=5, failed_reason="smoke: mismatch") if r.device_id == dev
          else r for r in rows()]  # fmt: skip
    d, _ = decide(s, st, rs, Evidence(), 1)
    assert d.action == "halt" and d.evidence["install_failed"] == {dev: "smoke: mismatch"}
    old = [replace(r, failed_sequence=4) for r in rows()]  # an older failure does not count
    assert decide(s, st, old, Evidence(), 1)[0].action == "wait"


# -- operator actions --------------------------------------------------------------------------
def test_pause_holds_decisions_and_resume_continues() -> None:
    s = spec()
    st = pause(baking(s))
    d, st2 = decide(s, st, on_candidate(st), evidence(st.wave_devices), 600)
    assert (d.action, d.reason, st2) == ("wait", "paused", st)
    d, _ = decide(s, resume(st), on_candidate(st), evidence(st.wave_devices), 600)
    assert d.action == "promote"


def test_abort_leaves_devices_and_is_final() -> None:
    s = spec()
    st = abort(baking(s))
    assert st.phase == "aborted" and st.final
    assert decide(s, st, on_candidate(st), Evidence(), 1)[0].action == "none"
    with pytest.raises(ValueError, match="cannot pause a rollout that is aborted"):
        pause(st)


def test_a_manual_rollback_works_also_after_done() -> None:
    s = spec()
    st = replace(baking(s), phase="done")
    st = request_rollback(st, "operator")
    d, _ = decide(s, st, [], Evidence(), 1)
    assert d.action == "halt" and d.devices == st.released and d.reason == "operator"
    with pytest.raises(ValueError, match="already rolled back"):
        request_rollback(rolled_back(st), "again")


@pytest.mark.parametrize(("observed", "expected", "low", "high"), [
    (UNIFORM, UNIFORM, 0.0, 1e-12),
    (SKEWED, SKEWED, 0.0, 1e-12),
    ({"0": 55, "1": 33, "2": 12}, SKEWED, 0.0, 0.05),
    (SHIFTED, SKEWED, 5.0, 100.0),
    (SKEWED, UNIFORM, 0.5, 10.0),
    ({}, SKEWED, 0.0, 0.0),
])  # fmt: skip
def test_psi(observed: dict[str, int], expected: dict[str, int], low: float, high: float
             ) -> None:  # fmt: skip
    assert low <= psi(observed, expected) <= high
