"""Staged rollouts in a simulated fleet, gated on the agents' real inference telemetry.

The agents run digits v1 and serve a simulated workload (``simulations.workload``: each device
sees its own two digit classes). Then:

- a deliberately worse model (trained on shifted labels: it installs, passes its own smoke
  test, never errs, and answers wrongly on every live input) is canaried: the class_shift
  gate halts it and the canary is rolled back to v1 by a new release with a higher sequence;
- a good model (v2, the same MLP exported to TFLite) is promoted through every wave;
- an agent killed mid-wave goes offline (its last will) and is never counted healthy: the
  wave waits, then halts at its timeout;
- over mosquitto, ``edgefleet rollout start --follow`` drives a rollout to the end.

Assertions are on decisions, states and what the devices run, never on time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from edgefleet.coordinator import telemetry
from edgefleet.coordinator.rollout import Gate, RolloutSpec, Stage
from edgefleet.coordinator.rollouts import Rollout, Rollouts
from edgefleet.protocol import topics
from edgefleet.simulations.workload import Workload, write_permuted_digits

from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO
from .fleet import BROKERS, FleetHarness, open_fleet, wait_until

pytestmark = [pytest.mark.timeout(240)]
DEVICES = [f"dev-{i}" for i in range(3)]
#: class_shift at 1: windows of a few dozen rows per device have PSI noise up to ~0.5 for a
#: good model; the label-shifted one reads ~8 (its classes are disjoint from the truth's)
GATES = ("error_rate<0.01", "p95_latency<1000ms", "class_shift<1")
BASELINE_CALLS = 40
MIN_SAMPLES = 30


@pytest.fixture(scope="module")
def worse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_permuted_digits(tmp_path_factory.mktemp("worse"))


def spec(version: str, **kw: object) -> RolloutSpec:
    base: dict[str, object] = dict(
        name="digits", version=version, canary=Stage.parse("25%"),
        waves=(Stage.parse("50%"), Stage.parse("100%")),
        gates=tuple(Gate.parse(g) for g in GATES), bake=1.0, min_samples=MIN_SAMPLES,
        wave_timeout=60.0)  # fmt: skip
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


@contextmanager
def running_fleet(tmp_path: Path, digits: Digits, kind: str, worse: Path | None = None,
                  **agent_config: Any) -> Iterator[tuple[FleetHarness, Workload]]:  # fmt: skip
    """Every device on v1 with its baseline telemetry stored; ``worse`` registered as v3."""
    since = int(time.time()) - 1
    with open_fleet(tmp_path, digits, DEVICES, kind=kind,  # type: ignore[arg-type]
                    **agent_config) as fleet:  # fmt: skip
        fleet.start_service()
        for d in DEVICES:
            fleet.start_agent(d)
        first = fleet.release("1", "all")
        fleet.wait_active(DEVICES, first.sequence)
        if worse is not None:
            fleet.coordinator.register_model("digits", worse, version="3")
        work = Workload(fleet)
        work.step(BASELINE_CALLS)
        wait_until(lambda: all(h.count == BASELINE_CALLS for h in telemetry.version_health(
            fleet.coordinator.registry, name="digits", version="1", since=since,
            device_ids=DEVICES).values()), "the v1 baseline telemetry")  # fmt: skip
        yield fleet, work


def drive(ro: Rollouts, rid: int, work: Workload, calls: int = 4) -> Rollout:
    """The workload and the controller, step by step, until the rollout is final."""
    def final() -> Rollout | None:
        work.step(calls)
        ro.tick(rid)
        r = ro.store.get(rid)
        return r if r.state.final else None

    return wait_until(final, f"rollout {rid} to finish", timeout=120, interval=0.05)


@BROKERS
def test_a_worse_model_is_halted_on_its_canary_and_rolled_back(
    tmp_path: Path, digits_v1: Digits, worse: Path, kind: str
) -> None:
    with running_fleet(tmp_path, digits_v1, kind, worse) as (fleet, work):
        assert fleet.service is not None
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(spec("3"))
        r = drive(ro, rid, work)

        assert r.state.phase == "rolled_back"
        [canary] = r.state.released
        decisions = ro.store.decisions(rid)
        assert [d["action"] for d in decisions if d["action"] != "wait"] == ["start", "halt"]
        start, halt = decisions[0], decisions[-1]
        assert start["devices"] == [canary] and halt["devices"] == [canary]
        assert "class_shift<1" in halt["reason"] and canary in halt["reason"]
        gates = {g["gate"]: g for g in halt["evidence"]["gates"] if g["device"] == canary}
        # it installed (smoke test passed), answers every call, fast enough: only its outputs
        assert gates["error_rate<0.01"]["passed"] and gates["error_rate<0.01"]["value"] == 0
        assert gates["p95_latency<1000ms"]["passed"]
        shift = gates["class_shift<1"]
        assert not shift["passed"] and shift["value"] > 3.0
        assert {int(c) for c in shift["baseline"]} == work.classes(canary)  # v1 saw the truth
        assert halt["evidence"]["rollback"] == {"1": [canary]}

        [back] = halt["sequences"]
        assert back > start["sequences"][0]  # a new release: anti-rollback keeps working
        fleet.wait_active([canary], back)
        assert fleet.agents[canary].active_sequence() == back
        assert fleet.agents[canary].agent.status().active.version == "1"
        for d in DEVICES:
            if d != canary:  # never moved
                assert fleet.device(d).active_version == "1"
                assert (fleet.agents[d].active_sequence() or 0) < start["sequences"][0]


def test_a_good_model_is_promoted_through_every_wave(tmp_path: Path, digits_v1: Digits) -> None:
    with running_fleet(tmp_path, digits_v1, "memory") as (fleet, work):
        assert fleet.service is not None
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(spec("2"))
        r = drive(ro, rid, work)

        assert r.state.phase == "done" and set(r.state.released) == set(DEVICES)
        decisions = ro.store.decisions(rid)
        moves = [d for d in decisions if d["action"] in ("start", "promote")]
        assert [len(d["devices"]) for d in moves] == [1, 1, 1]  # 25%, 50%, 100% of 3
        assert decisions[-1]["action"] == "done"
        judged = [d for d in decisions if d["action"] in ("promote", "done")]
        assert len(judged) == 3  # canary, wave 1, wave 2: each passed its gates
        for d in judged:
            gates = d["evidence"]["gates"]
            assert gates and all(g["passed"] for g in gates)
            assert {g["gate"] for g in gates} == set(GATES)
        for dev in DEVICES:
            assert fleet.agents[dev].agent.status().active.version == "2"


def test_an_agent_killed_mid_wave_is_offline_and_never_counted_healthy(
    tmp_path: Path, digits_v1: Digits
) -> None:
    with running_fleet(tmp_path, digits_v1, "memory") as (fleet, work):
        assert fleet.service is not None and fleet.broker.memory is not None
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(spec("2", canary=Stage.parse("50%"), waves=(Stage.parse("100%"),),
                            wave_timeout=2.0))  # fmt: skip

        def baking() -> bool:
            work.step(2)
            ro.tick(rid)
            return ro.store.get(rid).state.phase == "baking"

        wait_until(baking, "the canary to bake")
        victim, survivor = ro.store.get(rid).state.wave_devices
        # dies without a goodbye: the broker publishes its offline will
        assert fleet.broker.memory.kill(topics.device_client_id(victim))
        wait_until(lambda: fleet.device(victim).state == "offline", f"{victim} offline")
        doomed = fleet.agents.pop(victim)
        doomed.stop()

        r = drive(ro, rid, work)  # the survivor keeps serving; the victim says nothing
        assert r.state.phase == "rolled_back"
        decisions = ro.store.decisions(rid)
        waits = [d for d in decisions if d["action"] == "wait"
                 and d["evidence"].get("not_ready", {}).get(victim) == "is offline"]  # fmt: skip
        assert waits, "the wave waited on the offline device"
        halt = decisions[-1]
        assert halt["action"] == "halt" and f"{victim} is offline" in halt["reason"]
        assert victim not in [g["device"] for g in halt["evidence"]["gates"] if not g["passed"]]
        assert survivor not in halt["evidence"]["not_ready"]  # healthy, but the wave is not
        assert [d["action"] for d in decisions].count("promote") == 0
        fleet.wait_active([survivor], halt["sequences"][0])
        assert fleet.agents[survivor].agent.status().active.version == "1"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
def test_the_cli_follows_a_rollout_to_the_end_over_mosquitto(
    tmp_path: Path, digits_v1: Digits, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefleet.cli import main

    with running_fleet(tmp_path, digits_v1, "mosquitto") as (fleet, work):
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                work.step(2)
                stop.wait(0.02)

        feeder = threading.Thread(target=serve, daemon=True)
        feeder.start()
        try:
            capsys.readouterr()
            code = main(["rollout", "start", "--home", str(fleet.coordinator.home),
                         "--name", "digits", "--version", "2", "--canary", "25%",
                         "--waves", "100%", "--bake", "1s", "--min-samples", str(MIN_SAMPLES),
                         *[a for g in GATES for a in ("--gate", g)], "--follow",
                         "--interval", "0.2"])  # fmt: skip
        finally:
            stop.set()
            feeder.join()
        out = capsys.readouterr().out
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0].startswith("rollout 1: digits 2, canary 25%, waves 100%")
        assert any(" start: canary (25%): 1 devices [" in line for line in lines)
        assert any(" promote: wave 1 (100%): 2 devices [" in line for line in lines)
        assert lines[-1].endswith("done: every stage passed")
        for dev in DEVICES:
            assert fleet.device(dev).active_version == "2"
        assert main(["rollout", "status", "--home", str(fleet.coordinator.home)]) == 0
        status = capsys.readouterr().out
        assert status.startswith("rollout 1: digits 2 — done") and "ok   dev-" in status
