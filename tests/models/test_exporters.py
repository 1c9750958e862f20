"""ONNX and TFLite exporters: parity with ``predict_proba`` on real runtimes, and structure."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter
from edgefleet.models.digits import DigitsSplit, load_digits_split, train_digits
from edgefleet.models.onnx_export import dense_layers, mlp_to_onnx
from edgefleet.models.tflite_export import mlp_to_tflite
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier, MLPRegressor

ATOL = 1e-5


def run_onnx(model: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return out


def run_tflite(model: bytes, x: np.ndarray, *, row_by_row: bool = False) -> np.ndarray:
    interp = Interpreter(model_content=model)
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    batches = [x[i : i + 1] for i in range(len(x))] if row_by_row else [x]
    if not row_by_row:
        interp.resize_tensor_input(inp, x.shape, strict=True)
    interp.allocate_tensors()
    results = []
    for batch in batches:
        interp.set_tensor(inp, batch)
        interp.invoke()
        results.append(interp.get_tensor(out))
    return np.concatenate(results)


def assert_parity(probs: np.ndarray, expected: np.ndarray) -> None:
    assert probs.dtype == np.float32 and probs.shape == expected.shape
    assert np.abs(probs - expected).max() <= ATOL
    np.testing.assert_array_equal(probs.argmax(axis=1), expected.argmax(axis=1))


def fit_quick(split: DigitsSplit, y: np.ndarray | None = None, **params: object) -> MLPClassifier:
    clf = MLPClassifier(max_iter=40, random_state=0, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(split.X_train, split.y_train if y is None else y)
    return clf


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def digits(split: DigitsSplit) -> MLPClassifier:
    return train_digits(split, seed=0)


@pytest.fixture(scope="module")
def expected(digits: MLPClassifier, split: DigitsSplit) -> np.ndarray:
    return np.asarray(digits.predict_proba(split.X_test))


# --- parity on the digits model, whole test split -------------------------------------------


def test_onnx_parity_digits(
    digits: MLPClassifier, split: DigitsSplit, expected: np.ndarray
) -> None:
    assert_parity(run_onnx(mlp_to_onnx(digits), split.X_test), expected)


@pytest.mark.parametrize("row_by_row", [True, False], ids=["batch1", "full_batch"])
def test_tflite_parity_digits(
    digits: MLPClassifier, split: DigitsSplit, expected: np.ndarray, row_by_row: bool
) -> None:
    probs = run_tflite(mlp_to_tflite(digits), split.X_test, row_by_row=row_by_row)
    assert_parity(probs, expected)


def test_tflite_fixed_batch(
    digits: MLPClassifier, split: DigitsSplit, expected: np.ndarray
) -> None:
    model = mlp_to_tflite(digits, batch=len(split.X_test))
    interp = Interpreter(model_content=model)
    interp.allocate_tensors()  # no resize needed
    assert interp.get_input_details()[0]["shape"].tolist() == [450, 64]
    interp.set_tensor(interp.get_input_details()[0]["index"], split.X_test)
    interp.invoke()
    assert_parity(interp.get_tensor(interp.get_output_details()[0]["index"]), expected)


# --- other architectures ----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "identity"])
def test_two_hidden_layers_parity(split: DigitsSplit, activation: str) -> None:
    clf = fit_quick(split, hidden_layer_sizes=(32, 16), activation=activation)
    ref = clf.predict_proba(split.X_test)
    assert_parity(run_onnx(mlp_to_onnx(clf), split.X_test), ref)
    assert_parity(run_tflite(mlp_to_tflite(clf), split.X_test), ref)


def test_binary_classifier_becomes_two_class_softmax(split: DigitsSplit) -> None:
    clf = fit_quick(split, y=(split.y_train >= 5).astype(np.int64), hidden_layer_sizes=(16,))
    assert clf.out_activation_ == "logistic"
    ref = clf.predict_proba(split.X_test)
    assert ref.shape == (450, 2)
    assert_parity(run_onnx(mlp_to_onnx(clf), split.X_test), ref)
    assert_parity(run_tflite(mlp_to_tflite(clf), split.X_test), ref)


# --- rejected inputs ------------------------------------------------------------------------


def _multilabel(split: DigitsSplit) -> MLPClassifier:
    y = np.stack([split.y_train % 2, split.y_train >= 5], axis=1).astype(np.int64)
    return fit_quick(split, y=y, hidden_layer_sizes=(8,))


def _bogus_activation(split: DigitsSplit) -> MLPClassifier:
    clf = fit_quick(split, hidden_layer_sizes=(8,))
    clf.activation = "softplus"
    return clf


@pytest.mark.parametrize("export", [mlp_to_onnx, mlp_to_tflite], ids=["onnx", "tflite"])
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda s: MLPClassifier(), ValueError, "not fitted"),
        (
            lambda s: MLPRegressor(max_iter=5).fit(s.X_train[:50], s.y_train[:50]),
            TypeError,
            "MLPClassifier",
        ),
        (_multilabel, ValueError, "multilabel"),
        (_bogus_activation, ValueError, "softplus"),
    ],
    ids=["unfitted", "regressor", "multilabel", "bad_activation"],
)
def test_unsupported_models_rejected(
    split: DigitsSplit,
    export: Callable[[MLPClassifier], bytes],
    make: Callable[[DigitsSplit], MLPClassifier],
    error: type[Exception],
    match: str,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = make(split)
    with pytest.raises(error, match=match):
        export(clf)


def test_bad_arguments_rejected(digits: MLPClassifier) -> None:
    with pytest.raises(ValueError, match="batch"):
        mlp_to_tflite(digits, batch=0)
    for export in (mlp_to_onnx, mlp_to_tflite):
        with pytest.raises(ValueError, match="differ"):
            export(digits, input_name="x", output_name="x")


# --- structure ------------------------------------------------------------------------------


def test_dense_layers_shapes(digits: MLPClassifier) -> None:
    layers = dense_layers(digits)
    assert [(lay.weights.shape, lay.activation) for lay in layers] == [
        ((64, 128), "relu"),
        ((128, 10), "softmax"),
    ]
    assert all(lay.weights.dtype == lay.bias.dtype == np.float32 for lay in layers)


def test_onnx_structure(digits: MLPClassifier) -> None:
    model = onnx.load_from_string(mlp_to_onnx(digits, input_name="pixels", output_name="p"))
    onnx.checker.check_model(model)
    assert model.ir_version == 7
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Softmax"]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "pixels" and out.name == "p"
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "N" and in_dims[1].dim_value == 64
    assert out.type.tensor_type.shape.dim[1].dim_value == 10


def test_tflite_structure(digits: MLPClassifier) -> None:
    data = mlp_to_tflite(digits, input_name="pixels", output_name="p")
    assert data[4:8] == b"TFL3"
    model = tfl.ModelT.InitFromPackedBuf(data, 0)
    assert model.version == 3
    assert model.buffers[0].data is None  # the empty sentinel
    codes = [c.builtinCode for c in model.operatorCodes]
    assert codes == [tfl.BuiltinOperator.FULLY_CONNECTED, tfl.BuiltinOperator.SOFTMAX]
    (graph,) = model.subgraphs
    ops = [model.operatorCodes[op.opcodeIndex].builtinCode for op in graph.operators]
    assert ops == [codes[0], codes[0], codes[1]]
    assert graph.operators[0].builtinOptions.fusedActivationFunction == (
        tfl.ActivationFunctionType.RELU
    )
    weights = graph.tensors[graph.operators[0].inputs[1]]
    assert list(weights.shape) == [128, 64]  # [out, in]
    assert graph.tensors[graph.inputs[0]].name == b"pixels"
    assert graph.tensors[graph.outputs[0]].name == b"p"
    assert list(graph.tensors[graph.inputs[0]].shapeSignature) == [-1, 64]


def test_tflite_weight_buffers_are_16_byte_aligned(digits: MLPClassifier) -> None:
    data = mlp_to_tflite(digits)
    model = tfl.Model.GetRootAs(data, 0)
    for i in range(1, model.BuffersLength()):
        buf = model.Buffers(i)
        assert buf.DataLength() > 0
        assert buf._tab.Vector(buf._tab.Offset(4)) % 16 == 0


def test_tflite_signature_runner(digits: MLPClassifier, split: DigitsSplit) -> None:
    interp = Interpreter(model_content=mlp_to_tflite(digits))
    runner = interp.get_signature_runner("serving_default")
    probs = runner(input=split.X_test[:1])["probabilities"]
    assert_parity(probs, digits.predict_proba(split.X_test[:1]))
