"""The fleet rig itself, over the in-memory broker: delivery, faults, observers.

Each fault is checked for its effect (the release still converges, and the rig's counters show
the fault really happened), so a rig whose fault injection silently did nothing fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from edgefleet.simulations.fleet import Fleet, open_fleet
from edgefleet.simulations.homes import ModelFile
from edgefleet.simulations.wait import wait_until

from tests.conftest import Digits

pytestmark = [pytest.mark.timeout(120)]
SEGMENT = 4096  # bytes: the ~39 KB digits model is ~10 chunks


@pytest.fixture
def fleet(tmp_path: Path, digits_v1: Digits) -> Iterator[Fleet]:
    models = [ModelFile(name="digits", path=digits_v1.onnx, version="1"),
              ModelFile(name="digits", path=digits_v1.tflite, version="2")]
    with open_fleet(tmp_path, ["dev-a", "dev-b", "dev-c"], models=models,
                    segment_size=SEGMENT) as running:
        yield running


def test_a_release_reaches_every_agent_in_memory(fleet: Fleet, digits_v1: Digits) -> None:
    assert fleet.broker.kind == "memory" and not fleet.broker.networked
    fleet.start_service()
    agents = [fleet.start_agent(d) for d in fleet.devices]
    release = fleet.release("1")
    fleet.wait_active(fleet.devices, release.sequence)
    x = np.load(digits_v1.test_path)["x"][:8]
    for running in agents:
        assert running.active_sequence() == release.sequence
        assert running.checkpoints.activations == 1
        np.testing.assert_allclose(running.agent.predict(x), digits_v1.proba(x), atol=1e-5)
    assert fleet.gate.answered["dev-a"] >= 1


def test_dropped_chunk_replies_are_re_requested(fleet: Fleet) -> None:
    fleet.start_service()
    running = fleet.start_agent("dev-a", request_timeout=0.3)
    rule = fleet.drop(lambda topic, _payload, _sender: topic == "ef/v1/dev/dev-a/chunk")
    release = fleet.release("1", "device:dev-a")
    wait_until(lambda: rule.hits >= 3, "three chunk replies dropped")
    rule.remove()
    fleet.wait_active(["dev-a"], release.sequence)
    assert running.active_sequence() == release.sequence
    assert fleet.broker.memory is not None and fleet.broker.memory.dropped["injected"] >= 3


def test_a_delayed_agent_catches_up_when_its_messages_arrive(fleet: Fleet) -> None:
    fleet.start_service()
    running = fleet.start_agent("dev-b")
    resume = fleet.delay("dev-b")
    release = fleet.release("1", "device:dev-b")
    assert running.daemon.handled["release"] == 0  # held: the offer has not reached it
    resume()
    running.daemon.wait_handled("release", 1)
    fleet.wait_active(["dev-b"], release.sequence)


def test_kicked_clients_reconnect_and_the_release_converges(fleet: Fleet) -> None:
    fleet.start_service()
    for d in ("dev-a", "dev-b"):
        fleet.start_agent(d)
    fleet.gate.close(["dev-a", "dev-b"], allow=2)
    release = fleet.release("1")
    fleet.gate.wait_held(["dev-a", "dev-b"])
    fleet.disconnect("agent-dev-a")
    fleet.disconnect("coordinator-sim")
    fleet.gate.open()
    fleet.wait_active(["dev-a", "dev-b"], release.sequence)


def test_a_killed_agent_resumes_from_disk_on_restart(fleet: Fleet) -> None:
    fleet.start_service()
    fleet.start_agent("dev-c", request_timeout=0.3)
    fleet.gate.close(["dev-c"], allow=3)
    release = fleet.release("1", "device:dev-c")
    fleet.gate.wait_held(["dev-c"])
    fleet.kill("dev-c")
    part = fleet.homes["dev-c"] / "downloads" / f"{release.bundle_id}.part"
    assert part.exists()  # the half-done download is left on disk
    fleet.gate.open()
    again = fleet.start_agent("dev-c", request_timeout=0.3)
    fleet.wait_active(["dev-c"], release.sequence)
    assert again.active_sequence() == release.sequence
    assert again.checkpoints.activations == 1


def test_a_broker_restart_keeps_sessions_and_the_fleet_converges(fleet: Fleet) -> None:
    fleet.start_service()
    agents = [fleet.start_agent(d) for d in ("dev-a", "dev-b")]
    fleet.gate.close(["dev-a", "dev-b"], allow=2)
    release = fleet.release("1")
    fleet.gate.wait_held(["dev-a", "dev-b"])
    fleet.broker.restart()
    fleet.gate.open()
    fleet.wait_active(["dev-a", "dev-b"], release.sequence)
    assert [a.checkpoints.activations for a in agents] == [1, 1]


def test_agent_processes_need_a_real_broker(fleet: Fleet) -> None:
    with pytest.raises(RuntimeError, match="real broker"):
        fleet.spawn_agent("dev-a")
