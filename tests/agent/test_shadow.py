"""Shadow: the candidate slot, the role binding, and metrics that match a direct computation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.candidate import RoleError
from edgefleet.agent.observe import Recorder, model_key
from edgefleet.agent.shadow import Shadow
from edgefleet.protocol.errors import RollbackError

from tests.agent.candidates import Direct, candidate_efb
from tests.conftest import Fleet, open_agent

N = 120


@pytest.fixture
def home(fleet: Fleet, tmp_path: Path) -> Path:
    return fleet.agent_home(tmp_path / "home", installed=["v1"])


def test_a_candidate_installs_into_its_slot_and_never_becomes_active(
    fleet: Fleet, home: Path, tmp_path: Path
) -> None:
    agent = open_agent(home)
    try:
        cand = candidate_efb(fleet, tmp_path / "cand.efb", mode="shadow")
        with pytest.raises(RoleError, match="candidate"):  # not as the active model
            agent.install_file(cand)
        assert agent.active is not None and agent.active.manifest.model_version == "1"
        assert agent.last_install is not None and agent.last_install.code == "role"
        slot = agent.open_candidate()
        version = slot.install_file(cand)
        assert version.manifest.candidate is not None and slot.version == version
        assert agent.active.manifest.model_version == "1"  # untouched
        assert agent.store.state.highest_sequence == 2  # the active store's sequence too
        ordinary = candidate_efb(fleet, tmp_path / "plain.efb", mode="", sequence=101)
        with pytest.raises(RoleError, match="ordinary"):  # and no ordinary one in the slot
            slot.install_file(ordinary)
        assert slot.drop() and slot.serving is None
    finally:
        agent.close()
    agent = open_agent(home)  # dropped stays dropped across a restart; a replay is refused
    try:
        slot = agent.open_candidate()
        assert slot.serving is None
        with pytest.raises(RollbackError):
            slot.install_file(
                candidate_efb(fleet, tmp_path / "old.efb", mode="shadow", sequence=99)
            )
        slot.install_file(candidate_efb(fleet, tmp_path / "new.efb", mode="shadow", sequence=102))
        assert slot.version is not None and slot.version.manifest.sequence == 102
    finally:
        agent.close()


def test_shadow_metrics_match_a_direct_computation_on_the_same_inputs(
    fleet: Fleet, home: Path, tmp_path: Path, x_test: np.ndarray
) -> None:
    agent = open_agent(home)
    shadow = None
    try:
        slot = agent.open_candidate()
        slot.install_file(candidate_efb(fleet, tmp_path / "cand.efb", mode="shadow"))
        shadow = Shadow(slot, lambda: agent.serving, queue_size=N)
        x = x_test[:N]
        key = model_key(agent.active)
        answered = []
        for i in range(N):  # batches of 1 and of 3, as requests come
            xi = x[i : i + 1] if i % 2 else x[i : i + 3]
            out = agent.predict(xi)  # what the active model answered
            answered.append((xi, out))
            shadow.observe(xi, out, key)
        assert shadow.drain(30.0)
        got = shadow.telemetry()
        assert got is not None

        active, candidate = Direct(fleet.models["v1"].onnx), Direct(fleet.models["v2"].onnx)
        rows = agree = 0
        deltas: list[float] = []
        for xi, _ in answered:
            a, c = active(xi), candidate(xi)
            rows += len(xi)
            agree += int((a.argmax(1) == c.argmax(1)).sum())
            deltas += list(c.max(1).astype(np.float64) - a.max(1))
        assert got["samples"] == N and got["compared"] == rows
        assert got["agree"] == agree and 0 < agree < rows  # two different models
        assert got["dropped"] == got["errors"] == got["skipped"] == 0
        assert got["agreement"] == agree / rows
        assert got["conf_delta_sum"] == pytest.approx(sum(deltas), abs=1e-4)
        assert got["conf_delta_abs_sum"] == pytest.approx(sum(map(abs, deltas)), abs=1e-4)
        assert got["conf_delta_mean"] == pytest.approx(np.mean(deltas), abs=1e-6)
        assert got["latency_ratio"] is not None and got["latency_ratio"] > 0
        assert got["candidate"] == "digits@2" and got["active"] == "digits@1"
        assert shadow.telemetry() is None  # a window: nothing since the last read
        totals = shadow.totals()
        assert totals is not None and totals["compared"] == rows and totals["agree"] == agree
        # a sample answered by another model (e.g. the A/B candidate) is not compared
        shadow.observe(x[:1], agent.predict(x[:1]), "digits@other")
        assert shadow.drain(30.0)
        assert (shadow.telemetry() or {})["skipped"] == 1
    finally:
        if shadow is not None:
            shadow.close()
        agent.close()


def test_a_candidate_that_became_the_active_model_is_not_compared_with_itself(
    fleet: Fleet, home: Path, tmp_path: Path, x_test: np.ndarray
) -> None:
    """Once the candidate answers requests itself (rolled out), a shadow sample would compare
    it with itself (agreement 1): skipped and counted instead."""
    agent = open_agent(home)
    shadow = None
    try:
        slot = agent.open_candidate()
        slot.install_file(candidate_efb(fleet, tmp_path / "cand.efb", mode="shadow"))
        serving = slot.serving
        assert serving is not None
        shadow = Shadow(slot, lambda: serving, queue_size=N)  # the candidate is active too
        shadow.observe(x_test[:2], serving[1].run(x_test[:2]), model_key(serving[0]))
        assert shadow.drain(30.0)
        got = shadow.telemetry() or {}
        assert got.get("skipped") == 1 and got.get("compared", 0) == 0, got
    finally:
        if shadow is not None:
            shadow.close()
        agent.close()


class GatedRuntime:
    """The real candidate runtime, held at a gate so a test can fill the shadow's queue."""

    def __init__(self, inner: object) -> None:
        self.inner, self.entered, self.gate = inner, threading.Event(), threading.Event()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(30.0)
        return self.inner.run(x)  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]


def test_a_full_shadow_queue_drops_and_counts_and_never_blocks_the_caller(
    fleet: Fleet, home: Path, tmp_path: Path, x_test: np.ndarray
) -> None:
    agent = open_agent(home)
    shadow = None
    try:
        slot = agent.open_candidate()
        version = slot.install_file(candidate_efb(fleet, tmp_path / "cand.efb", mode="shadow"))
        assert slot.serving is not None
        gated = GatedRuntime(slot.serving[1])
        slot.serving = (version, gated)  # type: ignore[assignment]
        shadow = Shadow(slot, lambda: agent.serving, queue_size=4)
        key = model_key(agent.active)
        x = x_test[:1]
        y = agent.predict(x)
        shadow.observe(x, y, key)
        assert gated.entered.wait(30.0)  # the worker holds sample 1 at the gate
        for _ in range(10):
            shadow.observe(x, y, key)  # 4 queue, 6 dropped, none waits
        gated.gate.set()
        assert shadow.drain(30.0)
        got = shadow.telemetry()
        assert got is not None and got["samples"] == 5 and got["dropped"] == 6
    finally:
        if shadow is not None:
            shadow.close()
        agent.close()


def test_the_recorder_feeds_the_shadow_its_sampled_share(
    fleet: Fleet, home: Path, tmp_path: Path, x_test: np.ndarray
) -> None:
    agent = open_agent(home)
    shadow = None
    try:
        slot = agent.open_candidate()
        slot.install_file(candidate_efb(fleet, tmp_path / "cand.efb", mode="shadow"))
        shadow = Shadow(slot, lambda: agent.serving, queue_size=64)
        recorder = Recorder(agent)
        recorder.add_observer(shadow.observe, share=0.25)
        for i in range(40):
            recorder.predict(x_test[i : i + 1])
        # every 4th call is sampled; the observer thread hands each to the shadow
        def seen() -> int:
            shadow.drain(1.0)
            return (shadow.totals() or {}).get("samples", 0) + recorder.observer_dropped

        from edgefleet.simulations.wait import wait_until

        wait_until(lambda: seen() == 10, "10 samples to reach the shadow", 30.0)
    finally:
        if shadow is not None:
            shadow.close()
        agent.close()
