"""Shadow end to end: a candidate release reaches an agent over the broker, its metrics reach the
coordinator's registry, and the active model (and every device's desired release) is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet.coordinator.candidates import (
    build_candidate,
    clear_candidate,
    publish_candidate,
    shadow_summary,
)
from edgefleet.coordinator.telemetry import recent
from edgefleet.protocol.candidate import CandidateSpec

from tests.agent.candidates import Direct
from tests.conftest import Digits

from .fleet import BROKERS, TIMEOUT, digits_test_split, open_fleet, wait_until

pytestmark = [pytest.mark.timeout(180)]
N = 30


@BROKERS
def test_a_shadow_release_reaches_the_agent_and_its_metrics_the_coordinator(
    tmp_path: Path, digits_v1: Digits, digits_v2: Digits, kind: str
) -> None:
    devices = ["dev-1", "dev-2"]
    with open_fleet(tmp_path, digits_v1, devices, kind=kind, shadow_sample=1.0,
                    predlog_sample=1.0, predlog_redact="inputs") as fleet:
        svc = fleet.start_service()
        agents = {d: fleet.start_agent(d) for d in devices}
        release = fleet.release("1", "all")
        fleet.wait_active(devices, release.sequence)
        fleet.coordinator.register_model("digits", digits_v2.onnx, version="3")

        cand = build_candidate(fleet.coordinator, "digits", "3", "device:dev-1",
                               CandidateSpec(mode="shadow"))
        publish_candidate(svc.link, cand)
        a = agents["dev-1"]
        side = a.daemon.candidate
        assert side is not None
        assert side.feed.installed.wait(TIMEOUT), side.slot.last_error
        version = side.slot.version
        assert version is not None and version.manifest.sequence == cand.sequence

        active, candidate = Direct(digits_v1.onnx), Direct(digits_v2.onnx)
        x, _ = digits_test_split(digits_v1)
        x = x[:N]
        for i in range(N):  # through the recorder, as the HTTP API predicts
            a.daemon.recorder.predict(x[i : i + 1])
            wait_until(lambda i=i: (side.shadow.totals() or {}).get("samples", 0) == i + 1,
                       f"sample {i + 1} compared", TIMEOUT)  # fmt: skip
        totals = side.shadow.totals()
        assert totals is not None and totals["dropped"] == 0
        plog = a.daemon.predlog  # the prediction log saw the same calls, inputs redacted
        assert plog is not None
        wait_until(lambda: plog.written == N, "every call in the prediction log", TIMEOUT)
        logged = list(plog.read())
        assert [r["argmax"][0] for r in logged] == active(x).argmax(1).tolist()
        assert all(set(r["inputs"]) == {"sha256"} for r in logged)

        def arrived() -> dict[str, object]:
            rows = recent(fleet.coordinator.registry, namespace="shadow", since=0,
                          device_ids=["dev-1"])  # fmt: skip
            return shadow_summary(p for _, _, p in rows)

        wait_until(lambda: arrived()["compared"] == N, "shadow telemetry ingested", TIMEOUT)
        got = arrived()
        agree = int((active(x).argmax(1) == candidate(x).argmax(1)).sum())
        assert got["agree"] == agree and got["agreement"] == agree / N
        delta = float((candidate(x).max(1).astype(np.float64) - active(x).max(1)).sum())
        assert got["conf_delta_sum"] == pytest.approx(delta, abs=1e-4)
        assert got["latency_ratio"] is not None

        # the active model and what the fleet should run are unchanged; dev-2 has no candidate
        for d in devices:
            assert agents[d].agent.active is not None
            assert agents[d].agent.active.manifest.sequence == release.sequence
        np.testing.assert_allclose(a.agent.predict(x), active(x), atol=1e-5)
        rows = {r["device"]: r for r in fleet.fleet_status()}
        assert rows["dev-1"]["sequence"] == release.sequence
        assert all(r["desired_sequence"] == release.sequence for r in rows.values()), rows
        other = agents["dev-2"].daemon.candidate
        assert other is not None and other.slot.serving is None

        clear_candidate(svc.link, ["dev-1"])  # dropped: nothing compared from now on
        wait_until(lambda: side.slot.serving is None, "the candidate dropped", TIMEOUT)
        assert not side.shadow.running
