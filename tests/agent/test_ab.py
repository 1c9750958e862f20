"""A/B: a signed share of the requests answered by the candidate; per-arm metrics match a direct
computation on the same inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.ab import ABRouter
from edgefleet.agent.observe import Recorder

from tests.agent.candidates import Direct, candidate_efb
from tests.conftest import Fleet, open_agent

N = 200
SHARE = 0.3


def expected_arm(x: np.ndarray, bundle_id: str, share: float) -> bool:
    """The documented rule, computed independently: BLAKE2b-64 keyed with the bundle id."""
    h = hashlib.blake2b(x.astype(np.float32).tobytes(), key=bytes.fromhex(bundle_id),
                        digest_size=8).digest()
    return int.from_bytes(h, "big") < share * 2**64


def test_ab_metrics_match_a_direct_computation_on_the_same_inputs(
    fleet: Fleet, tmp_path: Path, x_test: np.ndarray
) -> None:
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    router = None
    try:
        slot = agent.open_candidate()
        version = slot.install_file(candidate_efb(fleet, tmp_path / "ab.efb", mode="ab",
                                                  share=SHARE))
        router = ABRouter(slot, agent.predict_active,
                          attach=lambda r: setattr(agent, "router", r))
        assert agent.router is router
        recorder = Recorder(agent)
        active, candidate = Direct(fleet.models["v1"].onnx), Direct(fleet.models["v2"].onnx)
        want = {"active": [0, 0, {}], "candidate": [0, 0, {}]}  # count, rows, classes
        for i in range(N):
            x = x_test[i : i + 1] if i % 3 else x_test[i : i + 2]
            answered_by, out = recorder.predict_versioned(x)
            arm = "candidate" if expected_arm(x, version.manifest.bundle_id, SHARE) else "active"
            direct = (candidate if arm == "candidate" else active)(x)
            np.testing.assert_allclose(out, direct, atol=1e-5)  # that arm's model answered
            assert answered_by.manifest.model_version == ("2" if arm == "candidate" else "1")
            w = want[arm]
            w[0] += 1  # type: ignore[operator]
            w[1] += len(x)  # type: ignore[operator]
            for c in direct.argmax(1).tolist():
                w[2][str(c)] = w[2].get(str(c), 0) + 1  # type: ignore[index, union-attr]
        got = router.telemetry()
        assert got is not None and got["share"] == SHARE and got["model"] == "digits@2"
        for arm, (count, rows, classes) in want.items():
            assert got[arm]["count"] == count and got[arm]["rows"] == rows
            assert got[arm]["classes"] == dict(sorted(classes.items()))  # type: ignore[union-attr]
            assert got[arm]["errors"] == 0 and got[arm]["p95_ms"] is not None
        assert 0 < got["candidate"]["count"] < N and got["fallbacks"] == 0
        assert got["candidate"]["count"] == pytest.approx(SHARE * N, abs=4 * (N * 0.21) ** 0.5)
        # the recorder's inference telemetry sees the same split, per model key
        inference = recorder.telemetry() or {}
        assert inference["digits@1"]["count"] == want["active"][0]
        assert inference["digits@2"]["count"] == want["candidate"][0]
        # Agent.predict (in-process callers) is the active model only
        np.testing.assert_allclose(agent.predict(x_test[:5]), active(x_test[:5]), atol=1e-5)
        # dropping the candidate detaches the router: every request back on the active model
        assert slot.drop() and agent.router is None
        assert agent.predict_versioned(x_test[:1])[0].manifest.model_version == "1"
    finally:
        if router is not None:
            router.close()
        agent.close()


class Failing:
    def run(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("candidate broke")

    def close(self) -> None:
        pass


def test_a_failing_candidate_costs_its_own_metrics_never_a_request(
    fleet: Fleet, tmp_path: Path, x_test: np.ndarray
) -> None:
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    router = None
    try:
        slot = agent.open_candidate()
        version = slot.install_file(candidate_efb(fleet, tmp_path / "ab.efb", mode="ab", share=1.0))
        slot.serving = (version, Failing())  # type: ignore[assignment]
        router = ABRouter(slot, agent.predict_active,
                          attach=lambda r: setattr(agent, "router", r))
        active = Direct(fleet.models["v1"].onnx)
        for i in range(10):
            v, out = agent.predict_versioned(x_test[i : i + 1])
            assert v.manifest.model_version == "1"
            np.testing.assert_allclose(out, active(x_test[i : i + 1]), atol=1e-5)
        got = router.totals()
        assert got is not None
        assert got["candidate"]["count"] == got["candidate"]["errors"] == 10
        assert got["fallbacks"] == 10 and got["active"]["count"] == 10
    finally:
        if router is not None:
            router.close()
        agent.close()
