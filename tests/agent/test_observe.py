"""The predict recorder on a real agent (ONNX Runtime): counts, latency histogram, classes and
confidence match a direct computation; observers see their share and never break a call."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.http import InferenceServer, load_token
from edgefleet.agent.observe import FOLD_EVERY, NO_MODEL, Recorder, model_key, quantile_ms
from edgefleet.protocol.messages import CONFIDENCE_BINS, LATENCY_BOUNDS_MS, Telemetry
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import Fleet, open_agent


@pytest.fixture
def agent(fleet: Fleet, tmp_path: Path) -> Agent:
    a = open_agent(fleet.agent_home(tmp_path / "dev-a", installed=("v1",)))
    yield a  # type: ignore[misc]
    a.close()


def test_counts_classes_and_confidence_match_a_direct_computation(
    agent: Agent, x_test: np.ndarray
) -> None:
    rec = Recorder(agent)
    outs = [rec.predict(x_test[i : i + 3]) for i in range(0, 300, 3)]  # 100 calls, 300 rows
    assert all(np.array_equal(o, agent.predict(x_test[i * 3 : i * 3 + 3])) for i, o in
               enumerate(outs))  # fmt: skip
    with pytest.raises(ValueError):
        rec.predict(np.zeros((1, 3), dtype=np.float32))  # wrong width: an error, re-raised
    window = rec.telemetry()
    assert window is not None
    key = model_key(agent.active)
    assert key == "digits@1" and set(window) == {key}
    w = window[key]
    y = np.concatenate(outs)
    want = np.bincount(y.argmax(axis=1), minlength=10)
    assert (w["count"], w["errors"], w["rows"]) == (101, 1, 300)
    assert w["classes"] == {str(c): int(n) for c, n in enumerate(want) if n}
    assert sum(w["lat"]) == 101 and len(w["lat"]) <= len(LATENCY_BOUNDS_MS) + 1
    conf = y.max(axis=1)
    assert w["conf_sum"] == pytest.approx(conf.sum(), rel=1e-6)
    assert w["conf_min"] == pytest.approx(conf.min(), rel=1e-6)
    bins = np.bincount(np.minimum((conf * CONFIDENCE_BINS).astype(int), 9), minlength=10)
    assert w["conf"] == [int(n) for n in bins[: np.flatnonzero(bins)[-1] + 1]]
    assert w["p50_ms"] <= w["p95_ms"] <= w["p99_ms"]
    # the window is a delta: read again, nothing new
    assert rec.telemetry() is None
    assert rec.totals()[key]["count"] == 101
    Telemetry(device_id="dev-a", time=1, metrics={"inference": window})  # within the bounds


def test_every_thread_is_counted_without_a_lock_per_call(
    agent: Agent, x_test: np.ndarray
) -> None:
    rec = Recorder(agent)
    n, threads = FOLD_EVERY * 2 + 17, 4

    def work() -> None:
        for i in range(n):
            rec.predict(x_test[i % 400 : i % 400 + 1])

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    half = rec.telemetry()  # read while they run: nothing is lost or counted twice
    for t in ts:
        t.join()
    rest = rec.telemetry()
    total = sum(w["digits@1"]["count"] for w in (half, rest) if w)
    assert total == n * threads
    assert rec.totals()["digits@1"]["rows"] == n * threads


def test_observers_see_their_share_and_cannot_break_predict(
    agent: Agent, x_test: np.ndarray
) -> None:
    rec = Recorder(agent)
    seen: list[tuple[np.ndarray, np.ndarray, str]] = []
    done = threading.Event()

    def watch(x: np.ndarray, y: np.ndarray, key: str) -> None:
        seen.append((x, y, key))
        if len(seen) == 10:
            done.set()

    def broken(x: np.ndarray, y: np.ndarray, key: str) -> None:
        raise RuntimeError("observer bug")

    rec.add_observer(watch, share=0.1)
    rec.add_observer(broken, share=0.05)
    for i in range(100):
        rec.predict(x_test[i : i + 1])
        done.wait(0.01) if len(seen) < i // 10 - 1 else None
    assert done.wait(10)
    x, y, key = seen[0]
    assert key == "digits@1" and np.array_equal(y, agent.predict(x))
    assert rec.observer_errors >= 1  # the broken one ran, failed, and predict went on
    with pytest.raises(ValueError):
        rec.add_observer(watch, share=0.0)


def test_no_model_calls_count_as_errors(fleet: Fleet, tmp_path: Path) -> None:
    a = open_agent(fleet.agent_home(tmp_path / "empty"))
    try:
        rec = Recorder(a)
        with pytest.raises(RuntimeError):
            rec.predict(np.zeros((1, 64), dtype=np.float32))
        w = rec.telemetry()
        assert w is not None and w[NO_MODEL]["errors"] == 1 and w[NO_MODEL]["rows"] == 0
    finally:
        a.close()


def test_quantiles_of_a_known_histogram() -> None:
    lat = [0] * 10 + [100]  # every call in bucket 10: (bounds[9], bounds[10]]
    assert LATENCY_BOUNDS_MS[9] < quantile_ms(lat, 0.5) <= LATENCY_BOUNDS_MS[10]  # type: ignore[operator]
    assert quantile_ms([], 0.5) is None
    assert quantile_ms([0] * (len(LATENCY_BOUNDS_MS) + 1) + [1], 0.99) == LATENCY_BOUNDS_MS[-1]


def test_the_prometheus_view_parses(agent: Agent, x_test: np.ndarray) -> None:
    rec = Recorder(agent)
    for i in range(20):
        rec.predict(x_test[i : i + 2])
    reg = CollectorRegistry()
    reg.register(rec.collector())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    calls = families["edgefleet_inference_calls"].samples
    assert [(s.labels, s.value) for s in calls if s.name.endswith("_total")] == [
        ({"model": "digits@1"}, 20.0)
    ]
    hist = families["edgefleet_inference_latency_seconds"].samples
    assert [s.value for s in hist if s.name.endswith("_count")] == [20.0]
    rows = sum(s.value for s in families["edgefleet_inference_class_rows"].samples
               if s.name.endswith("_total"))  # fmt: skip
    assert rows == 40


def test_the_http_api_predicts_through_the_recorder_and_serves_metrics(
    agent: Agent, x_test: np.ndarray
) -> None:
    home = agent.config.home
    rec = Recorder(agent)
    with InferenceServer(agent, home=home, recorder=rec) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        token = {"Authorization": f"Bearer {load_token(home)}"}
        for i in range(3):
            body = json.dumps({"inputs": x_test[i : i + 2].tolist()})
            conn.request("POST", "/v1/predict", body, {**token, "Content-Type": "application/json"})
            assert conn.getresponse().read() and True
        conn.request("GET", "/metrics")
        refused = conn.getresponse()
        assert refused.status == 401 and refused.read()
        conn.request("GET", "/metrics", headers=token)
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain")
        conn.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    calls = [s.value for s in families["edgefleet_inference_calls"].samples
             if s.name.endswith("_total")]  # fmt: skip
    assert calls == [3.0] and rec.totals()["digits@1"]["rows"] == 6
