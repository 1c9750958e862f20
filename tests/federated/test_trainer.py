"""The on-device trainer: exact weight round trips, local training, export to ONNX/TFLite."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from edgefleet.federated import wire
from edgefleet.federated.trainer import (
    ModelSpec,
    TrainConfig,
    Trainer,
    from_array_record,
    to_array_record,
)
from flwr.app import Message, RecordDict

SPECS = [ModelSpec(hidden=(32,)), ModelSpec(hidden=(16, 8)), ModelSpec(family="linear")]


def sgd(**kw: object) -> TrainConfig:
    return TrainConfig(optimizer="sgd", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digits(federation):  # type: ignore[no-untyped-def]
    return federation.x_train, federation.y_train, federation.x_test, federation.y_test


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.family}{list(s.hidden)}")
def test_weights_round_trip_exactly_through_array_record_and_serde(spec, digits) -> None:
    trainer = Trainer(spec=spec, config=sgd(local_epochs=1))
    trainer.fit(digits[0][:200], digits[1][:200])
    weights = trainer.weights()
    assert all(w.dtype == np.float32 for w in weights.values())
    wire.set_task_identity(1)
    msg = Message(
        RecordDict({"arrays": to_array_record(weights)}), dst_node_id=2, message_type="train"
    )
    back = from_array_record(wire.decode(wire.encode(msg)).content.array_records["arrays"])
    assert list(back) == list(weights)
    other = Trainer(spec=spec, config=sgd(seed=99))
    other.set_weights(back)
    assert all(np.array_equal(other.weights()[k], v) for k, v in weights.items())
    np.testing.assert_array_equal(other.predict_proba(digits[2]), trainer.predict_proba(digits[2]))


@pytest.mark.parametrize(
    ("spec", "config"),
    [
        (ModelSpec(hidden=(32,)), sgd(lr=0.1, local_epochs=3)),
        (ModelSpec(hidden=(32,)), TrainConfig(optimizer="adam", lr=0.01, local_epochs=3)),
        (ModelSpec(family="linear"), sgd(lr=0.05, local_epochs=3)),
    ],
    ids=["mlp-sgd", "mlp-adam", "linear-sgd"],
)
def test_local_training_learns_and_is_deterministic(spec, config, digits) -> None:
    x, y, xt, yt = digits
    before = Trainer(spec=spec, config=config).evaluate(xt, yt)
    a, b = Trainer(spec=spec, config=config), Trainer(spec=spec, config=config)
    fit = a.fit(x, y, round_seed=3)
    b.fit(x, y, round_seed=3)
    after = a.evaluate(xt, yt)
    assert fit.num_examples == len(y)
    assert after.accuracy > 0.9 > before.accuracy and after.loss < before.loss
    assert all(np.array_equal(a.weights()[k], v) for k, v in b.weights().items())
    c = Trainer(spec=spec, config=config)
    c.fit(x, y, round_seed=4)  # another round shuffles differently
    assert not all(np.array_equal(c.weights()[k], v) for k, v in a.weights().items())


def test_fedprox_term_keeps_local_weights_near_the_global_model(digits) -> None:
    x, y = digits[0][:300], digits[1][:300]

    def drift(mu: float) -> float:
        t = Trainer(spec=ModelSpec(hidden=(32,)), config=sgd(lr=0.1, proximal_mu=mu))
        start = t.weights()
        t.fit(x, y)
        return sum(float(np.sum((t.weights()[k] - v) ** 2)) for k, v in start.items())

    assert drift(5.0) < 0.5 * drift(0.0)


@pytest.mark.parametrize(
    "weights",
    [
        {"coefs.0": np.zeros((64, 32), np.float32)},
        {
            "coefs.0": np.zeros((64, 31), np.float32),
            "coefs.1": np.zeros((32, 10), np.float32),
            "intercepts.0": np.zeros(32, np.float32),
            "intercepts.1": np.zeros(10, np.float32),
        },
        {
            "coefs.0": np.zeros((64, 32), np.float64),
            "coefs.1": np.zeros((32, 10), np.float32),
            "intercepts.0": np.zeros(32, np.float32),
            "intercepts.1": np.zeros(10, np.float32),
        },
    ],
    ids=["missing", "shape", "dtype"],
)
def test_set_weights_refuses_another_architecture(weights) -> None:
    with pytest.raises(ValueError):
        Trainer(spec=ModelSpec(hidden=(32,))).set_weights(weights)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: ModelSpec(family="cnn"),
        lambda: ModelSpec(n_classes=1),
        lambda: ModelSpec(hidden=(0,)),
        lambda: TrainConfig(optimizer="rmsprop"),
        lambda: TrainConfig(lr=0.0),
        lambda: TrainConfig(local_epochs=0),
        lambda: Trainer(spec=ModelSpec(family="linear"), config=TrainConfig(optimizer="adam")),
    ],
)
def test_bad_settings_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_settings_round_trip_through_a_round_config() -> None:
    spec = ModelSpec(family="mlp", n_features=8, n_classes=3, hidden=(5, 4), l2=0.01)
    config = TrainConfig(local_epochs=3, lr=0.2, optimizer="adam", momentum=0.5, batch_size=8)
    assert ModelSpec.from_config(spec.to_config()) == spec
    assert TrainConfig.from_config({**config.to_config(), "proximal-mu": 0.3}) == TrainConfig(
        **{**vars(config), "proximal_mu": 0.3}
    )


def test_wrong_input_width_or_labels_are_refused() -> None:
    t = Trainer(spec=ModelSpec(hidden=(4,)))
    with pytest.raises(ValueError):
        t.fit(np.zeros((3, 63), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        t.fit(np.zeros((3, 64), np.float32), np.array([0, 1, 10]))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.family}{list(s.hidden)}")
def test_exports_match_the_sklearn_model_in_ort_and_litert(spec, digits) -> None:
    x, y, xt, _ = digits
    trainer = Trainer(spec=spec, config=sgd(lr=0.05, local_epochs=2))
    trainer.fit(x, y)
    expected = trainer.predict_proba(xt)
    session = ort.InferenceSession(trainer.to_onnx(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": xt})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.array_equal(got.argmax(1), trainer.estimator.predict(xt))  # incl. SGDClassifier
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    interp = litert.Interpreter(model_content=trainer.to_tflite())
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    for row in range(3):
        interp.set_tensor(inp["index"], xt[row : row + 1])
        interp.invoke()
        np.testing.assert_allclose(interp.get_tensor(out["index"])[0], expected[row], atol=1e-5)


def test_importing_the_trainer_and_data_loads_neither_sklearn_nor_flower() -> None:
    code = (
        "import sys, edgefleet.federated.trainer, edgefleet.federated.data\n"
        "heavy = [m for m in ('sklearn', 'flwr', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
