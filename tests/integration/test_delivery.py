"""Release delivery end to end: coordinator service, mosquitto with passwords and ACL, agents.

Each test builds its own fleet (``fleet.open_fleet``): a coordinator home with the digits
model (4 KiB segments, ~10 chunks), enrolled agent homes and a broker on a free loopback port.
Mid-transfer moments are made deterministic with a ``ChunkGate`` that lets only the first k
chunks per device out until it is opened.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.protocol.manifest import Manifest

from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO
from .fleet import BROKERS, TIMEOUT, digits_test_split, open_fleet, statuses, wait_until

pytestmark = [pytest.mark.timeout(120)]
needs_mosquitto = pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
ATOL = 1e-5


def _assert_predicts_like_sklearn(predict: object, digits: Digits) -> None:
    x, y = digits_test_split(digits)
    probs = predict(x)  # type: ignore[operator]
    assert float(np.mean(probs.argmax(axis=1) == y)) == digits.accuracy
    np.testing.assert_allclose(probs, digits.proba(x), atol=ATOL, rtol=0)


@BROKERS
def test_release_installs_on_every_agent(tmp_path: Path, digits_v1: Digits, kind: str) -> None:
    devices = [f"dev-{i}" for i in range(1, 6)]
    with open_fleet(tmp_path, digits_v1, devices, kind=kind) as fleet:
        svc = fleet.start_service()
        agents = [fleet.start_agent(d) for d in devices]
        release = fleet.release("1", "all")
        segments = Manifest.decode(release.manifest).segments
        assert segments >= 8, "small segments: every release is many chunks"
        for a in agents:
            assert a.daemon.installed.wait(TIMEOUT), a.device_id
            _assert_predicts_like_sklearn(a.agent.predict, digits_v1)
        fleet.wait_active(devices, release.sequence)
        rows = {r["device"]: r for r in fleet.fleet_status()}
        for d in devices:
            assert (rows[d]["model"], rows[d]["version"], rows[d]["sequence"]) == (
                "digits", "1", release.sequence)
            assert (rows[d]["state"], rows[d]["last_result"]) == ("idle", "ok")
        assert svc.chunks.sent_chunks >= len(devices) * segments
        assert svc.chunks.refused == 0

        # A second release to two devices by name: only they switch (to the TFLite export).
        canary = devices[:2]
        second = fleet.release("2", ",".join(canary))
        fleet.wait_active(canary, second.sequence)
        for a in agents:
            assert a.active_sequence() == (second.sequence if a.device_id in canary
                                           else release.sequence)
            assert a.agent.status().active.format == (
                "tflite" if a.device_id in canary else "onnx")
            _assert_predicts_like_sklearn(a.agent.predict, digits_v1)
        rows = {r["device"]: r for r in fleet.fleet_status()}
        assert {d for d, r in rows.items() if r["version"] == "2"} == set(canary)


@BROKERS
def test_agent_started_after_the_release_catches_up(
        tmp_path: Path, digits_v1: Digits, kind: str) -> None:
    with open_fleet(tmp_path, digits_v1, ["dev-a", "dev-late"], kind=kind) as fleet:
        fleet.start_service()
        early = fleet.start_agent("dev-a")
        release = fleet.release("1", "all")
        assert early.daemon.installed.wait(TIMEOUT)
        fleet.wait_active(["dev-a"], release.sequence)
        assert fleet.device("dev-late").active_sequence is None

        late = fleet.start_agent("dev-late")  # the retained offer is waiting for it
        assert late.daemon.installed.wait(TIMEOUT)
        fleet.wait_active(["dev-a", "dev-late"], release.sequence)
        _assert_predicts_like_sklearn(late.agent.predict, digits_v1)


@needs_mosquitto
def test_killed_agent_resumes_and_fetches_only_missing_chunks(
        tmp_path: Path, digits_v1: Digits) -> None:
    """window=1 makes the agent ask for chunk i+1 only after writing chunk i, so when the gate
    holds the request for chunk k, exactly k chunks are on disk: SIGKILL it right then."""
    k, dev = 4, "dev-k"
    with open_fleet(tmp_path, digits_v1, [dev], window=1) as fleet:
        svc = fleet.start_service(hold=[dev], allow=k)
        gate = fleet.gate
        _, observer = fleet.client("coordinator", "observer", [f"ef/v1/dev/{dev}/up/status"])
        release = fleet.release("1", dev)
        segments = Manifest.decode(release.manifest).segments

        first = fleet.spawn_agent(dev, ".1")
        gate.wait_held([dev])
        first.send_signal(signal.SIGKILL)
        assert first.wait(TIMEOUT) == -signal.SIGKILL
        assert gate.indexes[dev] == list(range(k))
        assert svc.chunks.sent_chunks == k
        part = fleet.homes[dev] / "downloads" / f"{release.bundle_id}.part"
        assert part.exists(), "the partial download stays on disk"
        assert fleet.device(dev).active_sequence is None

        gate.open()
        second = fleet.spawn_agent(dev, ".2")
        fleet.wait_active([dev], release.sequence)
        assert second.poll() is None, fleet.log_of(dev, ".2")
        # Only the missing chunks crossed the wire the second time, each once.
        assert gate.indexes[dev] == list(range(segments))
        assert svc.chunks.sent_chunks == segments
        # ... and the agent said so: its first report after the restart shows k chunks reused.
        resumed = [s.progress for s in statuses(observer, dev)
                   if s.progress and s.progress.reused]
        assert resumed and resumed[0].reused == k and resumed[0].fetched == 0
        assert not part.exists()
        last = json.loads((fleet.homes[dev] / "last_install.json").read_bytes())
        assert (last["ok"], last["sequence"]) == (True, release.sequence)


@BROKERS
def test_broker_restart_mid_transfer_converges_without_duplicate_activation(
        tmp_path: Path, digits_v1: Digits, kind: str) -> None:
    devices, k = ["dev-a", "dev-b", "dev-c"], 3
    with open_fleet(tmp_path, digits_v1, devices, kind=kind) as fleet:
        fleet.start_service(hold=devices, allow=k)
        gate = fleet.gate
        agents = [fleet.start_agent(d) for d in devices]
        release = fleet.release("1", "all")
        gate.wait_held(devices)
        fleet.wait_registry(devices, lambda d: ((d.last_result or {}).get("progress") or {})
                            .get("fetched") == k, f"every agent to report {k} chunks fetched")
        assert all(not a.daemon.installed.is_set() for a in agents)

        if fleet.broker.networked:
            fleet.broker.stop()  # = restart(), with the gate opened while the broker is down
            gate.open()
            fleet.broker.start()
        else:  # the in-memory broker restarts at once: sessions and retained messages kept
            fleet.broker.restart()
            gate.open()
        for a in agents:
            assert a.daemon.installed.wait(TIMEOUT), a.device_id
        fleet.wait_active(devices, release.sequence)

        # Reconnecting again re-delivers the retained offer: it must not install twice.
        seen = {a.device_id: a.daemon.handled["release"] for a in agents}
        fleet.broker.restart()
        for a in agents:
            a.daemon.wait_handled("release", seen[a.device_id] + 1)
        for a in agents:
            assert a.checkpoints.activations == 1, a.device_id
            history = a.agent.store.state.history
            assert len(history) == 1 and history[0].startswith(f"{release.sequence:010d}-")
            last = a.agent.last_result()
            assert last is not None and (last["ok"], last["sequence"]) == (True, release.sequence)
            _assert_predicts_like_sklearn(a.agent.predict, digits_v1)


@needs_mosquitto
def test_agent_serves_and_buffers_telemetry_while_the_broker_is_down(
        tmp_path: Path, digits_v1: Digits) -> None:
    """The daemon's clocks are injected: each heartbeat is one step of a fake monotonic clock,
    and each telemetry message carries a distinct time from a counting wall clock."""
    buffer, dev = 4, "dev-a"
    x, _ = digits_test_split(digits_v1)

    class Wall:
        def __init__(self) -> None:
            self.base, self.calls, self._lock = int(time.time()), 0, threading.Lock()

        def __call__(self) -> float:
            with self._lock:
                self.calls += 1
                return float(self.base + self.calls)

    wall, mono = Wall(), [1000.0]
    with open_fleet(tmp_path, digits_v1, [dev], telemetry_buffer=buffer) as fleet:
        bundle = tmp_path / "v1.efb"
        _, built = fleet.coordinator.build("digits", "1", dev)
        fleet.coordinator.write_bundle(built, bundle)
        topic = f"ef/v1/dev/{dev}/up/telemetry"
        _, inbox = fleet.client("coordinator", "telemetry-observer", [topic])
        side = Agent(AgentConfig.load(fleet.homes[dev]))  # side-load: no coordinator needed
        side.install_file(bundle)
        side.close()
        a = fleet.start_agent(dev, heartbeat=10.0, clock=wall, monotonic=lambda: mono[0])
        baseline = a.agent.predict(x)

        def times() -> list[int]:
            return [json.loads(m.payload)["time"] for m in list(inbox.messages) if m.topic == topic]

        wait_until(times, "the first heartbeat's telemetry")
        fleet.broker.stop()
        wait_until(lambda: not a.daemon.link.connected.is_set(), "the agent to see the outage")
        made = []
        for _ in range(3 * buffer):
            before = wall.calls
            mono[0] += 10.0
            wait_until(lambda: wall.calls > before, "a heartbeat while disconnected")  # noqa: B023
            made.append(wall.base + wall.calls)
            np.testing.assert_array_equal(a.agent.predict(x), baseline)  # still serving
        assert a.daemon.reporter.buffered == buffer  # bounded: the oldest were dropped

        fleet.broker.start()
        wait_until(lambda: made[-1] in times(), "the buffered telemetry after reconnect")
        during = [t for t in times() if made[0] <= t <= made[-1]]
        assert during == made[-buffer:]
        assert a.daemon.alive


def test_amqtt_fallback_delivers_a_release(tmp_path: Path, digits_v1: Digits) -> None:
    devices = ["dev-a", "dev-b"]
    with open_fleet(tmp_path, digits_v1, devices, kind="amqtt") as fleet:
        assert fleet.protocol == 311
        fleet.start_service()
        agents = [fleet.start_agent(d) for d in devices]
        release = fleet.release("1", "all")
        for a in agents:
            assert a.daemon.installed.wait(TIMEOUT), a.device_id
            _assert_predicts_like_sklearn(a.agent.predict, digits_v1)
        fleet.wait_active(devices, release.sequence)
