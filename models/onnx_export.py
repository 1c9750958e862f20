"""Export a fitted scikit-learn ``MLPClassifier`` to ONNX, built by hand with ``onnx.helper``.

The graph is ``Gemm -> act -> ... -> Gemm -> Softmax``: input float32 [N, n_features] with a
dynamic batch, output float32 [N, n_classes] probabilities, equal to ``predict_proba``.

``dense_layers`` is the exporter-neutral view of the network, shared with ``tflite_export``.
A binary classifier (one logistic output unit ``p = sigmoid(z)``) becomes a two-unit softmax
over ``[0, z]``, which is exactly ``[1 - p, p]``, so both formats always end in a softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

__all__ = ["ACTIVATIONS", "DenseLayer", "dense_layers", "mlp_to_onnx"]

# Opset 13 / IR 7: loadable by every onnxruntime since 1.7, including 1.18 on a Pi.
OPSET = 13
IR_VERSION = 7

ACTIVATIONS = ("identity", "relu", "logistic", "tanh")
_ONNX_ACTIVATION = {"relu": "Relu", "logistic": "Sigmoid", "tanh": "Tanh"}


@dataclass(frozen=True)
class DenseLayer:
    """``activation(x @ weights + bias)``; weights float32 [in, out], bias float32 [out].

    ``activation`` is one of ``ACTIVATIONS`` or ``"softmax"`` (last layer only).
    """

    weights: np.ndarray
    bias: np.ndarray
    activation: str


def dense_layers(clf: MLPClassifier) -> tuple[DenseLayer, ...]:
    """The layers of a fitted ``clf`` as float32 ``DenseLayer``s ending in a softmax.

    Raises TypeError for anything but an ``MLPClassifier``, ValueError if it is not fitted,
    uses an unsupported activation, or is multilabel.
    """
    if not isinstance(clf, MLPClassifier):
        raise TypeError(f"expected a fitted MLPClassifier, got {type(clf).__name__}")
    if not hasattr(clf, "coefs_"):
        raise ValueError("MLPClassifier is not fitted (no coefs_)")
    if clf.activation not in ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden activation {clf.activation!r}; expected one of {ACTIVATIONS}"
        )
    weights = [np.asarray(w, dtype=np.float32) for w in clf.coefs_]
    biases = [np.asarray(b, dtype=np.float32) for b in clf.intercepts_]
    weights[-1], biases[-1] = _softmax_head(clf, weights[-1], biases[-1])
    acts = [clf.activation] * (len(weights) - 1) + ["softmax"]
    return tuple(
        DenseLayer(weights=np.ascontiguousarray(w), bias=np.ascontiguousarray(b), activation=a)
        for w, b, a in zip(weights, biases, acts, strict=True)
    )


def _softmax_head(
    clf: MLPClassifier, w: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if clf.out_activation_ == "softmax":
        return w, b
    if clf.out_activation_ == "logistic" and clf.n_outputs_ == 1:
        # softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)] == sklearn's binary predict_proba.
        zero_w = np.zeros((w.shape[0], 1), dtype=np.float32)
        return np.hstack([zero_w, w]), np.concatenate([np.zeros(1, np.float32), b])
    raise ValueError(
        f"unsupported output layer {clf.out_activation_!r} with {clf.n_outputs_} outputs; "
        "expected a multiclass (softmax) or binary (one logistic unit) classifier, "
        "multilabel classifiers are not supported"
    )


def mlp_to_onnx(
    clf: MLPClassifier, *, input_name: str = "input", output_name: str = "probabilities"
) -> bytes:
    """Serialize ``clf`` as an ONNX model (opset 13, IR 7) and return its bytes.

    The model is checked with ``onnx.checker`` before it is returned.
    """
    if input_name == output_name:
        raise ValueError(f"input and output names must differ, both are {input_name!r}")
    layers = dense_layers(clf)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = input_name
    for i, layer in enumerate(layers):
        x = _add_dense(nodes, inits, i, layer, x, output_name)
    n_features, n_classes = layers[0].weights.shape[0], layers[-1].weights.shape[1]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edgefleet",
        doc_string=f"MLPClassifier {list(clf.hidden_layer_sizes)} {clf.activation}",
    )
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def _add_dense(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    i: int,
    layer: DenseLayer,
    x: str,
    output_name: str,
) -> str:
    """Append Gemm (+ activation or Softmax) for one layer; return its output's name."""
    w_name, b_name, z = f"dense{i}/weights", f"dense{i}/bias", f"dense{i}/z"
    inits += [
        numpy_helper.from_array(layer.weights, w_name),
        numpy_helper.from_array(layer.bias, b_name),
    ]
    nodes.append(helper.make_node("Gemm", [x, w_name, b_name], [z], name=f"dense{i}"))
    if layer.activation == "softmax":
        nodes.append(helper.make_node("Softmax", [z], [output_name], name="softmax", axis=-1))
        return output_name
    if layer.activation == "identity":
        return z
    out = f"dense{i}/{layer.activation}"
    op = _ONNX_ACTIVATION[layer.activation]
    nodes.append(helper.make_node(op, [z], [out], name=f"{layer.activation}{i}"))
    return out
