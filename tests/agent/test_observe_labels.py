"""Labels flowing back through the predict recorder, on a real agent (ONNX Runtime): ids per
predicted row, one label each, counted under the model that answered; unknown, expired and
repeated ids refused with their own error."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.observe import AlreadyLabelled, Recorder, UnknownPrediction, model_key
from edgefleet.protocol.messages import Telemetry

from ..conftest import Digits, Fleet, open_agent


@pytest.fixture
def agent(fleet: Fleet, tmp_path: Path) -> Agent:
    a = open_agent(fleet.agent_home(tmp_path / "dev-a", installed=("v1",)))
    yield a  # type: ignore[misc]
    a.close()


@pytest.fixture(scope="module")
def y_test(digits_v1: Digits) -> np.ndarray:
    with np.load(digits_v1.test_path) as npz:
        return np.asarray(npz["y"])


def predicted(rec: Recorder, x: np.ndarray) -> tuple[list[str], np.ndarray]:
    """What the HTTP API does per request: predict through the recorder, then issue ids."""
    version, out = rec.predict_versioned(x)
    top = out.argmax(axis=1)
    return rec.issue(version, top, out.shape[-1]), top


def test_labels_count_labelled_and_correct_as_a_direct_computation(
    agent: Agent, x_test: np.ndarray, y_test: np.ndarray
) -> None:
    rec = Recorder(agent)
    ids, classes = [], []
    for i in range(0, 120, 3):  # 40 calls of 3 rows
        got, cls = predicted(rec, x_test[i : i + 3])
        ids += got
        classes += cls.tolist()
    assert len(ids) == len(set(ids)) == 120
    key = model_key(agent.active)
    first = rec.telemetry()
    assert first is not None and "labelled" not in first[key]  # no labels yet: no fields

    truth = y_test[:100].tolist()  # labels for 100 of the 120, out of order
    order = np.random.default_rng(0).permutation(100)
    answers = [rec.label(ids[i], truth[i]) for i in order]
    assert answers == [(key, classes[i]) for i in order]
    w = rec.telemetry()  # the labels' window: no calls in it, only the labels
    assert w is not None and w[key]["count"] == 0
    correct = int(np.sum(np.asarray(classes[:100]) == np.asarray(truth)))
    assert (w[key]["labelled"], w[key]["correct"]) == (100, correct)
    assert 0 < correct < 100  # the model is good, not perfect: both branches counted
    assert rec.totals()[key]["labelled"] == 100 and rec.totals()[key]["correct"] == correct
    assert rec.telemetry() is None  # a delta: nothing since
    Telemetry(device_id="dev-a", time=1, metrics={"inference": w})  # within the bounds


def test_each_prediction_takes_one_label(agent: Agent, x_test: np.ndarray) -> None:
    rec = Recorder(agent)
    [pid], [cls] = predicted(rec, x_test[:1])
    with pytest.raises(ValueError, match=r"label 10 is not a class of digits@1 \(0\.\.9\)"):
        rec.label(pid, 10)
    with pytest.raises(ValueError, match="an integer"):
        rec.label(pid, True)  # type: ignore[arg-type]
    assert rec.label(pid, int(cls)) == ("digits@1", int(cls))  # the refusals did not use it up
    with pytest.raises(AlreadyLabelled, match="already labelled"):
        rec.label(pid, int(cls))
    w = rec.telemetry()
    assert w is not None and (w["digits@1"]["labelled"], w["digits@1"]["correct"]) == (1, 1)


def test_unknown_other_runs_and_expired_ids_are_refused(agent: Agent, x_test: np.ndarray) -> None:
    rec = Recorder(agent, remember=8)
    ids, _ = predicted(rec, x_test[:5])
    later, _ = predicted(rec, x_test[5:12])  # 12 rows issued: the first 4 are forgotten
    run, n = ids[0].rsplit("-", 1)
    cases = {
        ids[3]: "expired: only the last 8",
        f"{run}-12": "not issued",
        "00000000-1": "unknown prediction id",  # another run (a restart) or made up
        "nonsense": "unknown prediction id",
        "": "unknown prediction id",
    }
    for pid, message in cases.items():
        with pytest.raises(UnknownPrediction, match=message):
            rec.label(pid, 0)
    with pytest.raises(UnknownPrediction):
        rec.label(None, 0)
    assert rec.label(ids[4], 0)[0] == "digits@1"  # the 8 newest rows are kept
    assert rec.label(later[-1], 0)[0] == "digits@1"
    with pytest.raises(UnknownPrediction):  # a new recorder (a restart) knows none of them
        Recorder(agent).label(ids[4], 0)


def test_a_batch_larger_than_the_ring_keeps_its_tail(agent: Agent, x_test: np.ndarray) -> None:
    rec = Recorder(agent, remember=4)
    ids, classes = predicted(rec, x_test[:10])
    assert len(ids) == 10
    with pytest.raises(UnknownPrediction, match="expired"):
        rec.label(ids[5], 0)
    assert [rec.label(ids[i], int(classes[i]))[1] for i in range(6, 10)] == classes[6:].tolist()
    with pytest.raises(ValueError):
        Recorder(agent, remember=0)


def test_labels_from_many_threads_are_each_counted_once(agent: Agent, x_test: np.ndarray) -> None:
    rec = Recorder(agent)
    ids, _ = predicted(rec, x_test[:400])
    outcomes: list[str] = []

    def label_all() -> None:
        for pid in ids:
            try:
                rec.label(pid, 0)
                outcomes.append("ok")
            except AlreadyLabelled:
                outcomes.append("again")

    threads = [threading.Thread(target=label_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 400 and outcomes.count("again") == 3 * 400
    assert rec.totals()["digits@1"]["labelled"] == 400


def test_labels_show_on_the_prometheus_view(
    agent: Agent, x_test: np.ndarray, y_test: np.ndarray
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    rec = Recorder(agent)
    reg = CollectorRegistry()
    reg.register(rec.collector())

    def families() -> dict[str, list[float]]:
        text = generate_latest(reg).decode()
        return {f.name: [s.value for s in f.samples if s.name.endswith("_total")]
                for f in text_string_to_metric_families(text)}  # fmt: skip

    ids, classes = predicted(rec, x_test[:30])
    assert families()["edgefleet_inference_labelled"] == []  # no label yet: no sample
    for i in range(30):
        rec.label(ids[i], int(y_test[i]))
    got = families()
    right = int(np.sum(np.asarray(classes) == y_test[:30]))
    assert got["edgefleet_inference_labelled"] == [30.0]
    assert got["edgefleet_inference_correct"] == [float(right)]
