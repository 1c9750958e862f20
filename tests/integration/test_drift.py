"""The closed loop on the fleet rig: drift injected into some agents' inputs is detected on
exactly those devices (their own sketches, reported as telemetry, ingested by ``coordinator
serve``), the retraining trigger fires, an FL run of 2 rounds starts and its model reaches
the canary group through the signed release path; the other devices keep their model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from edgefleet.coordinator import drift
from edgefleet.federated.retrain import RetrainPolicy, RetrainTrigger, decide
from edgefleet.federated.service import ReleasePolicy
from edgefleet.simulations.fl import BOOTSTRAP, FlFleet, FlSimConfig, fl_fleet
from edgefleet.simulations.wait import wait_until

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO

SHIFTED = [19, 20, 27, 28, 35, 36]  # centre pixels: +0.4 (clipped to [0, 1])
DRIFTED = {"fl-0", "fl-1"}
CANARY = ["fl-3"]
MIN_SAMPLES = 500  # rows behind a report (coordinator.drift.MIN_SAMPLES: false alarms below)
PASSES = 20


def _shift(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, SHIFTED] = np.clip(out[:, SHIFTED] + 0.4, 0.0, 1.0)
    return out


def _traffic(sim: FlFleet, device: str, x: np.ndarray) -> None:
    """Live requests through the daemon's recorder (as the HTTP API makes them), in a new
    order each pass: the monitor sees a sampled share of the calls."""
    recorder = sim.fleet.agents[device].daemon.recorder
    rng = np.random.default_rng(sorted(sim.devices).index(device))
    for _ in range(PASSES):
        xs = x[rng.permutation(len(x))]
        for i in range(0, len(xs), 10):
            recorder.predict(xs[i : i + 10])


SLOW_MOSQUITTO = [pytest.mark.slow, pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)]


@pytest.mark.parametrize("broker", ["memory", pytest.param("mosquitto", marks=SLOW_MOSQUITTO)])
def test_drift_on_exactly_the_shifted_devices_retrains_and_reaches_the_canary(
    tmp_path: Path, broker: str
) -> None:
    cfg = FlSimConfig(agents=4, rounds=2, broker=broker, hidden=16, local_epochs=1, release="",
                      round_timeout=30.0)  # fmt: skip
    with fl_fleet(tmp_path, cfg) as sim:
        c = sim.fleet.coordinator
        c.registry.add_to_group("canary", CANARY)
        x = sim.federation.x_test.astype(np.float32)
        for device in sim.devices:
            _traffic(sim, device, _shift(x) if device in DRIFTED else x)

        def reported() -> list[drift.DeviceDrift]:
            rows = drift.latest(c.registry, since=0, name=BOOTSTRAP)
            return rows if {r.device_id for r in rows if r.n >= MIN_SAMPLES} == set(
                sim.devices) else []  # fmt: skip

        rows = {r.device_id: r for r in wait_until(reported, "drift reports from every agent")}
        for device, r in rows.items():
            hot = {i for i, psi, _ in r.features if psi > drift.DEFAULT_THRESHOLD}
            assert hot == (set(SHIFTED) if device in DRIFTED else set()), (device, r.features)

        trigger = RetrainTrigger(
            c, sim.service, spec_for=cfg.spec, release=ReleasePolicy(selector="group:canary"),
            policy=RetrainPolicy(name=BOOTSTRAP, min_samples=MIN_SAMPLES, min_devices=2),
        )  # fmt: skip
        outcome = trigger.tick()
        alerts = drift.alerts(c.registry, name=BOOTSTRAP)
        assert {a.device_id for a in alerts} == DRIFTED  # exactly those, each once
        assert all(a.version == "1" and {int(f[0]) for f in a.features} <= set(SHIFTED)
                   for a in alerts)  # fmt: skip
        assert outcome is not None and outcome.released is not None
        assert all(a.state == "handled" for a in alerts)
        assert {a.run_id for a in alerts} == {outcome.result.rounds[0].lineage["fl"]["run_id"]}
        assert len([r for r in outcome.result.rounds if r.version]) == 2
        assert sorted(outcome.released.targets) == CANARY
        sim.fleet.wait_active(CANARY, outcome.released.sequence)
        for device in sim.devices:
            served = sim.fleet.agents[device].agent.active
            assert served is not None
            want = (cfg.name, outcome.released_version) if device in CANARY else (BOOTSTRAP, "1")
            assert (served.manifest.name, served.manifest.model_version) == want
        assert trigger.tick() is None  # handled, within the cooldown: no second run


@dataclasses.dataclass
class _Alert:
    device_id: str


@pytest.mark.parametrize(("alerts", "last_run", "now", "policy", "starts"), [
    ([], None, 100.0, {}, None),
    ([_Alert("a")], None, 100.0, {}, "drift on 1 devices (a)"),
    ([_Alert("a"), _Alert("a")], None, 100.0, {"min_devices": 2}, None),  # one device, twice
    ([_Alert("b"), _Alert("a")], None, 100.0, {"min_devices": 2}, "drift on 2 devices (a, b)"),
    ([_Alert("a")], 50.0, 100.0, {"cooldown": 60}, None),  # within the cooldown
    ([_Alert("a")], 30.0, 100.0, {"cooldown": 60}, "drift on 1 devices (a)"),
    ([], None, 100.0, {"schedule": 3600}, "schedule: every 3600 s"),
    ([], 0.0, 100.0, {"schedule": 3600}, None),
    ([], 0.0, 3600.0, {"schedule": 3600}, "schedule: every 3600 s"),
])  # fmt: skip
def test_the_trigger_decides(alerts: list[_Alert], last_run: float | None, now: float,
                             policy: dict[str, float], starts: str | None) -> None:  # fmt: skip
    assert decide(alerts, RetrainPolicy(name="m", **policy), last_run=last_run, now=now) == starts  # type: ignore[arg-type]


@pytest.mark.parametrize(("extra", "message"), [
    (["--release-to", "canary"], "expected group:G"),
    (["--release-to", "group:canary", "--threshold", "0"], "--threshold must be above 0"),
    (["--release-to", "group:canary"], "no broker"),
])  # fmt: skip
def test_retrain_on_drift_refuses_in_one_line(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefleet.coordinator.home import Coordinator

    from edgefleet import cli

    Coordinator.init(tmp_path / "c")
    argv = ["fl", "retrain-on-drift", "--home", str(tmp_path / "c"), "--name", "m",
            "--rounds", "2", "--once", *extra]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
