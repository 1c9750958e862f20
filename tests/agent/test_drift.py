"""On-device drift on a real agent (ONNX Runtime): the monitor's reports match a direct sketch
of the same inputs, flag exactly the shifted features, hold no input and fit the telemetry
bounds; a model without reference statistics is not sketched."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.drift import MAX_MODELS, DriftMonitor
from edgefleet.agent.observe import Recorder, model_key
from edgefleet.protocol.drift import ReferenceStats, Sketch
from edgefleet.protocol.messages import Telemetry

from ..conftest import Fleet, open_agent

SHIFTED = [20, 21, 27, 28]  # pixels in the middle of the 8x8 image


@pytest.fixture
def agent(fleet: Fleet, tmp_path: Path) -> Agent:
    a = open_agent(fleet.agent_home(tmp_path / "dev-a", installed=("v1",)))
    yield a  # type: ignore[misc]
    a.close()


def _shift(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, SHIFTED] = np.clip(out[:, SHIFTED] + 0.5, 0, 1)
    return out


def test_reports_match_a_direct_sketch_and_flag_the_shifted_features(
    agent: Agent, x_test: np.ndarray
) -> None:
    monitor = DriftMonitor(agent, window=400)
    key = model_key(agent.active)
    assert monitor.telemetry() is None  # nothing seen: nothing to say
    x = _shift(x_test)
    for i in range(0, len(x), 25):
        monitor.observe(x[i : i + 25], agent.predict(x[i : i + 25]), key)
    report = monitor.telemetry()
    assert report is not None and set(report) == {key}
    r = report[key]
    direct = Sketch(ReferenceStats.from_dict(agent.active.manifest.reference_stats))
    direct.update(x, agent.predict(x))
    want = direct.summary()
    assert r["n"] == len(x)
    assert r["psi"] == [round(v, 4) for v in want.psi]
    assert r["ks"] == [round(v, 4) for v in want.ks]
    assert r["output_psi"] == round(want.output_psi or 0, 4)
    flagged = {i for i, v in enumerate(r["psi"]) if v > 0.2}
    assert flagged == set(SHIFTED)
    assert r["max_psi"] == max(r["psi"])
    Telemetry(device_id="dev-a", time=1, metrics={"drift": report})  # within the bounds
    assert monitor.telemetry() is None  # nothing new: not reported again
    monitor.observe(x[:400], agent.predict(x[:400]), key)  # 850 rows: past 2 x 400
    again = monitor.telemetry()
    assert again is not None and again[key]["n"] == (len(x) + 400) / 2  # halved, once


def test_the_test_split_itself_shows_no_drift(agent: Agent, x_test: np.ndarray) -> None:
    monitor = DriftMonitor(agent)
    monitor.observe(x_test, agent.predict(x_test), model_key(agent.active))
    r = monitor.telemetry()
    assert r is not None
    assert r["digits@1"]["max_psi"] < 0.2 and r["digits@1"]["output_psi"] < 0.05


def test_through_the_recorder(agent: Agent, x_test: np.ndarray) -> None:
    recorder = Recorder(agent)
    monitor = DriftMonitor(agent)
    seen = threading.Event()
    recorder.add_observer(monitor.observe, share=1.0)
    recorder.add_observer(lambda *_: seen.set() if monitor._sketches else None, share=1.0)
    for i in range(0, 100, 10):
        recorder.predict(x_test[i : i + 10])
    assert seen.wait(10)
    r = monitor.telemetry()
    assert r is not None and 0 < r["digits@1"]["n"] <= 100


def test_unknown_models_and_models_without_reference_are_skipped(
    fleet: Fleet, tmp_path: Path, agent: Agent, x_test: np.ndarray
) -> None:
    monitor = DriftMonitor(agent)
    monitor.observe(x_test[:5], agent.predict(x_test[:5]), "other@9")  # not served here
    monitor.observe(x_test[:5, :10], x_test[:5, :10], model_key(agent.active))  # wrong width
    assert monitor.skipped == 2
    monitor.observe(x_test[:5], agent.predict(x_test[:5]), model_key(agent.active))
    crafted = tmp_path / "crafted.efb"
    crafted.write_bytes(fleet.release(fleet.models["v1"].onnx.read_bytes(), sequence=50))
    agent.install_file(crafted)  # a manifest without reference statistics
    monitor.observe(x_test[:5], agent.predict(x_test[:5]), model_key(agent.active))
    assert monitor.skipped == 3
    r = monitor.telemetry()
    assert r is not None and set(r) == {"digits@1"}  # only the model sketched before


def test_at_most_max_models_sketches(agent: Agent) -> None:
    monitor = DriftMonitor(agent)
    for i in range(MAX_MODELS + 3):
        monitor._sketches[f"m@{i}"] = None
        monitor._sketches.move_to_end(f"m@{i}")
    monitor.observe(np.zeros((1, 64)), np.zeros((1, 10)), model_key(agent.active))
    assert list(monitor._sketches)[-1] == "digits@1" and len(monitor._sketches) == MAX_MODELS
